"""BatchNorm statistics re-estimated with the final weights ("precise BN").

Usage:
  stats, n = precise_batch_stats(state, model, batches, mesh, key)
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from defendpp_jax import parallel
from defendpp_jax.nn.classifiers import BN_MOMENTUM
from defendpp_jax.runs.state import TrainState


def batch_statistics(model) -> Callable:
  """jit(params, batch_stats, images, key) -> the BatchNorm statistics of this batch alone.

  The training-mode forward of the whole model (classifier, AE-owned blocks, decoder) from
  zero running averages: each returned average is (1 - BN_MOMENTUM) x the batch's statistic.
  """
  def stats(params, batch_stats, images, key):
    zeros = jax.tree_util.tree_map(jnp.zeros_like, batch_stats)
    _, new = model.apply({'params': params, 'batch_stats': zeros}, images, train=True,
                         mutable=['batch_stats'], rngs={'noise': key})
    return jax.tree_util.tree_map(lambda s: s / (1.0 - BN_MOMENTUM), new['batch_stats'])
  return jax.jit(stats)


def precise_batch_stats(state: TrainState, model, batches: Iterator[tuple[np.ndarray, np.ndarray]],
                        mesh: Mesh, key: jax.Array) -> tuple[Any, int]:
  """(statistics, number of batches): every BatchNorm's mean and variance averaged over
  `batches` with the weights of `state`."""
  fn = batch_statistics(model)
  total, n = None, 0
  for images, _ in batches:
    images, = parallel.shard_batch(mesh, images)
    s = fn(state.params, state.batch_stats, images, jax.random.fold_in(key, n))
    total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
    n += 1
  if not n:
    return state.batch_stats, 0
  return jax.tree_util.tree_map(lambda t: t / n, total), n
