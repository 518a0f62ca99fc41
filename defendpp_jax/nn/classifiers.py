"""Classifiers as stacks of named encoding blocks: ResNet-18/34/50 and VGG16-BN.

Usage:
  cls = Classifier('resnet18', num_classes=10, width=16, image_size=28, conv=conv_module('auto'))
  logits = cls.apply(variables, images)                            # inference mode
  logits, features = cls.apply(variables, images, return_features=True)

Every classifier is E_0 .. E_{B-1} (each halves the resolution once, except E_0 of a CIFAR-style
ResNet, which keeps it) followed by global pooling and a dense head. Each block returns
(output, taps): intermediate features that a decoder may read (name, array), deepest last.
Inputs are pixels in [0, 1]; the per-channel normalisation lives inside the model. The
convolution is injected (`conv`, default the project's `nn.conv.Conv`).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from defendpp_jax.nn.conv import Conv
from defendpp_jax.nn.conv import ModuleDef
from defendpp_jax.nn.conv import make_conv
from defendpp_jax.nn.conv import torch_init

ARCHS = ('resnet18', 'resnet34', 'resnet50', 'vgg16')
STEMS = ('auto', 'cifar', 'imagenet')
# Padding of the strided convolutions (`config.model.padding`). 'torch': k // 2 on every side,
# as PyTorch's ResNets (the paper's networks): a 3x3 stride-2 window is then centred on the
# pixel its block's 1x1 stride-2 projection reads. 'same': XLA's 'SAME', which on an even size
# pads 0 before and 1 after, so that window is centred one pixel right of / below the
# projection's. Stride-1 convolutions are padded alike by both.
PADDINGS = ('torch', 'same')
# The padding of a config saved before `model.padding` existed: every such run used 'SAME'.
PADDING_BEFORE_FIELD = 'same'
# How a residual block aggregates its shortcut x and its branch F(x): 'sum' x + F(x) (ResNet);
# 'convex' (x + F(x)) / 2 (Parseval networks: a convex combination keeps the block's Lipschitz
# constant at most that of its parts).
RESIDUALS = ('sum', 'convex')


def aggregate(x: jax.Array, y: jax.Array, residual: str) -> jax.Array:
  return x + y if residual == 'sum' else 0.5 * (x + y)

Features = list[tuple[str, jax.Array]]

# BatchNorm's running averages: running = BN_MOMENTUM running + (1 - BN_MOMENTUM) batch, i.e.
# PyTorch's momentum=0.1.
BN_MOMENTUM = 0.9


class ReLU(nn.Module):
  """The classifiers' activation as a module (no parameters): the point where a defence that
  acts on activations (SAP) intercepts them, with `nn.intercept_methods`."""

  @nn.compact
  def __call__(self, x):
    return nn.relu(x)


def relu(x: jax.Array) -> jax.Array:
  """ReLU through the interceptable `ReLU` module (call inside a compact method)."""
  return ReLU()(x)


def bn(train: bool, name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5,
                      name=name)


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  padding: str = 'torch'  # PADDINGS
  conv: ModuleDef = Conv
  residual: str = 'sum'   # RESIDUALS

  @nn.compact
  def __call__(self, x, train: bool):
    pad, c = self.padding, self.conv
    y = relu(bn(train)(make_conv(c, self.features, 3, self.strides, padding=pad)(x)))
    y = bn(train)(make_conv(c, self.features, 3, padding=pad)(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = bn(train, name='proj_bn')(
          make_conv(c, self.features, 1, self.strides, name='proj', padding=pad)(x))
    return relu(aggregate(x, y, self.residual))


class Bottleneck(nn.Module):
  features: int
  strides: int = 1
  expansion: int = 4
  padding: str = 'torch'  # PADDINGS
  conv: ModuleDef = Conv
  residual: str = 'sum'   # RESIDUALS

  @nn.compact
  def __call__(self, x, train: bool):
    out, pad, c = self.features * self.expansion, self.padding, self.conv
    y = relu(bn(train)(make_conv(c, self.features, 1, padding=pad)(x)))
    y = relu(bn(train)(make_conv(c, self.features, 3, self.strides, padding=pad)(y)))
    y = bn(train)(make_conv(c, out, 1, padding=pad)(y))
    if x.shape[-1] != out or self.strides != 1:
      x = bn(train, name='proj_bn')(
          make_conv(c, out, 1, self.strides, name='proj', padding=pad)(x))
    return relu(aggregate(x, y, self.residual))


class ResNetStage(nn.Module):
  """One encoding block of a ResNet: (stem +) a stage of residual blocks."""
  num_blocks: int
  features: int
  strides: int
  block: str = 'basic'
  stem: str | None = None  # 'cifar' | 'imagenet' on E_0 only
  stem_features: int = 64
  padding: str = 'torch'  # PADDINGS
  conv: ModuleDef = Conv
  residual: str = 'sum'   # RESIDUALS

  @nn.compact
  def __call__(self, x, train: bool):
    pad, c = self.padding, self.conv
    if self.stem == 'cifar':
      x = relu(bn(train, name='stem_bn')(
          make_conv(c, self.stem_features, 3, name='stem', padding=pad)(x)))
    elif self.stem == 'imagenet':
      x = relu(bn(train, name='stem_bn')(
          make_conv(c, self.stem_features, 7, 2, name='stem', padding=pad)(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2),
                      padding='SAME' if pad == 'same' else ((1, 1), (1, 1)))
    cls = BasicBlock if self.block == 'basic' else Bottleneck
    for i in range(self.num_blocks):
      x = cls(self.features, self.strides if i == 0 else 1, padding=pad, conv=c,
              residual=self.residual, name=f'block{i}')(x, train)
    return x, [('out', x)]


class VGGStage(nn.Module):
  """One encoding block of VGG16-BN: 2-3 conv-BN-ReLU layers then 2x2 max pooling."""
  num_convs: int
  features: int
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_convs):
      x = make_conv(self.conv, self.features, 3, name=f'conv{i}')(x)
      x = relu(bn(train, name=f'bn{i}')(x))
    pre = x
    # Ceil-mode pooling (7x7 -> 4x4), so that five blocks fit a 28x28 MNIST image (28 -> 1);
    # on 32x32 inputs it is the same as VGG's floor mode.
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    return x, [('pre_pool', pre), ('out', x)]


def encoder_blocks(arch: str, width: int, image_size: int, stem: str = 'auto',
                   padding: str = 'torch', conv: ModuleDef = Conv, residual: str = 'sum'
                   ) -> list[Callable[..., nn.Module]]:
  """Constructors (call with name=...) of the encoding blocks E_0 .. E_{B-1} of `arch`."""
  if residual not in RESIDUALS:
    raise ValueError(f'residual={residual!r} is not one of {RESIDUALS}')
  if arch not in ARCHS:
    raise ValueError(f'config.model.arch={arch!r} is not one of {ARCHS}')
  if padding not in PADDINGS:
    raise ValueError(f'config.model.padding={padding!r} is not one of {PADDINGS}')
  if width < 1:
    raise ValueError(f'config.model.width must be >= 1, got {width}')
  if arch == 'vgg16':
    convs = (2, 2, 3, 3, 3)
    widths = (width, 2 * width, 4 * width, 8 * width, 8 * width)
    return [functools.partial(VGGStage, n, f, conv) for n, f in zip(convs, widths)]
  if stem not in STEMS:
    raise ValueError(f'config.model.stem={stem!r} is not one of {STEMS}')
  if stem == 'auto':
    stem = 'cifar' if image_size <= 32 else 'imagenet'
  sizes = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3)}[arch]
  block = 'bottleneck' if arch == 'resnet50' else 'basic'
  return [
      functools.partial(ResNetStage, n, width * 2**k, 1 if k == 0 else 2, block,
                        stem if k == 0 else None, width, padding, conv, residual)
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
  conv: ModuleDef = Conv
  residual: str = 'sum'   # RESIDUALS
  dense: ModuleDef = nn.Dense  # the head's layer (a Bayesian one for Adv-BNN)

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    blocks = encoder_blocks(self.arch, self.width, self.image_size, self.stem, self.padding,
                            self.conv, self.residual)
    h = (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)
    features: list[Features] = []
    for k, ctor in enumerate(blocks):
      h, taps = ctor(name=f'E{k}')(h, train)
      features.append(taps)
    logits = self.dense(self.num_classes, kernel_init=torch_init, name='head')(
        jnp.mean(h, axis=(1, 2)))
    return (logits, features) if return_features else logits
