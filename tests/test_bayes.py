"""Adv-BNN's Bayes-by-backprop layers: KL against float64 closed form and Monte Carlo, sampling,
the deterministic limit, gradients, and the layers inside a classifier."""

from __future__ import annotations

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defendpp_jax.nn import bayes
from defendpp_jax.nn import onednn
from defendpp_jax.nn.classifiers import Classifier

TORCH_PAD = ((1, 1), (1, 1))


def _np_kl(mu, log_sigma, prior_sigma):
  """sum KL(N(mu, sigma^2) || N(0, s0^2)) in float64 numpy."""
  mu, log_sigma = np.asarray(mu, np.float64), np.asarray(log_sigma, np.float64)
  sigma2, s02 = np.exp(2 * log_sigma), prior_sigma**2
  return float(np.sum(0.5 * (sigma2 / s02 + mu**2 / s02 - 1.0 - np.log(sigma2 / s02))))


def _perturbed(params, key, scale=0.5):
  """`params` with every leaf moved by N(0, scale^2) noise (log sigmas no longer constant)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [p + scale * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def _layers():
  conv = bayes.BayesConv(6, (3, 3), strides=(2, 2), padding=TORCH_PAD, use_bias=True,
                         prior_sigma=0.2)
  dense = bayes.BayesDense(5, prior_sigma=0.2)
  return [(conv, (2, 9, 9, 3)), (dense, (4, 7))]


@pytest.mark.parametrize('index', [0, 1], ids=['conv', 'dense'])
def test_sown_kl_is_the_closed_form_in_float64(index):
  layer, shape = _layers()[index]
  x = jax.random.normal(jax.random.key(0), shape)
  params = layer.init(jax.random.key(1), x)['params']
  # The initial log sigma is the reference's constant log(init_s).
  np.testing.assert_allclose(params['kernel_log_sigma'], np.log(bayes.INIT_SIGMA), rtol=1e-6)
  params = _perturbed(params, jax.random.key(2))
  _, mutated = layer.apply({'params': params}, x, rngs={'noise': jax.random.key(3)},
                           mutable=['losses'])
  want = sum(_np_kl(params[f'{p}_mu'], params[f'{p}_log_sigma'], 0.2) for p in ('kernel', 'bias'))
  assert mutated['losses']['kl'].shape == ()
  np.testing.assert_allclose(float(bayes.collected_kl(mutated)), want, rtol=1e-5)
  np.testing.assert_allclose(
      float(bayes.gaussian_kl_sum(params['kernel_mu'], params['kernel_log_sigma'], 0.2)),
      _np_kl(params['kernel_mu'], params['kernel_log_sigma'], 0.2), rtol=1e-5)


def test_closed_form_matches_monte_carlo():
  rng = np.random.default_rng(0)
  mu = rng.normal(0.0, 0.1, size=6)
  log_sigma = np.log(rng.uniform(0.05, 0.3, size=6))
  s0, n = 0.1, 200_000
  sigma = np.exp(log_sigma)
  w = mu + sigma * rng.standard_normal((n, 6))
  log_q = -np.log(sigma) - 0.5 * ((w - mu) / sigma)**2
  log_p = -np.log(s0) - 0.5 * (w / s0)**2
  mc = float(np.mean(np.sum(log_q - log_p, axis=1)))
  closed = float(bayes.gaussian_kl_sum(jnp.asarray(mu, jnp.float32),
                                       jnp.asarray(log_sigma, jnp.float32), s0))
  assert closed > 0
  np.testing.assert_allclose(closed, mc, rtol=0.03)


@pytest.mark.parametrize('index', [0, 1], ids=['conv', 'dense'])
def test_noise_key_sets_the_sample(index):
  layer, shape = _layers()[index]
  x = jax.random.normal(jax.random.key(0), shape)
  variables = layer.init(jax.random.key(1), x)
  run = jax.jit(lambda k: layer.apply(variables, x, rngs={'noise': k}))
  a, b, c = run(jax.random.key(5)), run(jax.random.key(5)), run(jax.random.key(6))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3
  # One weight sample for the whole batch: identical examples get the same outputs (up to the
  # last bit: a kernel may sum different batch rows in different orders), where another
  # sample moves them by > 1e-3 (above).
  twice = jnp.concatenate([x[:1], x[:1]])
  y = layer.apply(variables, twice, rngs={'noise': jax.random.key(7)})
  np.testing.assert_allclose(np.asarray(y[0]), np.asarray(y[1]), rtol=1e-5, atol=1e-6)
  with pytest.raises(Exception, match='noise'):
    layer.apply(variables, x)  # sampling needs the 'noise' stream


def _collapsed(params):
  """`params` with every log sigma at -40: the layer is deterministic with weights mu."""
  return {k: jnp.full_like(v, -40.0) if k.endswith('log_sigma') else v for k, v in params.items()}


def test_tiny_sigma_conv_is_the_plain_conv():
  layer, shape = _layers()[0]
  x = jax.random.normal(jax.random.key(0), shape)
  params = _collapsed(_perturbed(layer.init(jax.random.key(1), x)['params'], jax.random.key(2)))
  y = layer.apply({'params': params}, x, rngs={'noise': jax.random.key(3)})
  plain = nn.Conv(6, (3, 3), strides=(2, 2), padding=TORCH_PAD)
  want = plain.apply({'params': {'kernel': params['kernel_mu'], 'bias': params['bias_mu']}}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
  lax_y = jax.lax.conv_general_dilated(x, params['kernel_mu'], (2, 2), TORCH_PAD,
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(np.asarray(y), np.asarray(lax_y + params['bias_mu']),
                             rtol=1e-5, atol=1e-5)


def test_tiny_sigma_dense_is_the_plain_dense():
  layer, shape = _layers()[1]
  x = jax.random.normal(jax.random.key(0), shape)
  params = _collapsed(_perturbed(layer.init(jax.random.key(1), x)['params'], jax.random.key(2)))
  y = layer.apply({'params': params}, x, rngs={'noise': jax.random.key(3)})
  want = nn.Dense(5).apply({'params': {'kernel': params['kernel_mu'],
                                       'bias': params['bias_mu']}}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('index', [0, 1], ids=['conv', 'dense'])
def test_output_gradient_reaches_log_sigma(index):
  layer, shape = _layers()[index]
  x = jax.random.normal(jax.random.key(0), shape)
  params = layer.init(jax.random.key(1), x)['params']
  r = jax.random.normal(jax.random.key(4), layer.apply({'params': params}, x,
                                                       rngs={'noise': jax.random.key(3)}).shape)

  def loss(p):  # the output alone, without the KL term
    return jnp.sum(r * layer.apply({'params': p}, x, rngs={'noise': jax.random.key(3)}))

  grads = jax.grad(loss)(params)
  for name in ('kernel_log_sigma', 'bias_log_sigma', 'kernel_mu'):
    g = np.asarray(grads[name])
    assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 1e-6, name


def test_project_kernels_match_lax():
  layer = bayes.BayesConv(6, (3, 3), strides=(2, 2), padding=TORCH_PAD, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8))
  variables = layer.init(jax.random.key(1), x)
  want = layer.apply(variables, x, rngs={'noise': jax.random.key(2)})
  backends = ['xla'] + (['onednn'] if onednn.available()[0] else [])
  for backend in backends:
    fast = bayes.bayes_conv_module(backend=backend)(6, (3, 3), strides=(2, 2), padding=TORCH_PAD,
                                                    use_bias=False)
    y = fast.apply(variables, x, rngs={'noise': jax.random.key(2)})
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-5)
  assert bayes.bayes_conv_module() is bayes.bayes_conv_module()
  with pytest.raises(ValueError):
    bayes.bayes_conv_module(backend='cuda')


def test_collected_kl_sums_every_layer_and_is_zero_without_any():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = bayes.BayesDense(3, name='a')(x)
      shared = bayes.BayesDense(3, name='b')
      return shared(shared(h))  # called twice: its KL counts once

  x = jnp.ones((2, 4))
  variables = Two().init(jax.random.key(0), x)
  _, mutated = Two().apply(variables, x, rngs={'noise': jax.random.key(1)}, mutable=['losses'])
  p = variables['params']
  want = sum(_np_kl(p[m][f'{k}_mu'], p[m][f'{k}_log_sigma'], bayes.PRIOR_SIGMA)
             for m in ('a', 'b') for k in ('kernel', 'bias'))
  np.testing.assert_allclose(float(bayes.collected_kl(mutated)), want, rtol=1e-5)
  assert float(bayes.collected_kl({})) == 0.0
  assert float(bayes.collected_kl({'batch_stats': {}})) == 0.0


def test_inside_the_resnet18_classifier():
  cls = Classifier('resnet18', num_classes=10, width=4, image_size=28,
                   conv=bayes.bayes_conv_module())
  x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  variables = jax.jit(cls.init)({'params': jax.random.key(1), 'noise': jax.random.key(2)}, x)

  @jax.jit
  def run(variables, key):
    return cls.apply(variables, x, train=True, rngs={'noise': key},
                     mutable=['batch_stats', 'losses'])

  # The variables of init still hold a 'losses' collection: it must not be counted twice.
  (logits, mutated), (other, _) = run(variables, jax.random.key(3)), run(variables,
                                                                          jax.random.key(4))
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.max(jnp.abs(logits - other))) > 1e-4
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(variables['params']).items()}
  mus = sorted(k for k in flat if k.endswith('kernel_mu'))
  # stem + 4 stages x 2 blocks x 2 convs + 3 projections; the dense head stays plain.
  assert len(mus) == 20 and 'head/kernel' in flat
  want = sum(_np_kl(flat[k], flat[k[:-len('mu')] + 'log_sigma'], bayes.PRIOR_SIGMA) for k in mus)
  np.testing.assert_allclose(float(bayes.collected_kl(mutated)), want, rtol=1e-5)
  assert len(jax.tree_util.tree_leaves(mutated['losses'])) == 20
