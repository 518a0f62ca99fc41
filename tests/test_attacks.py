"""Properties and known answers of defendpp_jax.attacks on tiny models.

Run: JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache python -m pytest -q tests/test_attacks.py
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defendpp_jax import attacks

N = 4
SHAPE = (N, 8, 8, 1)
D = 64
TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Tiny models.


class TinyConvNet(nn.Module):
  """Two 3x3 convs of width 4 and a linear head."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class TinyBNNet(nn.Module):
  """Conv -> BatchNorm -> ReLU -> Dense, with a train/inference switch."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(nn.relu(x).reshape(x.shape[0], -1))


@functools.lru_cache(maxsize=None)
def conv_model():
  params = TinyConvNet().init(jax.random.key(0), jnp.zeros(SHAPE))
  return functools.partial(TinyConvNet().apply, params)


def random_images(seed=1):
  # Some pixels exactly 0 or 1, as in real images: the box constraint then binds.
  u = jax.random.uniform(jax.random.key(seed), SHAPE, minval=-0.2, maxval=1.2)
  return jnp.clip(u, 0.0, 1.0)


def linear_binary(seed=0):
  """logits = x @ W + b with 2 classes; margin z_0 - z_1 = w . x, ||w||_2 = 1.

  Inputs are built so each example has a chosen margin of either sign (label = predicted class)
  and sits well inside [0, 1], so neither the L-inf nor the minimal L2 answer touches the box.
  """
  rng = np.random.default_rng(seed)
  w = rng.normal(size=D)
  w -= w.mean()  # w . 0.5 = 0: margins are set by the offsets below alone
  w /= np.linalg.norm(w)
  margins = np.array([0.5, -0.4, 0.6, -0.7])
  x = 0.5 + rng.uniform(-0.08, 0.08, size=(N, D))
  x += (margins - x @ w)[:, None] * w[None, :]
  W = np.stack([w / 2, -w / 2], axis=1).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ W
  x = jnp.asarray(x.reshape(SHAPE), jnp.float32)
  y = jnp.asarray((margins < 0).astype(np.int32))
  return logits_fn, x, y, w, margins


def numpy_norms(a, ord_):
  return np.linalg.norm(np.asarray(a).reshape(a.shape[0], -1), ord=ord_, axis=1)


# ---------------------------------------------------------------------------------------------
# Box and ball constraints.

# (name, kwargs, norm checked, radius); few steps: only the constraints are under test here.
BOUNDED = [
    ('fgsm', dict(eps=0.1), np.inf, 0.1),
    ('bim', dict(eps=0.1, step_size=0.03, num_steps=3), np.inf, 0.1),
    ('pgd', dict(eps=0.1, step_size=0.05, num_steps=3, restarts=2), np.inf, 0.1),
    ('pgd', dict(eps=0.5, step_size=0.3, num_steps=3, norm='l2'), 2, 0.5),
    ('apgd', dict(eps=0.1, num_steps=5), np.inf, 0.1),
    ('apgd', dict(eps=0.5, num_steps=5, norm='l2', loss='dlr'), 2, 0.5),
    ('ddn', dict(num_steps=5, max_norm=0.3), 2, 0.3),
    ('cw_l2', dict(binary_search_steps=2, num_steps=3), None, None),
]


def _call(name, logits_fn, x, y, kwargs, key=jax.random.key(3)):
  kwargs = dict(kwargs)
  if name in ('pgd', 'apgd'):
    kwargs['key'] = key
  return getattr(attacks, name)(logits_fn, x, y, **kwargs)


@pytest.mark.parametrize('name,kwargs,ord_,radius', BOUNDED,
                         ids=[f'{b[0]}-{i}' for i, b in enumerate(BOUNDED)])
def test_box_and_ball(name, kwargs, ord_, radius):
  logits_fn = conv_model()
  x = random_images()
  y = jnp.arange(N) % 10
  x_adv = jax.jit(lambda x, y: _call(name, logits_fn, x, y, kwargs))(x, y)
  chex.assert_shape(x_adv, SHAPE)
  chex.assert_tree_all_finite(x_adv)
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  if ord_ is not None:
    assert np.all(numpy_norms(x_adv - x, ord_) <= radius + TOL)


def test_pgd_one_step_equals_fgsm():
  logits_fn = conv_model()
  x, y = random_images(), jnp.arange(N) % 10
  x_fgsm = attacks.fgsm(logits_fn, x, y, eps=0.1)
  x_pgd = attacks.pgd(logits_fn, x, y, eps=0.1, step_size=0.1, num_steps=1, key=None,
                      random_start=False)
  x_bim = attacks.bim(logits_fn, x, y, eps=0.1, step_size=0.1, num_steps=1)
  chex.assert_trees_all_close(x_pgd, x_fgsm, atol=0, rtol=0)
  chex.assert_trees_all_close(x_bim, x_fgsm, atol=0, rtol=0)
  assert np.any(np.asarray(x_fgsm) != np.asarray(x))  # the step did something


def test_pgd_restarts_keep_fooling_or_highest_loss_restart():
  logits_fn = conv_model()
  x, y = random_images(), jnp.argmax(conv_model()(random_images()), -1)
  kw = dict(eps=0.03, step_size=0.01, num_steps=2)
  key = jax.random.key(5)
  combined = attacks.pgd(logits_fn, x, y, key=key, restarts=3, **kw)
  runs = [attacks.pgd(logits_fn, x, y, key=k, **kw) for k in jax.random.split(key, 3)]
  fooled = np.stack([np.asarray(attacks.is_adversarial(logits_fn(r), y)) for r in runs])
  loss = np.stack([np.asarray(attacks.ce_loss(logits_fn(r), y)) for r in runs])
  # Lexicographic best (fooled, loss) per example.
  pick = np.lexsort((-loss, -fooled.astype(int)), axis=0)[0]
  expected = np.stack([np.asarray(runs[r][i]) for i, r in enumerate(pick)])
  np.testing.assert_allclose(np.asarray(combined), expected, atol=1e-6)


def test_vmap_over_eps_and_per_example_eps():
  logits_fn = conv_model()
  x, y = random_images(), jnp.arange(N) % 10
  epss = jnp.array([0.0, 0.05, 0.2])
  x_adv = jax.vmap(lambda e: attacks.fgsm(logits_fn, x, y, eps=e))(epss)
  for e, xa in zip(np.asarray(epss), x_adv):
    assert np.all(numpy_norms(xa - x, np.inf) <= e + TOL)
  per_example = jnp.array([0.0, 0.1, 0.2, 0.3])
  x_adv = attacks.pgd(logits_fn, x, y, eps=per_example, step_size=0.1, num_steps=2,
                      key=jax.random.key(0), norm='l2')
  assert np.all(numpy_norms(x_adv - x, 2) <= np.asarray(per_example) + TOL)


# ---------------------------------------------------------------------------------------------
# Known answers on a linear classifier.

LINF = [
    ('fgsm', dict(eps=0.1)),
    ('bim', dict(eps=0.1, step_size=0.03, num_steps=5)),
    ('pgd', dict(eps=0.1, step_size=0.05, num_steps=5)),
    ('apgd', dict(eps=0.1, num_steps=5)),
]


@pytest.mark.parametrize('name,kwargs', LINF, ids=[a[0] for a in LINF])
def test_linear_linf_optimum(name, kwargs):
  logits_fn, x, y, w, margins = linear_binary()
  eps = kwargs['eps']
  x_adv = _call(name, logits_fn, x, y, kwargs)
  # Optimum: move every pixel by eps against the sign of w_y - w_other (= +-w).
  w_y = np.where(np.asarray(y)[:, None] == 0, w, -w).reshape(SHAPE)
  expected = np.asarray(x) - eps * np.sign(w_y)
  assert 0.0 < expected.min() and expected.max() < 1.0  # the box does not bind
  np.testing.assert_allclose(np.asarray(x_adv), expected, atol=1e-6)
  logits = np.asarray(logits_fn(x_adv))
  margin_y = np.where(np.asarray(y) == 0, 1, -1) * (logits[:, 0] - logits[:, 1])
  np.testing.assert_allclose(margin_y, np.abs(margins) - eps * np.abs(w).sum(), atol=1e-5)


MIN_NORM = [
    ('cw_l2', dict(binary_search_steps=9, num_steps=100)),
    ('ddn', dict(num_steps=100, quantize=False)),
    ('ddn', dict(num_steps=100, quantize=True)),
]


@pytest.mark.parametrize('name,kwargs', MIN_NORM, ids=['cw', 'ddn', 'ddn-quantized'])
def test_linear_minimal_l2(name, kwargs):
  logits_fn, x, y, w, margins = linear_binary()
  x_adv = jax.jit(lambda x, y: _call(name, logits_fn, x, y, kwargs))(x, y)
  d_star = np.abs(margins)  # |margin| / ||w_y - w_other||_2 with ||w||_2 = 1
  x_min = np.asarray(x).reshape(N, D) - margins[:, None] * w[None, :]  # analytic answer
  assert 0.0 < x_min.min() and x_min.max() < 1.0  # the box does not bind
  d = numpy_norms(x_adv - x, 2)
  assert np.all(np.asarray(attacks.is_adversarial(logits_fn(x_adv), y)))
  assert np.all(d >= d_star * (1 - 1e-4)), (d, d_star)  # nothing beats the analytic optimum
  assert np.all(d <= 1.1 * d_star), (d, d_star)


def test_targeted_on_linear_model():
  # 4 classes, each one the sum of its own 16-pixel block: target t wins once its block is
  # raised and the others lowered, which a large L-inf ball allows.
  k = 4
  W = np.kron(np.eye(k), np.ones((D // k, 1))).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ W
  x = jax.random.uniform(jax.random.key(0), SHAPE, minval=0.4, maxval=0.6)
  y = jnp.argmax(logits_fn(x), -1)
  target = (y + 1) % k
  key = jax.random.key(1)
  runs = {
      'pgd': attacks.pgd(logits_fn, x, y, eps=0.3, step_size=0.1, num_steps=5, key=key,
                         target=target),
      'fgsm-small-eps': attacks.fgsm(logits_fn, x, y, eps=0.001, target=target),
      'apgd-ce': attacks.apgd(logits_fn, x, y, eps=0.3, num_steps=5, key=key, target=target),
      'apgd-dlr': attacks.apgd(logits_fn, x, y, eps=0.3, num_steps=5, key=key, loss='dlr',
                               target=target),
      'cw': attacks.cw_l2(logits_fn, x, y, target=target),
      'ddn': attacks.ddn(logits_fn, x, y, num_steps=20, target=target),
  }
  for name, x_adv in runs.items():
    pred = np.asarray(jnp.argmax(logits_fn(x_adv), -1))
    if name == 'fgsm-small-eps':  # sanity: a too-small budget does not reach the target
      assert not np.all(pred == np.asarray(target)), name
    else:
      np.testing.assert_array_equal(pred, np.asarray(target), err_msg=name)


# ---------------------------------------------------------------------------------------------
# Minimal-norm attacks return the best iterate, not the last.


def _recording(logits_fn):
  """logits_fn that also records every (input, logits) it is evaluated on, inside jit/grad."""
  seen = []

  def fn(z):
    logits = logits_fn(z)
    jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), z, logits)
    return logits

  return fn, seen


def _best_seen(seen, x, y):
  """Per example, the smallest L2 distance of any adversarial point evaluated (inf if none)."""
  best = np.full((x.shape[0],), np.inf)
  for z, logits in seen:
    adv = logits.argmax(-1) != np.asarray(y)
    best = np.where(adv, np.minimum(best, numpy_norms(z - x, 2)), best)
  return best


def test_ddn_returns_best_iterate_when_last_is_not_adversarial():
  # Class 1 wins only in the shell 1.03 < ||x' - x|| < 1.06. DDN (init_norm 1, gamma 0.05)
  # alternates 1.05 (adversarial), 0.9975, 1.047, ... until the upper value drops below 1.03;
  # the norm then only grows and every later iterate, the last included, misses the shell.
  x = jnp.full(SHAPE, 0.5)
  y = jnp.zeros((N,), jnp.int32)
  r1, r2 = 1.03, 1.06

  def shell(z):
    d2 = jnp.sum(jnp.square(z - x), axis=(1, 2, 3))
    s = 100.0 * ((r2**2 - r1**2) / 2 - jnp.abs(d2 - (r1**2 + r2**2) / 2))
    return jnp.stack([jnp.zeros_like(s), s], axis=-1)

  logits_fn, seen = _recording(shell)
  x_adv = jax.jit(lambda x, y: attacks.ddn(logits_fn, x, y, num_steps=40, quantize=False))(x, y)
  jax.effects_barrier()
  d = numpy_norms(x_adv - x, 2)
  assert np.all(np.asarray(jnp.argmax(shell(x_adv), -1)) == 1)
  assert np.all((r1 < d) & (d < r2)), d
  np.testing.assert_allclose(d, _best_seen(seen, x, y), rtol=1e-5)
  assert max(numpy_norms(z - x, 2).max() for z, _ in seen) > 2 * r2  # iterates did leave


@pytest.mark.parametrize('name', ['cw_l2', 'ddn'])
def test_minimal_norm_attacks_return_smallest_adversarial_seen(name):
  logits_fn, seen = _recording(conv_model())
  x = random_images()
  y = jnp.argmax(conv_model()(x), -1)
  # Budgets large enough that every example is fooled at some iterate, small enough to be fast.
  if name == 'cw_l2':
    kwargs = dict(binary_search_steps=4, num_steps=10, lr=0.05, initial_const=1.0)
  else:
    kwargs = dict(num_steps=15, init_norm=0.5)
  x_adv = jax.jit(lambda x, y: getattr(attacks, name)(logits_fn, x, y, **kwargs))(x, y)
  jax.effects_barrier()
  best = _best_seen(seen, np.asarray(x), y)
  assert np.all(np.isfinite(best)), 'test needs every example fooled at some iterate'
  assert np.all(np.asarray(attacks.is_adversarial(conv_model()(x_adv), y)))
  np.testing.assert_allclose(numpy_norms(x_adv - x, 2), best, rtol=1e-5, atol=1e-6)


def test_unfooled_examples_come_back_unchanged():
  # A constant model cannot be fooled: C&W and DDN must return x itself.
  logits_fn = lambda z: jnp.broadcast_to(jnp.array([5.0, 0.0]), (z.shape[0], 2)) + 0 * z.sum()
  x, y = random_images(), jnp.zeros((N,), jnp.int32)
  for x_adv in (attacks.cw_l2(logits_fn, x, y, binary_search_steps=2, num_steps=3),
                attacks.ddn(logits_fn, x, y, num_steps=5, max_norm=1.0)):
    chex.assert_trees_all_close(x_adv, x, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Inference mode, compilation, pieces.


def test_attacks_see_inference_mode_batchnorm():
  """Attacks only ever see `logits_fn`; the caller binds train=False (running statistics).

  With running statistics far from the batch statistics, train-mode and inference-mode
  predictions differ, so PGD with eps = 0 reproducing the clean inference-mode accuracy shows
  the attacked function is the inference-mode one (the torchattacks#124 pitfall).
  """
  model = TinyBNNet()
  x = random_images()
  variables = model.init(jax.random.key(0), x, train=False)
  variables = {
      'params': variables['params'],
      'batch_stats': jax.tree.map(lambda s: s + 3.0, variables['batch_stats']),
  }
  logits_fn = functools.partial(model.apply, variables, train=False)
  y = jnp.argmax(logits_fn(x), -1).at[0].add(1) % 10  # clean accuracy 3/4
  clean_acc = float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))
  train_logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(train_logits, logits_fn(x), atol=1e-3)  # the two modes differ
  x_adv = attacks.pgd(logits_fn, x, y, eps=0.0, step_size=0.1, num_steps=3,
                      key=jax.random.key(0))
  chex.assert_trees_all_close(x_adv, x, atol=0, rtol=0)
  assert float(jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == y)) == clean_acc == 0.75


COMPILE = [
    ('fgsm', dict(eps=0.1)),
    ('bim', dict(eps=0.1, step_size=0.05, num_steps=2)),
    ('pgd', dict(eps=0.1, step_size=0.05, num_steps=2, restarts=2)),
    ('apgd', dict(eps=0.1, num_steps=3, loss='dlr')),
    ('cw_l2', dict(binary_search_steps=2, num_steps=2)),
    ('ddn', dict(num_steps=3, max_norm=1.0)),
]


@pytest.mark.parametrize('name,kwargs', COMPILE, ids=[a[0] for a in COMPILE])
def test_compiles_once(name, kwargs):
  chex.clear_trace_counter()
  logits_fn = conv_model()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(x, y, key):
    kw = dict(kwargs, key=key) if name in ('pgd', 'apgd') else kwargs
    return getattr(attacks, name)(logits_fn, x, y, **kw)

  y = jnp.arange(N) % 10
  run(random_images(1), y, jax.random.key(0))
  run(random_images(2), (y + 1) % 10, jax.random.key(1))  # new values, same shapes


def test_apgd_checkpoints_match_paper():
  # p_j = 0, .22, .41, .57, .70, .80, .87, .93, .99 -> checkpoints after iterations 22, 41, ...
  windows = attacks.apgd_checkpoints(100)
  np.testing.assert_array_equal(np.nonzero(windows)[0] + 1, [22, 41, 57, 70, 80, 87, 93, 99])
  np.testing.assert_array_equal(windows[np.nonzero(windows)], [22, 19, 16, 13, 10, 7, 6, 6])


def test_dlr_loss_is_shift_and_scale_invariant():
  logits = jax.random.normal(jax.random.key(0), (N, 10))
  y = jnp.arange(N)
  for target in (None, (y + 3) % 10):
    chex.assert_trees_all_close(attacks.dlr_loss(logits, y, target),
                                attacks.dlr_loss(7.0 * logits - 2.0, y, target), rtol=1e-4)


def test_projections_are_per_example():
  x = jnp.zeros((2, 2, 2, 1))
  x_adv = jnp.stack([jnp.full((2, 2, 1), 0.1), jnp.full((2, 2, 1), 2.0)])
  out = attacks.project_l2(x_adv, x, 1.0)
  # The first example (norm 0.2) is untouched, the second (norm 4) is scaled to norm 1.
  chex.assert_trees_all_close(out[0], x_adv[0])
  np.testing.assert_allclose(numpy_norms(out, 2), [0.2, 1.0], rtol=1e-6)
  chex.assert_trees_all_close(attacks.project_linf(x_adv, x, 0.5)[1], jnp.full((2, 2, 1), 0.5))
