"""Training-time regularisers: known answers on tiny linear / MLP models and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defendpp_jax.training import regularisers as reg

SHAPE = (2, 2, 1)  # images (N, 2, 2, 1): D = 4 inputs


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params['w'].T + params['b']


def _mlp(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


def _mlp_params(seed=0, d=4, hidden=5, k=3):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {'w1': f(d, hidden), 'b1': 0.1 * f(hidden), 'w2': f(hidden, k), 'b2': 0.1 * f(k)}


def _images(n, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n,) + SHAPE), jnp.float32)


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_jacobians(logits_fn, x):
  """(N, K, D) float64 input Jacobians, one example at a time (jax.jacrev)."""
  one = lambda xi: logits_fn(xi[None])[0]
  return np.asarray(jax.jit(jax.vmap(jax.jacrev(one)))(x), np.float64).reshape(len(x), -1,
                                                                              x[0].size)


# --- distillation ----------------------------------------------------------------------------

def test_soft_cross_entropy_known_values():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 4)).astype(np.float32)
  targets = rng.dirichlet(np.ones(4), size=3).astype(np.float32)
  want = np.mean(-np.sum(targets * _np_log_softmax(logits), axis=-1))
  np.testing.assert_allclose(reg.soft_cross_entropy(logits, targets), want, rtol=1e-5)
  labels = np.array([0, 3, 1])
  hard = np.eye(4, dtype=np.float32)[labels]
  want_hard = -np.mean(_np_log_softmax(logits)[np.arange(3), labels])
  np.testing.assert_allclose(reg.soft_cross_entropy(logits, hard), want_hard, rtol=1e-5)


def test_distillation_has_no_t_squared_and_stops_the_teacher_gradient():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.normal(size=(2, 5)) * 10, jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 5)) * 10, jnp.float32)
  temp = 7.0
  soft = np.exp(_np_log_softmax(np.asarray(t) / temp))
  want = np.mean(-np.sum(soft * _np_log_softmax(np.asarray(s) / temp), axis=-1))
  np.testing.assert_allclose(reg.distillation_loss(s, t, temp), want, rtol=1e-5)
  g_s, g_t = jax.grad(reg.distillation_loss, argnums=(0, 1))(s, t, temp)
  want_grad = (np.exp(_np_log_softmax(np.asarray(s) / temp)) - soft) / (temp * 2)
  np.testing.assert_allclose(g_s, want_grad, rtol=1e-4, atol=1e-7)
  assert not np.any(np.asarray(g_t))
  # the student matching the teacher is stationary; its loss is the teacher's entropy at T
  g_eq = jax.grad(reg.distillation_loss)(t, t, temp)
  np.testing.assert_allclose(g_eq, 0.0, atol=1e-7)
  np.testing.assert_allclose(reg.distillation_loss(t, t, temp),
                             np.mean(-np.sum(soft * np.log(soft), -1)), rtol=1e-5)


# --- input gradients and Cross-Lipschitz -----------------------------------------------------

def test_class_input_gradients_are_per_example_jacobians_from_one_forward_pass():
  params, x = _mlp_params(), _images(3)
  calls = []

  def logits_fn(v):
    calls.append(v.shape)
    return _mlp(params, v)

  logits, grads = reg.class_input_gradients(logits_fn, x)
  assert len(calls) == 1 and grads.shape == (3,) + x.shape
  np.testing.assert_allclose(logits, _mlp(params, x), rtol=1e-6)
  jac = _np_jacobians(lambda v: _mlp(params, v), x)                  # (N, K, D)
  np.testing.assert_allclose(np.asarray(grads).reshape(3, 3, -1).transpose(1, 0, 2), jac,
                             rtol=1e-5, atol=1e-6)


def _pairwise_cross_lipschitz(params, x):
  """The definition, by explicit per-example Jacobians and a loop over class pairs."""
  one = lambda xi: _mlp(params, xi[None])[0]
  jac = jax.vmap(jax.jacrev(one))(x).reshape(x.shape[0], 3, -1)
  total = 0.0
  for l in range(3):
    for m in range(3):
      total += jnp.sum(jnp.square(jac[:, l] - jac[:, m]))
  return total / (x.shape[0] * 9)


def test_cross_lipschitz_equals_the_double_loop_over_class_pairs():
  params, x = _mlp_params(2), _images(4, seed=3)
  jac = _np_jacobians(lambda v: _mlp(params, v), x)
  want = sum(np.sum((jac[:, l] - jac[:, m]) ** 2) for l in range(3) for m in range(3)) / (4 * 9)
  got = reg.cross_lipschitz(lambda v: _mlp(params, v), x)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # double backprop: the parameter gradient is the definition's
  g = jax.jit(jax.grad(lambda p: reg.cross_lipschitz(lambda v: _mlp(p, v), x)))(params)
  g_want = jax.jit(jax.grad(_pairwise_cross_lipschitz))(params, x)
  for name in params:
    np.testing.assert_allclose(g[name], g_want[name], rtol=1e-4, atol=1e-6)
  assert float(jnp.sum(jnp.abs(g['w1']))) > 0


def test_cross_lipschitz_vanishes_when_logits_differ_by_constants():
  params, x = _mlp_params(4), _images(3)
  offsets = jnp.array([0.5, -2.0, 3.0, 1.0])
  logits_fn = lambda v: jnp.sum(_mlp(params, v), axis=-1, keepdims=True) + offsets
  scale = 2 * 4 * np.sum(_np_jacobians(logits_fn, x) ** 2) / (3 * 16)
  assert scale > 1e-2
  assert abs(float(reg.cross_lipschitz(logits_fn, x))) <= 1e-5 * scale


# --- Deep Defense ----------------------------------------------------------------------------

def _deepfool(params, model, x, y, steps=5, overshoot=0.02):
  run = lambda p, v, t: reg.deepfool_perturbation(lambda u: model(p, u), v, t, steps, overshoot)
  return jax.jit(run)(params, x, y)


def _two_class():
  rng = np.random.default_rng(5)
  params = {'w': jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=2), jnp.float32)}
  x = _images(6, seed=6)
  pred = np.argmax(np.asarray(_linear(params, x)), -1)
  y = np.where(np.arange(6) % 2 == 0, pred, 1 - pred)  # even: correct, odd: misclassified
  return params, x, jnp.asarray(y)


def _np_two_class_r(params, x):
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'], np.float64)
  xf = np.asarray(x, np.float64).reshape(len(x), -1)
  f = xf @ w.T + b
  dw = w[1] - w[0]
  return -((f[:, 1] - f[:, 0]) / (dw @ dw))[:, None] * dw, xf


def test_deepfool_on_a_two_class_linear_model_is_the_minimal_l2_perturbation():
  params, x, y = _two_class()
  r_min, _ = _np_two_class_r(params, x)
  r = _deepfool(params, _linear, x, y)
  assert r.shape == x.shape
  np.testing.assert_allclose(np.asarray(r).reshape(6, -1), 1.02 * r_min, rtol=1e-5, atol=1e-6)
  # without the overshoot it lands on the boundary f_0 = f_1
  r0 = _deepfool(params, _linear, x, y, steps=1, overshoot=0.0)
  f = np.asarray(_linear(params, x + r0), np.float64)
  np.testing.assert_allclose(f[:, 0] - f[:, 1], 0.0, atol=1e-5)


def _three_class():
  """f_0 = 1, f_1 = 10 x_1, f_2 = x_2 + 0.5: for x_1 = x_2 = 0 class 2 is the runner-up but
  the boundary with class 1 is the nearer (0.1 against 0.5)."""
  w = np.zeros((3, 4), np.float32)
  w[1, 0], w[2, 1] = 10.0, 1.0
  params = {'w': jnp.asarray(w), 'b': jnp.asarray([1.0, 0.0, 0.5])}
  rng = np.random.default_rng(7)
  x = rng.normal(size=(5, 4)) * 0.3
  x[0, :2] = 0.0
  return params, jnp.asarray(x.reshape((5,) + SHAPE), jnp.float32)


def test_deepfool_norm_guard_is_the_reference_step_and_bounds_a_flat_model():
  """With eps added to every entry of w, one step is |f'| w / ||w + eps||^2 (the reference's
  dir = |f'| / ||w + eps|| x w / ||w + eps||); on a nearly flat logit difference it stays
  bounded by |f'| / (eps sqrt(D)) roughly, where the unguarded step explodes."""
  params, x, y = _two_class()
  eps = 0.3
  run = lambda p, v, t, e: reg.deepfool_perturbation(lambda u: _linear(p, u), v, t, 1, 0.0, e)
  r = np.asarray(jax.jit(run)(params, x, y, eps)).reshape(6, -1)
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'], np.float64)
  xf = np.asarray(x, np.float64).reshape(6, -1)
  f = xf @ w.T + b
  pred = f.argmax(-1)
  yy = np.asarray(y)
  want = []
  for n in range(6):
    ref = pred[n]                             # correct: the label; misclassified: the prediction
    other = 1 - ref
    dw = w[other] - w[ref]
    want.append(abs(f[n, other] - f[n, ref]) / np.sum((dw + eps) ** 2) * dw)
  np.testing.assert_allclose(r, np.stack(want), rtol=1e-5, atol=1e-6)
  assert np.all(yy[::2] == pred[::2])
  # a nearly flat model: w_1 - w_0 = 1e-3 x (1, 1, 1, 1) and a unit logit gap
  flat = {'w': jnp.asarray(np.stack([np.zeros(4), np.full(4, 1e-3)]), jnp.float32),
          'b': jnp.asarray([1.0, 0.0], jnp.float32)}
  guarded = np.asarray(jax.jit(run)(flat, x, jnp.zeros(6, jnp.int32), 1e-2))
  unguarded = np.asarray(jax.jit(run)(flat, x, jnp.zeros(6, jnp.int32), 0.0))
  np.testing.assert_allclose(np.abs(guarded), 1e-3 / (4 * 1.1e-2 ** 2), rtol=1e-2)  # ~2.07
  np.testing.assert_allclose(np.abs(unguarded), 1e-3 / (4 * 1e-3 ** 2), rtol=1e-2)  # 250


