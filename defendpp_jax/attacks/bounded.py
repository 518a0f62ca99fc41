"""Fixed-budget attacks: FGSM, BIM, PGD (L-inf / L2, restarts) and Auto-PGD.

Usage:
  x_adv = pgd(model, x, y, eps=0.3, step_size=0.01, num_steps=40, key=key, loss='margin')

`model` is an `AttackModel` (the view of a defence: exact, BPDA, EOT) or a plain `logits_fn(x)`.
Each takes `loss=` 'ce' (default), 'margin' (C&W's logit margin) or 'dlr', and `key`: the random
start's and, fresh per step (and per EOT draw), the model's randomness. Results are in [0, 1]
and inside the eps-ball around x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax.attacks import core
from defendpp_jax.attacks.core import Array


def _step(model: core.AttackModel, x_adv: Array, x: Array, objective: core.Objective, eps,
          step_size, norm: str, key: Array | None) -> Array:
  """One projected steepest-ascent step on `objective` (FGSM = one of them from x)."""
  _, _, grad = model.value_and_grad(objective, x_adv, key)
  step_size = core.per_example(step_size, x)
  if norm == 'linf':
    x_adv = x_adv + step_size * jnp.sign(grad)
  else:
    x_adv = x_adv + step_size * core.normalize_l2(grad)
  return core.project(x_adv, x, eps, norm)


def fgsm(logits_fn, x: Array, y: Array, *, eps, target: Array | None = None,
         loss: str = 'ce', key: Array | None = None) -> Array:
  """Fast Gradient Sign Method (Goodfellow et al. 2015), L-infinity, one step.

  Args:
    logits_fn: an `AttackModel` or (N, H, W, C) in [0, 1] -> (N, K) logits, inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels.
    eps: L-infinity budget, scalar or (N,).
    target: optional (N,) target labels; the step then decreases the loss to the target.
    loss: 'ce' | 'margin' | 'dlr' (static).
    key: the model's randomness (needed by a randomised model only).

  Returns:
    x_adv like x, in [0, 1] and within eps of x.
  """
  model = core.as_attack_model(logits_fn)
  keys = core.model_keys(model, key)
  x_adv = _step(model, x, x, core.objective(loss, y, target), eps, eps, 'linf', keys(0))
  return jax.lax.stop_gradient(x_adv)


def bim(logits_fn, x: Array, y: Array, *, eps, step_size, num_steps: int,
        target: Array | None = None, loss: str = 'ce', key: Array | None = None,
        unroll: int | bool = 1) -> Array:
  """Basic Iterative Method / I-FGSM (Kurakin et al. 2017): PGD-L-infinity from x itself.

  Args: as `pgd` (no random start: `key` is only the model's randomness). Returns the last
  iterate, in [0, 1] and within eps of x.
  """
  return pgd(logits_fn, x, y, eps=eps, step_size=step_size, num_steps=num_steps, key=key,
             norm='linf', restarts=1, target=target, random_start=False, loss=loss,
             unroll=unroll)


def pgd(logits_fn, x: Array, y: Array, *, eps, step_size, num_steps: int,
        key: Array | None, norm: str = 'linf', restarts: int = 1,
        target: Array | None = None, random_start: bool = True, loss: str = 'ce',
        unroll: int | bool = 1) -> Array:
  """Projected Gradient Descent (Madry et al. 2018), L-inf or L2.

  Each restart starts from a uniform random point of the eps-ball (unless random_start=False)
  and returns its last iterate. Over restarts, each example keeps the restart that fools the
  model (the highest-loss one if several do), or if none does, the one with the highest loss
  (exact ties: the earliest restart).

  Args:
    logits_fn: an `AttackModel` or (N, H, W, C) in [0, 1] -> (N, K) logits, inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels.
    eps: budget, scalar or (N,).
    step_size: per-step size (sign step for 'linf', normalised-gradient step for 'l2').
    num_steps: steps per restart (static).
    key: a `jax.random.key`; may be None only when random_start=False and the model is
      deterministic.
    norm: 'linf' or 'l2' (static).
    restarts: number of random restarts (static).
    target: optional (N,) target labels: minimise the loss to them, success means
      argmax == target.
    random_start: start from a random point of the ball (static). With num_steps=1,
      step_size=eps and random_start=False, this is FGSM.
    loss: 'ce' | 'margin' | 'dlr' (static).
    unroll: passed to the step loop's `lax.fori_loop` (restarts run in a `lax.scan`).

  Returns:
    x_adv like x, in [0, 1] and inside the eps-ball around x.
  """
  core.check_norm(norm)
  model = core.as_attack_model(logits_fn)
  if random_start and key is None:
    raise ValueError('pgd with random_start=True needs a key')
  if restarts > 1 and not random_start:
    raise ValueError('pgd restarts without a random start would all be identical')
  obj = core.objective(loss, y, target)

  def one_run(run_key):
    x0 = core.random_init(run_key, x, eps, norm) if random_start else x
    keys = core.model_keys(model, run_key)
    body = lambda i, xa: _step(model, xa, x, obj, eps, step_size, norm, keys(i))
    return jax.lax.fori_loop(0, num_steps, body, x0, unroll=unroll), keys(num_steps)

  if restarts == 1:
    return jax.lax.stop_gradient(one_run(key)[0])

  def restart(carry, run_key):
    best_x, best_fooled, best_loss = carry
    xa, check_key = one_run(run_key)
    logits = model.logits(xa, check_key)
    fooled = model.adversarial(logits, xa, check_key, y, target)
    value = obj(logits)
    # Lexicographic (fooled, loss): a fooling restart beats any non-fooling one.
    better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (value > best_loss))
    best_x = jnp.where(core.per_example(better, x), xa, best_x)
    return (best_x, best_fooled | fooled,
            jnp.where(better, value, best_loss)), None

  n = x.shape[0]
  init = (x, jnp.zeros((n,), bool), jnp.full((n,), -jnp.inf, x.dtype))
  (best_x, _, _), _ = jax.lax.scan(restart, init, jax.random.split(key, restarts))
  return jax.lax.stop_gradient(best_x)


# ---------------------------------------------------------------------------------------------
# Auto-PGD.


def apgd_checkpoints(num_steps: int) -> np.ndarray:
  """Window length k_j at the iterations that are checkpoints, 0 elsewhere.

  Checkpoints w_j = ceil(p_j * num_steps) with p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), computed with auto-attack's integer rounding.
  """
  windows = np.zeros((num_steps,), np.int32)
  k = max(int(0.22 * num_steps), 1)
  k_min = max(int(0.06 * num_steps), 1)
  k_decr = max(int(0.03 * num_steps), 1)
  since = 0
  for i in range(num_steps):
    since += 1
    if since == k:
      windows[i] = k
      since = 0
      k = max(k - k_decr, k_min)
  return windows


def apgd_increases(hist: Array, i, k) -> Array:
  """Per example, how many of the k steps up to step i increased the loss.

  hist[j + 1] is the loss after step j and hist[0] is ZERO, not the loss at the start: the
  reference (auto-attack's `check_oscillation`) compares loss_steps[j] > loss_steps[j - 1] for
  the k steps j = i - k + 1 .. i, and at the first checkpoint (i = k - 1) its j - 1 = -1 reads
  the buffer's last row, not yet written: a zero. So the first step counts as an increase
  exactly when its loss is positive.
  """
  rows = jnp.arange(hist.shape[0] - 1)
  in_window = (rows >= i + 1 - k) & (rows <= i)
  return jnp.sum((hist[1:] > hist[:-1]) & in_window[:, None], axis=0)


def _apgd_start(key: Array, x: Array, eps, norm: str) -> Array:
  """A random point on the boundary of the ball, as auto-attack starts."""
  if norm == 'linf':
    t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    t = t / core.per_example(jnp.max(jnp.abs(t), axis=core.example_axes(t)) + core.TINY, t)
  else:
    t = core.normalize_l2(jax.random.normal(key, x.shape, x.dtype))
  return jnp.clip(x + core.per_example(eps, x) * t, 0.0, 1.0)


def apgd(logits_fn, x: Array, y: Array, *, eps, num_steps: int, key: Array,
         loss: str = 'ce', norm: str = 'linf', target: Array | None = None,
         rho: float = 0.75, unroll: int | bool = 1) -> Array:
  """Auto-PGD (Croce & Hein 2020), one run, with the CE, margin or DLR loss, L-inf or L2.

  Momentum 0.75 (1 at the first step); step size 2 eps, halved per example at the
  checkpoints when (a) at most a fraction rho of the steps since the last checkpoint increased
  the loss (`apgd_increases`), or (b) the step size was not halved at the last checkpoint and
  the best loss has not improved since; a halving restarts from the best point (and its
  gradient).

  Args:
    logits_fn: an `AttackModel` or (N, H, W, C) in [0, 1] -> (N, K) logits, inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels (also used by the targeted DLR loss).
    eps: budget, scalar or (N,).
    num_steps: number of iterations (static).
    key: a `jax.random.key` for the random start (and the model's randomness).
    loss: 'ce' | 'margin' | 'dlr' (static); with a target: minus CE to the target, the
      targeted margin, or targeted DLR.
    norm: 'linf' or 'l2' (static).
    target: optional (N,) target labels; success then means argmax == target.
    rho: oscillation threshold of condition (a).
    unroll: passed to `lax.fori_loop`.

  Returns:
    Per example, an adversarial point found (an iterate, or x itself if x is already
    misclassified) if any, else the highest-loss point; in [0, 1] and inside the eps-ball.
  """
  core.check_norm(norm)
  model = core.as_attack_model(logits_fn)
  obj = core.objective(loss, y, target)
  keys = core.model_keys(model, key)
  n = x.shape[0]
  bcast = lambda m: core.per_example(m, x)

  x_init = _apgd_start(key, x, eps, norm)
  fooled_clean = model.adversarial(model.logits(x, keys(core.FINAL_STEP)), x,
                                   keys(core.FINAL_STEP), y, target)
  loss0, logits0, grad0 = model.value_and_grad(obj, x_init, keys(0))
  fooled0 = model.adversarial(logits0, x_init, keys(0), y, target)
  windows = jnp.asarray(apgd_checkpoints(num_steps))

  def ascent(x_cur, grad, step):
    if norm == 'linf':
      return x_cur + bcast(step) * jnp.sign(grad)
    return x_cur + bcast(step) * core.normalize_l2(grad)

  def body(i, c):
    x_cur, x_prev, grad = c['x'], c['x_prev'], c['grad']
    a = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)
    z = core.project(ascent(x_cur, grad, c['step']), x, eps, norm)
    x_new = core.project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, eps, norm)

    loss_new, logits, grad_new = model.value_and_grad(obj, x_new, keys(i + 1))
    fooled_now = model.adversarial(logits, x_new, keys(i + 1), y, target)
    x_best_adv = jnp.where(bcast(fooled_now), x_new, c['x_best_adv'])
    improved = loss_new > c['loss_best']
    x_best = jnp.where(bcast(improved), x_new, c['x_best'])
    grad_best = jnp.where(bcast(improved), grad_new, c['grad_best'])
    loss_best = jnp.where(improved, loss_new, c['loss_best'])
    hist = c['hist'].at[i + 1].set(loss_new)

    k = windows[i]
    is_ckpt = k > 0
    oscillating = apgd_increases(hist, i, k) <= k * rho
    stalled = ~c['reduced_last'] & (c['loss_best_last'] >= loss_best)
    reduce = is_ckpt & (oscillating | stalled)

    return dict(
        x=jnp.where(bcast(reduce), x_best, x_new),
        x_prev=x_cur,
        grad=jnp.where(bcast(reduce), grad_best, grad_new),
        step=jnp.where(reduce, c['step'] / 2, c['step']),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_best_adv=x_best_adv, fooled=c['fooled'] | fooled_now, hist=hist,
        reduced_last=jnp.where(is_ckpt, reduce, c['reduced_last']),
        loss_best_last=jnp.where(is_ckpt, loss_best, c['loss_best_last']),
    )

  init = dict(
      x=x_init, x_prev=x_init, grad=grad0,
      step=jnp.broadcast_to(2.0 * jnp.asarray(eps, x.dtype), (n,)),
      x_best=x_init, grad_best=grad0, loss_best=loss0,
      x_best_adv=jnp.where(bcast(fooled0), x_init, x), fooled=fooled0 | fooled_clean,
      hist=jnp.zeros((num_steps + 1, n), x.dtype),  # hist[0] = 0: see apgd_increases
      # auto-attack starts with "reduced" set, so condition (b) cannot fire at the first
      # checkpoint.
      reduced_last=jnp.ones((n,), bool), loss_best_last=loss0,
  )
  c = jax.lax.fori_loop(0, num_steps, body, init, unroll=unroll)
  x_adv = jnp.where(bcast(c['fooled']), c['x_best_adv'], c['x_best'])
  return jax.lax.stop_gradient(x_adv)


def apgd_targeted(logits_fn, x: Array, y: Array, *, eps, num_steps: int, key: Array,
                  num_targets: int = 9, norm: str = 'linf') -> Array:
  """APGD-T (Croce & Hein 2020, AutoAttack): APGD on the targeted DLR loss toward each of the
  `num_targets` classes ranked highest after y on the clean input, in turn (2nd, 3rd, ...);
  per example the first run whose point is misclassified is kept (else the last run's point).
  """
  model = core.as_attack_model(logits_fn)
  keys = core.model_keys(model, key)
  logits = model.logits(x, keys(core.FINAL_STEP))
  k = logits.shape[-1]
  if not 1 <= num_targets <= k - 1:
    raise ValueError(f'apgd_t: num_targets={num_targets} must be in [1, {k - 1}]')
  ranked = jnp.argsort(-logits, axis=-1)  # the true class, where first, is skipped below
  others = jax.vmap(lambda r, label: r[jnp.argsort(r == label, stable=True)])(ranked, y)

  def body(t, carry):
    x_out, done = carry
    target = others[:, t]
    cand = apgd(model, x, y, eps=eps, num_steps=num_steps, key=jax.random.fold_in(key, t),
                loss='dlr', norm=norm, target=target)
    fooled = core.is_adversarial(model.logits(cand, keys(core.FINAL_STEP)), y)
    take = ~done & (fooled | (t == num_targets - 1))
    return jnp.where(core.per_example(take, x), cand, x_out), done | fooled

  x_out, _ = jax.lax.fori_loop(0, num_targets, body, (x, jnp.zeros(x.shape[0], bool)))
  return jax.lax.stop_gradient(x_out)
