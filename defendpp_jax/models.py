"""Classifiers with named encoding blocks, and the Defend++ auto-encoder built on them.

Usage:
  model = build_model(config.model, num_classes=10, image_shape=(28, 28, 1))
  variables = model.init({'params': key}, images)
  logits, reconstructions = model.apply(variables, images, train=False)
  logits = model.apply(variables, images, method='classify')   # inference: classifier only

Every classifier is a stack of encoding blocks E_0 .. E_{B-1} (each halves the resolution once,
except E_0 of a CIFAR-style ResNet, which keeps it) followed by a head. `DefendPP` runs the
unchanged classifier and, when `decoder != 'none'`, an auto-encoder whose first `shared_blocks`
encoding blocks ARE the classifier's (same parameters, same activations), followed by AE-owned
copies of the remaining blocks and a decoder (paper Sec. 3.3, Figs. 3-4).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from defendpp_jax import frequency
from defendpp_jax import onednn

ARCHS = ('resnet18', 'resnet34', 'resnet50', 'vgg16')
DECODERS = ('pyramid', 'hourglass', 'hourglass_sc', 'hourglass_sa', 'none')
STEMS = ('auto', 'cifar', 'imagenet')
# Which kernels run the convolutions (`config.model.conv`): XLA's own, oneDNN's through an FFI
# call (defendpp_jax.onednn; 2-5x faster on CPU, equal to float tolerance), or 'auto' = oneDNN
# on a single CPU device when its library is available, else XLA.
CONV_BACKENDS = ('auto', 'xla', 'onednn')
# The backend of a config saved before `model.conv` existed: every such run used XLA's kernels.
CONV_BEFORE_FIELD = 'xla'
# Padding of the strided convolutions (`config.model.padding`). 'torch': k // 2 on every side,
# as PyTorch's ResNets (the paper's networks): a 3x3 stride-2 window is then centred on the
# pixel its block's 1x1 stride-2 projection reads. 'same': XLA's 'SAME', which on an even size
# pads 0 before and 1 after, so that window is centred one pixel right of / below the
# projection's. Stride-1 convolutions are padded alike by both.
PADDINGS = ('torch', 'same')
# The padding of a config saved before `model.padding` existed: every such run used 'SAME'.
PADDING_BEFORE_FIELD = 'same'
_CONV = contextvars.ContextVar('defendpp_conv_backend', default='xla')

Features = list[tuple[str, jax.Array]]

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


@contextlib.contextmanager
def conv_backend(name: str):
  """Convolutions traced inside this block use backend `name` (see CONV_BACKENDS)."""
  token = _CONV.set(resolve_conv_backend(name))
  try:
    yield
  finally:
    _CONV.reset(token)


def _onednn_conv(x, w, strides, pads):
  """NHWC / HWIO convolution with oneDNN's forward, input- and kernel-gradient kernels."""

  @jax.custom_vjp
  def conv(x, w):
    return onednn.conv_fwd(x, w, strides, pads)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    return (onednn.conv_bwd_data(g, w, x.shape, strides, pads),
            onednn.conv_bwd_weights(x, g, w.shape, strides, pads))

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
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` whose input gradient reads a physically transposed kernel.

  The input gradient of a convolution is a convolution with the kernel's in/out features
  swapped. JAX expresses the swap in the dimension numbers (XLA kernel layout `01oi`); outside
  loops XLA:CPU materialises a transposed copy and runs its fast kernel, but inside a while loop
  (`lax.fori_loop`, `lax.scan`: every iterative attack) the loop-invariant kernel is read as
  `01oi` directly, which XLA:CPU runs 5-6x slower. Here the backward pass swaps the axes itself,
  behind an optimization barrier so XLA cannot fold the transpose back into the dimension
  numbers: the gradient convolution then uses the canonical `01io` layout everywhere. Values
  are unchanged; only the layout the gradient convolution sees differs.

  Under `conv_backend('onednn')` (a model whose `conv` resolves to oneDNN), a 2-D float32
  NHWC / HWIO convolution without dilation or groups runs oneDNN's kernels instead (forward,
  input gradient and kernel gradient); anything else stays on XLA.
  """
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  if _CONV.get() == 'onednn':
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


def _conv(features: int, kernel: int = 3, strides: int = 1, name: str | None = None,
          padding: str = 'torch') -> nn.Conv:
  pad = 'SAME' if padding == 'same' else ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=pad,
                 use_bias=False, kernel_init=torch_init, conv_general_dilated=conv_general_dilated,
                 name=name)


# BatchNorm's running averages: running = BN_MOMENTUM running + (1 - BN_MOMENTUM) batch, i.e.
# PyTorch's momentum=0.1.
BN_MOMENTUM = 0.9


def _bn(train: bool, name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5,
                      name=name)


# ---------------------------------------------------------------------------------------------
# Encoding blocks. Each returns (output, taps): taps are intermediate features that a decoder
# may read (name, array), deepest last; the output itself is always the last tap.


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  padding: str = 'torch'  # PADDINGS

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.padding
    y = nn.relu(_bn(train)(_conv(self.features, 3, self.strides, padding=pad)(x)))
    y = _bn(train)(_conv(self.features, 3, padding=pad)(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = _bn(train, name='proj_bn')(
          _conv(self.features, 1, self.strides, name='proj', padding=pad)(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  features: int
  strides: int = 1
  expansion: int = 4
  padding: str = 'torch'  # PADDINGS

  @nn.compact
  def __call__(self, x, train: bool):
    out, pad = self.features * self.expansion, self.padding
    y = nn.relu(_bn(train)(_conv(self.features, 1, padding=pad)(x)))
    y = nn.relu(_bn(train)(_conv(self.features, 3, self.strides, padding=pad)(y)))
    y = _bn(train)(_conv(out, 1, padding=pad)(y))
    if x.shape[-1] != out or self.strides != 1:
      x = _bn(train, name='proj_bn')(_conv(out, 1, self.strides, name='proj', padding=pad)(x))
    return nn.relu(x + y)


class ResNetStage(nn.Module):
  """One encoding block of a ResNet: (stem +) a stage of residual blocks."""
  num_blocks: int
  features: int
  strides: int
  block: str = 'basic'
  stem: str | None = None  # 'cifar' | 'imagenet' on E_0 only
  stem_features: int = 64
  padding: str = 'torch'  # PADDINGS

  @nn.compact
  def __call__(self, x, train: bool):
    pad = self.padding
    if self.stem == 'cifar':
      x = nn.relu(_bn(train, name='stem_bn')(
          _conv(self.stem_features, 3, name='stem', padding=pad)(x)))
    elif self.stem == 'imagenet':
      x = nn.relu(_bn(train, name='stem_bn')(
          _conv(self.stem_features, 7, 2, name='stem', padding=pad)(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2),
                      padding='SAME' if pad == 'same' else ((1, 1), (1, 1)))
    cls = BasicBlock if self.block == 'basic' else Bottleneck
    for i in range(self.num_blocks):
      x = cls(self.features, self.strides if i == 0 else 1, padding=pad,
              name=f'block{i}')(x, train)
    return x, [('out', x)]


class VGGStage(nn.Module):
  """One encoding block of VGG16-BN: 2-3 conv-BN-ReLU layers then 2x2 max pooling."""
  num_convs: int
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_convs):
      x = nn.relu(_bn(train, name=f'bn{i}')(_conv(self.features, 3, name=f'conv{i}')(x)))
    pre = x
    # Ceil-mode pooling (7x7 -> 4x4), so that five blocks fit a 28x28 MNIST image (28 -> 1);
    # on 32x32 inputs it is the same as VGG's floor mode.
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    return x, [('pre_pool', pre), ('out', x)]


def encoder_blocks(arch: str, width: int, image_size: int, stem: str = 'auto',
                   padding: str = 'torch') -> list[Callable[..., nn.Module]]:
  """Constructors (call with name=...) of the encoding blocks E_0 .. E_{B-1} of `arch`."""
  if arch not in ARCHS:
    raise ValueError(f'config.model.arch={arch!r} is not one of {ARCHS}')
  if padding not in PADDINGS:
    raise ValueError(f'config.model.padding={padding!r} is not one of {PADDINGS}')
  if width < 1:
    raise ValueError(f'config.model.width must be >= 1, got {width}')
  if arch == 'vgg16':
    convs = (2, 2, 3, 3, 3)
    widths = (width, 2 * width, 4 * width, 8 * width, 8 * width)
    return [functools.partial(VGGStage, n, f) for n, f in zip(convs, widths)]
  if stem not in STEMS:
    raise ValueError(f'config.model.stem={stem!r} is not one of {STEMS}')
  if stem == 'auto':
    stem = 'cifar' if image_size <= 32 else 'imagenet'
  sizes = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3)}[arch]
  block = 'bottleneck' if arch == 'resnet50' else 'basic'
  return [
      functools.partial(ResNetStage, n, width * 2**k, 1 if k == 0 else 2, block,
                        stem if k == 0 else None, width, padding)
      for k, n in enumerate(sizes)
  ]


class Classifier(nn.Module):
  """The plain classification network: normalisation, E_0 .. E_{B-1}, pooling, dense head.

  Inputs are pixels in [0, 1]; the per-channel normalisation lives here, inside the model.
  """
  arch: str
  num_classes: int
  width: int = 64
  image_size: int = 32
  stem: str = 'auto'
  mean: Sequence[float] = (0.5,)
  std: Sequence[float] = (0.5,)
  padding: str = 'torch'  # PADDINGS

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    blocks = encoder_blocks(self.arch, self.width, self.image_size, self.stem, self.padding)
    h = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
    features: list[Features] = []
    for k, ctor in enumerate(blocks):
      h, taps = ctor(name=f'E{k}')(h, train)
      features.append(taps)
    logits = nn.Dense(self.num_classes, kernel_init=torch_init, name='head')(
        jnp.mean(h, axis=(1, 2)))
    return (logits, features) if return_features else logits


# ---------------------------------------------------------------------------------------------
# Decoders.


def _match_size(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Crops (e.g. 8x8 -> 7x7 after a stride-2 deconv of 4x4) or resizes to `size`."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  if h >= size[0] and w >= size[1]:
    return x[:, :size[0], :size[1], :]
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method='nearest')


class UpBlock(nn.Module):
  """A naive decoding block: a mirrored encoding block whose last conv is a stride-2 deconv."""
  features: int
  out_features: int
  final: bool = False  # final: the deconv outputs an image (no BN / ReLU after it)

  @nn.compact
  def __call__(self, x, size: tuple[int, int], train: bool):
    x = nn.relu(_bn(train)(_conv(self.features, 3)(x)))
    x = nn.ConvTranspose(self.out_features, (3, 3), strides=(2, 2), padding='SAME',
                         use_bias=self.final, kernel_init=torch_init)(x)
    x = _match_size(x, size)
    return x if self.final else nn.relu(_bn(train)(x))


class HighFreqBlock(nn.Module):
  """H: a 2-layer 3x3 residual block with a 1x1 skip conv, from encoder features to an image."""
  features: int
  out_features: int

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(_bn(train)(_conv(self.features, 3)(x)))
    y = nn.Conv(self.out_features, (3, 3), padding='SAME', kernel_init=torch_init,
                name='conv_out')(y)
    skip = nn.Conv(self.out_features, (1, 1), kernel_init=torch_init, name='skip')(x)
    return y + skip


def _tap_for(features: list[Features], size: tuple[int, int]) -> jax.Array:
  """The deepest encoder feature with spatial size `size` (else the closest larger one, resized)."""
  flat = [t for block in features for _, t in block]
  exact = [t for t in flat if tuple(t.shape[1:3]) == tuple(size)]
  if exact:
    return exact[-1]
  larger = [t for t in flat if t.shape[1] >= size[0] and t.shape[2] >= size[1]]
  src = larger[-1] if larger else flat[0]
  return jax.image.resize(src, (src.shape[0], *size, src.shape[-1]), method='linear')


def _bottleneck_path(bottleneck: jax.Array, features: list[Features],
                     size: tuple[int, int]) -> list[tuple[tuple[int, int], int]]:
  """(size, channels) of each stride-2 step from the bottleneck up to `size` (mirrors E_{M-1})."""
  h = bottleneck.shape[1]
  steps = max(0, math.ceil(math.log2(size[0] / h))) if h < size[0] else 0
  path = []
  for j in range(steps, 0, -1):
    s = (-(-size[0] // 2**(j - 1)), -(-size[1] // 2**(j - 1)))
    if j == 1:
      s = tuple(size)
    path.append((s, _tap_for(features, s).shape[-1]))
  return path


class PyramidDecoder(nn.Module):
  """The Laplacian-pyramid decoder of Fig. 4: I~m = U(I~m+1) + H(E_m).

  H reads, for level m, the deepest encoder feature at level m's resolution: for a CIFAR-style
  ResNet that is the output of E_m itself (E_0 keeps the full resolution, E_m halves it m times).
  We tap the block's output rather than its input so that the high-frequency band the decoder
  must predict at level m is carried by E_m's own weights, and by the very tensor the classifier
  consumes next: the reconstruction objective then shapes the representation that is classified.
  For VGG the deepest feature at a level's resolution is the block's pre-pooling activation.
  """
  level_sizes: Sequence[tuple[int, int]]
  channels: int

  @nn.compact
  def __call__(self, bottleneck, features: list[Features], train: bool):
    num_levels = len(self.level_sizes)
    coarsest = tuple(self.level_sizes[-1])
    # D_{M-1}: a stack of decoding blocks bringing the bottleneck up to the coarsest level; the
    # last deconvolution outputs the image (3 or 1 channels) only once the feature map has
    # reached that size (paper: upsample to ~7x7 before reducing the channels).
    h = bottleneck
    path = _bottleneck_path(bottleneck, features, coarsest)
    for j, (size, ch) in enumerate(path):
      final = j == len(path) - 1
      h = UpBlock(h.shape[-1], self.channels if final else ch, final=final,
                  name=f'D{num_levels - 1}_up{j}')(h, size, train)
    if not path:
      h = nn.Conv(self.channels, (3, 3), padding='SAME', kernel_init=torch_init,
                  name=f'D{num_levels - 1}_out')(
          _match_size(h, coarsest))
    outputs = [h]
    for m in range(num_levels - 2, -1, -1):
      size = tuple(self.level_sizes[m])
      tap = _tap_for(features, size)
      up = UpBlock(tap.shape[-1], self.channels, final=True, name=f'U{m}')(outputs[0], size, train)
      high = HighFreqBlock(tap.shape[-1], self.channels, name=f'H{m}')(tap, train)
      outputs.insert(0, up + high)
    return outputs


class HourglassDecoder(nn.Module):
  """The hourglass decoder of Fig. 3 (mirrored encoder) with an image output at every level.

  skip: None (plain hourglass), 'concat' (U-Net style, "Hourglass+SC") or 'add' ("Hourglass+SA"):
  the decoder features at level m are combined with the encoder features at the same resolution.
  """
  level_sizes: Sequence[tuple[int, int]]
  channels: int
  skip: str | None = None

  def _combine(self, h, features, size, name, train):
    if self.skip is None:
      return h
    tap = _tap_for(features, size)
    if self.skip == 'add':
      if tap.shape[-1] != h.shape[-1]:
        tap = nn.Conv(h.shape[-1], (1, 1), kernel_init=torch_init, name=f'{name}_skip_proj')(tap)
      return h + tap
    h = jnp.concatenate([h, tap], axis=-1)
    return nn.relu(_bn(train, name=f'{name}_skip_bn')(
        _conv(tap.shape[-1], 3, name=f'{name}_skip_conv')(h)))

  @nn.compact
  def __call__(self, bottleneck, features: list[Features], train: bool):
    num_levels = len(self.level_sizes)
    coarsest = tuple(self.level_sizes[-1])
    h = bottleneck
    for j, (size, ch) in enumerate(_bottleneck_path(bottleneck, features, coarsest)):
      h = UpBlock(h.shape[-1], ch, name=f'D{num_levels - 1}_up{j}')(h, size, train)
    h = _match_size(h, coarsest)
    outputs = []
    for m in range(num_levels - 1, -1, -1):
      size = tuple(self.level_sizes[m])
      if m < num_levels - 1:
        ch = _tap_for(features, size).shape[-1]
        h = UpBlock(h.shape[-1], ch, name=f'D{m}')(h, size, train)
      h = self._combine(h, features, size, f'D{m}', train)
      outputs.insert(0, nn.Conv(self.channels, (3, 3), padding='SAME', kernel_init=torch_init,
                                name=f'out{m}')(h))
    return outputs


# ---------------------------------------------------------------------------------------------


class DefendPP(nn.Module):
  """Classifier + auto-encoder sharing the first `shared_blocks` encoding blocks.

  `__call__` returns (logits, [I~0, ..., I~{M-1}]) (an empty list for decoder='none');
  `classify` runs the classifier alone, which is all that inference ever uses.
  """
  arch: str = 'resnet18'
  num_classes: int = 10
  image_shape: tuple[int, int, int] = (28, 28, 1)
  width: int = 64
  shared_blocks: int = 4
  decoder: str = 'pyramid'
  num_levels: int = 0  # 0: as many as keep the coarsest level >= 7x7 (paper Sec. 3.4)
  noise_std: float = 0.0
  stem: str = 'auto'
  mean: Sequence[float] = (0.5,)
  std: Sequence[float] = (0.5,)
  conv: str = 'auto'  # CONV_BACKENDS: which kernels run the convolutions
  padding: str = 'torch'  # PADDINGS: of the strided convolutions

  def setup(self):
    h, w, _ = self.image_shape
    self.blocks = encoder_blocks(self.arch, self.width, min(h, w), self.stem, self.padding)
    if self.decoder not in DECODERS:
      raise ValueError(f'config.model.decoder={self.decoder!r} is not one of {DECODERS}')
    if not 1 <= self.shared_blocks <= len(self.blocks):
      raise ValueError(f'config.model.shared_blocks={self.shared_blocks} must be in '
                       f'[1, {len(self.blocks)}] for {self.arch}')
    self.classifier = Classifier(self.arch, self.num_classes, self.width, min(h, w), self.stem,
                                 tuple(self.mean), tuple(self.std), self.padding)
    if self.decoder == 'none':
      return
    for k in range(self.shared_blocks, len(self.blocks)):
      setattr(self, f'ae_E{k}', self.blocks[k]())  # AE-owned copy of E_k, named ae_E{k}
    sizes = tuple(frequency.level_sizes(h, w, self.levels))
    if self.decoder == 'pyramid':
      self.dec = PyramidDecoder(sizes, self.image_shape[-1])
    else:
      skip = {'hourglass': None, 'hourglass_sc': 'concat', 'hourglass_sa': 'add'}[self.decoder]
      self.dec = HourglassDecoder(sizes, self.image_shape[-1], skip)

  @property
  def levels(self) -> int:
    h, w, _ = self.image_shape
    auto = frequency.max_levels(h, w)
    if self.num_levels < 0 or self.num_levels > auto:
      raise ValueError(f'config.model.num_levels={self.num_levels} must be in [0, {auto}] for '
                       f'{h}x{w} images (0 = auto; no level below 7x7)')
    return self.num_levels or auto

  def __call__(self, x, train: bool = False):
    with conv_backend(self.conv):
      return self._forward(x, train)

  def _forward(self, x, train: bool):
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f'expected images of shape (N, {", ".join(map(str, self.image_shape))}), '
                       f'got {x.shape}')
    logits, features = self.classifier(x, train=train, return_features=True)
    if self.decoder == 'none':
      return logits, []
    # The shared blocks are the classifier's own blocks on the same input: their activations are
    # reused as they are, so the AE and the classifier see one set of weights and one forward.
    ae_features = list(features[:self.shared_blocks])
    h = ae_features[-1][-1][1]
    for k in range(self.shared_blocks, len(self.blocks)):
      h, taps = getattr(self, f'ae_E{k}')(h, train)
      ae_features.append(taps)
    if train and self.noise_std > 0:
      # "ours + GN": Gaussian noise on the AE's bottleneck code during training (as ComDefend).
      h = h + self.noise_std * jax.random.normal(self.make_rng('noise'), h.shape, h.dtype)
    return logits, self.dec(h, ae_features, train)

  def classify(self, x, train: bool = False):
    """The classifier alone; inference (train=False) uses BatchNorm's stored statistics."""
    with conv_backend(self.conv):
      return self.classifier(x, train=train)


def build_model(model_config: Any, num_classes: int, image_shape: Sequence[int],
                mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                noise_std: float = 0.0) -> DefendPP:
  """Builds a `DefendPP` from `config.model` (fields arch, width, shared_blocks, decoder...)."""
  return DefendPP(
      arch=model_config.arch, num_classes=num_classes, image_shape=tuple(image_shape),
      width=model_config.width, shared_blocks=model_config.shared_blocks,
      decoder=model_config.decoder, num_levels=model_config.get('num_levels', 0),
      noise_std=noise_std, stem=model_config.get('stem', 'auto'), mean=tuple(mean), std=tuple(std),
      conv=model_config.get('conv', CONV_BEFORE_FIELD),
      padding=model_config.get('padding', PADDING_BEFORE_FIELD))


def classifier_logits_fn(model: DefendPP, variables: Any) -> Callable[[jax.Array], jax.Array]:
  """A pure `images -> logits` function of the inference-mode classifier (for attacks)."""
  return functools.partial(model.apply, variables, method='classify')


def classify_apply(model: DefendPP) -> Callable[[Any, jax.Array], jax.Array]:
  """A pure `(variables, images) -> logits` of the inference-mode classifier."""
  return functools.partial(model.apply, method='classify')
