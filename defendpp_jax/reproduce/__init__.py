"""Reproduced papers: their tables as data (defendpp_mm2020) and the runner that trains and
evaluates every row.

  from defendpp_jax import reproduce
  result = reproduce.run_table('2', workdir='runs/repro', budget='cpu', data_dirs={...})
"""

from defendpp_jax.reproduce.defendpp_mm2020 import BUDGETS
from defendpp_jax.reproduce.defendpp_mm2020 import TABLES
from defendpp_jax.reproduce.defendpp_mm2020 import table_spec
from defendpp_jax.reproduce.runner import Preempted
from defendpp_jax.reproduce.runner import model_config
from defendpp_jax.reproduce.runner import model_dir
from defendpp_jax.reproduce.runner import run_table
