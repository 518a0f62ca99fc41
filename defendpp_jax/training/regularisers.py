"""Training-time defences as pure loss terms: defensive distillation, Cross-Lipschitz, Deep
Defense, ADP, the Adv-BNN KL term and the Parseval retraction.

Usage:
  loss = distillation_loss(student_logits, teacher_logits, temperature=100.0)
  loss = ce + lam * cross_lipschitz(lambda x: apply(params, x), images)
  loss = ce + 15.0 * deep_defense_regulariser(lambda x: apply(params, x), images, labels)
  loss, metrics = adp_loss(member_logits, labels, alpha=2.0, beta=0.5)     # (M, N, K) logits
  loss = ce + gaussian_kl(mu, log_sigma, prior_sigma=0.1) / num_train_examples
  matrix, restore = as_matrix(kernel)                   # after each optimiser step (Parseval)
  kernel = restore(parseval_retraction(matrix, beta=0.0003, key=key, row_fraction=0.3))

`logits_fn` maps images (N, H, W, C) to logits (N, K) with the examples independent of each
other (no batch statistics). Everything that takes a `logits_fn` stays differentiable with
respect to the parameters it closes over, so it can sit inside a training loss (double
backpropagation). Norms are L2 over all of an example's entries.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from defendpp_jax.nn import bayes

Array = jax.Array
LogitsFn = Callable[[Array], Array]

# Keeps DeepFool's divisions by ||w||^2 finite for a flat model and its step non-zero on a
# boundary; negligible otherwise (below float32 resolution for O(1) logits and gradients).
DEEPFOOL_TINY = 1e-8
# The reference's norm guard (ZiangYan/deepdefense.pytorch: ||w + eps||, eps added to every entry
# of w, 5e-6 on MNIST and 1e-5 on CIFAR-10 for pixels in [0, 255]) in [0, 1] pixel units: an
# input gradient scales as 1 / the pixel scale, so the same guard is eps x 255.
# (The quickstart's 8x8 digits, grey digits as MNIST, take MNIST's.)
DEEPFOOL_NORM_EPS = {'mnist': 5e-6 * 255, 'cifar10': 1e-5 * 255, 'digits': 5e-6 * 255}
# ADP constants of the reference (P2333/Adaptive-Diversity-Promoting, utils.py).
ADP_LOG_OFFSET = 1e-20  # entropy: p log(p + offset)
ADP_DET_OFFSET = 1e-6   # log det(G + offset I)


def _flat(v: Array) -> Array:
  return v.reshape(v.shape[0], -1)


def _safe_norm(v: Array) -> Array:
  """Per-example L2 norm (N, ...) -> (N,), with a finite gradient (zero) at v = 0."""
  sq = jnp.sum(jnp.square(_flat(v)), axis=-1)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# --- Defensive distillation (Papernot et al. 2016; Carlini's nn_robust_attacks) --------------

def soft_cross_entropy(logits: Array, targets: Array) -> Array:
  """mean_n [ -sum_k targets_nk log softmax(logits_n)_k ]; logits and targets (N, K)."""
  return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def distillation_loss(student_logits: Array, teacher_logits: Array, temperature: float) -> Array:
  """soft_cross_entropy(student / T, softmax(teacher / T)), the teacher stop-gradient'ed.

  As Carlini's `train_models.py` (teacher and student both trained at T = 100, deployed at
  T = 1): no T^2 factor, so the gradient w.r.t. the student's logits is
  (softmax(s / T) - softmax(t / T)) / (T N).
  """
  soft = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature, axis=-1)
  return soft_cross_entropy(student_logits / temperature, soft)


# --- Input gradients and Cross-Lipschitz (Hein & Andriushchenko 2017) ------------------------

def class_input_gradients(logits_fn: LogitsFn, x: Array) -> tuple[Array, Array]:
  """(logits (N, K), grads (K, N, *x.shape[1:])) with grads[k, n] = d f_k(x_n) / d x_n.

  One forward pass (`jax.vjp`) and the K one-hot cotangents pulled back together (`jax.vmap`
  of the VJP). Valid because examples are independent: the cotangent e_k on every row gives
  each example its own gradient. Differentiable w.r.t. whatever `logits_fn` closes over.
  """
  logits, pullback = jax.vjp(logits_fn, x)
  num_classes = logits.shape[-1]
  eye = jnp.eye(num_classes, dtype=logits.dtype)
  cotangents = jnp.broadcast_to(eye[:, None, :], (num_classes,) + logits.shape)
  (grads,) = jax.vmap(pullback)(cotangents)
  return logits, grads


def cross_lipschitz(logits_fn: LogitsFn, x: Array) -> Array:
  """(1 / (n K^2)) sum_n sum_{l,m} ||grad_x f_l(x_n) - grad_x f_m(x_n)||^2 (on the logits).

  In closed form, sum_{l,m} ||g_l - g_m||^2 = 2K sum_l ||g_l||^2 - 2 ||sum_l g_l||^2: K input
  gradients per example instead of K^2 differences. The normalisation (n K^2, ordered pairs,
  each unordered pair counted twice) is the reference's (max-andr/cross-lipschitz,
  `regularizers.py`), chosen there so that one lambda fits all data sets.
  """
  _, grads = class_input_gradients(logits_fn, x)
  num_classes, n = grads.shape[0], grads.shape[1]
  g = grads.reshape(num_classes, n, -1)
  sum_sq = jnp.sum(jnp.square(g), axis=(0, 2))            # sum_l ||g_l||^2, (N,)
  sq_sum = jnp.sum(jnp.square(jnp.sum(g, axis=0)), axis=-1)  # ||sum_l g_l||^2, (N,)
  total = jnp.sum(2.0 * num_classes * sum_sq - 2.0 * sq_sum)
  return total / (n * num_classes ** 2)


def cross_lipschitz_projected(logits_fn: LogitsFn, x: Array, key: Array,
                              projections: int = 1) -> Array:
  """An unbiased estimate of `cross_lipschitz` from `projections` input gradients per example.

  With J_n the (K, D) Jacobian of the logits and C = I - 11^T / K (centring),
  sum_{l,m} ||g_l - g_m||^2 = 2K ||C J_n||_F^2 = 2K E_v ||J_n^T C v||^2 for v with E[v v^T] = I
  (Hutchinson); v is Rademacher (the lower-variance choice), drawn independently per example
  and projection. Each projection is one VJP (cotangent C v), so the cost is `projections`
  backward passes instead of K. The estimate and its parameter gradient are unbiased; the
  exact value is `cross_lipschitz`.
  """
  if projections < 1:
    raise ValueError(f'projections must be >= 1, got {projections}')
  logits, pullback = jax.vjp(logits_fn, x)
  n, num_classes = logits.shape
  v = jax.random.rademacher(key, (projections, n, num_classes), dtype=logits.dtype)
  u = v - jnp.mean(v, axis=-1, keepdims=True)                  # C v
  (proj,) = jax.vmap(pullback)(u)                              # (P, N, *x.shape[1:])
  sq = jnp.sum(jnp.square(proj.reshape(projections, n, -1)))   # sum_{p,n} ||J_n^T C v||^2
  return 2.0 * num_classes * sq / (projections * n * num_classes ** 2)


# --- Deep Defense (Yan et al. 2018): unrolled DeepFool ---------------------------------------

def _deepfool(logits_fn: LogitsFn, x: Array, y: Array, steps: int,
              overshoot: float, norm_eps: float = 0.0) -> tuple[Array, Array]:
  """(r, correct): the unrolled DeepFool perturbation and whether f classifies x as y."""
  y = jnp.asarray(y, jnp.int32)
  r = jnp.zeros_like(x)
  done = jnp.zeros(x.shape[0], bool)
  correct = None
  for t in range(steps):
    logits, grads = class_input_gradients(logits_fn, x + r)
    num_classes = logits.shape[-1]
    pred = jnp.argmax(logits, axis=-1)
    if correct is None:
      correct = pred == y
    ref = jnp.where(correct, y, pred)
    ref_hot = jax.nn.one_hot(ref, num_classes, dtype=logits.dtype)
    g = jnp.moveaxis(grads.reshape(num_classes, x.shape[0], -1), 0, 1)  # (N, K, D)
    f_diff = logits - jnp.sum(logits * ref_hot, axis=-1, keepdims=True)  # f_k - f_ref
    w = g - jnp.einsum('nk,nkd->nd', ref_hot, g)[:, None, :]            # grad (f_k - f_ref)
    w_sq = jnp.sum(jnp.square(w + norm_eps), axis=-1)                  # ||w_k + eps||^2
    classes = jnp.arange(num_classes)
    candidate = jnp.where(correct[:, None], classes != y[:, None], classes == y[:, None])
    dist = jnp.where(candidate, jnp.abs(f_diff) / jnp.sqrt(w_sq + DEEPFOOL_TINY), jnp.inf)
    pick = jax.nn.one_hot(jnp.argmin(dist, axis=-1), num_classes, dtype=logits.dtype)
    f_l = jnp.sum(pick * f_diff, axis=-1)
    w_l = jnp.einsum('nk,nkd->nd', pick, w)
    scale = (jnp.abs(f_l) + DEEPFOOL_TINY) / (jnp.sum(pick * w_sq, axis=-1) + DEEPFOOL_TINY)
    step = jnp.where(done[:, None], 0.0, scale[:, None] * w_l)
    r = r + step.reshape(x.shape)
    if t < steps - 1:
      pred_over = jnp.argmax(logits_fn(x + (1.0 + overshoot) * r), axis=-1)
      done = done | jnp.where(correct, pred_over != y, pred_over == y)
  if correct is None:  # steps == 0
    correct = jnp.argmax(logits_fn(x), axis=-1) == y
  return (1.0 + overshoot) * r, correct


def deepfool_perturbation(logits_fn: LogitsFn, x: Array, y: Array, steps: int = 5,
                          overshoot: float = 0.02, norm_eps: float = 0.0) -> Array:
  """Unrolled multi-class DeepFool (L2), differentiable end to end; r has x's shape.

  Each of `steps` steps, from x + r: with f'_k = f_k - f_ref and w_k = grad_x f'_k over the
  candidate classes k, pick l = argmin_k |f'_k| / ||w_k + eps|| and take
  r <- r + (|f'_l| + tiny) / (||w_l + eps||^2 + tiny) w_l (onto the linearised boundary when
  eps = 0); return (1 + overshoot) r. eps = `norm_eps` is added to every entry of w inside the
  norms, as the reference's guard (DEEPFOOL_NORM_EPS): it bounds the step |f'| / ||w + eps||
  where a logit difference is flat (||w|| -> 0), the 1 / ||w||^2 that a second derivative
  would otherwise amplify. As the reference (ZiangYan/deepdefense.pytorch, `deepdefense.py`,
  `forward_correct` / `forward_wrong`, overshoot 0.02, 5 iterations):
    - correctly classified x: ref = the label (= the prediction), fixed; candidates: every
      other class; an example stops (its later steps are masked to zero) once
      f(x + (1 + overshoot) r) predicts another class;
    - misclassified x: ref = the current prediction at x + r (re-evaluated every step); the
      only candidate is the true label (the perturbation pushes towards being correct); an
      example stops once f(x + (1 + overshoot) r) predicts the label. The reference measures
      f'_y from the previous step's prediction but w_y from the current one; both use the
      current prediction here.
  Nothing is stop-gradient'ed: the argmin and the stopping masks are piecewise constant, the
  gradient flows through f'_l, w_l (double backprop) and the accumulated steps. tiny =
  DEEPFOOL_TINY keeps a flat model's step finite at eps = 0.
  """
  return _deepfool(logits_fn, x, y, steps, overshoot, norm_eps)[0]


def deep_defense_regulariser(logits_fn: LogitsFn, x: Array, y: Array, steps: int = 5,
                             c: float = 25.0, d: float = 5.0,
                             overshoot: float = 0.02, norm_eps: float = 0.0) -> Array:
  """mean_n [ exp(-c rho_n) if f(x_n) = y_n else exp(d rho_n) ], rho_n = ||r_n|| / ||x_n||.

  r = `deepfool_perturbation` (its per-example rules), x as the network sees it (the
  reference uses matconvnet's mean-subtracted data). Correct examples are rewarded for a
  large relative perturbation, misclassified ones for a small one (close to being correct).
  The mean runs over the whole batch, both groups together, as the reference divides each
  group's sum by the batch size. Reference defaults (ZiangYan/deepdefense.pytorch): c = 25,
  d = 5, 5 steps; its weight lambda = 15 is the caller's (loss = CE + 15 * this), when
  fine-tuning a trained net; `norm_eps` is `deepfool_perturbation`'s guard.
  """
  r, correct = _deepfool(logits_fn, x, y, steps, overshoot, norm_eps)
  rho = _safe_norm(r) / jnp.maximum(_safe_norm(x), 1e-12)
  return jnp.mean(jnp.exp(jnp.where(correct, -c * rho, d * rho)))


# --- ADP: adaptive diversity promoting (Pang et al. 2019) ------------------------------------

def ensemble_entropy(member_probs: Array) -> Array:
  """H(mean_m p_m) = -sum_k pbar_k log(pbar_k + 1e-20) per example; (M, N, K) -> (N,)."""
  mean = jnp.mean(member_probs, axis=0)
  return -jnp.sum(mean * jnp.log(mean + ADP_LOG_OFFSET), axis=-1)


def log_det_diversity(member_probs: Array, labels: Array, eps: float = ADP_DET_OFFSET) -> Array:
  """log det(M~^T M~ + eps I) per example; member_probs (M, N, K), labels (N,) -> (N,).

  Column m of M~ ((K-1) x M) is member m's prediction with the true class removed, scaled to
  unit L2 norm; M~^T M~ is the members' M x M Gram matrix of cosines, so the value is at most
  M log(1 + eps) (mutually orthogonal non-maximal predictions, Hadamard's inequality) and
  log(M + eps) + (M - 1) log(eps) for identical ones. eps = 1e-6 is the reference's
  `det_offset` (P2333/Adaptive-Diversity-Promoting, utils.py). Zeroing the true class rather
  than deleting it gives the same norms and Gram matrix with static shapes. The log det is
  taken through a Cholesky factor (the matrix is symmetric positive definite).
  """
  num_classes = member_probs.shape[-1]
  keep = 1.0 - jax.nn.one_hot(labels, num_classes, dtype=member_probs.dtype)
  non_true = member_probs * keep[None]                                  # (M, N, K)
  norm = jnp.sqrt(jnp.sum(jnp.square(non_true), axis=-1, keepdims=True) + 1e-30)
  unit = jnp.moveaxis(non_true / norm, 0, 1)                            # (N, M, K)
  gram = jnp.einsum('nik,njk->nij', unit, unit)
  gram = gram + eps * jnp.eye(gram.shape[-1], dtype=gram.dtype)
  chol = jnp.linalg.cholesky(gram)
  return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def adp_loss(member_logits: Array, labels: Array, alpha: float = 2.0,
             beta: float = 0.5) -> tuple[Array, dict[str, Array]]:
  """mean_n [ sum_m CE(p_m, y) - alpha H(mean_m p_m) - beta log det(M~^T M~ + eps I) ].

  member_logits (M, N, K), p_m = softmax of member m. As the reference's `Loss_withEE_DPP`
  (P2333/Adaptive-Diversity-Promoting, utils.py): the members' cross-entropies are summed,
  not averaged, and the loss is averaged over the batch. Its flag defaults are alpha
  (`lamda`) = 1, beta (`log_det_lamda`) = 0.5 with 2 members; the defaults here, alpha = 2,
  beta = 0.5, are those of its README's ADP commands (3 members). The cross-entropy is taken
  from log-softmax (the reference clips probabilities to [1e-7, 1 - 1e-7]).
  Metrics: the summed CE, the mean entropy and log det, the ensemble's (mean-softmax)
  accuracy.
  """
  log_probs = jax.nn.log_softmax(member_logits, axis=-1)
  probs = jnp.exp(log_probs)
  true_hot = jax.nn.one_hot(labels, member_logits.shape[-1], dtype=log_probs.dtype)
  ce = -jnp.sum(jnp.mean(jnp.sum(log_probs * true_hot[None], axis=-1), axis=-1))
  entropy = jnp.mean(ensemble_entropy(probs))
  log_det = jnp.mean(log_det_diversity(probs, labels))
  loss = ce - alpha * entropy - beta * log_det
  accuracy = jnp.mean(jnp.argmax(jnp.mean(probs, axis=0), axis=-1) == labels)
  return loss, {'ce': ce, 'ensemble_entropy': entropy, 'log_det': log_det,
                'ensemble_accuracy': accuracy}


# --- Adv-BNN (Liu et al. 2019): KL of a mean-field Gaussian posterior ------------------------

# The closed form lives with the Bayesian layers that sow it (nn.bayes).
gaussian_kl = bayes.gaussian_kl_sum


# --- Parseval networks (Cisse et al. 2017) ---------------------------------------------------

def _retract(w: Array, beta: float) -> Array:
  return (1.0 + beta) * w - beta * (w @ (w.T @ w))


def parseval_retraction(w: Array, beta: float, key: Array | None = None,
                        row_fraction: float = 1.0) -> Array:
  """One retraction step towards the Stiefel manifold: W <- (1 + beta) W - beta W W^T W.

  w is 2-D with one row per output unit (see `as_matrix`). Each singular value s maps to
  (1 + beta) s - beta s^3, whose fixed point s = 1 attracts every s in (0, sqrt(1 + 1/beta))
  for beta <= 1/2 (rows that are orthonormal are left unchanged). With `key` and
  row_fraction < 1, the step is applied to ceil(row_fraction * rows) rows drawn without
  replacement (W_S <- (1 + beta) W_S - beta W_S W_S^T W_S, the paper's sampling for large
  layers); the other rows are returned untouched. There is no official code; the paper
  applies it after every optimiser step with beta ~ 3e-4 to 2e-3.
  """
  if w.ndim != 2:
    raise ValueError(f'parseval_retraction needs a 2-D matrix, got shape {w.shape}')
  if not 0.0 < row_fraction <= 1.0:
    raise ValueError(f'row_fraction={row_fraction} is not in (0, 1]')
  rows = w.shape[0]
  count = min(rows, math.ceil(row_fraction * rows))
  if key is None or count == rows:
    return _retract(w, beta)
  idx = jax.random.permutation(key, rows)[:count]
  return w.at[idx].set(_retract(w[idx], beta))


def as_matrix(kernel: Array) -> tuple[Array, Callable[[Array], Array]]:
  """(matrix with one row per output unit, restore) for a Flax kernel.

  Dense (in, out) -> (out, in); convolution (kh, kw, cin, cout) -> (cout, kh * kw * cin);
  restore(matrix) gives back the kernel's layout and shape.
  """
  shape = kernel.shape
  if kernel.ndim < 2:
    raise ValueError(f'as_matrix needs a kernel of rank >= 2, got shape {shape}')
  moved = jnp.moveaxis(kernel, -1, 0)
  matrix = moved.reshape(shape[-1], -1)

  def restore(m: Array) -> Array:
    return jnp.moveaxis(m.reshape(moved.shape), 0, -1)

  return matrix, restore
