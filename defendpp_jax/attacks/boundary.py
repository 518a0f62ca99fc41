"""FAB-T: the targeted fast adaptive boundary attack (Croce & Hein 2020), L-inf and L2.

Usage:
  x_adv = fab_targeted(model, x, y, eps=0.3, num_steps=100, key=key, num_targets=9)

A minimal-norm attack run as an eps-bounded one, as AutoAttack runs it: per target class (the
`num_targets` classes ranked highest after y on the clean input), `num_steps` steps that
linearise the boundary between y and the target at the current point x_k, project both x_k and
the original x onto that hyperplane inside the box [0, 1] (the minimal L-inf / L2 step), and
move to the convex combination (1 - alpha)(x_k + eta d_k) + alpha (x + eta d_0), alpha =
min(|d_k| / (|d_k| + |d_0|), alpha_max); where x_k is adversarial it is kept if it is the
closest so far and x_k steps back toward x by beta. An example is broken when the closest
adversarial point found is within eps; the attack returns it there and x elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from defendpp_jax.attacks import core
from defendpp_jax.attacks.core import Array

_TINY = 1e-12


def hyperplane_step(p: Array, w: Array, c: Array, norm: str) -> Array:
  """The minimal-norm step d with w . d = c and p + d in [0, 1] (per example, flattened).

  p, w: (N, D); c: (N,). Where the box makes the hyperplane unreachable, the step goes as far
  toward it as the box allows. Exact: the constraint's value along the minimal-norm path is
  piecewise linear in the path's parameter s (L-inf: the step's norm; L2: the multiplier of
  w), with a break where each coordinate reaches the box; the breaks are sorted and s is solved
  on its segment.
  """
  sign_c = jnp.where(c < 0, -1.0, 1.0)[:, None]
  w = w * sign_c                      # now w . d = |c| >= 0
  c = jnp.abs(c)
  a = jnp.abs(w)
  room = jnp.where(w > 0, 1.0 - p, jnp.where(w < 0, p, 0.0))  # how far the box lets it go
  if norm == 'linf':                  # d_i = sign(w_i) min(s, room_i)
    brk, slope = room, a
  else:                               # d_i = sign(w_i) min(s |w_i|, room_i)
    brk = jnp.where(a > 0, room / jnp.maximum(a, _TINY), jnp.inf)
    slope = a * a
  full = a * room                     # a coordinate's contribution once at the box
  order = jnp.argsort(brk, axis=-1)
  brk_s = jnp.take_along_axis(brk, order, -1)
  full_s = jnp.take_along_axis(full, order, -1)
  slope_s = jnp.take_along_axis(slope, order, -1)
  saturated = jnp.cumsum(full_s, -1)                       # sum over breaks <= this one
  rest = jnp.sum(slope_s, -1, keepdims=True) - jnp.cumsum(slope_s, -1)  # breaks after it
  finite = jnp.where(jnp.isfinite(brk_s), brk_s, 0.0)
  value_at_break = saturated + finite * rest
  reach = value_at_break >= c[:, None]
  k = jnp.argmax(reach, axis=-1)                           # the first break that reaches c
  feasible = jnp.any(reach, axis=-1)
  take = lambda v, i: jnp.take_along_axis(v, i[:, None], -1)[:, 0]
  before = jnp.where(k > 0, take(saturated, jnp.maximum(k - 1, 0)), 0.0)
  slope_here = take(rest, k) + take(slope_s, k)            # breaks from k on
  s = (c - before) / jnp.maximum(slope_here, _TINY)
  s = jnp.where(feasible, s, jnp.max(finite, -1))
  s = jnp.where(c > 0, s, 0.0)[:, None]
  move = jnp.minimum(s, room) if norm == 'linf' else jnp.minimum(s * a, room)
  return jnp.sign(w) * move


def _norm(v: Array, norm: str) -> Array:
  return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), -1) if norm == 'linf' else core.l2_norm(v)


def fab_targeted(logits_fn, x: Array, y: Array, *, eps, num_steps: int, key: Array,
                 num_targets: int = 9, norm: str = 'linf', alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9) -> Array:
  """FAB-T toward each of the `num_targets` classes ranked after y, one restart each (no
  random start: AutoAttack's standard version).

  Args:
    logits_fn: an `AttackModel` or (N, H, W, C) in [0, 1] -> (N, K) logits, inference mode.
    x: (N, H, W, C) clean inputs in [0, 1]; y: (N,) labels.
    eps: the budget (scalar or (N,)) the closest adversarial point must be within.
    num_steps: steps per target (static); key: the model's randomness, fresh per step.
    num_targets: target classes tried (static), 1 to K - 1.
    norm: 'linf' | 'l2' (static); alpha_max, eta, beta: the published 0.1, 1.05, 0.9.

  Returns:
    Per example, the closest adversarial point found if within eps (checked again with a fresh
    forward pass), else x.
  """
  if norm not in ('linf', 'l2'):
    raise ValueError(f"fab_t: norm={norm!r} is not 'linf' or 'l2'")
  model = core.as_attack_model(logits_fn)
  keys = core.model_keys(model, key)
  n = x.shape[0]
  logits = model.logits(x, keys(core.FINAL_STEP))
  k_classes = logits.shape[-1]
  if not 1 <= num_targets <= k_classes - 1:
    raise ValueError(f'fab_t: num_targets={num_targets} must be in [1, {k_classes - 1}]')
  ranked = jnp.argsort(-logits, axis=-1)
  others = jax.vmap(lambda r, label: r[jnp.argsort(r == label, stable=True)])(ranked, y)
  x0 = x.reshape(n, -1)
  e = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (n,))

  def run_target(t, carry):
    best, best_norm = carry
    target = others[:, t]

    def difference(lg):  # f_target - f_y: positive once the target wins over y
      return (jnp.take_along_axis(lg, target[:, None], -1)
              - jnp.take_along_axis(lg, y[:, None], -1))[:, 0]

    def step(i, state):
      x1, best, best_norm = state
      step_key = keys(t * num_steps + i)
      df, _, dg = model.value_and_grad(difference, x1, step_key)
      w = dg.reshape(n, -1)
      flat = x1.reshape(n, -1)
      # The linearised boundary {z: df + w . (z - x1) = 0}, from x1 and from x0.
      d1 = hyperplane_step(flat, w, -df, norm)
      d0 = hyperplane_step(x0, w, -df - jnp.sum(w * (x0 - flat), -1), norm)
      a1 = jnp.maximum(_norm(d1, norm), 1e-8)
      a0 = jnp.maximum(_norm(d0, norm), 1e-8)
      alpha = jnp.clip(a1 / (a1 + a0), 0.0, alpha_max)[:, None]
      new = jnp.clip((flat + eta * d1) * (1 - alpha) + (x0 + eta * d0) * alpha, 0.0, 1.0)
      new = new.reshape(x.shape)
      adv = core.is_adversarial(model.logits(new, step_key), y)
      dist = _norm(new - x, norm)
      better = adv & (dist < best_norm)
      best = jnp.where(core.per_example(better, x), new, best)
      best_norm = jnp.where(better, dist, best_norm)
      x1 = jnp.where(core.per_example(adv, x), x + beta * (new - x), new)
      return x1, best, best_norm

    _, best, best_norm = jax.lax.fori_loop(0, num_steps, step, (x, best, best_norm))
    return best, best_norm

  best, best_norm = jax.lax.fori_loop(
      0, num_targets, run_target, (x, jnp.full((n,), jnp.inf, x.dtype)))
  inside = best_norm <= e
  cand = jnp.where(core.per_example(inside, x), best, x)
  # The eps-ball exactly (float rounding of the norm), then a fresh forward pass.
  cand = core.project(cand, x, e, norm)
  return jax.lax.stop_gradient(core.verified(model, cand, x, y, None, keys(core.FINAL_STEP)))
