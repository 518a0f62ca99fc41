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


# XLA's backend optimisation level for the one-off initial state of a run. At level 1 a width-8
# ResNet-18's initialisation compiled in 4 s instead of 24 s here, another job beside it (the
# lab's models: 3-10x); it runs once, so its own speed does not matter. Its values are the
# default level's up to the last bit of a float32 (tests/test_training.py, per initialiser
# kind): bit for bit for the twelve `cpu`-budget models checked on an AVX2 EPYC (MNIST and
# CIFAR-10 plain, Defend++, hourglass, ComDefend, VGG16 and ResNet-50 Defend++, RSE, ADP,
# Adv-BNN, Defense-GAN, distillation), but the two levels may contract a multiply-add
# differently, and 1 ulp of a weight is another trained model.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def initial_state(init_fn, key: jax.Array, mesh: Mesh):
  """`init_fn(key)`, replicated over `mesh`, compiled with INIT_COMPILER_OPTIONS."""
  compiled = jax.jit(init_fn, out_shardings=replicated(mesh)).lower(key).compile(
      compiler_options=INIT_COMPILER_OPTIONS)
  return compiled(key)


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
