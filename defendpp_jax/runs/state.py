"""The train state a run checkpoints, and the fingerprints its summary records.

Usage:
  state = TrainState(step, params, batch_stats, opt_state)
  params_sha256(state.params)      # identical weights <=> identical hash
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import flax
import jax
import numpy as np


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def param_l2(params: Any) -> float:
  return float(math.sqrt(sum(float(np.sum(np.asarray(p, np.float64) ** 2))
                             for p in jax.tree_util.tree_leaves(params))))


def params_sha256(params: Any) -> str:
  """SHA-256 of all parameter bytes, leaves in flax's sorted-key flattening order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return h.hexdigest()
