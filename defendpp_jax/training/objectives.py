"""Adversarial-training inputs crafted against the model being trained (Goodfellow, Madry, Rony).

Usage:
  x_adv = craft_adversarial(state, images, labels, key, model=model, adversarial='pgd',
                            eps=0.3, steps=10, max_norm=2.4)
"""

from __future__ import annotations

import jax

from defendpp_jax import attacks
from defendpp_jax import protocol
from defendpp_jax.nn import defendpp
from defendpp_jax.runs.state import TrainState

ADVERSARIAL = protocol.ADVERSARIAL


def craft_adversarial(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array,
                      *, model: defendpp.DefendPP, adversarial: str, eps: float, steps: int,
                      max_norm: float, step_size_factor: float = 2.5) -> jax.Array:
  """Adversarial training inputs against the current classifier.

  The attack sees the classifier in training mode (batch statistics, as the model it updates),
  but its BatchNorm statistic updates are discarded: crafting must not move the running averages.
  """
  def logits_fn(x):
    return model.apply(state.variables, x, train=True, mutable=['batch_stats'],
                       method='classify')[0]

  if adversarial == 'fgsm':
    return attacks.fgsm(logits_fn, images, labels, eps=eps)
  if adversarial == 'pgd':
    return attacks.pgd(logits_fn, images, labels, eps=eps, step_size=step_size_factor * eps /
                       steps, num_steps=steps, key=key)
  if adversarial == 'ddn':
    return attacks.ddn(logits_fn, images, labels, num_steps=steps, max_norm=max_norm)
  raise ValueError(f'config.train.adversarial={adversarial!r} is not one of {ADVERSARIAL}')
