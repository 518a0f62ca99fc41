"""The model store: a finished run kept with its summary, taken up by another machine's run
directory bit for bit, never over other weights of the same config, never when damaged."""

import json
import os

from flax import serialization
import numpy as np
import pytest

from defendpp_jax import files
from defendpp_jax import reproduce
from defendpp_jax.reproduce import runner
from defendpp_jax.runs import checkpointing
from defendpp_jax.runs import config as config_lib
from defendpp_jax.runs import saved
from defendpp_jax.runs import state as state_lib
from defendpp_jax.runs import store


def _write_run(workdir, config, value):
  """A finished run as the trainer leaves it: a checkpoint with optimiser state, a summary."""
  params = {'dense': {'kernel': np.full((3, 2), value, np.float32),
                      'bias': np.arange(2, dtype=np.float32)}}
  stats = {'bn': {'mean': np.full((2,), value / 2, np.float32)}}
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  ckpt.save(7, {'step': np.int32(7), 'params': params, 'batch_stats': stats,
                'opt_state': {'mu': params}})
  ckpt.close()
  summary = {'config': config_lib.as_saved_json(config), 'step': 7, 'clean_accuracy': 0.5,
             'params_sha256': state_lib.params_sha256(params)}
  files.write_json(os.path.join(workdir, saved.SUMMARY), summary)
  return summary


def _same_arrays(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b))


def test_a_stored_run_is_taken_up_elsewhere_and_never_replaced_by_other_weights(
    tmp_path, monkeypatch):
  trained = []

  def fake_train(config, workdir):
    trained.append(workdir)
    return _write_run(workdir, config, float(len(trained)))

  monkeypatch.setattr(runner.training, 'train_and_evaluate', fake_train)
  kept = str(tmp_path / 'store')
  monkeypatch.setenv(store.STORE_ENV, kept)
  config = reproduce.model_config('mnist', 'plain', 'smoke', str(tmp_path / 'a'), '')
  first = runner.model_dir(str(tmp_path / 'a'), 'mnist', 'smoke', 'plain')
  summary = runner._train(config, first)
  entry = os.path.join(kept, 'mnist-smoke', 'plain', 'seed0')
  assert trained == [first] and os.path.isfile(os.path.join(entry, store.VARIABLES))

  # Another machine (another root): the stored run is taken, not trained, bit for bit.
  second = runner.model_dir(str(tmp_path / 'b'), 'mnist', 'smoke', 'plain')
  again = runner._train(config, second)
  assert trained == [first] and again == summary
  (va, sa), (vb, sb) = saved.restore_variables(first), saved.restore_variables(second)
  assert sa == sb == 7 and _same_arrays(va, vb)

  # A run of the same config with other weights (another CPU kind's training) does not
  # replace the stored one: evaluations kept under the stored weights refer to it.
  third = runner.model_dir(str(tmp_path / 'c'), 'mnist', 'smoke', 'plain')
  other = _write_run(third, config, 5.0)
  runner._train(config, third)
  with open(os.path.join(entry, saved.SUMMARY)) as f:
    assert json.load(f)['params_sha256'] == summary['params_sha256'] != other['params_sha256']

  # A damaged entry is refused by name and leaves the run directory without a summary.
  with open(os.path.join(entry, store.VARIABLES), 'rb') as f:
    variables = serialization.msgpack_restore(f.read())
  kernel = np.array(variables['params']['dense']['kernel'])
  kernel[0, 0] += 1
  variables['params']['dense']['kernel'] = kernel
  files.write_bytes(os.path.join(entry, store.VARIABLES),
                    serialization.msgpack_serialize(variables))
  fourth = runner.model_dir(str(tmp_path / 'd'), 'mnist', 'smoke', 'plain')
  with pytest.raises(ValueError, match='damaged'):
    runner._train(config, fourth)
  assert not os.path.exists(os.path.join(fourth, saved.SUMMARY))

  # Another config (a changed recipe): trained, and the stale entry replaced by it.
  config.train.num_epochs += 1
  fifth = runner.model_dir(str(tmp_path / 'e'), 'mnist', 'smoke', 'plain')
  new = runner._train(config, fifth)
  assert trained == [first, fifth]
  with open(os.path.join(entry, saved.SUMMARY)) as f:
    assert json.load(f)['params_sha256'] == new['params_sha256'] != summary['params_sha256']


def test_a_run_whose_checkpoint_is_not_its_summary_is_not_exported(tmp_path):
  config = reproduce.model_config('mnist', 'plain', 'smoke', str(tmp_path), '')
  run = str(tmp_path / 'mnist-smoke' / 'plain')
  summary = _write_run(run, config, 1.0)
  summary['params_sha256'] = '0' * 64
  files.write_json(os.path.join(run, saved.SUMMARY), summary)
  with pytest.raises(ValueError, match='not the run'):
    store.export_run(run, str(tmp_path / 'store'), 0, lambda s: True)
  assert not os.path.exists(tmp_path / 'store' / 'mnist-smoke' / 'plain' / 'seed0')
