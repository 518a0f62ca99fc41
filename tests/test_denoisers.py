"""HGD's denoisers (DUNET, DAE) and PyTorch's align_corners=True bilinear upsampling."""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from defendpp_jax.nn import denoisers
from defendpp_jax.nn.conv import conv_module

TINY = (4, 8, 8, 8, 8)
XLA = conv_module('xla')


def _images(shape, batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, *shape)), jnp.float32)


def _net(arch, channels, widths=TINY, zero_init_last=False, conv=XLA):
  cls = denoisers.DUNET if arch == 'dunet' else denoisers.DAE
  return cls(channels=channels, widths=widths, conv=conv, zero_init_last=zero_init_last)


# Everything runs jitted, each network compiled once (op-by-op dispatch would compile hundreds of
# small kernels).
@functools.cache
def _init(net, shape):
  return jax.jit(net.init)(jax.random.key(0), jnp.zeros((2, *shape), jnp.float32))


@functools.cache
def _run(net, train=False):
  """jit((variables, x) -> (D(x), {'intermediates': ..., 'batch_stats' in training}))."""
  mutable = ['batch_stats', 'intermediates'] if train else ['intermediates']
  return jax.jit(lambda variables, x: net.apply(variables, x, train=train, mutable=mutable,
                                                capture_intermediates=True))


