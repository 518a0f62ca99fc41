"""White-box adversarial attacks as pure, jit-able JAX functions.

Every attack takes a `logits_fn: (N, H, W, C) float32 in [0, 1] -> (N, K) logits`, a batch `x` in
[0, 1] and integer labels `y`, and returns `x_adv` with the shape of `x`, in [0, 1] and (for the
bounded attacks) inside the eps-ball around `x`. Attacks never normalise pixels (the model does)
and never choose the model's mode: the caller binds inference mode (BatchNorm's stored statistics)
into `logits_fn`, e.g. `partial(model.apply, variables, train=False)`.

Usage:
  attack = jax.jit(functools.partial(attacks.pgd, logits_fn),
                   static_argnames=('num_steps', 'norm', 'restarts', 'random_start', 'unroll'))
  x_adv = attack(x, y, eps=0.3, step_size=0.01, num_steps=40, key=jax.random.key(0))

Arguments that select code paths or loop lengths (`num_steps`, `binary_search_steps`, `restarts`,
`norm`, `loss`, `quantize`, `levels`, `random_start`, `unroll`) must be static under `jax.jit`.
Numeric budgets (`eps`, `step_size`, `gamma`, `max_norm`, ...) and `target` may be traced (None
or not is part of the trace); `eps` / `step_size` may also be per-example arrays of shape (N,).

On `unroll`: iterative attacks run their steps with `lax.fori_loop(..., unroll=unroll)`. The
default `unroll=1` keeps compile time independent of the step count: a fully unrolled loop
compiles one copy of the model gradient per step (~0.25 s per step for a 2-layer conv net on a
2-core CPU, much more for a ResNet-18, and it multiplies with restarts / search steps). For
small conv nets the rolled loop ran as fast as the unrolled one, but for a ResNet-18 XLA:CPU
was measured 4-8x slower on a while-loop body containing the conv gradients than on the same
steps unrolled: for long evaluations of such models, pass `unroll=True`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
LogitsFn = Callable[[Array], Array]

__all__ = [
    'ATTACKS', 'apgd', 'bim', 'cw_l2', 'ddn', 'dlr_loss', 'fgsm', 'is_adversarial',
    'least_likely_target', 'l2_norm', 'pgd', 'project_l2', 'project_linf', 'random_init',
]

# atanh(+-1) is infinite: the tanh-space change of variables of C&W needs pixels strictly
# inside (0, 1).
_TANH_BOUND = 1.0 - 1e-6
# Guards divisions by per-example norms without changing any non-degenerate value.
_TINY = 1e-12


# ---------------------------------------------------------------------------------------------
# Small shared pieces.


def _example_axes(x: Array) -> tuple[int, ...]:
  """All axes but the batch axis: norms are per example, never over the batch."""
  return tuple(range(1, x.ndim))


def _per_example(v, x: Array) -> Array:
  """Broadcasts a scalar or an (N,) array of per-example values against x (N, ...)."""
  v = jnp.asarray(v, dtype=x.dtype)
  if v.ndim == 1:
    v = v.reshape((-1,) + (1,) * (x.ndim - 1))
  return v


def l2_norm(v: Array) -> Array:
  """Per-example L2 norm over all non-batch axes; (N, ...) -> (N,)."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=_example_axes(v)))


def _normalize_l2(v: Array) -> Array:
  n = l2_norm(v)
  return v / _per_example(jnp.maximum(n, _TINY), v)


def project_linf(x_adv: Array, x: Array, eps) -> Array:
  """Projects x_adv onto the L-infinity ball of radius eps around x (per example)."""
  eps = _per_example(eps, x)
  return jnp.clip(x_adv, x - eps, x + eps)


def project_l2(x_adv: Array, x: Array, eps) -> Array:
  """Projects x_adv onto the L2 ball of radius eps around x (per example)."""
  delta = x_adv - x
  n = l2_norm(delta)
  factor = jnp.minimum(1.0, jnp.asarray(eps, x.dtype) / jnp.maximum(n, _TINY))
  return x + delta * _per_example(factor, x)


