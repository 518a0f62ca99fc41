"""Test set-up: repository root on sys.path and JAX's persistent compilation cache."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.cache', 'jax'))


def run_python_args(args, env_extra=None, timeout=600) -> str:
  """Runs `python *args` from the repository root with it on the path; asserts that it
  succeeded (its output in the message if not) and returns its stdout."""
  env = dict(os.environ, PYTHONPATH=ROOT, **(env_extra or {}))
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


def run_python(code: str, env_extra=None, timeout=600) -> str:
  """Runs `code` (dedented) in a fresh Python with the repository on the path; its stdout."""
  return run_python_args(['-c', textwrap.dedent(code)], env_extra, timeout)
