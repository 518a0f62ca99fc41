"""Data parallelism: the ('data',) mesh of every device and batches placed on it.

Usage:
  mesh = make_mesh()
  x, y = shard_batch(mesh, x_local, y_local)   # this process's rows of a global batch
  x, y = put_batch(mesh, x, y)                 # a batch every process holds whole (evaluation)

Parameters are replicated (`replicated(mesh)`), batches sharded along 'data'; under `jax.jit`
XLA inserts the cross-device means, so BatchNorm statistics and gradients are those of the whole
global batch on 1 or N devices.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Global arrays from this process's rows, sharded along 'data'."""
  sharding = batch_sharding(mesh)
  return tuple(jax.make_array_from_process_local_data(sharding, a) for a in arrays)


def put_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Shards a batch that every process holds whole (evaluation) along 'data'."""
  sharding = batch_sharding(mesh)
  return tuple(jax.device_put(a, sharding) for a in arrays)


def divisible_batch(requested: int, mesh: Mesh, num_examples: int | None = None) -> int:
  """The requested batch (no larger than `num_examples`), rounded up to the device count."""
  n = requested if num_examples is None else min(requested, num_examples)
  return math.ceil(n / mesh.size) * mesh.size