def test_deepfool_one_step_reaches_the_nearest_boundary_of_a_three_class_linear_model():
  params, x = _three_class()
  w, b = np.asarray(params['w'], np.float64), np.asarray(params['b'], np.float64)
  xf = np.asarray(x, np.float64).reshape(5, -1)
  f = xf @ w.T + b
  ref = f.argmax(-1)
  want = []
  for n in range(5):
    dist = [np.inf if k == ref[n] else (f[n, ref[n]] - f[n, k]) / np.linalg.norm(w[k] - w[ref[n]])
            for k in range(3)]
    l = int(np.argmin(dist))
    dw = w[l] - w[ref[n]]
    want.append((f[n, ref[n]] - f[n, l]) / (dw @ dw) * dw)
    if n == 0:
      assert l == 1 and np.argsort(f[0])[-2] == 2
  want = np.stack(want)
  r1 = _deepfool(params, _linear, x, jnp.asarray(ref), steps=1, overshoot=0.0)
  np.testing.assert_allclose(np.asarray(r1).reshape(5, -1), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(want[0]), 0.1, rtol=1e-6)
  # once the overshot point is misclassified the later steps are masked
  r5 = _deepfool(params, _linear, x, jnp.asarray(ref), steps=5, overshoot=0.02)
  np.testing.assert_allclose(np.asarray(r5).reshape(5, -1), 1.02 * want, rtol=1e-5, atol=1e-6)


