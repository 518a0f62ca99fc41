"""Training: recipes (what a run trains), the shared step, the loop.

  from defendpp_jax import training
  summary = training.train_and_evaluate(config, workdir)
"""

from defendpp_jax.training.loop import jit_train_step
from defendpp_jax.training.loop import train_and_evaluate
from defendpp_jax.training.loop import warm_start
from defendpp_jax.training.recipes import Recipe
from defendpp_jax.training.recipes import make_recipe
from defendpp_jax.training.recipes import train_step