def _project(x_adv: Array, x: Array, eps, norm: str) -> Array:
  # Clipping to the box after the ball projection keeps the point in the ball: x is in [0, 1],
  # so clipping only moves coordinates towards x.
  proj = project_linf if norm == 'linf' else project_l2
  return jnp.clip(proj(x_adv, x, eps), 0.0, 1.0)


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
  eps = _per_example(eps, x)
  if norm == 'linf':
    delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
  elif norm == 'l2':
    k_dir, k_rad = jax.random.split(key)
    direction = _normalize_l2(jax.random.normal(k_dir, x.shape, x.dtype))
    d = math.prod(x.shape[1:])
    radius = jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / d)
    delta = direction * _per_example(radius, x) * eps
  else:
    raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')
  return jnp.clip(x + delta, 0.0, 1.0)


def is_adversarial(logits: Array, y: Array, target: Array | None = None) -> Array:
  """Success per example: argmax != y (untargeted) or argmax == target (targeted)."""
  pred = jnp.argmax(logits, axis=-1)
  return pred != y if target is None else pred == target


def least_likely_target(logits_fn: LogitsFn, x: Array) -> Array:
  """Labels of the least likely class for each example (a common choice of target)."""
  return jnp.argmin(logits_fn(x), axis=-1)


def _ce_objective(logits: Array, y: Array, target: Array | None) -> Array:
  """Per-example loss the attack MAXIMISES: CE to y, or minus CE to the target."""
  if target is None:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return -optax.softmax_cross_entropy_with_integer_labels(logits, target)


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
    return -(z_y - other) / (z_sorted[:, -1] - z_sorted[:, -3] + _TINY)
  z_t = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
  return -(z_y - z_t) / (z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + _TINY)