def test_deepfool_on_a_misclassified_example_heads_for_the_true_label():
  params, x = _three_class()
  # example 0 is predicted 0; with label 2 the step goes to the 0 | 2 boundary (0.5 away),
  # not to the nearer 0 | 1 one
  r = _deepfool(params, _linear, x[:1], jnp.array([2]), steps=1, overshoot=0.0)
  np.testing.assert_allclose(np.asarray(r).reshape(-1), [0.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_deepfool_stops_an_example_once_the_overshot_point_has_flipped():
  """f = (0, exp(u.x) - e), u a unit vector, u.x = 0: the first step (Newton on a convex
  function) goes past the boundary, to u.x = e - 1; another step would go further."""
  u = jnp.array([0.6, 0.8, 0.0, 0.0])
  model = lambda p, v: jnp.stack([jnp.zeros(v.shape[0]),
                                  jnp.exp(v.reshape(v.shape[0], -1) @ p) - math.e], axis=-1)
  x = jnp.tile(jnp.array([0.8, -0.6, 0.3, 0.0]).reshape((1,) + SHAPE), (2, 1, 1, 1))
  r = _deepfool(u, model, x, jnp.array([0, 1]))           # correct, then misclassified
  want = 1.02 * (math.e - 1.0) * np.asarray(u)
  np.testing.assert_allclose(np.asarray(r).reshape(2, -1), np.stack([want, want]), rtol=1e-5,
                             atol=1e-6)


def _np_deep_defense(params, x, y, c=25.0, d=5.0):
  r_min, xf = _np_two_class_r(params, x)
  rho = 1.02 * np.linalg.norm(r_min, axis=-1) / np.linalg.norm(xf, axis=-1)
  correct = np.argmax(xf @ np.asarray(params['w'], np.float64).T + np.asarray(params['b']),
                      -1) == np.asarray(y)
  return np.mean(np.where(correct, np.exp(-c * rho), np.exp(d * rho)))


def _analytic_deep_defense(params, x, y, c=25.0, d=5.0):
  """The regulariser of a 2-class linear model in closed form, in JAX (for its gradient)."""
  xf = x.reshape(x.shape[0], -1)
  f = _linear(params, x)
  dw = params['w'][1] - params['w'][0]
  rho = 1.02 * jnp.abs(f[:, 1] - f[:, 0]) / jnp.linalg.norm(dw) / jnp.linalg.norm(xf, axis=-1)
  correct = jnp.argmax(f, -1) == y
  return jnp.mean(jnp.where(correct, jnp.exp(-c * rho), jnp.exp(d * rho)))


def test_deep_defense_regulariser_value_and_parameter_gradient_on_a_linear_model():
  params, x, y = _two_class()
  loss = lambda p: reg.deep_defense_regulariser(lambda v: _linear(p, v), x, y)
  value, g = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(value, _np_deep_defense(params, x, y), rtol=1e-5)
  g_want = jax.jit(jax.grad(_analytic_deep_defense))(params, x, y)
  for name in params:
    np.testing.assert_allclose(g[name], g_want[name], rtol=1e-4, atol=1e-6)


def test_deep_defense_regulariser_has_a_nonzero_gradient_through_an_mlp():
  params, x = _mlp_params(8), _images(4, seed=9)
  pred = np.argmax(np.asarray(_mlp(params, x)), -1)
  y = jnp.asarray(np.where(np.arange(4) < 3, pred, (pred + 1) % 3))
  loss = lambda p: reg.deep_defense_regulariser(lambda v: _mlp(p, v), x, y)
  value, g = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  for name, leaf in g.items():
    assert np.all(np.isfinite(leaf)), name
    assert float(jnp.sum(jnp.abs(leaf))) > 0, name


# --- ADP -------------------------------------------------------------------------------------

def test_ensemble_entropy_is_the_entropy_of_the_mean_prediction():
  probs = jnp.array([[[0.5, 0.5, 0.0]], [[0.5, 0.0, 0.5]]])  # mean (0.5, 0.25, 0.25)
  np.testing.assert_allclose(reg.ensemble_entropy(probs), [1.5 * math.log(2)], rtol=1e-6)


def _np_log_det(probs, labels, eps=1e-6):
  """The reference recipe in float64: delete the true class, normalise, log det(G + eps I)."""
  probs = np.asarray(probs, np.float64)
  out = []
  for n, y in enumerate(labels):
    m = np.delete(probs[:, n], y, axis=-1)                      # (M, K-1)
    m = m / np.linalg.norm(m, axis=-1, keepdims=True)
    out.append(np.linalg.slogdet(m @ m.T + eps * np.eye(len(m)))[1])
  return np.array(out)


def test_log_det_diversity_extremes_and_reference_values():
  members, k = 3, 5
  ortho = np.zeros((members, 1, k), np.float32)
  for m in range(members):
    ortho[m, 0, 0], ortho[m, 0, m + 1] = 0.6, 0.4             # true class 0, disjoint rest
  best = float(reg.log_det_diversity(jnp.asarray(ortho), jnp.array([0]))[0])
  np.testing.assert_allclose(best, members * math.log1p(1e-6), rtol=0.1)
  same = jnp.asarray(np.repeat(ortho[:1], members, axis=0))
  worst = float(reg.log_det_diversity(same, jnp.array([0]))[0])
  np.testing.assert_allclose(worst, math.log(members + 1e-6) + (members - 1) * math.log(1e-6),
                             atol=0.1)
  rng = np.random.default_rng(10)
  probs = rng.dirichlet(np.ones(k), size=(members, 4)).astype(np.float32)
  labels = np.array([0, 4, 2, 2])
  got = np.asarray(reg.log_det_diversity(jnp.asarray(probs), jnp.asarray(labels)))
  np.testing.assert_allclose(got, _np_log_det(probs, labels), rtol=1e-4)
  assert np.all(got < best) and np.all(got > worst)
  # only the direction of the non-true predictions matters
  rescaled = probs.copy()
  rescaled[:, :, 1:] *= 0.3
  np.testing.assert_allclose(reg.log_det_diversity(jnp.asarray(rescaled), jnp.zeros(4, int)),
                             reg.log_det_diversity(jnp.asarray(probs), jnp.zeros(4, int)),
                             rtol=1e-4)


def test_adp_loss_combination_and_member_gradients():
  rng = np.random.default_rng(11)
  logits = jnp.asarray(rng.normal(size=(3, 4, 5)) * 2, jnp.float32)
  labels = jnp.array([1, 0, 4, 2])
  log_p = _np_log_softmax(logits)
  ce = -np.sum(np.mean(log_p[:, np.arange(4), np.asarray(labels)], axis=-1))
  p = np.exp(log_p)
  mean = p.mean(0)
  ee = np.mean(-np.sum(mean * np.log(mean), -1))
  ld = np.mean(_np_log_det(p, np.asarray(labels)))
  loss, metrics = jax.jit(reg.adp_loss)(logits, labels)
  np.testing.assert_allclose(loss, ce - 2.0 * ee - 0.5 * ld, rtol=1e-4)
  np.testing.assert_allclose(metrics['ce'], ce, rtol=1e-5)
  np.testing.assert_allclose(metrics['ensemble_entropy'], ee, rtol=1e-5)
  np.testing.assert_allclose(metrics['log_det'], ld, rtol=1e-4)
  # alpha = beta = 0: independent members, each gradient (softmax - onehot) / N
  g0 = jax.jit(jax.grad(lambda z: reg.adp_loss(z, labels, alpha=0.0, beta=0.0)[0]))(logits)
  np.testing.assert_allclose(g0, (p - np.eye(5)[np.asarray(labels)][None]) / 4, rtol=1e-4,
                             atol=1e-7)
  # the ensemble terms couple the members: their extra gradients differ member to member
  g = jax.jit(jax.grad(lambda z: reg.adp_loss(z, labels)[0]))(logits)
  extra = np.asarray(g - g0)
  assert np.all(np.isfinite(extra))
  for a, b in ((0, 1), (0, 2), (1, 2)):
    assert np.max(np.abs(extra[a] - extra[b])) > 1e-3


# --- Adv-BNN KL ------------------------------------------------------------------------------

def _np_kl(mu, log_sigma, prior):
  mu, log_sigma = np.asarray(mu, np.float64), np.asarray(log_sigma, np.float64)
  s2 = np.exp(2 * log_sigma)
  return np.sum(np.log(prior) - log_sigma + (s2 + mu ** 2) / (2 * prior ** 2) - 0.5)


@pytest.mark.parametrize('mu,log_sigma,prior', [
    ([0.0], [math.log(0.1)], 0.1),
    ([0.3, -1.2, 0.05], [-2.0, 0.1, -0.7], 0.1),
    ([[1.0, 2.0], [-0.5, 0.0]], [[-3.0, -1.0], [0.5, -2.3]], 1.5),
])
def test_gaussian_kl_closed_form(mu, log_sigma, prior):
  got = reg.gaussian_kl(jnp.asarray(mu, jnp.float32), jnp.asarray(log_sigma, jnp.float32), prior)
  want = _np_kl(mu, log_sigma, prior)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gaussian_kl_matches_a_monte_carlo_estimate():
  mu = np.array([0.3, -0.8, 0.0, 1.1])
  log_sigma = np.array([-1.0, -0.3, 0.2, -2.0])
  prior = 0.7
  sigma = np.exp(log_sigma)
  eps = np.asarray(jax.random.normal(jax.random.key(0), (200_000, 4)), np.float64)
  w = mu + sigma * eps
  log_q = -0.5 * eps ** 2 - log_sigma
  log_p = -0.5 * (w / prior) ** 2 - math.log(prior)
  sample = np.sum(log_q - log_p, axis=-1)
  stderr = sample.std() / math.sqrt(len(sample))
  got = float(reg.gaussian_kl(jnp.asarray(mu, jnp.float32), jnp.asarray(log_sigma, jnp.float32),
                              prior))
  assert abs(got - sample.mean()) < 5 * stderr + 1e-4, (got, sample.mean(), stderr)


# --- Parseval --------------------------------------------------------------------------------

def test_parseval_orthonormal_matrices_are_fixed_points():
  q, _ = np.linalg.qr(np.random.default_rng(12).normal(size=(8, 4)))
  for w in (q.T, q):                                            # orthonormal rows / columns
    w = jnp.asarray(w, jnp.float32)
    np.testing.assert_allclose(reg.parseval_retraction(w, 0.1), w, atol=1e-6)


def test_parseval_singular_values_approach_one():
  rng = np.random.default_rng(13)
  u, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  v, _ = np.linalg.qr(rng.normal(size=(7, 5)))
  s = np.array([0.2, 0.5, 0.9, 1.2, 1.45])
  w = jnp.asarray(u @ np.diag(s) @ v.T, jnp.float32)
  once = np.linalg.svd(np.asarray(reg.parseval_retraction(w, 0.1), np.float64), compute_uv=False)
  np.testing.assert_allclose(np.sort(once), np.sort(1.1 * s - 0.1 * s ** 3), rtol=1e-5)
  for _ in range(200):
    w = reg.parseval_retraction(w, 0.1)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(w), compute_uv=False), 1.0, atol=1e-4)


