"""The latent-space attack on a generator defence (Athalye et al. 2018, on Defense-GAN).

Usage:
  model = defence.attack_model('latent')       # the classifier behind + the generator's space
  x_adv = latent(model, x, y, key=key, eps=0.3, norm='linf', num_steps=100, lr=0.01, const=1.0)

A defence that projects its input onto a generator's range, x -> G(z*(x)), is attacked where it
is weakest: on that range. z starts at the projection's z* of x and minimises
||G(z) - x||_2^2 - const x margin(f(G(z))) with Adam, f the classifier behind the projection;
every step's candidate is G(z) brought into the eps-ball around x and [0, 1], and the candidate
of the largest margin on f is returned. A point of G's range is projected back near itself, so
f(G(z)) is what the deployed defence predicts, up to the projection's own error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from defendpp_jax.attacks import core

Array = jax.Array


def latent(model: core.AttackModel, x: Array, y: Array, *, key: Array, eps,
           norm: str = 'linf', num_steps: int = 100, lr: float = 0.01,
           const: float = 1.0) -> Array:
  """x_adv (in the eps-ball around x and [0, 1]) found in the latent space of `model.latent`."""
  if model.latent is None:
    raise ValueError("attack latent: the model has no generator (it needs view='latent' on a "
                     "defence with a latent space: defense_gan)")
  space = model.latent
  k_enc, k_model = jax.random.split(key)
  keys = core.model_keys(model, k_model)
  z = jax.lax.stop_gradient(space.encode(x, k_enc))
  margin = lambda logits: core.margin_loss(logits, y)
  tx = optax.adam(lr)

  def objective(z, k):
    g = space.generate(z)
    dist = jnp.sum(jnp.square(g - x), axis=core.example_axes(g))
    return jnp.sum(dist - const * margin(model.logits(g, k)))

  def candidate(z, k):
    x_adv = core.project(space.generate(z), x, eps, norm)
    return x_adv, margin(model.logits(x_adv, k))

  def step(i, carry):
    z, opt, best_x, best_m = carry
    k = keys(i)
    updates, opt = tx.update(jax.grad(objective)(z, k), opt, z)
    z = optax.apply_updates(z, updates)
    x_adv, m = candidate(z, k)
    better = m > best_m
    best_x = jnp.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, best_x)
    return z, opt, best_x, jnp.where(better, m, best_m)

  x0, m0 = candidate(z, keys(core.FINAL_STEP))
  _, _, best_x, _ = jax.lax.fori_loop(0, num_steps, step, (z, tx.init(z), x0, m0))
  return best_x