def _value_and_input_grad(objective: Callable[[Array], Array], logits_fn: LogitsFn,
                          x_adv: Array) -> tuple[Array, Array, Array]:
  """Per-example objective, logits, and the input gradient of each example's objective.

  Examples are independent, so the gradient of the batch SUM is every example's own gradient.
  """
  def total(z):
    logits = logits_fn(z)
    per_example = objective(logits)
    return jnp.sum(per_example), (per_example, logits)

  (_, (per_example, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
  return per_example, logits, grad


def _step(logits_fn: LogitsFn, x_adv: Array, x: Array, y: Array, target: Array | None,
          eps, step_size, norm: str) -> Array:
  """One projected steepest-ascent step on the CE objective (FGSM = one of them from x)."""
  _, _, grad = _value_and_input_grad(lambda l: _ce_objective(l, y, target), logits_fn, x_adv)
  step_size = _per_example(step_size, x)
  if norm == 'linf':
    x_adv = x_adv + step_size * jnp.sign(grad)
  else:
    x_adv = x_adv + step_size * _normalize_l2(grad)
  return _project(x_adv, x, eps, norm)


def _check_norm(norm: str) -> None:
  if norm not in ('linf', 'l2'):
    raise ValueError(f'norm must be "linf" or "l2", got {norm!r}')


# ---------------------------------------------------------------------------------------------
# Fixed-budget attacks.


def fgsm(logits_fn: LogitsFn, x: Array, y: Array, *, eps, target: Array | None = None) -> Array:
  """Fast Gradient Sign Method (Goodfellow et al. 2015), L-infinity, one step.

  Args:
    logits_fn: (N, H, W, C) in [0, 1] -> (N, K) logits, in inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels.
    eps: L-infinity budget, scalar or (N,).
    target: optional (N,) target labels; the step then decreases CE to the target.

  Returns:
    x_adv like x, in [0, 1] and within eps of x.
  """
  x_adv = _step(logits_fn, x, x, y, target, eps, eps, 'linf')
  return jax.lax.stop_gradient(x_adv)


def bim(logits_fn: LogitsFn, x: Array, y: Array, *, eps, step_size, num_steps: int,
        target: Array | None = None, unroll: int | bool = 1) -> Array:
  """Basic Iterative Method / I-FGSM (Kurakin et al. 2017): PGD-L-infinity from x itself.

  Args:
    logits_fn: (N, H, W, C) in [0, 1] -> (N, K) logits, in inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels.
    eps: L-infinity budget, scalar or (N,).
    step_size: per-step size, scalar or (N,).
    num_steps: number of steps (static).
    target: optional (N,) target labels.
    unroll: passed to `lax.fori_loop` (see the module docstring).

  Returns:
    The last iterate, like x, in [0, 1] and within eps of x.
  """
  return pgd(logits_fn, x, y, eps=eps, step_size=step_size, num_steps=num_steps,
             key=None, norm='linf', restarts=1, target=target, random_start=False,
             unroll=unroll)


def pgd(logits_fn: LogitsFn, x: Array, y: Array, *, eps, step_size, num_steps: int,
        key: Array | None, norm: str = 'linf', restarts: int = 1,
        target: Array | None = None, random_start: bool = True,
        unroll: int | bool = 1) -> Array:
  """Projected Gradient Descent (Madry et al. 2018) on the cross-entropy, L-inf or L2.

  Each restart starts from a uniform random point of the eps-ball (unless random_start=False)
  and returns its last iterate. Over restarts, each example keeps the restart that fools the
  model (the highest-loss one if several do), or if none does, the one with the highest loss
  (exact ties: the earliest restart).

  Args:
    logits_fn: (N, H, W, C) in [0, 1] -> (N, K) logits, in inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels.
    eps: budget, scalar or (N,).
    step_size: per-step size (sign step for 'linf', normalised-gradient step for 'l2').
    num_steps: steps per restart (static).
    key: a `jax.random.key`; may be None only when random_start=False.
    norm: 'linf' or 'l2' (static).
    restarts: number of random restarts (static).
    target: optional (N,) target labels: minimise CE to them, success means argmax == target.
    random_start: start from a random point of the ball (static). With num_steps=1,
      step_size=eps and random_start=False, this is FGSM.
    unroll: passed to the step loop's `lax.fori_loop` (restarts run in a `lax.scan`).

  Returns:
    x_adv like x, in [0, 1] and inside the eps-ball around x.
  """
  _check_norm(norm)
  if random_start and key is None:
    raise ValueError('pgd with random_start=True needs a key')
  if restarts > 1 and not random_start:
    raise ValueError('pgd restarts without a random start would all be identical')

  def one_run(run_key):
    x0 = random_init(run_key, x, eps, norm) if random_start else x
    body = lambda _, xa: _step(logits_fn, xa, x, y, target, eps, step_size, norm)
    return jax.lax.fori_loop(0, num_steps, body, x0, unroll=unroll)

  if restarts == 1:
    return jax.lax.stop_gradient(one_run(key))

  def restart(carry, run_key):
    best_x, best_fooled, best_loss = carry
    xa = one_run(run_key)
    logits = logits_fn(xa)
    fooled = is_adversarial(logits, y, target)
    loss = _ce_objective(logits, y, target)
    # Lexicographic (fooled, loss): a fooling restart beats any non-fooling one.
    better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
    best_x = jnp.where(_per_example(better, x), xa, best_x)
    return (best_x, best_fooled | fooled,
            jnp.where(better, loss, best_loss)), None

  n = x.shape[0]
  init = (x, jnp.zeros((n,), bool), jnp.full((n,), -jnp.inf, x.dtype))
  (best_x, _, _), _ = jax.lax.scan(restart, init, jax.random.split(key, restarts))
  return jax.lax.stop_gradient(best_x)


# ---------------------------------------------------------------------------------------------
# Auto-PGD.


def _apgd_checkpoints(num_steps: int) -> np.ndarray:
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


def apgd(logits_fn: LogitsFn, x: Array, y: Array, *, eps, num_steps: int, key: Array,
         loss: str = 'ce', norm: str = 'linf', target: Array | None = None,
         rho: float = 0.75, unroll: int | bool = 1) -> Array:
  """Auto-PGD (Croce & Hein 2020), one run, with the CE or DLR loss, L-inf or L2.

  Momentum 0.75 (1 at the first step); step size 2 eps, halved per example at the
  checkpoints when (a) at most a fraction rho of the steps since the last checkpoint increased
  the loss, or (b) the step size was not halved at the last checkpoint and the best loss has not
  improved since; a halving restarts from the best point (and its gradient).

  Args:
    logits_fn: (N, H, W, C) in [0, 1] -> (N, K) logits, in inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels (also used by the targeted DLR loss).
    eps: budget, scalar or (N,).
    num_steps: number of iterations (static).
    key: a `jax.random.key` for the random start.
    loss: 'ce' or 'dlr' (static); with a target: minus CE to the target, or targeted DLR.
    norm: 'linf' or 'l2' (static).
    target: optional (N,) target labels; success then means argmax == target.
    rho: oscillation threshold of condition (a).
    unroll: passed to `lax.fori_loop`.

  Returns:
    Per example, an adversarial point found (an iterate, or x itself if x is already
    misclassified) if any, else the highest-loss point; in [0, 1] and inside the eps-ball.
  """
  _check_norm(norm)
  if loss == 'ce':
    objective = lambda logits: _ce_objective(logits, y, target)
  elif loss == 'dlr':
    objective = lambda logits: dlr_loss(logits, y, target)
  else:
    raise ValueError(f'loss must be "ce" or "dlr", got {loss!r}')

  n = x.shape[0]
  bcast = lambda m: _per_example(m, x)
  evaluate = functools.partial(_value_and_input_grad, objective, logits_fn)

  # Random start on the boundary of the ball, as auto-attack does.
  if norm == 'linf':
    t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    t = t / bcast(jnp.max(jnp.abs(t), axis=_example_axes(t)) + _TINY)
  else:
    t = _normalize_l2(jax.random.normal(key, x.shape, x.dtype))
  x_init = jnp.clip(x + _per_example(eps, x) * t, 0.0, 1.0)

  fooled_clean = is_adversarial(logits_fn(x), y, target)
  loss0, logits0, grad0 = evaluate(x_init)
  fooled0 = is_adversarial(logits0, y, target)

  windows = jnp.asarray(_apgd_checkpoints(num_steps))
  hist = jnp.zeros((num_steps + 1, n), x.dtype).at[0].set(loss0)

  def ascent(x_cur, grad, step):
    if norm == 'linf':
      return x_cur + bcast(step) * jnp.sign(grad)
    return x_cur + bcast(step) * _normalize_l2(grad)

  def body(i, c):
    x_cur, x_prev, grad = c['x'], c['x_prev'], c['grad']
    a = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)
    z = _project(ascent(x_cur, grad, c['step']), x, eps, norm)
    x_new = _project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, eps, norm)

    loss_new, logits, grad_new = evaluate(x_new)
    fooled_now = is_adversarial(logits, y, target)
    x_best_adv = jnp.where(bcast(fooled_now), x_new, c['x_best_adv'])
    improved = loss_new > c['loss_best']
    x_best = jnp.where(bcast(improved), x_new, c['x_best'])
    grad_best = jnp.where(bcast(improved), grad_new, c['grad_best'])
    loss_best = jnp.where(improved, loss_new, c['loss_best'])
    hist = c['hist'].at[i + 1].set(loss_new)

    # Checkpoint test on the window of the last k steps: increases hist[j] > hist[j-1] for
    # j in [i + 2 - k, i + 1] (auto-attack compares the same k pairs, except that at the first
    # checkpoint its loss buffer has no entry for the starting point and reads a zero).
    k = windows[i]
    is_ckpt = k > 0
    rows = jnp.arange(num_steps)
    in_window = (rows >= i + 1 - k) & (rows <= i)
    increases = jnp.sum((hist[1:] > hist[:-1]) & in_window[:, None], axis=0)
    oscillating = increases <= k * rho
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
      hist=hist,
      # auto-attack starts with "reduced" set, so condition (b) cannot fire at the first
      # checkpoint.
      reduced_last=jnp.ones((n,), bool), loss_best_last=loss0,
  )
  c = jax.lax.fori_loop(0, num_steps, body, init, unroll=unroll)
  x_adv = jnp.where(bcast(c['fooled']), c['x_best_adv'], c['x_best'])
  return jax.lax.stop_gradient(x_adv)


