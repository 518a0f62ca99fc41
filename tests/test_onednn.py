"""oneDNN convolutions (FFI): same values and gradients as XLA's, routed where the model asks."""

import os
import platform
import re
import subprocess

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from defendpp_jax import nn as models
from defendpp_jax.nn import onednn

from conftest import run_python

if not (platform.system() == 'Linux' and platform.machine() == 'x86_64'):
  pytest.skip('the oneDNN pip packages exist for Linux x86-64 only', allow_module_level=True)

DN = ('NHWC', 'HWIO', 'NHWC')


def test_library_builds_here():
  ok, why = onednn.available()
  assert ok, why


@pytest.mark.parametrize('shape,kernel,strides,padding', [
    ((2, 9, 8, 1), (3, 3, 1, 4), (1, 1), 'SAME'),            # 1-channel stem
    ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 9, 4), (3, 3, 4, 6), (2, 2), 'SAME'),            # odd size, stride 2
    ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), 'VALID'),           # 1x1 projection
    ((2, 16, 16, 3), (7, 7, 3, 4), (2, 2), ((3, 2), (2, 3))),  # asymmetric explicit padding
])
def test_values_and_gradients_match_xla(shape, kernel, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel), jnp.float32)

  def conv(backend):
    def f(x, w):
      return models.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN,
                                         backend=backend)
    return f

  want = jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)
  got = jax.jit(conv('onednn'))(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  g = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  _, vjp_ref = jax.vjp(lambda x, w: jax.lax.conv_general_dilated(
      x, w, strides, padding, dimension_numbers=DN), x, w)
  _, vjp = jax.vjp(conv('onednn'), x, w)
  for a, b in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
  # The oneDNN path really ran: the compiled function calls the FFI targets.
  assert 'DppConvFwd' in jax.jit(conv('onednn')).lower(x, w).as_text()
  hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(conv('onednn')(x, w) * g), (0, 1))).lower(
      x, w).as_text()
  assert 'DppConvBwdData' in hlo
  # The kernel gradient of a strided 1x1 kernel with < 8 input channels is XLA's (below).
  xla_wgrad = kernel[:2] == (1, 1) and strides != (1, 1) and kernel[2] < 8
  assert ('DppConvBwdWeights' in hlo) == (not xla_wgrad)


