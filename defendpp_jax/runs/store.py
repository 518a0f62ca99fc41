"""A store of finished runs' weights that outlives the machine that trained them.

Usage:
  store.export_run(run, 'results/models', seed=0, same_config=lambda saved: ...)
  summary = store.import_run('runs/repro/mnist-cpu/plain', 'results/models', seed=0,
                             same_config=lambda saved: ...)   # None: nothing stored fits

A run's entry is STORE/<dataset>-<budget>/<model>/seed<k>/ (the last two parts of its
directory: `reproduce.runner.model_dir`'s layout), holding `variables.msgpack` (the latest
checkpoint's parameters and batch statistics, no optimiser state) and the run's
`train_summary.json`. Importing writes both into an empty run directory as a checkpoint at the
summary's step plus the summary, after checking the parameters against the summary's SHA-256:
evaluation (`saved.restore_variables`) reads such a run exactly as one trained here. Training
it further is not supported: its checkpoint has no optimiser state.

The same command trains different weights on different CPU kinds; weights taken from the store
are the very ones an earlier machine measured, so the evaluations kept by weights
(`config.eval.resume_dir`) resolve on any machine.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from flax import serialization
import jax
import numpy as np

from defendpp_jax import files
from defendpp_jax.runs import checkpointing
from defendpp_jax.runs import saved
from defendpp_jax.runs import state as state_lib

# Set by `launch.reproduce --model_store=DIR`: every model a table trains or reuses is kept
# there, and taken from there instead of being trained when it fits.
STORE_ENV = 'DEFENDPP_MODEL_STORE'
VARIABLES = 'variables.msgpack'


def entry_dir(store: str, workdir: str, seed: int) -> str:
  parts = os.path.normpath(os.path.abspath(workdir)).split(os.sep)[-2:]
  return os.path.join(store, *parts, f'seed{seed}')


def export_run(workdir: str, store: str, seed: int,
               same_config: Callable[[dict[str, Any]], bool]) -> str | None:
  """Copies the finished run in `workdir` into its entry; returns the entry's directory, or
  None when nothing was written: the entry holds these weights already, or other weights of
  the same config (another machine's training of it: kept, as the evaluations stored under
  its weights refer to it). An entry of another config (stale) is replaced."""
  summary = saved.summary_of_run(workdir)
  entry = entry_dir(store, workdir, seed)
  path = os.path.join(entry, saved.SUMMARY)
  if os.path.isfile(path):
    kept = saved.summary_of_run(entry)
    if kept.get('params_sha256') == summary['params_sha256']:
      return None
    if same_config(kept['config']):
      print(f'model store: {entry} keeps params {kept["params_sha256"][:12]}... of the same '
            f'config; {workdir} trained {summary["params_sha256"][:12]}... (not stored)',
            flush=True)
      return None
  variables, step = saved.restore_variables(workdir)
  variables = jax.device_get(variables)
  sha = state_lib.params_sha256(variables['params'])
  if sha != summary['params_sha256'] or step != summary['step']:
    raise ValueError(f'{workdir}: its latest checkpoint (step {step}, params {sha[:12]}) is '
                     f'not the run its {saved.SUMMARY} describes (step {summary["step"]}, '
                     f'params {summary["params_sha256"][:12]}): not exported')
  files.write_bytes(os.path.join(entry, VARIABLES), serialization.msgpack_serialize(variables))
  files.write_json(path, summary)  # last: an entry with a summary is complete
  return entry


def import_run(workdir: str, store: str, seed: int,
               same_config: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
  """Writes the stored run of `workdir`'s entry into `workdir` (which must hold no checkpoint)
  if its saved config passes `same_config`; returns its summary, or None (nothing stored, or
  stored with another config: the caller trains)."""
  entry = entry_dir(store, workdir, seed)
  if not os.path.isfile(os.path.join(entry, saved.SUMMARY)):
    return None
  summary = saved.summary_of_run(entry)
  if not same_config(summary['config']):
    print(f'model store: {entry} holds a run of another config; training anew', flush=True)
    return None
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(f'{workdir} already holds checkpoints: the stored run {entry} is not '
                     'written over them (remove them to take the stored run)')
  with open(os.path.join(entry, VARIABLES), 'rb') as f:
    variables = serialization.msgpack_restore(f.read())
  sha = state_lib.params_sha256(variables['params'])
  if sha != summary['params_sha256']:
    raise ValueError(f'{os.path.join(entry, VARIABLES)}: params SHA-256 {sha[:12]}..., its '
                     f'{saved.SUMMARY} says {summary["params_sha256"][:12]}...: a damaged '
                     'entry, not imported')
  ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=False)
  state = {'step': np.asarray(summary['step'], np.int32),
           **{k: v for k, v in variables.items() if jax.tree_util.tree_leaves(v)}}
  ckpt.save(summary['step'], state,
            meta={'imported_from': os.path.abspath(entry)})
  ckpt.close()
  files.write_json(os.path.join(workdir, saved.SUMMARY), summary)
  print(f'model store: {workdir} <- {entry} (params {sha[:12]}...)', flush=True)
  return summary
