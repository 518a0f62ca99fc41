"""Every config field with its default, the dataset presets, and the migration of saved configs.

Usage:
  config = dataset_config('mnist')            # what configs/mnist.py returns
  config = apply_arg(config, 'smoke')         # the ':smoke' argument of a config file
  saved = migrate_config(json.load(f)['config'])   # a run's saved config, as today's fields

The config files under configs/ are thin: they call these functions (the library never imports
configs/). A field added after runs were saved is filled in as those runs behaved
(BEFORE_FIELD); a field that moved (MOVED_FIELDS) is read from its old place, in saved configs
and on the command line (`migrate_argv`).
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import ml_collections

from defendpp_jax.runs import defence_fields


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.name = 'mnist'          # mnist | cifar10 | digits | imagefolder (data_dir: train/, val/)
  config.data.data_dir = ''           # raw files; '' -> $DEFENDPP_DATA_DIR, else tfds
  config.data.train_limit = 0         # 0 = the whole split
  config.data.test_limit = 0

  config.model = ml_collections.ConfigDict()
  config.model.arch = 'resnet18'      # resnet18 | resnet34 | resnet50 | vgg16
  config.model.width = 64             # base width; 64 = the paper's networks
  config.model.shared_blocks = 4      # encoding blocks shared by classifier and AE (1-4; VGG 1-5)
  config.model.decoder = 'pyramid'    # pyramid | hourglass | hourglass_sc | hourglass_sa | none
  config.model.num_levels = 0         # pyramid levels M; 0 = all with the coarsest >= 7x7
  config.model.stem = 'auto'          # auto (CIFAR-style 3x3 for <= 32 px) | cifar | imagenet
  # Convolution kernels: auto (oneDNN on a single CPU device when available, else XLA) | xla |
  # onednn. Equal to float tolerance; oneDNN's are 2-5x faster on CPU (docs/PERFORMANCE.md).
  config.model.conv = 'auto'
  # Padding of the strided convolutions: torch (k // 2 on each side, as PyTorch's ResNets, the
  # paper's) | same (XLA's 'SAME': 0 before, 1 after on even sizes; runs saved before this field).
  config.model.padding = 'torch'

  config.loss = ml_collections.ConfigDict()
  config.loss.targets = 'dct'         # dct (MS-LP) | linear (MS-LI ablation)
  config.loss.lambda_ms = 0.01        # lambda of eq. 3; 0 = "w/o MS-LP" (full scale only)
  config.loss.full_scale_weight = 1.0 # weight of ||I~0 - I0||^2 (paper 1; authors' code 0.8)

  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 250
  config.train.batch_size = 256       # global, over all devices
  config.train.seed = 0
  config.train.learning_rate = 0.01
  config.train.lr_decay_epochs = (100, 200)
  # The decay epochs above are those of a run of this many epochs, rescaled to num_epochs
  # (250 with num_epochs=1: decays at 40% and 80% of the epoch); 0 = use them as they are.
  config.train.lr_schedule_epochs = 0
  config.train.lr_decay_factor = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  # > 0: the gradient rescaled to at most this global L2 norm before the SGD step (recipes on
  # config.train's SGD); 0 = never. Every step logs the gradient's global norm (grad_norm).
  config.train.clip_grad_norm = 0.0
  config.train.schedule = 'joint'     # joint | alternating (paper Sec. 3.4)
  config.train.alternating = ml_collections.ConfigDict()
  config.train.alternating.ae_epochs = 1
  config.train.alternating.cls_epochs = 1
  config.train.alternating.cycles = 2
  config.train.noise_std = 0.0        # > 0: Gaussian noise on the AE code ("ours + GN")
  # A finished run (workdir) whose classifier initialises this run's classifier and AE-owned
  # encoder copies (a fresh start only; a checkpoint in --workdir wins). '' = random init.
  # The authors' Defend++ scripts start joint training from a trained classifier this way.
  config.train.init_from = ''
  config.train.adversarial = 'none'   # none | fgsm (Goodfellow) | pgd (Madry) | ddn (Rony)
  config.train.adv_eps = 0.0          # L-inf eps of fgsm / pgd; 0 = 0.2 MNIST, 0.05 CIFAR-10
  config.train.adv_steps = 10         # steps of pgd / ddn crafting
  config.train.adv_max_norm = 0.0     # ddn L2 budget; 0 = 2.4 MNIST, 1.0 CIFAR-10
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 500
  # BatchNorm statistics of the trained model: > 0 re-estimates them at the end of training, with
  # the final weights, as the average over this many training batches ("precise BN"); 0 keeps
  # the running averages (which trail the weights by ~10 steps: at a high learning rate the
  # deployed model's statistics then belong to no set of weights it ever had). Clean-image
  # training only: adversarial training keeps its running averages (of clean and crafted batches).
  config.train.precise_bn_batches = 40
  config.train.max_to_keep = 3

  config.defense = defence_fields.defence_config()

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500
  # Robustness evaluation (python -m launch.evaluate); the paper's settings (Sec. 4.1). Each
  # entry is a name, or a name with its own settings, e.g. 'pgd(steps=40, loss=margin,
  # restarts=5, view=eot, eot_samples=20, label=pgd_margin)' (defendpp_jax.attacks.specs).
  config.eval.attacks = ('fgsm', 'bim', 'pgd', 'cw_l2', 'ddn', 'apgd')
  # The attacker's view of the defence: auto (the strongest it declares: EOT for a randomised
  # defence, BPDA for a non-differentiable step, both for both, exact otherwise) | exact |
  # bpda | eot | bpda+eot | oblivious (the classifier behind a pre-processor).
  config.eval.view = 'auto'
  config.eval.eot_samples = 10        # k of the EOT views
  config.eval.eot_chunk = 10          # EOT samples evaluated at once (vmapped); bounds memory
  config.eval.draws = 1               # R: independent draws of a randomised defence's randomness
  # True: the eps-bounded attacks run as a cascade, AutoAttack's worst case (each only on the
  # examples still defended after the ones before it, in increasing eps); every row is then the
  # per-example worst case over it and the rows above it (marked worst_case in the report).
  config.eval.worst_case = False
  config.eval.num_examples = 1000     # first N test images; 0 = the whole test split
  # The sanity checks' two attacks (PGD at eps 0 and eps 1) on the first N evaluated images
  # only (0 = all of them): for defences whose attack steps cost seconds an image.
  config.eval.check_examples = 0
  # Where each attack's finished draws are kept, so that a stopped evaluation re-run resumes at
  # the draw it was in: '' = $DEFENDPP_RESUME_DIR if set, else the evaluation's own `partial/`
  # (removed once its report is written). A directory named here (or by the variable) is a
  # store shared by evaluations and kept: its files are named by everything a draw depends on
  # (the weights, this config, the attack, its view, the images, the key), so a draw is reused
  # only where it would come out the same, on another machine too (a store kept with the
  # results carries a long evaluation across machines that retrain the same weights). Not part
  # of what the evaluation computes: ignored when saved evaluations are compared. Like a saved
  # report, a kept draw is not keyed by the code: after a change to what an attack or a defence
  # computes, start a new store.
  config.eval.resume_dir = ''
  config.eval.classes = ()            # only test images of these classes (() = all)
  config.eval.eps = 0.0               # L-inf eps; 0 = per dataset (0.2 MNIST, 0.05 CIFAR-10)
  config.eval.step_size_factor = 2.5  # BIM / PGD step = factor * eps / steps (Madry et al.)
  config.eval.bim_steps = 100
  config.eval.pgd_steps = 100
  config.eval.pgd_restarts = 1
  config.eval.apgd_steps = 100
  config.eval.apgd_loss = 'ce'        # ce | dlr
  config.eval.square_queries = 5000   # Square's query budget per example (AutoAttack's)
  config.eval.latent_steps = 100      # the latent attack (defense_gan): Adam steps on z
  config.eval.latent_lr = 0.01
  config.eval.cw_binary_steps = 5     # C&W 5 x 20
  config.eval.cw_steps = 20
  config.eval.cw_initial_const = 0.01
  config.eval.cw_lr = 0.01
  # Carlini's early abort: stop a search step's optimisation when the loss has not decreased by
  # 0.01% in a tenth of its steps (off: the paper's fixed 5 x 20).
  config.eval.cw_abort_early = False
  config.eval.ddn_steps = 100
  config.eval.l2_thresholds = ()      # () = per dataset; minimal-norm accuracy at these L2
  # Transfer: craft on this trained run, evaluate on --workdir. With a white-/grey-box threat
  # model the transfer rows come in addition to the direct ones.
  config.eval.source_workdir = ''
  # white_box: the attacker attacks the deployed model through config.eval.view; grey_box (or
  # its other name, oblivious): a pre-processor is hidden, the attacker crafts on the
  # classifier alone (= view 'oblivious'; ComDefend's own protocol, HGD's "white-box");
  # transfer: only the adversarials crafted on eval.source_workdir
  # (the Defend++ authors' C&W / DDN scripts craft on the undefended net).
  config.eval.threat_model = 'white_box'
  config.eval.seed = 0
  config.eval.figures = True          # accuracy-vs-eps sweep, reconstructions, R histogram
  config.eval.eps_grid = ()           # () = per dataset
  config.eval.sweep_pgd_steps = 20
  config.eval.sweep_examples = 500
  return config


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the config-file argument (`configs/x.py:smoke`); '' / None leave it unchanged."""
  if arg == 'smoke':
    return apply_smoke(config)
  if arg:
    raise ValueError(f'unknown config argument {arg!r} (expected "smoke")')
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a seconds-long run for tests (the ':smoke' argument)."""
  config.model.width = 4
  config.defense.comdefend.width = 2
  config.defense.hgd.widths = (4, 8, 8, 8, 8)
  config.data.train_limit = 128
  config.data.test_limit = 64
  config.train.num_epochs = 1
  config.train.batch_size = 32
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 2
  config.eval.batch_size = 32
  config.eval.num_examples = 64
  config.eval.bim_steps = 5
  config.eval.pgd_steps = 5
  config.eval.apgd_steps = 5
  config.eval.cw_binary_steps = 2
  config.eval.cw_steps = 5
  config.eval.ddn_steps = 5
  config.eval.square_queries = 20
  config.eval.latent_steps = 5
  config.eval.eps_grid = (0.1, 0.3)
  config.eval.sweep_pgd_steps = 3
  config.eval.sweep_examples = 32
  return config


# ---------------------------------------------------------------------------------------------
# Dataset presets (configs/mnist.py, configs/cifar10.py, configs/quickstart.py).


def dataset_config(name: str) -> ml_collections.ConfigDict:
  """The paper's settings for `name` ('mnist', 'cifar10'; 'digits' = the quickstart)."""
  config = get_base_config()
  config.data.name = name
  if name == 'mnist':
    config.model.shared_blocks = 4
    config.train.num_epochs = 250
    config.train.learning_rate = 0.01       # decayed x0.1 every 100 epochs until 250
    config.train.lr_decay_epochs = (100, 200)
  elif name == 'cifar10':
    config.model.shared_blocks = 3
    config.train.num_epochs = 300
    config.train.learning_rate = 0.1        # decayed x0.1 every 100 epochs until 300
    config.train.lr_decay_epochs = (100, 200)
  elif name == 'digits':
    config.model.width = 8
    config.model.shared_blocks = 4
    config.train.num_epochs = 15
    config.train.batch_size = 64
    config.train.learning_rate = 0.05
    config.train.lr_decay_epochs = (10,)
    config.train.log_every_steps = 50
    config.train.checkpoint_every_steps = 200
    # Shorter attacks than the paper's (100 steps; C&W 5 x 20 kept) so that `make run` stays a
    # few minutes on 2 CPU cores; every reported number states the steps it used.
    config.eval.num_examples = 360      # the whole digits test split
    for field in ('bim_steps', 'pgd_steps', 'apgd_steps'):
      config.eval[field] = 20
    config.eval.ddn_steps = 50
    config.eval.eps_grid = (0.05, 0.1, 0.2, 0.3, 0.5)
    config.eval.sweep_pgd_steps = 10
    config.eval.sweep_examples = 200
  else:
    raise ValueError(f'no preset for dataset {name!r} (mnist | cifar10 | digits)')
  config.train.lr_schedule_epochs = 0     # >0: rescale the decay epochs to num_epochs
  return config


