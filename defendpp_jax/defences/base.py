"""The `Defence` interface: a deployed pipeline and the views an attacker can take of it.

Usage:
  defence = Defence('plain', apply=lambda v, x, key, bpda: net.apply(v, x), variables=v)
  logits = defence.logits(defence.variables, x, key)      # the deployed function
  model = defence.attack_model('auto', eot_samples=10)    # what an attack differentiates
  jpeg_then_net = preprocess(Preprocessor('jpeg', ...), defence)

`apply(variables, x, key, bpda)` is pure and in inference mode; `key` feeds the randomness of a
randomised defence (ignored otherwise); with `bpda=True` every non-differentiable step runs its
differentiable stand-in in the backward pass (values unchanged: y = stand_in(x) +
stop_gradient(step(x) - stand_in(x)), or a straight-through estimator written in the step).
The steps and their stand-ins are declared in `stand_ins`, so reports can name them.

Views (`config.eval.view`):
  exact      gradients of the deployed function as it is (zero through a hard quantiser)
  bpda       each non-differentiable step replaced by its stand-in in the backward pass
  eot        gradients and losses averaged over k draws of the randomness
  bpda+eot   both
  oblivious  the classifier behind the pre-processors (the attacker ignores them: grey-box)
  latent     the classifier behind a generator's projection, with the generator's latent space
             (Defense-GAN; what the latent attack searches, attacks/latent.py)
  auto       the strongest the defence declares: bpda+eot / bpda / eot / exact
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from defendpp_jax.attacks import core as attack_core
from defendpp_jax.attacks.specs import VIEWS

ApplyFn = Callable[[Any, jax.Array, Any, bool], jax.Array]


@dataclasses.dataclass(frozen=True)
class Defence:
  """A deployed model and what an attacker can know of it.

  Attributes:
    name: a short name for reports (e.g. 'resnet18-w16-pyramid', 'comdefend-w2').
    apply: (variables, x, key, bpda) -> logits, pure, inference mode, x in [0, 1].
    variables: the trained variables `apply` takes.
    randomised: whether `apply` consumes its key (the same input gives different logits).
    stand_ins: (non-differentiable step, its differentiable stand-in) pairs, in pipeline order.
    behind: the classifier behind a pre-processor: what an oblivious attacker attacks.
    diagnostics: optional (defence, images, labels, eps, batch_size) -> dict of
      defence-specific analyses (Defend++: reconstructions and the R histogram).
    rejects: a detector: `apply` returns K + 1 logits, the last one "rejected"; an attacked
      input that is rejected counts as defended (a rejected clean input as an error).
    penalty: (variables, x, key, bpda) -> per-example penalty a detector-aware attacker
      subtracts from its loss (every view but 'oblivious'; its logits drop the reject column).
    info: facts about the deployed defence for reports (a detector's threshold, ...).
    latent: variables -> the latent space (attacks.core.LatentSpace) of a generator defence.
  """
  name: str
  apply: ApplyFn
  variables: Any
  randomised: bool = False
  stand_ins: tuple[tuple[str, str], ...] = ()
  behind: 'Defence | None' = None
  diagnostics: Callable[..., dict[str, Any]] | None = None
  rejects: bool = False
  penalty: ApplyFn | None = None
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  latent: Callable[[Any], attack_core.LatentSpace] | None = None
  # Draws of its randomness one `apply` already evaluates at once (an averaged defence's
  # passes): an EOT view vmaps eot_chunk // draws_per_call of its draws at a time, so that one
  # vmapped call holds about eot_chunk draws whatever the defence.
  draws_per_call: int = 1
  # variables -> the variables of `behind` (a pre-processed defence: its 'classifier' entry)
  behind_variables: Callable[[Any], Any] = lambda variables: variables['classifier']

  def logits(self, variables: Any, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """The deployed function: logits of x (key: the draw of a randomised defence)."""
    return self.apply(variables, x, key, False)

  def program(self, key: Any, build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
    """`build()` (a jitted function of this defence's variables and inputs) built once per
    process and `key`: every attack run on one defence with the same program (an eps sweep, the
    same attack at two eps, the predictions after each attack) is traced and compiled once.
    Kept on the instance, so it lives as long as the defence (a replaced copy starts anew)."""
    memo = self.__dict__.setdefault('_programs', {})
    if key not in memo:
      memo[key] = build()
    return memo[key]

  @property
  def default_view(self) -> str:
    """The strongest view this defence declares (what config.eval.view='auto' resolves to)."""
    if self.stand_ins and self.randomised:
      return 'bpda+eot'
    if self.stand_ins:
      return 'bpda'
    return 'eot' if self.randomised else 'exact'

  def resolve_view(self, view: str) -> str:
    """`view` checked against what this defence has ('auto' -> `default_view`)."""
    if view not in VIEWS:
      raise ValueError(f'config.eval.view={view!r} is not one of {VIEWS}')
    if view == 'auto':
      return self.default_view
    if 'eot' in view and not self.randomised:
      raise ValueError(f'config.eval.view={view!r}: {self.name} is deterministic, there is no '
                       'randomness to average (use exact, bpda or auto)')
    if view == 'oblivious' and self.behind is None:
      raise ValueError(f'config.eval.view=oblivious: {self.name} has no pre-processor to be '
                       'oblivious of (it is a classifier)')
    if view == 'latent' and self.latent is None:
      raise ValueError(f'view latent: {self.name} has no generator whose latent space an '
                       'attacker could search (only defense_gan has)')
    return view

  def attack_model(self, view: str = 'auto', eot_samples: int = 10, eot_chunk: int = 10,
                   variables: Any = None) -> attack_core.AttackModel:
    """What an attack with this view differentiates (variables: default `self.variables`)."""
    view = self.resolve_view(view)
    variables = self.variables if variables is None else variables
    if view == 'oblivious':
      behind = self.behind
      return behind.attack_model('auto', eot_samples, eot_chunk,
                                 self.behind_variables(variables))
    if view == 'latent':
      inner = self.behind.attack_model('auto', eot_samples, eot_chunk,
                                       self.behind_variables(variables))
      return dataclasses.replace(inner, latent=self.latent(variables))
    bpda = 'bpda' in view
    k = eot_samples if 'eot' in view else 1
    if k < 1:
      raise ValueError(f'config.eval.eot_samples must be >= 1, got {eot_samples}')
    logits = lambda x, key: self.apply(variables, x, key, bpda)
    penalty = None
    if self.penalty is not None:
      logits = lambda x, key: self.apply(variables, x, key, bpda)[..., :-1]
      penalty = lambda x, key: self.penalty(variables, x, key, bpda)
    return attack_core.AttackModel(logits, eot_samples=k,
                                   eot_chunk=max(1, eot_chunk // self.draws_per_call),
                                   randomised=self.randomised, penalty=penalty)

  def view_settings(self, view: str, eot_samples: int) -> dict[str, Any]:
    """{'view', 'eot_samples'} as an attack with `view` runs (for reports)."""
    view = self.resolve_view(view)
    if view in ('oblivious', 'latent'):
      inner = self.behind.view_settings('auto', eot_samples)
      return {'view': view, 'eot_samples': inner['eot_samples']}
    return {'view': view, 'eot_samples': eot_samples if 'eot' in view else 1}


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """An input transformation in front of a classifier: (variables, x, key, bpda) -> x'."""
  name: str
  apply: ApplyFn
  variables: Any = None
  randomised: bool = False
  stand_ins: tuple[tuple[str, str], ...] = ()
  latent: Callable[[Any], attack_core.LatentSpace] | None = None  # a generator's projection


def preprocess(pre: Preprocessor, classifier: Defence, name: str | None = None) -> Defence:
  """The defence `classifier(pre(x))`; variables {'preprocessor': ..., 'classifier': ...}."""
  both_random = pre.randomised and classifier.randomised

  def apply(variables, x, key, bpda):
    k_pre = k_cls = key
    if key is not None and both_random:
      k_pre, k_cls = jax.random.split(key)
    cleaned = pre.apply(variables['preprocessor'], x, k_pre, bpda)
    return classifier.apply(variables['classifier'], cleaned, k_cls, bpda)

  return Defence(name or f'{pre.name}+{classifier.name}', apply,
                 {'preprocessor': pre.variables, 'classifier': classifier.variables},
                 randomised=pre.randomised or classifier.randomised,
                 stand_ins=pre.stand_ins + classifier.stand_ins, behind=classifier,
                 draws_per_call=classifier.draws_per_call,
                 latent=None if pre.latent is None else (
                     lambda variables: pre.latent(variables['preprocessor'])))


def averaged(defence: Defence, passes: int, name: str | None = None) -> Defence:
  """A randomised defence's prediction averaged over `passes` draws: the log of the mean
  softmax (logits of the averaged prediction); `passes` 1 = the defence itself."""
  if not isinstance(passes, int) or passes < 1:
    raise ValueError(f'passes must be an integer >= 1, got {passes!r}')
  if passes == 1:
    return defence if name is None else dataclasses.replace(defence, name=name)
  if not defence.randomised:
    raise ValueError(f'{defence.name} is deterministic: averaging passes changes nothing')

  def apply(variables, x, key, bpda):
    if key is None:
      raise ValueError(f'{defence.name} is randomised: its logits need a key')
    logp = jax.vmap(lambda k: jax.nn.log_softmax(defence.apply(variables, x, k, bpda)))(
        jax.random.split(key, passes))
    return jax.nn.logsumexp(logp, axis=0) - jnp.log(float(passes))

  return dataclasses.replace(defence, name=name or f'{defence.name} x{passes}', apply=apply,
                             draws_per_call=defence.draws_per_call * passes)


def ensemble(members: 'list[Defence] | tuple[Defence, ...]', name: str | None = None
             ) -> Defence:
  """The members' averaged logits (HGD's Appendix C ensembles); variables: a tuple of the
  members'. Its `behind` (what an oblivious attacker attacks) is the ensemble of the members'
  `behind`s when every member has one (e.g. denoisers in front of classifiers)."""
  members = tuple(members)
  if not members:
    raise ValueError('an ensemble needs at least one member')
  randomised = any(m.randomised for m in members)

  def apply(variables, x, key, bpda):
    keys = [key] * len(members)
    if key is not None and randomised:
      keys = list(jax.random.split(key, len(members)))
    return sum(m.apply(v, x, k, bpda) for m, v, k in zip(members, variables, keys)
               ) / len(members)

  behind = None
  if all(m.behind is not None for m in members):
    behind = ensemble([m.behind for m in members])
  return Defence(name or '&'.join(m.name for m in members), apply,
                 tuple(m.variables for m in members), randomised=randomised,
                 stand_ins=tuple(p for m in members for p in m.stand_ins), behind=behind,
                 behind_variables=lambda vs: tuple(m.behind_variables(v)
                                                   for m, v in zip(members, vs)),
                 draws_per_call=max(m.draws_per_call for m in members))


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """`hard`'s values with `soft`'s gradient (BPDA with the stand-in `soft`)."""
  return soft + jax.lax.stop_gradient(hard - soft)
