"""Attacker views (exact / BPDA / EOT), their diagnostics, and the pieces around them.

Properties and known answers on toy models whose answers are known in closed form: EOT against
the Gauss-Hermite expectation of a noisy linear model, EOT against zero-mean gradient noise,
BPDA through a hard quantiser against the analytic worst case, the AutoAttack-style
diagnostics, Auto-PGD's checkpoint rule against a transcription of auto-attack's, attack
entries, the losses of the L-inf attacks, C&W's early abort, freezing, config migration and
the draws of a randomised defence.

Run: JAX_COMPILATION_CACHE_DIR=.cache/jax python -m pytest -q tests/test_views.py
"""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.polynomial import hermite_e

from defendpp_jax import attacks
from defendpp_jax import defences
from defendpp_jax.attacks import specs
from defendpp_jax.evaluation import diagnostics
from defendpp_jax.evaluation import runner
from defendpp_jax.runs import config as config_lib
from defendpp_jax.training import optim


def rbg_key(seed):
  """A key of the 'rbg' implementation, whose draws inside attack loops compile several times
  faster on XLA:CPU than threefry's (keeps the file quick). Unlike threefry's, its draws under
  vmap differ from those of a loop over the same keys: same distribution, other values."""
  return jax.random.key(seed, impl='rbg')


def check_named(checks, start):
  """The one check whose name starts with `start` (or contains it, for mid-name phrases)."""
  found = [c for c in checks if c['name'].startswith(start) or start in c['name']]
  assert len(found) == 1, ([c['name'] for c in checks], start)
  return found[0]


def sigmoid(u):
  return 1.0 / (1.0 + np.exp(-u))


# ---------------------------------------------------------------------------------------------
# 1. EOT converges to the analytic expected gradient of a noisy linear model.

EOT_N, EOT_D = 8, 4


