"""Square (score-based) and APGD-T: known answers on linear models, the eps-ball and [0, 1],
Square breaking a gradient-masked model that PGD cannot; the autoattack entry's cascade.

Run: JAX_COMPILATION_CACHE_DIR=.cache/jax python -m pytest -q tests/test_gradient_free.py
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defendpp_jax import attacks
from defendpp_jax.attacks import gradient_free
from defendpp_jax.attacks import specs as specs_lib
from defendpp_jax.defences import base
from defendpp_jax import evaluation
from defendpp_jax.runs import config as config_lib
from test_attacks import SHAPE
from test_attacks import conv_model
from test_attacks import linear_binary
from test_attacks import numpy_norms
from test_attacks import random_images


def _margin_y(logits_fn, x, y):
  logits = np.asarray(logits_fn(x))
  return np.where(np.asarray(y) == 0, 1, -1) * (logits[:, 0] - logits[:, 1])


def test_square_reaches_the_linear_worst_case_margin():
  # eps small enough that every example stays correct at the optimum: Square then spends its
  # whole budget and must find the corner x - eps sign(w_y) (single-pixel windows late on).
  logits_fn, x, y, w, margins = linear_binary()
  eps = 0.02
  assert np.all(np.abs(margins) - eps * np.abs(w).sum() > 0)
  x_adv = jax.jit(lambda x, y: attacks.square(logits_fn, x, y, eps=eps, num_queries=2000,
                                              key=jax.random.key(0)))(x, y)
  w_y = np.where(np.asarray(y)[:, None] == 0, w, -w).reshape(SHAPE)
  expected = np.asarray(x) - eps * np.sign(w_y)
  np.testing.assert_allclose(np.asarray(x_adv), expected, atol=1e-6)
  np.testing.assert_allclose(_margin_y(logits_fn, x_adv, y),
                             np.abs(margins) - eps * np.abs(w).sum(), atol=1e-5)


def test_square_fools_the_linear_model_when_the_optimum_does():
  logits_fn, x, y, w, margins = linear_binary()
  eps = 0.15
  assert np.all(np.abs(margins) - eps * np.abs(w).sum() < 0)
  x_adv = attacks.square(logits_fn, x, y, eps=eps, num_queries=2000, key=jax.random.key(1))
  assert np.all(np.asarray(attacks.is_adversarial(logits_fn(x_adv), y)))


def test_square_l2_closes_most_of_the_linear_gap_and_fools_when_it_can():
  # Square's L2 windows are smooth (eta patterns), not aligned with a random w: the optimum
  # |m| - eps is approached, not reached. A random direction of norm eps lowers the margin
  # by about eps / 8 here; Square, 2,000 queries, by more than 0.6 eps.
  logits_fn, x, y, w, margins = linear_binary()
  x_adv = attacks.square(logits_fn, x, y, eps=0.2, num_queries=2000, key=jax.random.key(0),
                         norm='l2')
  drop = np.abs(margins) - _margin_y(logits_fn, x_adv, y)
  assert np.all(drop > 0.6 * 0.2) and np.all(drop <= 0.2 + 1e-5), drop
  x_adv = attacks.square(logits_fn, x, y, eps=1.5, num_queries=2000, key=jax.random.key(0),
                         norm='l2')
  assert np.all(np.asarray(attacks.is_adversarial(logits_fn(x_adv), y)))


@pytest.mark.parametrize('eps,norm,ord_', [(0.05, 'linf', np.inf), (0.3, 'linf', np.inf),
                                           (0.5, 'l2', 2), (3.0, 'l2', 2)])
def test_square_stays_in_the_ball_and_the_box(eps, norm, ord_):
  logits_fn = conv_model()
  x = random_images()
  y = jnp.arange(SHAPE[0]) % 10
  x_adv = attacks.square(logits_fn, x, y, eps=eps, num_queries=50, key=jax.random.key(2),
                         norm=norm)
  chex.assert_tree_all_finite(x_adv)
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  assert np.all(numpy_norms(x_adv - x, ord_) <= eps * (1 + 1e-5))


def test_eta_windows_are_unit_norm_and_antisymmetric():
  tails = gradient_free._tail_sums(12)
  r, c = jnp.arange(10)[:, None], jnp.arange(10)[None, :]
  for s in (1, 3, 4, 7):
    v = np.asarray(gradient_free.eta(s, r, c, False, tails))
    assert abs(np.sum(v ** 2) - 1) < 1e-5 and np.all(v[s:] == 0) and np.all(v[:, s:] == 0)
    if s >= 2:  # + on the first s // 2 rows, - on the others
      assert np.all(v[:s // 2, :s] > 0) and np.all(v[s // 2:s, :s] < 0)
    vt = np.asarray(gradient_free.eta(s, r, c, True, tails))
    np.testing.assert_allclose(vt, v.T, atol=1e-7)


def _quantised_linear(seed=0):
  """2 classes on the binarised image: logits = +-(w . round(x)); jnp.round's gradient is 0."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=64).astype(np.float32)
  x = jnp.asarray(rng.uniform(0.3, 0.7, size=(6, 64)).reshape(6, 8, 8, 1), jnp.float32)

  def logits_fn(z):
    s = jnp.round(z).reshape(z.shape[0], -1) @ w
    return jnp.stack([s, -s], -1)

  y = jnp.argmax(logits_fn(x), -1)
  return logits_fn, x, y


