"""Named attack entries: what `config.eval.attacks` lists, with each entry's own settings.

Usage:
  specs = attack_specs(config.eval, 'mnist')          # one AttackSpec per entry
  spec = make_spec('pgd', eps=0.3, steps=40, loss='margin', restarts=5)

An entry is a name (`'pgd'`, today's defaults from config.eval) or a name with settings,
`'pgd(steps=40, loss=margin, restarts=5, view=eot, eot_samples=20, label=pgd_margin)'`.
Settings of every entry: `label` (its row name), `view` and `eot_samples` (else the
evaluation's). Bounded (L-inf / L2) attacks: `eps`, `loss` (ce | margin | dlr); fgsm, bim, pgd
and apgd also `steps` (not fgsm), bim / pgd `step_size_factor`, pgd `restarts` and `norm`, apgd
`norm`. Minimal-norm: cw_l2 `binary_steps`, `steps`, `initial_const`, `lr`, `confidence`,
`abort_early`; ddn `steps`, `gamma`, `init_norm`. `apgd_dlr` is apgd with loss=dlr; `apgd_t`
(targeted APGD-DLR toward each of the `targets` classes ranked after the label) `eps`, `steps`,
`norm`, `targets`; `fab_t` (FAB-T: the targeted minimal-norm boundary attack, broken = its
closest point within eps) `eps`, `steps`, `norm`, `targets`; `square` (score-based: logits
only, never a gradient) `eps`, `queries`, `p_init`, `norm`; `latent` (Defense-GAN's latent space, view latent: attacks/latent.py) `eps`,
`norm`, `steps`, `lr` (Adam), `const` (the margin's weight against ||G(z) - x||^2).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any

from defendpp_jax import protocol
from defendpp_jax.attacks import core

# Table columns in the paper's order (one list for reports and reproduced tables).
COLUMNS = (('fgsm', 'FGSM'), ('bim', 'BIM'), ('pgd', 'PGD'), ('cw_l2', 'C&W'), ('ddn', 'DDN'),
           ('apgd', 'APGD'), ('apgd_dlr', 'APGD-DLR'))
NAMES = ('fgsm', 'bim', 'pgd', 'apgd', 'apgd_dlr', 'apgd_t', 'fab_t', 'square', 'latent',
         'cw_l2', 'ddn')
VIEWS = ('auto', 'exact', 'bpda', 'eot', 'bpda+eot', 'oblivious', 'latent')
_COMMON = ('label', 'view', 'eot_samples')
_SETTINGS = {
    'fgsm': ('eps', 'loss'),
    'bim': ('eps', 'loss', 'steps', 'step_size_factor'),
    'pgd': ('eps', 'loss', 'steps', 'step_size_factor', 'restarts', 'norm'),
    'apgd': ('eps', 'loss', 'steps', 'norm'),
    'apgd_dlr': ('eps', 'steps', 'norm'),
    'apgd_t': ('eps', 'steps', 'norm', 'targets'),
    'fab_t': ('eps', 'steps', 'norm', 'targets'),
    'square': ('eps', 'queries', 'p_init', 'norm'),
    'latent': ('eps', 'norm', 'steps', 'lr', 'const'),
    'cw_l2': ('binary_steps', 'steps', 'initial_const', 'lr', 'confidence', 'abort_early'),
    'ddn': ('steps', 'gamma', 'init_norm'),
}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack entry: the function, its keyword arguments and how its row is reported."""
  attack: str                  # a key of attacks.ATTACKS
  kwargs: dict[str, Any]
  norm: str
  eps: float | None            # None: a minimal-norm attack
  steps: int
  restarts: int = 1
  label: str = ''
  loss: str = 'ce'
  view: str | None = None      # None: the evaluation's config.eval.view
  eot_samples: int | None = None  # None: the evaluation's config.eval.eot_samples
  group: str = ''              # an ensemble entry (autoattack): its components run as a cascade

  @property
  def key(self) -> str:
    return self.label or self.attack


def parse_entry(entry: str) -> tuple[str, dict[str, Any]]:
  """'pgd(steps=40, loss=margin)' -> ('pgd', {'steps': 40, 'loss': 'margin'})."""
  m = re.fullmatch(r'\s*([a-z0-9_]+)\s*(?:\((.*)\))?\s*', entry)
  if not m:
    raise ValueError(f'config.eval.attacks: cannot read entry {entry!r} (expected name or '
                     'name(setting=value, ...))')
  name, args = m.group(1), m.group(2)
  settings = {}
  for part in (args or '').split(','):
    if not part.strip():
      continue
    if '=' not in part:
      raise ValueError(f'config.eval.attacks: {entry!r}: {part.strip()!r} is not setting=value')
    k, v = (s.strip() for s in part.split('=', 1))
    settings[k] = _value(v)
  return name, settings


_ARITHMETIC = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
               ast.Div, ast.USub, ast.UAdd)


