"""Runs: configs (defaults, presets, migrations), train states, checkpoints, saved runs.

  from defendpp_jax.runs import saved
  config = saved.config_of_run('runs/mnist')
"""
