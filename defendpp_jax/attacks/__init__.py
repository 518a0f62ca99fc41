"""Adversarial attacks as pure, jit-able JAX functions, and the gradient seam they share.

Every attack takes a model (an `AttackModel`: a defence's view, with exact, BPDA or EOT
gradients; or a plain `logits_fn: (N, H, W, C) float32 in [0, 1] -> (N, K) logits`), a batch `x`
in [0, 1], integer labels `y` and a `key` (the random start's and, fresh per step and per EOT
draw, the model's randomness), and returns `x_adv` with the shape of `x`, in [0, 1] and (for the
bounded attacks) inside the eps-ball around `x`. Attacks never normalise pixels (the model does)
and never choose the model's mode: the caller binds inference mode (BatchNorm's stored
statistics) into the model, e.g. `partial(model.apply, variables, train=False)`.

Usage:
  attack = jax.jit(functools.partial(attacks.pgd, logits_fn),
                   static_argnames=('num_steps', 'norm', 'restarts', 'random_start', 'loss',
                                    'unroll'))
  x_adv = attack(x, y, eps=0.3, step_size=0.01, num_steps=40, key=jax.random.key(0))

Arguments that select code paths or loop lengths (`num_steps`, `binary_search_steps`, `restarts`,
`norm`, `loss`, `quantize`, `levels`, `random_start`, `abort_early`, `unroll`) must be static
under `jax.jit`. Numeric budgets (`eps`, `step_size`, `gamma`, `max_norm`, ...) and `target` may
be traced (None or not is part of the trace); `eps` / `step_size` may also be per-example arrays.

On `unroll`: iterative attacks run their steps with `lax.fori_loop(..., unroll=unroll)`. The
default `unroll=1` keeps compile time independent of the step count: a fully unrolled loop
compiles one copy of the model gradient per step (~0.25 s per step for a 2-layer conv net on a
2-core CPU, much more for a ResNet-18, and it multiplies with restarts / search steps). For
small conv nets the rolled loop ran as fast as the unrolled one, but for a ResNet-18 XLA:CPU
was measured 4-8x slower on a while-loop body containing the conv gradients than on the same
steps unrolled: for long evaluations of such models, pass `unroll=True`.
"""

from defendpp_jax.attacks.bounded import apgd
from defendpp_jax.attacks.bounded import apgd_checkpoints
from defendpp_jax.attacks.bounded import apgd_increases
from defendpp_jax.attacks.bounded import apgd_targeted
from defendpp_jax.attacks.bounded import bim
from defendpp_jax.attacks.bounded import fgsm
from defendpp_jax.attacks.bounded import pgd
from defendpp_jax.attacks.boundary import fab_targeted
from defendpp_jax.attacks.core import LOSSES
from defendpp_jax.attacks.core import AttackModel
from defendpp_jax.attacks.core import LatentSpace
from defendpp_jax.attacks.core import as_attack_model
from defendpp_jax.attacks.core import ce_loss
from defendpp_jax.attacks.core import dlr_loss
from defendpp_jax.attacks.core import is_adversarial
from defendpp_jax.attacks.core import l2_norm
from defendpp_jax.attacks.core import margin_loss
from defendpp_jax.attacks.core import objective
from defendpp_jax.attacks.core import project_l2
from defendpp_jax.attacks.core import project_linf
from defendpp_jax.attacks.core import random_init
from defendpp_jax.attacks.gradient_free import square
from defendpp_jax.attacks.latent import latent
from defendpp_jax.attacks.minimal_norm import cw_l2
from defendpp_jax.attacks.minimal_norm import ddn

ATTACKS = {'fgsm': fgsm, 'bim': bim, 'pgd': pgd, 'cw_l2': cw_l2, 'ddn': ddn, 'apgd': apgd,
           'apgd_t': apgd_targeted, 'fab_t': fab_targeted, 'square': square, 'latent': latent}
