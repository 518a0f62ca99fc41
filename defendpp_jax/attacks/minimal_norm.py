"""Minimal-norm L2 attacks: Carlini-Wagner L2 and DDN.

Usage:
  x_adv = cw_l2(model, x, y, binary_search_steps=9, num_steps=1000, abort_early=True)
  x_adv = ddn(model, x, y, num_steps=100, key=key)

`model` is an `AttackModel` (a defence's view) or a plain `logits_fn(x)`. Both return, per
example, the smallest-L2 adversarial point they found (re-checked with a fresh forward pass),
or x itself where they found none: a minimal-norm attack reports distances, and succeeds
everywhere only given enough budget.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from defendpp_jax.attacks import core
from defendpp_jax.attacks.core import Array


def _cw_hinge(logits: Array, y: Array, target: Array | None, confidence) -> tuple[Array, Array]:
  """(C&W's hinge on the logit margin, success with the confidence margin) per example."""
  labels = y if target is None else target
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  real = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  kappa = jnp.asarray(confidence, logits.dtype)
  if target is None:
    hinge = jnp.maximum(real - other + kappa, 0.0)
    success = jnp.argmax(jnp.where(onehot, logits + kappa, logits), axis=-1) != y
  else:
    hinge = jnp.maximum(other - real + kappa, 0.0)
    success = jnp.argmax(jnp.where(onehot, logits - kappa, logits), axis=-1) == target
  return hinge, success


def cw_l2(logits_fn, x: Array, y: Array, *, binary_search_steps: int = 5,
          num_steps: int = 20, confidence=0.0, initial_const=1e-2, lr=1e-2,
          target: Array | None = None, abort_early: bool = False, key: Array | None = None,
          unroll: int | bool = 1) -> Array:
  """Carlini-Wagner L2 attack (Carlini & Wagner 2017) in tanh space with Adam.

  Minimises ||x' - x||_2^2 + c * max(z_y - max_{i != y} z_i + confidence, 0) (targeted:
  max(max_{i != t} z_i - z_t + confidence, 0)) over x' = (tanh(w) + 1) / 2, with Adam restarted
  from x at every binary-search step. Per example, c starts at initial_const and is multiplied
  by 10 while no adversarial example has been found, else bisected, as in the original code.
  The paper's budget is 5 x 20 (binary_search_steps x num_steps), at which C&W finds little on
  MNIST; Carlini's own defaults are 9 x 10,000 with early abort. The original's default
  initial_const is 1e-3; 1e-2 reaches c = 100 within the 5 search steps of the paper.

  Args:
    logits_fn: an `AttackModel` or (N, H, W, C) in [0, 1] -> (N, K) logits, inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels.
    binary_search_steps: number of values of c tried (static).
    num_steps: Adam steps per value of c (static).
    confidence: required logit margin kappa for a point to count as found.
    initial_const: initial c.
    lr: Adam learning rate (in tanh space).
    target: optional (N,) target labels.
    abort_early: Carlini's early abort (static): a search step stops once its total loss has
      not decreased by 0.01% over a tenth of its steps (checked every num_steps // 10 steps).
    key: the model's randomness (needed by a randomised model only).
    unroll: passed to the inner `lax.fori_loop` (the search loop is never unrolled).

  Returns:
    Per example, the smallest-L2 adversarial point seen at any iteration of any search step
    (checked again with a fresh forward pass), or x itself where none was found.
  """
  model = core.as_attack_model(logits_fn)
  keys = core.model_keys(model, key)
  n = x.shape[0]
  bcast = lambda m: core.per_example(m, x)
  w0 = jnp.arctanh(jnp.clip(2.0 * x - 1.0, -core.TANH_BOUND, core.TANH_BOUND))
  to_image = lambda w: (jnp.tanh(w) + 1.0) / 2.0
  optimizer = optax.adam(lr)
  check_every = max(num_steps // 10, 1)

  def objective(w, const, k):
    xa = to_image(w)
    logits = model.logits(xa, k)
    dist = jnp.sum(jnp.square(xa - x), axis=core.example_axes(x))
    hinge, success = _cw_hinge(logits, y, target, confidence)
    return jnp.sum(dist + const * hinge), (xa, dist, success)

  def value_and_grad(w, const, k):
    return model.expect(
        lambda kk: jax.value_and_grad(objective, has_aux=True)(w, const, kk), k)

  def record(best, xa, dist, success):
    best_dist, best_x, found = best
    better = success & (dist < best_dist)
    return (jnp.where(better, dist, best_dist), jnp.where(bcast(better), xa, best_x),
            found | success)

  def adam_step(j, inner, const, search):
    w, opt_state, best = inner[:3]
    # Search step s uses the model keys s (num_steps + 1) + j, j <= num_steps.
    (total, (xa, dist, success)), grad = value_and_grad(
        w, const, keys(search * (num_steps + 1) + j))
    best = record(best, xa, dist, success)
    updates, opt_state = optimizer.update(grad, opt_state, w)
    return (optax.apply_updates(w, updates), opt_state, best) + (total,)

  def search_step(s, carry):
    const, lower, upper, best_dist, best_x = carry
    inner = (w0, optimizer.init(w0), (best_dist, best_x, jnp.zeros((n,), bool)))
    if abort_early:
      w, _, best = _run_with_abort(functools.partial(adam_step, const=const, search=s), inner,
                                   num_steps, check_every)
    else:
      w, _, best, _ = jax.lax.fori_loop(
          0, num_steps, lambda j, c: adam_step(j, c, const, s),
          inner + (jnp.zeros((), x.dtype),), unroll=unroll)
    # the last update is checked too
    _, (xa, dist, success) = objective(w, const, keys(s * (num_steps + 1) + num_steps))
    best_dist, best_x, found = record(best, xa, dist, success)

    upper = jnp.where(found, jnp.minimum(upper, const), upper)
    lower = jnp.where(found, lower, jnp.maximum(lower, const))
    bracketed = upper < 1e9
    const = jnp.where(bracketed, (lower + upper) / 2, const * 10)
    return const, lower, upper, best_dist, best_x

  init = (jnp.full((n,), initial_const, x.dtype), jnp.zeros((n,), x.dtype),
          jnp.full((n,), 1e10, x.dtype), jnp.full((n,), jnp.inf, x.dtype), x)
  *_, best_x = jax.lax.fori_loop(0, binary_search_steps, search_step, init)
  best_x = core.verified(model, best_x, x, y, target, keys(core.FINAL_STEP))
  return jax.lax.stop_gradient(best_x)


def _run_with_abort(step, inner, num_steps: int, check_every: int):
  """Runs `step(j, carry) -> carry + (total loss,)` for j < num_steps, stopping after a check
  (every `check_every` steps, at j % check_every == 0) where the loss exceeds 0.9999 x the loss
  at the previous check (Carlini's ABORT_EARLY)."""
  def cond(c):
    j, _, _, done = c
    return (j < num_steps) & ~done

  def body(c):
    j, inner, prev, _ = c
    out = step(j, inner)
    total = out[-1]
    at_check = (j % check_every) == 0
    done = at_check & (total > prev * 0.9999)
    return j + 1, out[:-1], jnp.where(at_check, total, prev), done

  start = (jnp.zeros((), jnp.int32), inner, jnp.asarray(1e6, jnp.float32), jnp.zeros((), bool))
  _, inner, _, _ = jax.lax.while_loop(cond, body, start)
  return inner


def ddn(logits_fn, x: Array, y: Array, *, num_steps: int = 100, gamma=0.05,
        init_norm=1.0, quantize: bool = True, max_norm=None, target: Array | None = None,
        levels: int = 256, key: Array | None = None, unroll: int | bool = 1) -> Array:
  """Decoupled Direction and Norm attack (Rony et al. 2019), after `fast_adv/attacks/ddn.py`.

  At step i (delta_0 = 0, norm_0 = init_norm): take the CE gradient at x + delta, normalise it
  per example (a random direction where it is exactly zero), step delta by
  alpha_i = 0.01 + 0.99 (1 + cos(pi i / num_steps)) / 2 (cosine annealing from 1 to 0.01);
  multiply the norm by (1 - gamma) if x + delta was adversarial, else by (1 + gamma), and cap it
  by the largest distance inside the box (and by max_norm); rescale delta onto that sphere,
  quantise x + delta to `levels` levels, clip to [0, 1].

  Differences from the reference: the norm is also capped by max_norm during the iterations
  (the reference only shrinks the final answer), so the budget is spent inside the ball; the
  final iterate is also evaluated; the zero-gradient fallback direction is normalised too.
  As in the reference, the result is x itself where no adversarial point was found.

  Args:
    logits_fn: an `AttackModel` or (N, H, W, C) in [0, 1] -> (N, K) logits, inference mode.
    x: (N, H, W, C) clean inputs in [0, 1] (init_norm is in the same [0, 1] units).
    y: (N,) integer true labels.
    num_steps: number of steps (static).
    gamma: relative norm change per step.
    init_norm: initial norm of the perturbation.
    quantize: quantise the iterates (and the max_norm-shrunk answer) to `levels` levels (static).
    max_norm: optional L2 budget (None or not is static).
    target: optional (N,) target labels.
    levels: number of quantisation levels (static).
    key: optional `jax.random.key` for the zero-gradient fallback and the model's randomness
      (a fixed key if None).
    unroll: passed to `lax.fori_loop`.

  Returns:
    Per example, the smallest-L2 adversarial iterate (re-checked with a fresh forward pass);
    if max_norm is given and that iterate lies outside it, the iterate shrunk onto the max_norm
    sphere (kept only if still adversarial); x itself where nothing adversarial was found.
    Always in [0, 1] and, with max_norm, within max_norm of x.
  """
  model = core.as_attack_model(logits_fn)
  n = x.shape[0]
  bcast = lambda m: core.per_example(m, x)
  key = jax.random.key(0) if key is None else key
  keys = core.model_keys(model, key)
  # Untargeted: ascend CE to y; targeted: descend CE to the target.
  obj = core.objective('ce', y, target)
  worst_norm = core.l2_norm(jnp.maximum(x, 1.0 - x))
  cap = worst_norm if max_norm is None else jnp.minimum(worst_norm, max_norm)

  def quantise(v):
    return jnp.round(v * (levels - 1)) / (levels - 1) if quantize else v

  def record(best, adv, logits):
    best_l2, best_adv = best
    l2 = core.l2_norm(adv - x)
    better = core.is_adversarial(logits, y, target) & (l2 < best_l2)
    return jnp.where(better, l2, best_l2), jnp.where(bcast(better), adv, best_adv)

  def body(i, c):
    delta, norm, best = c
    adv = x + delta
    _, logits, grad = model.value_and_grad(obj, adv, keys(i))
    best = record(best, adv, logits)
    adv_now = core.is_adversarial(logits, y, target)

    grad_norm = core.l2_norm(grad)
    random_dir = core.normalize_l2(
        jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype))
    direction = jnp.where(bcast(grad_norm > 0),
                          grad / bcast(jnp.maximum(grad_norm, core.TINY)), random_dir)
    alpha = 0.01 + 0.99 * (1.0 + jnp.cos(jnp.pi * i / num_steps)) / 2.0
    # Ascent on the objective: CE to y (untargeted) or minus CE to the target (targeted).
    delta = delta + alpha * direction

    norm = norm * jnp.where(adv_now, 1.0 - gamma, 1.0 + gamma)
    norm = jnp.minimum(norm, cap)
    delta = delta * bcast(norm / jnp.maximum(core.l2_norm(delta), core.TINY))
    delta = jnp.clip(quantise(x + delta), 0.0, 1.0) - x
    return delta, norm, best

  init = (jnp.zeros_like(x), jnp.full((n,), init_norm, x.dtype),
          (jnp.full((n,), jnp.inf, x.dtype), x))
  delta, _, best = jax.lax.fori_loop(0, num_steps, body, init, unroll=unroll)
  last = x + delta
  best_l2, best_adv = record(best, last, model.logits(last, keys(num_steps)))

  if max_norm is not None:
    # Shrink onto the max_norm sphere, quantising towards x so the norm cannot grow back.
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(best_l2, core.TINY))
    shrunk = (best_adv - x) * bcast(scale)
    if quantize:
      shrunk = jnp.trunc(shrunk * (levels - 1)) / (levels - 1)
    shrunk = jnp.clip(x + shrunk, 0.0, 1.0)
    best_adv = jnp.where(bcast(best_l2 > max_norm), shrunk, best_adv)
  best_adv = core.verified(model, best_adv, x, y, target, keys(core.FINAL_STEP))
  return jax.lax.stop_gradient(best_adv)