# ---------------------------------------------------------------------------------------------
# Saved configs and command lines of earlier versions.

# Fields added after some runs were saved, whose default then differs from how those runs behaved.
BEFORE_FIELD = {'model.conv': 'xla', 'model.padding': 'same', 'train.precise_bn_batches': 0,
                'defense.comdefend.conv': 'xla'}
# Fields added after some runs of one defence were saved, that only that defence reads:
# path -> (the saved config.defense.name it applies to, how such runs behaved).
BEFORE_FIELD_OF_DEFENCE = {'defense.adv_bnn.optimizer': ('adv_bnn', 'sgd'),
                           'defense.deep_defense.norm_eps': ('deep_defense', 0.0)}
# Fields that moved: old path -> new path.
MOVED_FIELDS = {f'defense.{f}': f'defense.comdefend.{f}'
                for f in ('width', 'code_channels', 'noise_std', 'code_weight', 'learning_rate')}


def as_saved_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as its saved JSON reads back (tuples as lists), to compare with a saved one."""
  return json.loads(json.dumps(config.to_dict(), default=list))


# Fields that say where results are kept, not what they are: left out when runs or evaluations
# are compared and from the digest that names an evaluation's kept draws.
PLACE_FIELDS = ('eval.resume_dir',)


def computed_fields(config: dict[str, Any]) -> dict[str, Any]:
  """A config (as a dict) without its PLACE_FIELDS: what a run or an evaluation computes from."""
  out = copy.deepcopy(config)
  for path in PLACE_FIELDS:
    parent, _, leaf = path.rpartition('.')
    tree = _get(out, parent)
    if isinstance(tree, dict):
      tree.pop(leaf, None)
  return out


def _get(tree: dict, path: str, default=None):
  for part in path.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return default
    tree = tree[part]
  return tree


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split('.')
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


def migrate_config(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config (JSON) as today's fields: moved fields read from their old place, every
  missing field filled in as its run behaved (the base default, or BEFORE_FIELD /
  BEFORE_FIELD_OF_DEFENCE where the default has changed since). The one migration of saved
  runs."""
  saved = json.loads(json.dumps(saved))
  for old, new in MOVED_FIELDS.items():
    section, field = old.split('.')
    if isinstance(saved.get(section), dict) and field in saved[section] and not isinstance(
        saved[section][field], dict):
      value = saved[section].pop(field)
      if _get(saved, new) is None:
        _set(saved, new, value)

  name = _get(saved, 'defense.name')
  for path, (defence, value) in BEFORE_FIELD_OF_DEFENCE.items():
    if name == defence and _get(saved, path) is None:
      _set(saved, path, value)

  def fill(saved_part, default_part):
    if not isinstance(saved_part, dict) or not isinstance(default_part, dict):
      return saved_part
    out = dict(saved_part)
    for k, v in default_part.items():
      out[k] = fill(out[k], v) if k in out else v
    return out

  defaults = as_saved_json(get_base_config())
  for path, value in BEFORE_FIELD.items():
    _set(defaults, path, value)
  return fill(saved, defaults)


def migrate_argv(argv: list[str]) -> list[str]:
  """Command-line flags of moved fields rewritten to their new names (a note on stderr)."""
  out = []
  for arg in argv:
    for old, new in MOVED_FIELDS.items():
      prefix = f'--config.{old}'
      if arg == prefix or arg.startswith(prefix + '='):
        print(f'note: config.{old} is now config.{new}; {arg} is read as --config.{new}'
              f'{arg[len(prefix):]}', file=sys.stderr)
        arg = f'--config.{new}{arg[len(prefix):]}'
        break
    out.append(arg)
  return out
