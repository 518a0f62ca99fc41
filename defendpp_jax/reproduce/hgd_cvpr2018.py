"""HGD (Liao et al., CVPR 2018): its Tables 2, 3, 4, 5, 8 and 9 at a CPU budget, as data.

Usage:
  dataset_rows = ROWS['3']; config = denoiser_config('mnist', 'lgd', 'cpu', root, data_dir)
  python -m launch.reproduce --paper=hgd --table=3 --workdir=runs/repro --budget=cpu \
      --mnist_dir=../shared/data/mnist --cifar10_dir=../shared/data/cifar10-jpeg

The paper's roles on our datasets: the target IncV3 -> the plain ResNet-18 of the Defend++
tables (WORKDIR/<dataset>-<budget>/plain); the training ensemble's other members IncResV2 and
ResNet50-v2 -> VGG16 and ResNet-50 (`vgg16_plain`, `resnet50_plain`); the held-out black-box
source IncV4 -> ResNet-34 (`resnet34_plain`, used for nothing else); ensemble adversarial
training (ensV3) -> FGSM adversarial training of the ResNet-18 (`adv_fgsm`, the closest
single-step analogue we train). Every denoiser is trained on one crafted training set per
dataset (WORKDIR/<dataset>-<budget>/hgd_trainset.npz; Table 4's half-class denoiser on its own),
so the denoisers differ only in what the issue varies.

Every row has the paper's five columns, each measured:
  Clean
  White eps1 / eps2   oblivious (the paper's own footnote): FGSM and I-FGSM-4 (step eps / 4)
                      crafted on the target classifier alone, classified through the denoiser;
                      the column is the mean of the two attacks' accuracies (the paper's test
                      set holds both attacks' images in equal numbers)
  Black eps1 / eps2   the same attacks crafted on the held-out ResNet-34
and the column a reader must see first:
  Adaptive eps1 / 2   PGD-100, APGD-CE and APGD-DLR (100 steps) through the denoiser and the
                      classifier together, as a cascade (each attack on the images the ones
                      before it left correct): the column is the per-example worst case
eps1 / eps2 = 4 / 255 and 16 / 255 on CIFAR-10 (the paper's), 0.075 / 0.3 on MNIST (the same
levels of MNIST's 0.3 / 16 unit). Each evaluation is a robustness.json under
WORKDIR/<dataset>-<budget>/evals/hgd_* reused when its config is unchanged: a stopped run
resumes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from defendpp_jax.defences import hgd
from defendpp_jax.reproduce import runner

TABLES = ('2', '3', '4', '5', '8', '9')
DATASETS = ('mnist', 'cifar10')
TARGET, ENSEMBLE, HELD_OUT, ADVERSARIAL = 'plain', ('vgg16_plain', 'resnet50_plain'), \
    'resnet34_plain', 'adv_fgsm'
OTHER_TARGET = 'vgg16_plain'     # Table 5's other target (the paper's ResNet), Table 9's f2
COLUMNS = ('Clean', 'White eps1', 'White eps2', 'Black eps1', 'Black eps2')
ADAPTIVE_COLUMNS = ('Adaptive eps1', 'Adaptive eps2')

# The `cpu` budget of the denoisers (the classifiers: the Defend++ tables' CPU budget).
HGD_CPU = {
    # 1/8 of the paper's 64-128-256-256-256 channels (the classifiers are width 8 = 1/8 too).
    'defense.hgd.widths': (8, 16, 32, 32, 32),
    # 5,000 clean training images (the paper: 30,000 of ImageNet's 1.28 M) x 7 variants =
    # 35,000 training pairs, crafted once per dataset.
    'defense.hgd.train_images': 5000,
    # 3 epochs of the pairs at batch 32 (the official code's batch; 3,282 steps), Adam 1e-3
    # decayed x0.1 at 60% and 90% of the run (the official schedule's shape).
    'train.num_epochs': 3,
    'train.batch_size': 32,
    'train.log_every_steps': 200,
    'train.checkpoint_every_steps': 500,
    # oneDNN's kernels where available (the classifiers' weights are what they were trained as;
    # the kernels change speed and float rounding only).
    'model.conv': 'auto',
}
HGD_SMOKE = {'defense.hgd.widths': (4, 8, 8, 8, 8), 'defense.hgd.train_images': 64,
             'train.num_epochs': 1, 'train.batch_size': 32, 'model.conv': 'auto'}
HGD_PAPER = {'defense.hgd.train_images': 0, 'train.num_epochs': 25, 'train.batch_size': 60}
BUDGET_OVERRIDES = {'cpu': HGD_CPU, 'smoke': HGD_SMOKE, 'paper': HGD_PAPER}
# Evaluation: the first 1,000 test images for clean / white / black, the first 500 for the
# adaptive attacks (each 100 steps through D and f).
EVAL_IMAGES, ADAPTIVE_IMAGES = {'cpu': 1000, 'smoke': 24, 'paper': 0}, \
    {'cpu': 500, 'smoke': 16, 'paper': 0}
ADAPTIVE_STEPS = {'cpu': 100, 'smoke': 3, 'paper': 100}


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A trained denoiser: its overrides, the classifier guiding it, and its training set."""
  overrides: dict[str, Any]
  target: str = TARGET
  trainset: str = 'hgd_trainset.npz'


