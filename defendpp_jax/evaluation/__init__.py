"""Evaluation: attack entries run on a Defence's views, counted exactly, checked, reported.

  from defendpp_jax import evaluation
  report = evaluation.evaluate(config, workdir)                     # a trained run
  report = evaluation.evaluate_defence(defence, images, labels, attacks=('pgd',), eps=0.3)

Evaluation builds defences through `defences.registry` and reads runs through `runs.saved`; it
never imports the trainer.
"""

from defendpp_jax.evaluation.evaluate import RESUME_DIR
from defendpp_jax.evaluation.evaluate import RESUME_ENV
from defendpp_jax.evaluation.evaluate import evaluate
from defendpp_jax.evaluation.evaluate import evaluate_defence
from defendpp_jax.evaluation.evaluate import eps_sweep
from defendpp_jax.evaluation.evaluate import ensemble_results
from defendpp_jax.evaluation.evaluate import run_entries
from defendpp_jax.evaluation.evaluate import worst_case_results
