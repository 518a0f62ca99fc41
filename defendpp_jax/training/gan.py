"""Defense-GAN's generator: a WGAN-GP (Gulrajani et al. 2017) trained through the trainer's seam.

Usage:
  recipe = wgan_recipe(config, ds, steps_per_epoch)      # config.defense.name = 'defense_gan'
  state, metrics = recipe.step(state, images, labels, weights, key, None)

The recipe brings its own step (Recipe.step): each trainer step is one critic update on its
batch (real images against G's samples, + gp_weight x (||grad_x critic(x_hat)|| - 1)^2 at random
interpolates x_hat), and every `critic_steps`-th step also one generator update (-critic(G(z)))
with the just-updated critic: 5 critic updates per generator update, each on its own real batch,
as the reference. Adam(learning_rate, b1, b2) for both nets, separate states. At the end the
run writes an 8x8 grid of samples (samples.png) and the projection error of test images.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from defendpp_jax import data as data_lib
from defendpp_jax.defences import defense_gan
from defendpp_jax.defences import registry
from defendpp_jax.runs.state import TrainState
from defendpp_jax.training import recipes

SAMPLES_PNG = 'samples.png'
# fold_in constants of the step's streams (fake batch, interpolation, generator's batch).
_FAKE, _MIX, _GEN = 0x6A4, 0x313, 0x6E0


def init_gan_state(generator, critic, tx_g, tx_c, key, image_shape) -> TrainState:
  k_g, k_c = jax.random.split(key)
  g = generator.init(k_g, jnp.zeros((2, generator.latent), jnp.float32))['params']
  c = critic.init(k_c, jnp.zeros((2, *image_shape), jnp.float32))['params']
  params = {'generator': g, 'critic': c}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                    opt_state={'generator': tx_g.init(g), 'critic': tx_c.init(c)})


def gradient_penalty(critic_fn, real, fake, key) -> jax.Array:
  """mean over x_hat of (||grad critic(x_hat)||_2 - 1)^2, x_hat = t real + (1 - t) fake."""
  t = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1), real.dtype)
  mix = t * real + (1.0 - t) * fake
  g = jax.grad(lambda m: jnp.sum(critic_fn(m)))(mix)
  norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) + 1e-12)
  return jnp.mean(jnp.square(norm - 1.0))


def wgan_step(state, images, labels, weights, key, frozen, *, generator, critic, tx_g, tx_c,
              critic_steps: int, gp_weight: float):
  """One critic update, and a generator update on every `critic_steps`-th step."""
  del labels, weights, frozen
  key = jax.random.fold_in(key, state.step)
  params, n = state.params, images.shape[0]
  latent = generator.latent
  fake = generator.apply({'params': params['generator']},
                         jax.random.normal(jax.random.fold_in(key, _FAKE), (n, latent)))
  fake = jax.lax.stop_gradient(fake)

  def critic_loss(pc):
    critic_fn = lambda x: critic.apply({'params': pc}, x)
    distance = jnp.mean(critic_fn(images)) - jnp.mean(critic_fn(fake))
    gp = gradient_penalty(critic_fn, images, fake, jax.random.fold_in(key, _MIX))
    return -distance + gp_weight * gp, (distance, gp)

  (loss_c, (distance, gp)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
      params['critic'])
  updates, opt_c = tx_c.update(grads, state.opt_state['critic'], params['critic'])
  pc = optax.apply_updates(params['critic'], updates)

  def generator_update(_):
    def loss(pg):
      g = generator.apply({'params': pg},
                          jax.random.normal(jax.random.fold_in(key, _GEN), (n, latent)))
      return -jnp.mean(critic.apply({'params': pc}, g))
    loss_g, grads = jax.value_and_grad(loss)(params['generator'])
    updates, opt_g = tx_g.update(grads, state.opt_state['generator'], params['generator'])
    return optax.apply_updates(params['generator'], updates), opt_g, loss_g

  def keep(_):  # the generator's loss on this step's samples, for the log
    return (params['generator'], state.opt_state['generator'],
            -jnp.mean(critic.apply({'params': pc}, fake)))

  pg, opt_g, loss_g = jax.lax.cond((state.step + 1) % critic_steps == 0, generator_update,
                                   keep, None)
  new = TrainState(state.step + 1, {'generator': pg, 'critic': pc}, state.batch_stats,
                   {'generator': opt_g, 'critic': opt_c})
  return new, {'loss': loss_c, 'critic_loss': loss_c, 'wasserstein': distance,
               'gradient_penalty': gp, 'generator_loss': loss_g}


def sample_grid(images: np.ndarray, rows: int = 8) -> np.ndarray:
  """(rows * cols, H, W, C) in [0, 1] -> one uint8 image of the tiles (1-pixel gaps)."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = im
  return np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)


def write_png(array: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tmp = path + '.tmp.png'
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp)
  os.replace(tmp, path)


def gan_artifacts(params: Any, workdir: str, *, config, ds) -> dict[str, Any]:
  """samples.png (64 samples of fixed z) and the projection error of 16 test images."""
  gen = registry.defense_gan_generator(config, ds)
  g_vars = {'params': params['generator']}
  z = jax.random.normal(jax.random.key(config.train.seed), (64, gen.latent))
  samples = np.asarray(jax.jit(gen.apply)(g_vars, z))
  write_png(sample_grid(samples), os.path.join(workdir, SAMPLES_PNG))
  x = jnp.asarray(ds.test_images[:16])
  rec, _, err = jax.jit(lambda v, x, k: defense_gan.project(
      lambda z: gen.apply(v, z), x, k, latent=gen.latent,
      settings=registry.projection_settings(config)))(g_vars, x, jax.random.key(0))
  return {'samples_png': SAMPLES_PNG,
          'projection_mse_test16': float(jnp.mean(err)),
          'projection_l2_test16': float(jnp.mean(jnp.sqrt(jnp.sum(
              jnp.square(rec - x), axis=(1, 2, 3)))))}


def wgan_recipe(config: ml_collections.ConfigDict, ds: data_lib.Dataset,
                steps_per_epoch: int) -> recipes.Recipe:
  del steps_per_epoch
  dg = config.defense.defense_gan
  if dg.critic_steps < 1 or dg.gp_weight < 0:
    raise ValueError(f'config.defense.defense_gan: critic_steps={dg.critic_steps} must be '
                     f'>= 1 and gp_weight={dg.gp_weight} >= 0')
  generator = registry.defense_gan_generator(config, ds)
  critic = defense_gan.Critic(dg.width)
  adam = lambda: optax.adam(dg.learning_rate, b1=dg.b1, b2=dg.b2)
  tx_g, tx_c = adam(), adam()
  step = functools.partial(wgan_step, generator=generator, critic=critic, tx_g=tx_g,
                           tx_c=tx_c, critic_steps=dg.critic_steps, gp_weight=dg.gp_weight)
  return recipes.Recipe(
      generator, None, optax.constant_schedule(dg.learning_rate),
      functools.partial(init_gan_state, generator, critic, tx_g, tx_c,
                        image_shape=tuple(ds.image_shape)),
      None, (), lambda epoch: ((), 'wgan-gp'), step=step,
      artifacts=functools.partial(gan_artifacts, config=config, ds=ds),
      description=(f'defense_gan WGAN-GP width {dg.width}, latent {dg.latent}, '
                   f'{dg.critic_steps} critic steps per generator step'))


RECIPES = {'defense_gan': wgan_recipe}
