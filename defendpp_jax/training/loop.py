"""The training loop: any recipe, data-parallel on all devices, preemption-safe.

Usage:
  summary = train_and_evaluate(config, workdir)   # resumes from workdir's latest checkpoint

One jitted step runs on a ('data',) mesh of every device: the global batch is sharded along
'data', parameters and optimizer state are replicated, and XLA inserts the cross-device means, so
BatchNorm statistics and gradients are those of the whole global batch on 1 or N devices.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from defendpp_jax import data as data_lib
from defendpp_jax import files
from defendpp_jax import nn as dnn
from defendpp_jax import parallel
from defendpp_jax import validate
from defendpp_jax.defences import registry
from defendpp_jax.evaluation import runner
from defendpp_jax.runs import checkpointing
from defendpp_jax.runs import saved
from defendpp_jax.runs import state as state_lib
from defendpp_jax.training import batch_norm
from defendpp_jax.training import recipes

_LOGGED = ('loss', 'ce', 'guide', 'rec_full', 'rec_ms', 'code_penalty', 'cross_lipschitz',
           'deep_defense', 'kl', 'ensemble_entropy', 'log_det', 'critic_loss', 'wasserstein',
           'gradient_penalty', 'generator_loss', 'train_accuracy', 'grad_norm', 'learning_rate')


def jit_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """Jits `step_fn(state, images, labels, weights, key, frozen)` with the batch sharded over
  'data' and everything else replicated."""
  repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(repl, batch, batch, repl, repl, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def warm_start(state: state_lib.TrainState, config: ml_collections.ConfigDict,
               tx) -> state_lib.TrainState:
  """`state` with the classifier of the finished run `config.train.init_from`.

  The classifier's parameters and BatchNorm statistics are copied, and so are the AE-owned
  encoder blocks (which start as copies of the classifier's, as in `init_classifier_state`); the
  decoder keeps its fresh initialisation and the optimizer state starts anew. The source must be
  the same classifier: same dataset, architecture, width, stem and padding.
  """
  src_dir = config.train.init_from
  if config.defense.name not in registry.CLASSIFIER_RUNS:
    raise ValueError(f'config.train.init_from initialises a classifier; a '
                     f'config.defense.name={config.defense.name!r} run trains a reformer')
  src_config = saved.config_of_run(src_dir)
  saved.check_same_classifier(config, src_dir, 'config.train.init_from')
  if src_config.defense.name != 'none':
    raise ValueError(f'config.train.init_from={src_dir!r} is a {src_config.defense.name} '
                     'reformer run, not a classifier run')
  src, _ = saved.restore_variables(src_dir)
  params, stats = recipes.copy_shared_into_ae(
      {**state.params, 'classifier': src['params']['classifier']},
      {**state.batch_stats, 'classifier': src['batch_stats']['classifier']})
  return state.replace(params=params, batch_stats=stats, opt_state=tx.init(params))


class _Writer:
  """TensorBoard scalars (process 0 only)."""

  def __init__(self, logdir: str):
    self._tb = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _Preemption:
  """Turns SIGTERM into a flag the training loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no preemption support
      self._previous = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


@jax.jit
def _track_non_finite(first_bad: jax.Array, loss: jax.Array, step: int) -> jax.Array:
  return jnp.where((first_bad < 0) & ~jnp.isfinite(loss), step, first_bad)


def _check_finite(first_bad: jax.Array, step: int, ckpt: checkpointing.Checkpointer) -> None:
  bad = int(first_bad)
  if bad >= 0:
    ckpt.wait()
    raise FloatingPointError(
        f'non-finite training loss at step {bad} (detected at step {step}); stopping without '
        f'saving. The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}')


def _describe(config, recipe, state, ds, total_steps) -> str:
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(state.params))
  if config.defense.name in registry.CLASSIFIER_RUNS:
    n_cls = sum(p.size for p in jax.tree_util.tree_leaves(state.params['classifier']))
    what = f'{recipe.description}; {n_params:,} params ({n_cls:,} in the classifier)'
  elif config.defense.name in registry.ENSEMBLE_RUNS:
    what = f'{recipe.description}; {n_params:,} params'
  else:
    what = (f'{recipe.description}; {n_params:,} params; classifier from '
            f'{config.defense.classifier_workdir or "(none given)"}')
  return (f'{config.data.name}: {len(ds.train_labels)} train / {len(ds.test_labels)} test '
          f'{ds.test_images.shape[1:]}; {what}; {jax.device_count()} device(s); '
          f'{total_steps} steps of batch {config.train.batch_size}')