# ---------------------------------------------------------------------------------------------
# Minimal-norm attacks.


def _verified(logits_fn: LogitsFn, candidate: Array, x: Array, y: Array,
              target: Array | None) -> Array:
  """candidate where a fresh forward pass confirms it is adversarial, else x.

  The logits that selected the candidate came from inside a gradient computation, which XLA
  may fuse differently; points on the decision boundary could flip. This costs one forward pass.
  """
  ok = is_adversarial(logits_fn(candidate), y, target)
  return jnp.where(_per_example(ok, x), candidate, x)


def cw_l2(logits_fn: LogitsFn, x: Array, y: Array, *, binary_search_steps: int = 5,
          num_steps: int = 20, confidence=0.0, initial_const=1e-2, lr=1e-2,
          target: Array | None = None, unroll: int | bool = 1) -> Array:
  """Carlini-Wagner L2 attack (Carlini & Wagner 2017) in tanh space with Adam.

  Minimises ||x' - x||_2^2 + c * max(z_y - max_{i != y} z_i + confidence, 0) (targeted:
  max(max_{i != t} z_i - z_t + confidence, 0)) over x' = (tanh(w) + 1) / 2, with Adam restarted
  from x at every binary-search step. Per example, c starts at initial_const and is multiplied
  by 10 while no adversarial example has been found, else bisected, as in the original code.
  The paper's budget is 5 x 20 (binary_search_steps x num_steps). The original's default
  initial_const is 1e-3; 1e-2 reaches c = 100 within the 5 search steps of the paper.
  There is no early abort: loops have a fixed length.

  Args:
    logits_fn: (N, H, W, C) in [0, 1] -> (N, K) logits, in inference mode.
    x: (N, H, W, C) clean inputs in [0, 1].
    y: (N,) integer true labels.
    binary_search_steps: number of values of c tried (static).
    num_steps: Adam steps per value of c (static).
    confidence: required logit margin kappa for a point to count as found.
    initial_const: initial c.
    lr: Adam learning rate (in tanh space).
    target: optional (N,) target labels.
    unroll: passed to the inner `lax.fori_loop` (the search loop is never unrolled).

  Returns:
    Per example, the smallest-L2 adversarial point seen at any iteration of any search step
    (checked again with a fresh forward pass), or x itself where none was found.
  """
  n = x.shape[0]
  bcast = lambda m: _per_example(m, x)
  labels = y if target is None else target
  w0 = jnp.arctanh(jnp.clip(2.0 * x - 1.0, -_TANH_BOUND, _TANH_BOUND))
  to_image = lambda w: (jnp.tanh(w) + 1.0) / 2.0
  optimizer = optax.adam(lr)

  def hinge_and_success(logits):
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

  def objective(w, const):
    xa = to_image(w)
    logits = logits_fn(xa)
    dist = jnp.sum(jnp.square(xa - x), axis=_example_axes(x))
    hinge, success = hinge_and_success(logits)
    return jnp.sum(dist + const * hinge), (xa, dist, success)

  def record(best, xa, dist, success):
    best_dist, best_x, found = best
    better = success & (dist < best_dist)
    return (jnp.where(better, dist, best_dist), jnp.where(bcast(better), xa, best_x),
            found | success)

  def search_step(_, carry):
    const, lower, upper, best_dist, best_x = carry

    def adam_step(_, inner):
      w, opt_state, best = inner
      (_, (xa, dist, success)), grad = jax.value_and_grad(objective, has_aux=True)(w, const)
      best = record(best, xa, dist, success)
      updates, opt_state = optimizer.update(grad, opt_state, w)
      return optax.apply_updates(w, updates), opt_state, best

    inner = (w0, optimizer.init(w0), (best_dist, best_x, jnp.zeros((n,), bool)))
    w, _, best = jax.lax.fori_loop(0, num_steps, adam_step, inner, unroll=unroll)
    _, (xa, dist, success) = objective(w, const)  # the last update is checked too
    best_dist, best_x, found = record(best, xa, dist, success)

    upper = jnp.where(found, jnp.minimum(upper, const), upper)
    lower = jnp.where(found, lower, jnp.maximum(lower, const))
    bracketed = upper < 1e9
    const = jnp.where(bracketed, (lower + upper) / 2, const * 10)
    return const, lower, upper, best_dist, best_x

  init = (jnp.full((n,), initial_const, x.dtype), jnp.zeros((n,), x.dtype),
          jnp.full((n,), 1e10, x.dtype), jnp.full((n,), jnp.inf, x.dtype), x)
  *_, best_x = jax.lax.fori_loop(0, binary_search_steps, search_step, init)
  return jax.lax.stop_gradient(_verified(logits_fn, best_x, x, y, target))


