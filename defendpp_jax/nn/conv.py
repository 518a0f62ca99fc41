"""The project's convolution: XLA's kernels with a fast input gradient, or oneDNN's on CPU.

Usage (a new Flax module gets the project's kernels by taking `conv` as an attribute):

  class MyNet(nn.Module):
    conv: ModuleDef = Conv            # the project's nn.Conv; backend 'auto'
    @nn.compact
    def __call__(self, x):
      return self.conv(16, (3, 3))(x)

  net = MyNet(conv=conv_module('onednn'))   # or 'xla' / 'auto' (config.model.conv)

The backend is bound into the module (no global state): 'auto' resolves, when the model is traced,
to oneDNN on a single CPU device where its library builds, else XLA.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from defendpp_jax.nn import onednn

ModuleDef = Any

# Which kernels run the convolutions (`config.model.conv`): XLA's own, oneDNN's through an FFI
# call (2-5x faster on CPU, equal to float tolerance), or 'auto' = oneDNN on a single CPU device
# when its library is available, else XLA.
CONV_BACKENDS = ('auto', 'xla', 'onednn')
# The backend of a config saved before `model.conv` existed: every such run used XLA's kernels.
CONV_BEFORE_FIELD = 'xla'

# PyTorch's default initialisation of Conv2d / Linear / ConvTranspose2d weights (kaiming_uniform
# with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))), which the paper's networks were
# trained with. Behind BatchNorm the weight scale sets the effective learning rate
# (lr / ||w||^2), so flax's default lecun_normal, sqrt(3) times larger, trains ~3x slower at the
# paper's learning rates.
torch_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def resolve_conv_backend(name: str) -> str:
  """'xla' or 'onednn' for `config.model.conv` (a clear error if oneDNN is asked for and absent)."""
  if name not in CONV_BACKENDS:
    raise ValueError(f'config.model.conv={name!r} is not one of {CONV_BACKENDS}')
  if name == 'xla':
    return 'xla'
  if name == 'auto' and (jax.default_backend() != 'cpu' or jax.device_count() > 1):
    return 'xla'  # oneDNN is a CPU library; the FFI call has no multi-device partitioning
  ok, why = onednn.available()
  if ok:
    return 'onednn'
  if name == 'onednn':
    raise ValueError(f'config.model.conv=onednn, but the oneDNN convolutions are unavailable: '
                     f'{why}')
  return 'xla'


def conv_kernels(name: str) -> dict[str, str | None]:
  """What a run's convolutions ran on, for its summary: the backend `name` resolves to and, on
  oneDNN, the file name of the FFI library (it carries a hash of the C++ source, the jax /
  jaxlib versions and the oneDNN library it was built against)."""
  backend = resolve_conv_backend(name)
  library = os.path.basename(onednn.load()) if backend == 'onednn' else None
  return {'conv_backend': backend, 'conv_library': library}


def _onednn_conv(x, w, strides, pads):
  """NHWC / HWIO convolution with oneDNN's forward, input- and kernel-gradient kernels.

  The kernel gradient of a strided 1x1 convolution (a ResNet's projection) with fewer than 8
  input channels is XLA's: oneDNN 2023.2's is wrong (uninitialised values), or never returns, on
  28x28 inputs with 1-6 channels (width-4 nets on MNIST; tests/test_onednn.py); with 8 or more
  input channels it matched XLA's on every shape tried.
  """

  @jax.custom_vjp
  def conv(x, w):
    return onednn.conv_fwd(x, w, strides, pads)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    if w.shape[:2] == (1, 1) and tuple(strides) != (1, 1) and w.shape[2] < 8:
      _, vjp_w = jax.vjp(lambda w_: jax.lax.conv_general_dilated(
          x, w_, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC')), w)
      dw = vjp_w(g)[0]
    else:
      dw = onednn.conv_bwd_weights(x, g, w.shape, strides, pads)
    return onednn.conv_bwd_data(g, w, x.shape, strides, pads), dw

  conv.defvjp(fwd, bwd)
  return conv(x, w)


def _onednn_geometry(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dn,
                     feature_group_count, batch_group_count, precision,
                     preferred_element_type):
  """(strides, explicit padding) when oneDNN can run this convolution, else None."""
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  if (lhs.ndim != 4 or dn != nhwc or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32
      or feature_group_count != 1 or batch_group_count != 1 or precision is not None
      or preferred_element_type not in (None, jnp.float32)
      or any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))):
    return None
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in pads for p in pair):
    return None
  return tuple(int(s) for s in window_strides), pads


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         *, backend: str = 'xla'):
  """`lax.conv_general_dilated` on the project's kernels (`backend` in CONV_BACKENDS).

  On XLA, the input gradient reads a physically transposed kernel. The input gradient of a
  convolution is a convolution with the kernel's in/out features swapped. JAX expresses the swap
  in the dimension numbers (XLA kernel layout `01oi`); outside loops XLA:CPU materialises a
  transposed copy and runs its fast kernel, but inside a while loop (`lax.fori_loop`,
  `lax.scan`: every iterative attack) the loop-invariant kernel is read as `01oi` directly,
  which XLA:CPU runs 5-6x slower. Here the backward pass swaps the axes itself, behind an
  optimization barrier so XLA cannot fold the transpose back into the dimension numbers: the
  gradient convolution then uses the canonical `01io` layout everywhere. Values are unchanged.

  On oneDNN (`backend` 'onednn', or 'auto' where it resolves to it), a 2-D float32 NHWC / HWIO
  convolution without dilation or groups runs oneDNN's kernels instead (forward, input gradient
  and kernel gradient); anything else stays on XLA.
  """
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if backend != 'xla' and resolve_conv_backend(backend) == 'onednn':
    geometry = _onednn_geometry(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dn, feature_group_count, batch_group_count, precision,
                                preferred_element_type)
    if geometry is not None:
      return _onednn_conv(lhs, rhs, *geometry)
  kwargs = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, feature_group_count=feature_group_count,
                batch_group_count=batch_group_count, precision=precision,
                preferred_element_type=preferred_element_type)
  if feature_group_count != 1 or batch_group_count != 1:
    return jax.lax.conv_general_dilated(lhs, rhs, dimension_numbers=dn, **kwargs)
  out_axis, in_axis = dn.rhs_spec[0], dn.rhs_spec[1]
  swapped_dn = dn._replace(rhs_spec=(in_axis, out_axis) + tuple(dn.rhs_spec[2:]))

  @jax.custom_vjp
  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, dimension_numbers=dn, **kwargs)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    w_swapped = jax.lax.optimization_barrier(jnp.swapaxes(w, out_axis, in_axis))
    _, vjp_x = jax.vjp(lambda x_: jax.lax.conv_general_dilated(
        x_, w_swapped, dimension_numbers=swapped_dn, **kwargs), x)
    _, vjp_w = jax.vjp(lambda w_: jax.lax.conv_general_dilated(
        x, w_, dimension_numbers=dn, **kwargs), w)
    return vjp_x(g)[0], vjp_w(g)[0]

  conv.defvjp(fwd, bwd)
  return conv(lhs, rhs)


@functools.cache
def conv_module(backend: str = 'auto') -> Callable[..., nn.Conv]:
  """`nn.Conv` running the project's convolution on `backend` (cached: one object per name, so
  modules built with the same backend compare and hash equal)."""
  if backend not in CONV_BACKENDS:
    raise ValueError(f'config.model.conv={backend!r} is not one of {CONV_BACKENDS}')
  return functools.partial(nn.Conv, conv_general_dilated=functools.partial(
      conv_general_dilated, backend=backend))


# The default convolution of every module of the project.
Conv = conv_module('auto')


def make_conv(conv_cls: ModuleDef, features: int, kernel: int = 3, strides: int = 1,
         name: str | None = None, padding: str = 'torch') -> nn.Conv:
  """A bias-free k x k convolution with PyTorch's initialisation and padding `padding`
  ('torch': k // 2 on every side; 'same': XLA's 'SAME')."""
  pad = 'SAME' if padding == 'same' else ((kernel // 2, kernel // 2),) * 2
  return conv_cls(features, (kernel, kernel), strides=(strides, strides), padding=pad,
                  use_bias=False, kernel_init=torch_init, name=name)
