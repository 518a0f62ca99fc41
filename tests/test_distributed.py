"""Multi-device equivalence (fake CPU devices) and preemption-safe resume, in subprocesses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from conftest import run_python
from conftest import run_python_args

FOUR_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}


def test_four_devices_compute_the_global_batch_gradient_and_statistics():
  # What sharding must not change: the gradient of the global batch's loss and the BatchNorm
  # statistics of the global batch. Compared after one step (the update is -lr x the gradient
  # + weight decay) and over three steps at a small learning rate, where float-level
  # differences between reduction orders are not amplified by the training dynamics.
  out = run_python('''
      import functools
      import chex, jax, jax.numpy as jnp, numpy as np
      from configs import quickstart
      from defendpp_jax import parallel, training
      from defendpp_jax.training import recipes
      config = quickstart.get_config('smoke')
      config.train.learning_rate = 1e-3
      ds = type('DS', (), {'image_shape': (28, 28, 1), 'num_classes': 10, 'mean': (0.5,),
                           'std': (0.5,)})()
      recipe = recipes.make_recipe(config, ds, 4)

      def run(devices):
        mesh = parallel.make_mesh(devices)
        state = jax.jit(recipe.init, out_shardings=parallel.replicated(mesh))(
            jax.random.key(0))
        step = training.jit_train_step(functools.partial(recipes.train_step, recipe=recipe),
                                       mesh)
        rng = np.random.default_rng(0)
        states = [jax.device_get(state)]
        for i in range(3):
          x = rng.uniform(size=(16, 28, 28, 1)).astype(np.float32)
          y = rng.integers(0, 10, 16).astype(np.int32)
          xs, ys = parallel.shard_batch(mesh, x, y)
          assert len(xs.sharding.device_set) == len(devices)
          state, _ = step(state, xs, ys, jnp.ones(2), jax.random.key(1), None)
          states.append(jax.device_get(state))
        return states

      assert jax.device_count() == 4
      one, four = run(jax.devices()[:1]), run(jax.devices())
      leaves = lambda t: [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(t)]
      u1 = [a - b for a, b in zip(leaves(one[1].params), leaves(one[0].params))]
      u4 = [a - b for a, b in zip(leaves(four[1].params), leaves(four[0].params))]
      scale = max(np.abs(u).max() for u in u1)
      rel = max(np.abs(a - b).max() for a, b in zip(u1, u4)) / scale
      assert scale > 0 and rel < 1e-3, rel
      chex.assert_trees_all_close(one[1].batch_stats, four[1].batch_stats, atol=2e-5, rtol=2e-5)
      chex.assert_trees_all_close(one[3].params, four[3].params, atol=2e-5, rtol=2e-5)
      chex.assert_trees_all_close(one[3].batch_stats, four[3].batch_stats, atol=2e-5, rtol=2e-5)
      print('OK', rel)
      ''', FOUR_DEVICES)
  assert 'OK' in out


def _train_args(workdir, *overrides):
  return ['-m', 'launch.train', '--config=configs/quickstart.py',
          f'--workdir={workdir}', '--config.model.width=4', '--config.train.num_epochs=3',
          '--config.train.checkpoint_every_steps=5', '--config.train.log_every_steps=5',
          *overrides]


def _steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _start(workdir):
  return subprocess.Popen([sys.executable, *_train_args(workdir)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, workdir, step, timeout=300):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if any(s >= step for s in _steps(workdir)):
      return
    if proc.poll() is not None:
      pytest.fail('training ended before it could be interrupted:\n' + proc.stdout.read())
    time.sleep(0.05)
  pytest.fail(f'no checkpoint >= {step} after {timeout} s')


def _summary(workdir):
  with open(os.path.join(workdir, 'train_summary.json')) as f:
    return json.load(f)


def test_sigkill_and_sigterm_resume_exactly(tmp_path):
  # Uninterrupted reference: 3 epochs of 22 steps.
  ref = str(tmp_path / 'ref')
  run_python_args(_train_args(ref))
  expected = _summary(ref)
  assert expected['step'] == 66
  work = str(tmp_path / 'work')
  # SIGKILL mid-training: whatever was being written is lost, the last finalised step is not.
  proc = _start(work)
  _wait_for_step(proc, work, 10)
  proc.kill()
  proc.wait()
  killed_at = _steps(work)[-1]
  assert killed_at < 66 and not os.path.exists(os.path.join(work, 'train_summary.json'))
  # SIGTERM: saves the current step and exits cleanly.
  proc = _start(work)
  _wait_for_step(proc, work, killed_at + 10)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert f'resumed from step {killed_at}' in out
  assert 'SIGTERM received: saving step' in out
  stopped_at = int(out.split('SIGTERM received: saving step ')[1].split()[0])
  assert _steps(work)[-1] == stopped_at < 66
  # The same command again finishes the run: bit-identical to the uninterrupted one.
  done = run_python_args(_train_args(work))
  assert f'resumed from step {stopped_at}' in done
  got = _summary(work)
  assert got['params_sha256'] == expected['params_sha256']
  assert got['param_l2'] == expected['param_l2'] and got['step'] == 66


def test_evaluate_same_numbers_on_one_and_four_devices(tmp_path):
  workdir = str(tmp_path / 'run')
  base = ['--config=configs/quickstart.py:smoke', f'--workdir={workdir}']
  # 10 epochs of the smoke run: accurate enough that the attacks have something to flip.
  run_python_args(['-m', 'launch.train', *base, '--config.train.num_epochs=10'])
  results = []
  for extra in ({}, FOUR_DEVICES):
    run_python_args(['-m', 'launch.evaluate', *base, "--config.eval.attacks=('fgsm','pgd','ddn')",
                     '--config.eval.figures=False'], extra)
    with open(os.path.join(workdir, 'robustness.json')) as f:
      report = json.load(f)
    results.append(report)
  one, four = results
  assert one['clean_accuracy'] == four['clean_accuracy'] > 0.2
  for a, b in zip(one['rows'], four['rows']):
    assert (a['attack'], a['correct'], a['seen']) == (b['attack'], b['correct'], b['seen'])
    if a.get('median_l2') is not None:
      assert abs(a['median_l2'] - b['median_l2']) <= 1e-4 * a['median_l2']


_WORKER = '''
import sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
if len(sys.argv) > 3:
  jax.distributed.initialize(coordinator_address=sys.argv[3], num_processes=2,
                             process_id=int(sys.argv[2]))
from configs import quickstart
from defendpp_jax import training
s = training.train_and_evaluate(quickstart.get_config('smoke'), sys.argv[1])
print('RESULT', jax.process_count(), jax.device_count(), s['params_sha256'], flush=True)
'''


def test_two_processes_match_one_process_with_two_devices(tmp_path):
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  env = dict(os.environ, PYTHONPATH=ROOT)
  workdir = str(tmp_path / 'multi')
  procs = [subprocess.Popen([sys.executable, '-c', _WORKER, workdir, str(i), address], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  results = [out.split('RESULT ')[1].split() for out in outs]
  assert results[0] == results[1] and results[0][:2] == ['2', '2']
  single = run_python(_WORKER.replace('sys.argv[1]', repr(str(tmp_path / 'single'))),
                       {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert single.split('RESULT ')[1].split() == ['1', '2', results[0][2]]
  assert os.path.isfile(os.path.join(workdir, 'train_summary.json'))  # written by process 0
