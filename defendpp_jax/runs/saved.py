"""A trained run on disk: its config (migrated to today's fields), its weights, its identity.

Usage:
  config = config_of_run('runs/mnist')            # from train_summary.json, migrated
  variables, step = restore_variables('runs/mnist')   # {'params', 'batch_stats'} of the latest
  check_same_classifier(config, 'runs/mnist', '--workdir')

Neither training nor evaluation owns a run: both read it through this module.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from defendpp_jax import parallel
from defendpp_jax.runs import checkpointing
from defendpp_jax.runs import config as config_lib

SUMMARY = 'train_summary.json'


def summary_of_run(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, SUMMARY)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a finished training run?')
  with open(path) as f:
    return json.load(f)


def fingerprints(run_dirs: dict[str, str]) -> dict[str, Any]:
  """{name: {params_sha256, clean_accuracy_test_set}} of finished runs {name: directory},
  from their train_summary.json: the same command trains different weights on different CPU
  kinds, so a result names the weights it measured."""
  out = {}
  for name, d in run_dirs.items():
    s = summary_of_run(d)
    out[name] = {'params_sha256': s['params_sha256'],
                 'clean_accuracy_test_set': s.get('clean_accuracy')}
  return out


def weights_read(config: dict[str, Any], workdir: str) -> dict[str, str]:
  """{run directory: params_sha256} of every finished run an evaluation of `workdir` with
  `config` (a dict) reads: `workdir` and each run a config field names (the protected
  classifier, a transfer source, a generator, ...). A report carries it, so that a report is
  reused only while the weights it measured are still the ones on disk."""
  dirs = [workdir]

  def walk(d):
    for v in d.values():
      if isinstance(v, dict):
        walk(v)
      elif isinstance(v, str) and v and os.path.isfile(os.path.join(v, SUMMARY)):
        dirs.append(v)

  walk(config)
  return {os.path.abspath(d): summary_of_run(d)['params_sha256'] for d in dirs
          if os.path.isfile(os.path.join(d, SUMMARY))}


def config_of_run(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (from its train_summary.json, migrated)."""
  return ml_collections.ConfigDict(config_lib.migrate_config(summary_of_run(workdir)['config']))


def restore_variables(workdir: str, mesh=None) -> tuple[dict[str, Any], int]:
  """({'params', 'batch_stats'}, step) of the latest checkpoint of `workdir`, replicated on
  `mesh` (default: every device); a clear error when there is none."""
  mesh = mesh or parallel.make_mesh()
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  state, _ = ckpt.restore_latest_saved(parallel.replicated(mesh))
  ckpt.close()
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(workdir, "checkpoints")}: train '
                            f'first with python -m launch.train --workdir={workdir}')
  variables = {'params': state['params'], 'batch_stats': state.get('batch_stats') or {}}
  return variables, int(jax.device_get(state['step']))


# The fields that define a classifier's function beyond its parameter shapes (the dataset sets
# the input normalisation).
CLASSIFIER_FIELDS = ('data.name', 'model.arch', 'model.width', 'model.stem', 'model.padding')


# The fields that define a Defend++ run's auto-encoder (its reconstructions are analysed when
# the evaluated config names a decoder).
DECODER_FIELDS = ('model.decoder', 'model.num_levels', 'model.shared_blocks')


def check_same_classifier(config: ml_collections.ConfigDict, run_dir: str, what: str,
                          fields: tuple[str, ...] = CLASSIFIER_FIELDS,
                          differ: str = 'the classifiers differ') -> None:
  """Raises, naming the field, unless `config` builds the classifier that `run_dir` trained
  (with `fields=DECODER_FIELDS`: the auto-encoder).

  Parameter shapes alone cannot tell e.g. two paddings apart: restoring weights into the other
  would evaluate a different function without any error. Runs without a train_summary.json
  (unfinished) are not checked.
  """
  if not os.path.isfile(os.path.join(run_dir, SUMMARY)):
    return
  saved = config_of_run(run_dir)
  for path in fields:
    section, field = path.split('.')
    mine, theirs = config[section][field], saved[section][field]
    if mine != theirs:
      raise ValueError(f'{what}={run_dir!r} was trained with config.{path}={theirs!r}, the '
                       f'config given has {mine!r}: {differ} (pass '
                       f'--config.{path}={theirs})')