def test_parseval_row_subset_leaves_other_rows_bit_identical():
  w = jnp.asarray(np.random.default_rng(14).normal(size=(10, 6)) * 0.5, jnp.float32)
  out = np.asarray(reg.parseval_retraction(w, 0.2, key=jax.random.key(3), row_fraction=0.25))
  w_np = np.asarray(w)
  changed = np.flatnonzero(np.any(out != w_np, axis=-1))
  assert len(changed) == math.ceil(0.25 * 10)
  same = np.setdiff1d(np.arange(10), changed)
  assert np.array_equal(out[same], w_np[same])
  sub = w_np[changed].astype(np.float64)
  np.testing.assert_allclose(out[changed], 1.2 * sub - 0.2 * sub @ sub.T @ sub, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError):
    reg.parseval_retraction(w, 0.2, key=jax.random.key(3), row_fraction=0.0)


def test_as_matrix_layouts_and_round_trip():
  rng = np.random.default_rng(15)
  dense = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  m, restore = reg.as_matrix(dense)
  assert np.array_equal(m, np.asarray(dense).T)
  assert np.array_equal(restore(m), dense)
  conv = jnp.asarray(rng.normal(size=(2, 3, 4, 6)), jnp.float32)
  m, restore = reg.as_matrix(conv)
  assert m.shape == (6, 2 * 3 * 4)
  for o in range(6):
    assert np.array_equal(m[o], np.asarray(conv)[..., o].reshape(-1))
  assert np.array_equal(restore(m), conv)
  # a retraction of the filters, written back, is a conv kernel of the same shape
  assert restore(reg.parseval_retraction(m, 0.01)).shape == conv.shape


