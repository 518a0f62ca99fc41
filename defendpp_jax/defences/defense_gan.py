"""Defense-GAN (Samangouei et al. 2018): the input projected onto a generator's range, classified.

Usage:
  gen = Generator(image_shape=(28, 28, 1), latent=128, width=32)
  rec, z, err = project(lambda z: gen.apply(gen_vars, z), x, key, latent=128)  # R x L steps
  pre = projection(gen, gen_vars)              # a Preprocessor: classifier(G(z*(x)))
  model = defence.attack_model('latent')        # the classifier behind + G's latent space
  x_adv = attacks.latent(model, x, y, key=key, eps=0.1)          # attacks/latent.py

The generator G is a WGAN-GP's (training/gan.py). At test time, for every input x, R random
restarts z_0 ~ N(0, I) each take L gradient steps with momentum on ||G(z) - x||^2 (the mean over
pixels), the learning rate x `decay_factor` after `decay_at` of the steps; the z* of the lowest
error is kept and the classifier sees G(z*) (kabkabm/defensegan: R = 10, L = 200, lr 10,
momentum 0.7, x0.1 at 80%). All restarts run at once (vmapped over R), jitted over the batch.
The restarts' starting points come from the key: the defence is randomised.

Attacked three ways (docs/DEFENCES.md): `exact` differentiates the unrolled R x L steps (the
gradients that vanish, kabkabm/defensegan#1; every step is rematerialised so memory stays that
of one step); `bpda` takes the projection as the identity in the backward pass; the `latent`
view and attack (Athalye et al. 2018) search the generator's latent space directly:
z = argmin ||G(z) - x||^2 - const x margin(f(G(z))), started at the projection's z*, and the
adversarial is G(z) brought into the eps-ball around x (a point on G's range, which the
projection maps back near itself).

Differences from the reference: G and the critic are DCGAN-sized nets without BatchNorm (the
critic must have none for the gradient penalty; the generator's is dropped so that G is one
function of z in training and at test time), G ends in a sigmoid (pixels in [0, 1]), and both
run XLA's convolutions (the penalty and the exact attack differentiate twice).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from defendpp_jax.attacks import core
from defendpp_jax.defences import base

Array = jax.Array
STAND_INS = (('projection onto the generator\'s range (R restarts x L gradient steps)',
              'identity'),)


class Generator(nn.Module):
  """z (N, latent) -> images (N, H, W, C) in [0, 1]: dense to (H/4, W/4, 2 width), two 4x4
  stride-2 transposed convolutions (ReLU between), sigmoid."""
  image_shape: tuple[int, int, int]
  latent: int = 128
  width: int = 32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    h, w, c = self.image_shape
    if h % 4 or w % 4:
      raise ValueError(f'Defense-GAN generator: image size {h}x{w} is not a multiple of 4')
    if z.shape[-1] != self.latent:
      raise ValueError(f'Defense-GAN generator: z has {z.shape[-1]} dimensions, the generator '
                       f'{self.latent} (config.defense.defense_gan.latent)')
    x = nn.relu(nn.Dense(h // 4 * w // 4 * 2 * self.width, name='dense')(z))
    x = x.reshape(z.shape[:-1] + (h // 4, w // 4, 2 * self.width))
    x = nn.relu(nn.ConvTranspose(self.width, (4, 4), (2, 2), padding='SAME', name='up1')(x))
    x = nn.ConvTranspose(c, (4, 4), (2, 2), padding='SAME', name='up2')(x)
    return nn.sigmoid(x)


class Critic(nn.Module):
  """images -> (N,) scores: two 4x4 stride-2 convolutions (leaky ReLU 0.2), a dense output."""
  width: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = x * 2.0 - 1.0
    for i, f in enumerate((self.width, 2 * self.width)):
      x = nn.leaky_relu(nn.Conv(f, (4, 4), (2, 2), padding='SAME', name=f'conv{i}')(x), 0.2)
    return nn.Dense(1, name='score')(x.reshape(x.shape[0], -1))[:, 0]


@dataclasses.dataclass(frozen=True)
class ProjectionSettings:
  """The projection's settings (config.defense.defense_gan; the reference's defaults)."""
  restarts: int = 10
  steps: int = 200
  lr: float = 10.0
  momentum: float = 0.7
  decay_at: float = 0.8
  decay_factor: float = 0.1

  def __post_init__(self):
    if self.restarts < 1 or self.steps < 1:
      raise ValueError(f'config.defense.defense_gan: restarts={self.restarts} and '
                       f'steps={self.steps} must be >= 1')
    if self.lr <= 0 or not 0 <= self.momentum < 1 or not 0 <= self.decay_at <= 1:
      raise ValueError(f'config.defense.defense_gan: lr={self.lr} must be > 0, momentum='
                       f'{self.momentum} in [0, 1), decay_at={self.decay_at} in [0, 1]')


def reconstruction_error(generate: Callable[[Array], Array], z: Array, x: Array) -> Array:
  """||G(z) - x||^2 as the mean over pixels, per example; z (..., N, latent), x (N, H, W, C)."""
  return jnp.mean(jnp.square(generate(z) - x), axis=(-3, -2, -1))


def project(generate: Callable[[Array], Array], x: Array, key: Array, *, latent: int,
            settings: ProjectionSettings = ProjectionSettings(), z_init: Array | None = None
            ) -> tuple[Array, Array, Array]:
  """(G(z*), z*, error of z*) for x (N, H, W, C): the best of R restarts x L momentum steps.

  `generate` maps (N, latent) to images; `z_init` (R, N, latent) replaces the random starts."""
  s = settings
  n = x.shape[0]
  z0 = (jax.random.normal(key, (s.restarts, n, latent), x.dtype) if z_init is None
        else z_init)
  flat_x = jnp.broadcast_to(x, (z0.shape[0],) + x.shape).reshape((-1,) + x.shape[1:])
  err_of = lambda z: reconstruction_error(generate, z, flat_x)
  grad_of = jax.grad(lambda z: jnp.sum(err_of(z)))  # each z's own gradient (independent rows)
  decay_step = int(s.decay_at * s.steps)

  @jax.checkpoint
  def step(i, carry):
    z, v = carry
    v = s.momentum * v + grad_of(z)
    lr = jnp.where(i < decay_step, s.lr, s.lr * s.decay_factor)
    return z - lr * v, v

  z = z0.reshape(-1, latent)
  z, _ = jax.lax.fori_loop(0, s.steps, step, (z, jnp.zeros_like(z)))
  err = err_of(z).reshape(z0.shape[0], n)
  best = jnp.argmin(err, axis=0)
  z_best = jnp.take_along_axis(z.reshape(z0.shape), best[None, :, None], axis=0)[0]
  return generate(z_best), z_best, jnp.min(err, axis=0)


def projection(generator: Generator, variables: Any,
               settings: ProjectionSettings = ProjectionSettings(),
               name: str = 'defense_gan') -> base.Preprocessor:
  """x -> G(z*(x)) as a randomised pre-processor (BPDA stand-in: the identity), with the
  latent space the `latent` view attacks."""
  def generate(v, z):
    return generator.apply(v, z)

  def apply(v, x, key, bpda):
    if key is None:
      raise ValueError('defense_gan is randomised (its restarts): its logits need a key')
    rec = project(lambda z: generate(v, z), x, key, latent=generator.latent,
                  settings=settings)[0]
    return base.straight_through(rec, x) if bpda else rec

  def latent_space(v) -> core.LatentSpace:
    encode = lambda x, key: project(lambda z: generate(v, z), x, key, latent=generator.latent,
                                    settings=settings)[1]
    return core.LatentSpace(lambda z: generate(v, z), encode)

  return base.Preprocessor(name, apply, variables, randomised=True, stand_ins=STAND_INS,
                           latent=latent_space)
