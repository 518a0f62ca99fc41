"""Test set-up: repository root on sys.path and JAX's persistent compilation cache."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.cache', 'jax'))
# Every program into the cache, not only those compiled in over 1 s: the suite compiles the same
# small programs (one attack on one smoke model, a model's forward pass) in many tests and
# processes, and on a clean machine over half of its compilations are then cache hits.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The tests' programs are small and mostly compiled once: XLA's cheaper CPU backend passes
# halve the suite's time (compilation dominates it) and change no result beyond the
# tolerances the tests use. Set before JAX is imported; flags already given are kept.
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0',
                      '--xla_llvm_disable_expensive_passes=true')


def _with_flags(flags: str, extra=FAST_COMPILE_FLAGS) -> str:
  given = flags.split()
  names = {f.split('=')[0] for f in given}
  return ' '.join(given + [f for f in extra if f.split('=')[0] not in names])


os.environ['XLA_FLAGS'] = _with_flags(os.environ.get('XLA_FLAGS', ''))


def run_python_args(args, env_extra=None, timeout=600) -> str:
  """Runs `python *args` from the repository root with it on the path; asserts that it
  succeeded (its output in the message if not) and returns its stdout."""
  env_extra = dict(env_extra or {})
  if 'XLA_FLAGS' in env_extra:  # e.g. fake devices: added to the suite's flags
    env_extra['XLA_FLAGS'] = _with_flags(env_extra['XLA_FLAGS'], tuple(
        os.environ['XLA_FLAGS'].split()))
  env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


def run_python(code: str, env_extra=None, timeout=600) -> str:
  """Runs `code` (dedented) in a fresh Python with the repository on the path; its stdout."""
  return run_python_args(['-c', textwrap.dedent(code)], env_extra, timeout)


def quickstart_smoke_config():
  """The quickstart's smoke config as the run-level tests use it: a plain classifier on the
  digits, 96 test images, 24 evaluated, FGSM and PGD-3, no figures."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config('smoke')
  config.model.decoder = 'none'
  config.data.test_limit = 96
  config.eval.num_examples = 24
  config.eval.attacks = ('fgsm', 'pgd(steps=3)')
  config.eval.figures = False
  return config


@pytest.fixture(scope='session')
def plain_run(tmp_path_factory):
  """(config, workdir) of one trained plain classifier (the smoke config), shared by the
  modules that deploy defences in front of a trained run."""
  from defendpp_jax import training  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('plain') / 'plain')
  config = quickstart_smoke_config()
  training.train_and_evaluate(config, workdir)
  return config, workdir
