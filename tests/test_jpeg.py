"""JPEG defence: Pillow under jit/vmap, the differentiable JPEG against Pillow, gradients."""

import functools
import gzip
import io
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from defendpp_jax.defences import base
from defendpp_jax.defences import jpeg as jpeg_lib

QUALITIES = (10, 25, 50, 75, 95)


@functools.lru_cache(maxsize=None)
def _mnist(n: int = 16) -> np.ndarray:
  """The first n MNIST test digits, (n, 28, 28, 1) uint8."""
  with gzip.open(os.path.join(SHARED_DATA, 'mnist', 't10k-images-idx3-ubyte.gz')) as f:
    header = f.read(16)
    assert int.from_bytes(header[:4], 'big') == 2051  # IDX magic: unsigned bytes, 3 dims
    pixels = np.frombuffer(f.read(n * 28 * 28), np.uint8)
  return pixels.reshape(n, 28, 28, 1)


@functools.lru_cache(maxsize=None)
def _cifar(n: int = 16) -> np.ndarray:
  """The first n CIFAR-10 test images, (n, 32, 32, 3) uint8."""
  with open(os.path.join(SHARED_DATA, 'cifar10-jpeg', 'test_batch'), 'rb') as f:
    data = pickle.load(f, encoding='bytes')[b'data'][:n]
  return data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _pil_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
  """Pillow encode + decode of one (H, W, C) uint8 image, directly."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      buffer, format='JPEG', quality=quality)
  buffer.seek(0)
  return np.asarray(Image.open(buffer)).reshape(image.shape)


def _floats(images: np.ndarray) -> jax.Array:
  return jnp.asarray(images, jnp.float32) / 255.0


@pytest.mark.parametrize('images', [_mnist, _cifar], ids=['mnist-28x28x1', 'cifar-32x32x3'])
def test_pillow_jpeg_under_jit_is_pillow(images):
  images = images(4)
  for quality in (10, 75):
    got = jax.jit(functools.partial(jpeg_lib.pillow_jpeg, quality=quality))(_floats(images))
    want = np.stack([_pil_round_trip(im, quality) for im in images])
    np.testing.assert_array_equal(np.rint(np.asarray(got) * 255.0), want)
    assert got.dtype == jnp.float32 and got.shape == images.shape


def test_pillow_jpeg_under_vmap_equals_a_loop():
  x = _floats(_cifar(6)).reshape(2, 3, 32, 32, 3)
  fn = functools.partial(jpeg_lib.pillow_jpeg, quality=50)
  vmapped = jax.jit(jax.vmap(fn))(x)
  looped = jnp.stack([fn(x[i]) for i in range(2)])
  np.testing.assert_array_equal(np.asarray(vmapped), np.asarray(looped))
  # One image at a time, vmapped twice (the layout EOT uses).
  twice = jax.vmap(jax.vmap(fn))(x)
  np.testing.assert_array_equal(np.asarray(twice), np.asarray(looped))


# jpeg_jax follows libjpeg-turbo's integer arithmetic (islow DCT, fixed-point colour, 4:2:0 with
# fancy upsampling). Measured with Pillow 13.0 (libjpeg-turbo 3.2.0) on x86-64: the
# pixels are identical to Pillow's (100% exact, max difference 0) at every quality 1-100 tried
# (1, 5, 10, 25, 50, 75, 90, 95, 100) on the first 1000 MNIST and 1000 CIFAR-10 test images, and
# on synthetic noise / flat / checkerboard images of sizes 1x1 to 48x50. The tolerance below
# leaves room for a different libjpeg build; all-but-exact agreement is what we measured.
@pytest.mark.parametrize('images', [_mnist, _cifar], ids=['mnist', 'cifar'])
def test_jpeg_jax_agrees_with_pillow_on_natural_images(images):
  images = images(16)
  for quality in QUALITIES:
    stats = jpeg_lib.agreement(images, quality)
    assert stats['within_1'] >= 0.999, stats
    assert stats['exact'] >= 0.99, stats
    assert stats['max_diff'] <= 8, stats


def test_jpeg_jax_handles_sizes_that_are_not_whole_blocks():
  rng = np.random.default_rng(0)
  for shape in [(5, 3, 1), (7, 9, 3), (17, 15, 3), (2, 2, 3)]:
    images = rng.integers(0, 256, (2,) + shape).astype(np.uint8)
    stats = jpeg_lib.agreement(images, 50)
    assert stats['within_1'] >= 0.999, (shape, stats)


def test_smooth_rounding_is_close_to_pillow():
  # Measured: the cubic rounding's values are off libjpeg's by up to 0.125 quantiser steps per
  # coefficient: on 16 CIFAR images 52-99% of values within 1 grey level (q 10-95), MNIST 78-100%.
  stats = jpeg_lib.agreement(_cifar(4), 95, rounding='smooth')
  assert stats['within_1'] >= 0.95 and stats['max_diff'] <= 6, stats


def _weights(x: jax.Array) -> jax.Array:
  return jax.random.normal(jax.random.key(0), x.shape)


@pytest.mark.parametrize('rounding', ['ste', 'smooth'])
def test_jpeg_jax_gradient_is_non_zero_and_finite(rounding):
  for images in (_mnist(2), _cifar(2)):
    x = _floats(images)
    w = _weights(x)
    grad = jax.grad(lambda x: jnp.sum(w * jpeg_lib.jpeg_jax(x, 50, rounding)))(x)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(jnp.mean(grad != 0)) > 0.5
    assert float(jnp.sum(grad * w)) > 0.0  # it points (on average) along the output weights


def test_straight_through_gradient_of_grey_jpeg_is_the_identity_where_unclipped():
  # Grey: DCT (x 8), / (8 q), x q, inverse DCT; with every rounding straight through the
  # Jacobian is the identity (mid-grey images: no sample reaches the [0, 255] clip).
  x = _floats(np.random.default_rng(1).integers(64, 192, (2, 28, 28, 1)))
  w = _weights(x)
  grad = jax.grad(lambda x: jnp.sum(w * jpeg_lib.jpeg_jax(x, 30)))(x)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(w), atol=1e-5)


def test_exact_pillow_gradient_is_zero():
  x = _floats(_cifar(2))
  w = _weights(x)
  loss = lambda x: jnp.sum(w * jpeg_lib.pillow_jpeg(x, 75))  # noqa: E731
  assert float(jnp.max(jnp.abs(jax.grad(loss)(x)))) == 0.0
  assert float(jnp.max(jnp.abs(jax.jit(jax.grad(loss))(x)))) == 0.0


@pytest.mark.parametrize('images', [_mnist, _cifar], ids=['mnist', 'cifar'])
def test_preprocessor_views(images):
  x = _floats(images(2))
  w = _weights(x)
  want = jpeg_lib.pillow_jpeg(x, 60)

  def grad(pre, bpda):
    def loss(x):
      return jnp.sum(w * pre.apply(pre.variables, x, None, bpda))
    return jax.jit(jax.grad(loss))(x)

  for stand_in in jpeg_lib.STAND_INS:
    pre = jpeg_lib.jpeg(60, stand_in)
    np.testing.assert_array_equal(np.asarray(pre.apply(None, x, None, False)), np.asarray(want))
    # BPDA: the same values (up to float rounding of soft + (hard - soft)).
    np.testing.assert_allclose(np.asarray(pre.apply(None, x, None, True)), np.asarray(want),
                               rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(grad(pre, False)))) == 0.0
    assert pre.name == 'jpeg(q=60)' and not pre.randomised
  np.testing.assert_array_equal(np.asarray(grad(jpeg_lib.jpeg(60, 'identity'), True)),
                                np.asarray(w))
  soft = jax.grad(lambda x: jnp.sum(w * jpeg_lib.jpeg_jax(x, 60)))(x)
  np.testing.assert_allclose(np.asarray(grad(jpeg_lib.jpeg(60), True)), np.asarray(soft),
                             rtol=1e-6, atol=1e-6)


def test_stand_ins_and_default_view():
  pre = jpeg_lib.jpeg(75)
  assert pre.stand_ins == (('jpeg(quality=75)',
                            'differentiable JPEG (JAX, straight-through rounding)'),)
  assert jpeg_lib.jpeg(30, 'identity').stand_ins == (('jpeg(quality=30)', 'identity'),)
  net = base.Defence('linear', lambda v, x, key, bpda: x.reshape(len(x), -1) @ v,
                     jnp.ones((28 * 28, 10)))
  defended = base.preprocess(pre, net)
  assert defended.default_view == 'bpda' and defended.stand_ins == pre.stand_ins
  assert defended.logits(defended.variables, _floats(_mnist(2))).shape == (2, 10)


def test_quantisation_tables():
  luma, chroma = jpeg_lib.quantisation_tables(50)
  np.testing.assert_array_equal(luma, jpeg_lib.LUMINANCE_TABLE)
  np.testing.assert_array_equal(chroma, jpeg_lib.CHROMINANCE_TABLE)
  for table in jpeg_lib.quantisation_tables(100):
    np.testing.assert_array_equal(table, np.ones((8, 8)))
  np.testing.assert_array_equal(jpeg_lib.quantisation_tables(1)[0], np.full((8, 8), 255))
  previous = jpeg_lib.quantisation_tables(1)
  for quality in range(2, 101):
    tables = jpeg_lib.quantisation_tables(quality)
    for new, old in zip(tables, previous):
      assert np.all(new <= old) and np.all(new >= 1) and np.all(new <= 255)
    previous = tables
  assert jpeg_lib.quality_scaling(10) == 500 and jpeg_lib.quality_scaling(75) == 50
  # The tables Pillow writes (natural order) are ours.
  image = _cifar(1)[0]
  for quality in (5, 33, 75):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='JPEG', quality=quality)
    written = Image.open(buffer).quantization
    for i, table in enumerate(jpeg_lib.quantisation_tables(quality)):
      np.testing.assert_array_equal(np.asarray(written[i]).reshape(8, 8), table)


@pytest.mark.parametrize('quality', [0, 101, 75.0, True, '75', None])
def test_bad_quality_is_a_clear_error(quality):
  with pytest.raises(ValueError, match='config.defense.jpeg.quality'):
    jpeg_lib.jpeg(quality)
  with pytest.raises(ValueError, match='config.defense.jpeg.quality'):
    jpeg_lib.pillow_jpeg(jnp.zeros((1, 8, 8, 1)), quality)


def test_bad_stand_in_and_rounding_are_clear_errors():
  with pytest.raises(ValueError, match='config.defense.jpeg.stand_in'):
    jpeg_lib.jpeg(75, 'bpda')
  with pytest.raises(ValueError, match='rounding'):
    jpeg_lib.jpeg_jax(jnp.zeros((1, 8, 8, 1)), 75, rounding='floor')
  with pytest.raises(ValueError, match='C in'):
    jpeg_lib.jpeg_jax(jnp.zeros((1, 8, 8, 2)), 75)