def test_strided_projection_kernel_gradient_is_right():
  # oneDNN 2023.2's kernel gradient of a 1x1 stride-2 convolution on 28x28x4 inputs (the E1
  # projection of a width-4 ResNet on MNIST) was wrong (or never returned); the project's
  # convolution takes XLA's for strided 1x1 kernels of < 8 input channels. Known answer: lax's.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 28, 28, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(1, 1, 4, 8)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(4, 14, 14, 8)), jnp.float32)
  pads = ((0, 0), (0, 0))
  _, vjp_ref = jax.vjp(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (2, 2), pads, dimension_numbers=DN), x, w)
  _, vjp = jax.vjp(lambda x, w: models.conv_general_dilated(
      x, w, (2, 2), pads, dimension_numbers=DN, backend='onednn'), x, w)
  for a, b in zip(jax.jit(vjp)(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_vmap_folds_the_mapped_axis_into_the_batch():
  # EOT vmaps a model over its random draws: under vmap over the input only, one oneDNN call
  # runs all B x N images (values and input gradients as XLA's); a mapped kernel is mapped
  # sequentially, also right.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(5, 4, 9, 9, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 6)), jnp.float32)

  def value_and_grad(backend):
    def loss(x):
      return jnp.sum(jnp.sin(models.conv_general_dilated(
          x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN, backend=backend)))
    return jax.jit(jax.vmap(jax.value_and_grad(loss)))

  for a, b in zip(value_and_grad('onednn')(x), value_and_grad('xla')(x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  hlo = value_and_grad('onednn').lower(x).as_text()
  assert 'tensor<20x9x9x3xf32>' in hlo and 'DppConvBwdData' in hlo  # 5 x 4 images, one call
  ws = jnp.asarray(rng.normal(size=(5, 3, 3, 3, 6)), jnp.float32)
  conv = lambda backend: jax.jit(jax.vmap(lambda x, w: models.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, backend=backend)))
  np.testing.assert_allclose(conv('onednn')(x, ws), conv('xla')(x, ws), rtol=1e-4, atol=1e-4)


def _model(conv):
  cfg = ml_collections.ConfigDict({'arch': 'resnet18', 'width': 4, 'shared_blocks': 2,
                                   'decoder': 'pyramid', 'num_levels': 0, 'stem': 'auto',
                                   'conv': conv})
  return models.build_model(cfg, 10, (28, 28, 1))


def test_model_logits_input_gradient_and_training_loss_match():
  x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
  y = jnp.arange(4) % 10
  ref, fast = _model('xla'), _model('onednn')
  variables = ref.init(jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes(variables, fast.init(jax.random.key(0), x))

  def input_grad(model):  # what an attack computes, inside a while loop as the attacks run it
    def loss(x):
      logits = model.apply(variables, x, method='classify')
      return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(4), y])
    return jax.jit(lambda x: jax.lax.fori_loop(0, 2, lambda i, v: v + jax.grad(loss)(x), 0 * x))

  np.testing.assert_allclose(jax.jit(fast.apply, static_argnames='method')(
      variables, x, method='classify'), ref.apply(variables, x, method='classify'),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(input_grad(fast)(x), input_grad(ref)(x), rtol=1e-3, atol=1e-5)

  def param_grad(model):  # the training step's weight gradients, BatchNorm in train mode
    def loss(params):
      (logits, recs), _ = model.apply({**variables, 'params': params}, x, train=True,
                                      mutable=['batch_stats'])
      return jnp.mean(logits ** 2) + sum(jnp.mean(r ** 2) for r in recs)
    return jax.jit(jax.grad(loss))(variables['params'])

  chex.assert_trees_all_close(param_grad(fast), param_grad(ref), rtol=1e-3, atol=1e-5)
  assert 'DppConvBwdWeights' in jax.jit(jax.grad(lambda p: jnp.sum(fast.apply(
      {**variables, 'params': p}, x, method='classify')))).lower(variables['params']).as_text()


def test_backend_choice(monkeypatch):
  assert models.resolve_conv_backend('xla') == 'xla'
  assert models.conv_kernels('xla') == {'conv_backend': 'xla', 'conv_library': None}
  with pytest.raises(ValueError, match=r'config\.model\.conv'):
    models.resolve_conv_backend('mkl')
  if onednn.available()[0]:  # the summary names the library build (hash of source + versions)
    kernels = models.conv_kernels('onednn')
    assert kernels == {'conv_backend': 'onednn', 'conv_library': os.path.basename(onednn.load())}
    assert re.fullmatch(r'onednn_conv-[0-9a-f]{16}\.so', kernels['conv_library'])
  monkeypatch.setattr(onednn, 'available', lambda: (False, 'no library here'))
  assert models.resolve_conv_backend('auto') == 'xla'  # falls back silently
  with pytest.raises(ValueError, match=r'config\.model\.conv=onednn.*no library here'):
    models.resolve_conv_backend('onednn')  # asked for explicitly: a clear error


def test_independent_convolutions_in_one_program_are_right_and_do_not_hang():
  """XLA runs independent FFI calls concurrently: oneDNN kernels executed from two threads at
  once hung or returned wrong values (a short training run's weights blew up) until serialised."""
  code = """
      import jax, jax.numpy as jnp, numpy as np
      from defendpp_jax.nn import onednn
      pad = ((1, 1), (1, 1))
      def f(xs, ws, fast):
        outs = []
        for x, w in zip(xs, ws):
          if fast:
            y = onednn.conv_fwd(x, w, (1, 1), pad)
            dx = onednn.conv_bwd_data(y, w, x.shape, (1, 1), pad)
            dw = onednn.conv_bwd_weights(x, y, w.shape, (1, 1), pad)
          else:
            conv = lambda x, w: jax.lax.conv_general_dilated(
                x, w, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
            y, vjp = jax.vjp(conv, x, w)
            dx, dw = vjp(y)
          outs += [y, dx, dw]
        return outs
      k = jax.random.split(jax.random.key(0), 16)
      xs = [jax.random.normal(k[i], (16, 16, 16, 8)) for i in range(8)]
      ws = [jax.random.normal(k[8 + i], (3, 3, 8, 8)) for i in range(8)]
      want = jax.jit(f, static_argnums=2)(xs, ws, False)
      fast = jax.jit(f, static_argnums=2)
      worst = 0.
      for _ in range(100):
        got = fast(xs, ws, True)
        worst = max(worst, max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                               for a, b in zip(got, want)))
      print(worst)
      """
  try:
    out = run_python(code, timeout=240)
  except subprocess.TimeoutExpired:
    pytest.fail('a jitted program with independent oneDNN convolutions hung (4 min)')
  assert float(out.split()[-1]) < 1e-4  # relative to each output's largest entry