def test_cross_lipschitz_projections_are_unbiased():
  # Mean of many independent single-projection estimates -> the exact value (and its
  # parameter gradient); each estimate is one VJP.
  params, x = _mlp_params(2), _images(4, seed=5)
  f = lambda p: (lambda v: _mlp(p, v))
  exact = float(reg.cross_lipschitz(f(params), x))
  keys = jax.random.split(jax.random.key(0), 4000)
  est = jax.jit(jax.vmap(lambda k: reg.cross_lipschitz_projected(f(params), x, k)))(keys)
  assert float(jnp.std(est)) > 1e-3 * exact  # random, not the exact value in disguise
  se = float(jnp.std(est)) / np.sqrt(len(keys))
  assert abs(float(jnp.mean(est)) - exact) < 4 * se + 1e-6 * exact
  # 64 projections in one call: closer than one on average
  many = float(reg.cross_lipschitz_projected(f(params), x, jax.random.key(1), projections=64))
  np.testing.assert_allclose(many, exact, rtol=0.25)
  g_exact = jax.grad(lambda p: reg.cross_lipschitz(f(p), x))(params)
  g_est = jax.jit(jax.vmap(jax.grad(
      lambda p, k: reg.cross_lipschitz_projected(f(p), x, k)), in_axes=(None, 0)))(params, keys)
  for name in params:
    mean = np.asarray(jnp.mean(g_est[name], 0))
    se = np.asarray(jnp.std(g_est[name], 0)) / np.sqrt(len(keys))
    scale = float(np.max(np.abs(g_exact[name])))
    assert np.all(np.abs(mean - np.asarray(g_exact[name])) <= 5 * se + 1e-3 * scale), name
  with pytest.raises(ValueError, match='projections'):
    reg.cross_lipschitz_projected(f(params), x, jax.random.key(0), projections=0)
