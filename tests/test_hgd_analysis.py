"""HGD's analyses: the layer-wise perturbation level (Fig. 5) on a tiny random classifier (zero
when nothing differs, the pixel level of a scaled image, a hand computation from the layers)
and the noise slope (Fig. 7) on synthetic noise with known slope and intercept; both figures.

Run: JAX_COMPILATION_CACHE_DIR=.cache/jax python -m pytest -q tests/test_hgd_analysis.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defendpp_jax.evaluation import hgd_analysis as ha
from defendpp_jax.nn.defendpp import DefendPP

SHAPE = (28, 28, 1)
N = 5
BATCH = 2  # does not divide N: the padded last batch is exercised everywhere


@pytest.fixture(scope='module')
def model():
  module = DefendPP(arch='resnet18', width=4, image_shape=SHAPE, decoder='none', num_classes=10)
  x = jax.random.uniform(jax.random.key(1), (N, *SHAPE))
  variables = jax.jit(module.init)(jax.random.key(0), x)
  return module, variables, np.asarray(x)


def _perturbed(x, scale=0.1, seed=2):
  rng = np.random.default_rng(seed)
  return np.clip(x + scale * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# layer_activations


def test_layer_activations_one_entry_per_block_and_the_logits(model):
  module, variables, x = model
  layers = ha.layer_activations(module, variables, x, batch_size=BATCH)
  assert [n for n, _ in layers] == ['E0', 'E1', 'E2', 'E3', 'logits']
  # CIFAR stem at 28 px: E0 keeps the resolution, E1 .. E3 halve it (28, 14, 7, 4).
  assert [a.shape for _, a in layers] == [(N, 28, 28, 4), (N, 14, 14, 8), (N, 7, 7, 16),
                                          (N, 4, 4, 32), (N, 10)]
  np.testing.assert_allclose(layers[-1][1],
                             module.apply(variables, jnp.asarray(x), method='classify'),
                             atol=1e-5)
  whole = ha.layer_activations(module, variables, x, batch_size=N)
  for (_, a), (_, b) in zip(layers, whole):
    np.testing.assert_allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# amplification


def test_amplification_is_zero_when_nothing_differs(model):
  module, variables, x = model
  out = ha.amplification(module, variables, x, x, batch_size=BATCH)
  assert out['layers'] == ['pixels', 'E0', 'E1', 'E2', 'E3', 'logits']
  assert out['num_images'] == N and out['level'] == [0.0] * 6


def test_amplification_is_zero_behind_a_constant_denoiser(model):
  module, variables, x = model
  p = _perturbed(x)
  const = lambda z: jnp.full_like(z, 0.5)
  out = ha.amplification(module, variables, x, p, denoise=const, batch_size=BATCH)
  assert out['level'] == [0.0] * 6
  # The same perturbation is seen at every layer without the denoiser.
  bare = ha.amplification(module, variables, x, p, batch_size=BATCH)
  assert all(v > 1e-3 for v in bare['level'])


def test_amplification_pixel_level_of_a_scaled_image_is_the_scale(model):
  module, variables, x = model
  t = 0.05
  out = ha.amplification(module, variables, x, x * (1 + t), batch_size=BATCH)
  np.testing.assert_allclose(out['level'][0], t, rtol=1e-5)
  assert all(v > 0 for v in out['level'][1:])


def _by_hand(module, variables, ref, pert):
  """mean_i ||a_i - b_i|| / ||b_i|| per layer, from layer_activations (float64 numpy)."""
  def rel(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))
  la = ha.layer_activations(module, variables, pert, batch_size=N)
  lb = ha.layer_activations(module, variables, ref, batch_size=N)
  return [rel(pert, ref)] + [rel(a, b) for (_, a), (_, b) in zip(la, lb)]


def test_amplification_matches_a_hand_computation_through_a_denoiser(model):
  module, variables, x = model
  p = _perturbed(x)
  den = lambda z: 0.5 * z + 0.25
  out = ha.amplification(module, variables, x, p, denoise=den, batch_size=BATCH)
  want = _by_hand(module, variables, 0.5 * x + 0.25, 0.5 * p + 0.25)
  np.testing.assert_allclose(out['level'], want, rtol=2e-4)
  # pixel level known in closed form: ||0.5 (p - x)|| / ||0.5 x + 0.25||
  flat = lambda a: a.reshape(N, -1).astype(np.float64)
  pix = np.mean(np.linalg.norm(flat(0.5 * (p - x)), axis=1) /
                np.linalg.norm(flat(0.5 * x + 0.25), axis=1))
  np.testing.assert_allclose(out['level'][0], pix, rtol=1e-5)
  # reference='clean' (the paper's formula): D(p) against the undenoised clean image.
  paper = ha.amplification(module, variables, x, p, denoise=den, batch_size=BATCH,
                           reference='clean')
  assert paper['reference'] == 'clean'
  np.testing.assert_allclose(paper['level'], _by_hand(module, variables, x, 0.5 * p + 0.25),
                             rtol=2e-4)


def test_amplification_rejects_bad_arguments(model):
  module, variables, x = model
  with pytest.raises(ValueError, match='differ in shape'):
    ha.amplification(module, variables, x, x[:3])
  with pytest.raises(ValueError, match='reference'):
    ha.amplification(module, variables, x, x, reference='pixels')


# ---------------------------------------------------------------------------------------------
# noise_slope


def _synthetic(n=40, eps=0.3, seed=0):
  rng = np.random.default_rng(seed)
  clean = rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)
  dx = rng.uniform(-eps, eps, clean.shape).astype(np.float32)
  return clean, clean + dx, dx


def test_noise_slope_recovers_a_known_line():
  clean, adv, dx = _synthetic()
  rng = np.random.default_rng(1)
  a, b = 1.4, 0.02
  denoised = adv - (a * dx + b + 0.01 * rng.standard_normal(dx.shape)).astype(np.float32)
  out = ha.noise_slope(clean, adv, denoised, batch_size=7)
  np.testing.assert_allclose(out['slope'], a, atol=5e-3)
  np.testing.assert_allclose(out['intercept'], b, atol=1e-3)
  np.testing.assert_allclose(out['residual_std'], 0.01, rtol=0.1)
  assert 0.99 < out['r'] < 1
  assert out['num_pixels'] == dx.size and out['num_images'] == len(dx)
  h = out['histogram']
  assert h['range'] == 0.3 and h['bins'] == 60 and len(h['edges']) == 61
  assert np.asarray(h['counts']).shape == (60, 60)
  # slope 1.4: dx^ leaves [-0.3, 0.3] for |dx| > ~0.2, those pixels are counted as outside
  assert h['outside'] > 0
  assert np.asarray(h['counts']).sum() + h['outside'] == dx.size
  # chunking does not change the result
  whole = ha.noise_slope(clean, adv, denoised, batch_size=len(dx))
  np.testing.assert_allclose(whole['slope'], out['slope'], rtol=1e-10)
  np.testing.assert_allclose(whole['intercept'], out['intercept'], atol=1e-12)
  assert whole['histogram']['counts'] == h['counts']


def test_noise_slope_of_the_perfect_denoiser_is_one():
  clean, adv, dx = _synthetic(eps=16 / 255)
  out = ha.noise_slope(clean, adv, clean, batch_size=9)
  np.testing.assert_allclose([out['slope'], out['intercept'], out['r']], [1, 0, 1], atol=1e-9)
  assert out['residual_std'] < 1e-9
  h = out['histogram']
  assert h['range'] == 0.063  # 16/255 = 0.0627 rounded up
  counts = np.asarray(h['counts'])
  assert h['outside'] == 0 and counts.sum() == dx.size
  assert counts.sum() == np.trace(counts)  # dx^ == dx: only the diagonal bins


def test_noise_slope_of_a_denoiser_that_does_nothing_is_zero():
  clean, adv, _ = _synthetic()
  out = ha.noise_slope(clean, adv, adv)
  assert out['slope'] == 0.0 and out['intercept'] == 0.0 and out['r'] is None


def test_noise_slope_without_perturbation_is_an_error():
  clean, _, _ = _synthetic()
  with pytest.raises(ValueError, match='dx = 0 everywhere'):
    ha.noise_slope(clean, clean, clean)
  with pytest.raises(ValueError, match='differ in shape'):
    ha.noise_slope(clean, clean[:2], clean)


# ---------------------------------------------------------------------------------------------
# Figures


def _is_png(path):
  with open(path, 'rb') as f:
    head = f.read(8)
  return head == b'\x89PNG\r\n\x1a\n'


def test_plot_amplification_writes_a_png(tmp_path):
  layers = ['pixels', 'E0', 'E1', 'logits']
  curves = {'no defence': {'layers': layers, 'level': [0.05, 0.2, 0.6, 3.0]},
            'LGD': {'layers': layers, 'level': [0.08, 0.05, 0.03, 0.01]},
            'random noise': {'layers': layers, 'level': [0.05, 0.04, 0.0, 0.0001]}}
  path = ha.plot_amplification(curves, str(tmp_path / 'amp.png'), title='toy')
  assert path == str(tmp_path / 'amp.png') and _is_png(path)
  with pytest.raises(ValueError, match='layers'):
    ha.plot_amplification({'a': curves['LGD'], 'b': {'layers': layers[:2], 'level': [1, 2]}},
                          str(tmp_path / 'bad.png'))


def test_plot_noise_slope_writes_a_png(tmp_path):
  clean, adv, dx = _synthetic()
  slopes = {'pixel-guided': ha.noise_slope(clean, adv, adv - 0.6 * dx),
            'LGD': ha.noise_slope(clean, adv, adv - 1.3 * dx),
            'nothing': ha.noise_slope(clean, adv, adv)}
  path = ha.plot_noise_slope(slopes, str(tmp_path / 'slope.png'), title='toy')
  assert path == str(tmp_path / 'slope.png') and _is_png(path)