def _value(text: str) -> Any:
  """A setting's value: a Python literal, true / false, arithmetic of numbers (8/255), else
  the text itself (a name such as margin or eot)."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    pass
  try:
    tree = ast.parse(text, mode='eval')
  except SyntaxError:
    return text
  if all(isinstance(n, _ARITHMETIC) for n in ast.walk(tree)):
    return eval(compile(tree, '<setting>', 'eval'), {'__builtins__': {}})  # numbers only
  return text


def make_spec(name: str, *, label: str = '', view: str | None = None,
              eot_samples: int | None = None, eps: float = 0.1, loss: str = 'ce',
              steps: int = 100, step_size_factor: float = 2.5, restarts: int = 1,
              norm: str = 'linf', binary_steps: int = 5, initial_const: float = 0.01,
              lr: float = 0.01, confidence: float = 0.0, abort_early: bool = False,
              gamma: float = 0.05, init_norm: float = 1.0, targets: int = 9,
              queries: int = 5000, p_init: float = 0.8, const: float = 1.0) -> AttackSpec:
  """The AttackSpec of attack `name` with these settings (the one place specs are built)."""
  for field, value, kind in (('eps', eps, (int, float)), ('steps', steps, int),
                             ('restarts', restarts, int), ('binary_steps', binary_steps, int),
                             ('targets', targets, int), ('queries', queries, int),
                             ('p_init', p_init, (int, float)),
                             ('abort_early', abort_early, bool),
                             ('step_size_factor', step_size_factor, (int, float))):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      what = getattr(kind, '__name__', 'number')
      raise ValueError(f'attack {name!r}: {field}={value!r} is not a {what}')
  if queries < 1 or targets < 1:
    raise ValueError(f'attack {name!r}: queries={queries} and targets={targets} must be >= 1')
  if eot_samples is not None and (not isinstance(eot_samples, int) or eot_samples < 1):
    raise ValueError(f'attack {name!r}: eot_samples={eot_samples!r} must be an integer >= 1')
  if view is not None and view not in VIEWS:
    raise ValueError(f'attack {name!r}: view={view!r} is not one of {VIEWS}')
  if loss not in core.LOSSES:
    raise ValueError(f'attack {name!r}: loss={loss!r} is not one of {core.LOSSES}')
  common = dict(label=label, view=view, eot_samples=eot_samples)
  if name == 'fgsm':
    return AttackSpec('fgsm', {'eps': eps, 'loss': loss}, 'linf', eps, 1, loss=loss, **common)
  if name in ('bim', 'pgd'):
    kwargs = {'eps': eps, 'step_size': step_size_factor * eps / steps, 'num_steps': steps,
              'loss': loss}
    if name == 'pgd':
      kwargs.update(restarts=restarts, norm=norm)
    return AttackSpec(name, kwargs, norm if name == 'pgd' else 'linf', eps, steps,
                      restarts if name == 'pgd' else 1, loss=loss, **common)
  if name in ('apgd', 'apgd_dlr'):
    loss = 'dlr' if name == 'apgd_dlr' else loss
    common['label'] = label or ('apgd_dlr' if name == 'apgd_dlr' else '')
    return AttackSpec('apgd', {'eps': eps, 'num_steps': steps, 'loss': loss, 'norm': norm},
                      norm, eps, steps, loss=loss, **common)
  if name == 'apgd_t':
    return AttackSpec('apgd_t', {'eps': eps, 'num_steps': steps, 'norm': norm,
                                 'num_targets': targets}, norm, eps, steps, restarts=targets,
                      loss='dlr', **common)
  if name == 'fab_t':
    if norm not in ('linf', 'l2'):
      raise ValueError(f"attack fab_t: norm={norm!r} is not 'linf' or 'l2'")
    return AttackSpec('fab_t', {'eps': eps, 'num_steps': steps, 'norm': norm,
                                'num_targets': targets}, norm, eps, steps, restarts=targets,
                      loss='margin', **common)
  if name == 'square':
    if not 0.0 < p_init <= 1.0:
      raise ValueError(f'attack square: p_init={p_init!r} must be in (0, 1]')
    if norm not in ('linf', 'l2'):
      raise ValueError(f"attack square: norm={norm!r} is not 'linf' or 'l2'")
    return AttackSpec('square', {'eps': eps, 'num_queries': queries, 'p_init': float(p_init),
                                 'norm': norm}, norm, eps, queries, loss='margin', **common)
  if name == 'latent':
    if norm not in ('linf', 'l2') or lr <= 0 or const <= 0:
      raise ValueError(f"attack latent: norm={norm!r} must be 'linf' or 'l2', lr={lr!r} and "
                       f'const={const!r} > 0')
    common['view'] = view or 'latent'
    return AttackSpec('latent', {'eps': eps, 'norm': norm, 'num_steps': steps, 'lr': float(lr),
                                 'const': float(const)}, norm, eps, steps, loss='margin',
                      **common)
  if name == 'cw_l2':
    kwargs = {'binary_search_steps': binary_steps, 'num_steps': steps,
              'confidence': confidence, 'initial_const': initial_const, 'lr': lr}
    if abort_early:
      kwargs['abort_early'] = True
    return AttackSpec('cw_l2', kwargs, 'l2', None, binary_steps * steps, loss='margin',
                      **common)
  if name == 'ddn':
    return AttackSpec('ddn', {'num_steps': steps, 'gamma': gamma, 'init_norm': init_norm},
                      'l2', None, steps, loss='ce', **common)
  raise ValueError(f'config.eval.attacks: unknown attack {name!r}; known: '
                   f'{NAMES + tuple(ENSEMBLES)}')


def _defaults(ec: Any, dataset: str, name: str) -> dict[str, Any]:
  """An entry's settings from today's flat config.eval fields."""
  eps = protocol.linf_eps(dataset, ec.eps)
  if name == 'fgsm':
    return {'eps': eps}
  if name == 'bim':
    return {'eps': eps, 'steps': ec.bim_steps, 'step_size_factor': ec.step_size_factor}
  if name == 'pgd':
    return {'eps': eps, 'steps': ec.pgd_steps, 'step_size_factor': ec.step_size_factor,
            'restarts': ec.pgd_restarts}
  if name == 'apgd':
    return {'eps': eps, 'steps': ec.apgd_steps, 'loss': ec.apgd_loss}
  if name in ('apgd_dlr', 'apgd_t', 'fab_t'):
    return {'eps': eps, 'steps': ec.apgd_steps}
  if name == 'square':
    return {'eps': eps, 'queries': ec.get('square_queries', 5000)}
  if name == 'latent':
    return {'eps': eps, 'steps': ec.latent_steps, 'lr': ec.latent_lr}
  if name == 'cw_l2':
    return {'binary_steps': ec.cw_binary_steps, 'steps': ec.cw_steps,
            'initial_const': ec.cw_initial_const, 'lr': ec.cw_lr,
            'abort_early': ec.get('cw_abort_early', False)}
  if name == 'ddn':
    return {'steps': ec.ddn_steps}
  raise ValueError(f'config.eval.attacks: unknown attack {name!r}; known: '
                   f'{NAMES + tuple(ENSEMBLES)}')


# AutoAttack (Croce & Hein 2020) as one entry: its components in the published order (APGD-CE,
# APGD-T, FAB-T, Square), each run only on the examples the ones before it did not break
# (evaluation.evaluate); `autoattack_rand` is the version for randomised defences (APGD-CE and
# APGD-DLR with EOT over 20 draws).
ENSEMBLES = {
    'autoattack': (('apgd', {'loss': 'ce'}, 'apgd_ce'), ('apgd_t', {}, 'apgd_t'),
                   ('fab_t', {}, 'fab_t'), ('square', {}, 'square')),
    'autoattack_rand': (('apgd', {'loss': 'ce', 'view': 'eot', 'eot_samples': 20}, 'apgd_ce'),
                        ('apgd_dlr', {'view': 'eot', 'eot_samples': 20}, 'apgd_dlr')),
}
_ENSEMBLE_SETTINGS = ('eps', 'steps', 'norm', 'targets', 'queries', 'label')


def ensemble_specs(ec: Any, dataset: str, name: str, settings: dict[str, Any]
                   ) -> list[AttackSpec]:
  """The component specs of ensemble entry `name` (labels `<label>:<component>`)."""
  unknown = sorted(set(settings) - set(_ENSEMBLE_SETTINGS))
  if unknown:
    raise ValueError(f'config.eval.attacks: {name}: unknown setting(s) {unknown} (allowed: '
                     f'{_ENSEMBLE_SETTINGS})')
  group = settings.pop('label', name)
  out = []
  for attack, fixed, part in ENSEMBLES[name]:
    allowed = set(_SETTINGS[attack])
    mine = {k: v for k, v in settings.items() if k in allowed}
    out.append(dataclasses.replace(
        make_spec(attack, **{**_defaults(ec, dataset, attack), **mine, **fixed},
                  label=f'{group}:{part}'), group=group))
  return out


def group_spec(parts: list[AttackSpec]) -> AttackSpec:
  """The row of an ensemble: the worst case over its components (`parts`, in order)."""
  first = parts[0]
  return AttackSpec(first.group, {'components': [p.key for p in parts]}, first.norm,
                    first.eps, sum(p.steps for p in parts), label=first.group,
                    loss='worst case', group=first.group)


def attack_specs(ec: Any, dataset: str) -> list[AttackSpec]:
  """The entries of `config.eval.attacks` (given as `ec` = config.eval) on `dataset`."""
  specs = []
  for entry in ec.attacks:
    name, settings = parse_entry(entry)
    if name in ENSEMBLES:
      specs += ensemble_specs(ec, dataset, name, settings)
      continue
    allowed = _SETTINGS.get(name, ()) + _COMMON
    unknown = sorted(set(settings) - set(allowed))
    if name in _SETTINGS and unknown:
      raise ValueError(f'config.eval.attacks: {entry!r}: unknown setting(s) {unknown} for '
                       f'{name} (allowed: {allowed})')
    specs.append(make_spec(name, **{**_defaults(ec, dataset, name), **settings}))
  keys = [s.key for s in specs]
  duplicated = sorted({k for k in keys if keys.count(k) > 1})
  if duplicated:
    raise ValueError(f'config.eval.attacks: entries {duplicated} appear twice; give them '
                     'distinct label=... settings')
  return specs
