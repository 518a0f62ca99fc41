"""Score-based attacks that need only logits: Square (Andriushchenko et al. 2020), L-inf.

Usage:
  x_adv = square(logits_fn, x, y, eps=0.3, num_queries=5000, key=key)

The check that a defence's robustness is not gradient masking: Square never differentiates,
so a defence that stops the gradient attacks but not Square has masked its gradients
(AutoAttack's `check_square_sr`; evaluation.diagnostics flags it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from defendpp_jax.attacks import core

Array = jax.Array
# Square's schedule of the fraction p of pixels changed per query: p_init halved each time the
# query index passes one of these (Andriushchenko et al., as fra31/auto-attack's p_selection).
P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, i: Array, num_queries: int, rescale: bool = False) -> Array:
  """p at query `i`: p_init / 2^(thresholds passed). `rescale` maps the budget onto 10,000
  queries first (the paper's standalone attack); AutoAttack's Square does not."""
  it = (i * 10000) // num_queries if rescale else i
  passed = sum((it > t).astype(jnp.int32) for t in P_THRESHOLDS)
  return p_init / (2.0 ** passed)


def _margin(logits: Array, y: Array) -> Array:
  """z_y - max_{k != y} z_k (> 0: still classified right; Square minimises it)."""
  return -core.margin_loss(logits, y)


def square(logits_fn, x: Array, y: Array, *, eps, num_queries: int, key: Array,
           p_init: float = 0.8, rescale_schedule: bool = False, norm: str = 'linf') -> Array:
  """Square attack, L-inf, one restart, untargeted, on the margin loss.

  Starts from vertical stripes (x + eps * a random sign per column and channel, clipped to
  [0, 1]); each query moves one square window of side s = round(sqrt(p h w)) (1 <= s < h;
  one position per query for the whole batch, as the reference) to x +- eps (a random sign per
  example and channel) and keeps the candidate where the margin decreases. An example stops
  being changed once misclassified; the loop stops when all are, or after `num_queries`
  queries. Where a window's new signs would leave it unchanged they are flipped (the reference
  draws again until it changes).

  Args:
    logits_fn: an `AttackModel` or (N, H, W, C) -> (N, K) logits; only its values are used.
    x: (N, H, W, C) clean inputs in [0, 1]; y: (N,) labels.
    eps: L-inf budget (scalar or (N,)); num_queries: model queries per example after the
      initial one (static); key: draws of the windows and signs (and the model's randomness).
    p_init: initial fraction of pixels per window (AutoAttack's 0.8).

  Returns:
    The best point per example (misclassified if found), in [0, 1] and the eps-ball.
  """
  if norm != 'linf':
    raise ValueError(f"square: norm={norm!r}; only 'linf' is implemented")
  model = core.as_attack_model(logits_fn)
  keys = core.model_keys(model, key)
  n, h, w, c = x.shape
  e = core.per_example(jnp.broadcast_to(jnp.asarray(eps, x.dtype), (n,)), x)
  k_init, k_loop = jax.random.split(jax.random.fold_in(key, 0x5A))
  stripes = jax.random.rademacher(k_init, (n, 1, w, c), x.dtype)
  x_best = jnp.clip(x + e * stripes, 0.0, 1.0)
  margin = _margin(model.logits(x_best, keys(0)), y)
  rows = jnp.arange(h)[:, None, None]
  cols = jnp.arange(w)[None, :, None]

  def cond(c_):
    i, _, m = c_
    return (i < num_queries) & jnp.any(m > 0)

  def body(c_):
    i, xb, m = c_
    kq = jax.random.fold_in(k_loop, i)
    k_h, k_w, k_s = jax.random.split(kq, 3)
    p = p_schedule(p_init, i, num_queries, rescale_schedule)
    s = jnp.clip(jnp.round(jnp.sqrt(p * h * w)).astype(jnp.int32), 1, h - 1)
    vh = jax.random.randint(k_h, (), 0, h - s + 1)
    vw = jax.random.randint(k_w, (), 0, w - s + 1)
    window = ((rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s))[None]
    sign = jax.random.rademacher(k_s, (n, 1, 1, c), x.dtype)
    cand = jnp.clip(x + e * sign, 0.0, 1.0)
    unchanged = jnp.all(jnp.where(window, jnp.abs(cand - xb) < 1e-7, True), axis=(1, 2))
    sign = jnp.where(unchanged[:, None, None, :], -sign, sign)
    x_new = jnp.where(window, jnp.clip(x + e * sign, 0.0, 1.0), xb)
    m_new = _margin(model.logits(x_new, keys(i + 1)), y)
    better = (m_new < m) & (m > 0)
    return (i + 1, jnp.where(core.per_example(better, x), x_new, xb), jnp.where(better, m_new, m))

  _, x_best, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), x_best, margin))
  return jax.lax.stop_gradient(x_best)
