"""Our `autoattack` against the published AutoAttack (Croce & Hein 2020) on the same weights.

  python -m launch.torch_autoattack --workdir=runs/repro/mnist-cpu/plain \
      --data_dir=../shared/data/mnist --eps=0.05 --num_examples=100 \
      [--out=results/autoattack_agreement.json]

Needs PyTorch (requirements-bench.txt) and the published package, which is not on the package
index: `pip install git+https://github.com/fra31/auto-attack` (or its source on PYTHONPATH).

The deployed model of the run (any `config.defense`, deterministic only) is wrapped as a
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

_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained run to attack.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'Raw data files ("" = the run\'s data_dir).')
_EPS = flags.DEFINE_float('eps', None, 'L-inf budget.')
_N = flags.DEFINE_integer('num_examples', 100, 'First test images attacked.')
_BATCH = flags.DEFINE_integer('batch_size', 100, 'Batch size of both implementations.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of both.')
_OUT = flags.DEFINE_string('out', '', 'JSON file to write (else only printed).')
# The published names of AutoAttack's components -> ours (autoattack's parts, specs.ENSEMBLES).
COMPONENTS = {'apgd-ce': 'apgd_ce', 'apgd-t': 'apgd_t', 'fab-t': 'fab_t', 'square': 'square'}
_COMPONENTS = flags.DEFINE_list('components', list(COMPONENTS), 'The cascade run by both, in '
                                'order (a subset compares single components: --components=fab-t).')
flags.mark_flags_as_required(['workdir', 'eps'])


def torch_module(logits_fn, max_batch: int):
  """A torch.nn.Module (NCHW in [0, 1] -> logits) running `logits_fn` (NHWC, JAX) forward and
  its VJP backward; batches padded to a power of two (few shapes compiled)."""
  import torch  # pylint: disable=g-import-not-at-top

  forward = jax.jit(logits_fn)
  backward = jax.jit(lambda x, ct: jax.vjp(logits_fn, x)[1](ct)[0])

  def padded(a: np.ndarray) -> tuple[np.ndarray, int]:
    n = a.shape[0]
    size = max(n, min(1 << max(0, n - 1).bit_length(), max_batch))
    return np.concatenate([a, np.zeros((size - n,) + a.shape[1:], a.dtype)]), n

  class JaxLogits(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x):  # pylint: disable=arguments-differ
      nhwc, n = padded(x.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float32))
      ctx.save_for_backward(x)
      return torch.from_numpy(np.asarray(forward(jnp.asarray(nhwc)))[:n].copy())

    @staticmethod
    def backward(ctx, grad_out):  # pylint: disable=arguments-differ
      (x,) = ctx.saved_tensors
      nhwc, n = padded(x.detach().cpu().numpy().transpose(0, 2, 3, 1).astype(np.float32))
      ct, _ = padded(grad_out.detach().cpu().numpy().astype(np.float32))
      g = np.asarray(backward(jnp.asarray(nhwc), jnp.asarray(ct)))[:n]
      return torch.from_numpy(g.transpose(0, 3, 1, 2).copy())

  class Module(torch.nn.Module):

    def forward(self, x):  # pylint: disable=arguments-differ
      return JaxLogits.apply(x)

  return Module().eval()


def our_specs(dataset: str, eps: float, components) -> list[specs_lib.AttackSpec]:
  """Our `autoattack` entry's parts named by `components` (published names), in that order."""
  unknown = sorted(set(components) - set(COMPONENTS))
  if unknown:
    raise ValueError(f'--components: unknown {unknown}; known: {list(COMPONENTS)}')
  parts = {s.key: s for s in specs_lib.ensemble_specs(config_lib.get_base_config().eval,
                                                       dataset, 'autoattack', {'eps': eps})}
  return [parts[f'autoattack:{COMPONENTS[c]}'] for c in components]


def compare(defence, images: np.ndarray, labels: np.ndarray, dataset: str, eps: float,
            batch_size: int, seed: int, components=tuple(COMPONENTS)) -> dict:
  """Both AutoAttacks (`components`, in order) on `defence` (deterministic)."""
  import torch  # pylint: disable=g-import-not-at-top
  from autoattack import AutoAttack  # pylint: disable=g-import-not-at-top

  if defence.randomised:
    raise ValueError(f'{defence.name} is randomised: compare deterministic defences only')
  specs = our_specs(dataset, eps, components)
  ours = evaluation.ensemble_results(
      defence, images, labels, specs, batch_size, jax.random.key(seed), draws=1,
      view='exact', eot_samples=1, eot_chunk=1, progress=False)
  ours_robust = np.asarray(ours['autoattack'].ok_per_draw[0], bool)

  model = defence.attack_model('exact', 1, 1)
  net = torch_module(lambda x: model.logits(x, None), batch_size)
  x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  y_t = torch.from_numpy(labels.astype(np.int64))
  torch.manual_seed(seed)
  adversary = AutoAttack(net, norm='Linf', eps=eps, version='standard', device='cpu',
                         seed=seed)
  adversary.attacks_to_run = list(components)
  log = io.StringIO()
  with redirect_stdout(log):
    x_adv = adversary.run_standard_evaluation(x_t, y_t, bs=batch_size)
  adv = x_adv.numpy().transpose(0, 2, 3, 1)
  if float(np.abs(adv - images).max()) > eps + 1e-5 or adv.min() < 0 or adv.max() > 1:
    raise RuntimeError('the published AutoAttack returned points outside the eps-ball or [0, 1]')
  logits = np.asarray(jax.jit(lambda x: model.logits(x, None))(jnp.asarray(adv)))
  theirs_robust = logits.argmax(-1) == labels
  clean = np.asarray(jax.jit(lambda x: model.logits(x, None))(jnp.asarray(images))
                     ).argmax(-1) == labels
  n = len(labels)
  count = lambda m: int(np.sum(m))
  return {
      'model': defence.name, 'dataset': dataset, 'eps': eps, 'norm': 'linf',
      'num_examples': n, 'clean_correct': count(clean),
      'ours': {'robust': count(ours_robust),
               'components': {k: ours[k].correct for k in ours}},
      'published': {'robust': count(theirs_robust),
                    'version': 'standard', 'components': list(components), 'log': log.getvalue().strip().splitlines()},
      'agreement': {'both_robust': count(ours_robust & theirs_robust),
                    'both_broken': count(~ours_robust & ~theirs_robust),
                    'robust_for_ours_only': count(ours_robust & ~theirs_robust),
                    'robust_for_published_only': count(~ours_robust & theirs_robust),
                    'fraction': float(np.mean(ours_robust == theirs_robust))},
  }


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
  defence = registry.build(config, _WORKDIR.value, ds)
  result = compare(defence, np.asarray(images, np.float32), np.asarray(labels, np.int32),
                   config.data.name, _EPS.value, _BATCH.value, _SEED.value,
                   tuple(_COMPONENTS.value))
  result['workdir'] = os.path.abspath(_WORKDIR.value)
  print(json.dumps(result, indent=1))
  if _OUT.value:
    files.write_json(_OUT.value, result)


if __name__ == '__main__':
  app.run(main)