def test_square_breaks_masked_gradients_where_pgd_does_not():
  logits_fn, x, y = _quantised_linear()
  eps = 0.35  # every pixel (in [0.3, 0.7]) can round either way
  x_pgd = attacks.pgd(logits_fn, x, y, eps=eps, step_size=0.05, num_steps=20,
                      key=jax.random.key(0), random_start=False)
  assert not np.any(np.asarray(attacks.is_adversarial(logits_fn(x_pgd), y)))  # zero gradient
  x_sq = attacks.square(logits_fn, x, y, eps=eps, num_queries=500, key=jax.random.key(0))
  assert np.all(np.asarray(attacks.is_adversarial(logits_fn(x_sq), y)))
  assert np.all(numpy_norms(x_sq - x, np.inf) <= eps + 1e-6)


def test_p_schedule_halves_at_the_published_query_counts():
  p = lambda i, n=5000, r=False: float(gradient_free.p_schedule(0.8, jnp.asarray(i), n, r))
  np.testing.assert_allclose([p(i) for i in (0, 10, 11, 50, 51, 200, 201, 9000)],
                             [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 512], rtol=1e-6)
  np.testing.assert_allclose(p(500, 1000, True), 0.8 / 128, rtol=1e-6)  # as query 5,000 of 10,000


def _blocks_model(k=4):
  """k classes, each the sum of its own block of pixels."""
  W = np.kron(np.eye(k), np.ones((64 // k, 1))).astype(np.float32)
  return lambda z: z.reshape(z.shape[0], -1) @ W


def test_apgd_t_fools_and_stays_in_the_ball():
  logits_fn = _blocks_model()
  x = jax.random.uniform(jax.random.key(0), SHAPE, minval=0.4, maxval=0.6)
  y = jnp.argmax(logits_fn(x), -1)
  x_adv = attacks.apgd_targeted(logits_fn, x, y, eps=0.3, num_steps=10, key=jax.random.key(1),
                                num_targets=3)
  assert np.all(np.asarray(attacks.is_adversarial(logits_fn(x_adv), y)))
  assert np.all(numpy_norms(x_adv - x, np.inf) <= 0.3 + 1e-6)
  assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
  with pytest.raises(ValueError, match='num_targets'):
    attacks.apgd_targeted(logits_fn, x, y, eps=0.3, num_steps=2, key=jax.random.key(1),
                          num_targets=4)


def _eval_config(attacks_=('autoattack',)):
  ec = config_lib.get_base_config().eval
  ec.attacks = attacks_
  ec.apgd_steps = 5
  ec.square_queries = 30
  return ec


def test_autoattack_entry_expands_to_its_components():
  parts = specs_lib.attack_specs(_eval_config(('autoattack(eps=0.1, queries=40)',
                                               'autoattack_rand')), 'mnist')
  assert [p.key for p in parts] == ['autoattack:apgd_ce', 'autoattack:apgd_t',
                                    'autoattack:fab_t', 'autoattack:square',
                                    'autoattack_rand:apgd_ce', 'autoattack_rand:apgd_dlr']
  assert parts[3].kwargs['num_queries'] == 40 and all(p.eps == 0.1 for p in parts[:4])
  assert parts[1].kwargs['num_targets'] == 9 and parts[0].loss == 'ce'
  assert parts[2].kwargs == {'eps': 0.1, 'num_steps': 5, 'norm': 'linf', 'num_targets': 9}
  assert all(p.view == 'eot' and p.eot_samples == 20 for p in parts[4:])
  with pytest.raises(ValueError, match='unknown setting'):
    specs_lib.attack_specs(_eval_config(('autoattack(loss=ce)',)), 'mnist')
  with pytest.raises(ValueError, match="'linf' or 'l2'"):
    specs_lib.make_spec('square', norm='l1')


def test_autoattack_is_never_above_any_component():
  logits_fn = conv_model()
  defence = base.Defence('tiny', lambda v, x, key, bpda: logits_fn(x), {'unused': jnp.zeros(1)})
  x = np.asarray(random_images(4))
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))  # all correct when clean
  ec = _eval_config(('autoattack(eps=0.02)', 'apgd(eps=0.02, steps=5, label=apgd_alone)',
                     'square(eps=0.02, queries=30, label=square_alone)'))
  specs = specs_lib.attack_specs(ec, 'mnist')
  out = evaluation.run_entries(defence, x, y, specs, batch_size=4, key=jax.random.key(0),
                             view='exact', eot_samples=1, eot_chunk=1, draws=1,
                             progress=False)
  rows = {r['attack']: r for r in out['rows']}
  aa = rows['autoattack']
  assert aa['settings']['components'] == ['autoattack:apgd_ce', 'autoattack:apgd_t',
                                          'autoattack:fab_t', 'autoattack:square']
  assert aa['correct'] == rows['autoattack:square']['correct']
  for k in ('autoattack:apgd_ce', 'autoattack:apgd_t', 'autoattack:fab_t', 'autoattack:square',
            'apgd_alone', 'square_alone'):
    assert aa['correct'] <= rows[k]['correct'], k
  assert rows['autoattack:apgd_t']['correct'] <= rows['autoattack:apgd_ce']['correct']
  assert rows['autoattack:fab_t']['correct'] <= rows['autoattack:apgd_t']['correct']
  assert any('Square' in c['name'] for c in out['sanity_checks'])