def noisy_linear(s=1.0, seed=0):
  """z = W (x + s n) + b, n ~ N(0, I) per example and pixel, 2 classes, as a Defence."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(2, EOT_D)).astype(np.float32)
  b = np.array([0.3, -0.2], np.float32)

  def logits_fn(x, key):
    flat = x.reshape(x.shape[0], -1)
    noisy = flat + s * jax.random.normal(key, flat.shape, flat.dtype)
    return noisy @ w.T + b

  x = rng.uniform(0.0, 1.0, size=(EOT_N, 2, 2, 1)).astype(np.float32)
  y = (np.arange(EOT_N) % 2).astype(np.int32)
  return defences.from_logits_fn(logits_fn, randomised=True), w, b, s, x, y


def expected_ce_gradient(w, b, s, x, y):
  """(E[grad_x CE], Var[softmax_1]) per example, by 100-node Gauss-Hermite quadrature.

  grad_x CE = W^T (softmax(z) - onehot(y)) with softmax_1 = sigmoid(u),
  u = (w1 - w0).(x + s n) + b1 - b0 ~ N(mu, s^2 ||w1 - w0||^2).
  """
  nodes, weights = hermite_e.hermegauss(100)
  weights = weights / math.sqrt(2 * math.pi)  # E over N(0, 1)
  w, b = w.astype(np.float64), b.astype(np.float64)
  dw = w[1] - w[0]
  mu = x.reshape(len(x), -1).astype(np.float64) @ dw + (b[1] - b[0])
  sigma = s * np.linalg.norm(dw)
  sig = sigmoid(mu[:, None] + sigma * nodes[None, :])
  p = sig @ weights
  var = (sig ** 2) @ weights - p ** 2
  grad = w[0][None] + p[:, None] * dw[None] - w[y]
  return grad, var, dw


def eot_gradient(defence, x, y, key, k, chunk):
  model = defence.attack_model('eot', eot_samples=k, eot_chunk=chunk)
  assert model.eot_samples == k and model.randomised
  fn = jax.jit(lambda x, key: model.value_and_grad(attacks.objective('ce', y), x, key)[2])
  return np.asarray(fn(jnp.asarray(x), key), np.float64).reshape(len(x), -1)


def test_eot_gradient_converges_to_gauss_hermite_expectation():
  defence, w, b, s, x, y = noisy_linear()
  expected, var, dw = expected_ce_gradient(w, b, s, x, y)
  assert np.all(var > 1e-3)  # the single-draw gradient really is random
  z = {}
  for k, chunk in ((4, 4), (1024, 128)):
    zs = []
    for seed in range(4):
      err = eot_gradient(defence, x, y, rbg_key(seed), k, chunk) - expected
      # Every draw's error is (p_hat - p) (w1 - w0): along w1 - w0, nothing orthogonal to it.
      along = err @ dw / (dw @ dw)
      np.testing.assert_allclose(err, along[:, None] * dw[None], atol=1e-5)
      zs.append(along / np.sqrt(var / k))  # standardised: mean 0, variance 1 (exactly)
    z[k] = np.concatenate(zs)
  # The mean squared error falls as 1 / k: by 256x from k = 4 to 1024 in expectation; 32
  # (input, key) pairs make a 16x margin certain.
  mse = {k: np.mean(v ** 2 * np.tile(var, 4) / k) for k, v in z.items()}
  assert mse[1024] < mse[4] / 16, mse
  # At k = 1024 (CLT), every error within 5 standard errors, and their mean square ~ 1 (an
  # average of 32 squared standard normals is < 3 with probability 1 - 1e-7).
  assert np.max(np.abs(z[1024])) < 5.0, z[1024]
  assert np.mean(z[1024] ** 2) < 3.0, z[1024]


def test_eot_chunk_does_not_change_the_average():
  defence, _, _, _, x, y = noisy_linear()
  key = jax.random.key(7)  # threefry: vmapped draws equal looped ones (not so for 'rbg')
  grads = [eot_gradient(defence, x, y, key, 12, chunk) for chunk in (1, 5, 12)]
  for g in grads[1:]:
    np.testing.assert_allclose(g, grads[0], rtol=1e-5, atol=1e-6)


def test_eot_memory_does_not_grow_with_the_number_of_chunks():
  # The chunks run one after another and reuse one chunk's temporaries: a deep, wide
  # randomised net (each draw's activations ~1.5 MB, its gradient 4 KB) attacked with EOT-8
  # in chunks of one draw needs about what EOT-2 needs, not 4x.
  layers = [jax.random.normal(jax.random.key(i), (16 if i == 0 else 1024, 1024)) / 32
            for i in range(6)]

  def logits_fn(z, key):
    h = z.reshape(len(z), -1) * (1 + 0.1 * jax.random.normal(key, (16,)))
    for w in layers:
      h = jnp.tanh(h @ w)
    return h[:, :2]

  defence = defences.from_logits_fn(logits_fn, randomised=True)
  x, y = jnp.full((64, 4, 4, 1), 0.5), jnp.zeros((64,), jnp.int32)
  temp = {}
  for k in (2, 8):
    model = defence.attack_model('eot', eot_samples=k, eot_chunk=1)
    fn = jax.jit(lambda x, key, m=model: m.value_and_grad(attacks.objective('ce', y), x, key))
    analysis = fn.lower(x, jax.random.key(0)).compile().memory_analysis()
    if analysis is None:
      pytest.skip('this backend reports no memory analysis')
    temp[k] = analysis.temp_size_in_bytes
  assert temp[8] < 1.5 * temp[2], temp


# ---------------------------------------------------------------------------------------------
# 2. Zero-mean gradient noise: PGD without EOT is fooled, EOT-PGD is not.

NOISE_N, NOISE_SHAPE, NOISE_EPS = 32, (8, 8, 1), 0.1


def noisy_gradient_defence(amplitude=10.0, omega=1000.0):
  """Margin m(x, n) = d.x + A sin(omega n.x) / omega, n ~ N(0, I) per example; logits [0, m].

  |m - d.x| <= A / omega = 0.01: the values barely move, but the input gradient
  d + A cos(omega n.x) n is dominated by noise of mean zero (Stein: E[n cos(omega n.x)] =
  -omega x E[sin(omega n.x)] = 0), so the expected gradient is d.
  Every example has |d.x| = 0.6 eps ||d||_1: the analytic worst case over the eps-ball (the
  inputs are interior) moves the margin by eps ||d||_1 and flips every one of them.
  """
  rng = np.random.default_rng(0)
  dim = math.prod(NOISE_SHAPE)
  d = rng.choice([-1.0, 1.0], size=dim)
  sign = np.where(np.arange(NOISE_N) % 2 == 0, 1.0, -1.0)
  c = 0.6 * NOISE_EPS * np.abs(d).sum()
  x = rng.uniform(0.3, 0.7, size=(NOISE_N, dim))
  x += ((sign * c - x @ d) / (d @ d))[:, None] * d[None, :]
  y = (sign > 0).astype(np.int32)
  dj = jnp.asarray(d, jnp.float32)

  def logits_fn(z, key):
    flat = z.reshape(z.shape[0], -1)
    n = jax.random.normal(key, flat.shape, flat.dtype)
    m = flat @ dj + amplitude * jnp.sin(omega * jnp.sum(n * flat, -1)) / omega
    return jnp.stack([jnp.zeros_like(m), m], -1)

  images = x.reshape((NOISE_N,) + NOISE_SHAPE).astype(np.float32)
  return defences.from_logits_fn(logits_fn, randomised=True), images, y, d


def test_eot_pgd_beats_pgd_on_zero_mean_gradient_noise():
  defence, images, labels, d = noisy_gradient_defence()
  flat = images.reshape(NOISE_N, -1).astype(np.float64)
  assert 0.0 < flat.min() - NOISE_EPS and flat.max() + NOISE_EPS < 1.0  # the box never binds
  margin = (flat @ d) * np.where(labels == 1, 1.0, -1.0)
  worst = margin - NOISE_EPS * np.abs(d).sum()
  assert np.all(margin > 0.05) and np.all(worst < -0.05)  # clean: all right; worst case: none
  spec = specs.make_spec('pgd', eps=NOISE_EPS, steps=20)
  key = rbg_key(0)
  results = {}
  for view, k in (('exact', 1), ('eot', 32)):
    res = runner.run_attack(spec, defence, images, labels, NOISE_N, key, view=view,
                            eot_samples=k, progress=False)
    assert (res.view, res.eot_samples) == (view, k)
    checks = diagnostics.gradient_checks(defence, images, labels, {'pgd': res}, key, view, k)
    results[view] = (res.accuracy, check_named(checks, 'randomised output'))
  acc_exact, random_exact = results['exact']
  acc_eot, random_eot = results['eot']
  assert acc_exact >= 0.75, results  # the single-draw gradient mostly points nowhere
  assert acc_eot <= 0.1, results     # the averaged one finds the worst case
  assert random_exact['passed'] is False and 'without EOT: pgd' in random_exact['name']
  assert random_eot['passed'] is True
  assert 0 < random_exact['value'] <= 2 * 10.0 / 1000.0 + 1e-6  # |m draw 1 - m draw 2|


# ---------------------------------------------------------------------------------------------
# 3. BPDA through a hard quantiser.

Q_LEVELS, Q_N, Q_SHAPE, Q_EPS = 4, 16, (4, 4, 1), 0.2


def quantised_linear(seed=0):
  """round(x L) / L (stand-in: the identity) in front of a 2-class linear classifier."""
  rng = np.random.default_rng(seed)
  dim = math.prod(Q_SHAPE)
  w = rng.normal(size=(dim, 2)).astype(np.float32)

  def quantise(variables, x, key, bpda):
    del variables, key
    hard = jnp.round(x * Q_LEVELS) / Q_LEVELS
    return defences.straight_through(hard, x) if bpda else hard

  pre = defences.Preprocessor('quantise', quantise,
                              stand_ins=(('round(x*4)/4', 'identity'),))
  head = defences.from_logits_fn(lambda x: x.reshape(x.shape[0], -1) @ w, name='linear')
  defence = defences.preprocess(pre, head)
  # Some pixels at 0 and 1 so that the box binds; values whose ball endpoints (or which
  # themselves) fall within 1e-3 of a rounding threshold are redrawn (float rounding could
  # pick either level there).
  x = np.clip(rng.uniform(-0.15, 1.15, size=(Q_N, dim)), 0.0, 1.0).astype(np.float32)
  while True:
    near = np.zeros(x.shape, bool)
    for v in (x - np.float32(Q_EPS), x, x + np.float32(Q_EPS)):
      near |= np.abs((np.clip(v, 0, 1) * Q_LEVELS) % 1.0 - 0.5) < 1e-3
    if not near.any():
      break
    x = np.where(near, rng.uniform(size=x.shape), x).astype(np.float32)
  return defence, w, x


def worst_case_margin(w, x, y, eps, levels):
  """max over the eps-ball in [0, 1] of z_other - z_y with z = W^T q(x'): separable in the
  pixels, and each term a q(x'_i) is monotone in x'_i, so the maximum is at an endpoint."""
  coef = (w[:, 1 - y] - w[:, y]).T.astype(np.float64)       # (N, D)
  lo = np.clip(x - np.float32(eps), 0.0, 1.0)
  hi = np.clip(x + np.float32(eps), 0.0, 1.0)
  end = np.where(coef > 0, hi, lo)
  q = np.round(end.astype(np.float64) * levels) / levels
  return np.sum(coef * q, axis=1), end


def test_bpda_reaches_the_analytic_worst_case_through_a_quantiser():
  defence, w, x = quantised_linear()
  images = x.reshape((Q_N,) + Q_SHAPE)
  q_clean = np.round(x.astype(np.float64) * Q_LEVELS) / Q_LEVELS
  labels = np.argmax(q_clean @ w, axis=1).astype(np.int32)
  worst, end = worst_case_margin(w, x, labels, Q_EPS, Q_LEVELS)
  assert 0 < np.sum(worst > 0) < Q_N  # some examples can be flipped, some cannot
  assert np.min(np.abs(worst)) > 1e-3  # no ties at the decision boundary
  assert np.any(end == 0.0) and np.any(end == 1.0)  # the box binds somewhere

  y = jnp.asarray(labels)
  key = rbg_key(0)
  # The exact view's gradient is zero everywhere: round() is flat almost everywhere.
  exact = defence.attack_model('exact')
  _, _, g = exact.value_and_grad(attacks.objective('margin', y), jnp.asarray(images), None)
  assert np.all(np.asarray(g) == 0)

  # BPDA-PGD with the margin loss attains the analytic maximum of the margin.
  model = defence.attack_model('bpda')
  x_adv = jax.jit(lambda x, y, k: attacks.pgd(model, x, y, eps=Q_EPS, step_size=0.25 * Q_EPS,
                                              num_steps=10, key=k, loss='margin'))(
                                                  jnp.asarray(images), y, key)
  logits = np.asarray(defence.logits(defence.variables, x_adv), np.float64)
  reached = logits[np.arange(Q_N), 1 - labels] - logits[np.arange(Q_N), labels]
  np.testing.assert_allclose(reached, worst, rtol=1e-5, atol=1e-5)

  spec = specs.make_spec('pgd', eps=Q_EPS, steps=10, loss='margin')
  robust = float(np.mean(worst < 0))
  for view in ('exact', 'bpda'):
    res = runner.run_attack(spec, defence, images, labels, Q_N, key, view=view, progress=False)
    checks = diagnostics.gradient_checks(defence, images, labels, {'pgd': res}, key, view)
    zero = check_named(checks, 'fraction of examples with an all-zero input gradient')
    agreement = [c for c in checks if c['name'].startswith('cosine(BPDA, exact)')]
    if view == 'exact':
      assert zero['passed'] is False and zero['value'] == 1.0
      assert not agreement  # no BPDA row, nothing to compare
      assert res.accuracy > robust  # no gradient, no progress beyond the random start
    else:
      assert zero['passed'] is True and zero['value'] == 0.0
      assert len(agreement) == 1 and 'round(x*4)/4 -> identity' in agreement[0]['name']
      assert res.accuracy == pytest.approx(robust, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# 4. Probability outputs are flagged.


@pytest.mark.parametrize('softmax', [True, False], ids=['probabilities', 'logits'])
def test_probability_output_diagnostic(softmax):
  rng = np.random.default_rng(3)
  w = rng.normal(size=(16, 5)).astype(np.float32) * 3.0
  head = lambda x: x.reshape(x.shape[0], -1) @ w
  fn = (lambda x: jax.nn.softmax(head(x), -1)) if softmax else head
  defence = defences.from_logits_fn(fn)
  images = rng.uniform(size=(6, 4, 4, 1)).astype(np.float32)
  labels = np.arange(6, dtype=np.int32) % 5
  checks = diagnostics.gradient_checks(defence, images, labels, {}, jax.random.key(0), 'exact')
  check = check_named(checks, 'outputs are logits, not probabilities')
  assert check['passed'] is (not softmax)
  assert check['value'] == (1.0 if softmax else 0.0)


# ---------------------------------------------------------------------------------------------
# 5. Auto-PGD's checkpoint rule against auto-attack's check_oscillation.


def reference_increases(loss_steps, i, k):
  """auto-attack: sum_{c < k} [loss_steps[i - c] > loss_steps[i - c - 1]] (index -1 = last
  row), loss_steps (n_iter, N) as it stands at iteration i (rows after i still zero)."""
  t = np.zeros(loss_steps.shape[1])
  for c in range(k):
    t += loss_steps[i - c] > loss_steps[i - c - 1]
  return t


@pytest.mark.parametrize('n_iter', [2, 3, 5, 10, 20, 100])
def test_apgd_increases_matches_reference(n_iter):
  windows = attacks.apgd_checkpoints(n_iter)
  assert np.any(windows > 0)
  rng = np.random.default_rng(n_iter)
  n = 12
  sequences = [
      rng.normal(size=(n_iter, n)),                          # mixed signs
      -rng.uniform(0.1, 1.0, size=(n_iter, n)),              # DLR-like: all negative
      rng.uniform(0.1, 1.0, size=(n_iter, n)),               # all positive
      np.round(rng.normal(size=(n_iter, n)), 0),             # many ties
      -np.cumsum(rng.uniform(0, 0.1, size=(n_iter, n)), 0),  # negative, monotone decreasing
  ]
  increases = jax.jit(attacks.apgd_increases)
  for seq in sequences:
    seq = seq.astype(np.float32)
    for i in np.nonzero(windows)[0]:
      k = int(windows[i])
      loss_steps = np.where(np.arange(n_iter)[:, None] <= i, seq, 0.0)
      hist = np.concatenate([np.zeros((1, n), np.float32), loss_steps], 0)
      ours = np.asarray(increases(jnp.asarray(hist), i, k))
      np.testing.assert_array_equal(ours, reference_increases(loss_steps, i, k),
                                    err_msg=f'n_iter={n_iter} i={i} k={k}')
      # Rows after i do not enter the count.
      full = np.concatenate([np.zeros((1, n), np.float32), seq], 0)
      np.testing.assert_array_equal(np.asarray(increases(jnp.asarray(full), i, k)), ours)


def test_apgd_first_step_counts_only_if_its_loss_is_positive():
  hist = np.zeros((11, 3), np.float32)
  hist[1:, 0] = -np.linspace(1.0, 0.1, 10)   # increasing, but negative at the first step
  hist[1:, 1] = np.linspace(0.1, 1.0, 10)    # increasing from a positive first loss
  hist[1:, 2] = -np.linspace(0.1, 1.0, 10)   # decreasing everywhere
  k = int(attacks.apgd_checkpoints(10)[1])   # first checkpoint: i = k - 1 = 1, k = 2
  assert k == 2
  np.testing.assert_array_equal(attacks.apgd_increases(jnp.asarray(hist), k - 1, k), [1, 2, 0])


# ---------------------------------------------------------------------------------------------
# 6. Attack entries.


def eval_config(attack_list, eps=0.3):
  ec = config_lib.get_base_config().eval
  ec.attacks = tuple(attack_list)
  ec.eps = eps
  return ec


def test_parse_entry_and_specs():
  entry = 'pgd(steps=40, loss=margin, restarts=5, view=eot, eot_samples=20, label=pgd_m)'
  assert specs.parse_entry(entry) == ('pgd', {'steps': 40, 'loss': 'margin', 'restarts': 5,
                                              'view': 'eot', 'eot_samples': 20,
                                              'label': 'pgd_m'})
  assert specs.parse_entry('fgsm') == ('fgsm', {})
  assert specs.parse_entry(' bim ( steps = 7 ) ') == ('bim', {'steps': 7})
  spec, = specs.attack_specs(eval_config([entry]), 'mnist')
  assert (spec.attack, spec.key, spec.view, spec.eot_samples) == ('pgd', 'pgd_m', 'eot', 20)
  assert (spec.norm, spec.eps, spec.steps, spec.restarts, spec.loss) == (
      'linf', 0.3, 40, 5, 'margin')
  assert spec.kwargs == {'eps': 0.3, 'step_size': pytest.approx(2.5 * 0.3 / 40),
                         'num_steps': 40, 'loss': 'margin', 'restarts': 5, 'norm': 'linf'}
  # Settings of an entry override the config's fields; the step follows the entry's eps.
  ec = eval_config(['bim(eps=0.05, steps=10, step_size_factor=2.0)', 'pgd'])
  ec.pgd_steps = 8
  bim, pgd = specs.attack_specs(ec, 'mnist')
  assert bim.kwargs['step_size'] == pytest.approx(2.0 * 0.05 / 10)
  assert pgd.kwargs['num_steps'] == 8
  assert pgd.kwargs['step_size'] == pytest.approx(ec.step_size_factor * 0.3 / 8)
  assert pgd.view is None and pgd.eot_samples is None  # the evaluation's


def test_apgd_dlr_entry():
  apgd, dlr = specs.attack_specs(eval_config(['apgd', 'apgd_dlr(steps=7)']), 'mnist')
  assert (dlr.attack, dlr.key, dlr.loss, dlr.kwargs['loss'], dlr.steps) == (
      'apgd', 'apgd_dlr', 'dlr', 'dlr', 7)
  assert apgd.kwargs['loss'] == 'ce' and apgd.key == 'apgd'


@pytest.mark.parametrize('entries,words', [
    (['pgd(stpes=40)'], ['stpes']),
    (['fgsm(steps=3)'], ['steps', 'fgsm']),
    (['apgd_dlr(loss=ce)'], ['loss']),
    (['pgd', 'pgd(steps=10)'], ['pgd', 'twice']),
    (['pgd(label=a)', 'bim(label=a)'], ["'a'", 'twice']),
    (['pgdd'], ['pgdd']),
    (['pgd(view=whitebox)'], ['whitebox']),
    (['pgd(loss=hinge)'], ['hinge']),
    (['pgd(steps)'], ['steps']),
])
def test_bad_entries_raise_naming_the_problem(entries, words):
  with pytest.raises(ValueError) as err:
    specs.attack_specs(eval_config(entries), 'mnist')
  for word in words:
    assert word in str(err.value), (word, str(err.value))


def test_entry_values_true_false_and_arithmetic():
  spec, = specs.attack_specs(eval_config(['cw_l2(abort_early=false)']), 'mnist')
  assert not spec.kwargs.get('abort_early', False)
  spec, = specs.attack_specs(eval_config(['cw_l2(abort_early=True)']), 'mnist')
  assert spec.kwargs['abort_early'] is True
  spec, = specs.attack_specs(eval_config(['pgd(eps=8/255, steps=10)']), 'mnist')
  assert spec.eps == pytest.approx(8 / 255) and spec.kwargs['step_size'] == pytest.approx(
      2.5 * 8 / 255 / 10)
  with pytest.raises(ValueError, match='eps'):
    specs.attack_specs(eval_config(['fgsm(eps=big)']), 'mnist')


# ---------------------------------------------------------------------------------------------
# 7. Every L-inf attack with every loss.

LIN_N, LIN_SHAPE, LIN_K = 4, (4, 4, 1), 10


def linear10(seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(math.prod(LIN_SHAPE), LIN_K)).astype(np.float32)
  b = rng.normal(size=(LIN_K,)).astype(np.float32)
  return (lambda x: x.reshape(x.shape[0], -1) @ w + b), w, b


@pytest.mark.parametrize('loss', attacks.LOSSES)
def test_linf_attacks_take_every_loss(loss):
  logits_fn, _, _ = linear10()
  u = jax.random.uniform(jax.random.key(1), (LIN_N,) + LIN_SHAPE, minval=-0.2, maxval=1.2)
  x = jnp.clip(u, 0.0, 1.0)  # some pixels at 0 and 1: the box binds
  y = jnp.arange(LIN_N) % LIN_K
  eps, key = 0.1, rbg_key(2)
  runs = {
      'fgsm': lambda x, y: attacks.fgsm(logits_fn, x, y, eps=eps, loss=loss),
      'bim': lambda x, y: attacks.bim(logits_fn, x, y, eps=eps, step_size=0.04, num_steps=3,
                                      loss=loss),
      'pgd': lambda x, y: attacks.pgd(logits_fn, x, y, eps=eps, step_size=0.04, num_steps=3,
                                      key=key, loss=loss, restarts=2),
      'apgd': lambda x, y: attacks.apgd(logits_fn, x, y, eps=eps, num_steps=5, key=key,
                                        loss=loss),
  }
  for name, run in runs.items():
    x_adv = np.asarray(jax.jit(run)(x, y))
    assert x_adv.shape == x.shape and np.all(np.isfinite(x_adv)), name
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, name
    assert np.max(np.abs(x_adv - np.asarray(x))) <= eps + 1e-6, name
    assert np.any(x_adv != np.asarray(x)), name  # the loss had a gradient


def numpy_loss_gradient(loss, w, b, x, y):
  """Input gradient of the untargeted objective `loss` of the linear model, in float64."""
  w, b = w.astype(np.float64), b.astype(np.float64)
  z = x @ w + b
  rows = np.arange(len(x))
  other = np.where(np.eye(w.shape[1], dtype=bool)[y], -np.inf, z)
  j = np.argmax(other, axis=1)
  if loss == 'ce':
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (p - np.eye(w.shape[1])[y]) @ w.T
  if loss == 'margin':
    return (w[:, j] - w[:, y]).T
  order = np.argsort(z, axis=1)
  top, third = order[:, -1], order[:, -3]
  den = z[rows, top] - z[rows, third]
  num = z[rows, y] - z[rows, j]
  dnum, dden = (w[:, y] - w[:, j]).T, (w[:, top] - w[:, third]).T
  return -(dnum * den[:, None] - num[:, None] * dden) / den[:, None] ** 2


@pytest.mark.parametrize('loss', attacks.LOSSES)
def test_fgsm_steps_along_the_sign_of_each_loss_gradient(loss):
  logits_fn, w, b = linear10()
  rng = np.random.default_rng(5)
  x = rng.uniform(0.2, 0.8, size=(LIN_N,) + LIN_SHAPE).astype(np.float32)
  y = np.arange(LIN_N, dtype=np.int32) % LIN_K
  eps = 0.01
  flat = x.reshape(LIN_N, -1).astype(np.float64)
  g = numpy_loss_gradient(loss, w, b, flat, y)
  x_adv = np.asarray(attacks.fgsm(logits_fn, jnp.asarray(x), jnp.asarray(y), eps=eps,
                                  loss=loss)).reshape(LIN_N, -1)
  clear = np.abs(g) > 1e-4 * np.abs(g).max(axis=1, keepdims=True)
  assert clear.mean() > 0.9
  expected = flat + np.float32(eps) * np.sign(g)
  np.testing.assert_allclose(x_adv[clear], expected[clear], atol=1e-6)


def test_fgsm_margin_decrease_is_eps_times_l1_distance():
  logits_fn, w, b = linear10()
  rng = np.random.default_rng(6)
  x = rng.uniform(0.3, 0.7, size=(LIN_N,) + LIN_SHAPE).astype(np.float32)
  z = np.asarray(logits_fn(jnp.asarray(x)), np.float64)
  y = np.argmax(z, 1).astype(np.int32)
  other = np.where(np.eye(LIN_K, dtype=bool)[y], -np.inf, z)
  j = np.argmax(other, 1)
  rows = np.arange(LIN_N)
  assert np.all(np.sort(other, 1)[:, -1] - np.sort(other, 1)[:, -2] > 1e-3)  # unique j
  eps = 0.01  # interior: x +- eps never leaves [0, 1]
  x_adv = attacks.fgsm(logits_fn, jnp.asarray(x), jnp.asarray(y), eps=eps, loss='margin')
  z_adv = np.asarray(logits_fn(x_adv), np.float64)
  drop = (z[rows, y] - z[rows, j]) - (z_adv[rows, y] - z_adv[rows, j])
  l1 = np.abs(w[:, y] - w[:, j]).astype(np.float64).sum(0)
  np.testing.assert_allclose(drop, eps * l1, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 8. C&W with early abort.


def linear_binary(n=4, dim=16, seed=0):
  """2 classes, margin z_0 - z_1 = w.x with ||w||_2 = 1; chosen margins, interior inputs."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=dim)
  w -= w.mean()
  w /= np.linalg.norm(w)
  margins = np.array([0.3, -0.2, 0.25, -0.35])[:n]
  x = 0.5 + rng.uniform(-0.08, 0.08, size=(n, dim))
  x += (margins - x @ w)[:, None] * w[None, :]
  wm = np.stack([w / 2, -w / 2], axis=1).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ wm
  y = (margins < 0).astype(np.int32)
  return logits_fn, jnp.asarray(x.reshape(n, 4, 4, 1), jnp.float32), jnp.asarray(y), margins


def test_cw_abort_early_finds_verified_adversarials():
  logits_fn, x, y, margins = linear_binary()
  cw = jax.jit(lambda x, y: attacks.cw_l2(logits_fn, x, y, binary_search_steps=6,
                                          num_steps=50, lr=0.05, abort_early=True))
  x_adv = cw(x, y)
  fooled = np.asarray(attacks.is_adversarial(logits_fn(x_adv), y))
  unchanged = np.all(np.asarray(x_adv == x).reshape(len(y), -1), axis=1)
  assert np.all(fooled | unchanged)
  assert np.all(fooled)  # easy: a linear model
  d = np.linalg.norm(np.asarray(x_adv - x).reshape(len(y), -1), axis=1)
  assert np.all(d >= np.abs(margins) * (1 - 1e-4)), (d, margins)  # nothing beats the optimum
  assert np.all(d <= 1.5 * np.abs(margins)), (d, margins)
  assert float(jnp.min(x_adv)) >= 0.0 and float(jnp.max(x_adv)) <= 1.0


def test_cw_abort_early_stops_a_flat_search_and_returns_x():
  # A constant model: the loss cannot decrease, so each search step stops at its second check
  # (j = num_steps // 10) instead of running num_steps, and nothing adversarial exists.
  calls = []

  def constant(z):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.broadcast_to(jnp.array([5.0, 0.0]), (z.shape[0], 2)) + 0 * z.sum()

  x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 1), minval=0.1, maxval=0.9)
  y = jnp.zeros((3,), jnp.int32)
  counts = {}
  for abort in (False, True):
    calls.clear()
    x_adv = attacks.cw_l2(constant, x, y, binary_search_steps=2, num_steps=40,
                          abort_early=abort)
    jax.effects_barrier()
    counts[abort] = len(calls)
    chex.assert_trees_all_close(x_adv, x, atol=0, rtol=0)
  # Without abort: 2 x (40 steps + 1 final check) + 1 verification; with: 2 x (4 + 1 + 1) + 1.
  assert counts[False] == 2 * 41 + 1, counts
  assert counts[True] == 2 * (40 // 10 + 2) + 1, counts


# ---------------------------------------------------------------------------------------------
# 9. Freezing part of a parameter tree.


def test_freeze_leaves_frozen_leaves_unchanged():
  params = {'a': {'w': jnp.ones((3,)), 'b': jnp.ones(())}, 'b': jnp.full((2,), 2.0)}
  tx = optim.freeze(optax.sgd(0.1, momentum=0.9), lambda path: path[0] == 'a')
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  new = params
  for _ in range(2):
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  chex.assert_trees_all_close(new['a'], params['a'], atol=0, rtol=0)
  # SGD with momentum 0.9 and lr 0.1, two steps of gradient 1: -0.1 - 0.19.
  np.testing.assert_allclose(np.asarray(new['b']), 2.0 - 0.29, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# 10. Migration of saved configs and command lines.


def old_saved_config():
  """Today's config as saved JSON, reshaped as runs saved before ComDefend's fields moved."""
  saved = config_lib.as_saved_json(config_lib.get_base_config())
  comdefend = saved['defense'].pop('comdefend')
  comdefend.pop('conv')
  saved['defense'].update(comdefend)
  saved['defense'].update(name='comdefend', width=2, code_channels=8, noise_std=5.0)
  saved['defense'].pop('gaussian_noise')
  for path in ('model.conv', 'model.padding', 'train.precise_bn_batches'):
    section, field = path.split('.')
    saved[section].pop(field)
  saved['model']['width'] = 8  # a saved value that is not a default
  return saved


def same_keys(a, b, path=''):
  assert isinstance(a, dict) == isinstance(b, dict), path
  if isinstance(a, dict):
    assert set(a) == set(b), (path, set(a) ^ set(b))
    for k in a:
      same_keys(a[k], b[k], f'{path}.{k}')


def test_migrate_config_moves_and_fills_fields():
  saved = old_saved_config()
  before = json.loads(json.dumps(saved))
  out = config_lib.migrate_config(saved)
  assert saved == before  # the input is not modified
  today = config_lib.as_saved_json(config_lib.get_base_config())
  same_keys(out, today)  # every field of today, no other
  cd = out['defense']['comdefend']
  assert (cd['width'], cd['code_channels'], cd['noise_std']) == (2, 8, 5.0)
  assert (cd['code_weight'], cd['learning_rate']) == (
      today['defense']['comdefend']['code_weight'],
      today['defense']['comdefend']['learning_rate'])
  for old in config_lib.MOVED_FIELDS:
    assert old.split('.')[1] not in out['defense'], old
  assert out['defense']['name'] == 'comdefend'
  assert cd['conv'] == 'xla'
  assert (out['model']['conv'], out['model']['padding']) == ('xla', 'same')
  assert out['train']['precise_bn_batches'] == 0
  assert out['model']['width'] == 8
  assert out['defense']['gaussian_noise'] == today['defense']['gaussian_noise']
  assert config_lib.migrate_config(out) == out       # idempotent
  assert config_lib.migrate_config(today) == today   # today's configs are left alone


def test_migrate_config_fills_a_defence_only_field_as_that_defences_runs_behaved():
  today = config_lib.as_saved_json(config_lib.get_base_config())
  for name, path in (('adv_bnn', 'adv_bnn.optimizer'), ('deep_defense', 'deep_defense.norm_eps')):
    saved = json.loads(json.dumps(today))
    saved['defense']['name'] = name
    section, field = path.split('.')
    del saved['defense'][section][field]
    before = config_lib.BEFORE_FIELD_OF_DEFENCE[f'defense.{path}'][1]
    assert config_lib.migrate_config(saved)['defense'][section][field] == before
    assert before != today['defense'][section][field]
    # another defence's run never read the field: today's default, so it is still reused
    saved['defense']['name'] = 'none'
    assert config_lib.migrate_config(saved) == today


def test_migrate_argv_rewrites_moved_flags_only(capsys):
  argv = ['--config=configs/mnist.py', '--config.defense.width=2',
          '--config.defense.code_channels', '8', '--config.defense.name=comdefend',
          '--config.defense.widths=3', '--config.defense.comdefend.noise_std=1',
          '--workdir=/tmp/run']
  out = config_lib.migrate_argv(argv)
  assert out == ['--config=configs/mnist.py', '--config.defense.comdefend.width=2',
                 '--config.defense.comdefend.code_channels', '8',
                 '--config.defense.name=comdefend', '--config.defense.widths=3',
                 '--config.defense.comdefend.noise_std=1', '--workdir=/tmp/run']
  err = capsys.readouterr().err
  assert 'config.defense.width is now config.defense.comdefend.width' in err
  assert err.count('note:') == 2


# ---------------------------------------------------------------------------------------------
# 11. The draws of a randomised defence.


def coin_defence(std=2.0):
  """A linear 2-class model plus large logit noise: predictions change from draw to draw."""
  def logits_fn(x, key):
    m = jnp.mean(x.reshape(x.shape[0], -1), -1) - 0.5
    m = m + std * jax.random.normal(key, m.shape, m.dtype)
    return jnp.stack([-m, m], -1)
  return defences.from_logits_fn(logits_fn, randomised=True)


def test_run_attack_draws():
  rng = np.random.default_rng(0)
  n, batch = 10, 4  # 3 batches, the last one padded
  images = rng.uniform(size=(n, 2, 2, 1)).astype(np.float32)
  labels = (rng.uniform(size=n) > 0.5).astype(np.int32)
  key = jax.random.key(3)
  defence = coin_defence()
  # FGSM at eps = 0 returns x: each draw's count is that draw's clean count.
  res = runner.run_attack(specs.make_spec('fgsm', eps=0.0), defence, images, labels, batch,
                          key, view='exact', draws=3, progress=False)
  assert res.draws == 3 and len(res.correct_per_draw) == 3 and res.seen == n
  clean = [runner.clean_predictions(defence, images, labels, batch, runner.draw_key(key, r, 3))
           for r in range(3)]
  assert res.correct_per_draw == [int(c.sum()) for c in clean]
  assert res.correct_every_draw == int(np.logical_and.reduce(clean).sum())
  assert len(set(res.correct_per_draw)) > 1  # fresh randomness per draw
  assert res.accuracy == pytest.approx(np.mean(res.correct_per_draw) / n, abs=1e-12)
  assert res.accuracy_worst == pytest.approx(min(res.correct_per_draw) / n, abs=1e-12)
  row = runner.result_row(res, ())
  assert row['draws'] == 3 and row['seen'] == 3 * n
  assert row['correct_per_draw'] == res.correct_per_draw

  deterministic = defences.from_logits_fn(
      lambda x: jnp.stack([-x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], -1))
  res = runner.run_attack(specs.make_spec('fgsm', eps=0.1), deterministic, images, labels,
                          batch, key, draws=3, progress=False)
  assert res.draws == 1 and res.seen == n and res.view == 'exact'
  assert 'draws' not in runner.result_row(res, ())