def ddn(logits_fn: LogitsFn, x: Array, y: Array, *, num_steps: int = 100, gamma=0.05,
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
    logits_fn: (N, H, W, C) in [0, 1] -> (N, K) logits, in inference mode.
    x: (N, H, W, C) clean inputs in [0, 1] (init_norm is in the same [0, 1] units).
    y: (N,) integer true labels.
    num_steps: number of steps (static).
    gamma: relative norm change per step.
    init_norm: initial norm of the perturbation.
    quantize: quantise the iterates (and the max_norm-shrunk answer) to `levels` levels (static).
    max_norm: optional L2 budget (None or not is static).
    target: optional (N,) target labels.
    levels: number of quantisation levels (static).
    key: optional `jax.random.key` for the zero-gradient fallback (a fixed key if None).
    unroll: passed to `lax.fori_loop`.

  Returns:
    Per example, the smallest-L2 adversarial iterate (re-checked with a fresh forward pass);
    if max_norm is given and that iterate lies outside it, the iterate shrunk onto the max_norm
    sphere (kept only if still adversarial); x itself where nothing adversarial was found.
    Always in [0, 1] and, with max_norm, within max_norm of x.
  """
  n = x.shape[0]
  bcast = lambda m: _per_example(m, x)
  key = jax.random.key(0) if key is None else key
  # Untargeted: ascend CE to y; targeted: descend CE to the target.
  objective = lambda logits: _ce_objective(logits, y, target)
  evaluate = functools.partial(_value_and_input_grad, objective, logits_fn)
  worst_norm = l2_norm(jnp.maximum(x, 1.0 - x))
  cap = worst_norm if max_norm is None else jnp.minimum(worst_norm, max_norm)

  def quantise(v):
    return jnp.round(v * (levels - 1)) / (levels - 1) if quantize else v

  def record(best, adv, logits):
    best_l2, best_adv = best
    l2 = l2_norm(adv - x)
    better = is_adversarial(logits, y, target) & (l2 < best_l2)
    return jnp.where(better, l2, best_l2), jnp.where(bcast(better), adv, best_adv)

  def body(i, c):
    delta, norm, best = c
    adv = x + delta
    _, logits, grad = evaluate(adv)
    best = record(best, adv, logits)
    adv_now = is_adversarial(logits, y, target)

    grad_norm = l2_norm(grad)
    random_dir = _normalize_l2(jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype))
    direction = jnp.where(bcast(grad_norm > 0), grad / bcast(jnp.maximum(grad_norm, _TINY)),
                          random_dir)
    alpha = 0.01 + 0.99 * (1.0 + jnp.cos(jnp.pi * i / num_steps)) / 2.0
    # Ascent on the objective: CE to y (untargeted) or minus CE to the target (targeted).
    delta = delta + alpha * direction

    norm = norm * jnp.where(adv_now, 1.0 - gamma, 1.0 + gamma)
    norm = jnp.minimum(norm, cap)
    delta = delta * bcast(norm / jnp.maximum(l2_norm(delta), _TINY))
    delta = jnp.clip(quantise(x + delta), 0.0, 1.0) - x
    return delta, norm, best

  init = (jnp.zeros_like(x), jnp.full((n,), init_norm, x.dtype),
          (jnp.full((n,), jnp.inf, x.dtype), x))
  delta, _, best = jax.lax.fori_loop(0, num_steps, body, init, unroll=unroll)
  last = x + delta
  best_l2, best_adv = record(best, last, logits_fn(last))

  if max_norm is not None:
    # Shrink onto the max_norm sphere, quantising towards x so the norm cannot grow back.
    shrunk = (best_adv - x) * bcast(jnp.minimum(1.0, max_norm / jnp.maximum(best_l2, _TINY)))
    if quantize:
      shrunk = jnp.trunc(shrunk * (levels - 1)) / (levels - 1)
    shrunk = jnp.clip(x + shrunk, 0.0, 1.0)
    best_adv = jnp.where(bcast(best_l2 > max_norm), shrunk, best_adv)
  return jax.lax.stop_gradient(_verified(logits_fn, best_adv, x, y, target))


ATTACKS = {'fgsm': fgsm, 'bim': bim, 'pgd': pgd, 'cw_l2': cw_l2, 'ddn': ddn, 'apgd': apgd}
