"""Signs of an evaluation that cannot be trusted, written next to every table.

Usage:
  checks = sanity_checks(defence, images, labels, clean, results, ...)
  checks += gradient_checks(defence, images, labels, results, ...)

Each check is {'name', 'value', 'expected', 'passed'}. The sanity checks catch a broken attack
(PGD at eps = 0 must give the clean accuracy, a huge eps must give ~0%, iterative attacks must
beat FGSM, white-box must beat transfer). The gradient checks follow AutoAttack's `checks.py`:
a randomised output attacked without EOT, all-zero input gradients (shattered or masked), outputs
that are probabilities rather than logits, and how well a BPDA stand-in's gradient agrees with
the exact one where both exist.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax.attacks import core as attack_core
from defendpp_jax.attacks import specs as specs_lib
from defendpp_jax.defences.base import Defence
from defendpp_jax.evaluation import runner

ZERO_GRADIENT_LIMIT = 0.01   # flagged above 1% of the examples
PROBABILITY_TOLERANCE = 1e-3


def _check(name: str, value, expected, passed: bool) -> dict[str, Any]:
  return {'name': name, 'value': value, 'expected': expected, 'passed': bool(passed)}


def sanity_checks(target: Defence, images, labels, clean_acc: float,
                  results: dict[str, runner.AttackResult], batch_size: int, key: jax.Array,
                  transfer: dict[str, runner.AttackResult] | None = None, view: str = 'auto',
                  eot_samples: int = 10, eot_chunk: int = 10, draws: int = 1,
                  alive: list[np.ndarray] | None = None, num: int = 0,
                  resume: runner.Resume | None = None) -> list[dict[str, Any]]:
  """Signatures of a broken attack or of gradient masking (white-box on `target`'s `view`).

  `alive` (the clean pass of a worst-case evaluation, a mask per draw): the eps=1 attack runs
  on the examples it marks only, the others counting as broken. `num` > 0
  (config.eval.check_examples): the two check attacks (PGD at eps 0 and at eps 1) run on the
  first `num` examples only, against the clean accuracy of those (for defences whose every
  attack step costs seconds an image, e.g. Defense-GAN's projection). `resume`: the two
  attacks' finished draws are kept and reused there, as the evaluation's own."""
  view = 'auto' if view == 'oblivious' else view
  if 0 < num < len(labels):
    images, labels = images[:num], labels[:num]
    alive = None if alive is None else [a[:num] for a in alive]
    d = draws if target.randomised else 1
    clean_acc = sum(runner.clean_counts(target, images, labels, batch_size,
                                        key=runner.draw_key(key, r, d))[0]
                    for r in range(d)) / (d * len(labels))
  run = lambda spec, alive=None: runner.run_attack(
      spec, target, images, labels, batch_size, key, view=view, eot_samples=eot_samples,
      eot_chunk=eot_chunk, draws=draws, progress=False, alive=alive, resume=resume).accuracy
  checks = []
  acc0 = run(specs_lib.make_spec('pgd', eps=0.0, steps=5, label='pgd_eps0'))
  name = 'PGD at eps=0 equals clean accuracy'
  if target.rejects:  # an attacked input the detector rejects counts as defended
    clean_acc += runner.clean_rejections(target, images, labels, batch_size, key) / len(labels)
    name += ' (+ the clean images the detector rejects: counted as defended when attacked)'
  on = f' (first {len(labels)} examples)' if num else ''
  checks.append(_check(name + on, acc0, clean_acc, abs(acc0 - clean_acc) < 1e-9))
  acc_big = run(specs_lib.make_spec('pgd', eps=1.0, steps=20, step_size_factor=2.0,
                                    label='pgd_eps1'), alive)
  checks.append(_check('accuracy under L-inf eps=1.0 (PGD-20) is ~0' + on, acc_big,
                       '<= 0.05', acc_big <= 0.05))
  if 'fgsm' in results:
    fgsm = results['fgsm'].accuracy
    for name in ('bim', 'pgd', 'apgd', 'apgd_dlr'):
      if name in results:
        acc = results[name].accuracy
        checks.append(_check(f'{name} at least as strong as FGSM at the same eps', acc,
                             f'<= {fgsm:.4f} (+0.01)', acc <= fgsm + 0.01))
  checks += square_checks(results)
  for name, res in (transfer or {}).items():
    if name in results:
      wb = results[name].accuracy
      checks.append(_check(f'white-box {name} at least as strong as transfer {name}', wb,
                           f'<= {res.accuracy:.4f} (+0.01)', wb <= res.accuracy + 0.01))
  return checks


# AutoAttack's check_square_sr: the score-based Square breaking more than this fraction of the
# examples the gradient attacks before it left standing means their gradients were masked.
SQUARE_ALPHA = 0.002


def square_checks(results: dict[str, runner.AttackResult]) -> list[dict[str, Any]]:
  """For each ensemble with Square after gradient attacks: did Square break what they did not?"""
  checks, previous = [], {}
  for res in results.values():
    group = res.spec.group
    if not group or res.spec.key == group:
      continue
    if res.spec.attack == 'square' and group in previous:
      before = previous[group]
      extra = before.accuracy - res.accuracy
      checks.append(_check(
          f'{group}: Square (no gradients) breaks few examples the gradient attacks before it '
          f'left ({before.spec.key} {before.accuracy:.4f} -> {res.spec.key} '
          f'{res.accuracy:.4f}; masked gradients otherwise)', extra,
          f'<= {SQUARE_ALPHA}', extra <= SQUARE_ALPHA))
    previous[group] = res
  return checks


def output_varies(defence: Defence, x: jax.Array, key: jax.Array) -> float:
  """Largest |logit difference| between two draws on the same inputs (0: deterministic)."""
  k1, k2 = jax.random.split(key)
  logits = jax.jit(lambda v, x, k: defence.logits(v, x, k if defence.randomised else None))
  return float(jnp.max(jnp.abs(logits(defence.variables, x, k1) -
                               logits(defence.variables, x, k2))))


def _input_gradients(defence: Defence, view: str, eot_samples: int, eot_chunk: int, x, y, key):
  """Per-example input gradients of CE under `view` (np.ndarray like x)."""
  def grad(v, x, y, k):
    model = defence.attack_model(view, eot_samples, eot_chunk, variables=v)
    return model.value_and_grad(attack_core.objective('ce', y), x,
                                k if model.randomised else None)[2]
  return np.asarray(jax.jit(grad)(defence.variables, x, y, key), np.float64)


def gradient_checks(defence: Defence, images, labels, results: dict[str, runner.AttackResult],
                    key: jax.Array, view: str = 'auto', eot_samples: int = 10,
                    eot_chunk: int = 10, num: int = 100) -> list[dict[str, Any]]:
  """AutoAttack-style checks on the first `num` images (see the module docstring)."""
  x, y = jnp.asarray(images[:num]), jnp.asarray(labels[:num])
  checks = []
  varies = output_varies(defence, x, key)
  # An oblivious attacker crafts on the classifier behind the pre-processor, and the latent
  # attack on the classifier behind a generator: without EOT is right there unless that
  # classifier is itself randomised.
  behind_random = defence.behind is not None and defence.behind.randomised
  no_eot = sorted(k for k, r in results.items() if r.eot_samples <= 1 and (
      r.view not in ('oblivious', 'latent') or behind_random))
  random_out = varies > 0
  checks.append(_check(
      'randomised output (same input, two draws: max |logit difference|) attacked with EOT'
      + (f'; without EOT: {", ".join(no_eot)}' if random_out and no_eot else ''),
      varies, 'EOT (eot_samples > 1) in every attack when > 0',
      not (random_out and no_eot)))
  if random_out and not defence.randomised:
    checks.append(_check(f'{defence.name} is declared deterministic', varies, 0.0, False))

  default = defence.view_settings(view, eot_samples)
  used = {(r.view, r.eot_samples) for r in results.values()} or {
      (default['view'], default['eot_samples'])}
  for v, k in sorted(used):
    if v in ('oblivious', 'latent'):
      continue  # the gradient of the classifier behind, by design not the defence's
    g = _input_gradients(defence, v, k, eot_chunk, x, y, key)
    zero = float(np.mean(np.all(g.reshape(len(g), -1) == 0, axis=1)))
    checks.append(_check(f'fraction of examples with an all-zero input gradient ({v} view'
                         f'{f", EOT {k}" if k > 1 else ""})', zero,
                         f'<= {ZERO_GRADIENT_LIMIT}', zero <= ZERO_GRADIENT_LIMIT))

  logits = np.asarray(jax.jit(defence.logits)(
      defence.variables, x, key if defence.randomised else None), np.float64)
  probs = np.all((logits >= 0) & (logits <= 1), axis=1) & (
      np.abs(logits.sum(axis=1) - 1) < PROBABILITY_TOLERANCE)
  frac = float(np.mean(probs))
  checks.append(_check('outputs are logits, not probabilities (fraction of rows that are '
                       'probability vectors)', frac, 0.0, frac == 0.0))

  if defence.stand_ins and any('bpda' in r.view for r in results.values()):
    checks.append(bpda_agreement(defence, x, y, key, eot_samples, eot_chunk))
  return checks


def bpda_agreement(defence: Defence, x, y, key, eot_samples: int = 10, eot_chunk: int = 10
                   ) -> dict[str, Any]:
  """Mean cosine between the BPDA and the exact input gradients, over the examples where the
  exact one is not all zero (value None where it is zero everywhere: nothing to compare)."""
  k = eot_samples if defence.randomised else 1
  exact = _input_gradients(defence, 'eot' if k > 1 else 'exact', k, eot_chunk, x, y, key)
  bpda = _input_gradients(defence, 'bpda+eot' if k > 1 else 'bpda', k, eot_chunk, x, y, key)
  e, b = exact.reshape(len(exact), -1), bpda.reshape(len(bpda), -1)
  ne, nb = np.linalg.norm(e, axis=1), np.linalg.norm(b, axis=1)
  both = (ne > 0) & (nb > 0)
  names = '; '.join(f'{s} -> {t}' for s, t in defence.stand_ins)
  if not both.any():
    return _check(f'cosine(BPDA, exact) input gradient ({names}): exact gradient all zero',
                  None, 'n/a where the exact gradient is zero', True)
  cos = float(np.mean(np.sum(e[both] * b[both], axis=1) / (ne[both] * nb[both])))
  return _check(f'cosine(BPDA, exact) input gradient where both exist ({names}; '
                f'{int(both.sum())} of {len(e)} examples)', cos, '> 0', cos > 0)