def _reference_resize(x, height, width):
  """PyTorch's align_corners=True bilinear interpolation, pixel by pixel (NHWC, numpy)."""
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  out = np.zeros((n, height, width, c))

  def taps(i, n_in, n_out):
    s = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    i0 = min(int(np.floor(s)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    return i0, i1, s - i0

  for i in range(height):
    y0, y1, fy = taps(i, h, height)
    for j in range(width):
      x0, x1, fx = taps(j, w, width)
      top = (1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1]
      bottom = (1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]
      out[:, i, j] = (1 - fy) * top + fy * bottom
  return out


# --- resize_bilinear_align_corners -------------------------------------------------------------

def test_resize_known_answer_and_exact_corners():
  x = jnp.arange(4.0).reshape(1, 2, 2, 1)
  y = denoisers.resize_bilinear_align_corners(x, 3, 3)
  np.testing.assert_array_equal(np.asarray(y[0, ..., 0]),
                                [[0, .5, 1], [1, 1.5, 2], [2, 2.5, 3]])
  # align_corners=True: the four corner pixels are copied exactly.
  z = jax.random.uniform(jax.random.key(0), (2, 5, 6, 3))
  r = denoisers.resize_bilinear_align_corners(z, 9, 11)
  for a, b in itertools.product((0, -1), (0, -1)):
    np.testing.assert_array_equal(np.asarray(r[:, a, b]), np.asarray(z[:, a, b]))


@pytest.mark.parametrize('src,dst', [((2, 2), (4, 4)), ((4, 4), (7, 7)), ((7, 7), (14, 14)),
                                     ((14, 14), (28, 28)), ((2, 4), (4, 7)), ((1, 3), (3, 5)),
                                     ((7, 7), (4, 4))])
def test_resize_matches_numpy_reference(src, dst):
  x = jax.random.normal(jax.random.key(1), (2, *src, 3))
  resize = jax.jit(denoisers.resize_bilinear_align_corners, static_argnums=(1, 2))
  got = resize(x, *dst)
  assert got.shape == (2, *dst, 3) and got.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(got), _reference_resize(x, *dst), rtol=1e-6, atol=1e-6)


def test_resize_is_differentiable():
  x = jax.random.normal(jax.random.key(2), (1, 4, 4, 2))
  check_grads(lambda v: denoisers.resize_bilinear_align_corners(v, 7, 7), (x,), order=1,
              modes=['rev'], atol=1e-2, rtol=1e-2)
  # Every input pixel contributes: the gradient of the sum is the matrices' column sums (> 0),
  # and upsampling preserves the sum of weights per output pixel (rows sum to 1).
  g = jax.grad(lambda v: jnp.sum(denoisers.resize_bilinear_align_corners(v, 7, 7)))(x)
  assert bool(jnp.all(g > 0))
  np.testing.assert_allclose(float(jnp.sum(g)), 7 * 7 * 2, rtol=1e-6)


# --- the networks ------------------------------------------------------------------------------

@pytest.mark.parametrize('arch', denoisers.ARCHS)
@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
def test_output_shape_and_intermediate_sizes(arch, shape):
  net = _net(arch, shape[-1])
  x = _images(shape)
  variables = _init(net, shape)
  for train in (False, True):
    y, state = _run(net, train)(variables, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    sizes = [state['intermediates'][f'fwd{i}']['__call__'][0].shape[1:3] for i in range(5)]
    back = [state['intermediates'][f'back{i}']['__call__'][0].shape[1:] for i in range(4)]
    side = shape[0]
    expected = [(side, side), (side // 2, side // 2)] + (
        [(7, 7), (4, 4), (2, 2)] if side == 28 else [(8, 8), (4, 4), (2, 2)])
    assert sizes == expected
    assert back == [(*expected[i], TINY[i]) for i in range(4)]


@pytest.mark.parametrize('arch', denoisers.ARCHS)
def test_zero_init_last_is_the_identity_at_init(arch):
  net = _net(arch, 3, zero_init_last=True)
  x = _images((32, 32, 3))
  variables = _init(net, x.shape[1:])
  assert not np.any(np.asarray(variables['params']['final']['kernel']))
  y, _ = _run(net, True)(variables, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  # Without it, the network starts away from the identity (PyTorch's default init; training
  # mode, since at init the running statistics leave the deep feedback maps near 0).
  plain = _net(arch, 3)
  y, _ = _run(plain, True)(_init(plain, x.shape[1:]), x)
  assert float(jnp.max(jnp.abs(y - x))) > 1e-3


@pytest.mark.parametrize('arch', denoisers.ARCHS)
def test_output_is_input_plus_final_conv_of_last_feedback_map(arch):
  net = _net(arch, 1)
  x = _images((28, 28, 1))
  variables = _init(net, x.shape[1:])
  # Training mode: at init the running statistics (0, 1) leave DAE's 28-conv-deep feedback map
  # near 0 (~1e-12); batch statistics keep it O(1).
  y, state = _run(net, True)(variables, x)
  h = state['intermediates']['back0']['__call__'][0]       # the last feedback map, 28x28xw1
  kernel = variables['params']['final']['kernel']           # (1, 1, w1, channels)
  residual = jnp.einsum('nhwc,co->nhwo', h, kernel[0, 0])
  assert float(jnp.max(jnp.abs(residual))) > 1e-3
  np.testing.assert_allclose(np.asarray(y - x), np.asarray(residual), rtol=1e-5, atol=1e-6)
  # Unclipped: the output leaves [0, 1] when the residual is large (scaled last kernel), and
  # D(x) - x is linear in the last kernel.
  params = dict(variables['params'], final={'kernel': 100.0 * kernel})
  y100, _ = _run(net, True)({**variables, 'params': params}, x)
  np.testing.assert_allclose(np.asarray(y100 - x), 100.0 * np.asarray(residual), rtol=1e-4,
                             atol=1e-4)
  assert float(y100.min()) < 0.0 and float(y100.max()) > 1.0


def test_dae_feedback_blocks_do_not_read_the_lateral_maps():
  widths = (4, 6, 8, 10, 12)  # all distinct, so each concatenation shows in the kernel shapes
  x = _images((28, 28, 1))
  params = {arch: jax.eval_shape(_net(arch, 1, widths).init, jax.random.key(0), x)['params']
            for arch in denoisers.ARCHS}
  for i in range(4):
    assert params['dunet'][f'back{i}']['conv0']['kernel'].shape == (
        3, 3, widths[i + 1] + widths[i], widths[i])
    assert params['dae'][f'back{i}']['conv0']['kernel'].shape == (3, 3, widths[i + 1], widths[i])
  assert params['dae']['final']['kernel'].shape == params['dunet']['final']['kernel'].shape


@pytest.mark.parametrize('arch', denoisers.ARCHS)
def test_only_dunet_output_depends_on_fwd0_through_a_lateral_path(arch):
  """A perturbation of fwd0's output, with the gradient cut at fwd1's input: only a lateral
  connection (fwd0 -> back0) still carries a gradient to it."""
  net = _net(arch, 1)
  x = _images((28, 28, 1))
  variables = _init(net, x.shape[1:])
  g = jax.random.normal(jax.random.key(1), x.shape)

  def grad_wrt_fwd0(cut):
    def loss(delta):
      def interceptor(next_fun, args, kwargs, context):
        name = context.module.name if isinstance(context.module, denoisers.ConvBlock) else None
        if name == 'fwd0':
          return next_fun(*args, **kwargs) + delta
        if name == 'fwd1' and cut:
          return next_fun(jax.lax.stop_gradient(args[0]), *args[1:], **kwargs)
        return next_fun(*args, **kwargs)
      with nn.intercept_methods(interceptor):
        y, _ = net.apply(variables, x, train=True, mutable=['batch_stats'])
        return jnp.sum(g * y)
    return jax.jit(jax.grad(loss))(jnp.zeros((2, 28, 28, TINY[0])))

  assert float(jnp.max(jnp.abs(grad_wrt_fwd0(cut=False)))) > 0.0   # the probe works
  lateral = float(jnp.max(jnp.abs(grad_wrt_fwd0(cut=True))))
  if arch == 'dunet':
    assert lateral > 0.0
  else:
    assert lateral == 0.0


def test_train_updates_batch_stats_and_inference_does_not_need_them_mutable():
  net = _net('dunet', 3)
  x = _images((32, 32, 3))
  variables = _init(net, x.shape[1:])
  y, state = _run(net, True)(variables, x)
  old, new = variables['batch_stats'], state['batch_stats']
  assert jax.tree.structure(old) == jax.tree.structure(new)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(old)[0], jax.tree.leaves(new)):
    assert not np.allclose(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
  # Training-mode BatchNorm needs the collection mutable; inference reads the running averages
  # (no `mutable`, no state returned).
  with pytest.raises(Exception, match='batch_stats'):
    jax.jit(lambda v, x: net.apply(v, x, train=True))(variables, x)
  y_eval = jax.jit(net.apply)({**variables, 'batch_stats': new}, x)
  assert isinstance(y_eval, jax.Array) and y_eval.shape == x.shape
  # Inference mixes no images of the batch (running statistics); training does (batch ones).
  other = x.at[1].set(_images((32, 32, 3), batch=1, seed=5)[0])
  evaluate = _run(net, False)
  np.testing.assert_allclose(np.asarray(evaluate(variables, other)[0][0]),
                             np.asarray(evaluate(variables, x)[0][0]), rtol=1e-5, atol=1e-6)
  y_other, _ = _run(net, True)(variables, other)
  assert not np.allclose(np.asarray(y_other[0]), np.asarray(y[0]), atol=1e-4)


def test_project_conv_backend_matches_xla_and_is_differentiable():
  """conv='auto' (oneDNN on one CPU device where it builds) computes what XLA does, in both
  directions, in training mode (batch statistics, so every layer matters)."""
  x = _images((28, 28, 1))
  xla = denoisers.build_denoiser('dunet', 1, TINY, conv='xla')
  auto = denoisers.build_denoiser('dunet', 1, TINY, conv='auto')
  variables = _init(xla, x.shape[1:])
  np.testing.assert_allclose(np.asarray(_run(auto, True)(variables, x)[0]),
                             np.asarray(_run(xla, True)(variables, x)[0]), rtol=1e-4, atol=1e-5)

  def grad(net):
    loss = lambda v: jnp.sum(jnp.square(net.apply(variables, v, train=True,
                                                  mutable=['batch_stats'])[0] - 0.5))
    return jax.jit(jax.grad(loss))(x)

  ga, gx = grad(auto), grad(xla)
  assert bool(jnp.all(jnp.isfinite(ga))) and float(jnp.max(jnp.abs(ga))) > 0.0
  # Batch 2 in training mode: BatchNorm over 8 values at the 2x2 level amplifies the kernels'
  # rounding differences (seen up to 1.8e-4 of the largest gradient without AVX-512), so the
  # tolerance is relative to the gradient's scale; a wrong kernel is off by O(1) of it.
  scale = float(jnp.max(jnp.abs(gx)))
  np.testing.assert_allclose(np.asarray(ga), np.asarray(gx), rtol=1e-3, atol=1e-3 * scale)


# --- the builder -------------------------------------------------------------------------------

def test_build_denoiser():
  net = denoisers.build_denoiser('dunet', 3, [16, 32, 64, 64, 64], conv='xla')
  assert isinstance(net, denoisers.DUNET) and net.lateral and net.channels == 3
  assert net.widths == (16, 32, 64, 64, 64) and not net.zero_init_last
  dae = denoisers.build_denoiser('dae', 1, TINY, conv='xla', zero_init_last=True)
  assert isinstance(dae, denoisers.DAE) and not dae.lateral and dae.zero_init_last
  assert denoisers.build_denoiser('dae', 1).widths == denoisers.DEFAULT_WIDTHS


@pytest.mark.parametrize('kwargs,field', [
    (dict(arch='unet'), 'config.defense.hgd.arch'),
    (dict(arch='DUNET'), 'config.defense.hgd.arch'),
    (dict(widths=(4, 8, 8, 8)), 'config.defense.hgd.widths'),
    (dict(widths=(4, 8, 0, 8, 8)), 'config.defense.hgd.widths'),
    (dict(widths=(4, 8, 8.5, 8, 8)), 'config.defense.hgd.widths'),
    (dict(widths=(4, 8, True, 8, 8)), 'config.defense.hgd.widths'),
    (dict(widths=64), 'config.defense.hgd.widths'),
    (dict(conv='cuda'), 'config.defense.hgd.conv'),
])
def test_build_denoiser_errors(kwargs, field):
  args = dict(arch='dunet', channels=1, widths=TINY, conv='xla') | kwargs
  with pytest.raises(ValueError, match=field.replace('.', r'\.')):
    denoisers.build_denoiser(**args)


def test_module_rejects_bad_widths_and_channels():
  x = _images((28, 28, 1))
  with pytest.raises(ValueError, match=r'config\.defense\.hgd\.widths'):
    _net('dunet', 1, widths=(4, 8, 8)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='channel'):
    _net('dae', 3).init(jax.random.key(0), x)
