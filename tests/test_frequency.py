"""DCT low-pass targets against scipy, scale preservation, and the linear variant."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

from defendpp_jax import frequency


def _scipy_lowpass(x, k_h, k_w):
  coeffs = scipy.fft.dctn(x.astype(np.float64), type=2, axes=(1, 2), norm='ortho')
  low = scipy.fft.idctn(coeffs[:, :k_h, :k_w], type=2, axes=(1, 2), norm='ortho')
  return low * np.sqrt(k_h * k_w / (x.shape[1] * x.shape[2]))


@pytest.mark.parametrize('shape', [(3, 28, 28, 1), (2, 32, 32, 3), (2, 28, 32, 3)])
def test_dct_targets_equal_scipy(shape):
  x = np.random.default_rng(0).uniform(size=shape).astype(np.float32)
  levels = frequency.max_levels(shape[1], shape[2])
  pyramid = frequency.lowpass_pyramid(jnp.asarray(x), levels)
  assert len(pyramid) == levels == 3
  np.testing.assert_array_equal(np.asarray(pyramid[0]), x)
  for m, level in enumerate(pyramid):
    k_h, k_w = shape[1] // 2**m, shape[2] // 2**m
    chex.assert_shape(level, (shape[0], k_h, k_w, shape[3]))
    np.testing.assert_allclose(np.asarray(level), _scipy_lowpass(x, k_h, k_w), atol=2e-6)


@pytest.mark.parametrize('kind', frequency.TARGET_KINDS)
def test_constant_image_keeps_its_intensity(kind):
  # The rescaling keeps every level on the input's [0, 1] scale: a constant image stays constant.
  x = jnp.full((2, 32, 32, 3), 0.7, jnp.float32)
  for level in frequency.lowpass_pyramid(x, 3, kind=kind)[1:]:
    np.testing.assert_allclose(np.asarray(level), 0.7, atol=1e-5)


def test_dct_lowpass_removes_high_frequencies():
  # A pure high-frequency DCT basis image vanishes at every coarser level; a low one survives.
  coeffs = np.zeros((1, 28, 28, 1), np.float64)
  coeffs[0, 20, 3, 0] = 1.0  # vertical frequency 20 > 14: outside level 1's 14x14 block
  coeffs[0, 2, 1, 0] = 0.5
  x = scipy.fft.idctn(coeffs, axes=(1, 2), norm='ortho').astype(np.float32)
  p1 = np.asarray(frequency.lowpass_pyramid(jnp.asarray(x), 2)[1])
  only_low = scipy.fft.idctn(np.where(np.arange(28)[:, None] < 14, coeffs[0, :, :, 0], 0)
                             [None, :14, :14, None], axes=(1, 2), norm='ortho') * 0.5
  np.testing.assert_allclose(p1, only_low, atol=1e-6)


def test_linear_targets_are_bilinear_downsampling():
  x = np.random.default_rng(1).uniform(size=(2, 28, 28, 1)).astype(np.float32)
  p = frequency.lowpass_pyramid(jnp.asarray(x), 3, kind='linear')
  chex.assert_shape(p[1], (2, 14, 14, 1))
  # A 2x bilinear reduction of a 2x2-block-constant image is exactly the block values.
  blocks = np.random.default_rng(2).uniform(size=(1, 14, 14, 1)).astype(np.float32)
  up = np.repeat(np.repeat(blocks, 2, axis=1), 2, axis=2)
  down = np.asarray(frequency.lowpass_pyramid(jnp.asarray(up), 2, kind='linear')[1])
  np.testing.assert_allclose(down, blocks, atol=1e-6)


def test_bad_arguments_raise():
  x = jnp.zeros((1, 28, 28, 1))
  with pytest.raises(ValueError, match='kind'):
    frequency.lowpass_pyramid(x, 2, kind='wavelet')
  with pytest.raises(ValueError, match='NHWC'):
    frequency.lowpass_pyramid(jnp.zeros((28, 28)), 2)
  with pytest.raises(ValueError, match='too many'):
    frequency.lowpass_pyramid(x, 6)
