"""Timing and machine description shared by the benchmarks (no flags: importable anywhere).

Usage:
  compile_s, median_s = _time(lambda: fn(x), repeats=5)
  cpu = cpu_kind()
"""

from __future__ import annotations

import time

import jax
import numpy as np


def _time(fn, repeats: int) -> tuple[float, float]:
  """(compile + first run seconds, median seconds of `repeats` further runs)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  return max(first - med, 0.0), med


def _time_eager(fn, repeats: int) -> float:
  """Median seconds of `repeats` runs of an eager (PyTorch) `fn`, after one warm-up run."""
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


_EXTENSIONS = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16', 'amx_int8')


def cpu_kind() -> str:
  """'model name [vector / matrix extensions]' of this machine's CPU (figures depend on it)."""
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
  except OSError:
    import platform  # pylint: disable=g-import-not-at-top
    return platform.processor() or platform.machine()
  name = next((l.split(':', 1)[1].strip() for l in info.splitlines()
               if l.startswith('model name')), 'unknown CPU')
  flags = next((l.split(':', 1)[1].split() for l in info.splitlines()
                if l.startswith('flags')), [])
  return f'{name} [{" ".join(e for e in _EXTENSIONS if e in flags) or "no AVX2"}]'