class _Run:
  """The mutable state of one training run between steps (state, checkpoints, NaN tracking)."""

  def __init__(self, config, workdir, ds, recipe, mesh, train_ds=None):
    self.config, self.ds, self.recipe, self.mesh = config, ds, recipe, mesh
    # what the batches are drawn from: the dataset's training split, or the recipe's own set
    self.train_ds = ds if train_ds is None else train_ds
    self.steps_per_epoch = data_lib.steps_per_epoch(len(self.train_ds.train_labels),
                                                    config.train.batch_size)
    self.total_steps = self.steps_per_epoch * config.train.num_epochs
    key = jax.random.key(config.train.seed)
    init_key, self.step_key = jax.random.split(key)
    self.state = parallel.initial_state(recipe.init, init_key, mesh)
    self.ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                           max_to_keep=config.train.max_to_keep)
    restored, self.meta = self.ckpt.restore_latest(checkpointing.abstract_like(self.state))
    if restored is not None:
      self.state = restored
      _log(f'resumed from step {int(self.state.step)} ({self.ckpt.directory})')
    elif config.train.init_from:
      self.state = warm_start(self.state, config, recipe.tx)
      _log(f'classifier initialised from {config.train.init_from}')
    # Device-side index of the first step with a non-finite loss (-1: none yet), so that a NaN
    # is reported at the step it appeared without a device-to-host read after every step.
    self.first_bad = jnp.asarray(-1, jnp.int32)

  def save(self, step: int, bn_statistics: str = 'running') -> None:
    _check_finite(self.first_bad, step, self.ckpt)  # never checkpoint a diverged state
    c = self.config
    self.ckpt.save(step, self.state, meta={
        'step': step, 'epoch': step // self.steps_per_epoch, 'step_in_epoch': step % self.steps_per_epoch,
        'data_seed': c.train.seed, 'bn_statistics': bn_statistics})

  def batches(self, epoch: int, start: int):
    c = self.config
    return data_lib.train_batches(
        self.train_ds, c.train.batch_size, c.train.seed, epoch,
        start_step=(start % self.steps_per_epoch) if epoch == start // self.steps_per_epoch else 0,
        process_index=jax.process_index(), process_count=jax.process_count())

  def finalise(self) -> str:
    """Precise BatchNorm statistics where the recipe allows them; saves the final state."""
    c, final_step = self.config, int(self.state.step)
    bn_statistics = 'running' if jax.tree_util.tree_leaves(self.state.batch_stats) else 'none'
    n_precise = c.train.get('precise_bn_batches', 0)
    if n_precise and self.recipe.precise_bn:
      batches = itertools.islice(data_lib.train_batches(
          self.ds, c.train.batch_size, c.train.seed, c.train.num_epochs,
          process_index=jax.process_index(), process_count=jax.process_count()), n_precise)
      stats, n = batch_norm.precise_batch_stats(self.state, self.recipe.model, batches,
                                                self.mesh,
                                                jax.random.fold_in(self.step_key, final_step))
      self.state = self.state.replace(batch_stats=stats)
      bn_statistics = f'precise ({n} batches)'
      _log(f'BatchNorm statistics re-estimated with the final weights on {n} training batches')
    self.save(final_step, bn_statistics)
    return bn_statistics


