"""Any model as a Defence: a Flax module with its variables, or a `logits_fn`.

Usage:
  defence = from_flax(module, variables)                      # module.apply(variables, x)
  defence = from_flax(module, variables, method='classify', train=False)
  defence = from_logits_fn(lambda x: my_jax_model(x))         # pixels in [0, 1] -> logits
  defence = from_logits_fn(lambda x, key: noisy(x, key), randomised=True)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import flax.linen as nn

from defendpp_jax.defences import base


def from_flax(module: nn.Module, variables: Any, name: str | None = None,
              randomised: bool = False, rng_name: str = 'noise', **apply_kwargs) -> base.Defence:
  """`module.apply(variables, x, **apply_kwargs)` as a Defence (inference mode is the caller's:
  pass e.g. train=False). A randomised module draws from the rng stream `rng_name`."""
  def apply(v, x, key, bpda):
    del bpda
    rngs = {rng_name: key} if randomised else None
    return module.apply(v, x, rngs=rngs, **apply_kwargs)
  return base.Defence(name or type(module).__name__, apply, variables, randomised=randomised)


def from_logits_fn(logits_fn: Callable[..., Any], name: str = 'model',
                   randomised: bool = False) -> base.Defence:
  """`logits_fn(x)` (or `logits_fn(x, key)` when randomised) as a Defence without variables."""
  takes_key = randomised or len(inspect.signature(logits_fn).parameters) > 1

  def apply(v, x, key, bpda):
    del v, bpda
    return logits_fn(x, key) if takes_key else logits_fn(x)
  return base.Defence(name, apply, {}, randomised=randomised)
