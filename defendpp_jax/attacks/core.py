"""What every attack shares: projections, losses, and the gradient seam (`AttackModel`).

Usage:
  model = AttackModel(lambda x, key: apply(variables, x), eot_samples=1)   # exact gradients
  values, logits, grad = model.value_and_grad(objective('dlr', y), x, key)

An attack sees a model only through an `AttackModel`: `logits(x, key)` is the function it
differentiates (the defence itself, or with BPDA stand-ins for its non-differentiable steps:
the values are the defence's either way) and `value_and_grad` / `expect` are where Expectation
over Transformation happens: with `eot_samples = k > 1` they average over k independent draws
of the model's randomness (vmapped, `eot_chunk` samples at a time, so memory stays bounded).
A plain `logits_fn(x)` is accepted wherever an AttackModel is (`as_attack_model`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
LogitsFn = Callable[[Array], Array]
Objective = Callable[[Array], Array]  # logits (N, K) -> per-example value to MAXIMISE (N,)

LOSSES = ('ce', 'margin', 'dlr')
# atanh(+-1) is infinite: the tanh-space change of variables of C&W needs pixels strictly
# inside (0, 1).
TANH_BOUND = 1.0 - 1e-6
# Guards divisions by per-example norms without changing any non-degenerate value.
TINY = 1e-12
# fold_in constant of the key stream a model consumes (distinct from an attack's own streams).
_MODEL_STREAM = 0x5EED
# The model key of a check outside an attack's step loop (no loop runs this many steps).
FINAL_STEP = 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# The gradient seam.


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """A generator defence's latent space as an attacker sees it (variables bound).

  Attributes:
    generate: z (N, latent) -> images (N, H, W, C) in [0, 1], differentiable.
    encode: (x, key) -> the z the defence's projection finds for x.
  """
  generate: Callable[[Array], Array]
  encode: Callable[[Array, Array | None], Array]


@dataclasses.dataclass(frozen=True)
class AttackModel:
  """A model as an attacker sees it.

  Attributes:
    logits: (x, key) -> logits, the function the attack differentiates, in inference mode.
    eot_samples: k > 1: gradients and losses are averages over k draws of the randomness.
    eot_chunk: draws evaluated at once (vmapped); the chunks run one after another.
    randomised: whether `logits` consumes its key (an attack must then supply one).
    penalty: optional (x, key) -> per-example penalty subtracted from every objective the
      model's `value_and_grad` computes (a detector-aware attack: loss - c * detector score).
    latent: a generator defence's latent space (view 'latent'; `logits` is then the classifier
      behind the projection), for the latent attack.
  """
  logits: Callable[[Array, Array | None], Array]
  eot_samples: int = 1
  eot_chunk: int = 10
  randomised: bool = False
  penalty: Callable[[Array, Array | None], Array] | None = None
  latent: LatentSpace | None = None

  def expect(self, fn: Callable[[Array | None], Any], key: Array | None) -> Any:
    """fn(key), or its average over `eot_samples` independent keys (float leaves averaged,
    others taken from the first draw)."""
    if self.eot_samples <= 1:
      return fn(key)
    if key is None:
      raise ValueError('EOT over a randomised model needs a key')
    keys = jax.random.split(key, self.eot_samples)
    # Chunks of draws vmapped, the chunks one after another in a scan: XLA's CPU scheduler
    # runs independent work concurrently, and chunks written out one after another (earlier
    # versions) kept every chunk's activations live at once. Measured on Adv-BNN's 10-pass
    # prediction (PGD-10 with EOT-4, 100 MNIST images, one draw a chunk; docs/PERFORMANCE.md):
    # 2,060 MB of temporaries unrolled, 539 MB scanned, at the same speed and with identical
    # adversarials. A remainder chunk runs after the scan (it waits for the scan's result).
    chunk = max(1, min(self.eot_chunk, self.eot_samples))
    full, rest = divmod(self.eot_samples, chunk)
    draws = jax.vmap(fn)
    if full == 1:
      parts = [draws(keys[:chunk])]
    else:
      stacked = keys[:full * chunk].reshape(full, chunk, *keys.shape[1:])
      _, out = jax.lax.scan(lambda carry, k: (carry, draws(k)), None, stacked)
      parts = [jax.tree_util.tree_map(lambda a: a.reshape(full * chunk, *a.shape[2:]), out)]
    if rest:
      k, _ = jax.lax.optimization_barrier((keys[full * chunk:], parts[0]))
      parts.append(draws(k))
    out = parts[0] if len(parts) == 1 else jax.tree_util.tree_map(
        lambda *a: jnp.concatenate(a), *parts)
    return jax.tree_util.tree_map(
        lambda a: a.mean(0) if jnp.issubdtype(a.dtype, jnp.floating) else a[0], out)

  def adversarial(self, logits: Array, x: Array, key: Array | None, y: Array,
                  target: Array | None = None) -> Array:
    """Success per example: misclassified (or the target) and, with a penalty (a detector),
    not penalised (the detector's score under its hinge)."""
    ok = is_adversarial(logits, y, target)
    if self.penalty is not None:
      ok = ok & (self.penalty(x, key) <= 0)
    return ok

  def value_and_grad(self, objective: Objective, x: Array, key: Array | None
                     ) -> tuple[Array, Array, Array]:
    """(per-example objective, logits, input gradient of each example's objective)."""
    penalty = self.penalty
    return self.expect(lambda k: _value_and_input_grad(
        objective, lambda z: self.logits(z, k), x,
        None if penalty is None else (lambda z: penalty(z, k))), key)


def as_attack_model(model: AttackModel | LogitsFn) -> AttackModel:
  """An AttackModel as is; a plain `logits_fn(x)` as a deterministic one with exact gradients."""
  if isinstance(model, AttackModel):
    return model
  return AttackModel(lambda x, key: model(x))


def model_keys(model: AttackModel, key: Array | None) -> Callable[[Any], Array | None]:
  """i -> the key the model consumes at step i (fresh per step); None for deterministic models."""
  if key is None:
    if model.randomised:
      raise ValueError('this model is randomised: the attack needs a key (key=...)')
    return lambda i: None
  base = jax.random.fold_in(key, _MODEL_STREAM)
  return lambda i: jax.random.fold_in(base, i)


def _value_and_input_grad(objective: Objective, logits_fn: LogitsFn, x_adv: Array,
                          penalty: Callable[[Array], Array] | None = None
                          ) -> tuple[Array, Array, Array]:
  """Per-example objective (minus the penalty, if any), logits, and the input gradient of each
  example's objective.

  Examples are independent, so the gradient of the batch SUM is every example's own gradient.
  """
  def total(z):
    logits = logits_fn(z)
    per_example = objective(logits)
    if penalty is not None:
      per_example = per_example - penalty(z)
    return jnp.sum(per_example), (per_example, logits)

  (_, (per_example, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
  return per_example, logits, grad


# ---------------------------------------------------------------------------------------------
# Norms and projections.


def example_axes(x: Array) -> tuple[int, ...]:
  """All axes but the batch axis: norms are per example, never over the batch."""
  return tuple(range(1, x.ndim))


def per_example(v, x: Array) -> Array:
  """Broadcasts a scalar or an (N,) array of per-example values against x (N, ...)."""
  v = jnp.asarray(v, dtype=x.dtype)
  if v.ndim == 1:
    v = v.reshape((-1,) + (1,) * (x.ndim - 1))
  return v


def l2_norm(v: Array) -> Array:
  """Per-example L2 norm over all non-batch axes; (N, ...) -> (N,)."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=example_axes(v)))


def normalize_l2(v: Array) -> Array:
  n = l2_norm(v)
  return v / per_example(jnp.maximum(n, TINY), v)


def project_linf(x_adv: Array, x: Array, eps) -> Array:
  """Projects x_adv onto the L-infinity ball of radius eps around x (per example)."""
  eps = per_example(eps, x)
  return jnp.clip(x_adv, x - eps, x + eps)


def project_l2(x_adv: Array, x: Array, eps) -> Array:
  """Projects x_adv onto the L2 ball of radius eps around x (per example)."""
  delta = x_adv - x
  n = l2_norm(delta)
  factor = jnp.minimum(1.0, jnp.asarray(eps, x.dtype) / jnp.maximum(n, TINY))
  return x + delta * per_example(factor, x)


def project(x_adv: Array, x: Array, eps, norm: str) -> Array:
  # Clipping to the box after the ball projection keeps the point in the ball: x is in [0, 1],
  # so clipping only moves coordinates towards x.
  proj = project_linf if norm == 'linf' else project_l2
  return jnp.clip(proj(x_adv, x, eps), 0.0, 1.0)


def check_norm(norm: str) -> None:
  if norm not in ('linf', 'l2'):
    raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')


def random_init(key: Array, x: Array, eps, norm: str = 'linf') -> Array:
  """Uniform random point of the eps-ball around x, clipped to [0, 1].

  Args:
    key: a `jax.random.key`.
    x: (N, ...) clean inputs.
    eps: radius, scalar or (N,).
    norm: 'linf' (uniform in the cube) or 'l2' (uniform in the ball: uniform direction,
      radius eps * u ** (1 / d)).

  Returns:
    An array like x.
  """
  eps = per_example(eps, x)
  if norm == 'linf':
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
  elif norm == 'l2':
    k_dir, k_rad = jax.random.split(key)
    direction = normalize_l2(jax.random.normal(k_dir, x.shape, x.dtype))
    d = math.prod(x.shape[1:])
    radius = jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / d)
    delta = direction * per_example(radius, x) * eps
  else:
    raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
  return jnp.clip(x + delta, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Losses (per example, to MAXIMISE).


def is_adversarial(logits: Array, y: Array, target: Array | None = None) -> Array:
  """Success per example: argmax != y (untargeted) or argmax == target (targeted)."""
  pred = jnp.argmax(logits, axis=-1)
  return pred != y if target is None else pred == target


def ce_loss(logits: Array, y: Array, target: Array | None = None) -> Array:
  """CE to y (untargeted), or minus CE to the target."""
  if target is None:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return -optax.softmax_cross_entropy_with_integer_labels(logits, target)


def margin_loss(logits: Array, y: Array, target: Array | None = None) -> Array:
  """C&W's logit margin: max_{i != y} z_i - z_y (untargeted), z_t - max_{i != t} z_i (targeted).

  It does not saturate where softmax does (defensive distillation, over-confident nets)."""
  label = y if target is None else target
  onehot = jax.nn.one_hot(label, logits.shape[-1], dtype=bool)
  z_label = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return other - z_label if target is None else z_label - other


def dlr_loss(logits: Array, y: Array, target: Array | None = None) -> Array:
  """Difference-of-logits-ratio loss of Croce & Hein (2020), per example, to maximise.

  Untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), needs K >= 3.
  Targeted:   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), needs K >= 4.
  (z_pi1 >= z_pi2 >= ... are the sorted logits.)
  """
  k = logits.shape[-1]
  if k < (3 if target is None else 4):
    raise ValueError(f'DLR loss needs at least {3 if target is None else 4} classes, got {k}')
  z_sorted = jnp.sort(logits, axis=-1)
  z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
  if target is None:
    other = jnp.max(jnp.where(jax.nn.one_hot(y, k, dtype=bool), -jnp.inf, logits), axis=-1)
    return -(z_y - other) / (z_sorted[:, -1] - z_sorted[:, -3] + TINY)
  z_t = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + TINY)


_LOSS_FNS = {'ce': ce_loss, 'margin': margin_loss, 'dlr': dlr_loss}


def objective(loss: str, y: Array, target: Array | None = None) -> Objective:
  """The per-example objective `loss` ('ce' | 'margin' | 'dlr') of labels y (or the target)."""
  if loss not in _LOSS_FNS:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
  fn = _LOSS_FNS[loss]
  return lambda logits: fn(logits, y, target)


def verified(model: AttackModel, candidate: Array, x: Array, y: Array, target: Array | None,
             key: Array | None) -> Array:
  """candidate where a fresh forward pass confirms it is adversarial, else x.

  The logits that selected the candidate came from inside a gradient computation, which XLA
  may fuse differently; points on the decision boundary could flip. This costs one forward pass.
  """
  ok = model.adversarial(model.logits(candidate, key), candidate, key, y, target)
  return jnp.where(per_example(ok, x), candidate, x)
