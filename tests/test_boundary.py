"""FAB-T (attacks/boundary.py): the box-constrained hyperplane projection against a linear
programme / quadratic programme solved by SciPy, and the attack's distance on linear models
against the analytic minimal distance to misclassification.

Run: JAX_COMPILATION_CACHE_DIR=.cache/jax python -m pytest -q tests/test_boundary.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from defendpp_jax import attacks
from defendpp_jax.attacks import boundary
from test_attacks import numpy_norms


def _reference(p, w, c, norm):
  """min ||d|| s.t. w . d = c, 0 <= p + d <= 1, by SciPy (L-inf: a linear programme)."""
  dim = p.size
  bounds = list(zip(-p, 1 - p))
  if norm == 'linf':  # variables (d, t): min t, -t <= d_i <= t
    cost = np.r_[np.zeros(dim), 1.0]
    a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
    res = optimize.linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * dim),
                           A_eq=np.r_[w, 0.0][None], b_eq=[c], bounds=bounds + [(0, None)])
    assert res.status == 0
    return res.fun
  res = optimize.minimize(lambda d: d @ d, np.zeros(dim), jac=lambda d: 2 * d, bounds=bounds,
                          constraints=[{'type': 'eq', 'fun': lambda d: w @ d - c,
                                        'jac': lambda d: w}], method='SLSQP',
                          options={'ftol': 1e-14, 'maxiter': 500})
  assert res.success
  return np.sqrt(res.fun)


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_hyperplane_step_is_the_minimal_norm_step_in_the_box(norm):
  rng = np.random.default_rng(0)
  n, dim = 12, 7
  p = rng.uniform(0, 1, (n, dim))
  p[:, 0] = 0.0  # on the box's faces: the box binds
  p[:, 1] = 1.0
  w = rng.normal(size=(n, dim))
  w[:, 2] = 0.0  # a coordinate the constraint ignores
  sign = rng.choice([-1.0, 1.0], n)
  ws = w * sign[:, None]  # the direction the step must go
  room = np.where(ws > 0, 1 - p, np.where(ws < 0, p, 0)) * np.abs(w)
  # reachable targets of either sign, some needing the box to saturate coordinates
  c = rng.uniform(0.05, 0.9, n) * room.sum(1) * sign
  d = np.asarray(boundary.hyperplane_step(jnp.asarray(p, jnp.float32),
                                          jnp.asarray(w, jnp.float32),
                                          jnp.asarray(c, jnp.float32), norm))
  np.testing.assert_allclose((w * d).sum(1), c, rtol=1e-4, atol=1e-5)
  assert np.all(p + d >= -1e-6) and np.all(p + d <= 1 + 1e-6)
  got = numpy_norms(d, np.inf if norm == 'linf' else 2)
  want = np.array([_reference(p[i], w[i], c[i], norm) for i in range(n)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Unreachable inside the box: as far toward the hyperplane as the box allows.
  far = np.asarray(boundary.hyperplane_step(jnp.asarray(p, jnp.float32),
                                            jnp.asarray(w, jnp.float32),
                                            jnp.asarray(2 * c / np.abs(c) * room.sum(1), jnp.float32), norm))
  np.testing.assert_allclose((w * far).sum(1), sign * room.sum(1), rtol=1e-4)
  zero = boundary.hyperplane_step(jnp.asarray(p), jnp.asarray(w), jnp.zeros(n), norm)
  assert float(jnp.abs(zero).max()) == 0.0


def _linear_multiclass(seed=0, k=10, dim=64, n=6):
  """logits = x @ W + b, inputs around 0.5 and small margins: the box never binds."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(dim, k)).astype(np.float32)
  x = rng.uniform(0.45, 0.55, (n, dim)).astype(np.float32)
  y = rng.integers(0, k, n)
  logits = x @ w
  # shift so y leads every other class by 0.5-2 logits
  bias = np.zeros((n, k), np.float32)
  for i in range(n):
    bias[i] = -logits[i] + rng.uniform(0.0, 1.5, k)
    bias[i, y[i]] = -logits[i, y[i]] + 2.0
  def logits_fn(z):
    return z.reshape(z.shape[0], -1) @ w + bias[:z.shape[0]]
  return logits_fn, jnp.asarray(x.reshape(n, 8, 8, 1)), jnp.asarray(y), w, x @ w + bias


@pytest.mark.parametrize('norm', ['linf', 'l2'])
def test_fab_t_finds_the_minimal_distance_on_a_linear_model(norm):
  logits_fn, x, y, w, logits = _linear_multiclass()
  dual = 1 if norm == 'linf' else 2  # the dual norm of the boundary's normal
  y_np = np.asarray(y)
  dist = []
  for i in range(len(y_np)):
    gaps = [(logits[i, y_np[i]] - logits[i, t]) /
            np.linalg.norm(w[:, y_np[i]] - w[:, t], ord=dual)
            for t in range(w.shape[1]) if t != y_np[i]]
    dist.append(min(gaps))
  dist = np.array(dist)
  # the box [0, 1] is 0.45 away from every pixel: the minimal step never reaches it
  assert np.all(dist < 0.3)
  ord_ = np.inf if norm == 'linf' else 2
  fab = jax.jit(lambda x, y, eps: attacks.fab_targeted(logits_fn, x, y, eps=eps, num_steps=20,
                                                       key=jax.random.key(0), norm=norm))
  x_adv = fab(x, y, 1.0)
  found = numpy_norms(x_adv - x, ord_)
  assert np.all(np.asarray(attacks.is_adversarial(logits_fn(x_adv), y)))
  assert np.all(found >= dist * (1 - 1e-3))   # never closer than the true minimum
  assert np.all(found <= dist * 1.06)         # and within FAB's overshoot of it
  # Bounded by eps: an example is broken only if its closest point is within eps.
  eps = float(np.median(dist))
  x_eps = fab(x, y, eps)
  broken = np.asarray(attacks.is_adversarial(logits_fn(x_eps), y))
  assert np.all(numpy_norms(x_eps - x, ord_) <= eps + 1e-6)
  assert not np.any(broken[dist > eps])
  assert np.all(broken[dist * 1.06 < eps])
  assert float(x_eps.min()) >= 0 and float(x_eps.max()) <= 1
  with pytest.raises(ValueError, match='num_targets'):
    attacks.fab_targeted(logits_fn, x, y, eps=0.1, num_steps=2, key=jax.random.key(0),
                         num_targets=10)
