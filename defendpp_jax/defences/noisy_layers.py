"""Randomness inside a classifier: stochastic activation pruning (SAP) and random self-ensemble
(RSE), inserted into any Flax classifier with `nn.intercept_methods`.

Usage:
  defence = sap(module, variables, 'resnet18-w8', after='activation')    # no training
  defence = rse(module, variables, 'resnet18-w8-rse', input_std=0.2, inner_std=0.1, passes=10)
  with rse_noise(key, input_std=0.2, inner_std=0.1):                    # training, as deployed
    logits = module.apply(variables, x_noisy, ...)

SAP (Dhillon et al. 2018) after every activation (the classifiers' `ReLU` modules;
after='conv': every convolution's output, the placement of the obfuscated-gradients reference):
per example and layer, p = |a| / sum |a|, N = samples_factor x the layer's size draws with
replacement, an entry survives if drawn at least once (probability q = 1 - (1 - p)^N) and is
rescaled by 1 / q, so E[pruned] = a. RSE (Liu et al. 2018): Gaussian noise before every
convolution (input_std on the pixels, the first convolution's input; inner_std before every
other), on in training and at test time; the deployed prediction is the average softmax of
`passes` noisy passes (returned as log-probabilities, which are logits of that average). Both
are randomised: a single pass is one draw, attacks need EOT.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from defendpp_jax.defences import base
from defendpp_jax.nn import classifiers

SAP_PLACES = {'activation': (classifiers.ReLU,), 'conv': (nn.Conv,)}


def sap_prune(a: jax.Array, key: jax.Array, samples_factor: float = 2.0) -> jax.Array:
  """One SAP draw on activations a (N, ...): survivors rescaled by 1 / keep probability."""
  axes = tuple(range(1, a.ndim))
  mag = jnp.abs(a)
  p = mag / jnp.maximum(jnp.sum(mag, axis=axes, keepdims=True), 1e-30)
  draws = samples_factor * (a.size // a.shape[0])
  keep = -jnp.expm1(draws * jnp.log1p(-jnp.minimum(p, 1.0 - 1e-7)))  # 1 - (1 - p)^N
  kept = jax.random.uniform(key, a.shape, a.dtype) < keep
  return jnp.where(kept, a / jnp.where(kept, keep, 1.0), 0.0)


@contextlib.contextmanager
def sap_pruning(key: jax.Array, after: str = 'activation', samples_factor: float = 2.0):
  """Within the context, every `after` module's output of any Flax model is SAP-pruned."""
  if after not in SAP_PLACES:
    raise ValueError(f'config.defense.sap.after={after!r} is not one of {tuple(SAP_PLACES)}')
  kinds, layer = SAP_PLACES[after], itertools.count()

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, kinds):
      out = sap_prune(out, jax.random.fold_in(key, next(layer)), samples_factor)
    return out

  with nn.intercept_methods(interceptor):
    yield


@contextlib.contextmanager
def rse_noise(key: jax.Array, input_std: float, inner_std: float):
  """Within the context, Gaussian noise is added before every convolution of any Flax model
  (input_std before the first one called, inner_std before every other)."""
  layer = itertools.count()

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, nn.Conv):
      i = next(layer)
      std = input_std if i == 0 else inner_std
      if std > 0:
        x = args[0]
        x = x + std * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        args = (x,) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def _need_key(key, name):
  if key is None:
    raise ValueError(f'{name} is randomised: its logits need a key')


def sap(module: nn.Module, variables: Any, name: str, after: str = 'activation',
        samples_factor: float = 2.0, method: str | None = 'classify') -> base.Defence:
  """`module` (inference mode) with SAP after every activation (or convolution)."""
  if after not in SAP_PLACES:
    raise ValueError(f'config.defense.sap.after={after!r} is not one of {tuple(SAP_PLACES)}')
  if not samples_factor > 0:
    raise ValueError(f'config.defense.sap.samples_factor must be > 0, got {samples_factor}')

  def apply(v, x, key, bpda):
    del bpda
    _need_key(key, 'sap')
    with sap_pruning(key, after, samples_factor):
      return module.apply(v, x, method=method) if method else module.apply(v, x)

  return base.Defence(name, apply, variables, randomised=True)


def rse_input(x: jax.Array, key: jax.Array, input_std: float) -> jax.Array:
  """RSE's first noise layer, on the pixels (before the model's own normalisation)."""
  return x + input_std * jax.random.normal(key, x.shape, x.dtype)


def rse(module: nn.Module, variables: Any, name: str, input_std: float = 0.2,
        inner_std: float = 0.1, passes: int = 10, method: str | None = 'classify'
        ) -> base.Defence:
  """`module` with RSE's noise on, its softmax averaged over `passes` noisy passes."""
  if not isinstance(passes, int) or passes < 1:
    raise ValueError(f'config.defense.rse.passes must be an integer >= 1, got {passes!r}')
  for field, std in (('input_std', input_std), ('inner_std', inner_std)):
    if not std >= 0:
      raise ValueError(f'config.defense.rse.{field} must be >= 0, got {std}')

  def one_pass(v, x, key, bpda):
    del bpda
    _need_key(key, 'rse')
    k_in, k_layers = jax.random.split(key)
    with rse_noise(k_layers, 0.0, inner_std):
      noisy = rse_input(x, k_in, input_std)
      return module.apply(v, noisy, method=method) if method else module.apply(v, noisy)

  return base.averaged(base.Defence(name, one_pass, variables, randomised=True), passes, name)
