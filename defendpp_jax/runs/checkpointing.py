"""Checkpoints: the only module that touches orbax.

Usage:
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=3)
  state, meta = ckpt.restore_latest(abstract_state)   # (None, None) when there is none
  ckpt.save(step, state, meta={'epoch': 3}); ckpt.close()
  state, meta = ckpt.restore_latest_saved(sharding)   # as saved, without its structure

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save never leaves a half-written step behind under its final name. A finalised step that is
nevertheless unreadable (truncated by a full disk, a bad copy...) is reported by name and the
next older one is used, so one bad save never loses the run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper of `ocp.CheckpointManager` holding the train state and a JSON metadata item."""

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'meta'),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> None:
    """Saves `state` (any pytree of arrays) at `step`; asynchronous when enabled."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` into the structure, dtypes and shardings of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['meta'] or {})

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any] | None]:
    """The newest readable checkpoint as (state, meta), or (None, None) when there is none."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        _warn_unreadable(os.path.join(self.directory, str(step)), e)
    return None, None

  def restore_latest_saved(self, sharding: Any) -> tuple[Any, dict[str, Any] | None]:
    """The newest readable checkpoint as saved (a dict of arrays, each placed with `sharding`),
    without knowing its structure in advance; (None, None) when there is none."""
    for step in reversed(self.all_steps()):
      try:
        tree = self._manager.item_metadata(step)['state'].tree
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
        return self.restore(step, abstract)
      except Exception as e:  # pylint: disable=broad-except
        _warn_unreadable(os.path.join(self.directory, str(step)), e)
    return None, None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _warn_unreadable(path: str, e: Exception) -> None:
  logging.warning('checkpoint %s is unreadable (%s: %s); trying the previous one', path,
                  type(e).__name__, e)
  print(f'WARNING: checkpoint {path} is unreadable ({type(e).__name__}); falling back to the '
        'previous one', flush=True)


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into it."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