def _train(run: _Run, writer: _Writer) -> tuple[bool, int]:
  """Runs the epochs from the state's step; (stopped early by SIGTERM, last saved step)."""
  c, recipe = run.config, run.recipe
  start = int(run.state.step)
  step_fn = jit_train_step(functools.partial(recipes.train_step, recipe=recipe), run.mesh)
  last_saved, t0, seen_t0, step = start, time.time(), start, start
  with _Preemption() as preemption:
    for epoch in range(start // run.steps_per_epoch, c.train.num_epochs):
      term_weights, phase = recipe.phase(epoch)
      weights = jnp.asarray(term_weights, jnp.float32)
      for images, labels in run.batches(epoch, start):
        images, labels = parallel.shard_batch(run.mesh, images, labels)
        run.state, metrics = step_fn(run.state, images, labels, weights, run.step_key,
                                     recipe.frozen)
        step += 1  # a host-side counter: reading state.step would wait for the device
        run.first_bad = _track_non_finite(run.first_bad, metrics['loss'], step)
        if step % c.train.log_every_steps == 0 or step == run.total_steps:
          _check_finite(run.first_bad, step, run.ckpt)
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          rate = (step - seen_t0) * c.train.batch_size / max(time.time() - t0, 1e-9)
          t0, seen_t0 = time.time(), step
          if 'seen' in m:
            m['train_accuracy'] = m.pop('correct') / max(m.pop('seen'), 1)
          m['learning_rate'] = float(recipe.schedule(step))
          writer.scalars(step, m)
          _log(f'[{step}/{run.total_steps}] epoch {epoch} ({phase}) ' +
               ' '.join(f'{k} {m[k]:.5g}' for k in _LOGGED if k in m) + f' {rate:.0f} img/s')
        if step == run.total_steps:
          return False, last_saved  # saved by `finalise`, once its BN statistics are final
        if step % c.train.checkpoint_every_steps == 0:
          run.save(step)
          last_saved = step
        if preemption.requested:
          _log(f'SIGTERM received: saving step {step} and exiting')
          if last_saved != step:
            run.save(step)
          return True, step
  return False, last_saved


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per `config`, resuming from `workdir`, and writes `workdir/train_summary.json`."""
  validate.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  ds = data_lib.dataset_of(config)
  mesh = parallel.make_mesh()
  train_ds = recipes.training_data(config, ds, workdir)
  spe = data_lib.steps_per_epoch(len(train_ds.train_labels), config.train.batch_size)
  recipe = recipes.make_recipe(config, ds, spe)
  run = _Run(config, workdir, ds, recipe, mesh, train_ds)
  _log(_describe(config, recipe, run.state, train_ds, run.total_steps))
  writer = _Writer(os.path.join(workdir, 'tensorboard'))
  stopped_early, last_saved = _train(run, writer)
  final_step = int(run.state.step)
  if stopped_early:
    run.ckpt.close()
    writer.close()
    return {'step': final_step, 'preempted': True}
  if final_step != last_saved:
    bn_statistics = run.finalise()
  else:
    bn_statistics = (run.meta or {}).get('bn_statistics', 'running')
  run.ckpt.close()
  summary = _summary(config, workdir, ds, run.state, bn_statistics, mesh)
  if recipe.report is not None:
    summary.update(recipe.report(jax.device_get(run.state.params)))
  if recipe.artifacts is not None and jax.process_index() == 0:
    summary.update(recipe.artifacts(jax.device_get(run.state.params), workdir))
  if summary['clean_accuracy'] is not None:
    writer.scalars(final_step, {'test_clean_accuracy': summary['clean_accuracy']})
  writer.close()
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, saved.SUMMARY), summary, sort_keys=True)
  path = os.path.join(workdir, saved.SUMMARY)
  if summary['clean_accuracy'] is not None:
    _log(f'clean test accuracy {summary["clean_accuracy"]:.4f} ({summary["correct"]}/'
         f'{summary["seen"]}) at step {final_step}; summary in {path}')
  else:
    _log(f'reformer trained to step {final_step} (no config.defense.classifier_workdir: no '
         f'accuracy); summary in {path}')
  return summary


def _summary(config, workdir, ds, state, bn_statistics, mesh) -> dict[str, Any]:
  """train_summary.json: fingerprints, the config, and the deployed model's clean accuracy."""
  summary = {'step': int(state.step), 'param_l2': state_lib.param_l2(state.params),
             'params_sha256': state_lib.params_sha256(state.params),
             'model': registry.run_name(config), 'bn_statistics': bn_statistics,
             **dnn.conv_kernels(config.model.conv), 'num_devices': jax.device_count(),
             'config': config.to_dict()}
  if (config.defense.name not in registry.CLASSIFIER_RUNS + registry.ENSEMBLE_RUNS
      and not config.defense.classifier_workdir):
    # a reformer without a classifier: report its reconstruction error only
    summary.update(clean_accuracy=None, correct=None, seen=len(ds.test_labels))
    return summary
  defence = registry.build(config, workdir, ds, trained=state.variables)
  images, labels = ds.test_images, ds.test_labels
  limit = registry.summary_examples(config)
  if limit:  # a defence costly to deploy: the first `limit` test images
    images, labels = images[:limit], labels[:limit]
  correct, seen = runner.clean_counts(defence, images, labels, config.eval.batch_size, mesh)
  summary.update(clean_accuracy=correct / seen, correct=correct, seen=seen)
  return summary
