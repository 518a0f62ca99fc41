"""Optimisers of the recipes, and freezing part of a parameter tree.

Usage:
  tx, schedule = sgd_step_decay(config.train, steps_per_epoch)
  tx, schedule = adam_step_decay(1e-3, (0.6, 0.9), 0.1, total_steps)
  tx = freeze(tx, lambda path: path[0] == 'teacher')    # no update where the predicate holds
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax


def sgd_step_decay(tc: Any, steps_per_epoch: int, decay_mask: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and (PyTorch-style, coupled) weight decay; step-decay learning rate;
  the gradient first clipped to a global norm of `clip_grad_norm` where that is > 0.

  The decay epochs are those of a `lr_schedule_epochs`-long run (the paper's 250 / 300 epochs),
  stretched or shrunk to the `num_epochs` actually trained, so that a shortened run still
  anneals at the same fractions of its length (0: no rescaling). `decay_mask` (a pytree of
  bools, or a function of the parameters giving one): where weight decay applies (all: None).
  """
  horizon = tc.get('lr_schedule_epochs', 0)
  scale = tc.num_epochs / horizon if horizon else 1.0
  schedule = _step_decay(tc.learning_rate, [float(e) * scale * steps_per_epoch
                                            for e in tc.lr_decay_epochs], tc.lr_decay_factor)
  clip = tc.get('clip_grad_norm', 0.0)
  if not clip >= 0:
    raise ValueError(f'config.train.clip_grad_norm must be >= 0 (0 = no clipping), got {clip}')
  tx = optax.chain(*([optax.clip_by_global_norm(clip)] if clip > 0 else []),
                   optax.add_decayed_weights(tc.weight_decay, mask=decay_mask),
                   optax.sgd(schedule, momentum=tc.momentum))
  return tx, schedule


def adam_constant(learning_rate: float, b1: float = 0.5, b2: float = 0.999
                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam at a constant learning rate (ComDefend's authors: b1 0.5)."""
  return optax.adam(learning_rate, b1=b1, b2=b2), optax.constant_schedule(learning_rate)


def adam_step_decay(learning_rate: float, fractions, factor: float, total_steps: int
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam whose learning rate is multiplied by `factor` at each of `fractions` of the run's
  `total_steps` (HGD's and Adv-BNN's authors decay at fixed epochs of a fixed-length run)."""
  schedule = _step_decay(learning_rate, [float(f) * total_steps for f in fractions], factor)
  return optax.adam(schedule), schedule


def _step_decay(learning_rate: float, at_steps, factor: float) -> optax.Schedule:
  """`learning_rate` multiplied by `factor` at each of `at_steps` (rounded to a step; those
  at step 0 or before are dropped, repeats compound)."""
  boundaries = {}
  for at in at_steps:
    b = int(round(at))
    if b > 0:
      boundaries[b] = boundaries.get(b, 1.0) * factor
  return optax.piecewise_constant_schedule(learning_rate, boundaries)


def freeze(tx: optax.GradientTransformation, frozen: Callable[[tuple[str, ...]], bool]
           ) -> optax.GradientTransformation:
  """`tx` on the leaves whose key path (a tuple of names) is not `frozen`; zero updates (and
  no optimiser state) on the others."""
  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'frozen' if frozen(tuple(_key_name(k) for k in path)) else 'trained',
        params)
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


def _key_name(k) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
