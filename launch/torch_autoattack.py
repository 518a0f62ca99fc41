"""Our `autoattack` against the published AutoAttack (Croce & Hein 2020) on the same weights.

  python -m launch.torch_autoattack --workdir=runs/repro/mnist-cpu/plain \
      --data_dir=../shared/data/mnist --eps=0.05 --num_examples=100 \
      [--out=results/autoattack_agreement.json]

Needs PyTorch (requirements-bench.txt) and the published package, which is not on the package
index: `pip install git+https://github.com/fra31/auto-attack` (or its source on PYTHONPATH).

`--version=rand --defence=sap` compares `autoattack_rand` with the published `rand` version
(APGD-CE and APGD-DLR with EOT 20) on a randomised defence put in front of the run's classifier.

The deployed model of the run (any `config.defense`) is wrapped as a
PyTorch module whose forward pass is our jitted JAX forward pass and whose backward pass is its
JAX vector-Jacobian product: both implementations attack the very same function, so the
comparison isolates the attacks. AutoAttack's `standard` version (APGD-CE, APGD-T over 9
targets, FAB-T over 9 targets, Square with 5,000 queries; L-inf) runs on the first
`num_examples` test images; ours is the `autoattack` entry at the same eps and budgets. Writes
the clean and robust accuracy of each, each component's robust count in our cascade, and the
per-image agreement of the final robust sets (both robust, both broken, ours only, theirs
only).
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from defendpp_jax import data as data_lib
from defendpp_jax import files
from defendpp_jax.attacks import specs as specs_lib
from defendpp_jax.defences import registry
from defendpp_jax import evaluation
from defendpp_jax.evaluation.evaluate import test_split
from defendpp_jax.runs import config as config_lib
from defendpp_jax.runs import saved
from launch import benchmark_attacks

_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained run to attack.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'Raw data files ("" = the run\'s data_dir).')
_EPS = flags.DEFINE_float('eps', None, 'L-inf budget.')
_N = flags.DEFINE_integer('num_examples', 100, 'First test images attacked.')
_BATCH = flags.DEFINE_integer('batch_size', 100, 'Batch size of both implementations.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of both.')
_OUT = flags.DEFINE_string('out', '', 'JSON file to write (else only printed).')
# The published names of AutoAttack's components -> ours (autoattack's parts, specs.ENSEMBLES).
COMPONENTS = {'apgd-ce': 'apgd_ce', 'apgd-t': 'apgd_t', 'fab-t': 'fab_t', 'square': 'square'}
RAND_COMPONENTS = {'apgd-ce': 'apgd_ce', 'apgd-dlr': 'apgd_dlr'}
VERSIONS = ('standard', 'rand')
_COMPONENTS = flags.DEFINE_list('components', [], 'The cascade run by both, in order ([] = the '
                                'whole version; a subset compares single components: '
                                '--components=fab-t).')
_VERSION = flags.DEFINE_enum('version', 'standard', list(VERSIONS), 'AutoAttack\'s version: '
                             'standard (deterministic defences) or rand (randomised: APGD-CE and '
                             'APGD-DLR with EOT 20).')
_DRAWS = flags.DEFINE_integer('draws', 2, 'rand: independent runs of our cascade (the '
                              'published code runs once).')
_DEFENCE = flags.DEFINE_string('defence', '', 'A config.defense.name needing no training '
                               '(sap, resize_pad, jpeg, ...; its default fields) put in front of '
                               'the run\'s classifier ("" = the run as deployed).')
flags.mark_flags_as_required(['workdir', 'eps'])


def torch_module(logits_fn, max_batch: int, key: jax.Array | None = None):
  """A torch.nn.Module (NCHW in [0, 1] -> logits) running `logits_fn` (NHWC, JAX) forward and
  its VJP backward; batches padded to a power of two (few shapes compiled).

  With `key` the function is randomised, `logits_fn(x, key)`: every forward call draws anew
  (fold_in(key, call number)) and its backward pass differentiates that same draw, as one EOT
  sample of the published APGD (eot_iter) is one forward and one backward pass."""
  import torch  # pylint: disable=g-import-not-at-top

  if key is None:
    forward = jax.jit(lambda x, k: logits_fn(x))
    backward = jax.jit(lambda x, k, ct: jax.vjp(logits_fn, x)[1](ct)[0])
  else:
    forward = jax.jit(logits_fn)
    backward = jax.jit(lambda x, k, ct: jax.vjp(lambda z: logits_fn(z, k), x)[1](ct)[0])
  calls = [0]

  def next_key():
    calls[0] += 1
    return jax.random.fold_in(key if key is not None else jax.random.key(0), calls[0])

  def padded(a: np.ndarray) -> tuple[np.ndarray, int]:
    n = a.shape[0]
    size = max(n, min(1 << max(0, n - 1).bit_length(), max_batch))
    return np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)]), n

  class JaxLogits(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):  # pylint: disable=arguments-differ
      nhwc, n = padded(x.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float32))
      ctx.save_for_backward(x)
      ctx.key = next_key()
      return torch.from_numpy(np.asarray(forward(jnp.asarray(nhwc), ctx.key))[:n].copy())

    @staticmethod
    def backward(ctx, grad_out):  # pylint: disable=arguments-differ
      (x,) = ctx.saved_tensors
      nhwc, n = padded(x.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float32))
      ct, _ = padded(grad_out.detach().cpu().numpy().astype(np.float32))
      g = np.asarray(backward(jnp.asarray(nhwc), ctx.key, jnp.asarray(ct)))[:n]
      return torch.from_numpy(g.transpose(0, 3, 1, 2).copy())

  class Module(torch.nn.Module):

    def forward(self, x):  # pylint: disable=arguments-differ
      return JaxLogits.apply(x)

  return Module().eval()


def our_specs(dataset: str, eps: float, components, version: str = 'standard'
              ) -> list[specs_lib.AttackSpec]:
  """Our `autoattack` (`version` 'rand': `autoattack_rand`) entry's parts named by
  `components` (published names), in that order."""
  known = COMPONENTS if version == 'standard' else RAND_COMPONENTS
  unknown = sorted(set(components) - set(known))
  if unknown:
    raise ValueError(f'--components: unknown {unknown} for --version={version}; known: '
                     f'{list(known)}')
  entry = 'autoattack' if version == 'standard' else 'autoattack_rand'
  parts = {s.key: s for s in specs_lib.ensemble_specs(config_lib.get_base_config().eval,
                                                       dataset, entry, {'eps': eps})}
  return [parts[f'{entry}:{known[c]}'] for c in components]


def compare(defence, images: np.ndarray, labels: np.ndarray, dataset: str, eps: float,
            batch_size: int, seed: int, components=None, version: str = 'standard',
            draws: int = 2) -> dict:
  """Both AutoAttacks (`components`, in order; default: the whole `version`) on `defence`.

  'standard' needs a deterministic defence. 'rand' (APGD-CE -> APGD-DLR, EOT 20) needs a
  randomised one: each implementation's robust set is its own cascade's verdict (one draw of the
  defence per check, as the published code decides: its returned labels); ours runs `draws`
  independent times (every attack and check key differs), the per-image agreement is of the
  first; the published code runs once."""
  import torch  # pylint: disable=g-import-not-at-top
  from autoattack import AutoAttack  # pylint: disable=g-import-not-at-top

  if version not in VERSIONS:
    raise ValueError(f'--version={version!r} is not one of {VERSIONS}')
  if (version == 'rand') != bool(defence.randomised):
    raise ValueError(f'{defence.name} is {"" if defence.randomised else "not "}randomised: '
                     f'--version={"rand" if defence.randomised else "standard"} compares it')
  components = tuple(components or (COMPONENTS if version == 'standard' else RAND_COMPONENTS))
  entry = 'autoattack' if version == 'standard' else 'autoattack_rand'
  specs = our_specs(dataset, eps, components, version)
  key = jax.random.key(seed)
  ours = evaluation.ensemble_results(
      defence, images, labels, specs, batch_size, key, draws=draws if version == 'rand' else 1,
      view='exact', eot_samples=1, eot_chunk=1, progress=False)
  ours_robust = np.asarray(ours[entry].ok_per_draw[0], bool)

  rand = version == 'rand'
  model = defence.attack_model('exact', 1, 1)
  torch_key = jax.random.fold_in(key, 0x70C4) if rand else None
  net = torch_module((lambda x, k: model.logits(x, k)) if rand else
                     (lambda x: model.logits(x, None)), batch_size, torch_key)
  x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  y_t = torch.from_numpy(labels.astype(np.int64))
  torch.manual_seed(seed)
  adversary = AutoAttack(net, norm='Linf', eps=eps, version=version, device='cpu', seed=seed)
  adversary.attacks_to_run = list(components)
  log = io.StringIO()
  with redirect_stdout(log):
    x_adv, y_adv = adversary.run_standard_evaluation(x_t, y_t, bs=batch_size,
                                                     return_labels=True)
  adv = x_adv.numpy().transpose(0, 2, 3, 1)
  if float(np.abs(adv - images).max()) > eps + 1e-5 or adv.min() < 0 or adv.max() > 1:
    raise RuntimeError('the published AutoAttack returned points outside the eps-ball or [0, 1]')
  classify = jax.jit(lambda x, k: jnp.argmax(model.logits(x, k if rand else None), -1))
  if rand:  # its own verdict: the labels its cascade's checks saw
    theirs_robust = y_adv.numpy() == labels
  else:
    theirs_robust = np.asarray(classify(jnp.asarray(adv), key)) == labels
  clean = np.asarray(classify(jnp.asarray(images), key)) == labels
  n = len(labels)
  count = lambda m: int(np.sum(m))
  result = {
      'model': defence.name, 'dataset': dataset, 'eps': eps, 'norm': 'linf',
      'num_examples': n, 'clean_correct': count(clean), 'version': version,
      'ours': {'entry': entry, 'robust': count(ours_robust),
               'components': {k: ours[k].correct for k in ours}},
      'published': {'robust': count(theirs_robust),
                    'version': version, 'components': list(components),
                    'log': log.getvalue().strip().splitlines()},
      'agreement': benchmark_attacks.agreement(ours_robust, theirs_robust),
  }
  if rand:
    per_draw = [int(np.sum(d)) for d in ours[entry].ok_per_draw]
    result['ours']['robust_per_draw'] = per_draw
    result['ours']['components_per_draw'] = {
        k: [int(np.sum(d)) for d in ours[k].ok_per_draw] for k in ours}
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = saved.config_of_run(_WORKDIR.value)
  if _DATA_DIR.value:
    config.data.data_dir = _DATA_DIR.value
  if not config.data.data_dir and not os.environ.get('DEFENDPP_DATA_DIR'):
    raise app.UsageError('--data_dir: the run\'s config names no data directory')
  ds = data_lib.dataset_of(config)
  config.eval.num_examples = _N.value
  images, labels = test_split(ds, config.eval)
  if _DEFENCE.value:  # an input-side defence (no training) in front of the run's classifier
    config.defense.name = _DEFENCE.value
    config.defense.classifier_workdir = os.path.abspath(_WORKDIR.value)
  defence = registry.build(config, _WORKDIR.value, ds)
  result = compare(defence, np.asarray(images, np.float32), np.asarray(labels, np.int32),
                   config.data.name, _EPS.value, _BATCH.value, _SEED.value,
                   tuple(_COMPONENTS.value) or None, _VERSION.value, _DRAWS.value)
  result['workdir'] = os.path.abspath(_WORKDIR.value)
  print(json.dumps(result, indent=1))
  if _OUT.value:
    files.write_json(_OUT.value, result)


if __name__ == '__main__':
  app.run(main)
