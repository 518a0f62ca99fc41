"""An ensemble of identical classifiers in one module (ADP, Pang et al. 2019).

Usage:
  model = Ensemble(build_model(config.model, 10, (28, 28, 1)), members=3)
  member_logits = model.apply(variables, images)                 # (members, N, K)
  logits = model.apply(variables, images, method='classify')     # log of the mean softmax

Each member is a copy of `member` (a DefendPP without decoder) with its own parameters and
BatchNorm statistics, under 'member0', 'member1', ...
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


class Ensemble(nn.Module):
  member: nn.Module   # unbound template: cloned once per member, never called itself
  members: int = 3

  def setup(self):
    fields = {f.name: getattr(self.member, f.name) for f in dataclasses.fields(self.member)
              if f.init and f.name not in ('parent', 'name')}
    self.nets = [type(self.member)(**fields, name=f'member{i}') for i in range(self.members)]

  @property
  def image_shape(self):
    return self.member.image_shape

  def __call__(self, x, train: bool = False):
    """Every member's logits, stacked: (members, N, K)."""
    return jnp.stack([net(x, train=train)[0] for net in self.nets])

  def classify(self, x, train: bool = False):
    """The averaged ensemble's prediction: log of the members' mean softmax."""
    logp = jax.nn.log_softmax(self(x, train=train), -1)
    return jax.nn.logsumexp(logp, 0) - jnp.log(float(self.members))