DENOISERS = {
    'dae_pixel': Denoiser({'defense.hgd.arch': 'dae', 'defense.hgd.loss': 'pixel'}),
    'dunet_pixel': Denoiser({'defense.hgd.loss': 'pixel'}),
    'fgd': Denoiser({'defense.hgd.loss': 'fgd'}),
    'lgd': Denoiser({'defense.hgd.loss': 'lgd'}),
    'cgd': Denoiser({'defense.hgd.loss': 'cgd'}),
    # Table 4: trained on classes 0-4 only (its own training set), evaluated on 5-9.
    'lgd_half': Denoiser({'defense.hgd.loss': 'lgd', 'defense.hgd.train_classes': (0, 1, 2, 3, 4)},
                         trainset='hgd_trainset_classes0-4.npz'),
    # Table 5 / 9: guided by VGG16, on the same crafted set (the paper's Resnet-guided LGD and
    # LGD2 are trained on the default dataset too).
    'lgd_vgg16': Denoiser({'defense.hgd.loss': 'lgd'}, target=OTHER_TARGET),
}


@dataclasses.dataclass(frozen=True)
class Row:
  label: str
  model: str                      # a classifier model (runner MODELS) or a DENOISERS key
  paper: tuple[float, ...] | None
  deploy_on: str | None = None    # a denoiser in front of another classifier than its guide
  classes: tuple[int, ...] = ()   # evaluate on these classes only (Table 4)
  residual_scale: float = 1.0     # Table 8's "PGD x2"


P_NA = (76.7, 14.5, 14.4, 61.2, 41.0)
P_PGD = (75.3, 20.0, 13.8, 67.5, 55.7)
P_LGD = (76.2, 75.2, 69.2, 75.1, 72.2)
HALF = (5, 6, 7, 8, 9)
ROWS = {
    '2': [Row('NA', TARGET, P_NA), Row('DAE', 'dae_pixel', (58.3, 51.4, 36.7, 55.9, 48.8)),
          Row('DUNET', 'dunet_pixel', P_PGD)],
    '3': [Row('NA', TARGET, P_NA), Row('PGD (pixel-guided DUNET)', 'dunet_pixel', P_PGD),
          Row('adversarial training (FGSM; ensV3 in the paper)', ADVERSARIAL,
              (76.9, 69.8, 58.0, 72.4, 62.0)),
          Row('FGD', 'fgd', (76.1, 73.7, 67.4, 74.3, 71.8)), Row('LGD', 'lgd', P_LGD),
          Row('CGD', 'cgd', (74.9, 75.8, 73.2, 74.5, 71.1))],
    '4': [Row('NA (classes 5-9)', TARGET, (76.6, 14.5, 14.4, 61.2, 41.0), classes=HALF),
          Row('LGD trained on classes 0-4 (classes 5-9)', 'lgd_half',
              (76.3, 73.9, 65.7, 74.8, 72.2), classes=HALF),
          Row('LGD trained on all classes (classes 5-9)', 'lgd', None, classes=HALF)],
    '5': [Row('NA (VGG16)', OTHER_TARGET, (78.5, 63.3, 38.4, 67.8, 48.6)),
          Row('ResNet-18-guided LGD -> VGG16', 'lgd', (77.4, 75.8, 71.7, 76.1, 72.7),
              deploy_on=OTHER_TARGET),
          Row('VGG16-guided LGD -> VGG16', 'lgd_vgg16', (78.4, 76.1, 72.9, 76.5, 74.6))],
    '8': [Row('NA', TARGET, P_NA), Row('PGD', 'dunet_pixel', P_PGD),
          Row('PGD x2', 'dunet_pixel', (73.7, 40.7, 50.8, 70.9, 67.4), residual_scale=2.0),
          Row('LGD', 'lgd', P_LGD)],
}
# Table 9 (Appendix C): f1 = the ResNet-18 (IncV3), f2 = VGG16 (ensV3; not adversarially
# trained here), LGD1 guided by f1, LGD2 by f2. Each row: (label, paper, pipelines), a pipeline
# = (denoisers averaged in front (may be empty), classifiers averaged behind); the row's logits
# are the pipelines' mean.
ROWS_9 = [
    ('LGD1 -> f1', P_LGD, [(('lgd',), (TARGET,))]),
    ('LGD2 -> f2', (76.9, 74.4, 71.8, 75.2, 73.8), [(('lgd_vgg16',), (OTHER_TARGET,))]),
    ('f1 & f2', (78.8, 35.6, 30.0, 70.2, 56.6), [((), (TARGET, OTHER_TARGET))]),
    ('LGD1 -> f1 & f2', (77.6, 75.6, 71.3, 75.5, 72.7), [(('lgd',), (TARGET, OTHER_TARGET))]),
    ('(LGD1 -> f1 & f2) & (LGD2 -> f1 & f2)', (78.5, 69.9, 67.8, 77.0, 74.7),
     [(('lgd',), (TARGET, OTHER_TARGET)), (('lgd_vgg16',), (TARGET, OTHER_TARGET))]),
    ('LGD1 & LGD2 -> f1 & f2', (78.2, 70.6, 67.6, 76.5, 74.5),
     [(('lgd', 'lgd_vgg16'), (TARGET, OTHER_TARGET))]),
    ('(LGD1 -> f1) & (LGD2 -> f2)', (78.6, 77.4, 73.4, 77.7, 75.7),
     [(('lgd',), (TARGET,)), (('lgd_vgg16',), (OTHER_TARGET,))]),
]


def eps_pair(dataset: str) -> tuple[float, float]:
  """The paper's eps 4 and 16 (of 255) in the dataset's unit: CIFAR-10 4/255, 16/255; MNIST
  0.075, 0.3."""
  unit = hgd.eps_unit(dataset)
  return 4 * unit, 16 * unit


def oblivious_entries(dataset: str) -> tuple[str, ...]:
  out = []
  for i, e in enumerate(eps_pair(dataset), start=1):
    out += [f'fgsm(eps={e:.6g}, label=fgsm_eps{i})',
            f'bim(eps={e:.6g}, steps=4, step_size_factor=1, label=ifgsm4_eps{i})']
  return tuple(out)


def adaptive_entries(dataset: str, steps: int = 100) -> tuple[str, ...]:
  out = []
  for i, e in enumerate(eps_pair(dataset), start=1):
    out += [f'pgd(eps={e:.6g}, steps={steps}, label=pgd{steps}_eps{i})',
            f'apgd(eps={e:.6g}, steps={steps}, loss=ce, label=apgd_ce_eps{i})',
            f'apgd_dlr(eps={e:.6g}, steps={steps}, label=apgd_dlr_eps{i})']
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# Models.


def check_budget(budget: str) -> None:
  if budget not in BUDGET_OVERRIDES:
    raise ValueError(f'--budget={budget!r}: HGD\'s tables have the budgets '
                     f'{tuple(BUDGET_OVERRIDES)} (medium is a Defend++ budget)')


def classifier_config(dataset, model, budget, root, data_dir, seed=0):
  config = runner.model_config(dataset, model, budget, root, data_dir)
  config.train.seed = seed
  return config


def denoiser_config(dataset, name, budget, root, data_dir, seed=0) -> ml_collections.ConfigDict:
  """The training config of DENOISERS[name] at `budget`."""
  d = DENOISERS[name]
  config = classifier_config(dataset, TARGET, budget, root, data_dir, seed)
  check_budget(budget)
  runner._override(config, BUDGET_OVERRIDES[budget])  # pylint: disable=protected-access
  config.defense.name = 'hgd'
  config.defense.classifier_workdir = runner.model_dir(root, dataset, budget, d.target)
  config.defense.hgd.crafted_on = runner.model_dir(root, dataset, budget, TARGET)
  config.defense.hgd.ensemble_workdirs = tuple(runner.model_dir(root, dataset, budget, m)
                                               for m in ENSEMBLE)
  config.defense.hgd.trainset = os.path.join(os.path.abspath(root), f'{dataset}-{budget}',
                                             d.trainset)
  runner._override(config, d.overrides)  # pylint: disable=protected-access
  return config


def run_dir(root, dataset, budget, model) -> str:
  return runner.model_dir(root, dataset, budget, f'hgd_{model}' if model in DENOISERS else model)


def models_of(table: str) -> list[str]:
  if table == '9':
    return sorted({m for _, _, ps in ROWS_9 for p in ps for m in p[0] + p[1]})
  return list(dict.fromkeys([r.model for r in ROWS[table]] +
                            [r.deploy_on for r in ROWS[table] if r.deploy_on]))


# Figs. 5 and 7: images and denoisers shown.
FIGURE_IMAGES = {'cpu': 100, 'smoke': 8, 'paper': 30}  # the paper: 30 images
FIGURE_DENOISERS = (('pixel-guided DUNET', 'dunet_pixel'), ('LGD', 'lgd'))
