"""HGD (Liao et al., CVPR 2018): its Tables 2, 3, 4, 5, 8 and 9 at a CPU budget: `--paper=hgd`.

Usage:
  result = run_hgd_table('3', workdir='runs/repro', budget='cpu', data_dirs={...},
                         datasets=('mnist', 'cifar10'))
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
                      classifier together; the column is the strongest attack's accuracy
eps1 / eps2 = 4 / 255 and 16 / 255 on CIFAR-10 (the paper's), 0.075 / 0.3 on MNIST (the same
levels of MNIST's 0.3 / 16 unit). Each evaluation is a robustness.json under
WORKDIR/<dataset>-<budget>/evals/hgd_* reused when its config is unchanged: a stopped run
resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from defendpp_jax import data as data_lib
from defendpp_jax import files
from defendpp_jax import protocol
from defendpp_jax.attacks import specs as specs_lib
from defendpp_jax.defences import base
from defendpp_jax.defences import hgd
from defendpp_jax.defences import registry
from defendpp_jax.evaluation.evaluate import run_entries
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


def classifier_config(dataset, model, budget, root, data_dir, seed=0):
  config = runner.model_config(dataset, model, budget, root, data_dir)
  config.train.seed = seed
  return config


def denoiser_config(dataset, name, budget, root, data_dir, seed=0) -> ml_collections.ConfigDict:
  """The training config of DENOISERS[name] at `budget`."""
  d = DENOISERS[name]
  config = classifier_config(dataset, TARGET, budget, root, data_dir, seed)
  runner._override(config, {'cpu': HGD_CPU, 'smoke': HGD_SMOKE, 'paper': HGD_PAPER}[budget])  # pylint: disable=protected-access
  config.defense.name = 'hgd'
  config.defense.classifier_workdir = runner.model_dir(root, dataset, budget, d.target)
  config.defense.hgd.crafted_on = runner.model_dir(root, dataset, budget, TARGET)
  config.defense.hgd.ensemble_workdirs = tuple(runner.model_dir(root, dataset, budget, m)
                                               for m in ENSEMBLE)
  config.defense.hgd.trainset = os.path.join(os.path.abspath(root), f'{dataset}-{budget}',
                                             d.trainset)
  runner._override(config, d.overrides)  # pylint: disable=protected-access
  return config


def _train_all(names, dataset, budget, root, data_dir, seed) -> dict[str, Any]:
  """Trains (or reuses) the classifiers, then the denoisers among `names`."""
  classifiers = [TARGET, *ENSEMBLE, HELD_OUT]
  classifiers += [n for n in names if n not in DENOISERS and n not in classifiers]
  summaries = {}
  for m in classifiers:
    print(f'=== hgd {dataset}: classifier {m}', flush=True)
    summaries[m] = runner._train(  # pylint: disable=protected-access
        classifier_config(dataset, m, budget, root, data_dir, seed),
        runner.model_dir(root, dataset, budget, m))
  for m in [n for n in names if n in DENOISERS]:
    print(f'=== hgd {dataset}: denoiser {m}', flush=True)
    t0 = time.time()
    summaries[m] = runner._train(  # pylint: disable=protected-access
        denoiser_config(dataset, m, budget, root, data_dir, seed),
        runner.model_dir(root, dataset, budget, f'hgd_{m}'))
    summaries[m].setdefault('elapsed_s', time.time() - t0)
  return summaries


def _run_dir(root, dataset, budget, model) -> str:
  return runner.model_dir(root, dataset, budget, f'hgd_{model}' if model in DENOISERS else model)


# ---------------------------------------------------------------------------------------------
# Rows of Tables 2-5 and 8: three evaluations each, through launch.evaluate's configs.


def _eval_config(row: Row, kind: str, dataset, budget, root, data_dir, seed):
  if row.model in DENOISERS:
    config = denoiser_config(dataset, row.model, budget, root, data_dir, seed)
    if row.deploy_on:
      config.defense.classifier_workdir = runner.model_dir(root, dataset, budget, row.deploy_on)
    config.defense.hgd.residual_scale = row.residual_scale
  else:
    config = classifier_config(dataset, row.model, budget, root, data_dir, seed)
    config.model.conv = 'auto'
  ec = config.eval
  ec.figures = False
  ec.classes = row.classes
  ec.num_examples = (ADAPTIVE_IMAGES if kind == 'adaptive' else EVAL_IMAGES)[budget]
  if kind == 'adaptive':
    ec.attacks = adaptive_entries(dataset, ADAPTIVE_STEPS[budget])
    ec.threat_model, ec.view = 'white_box', 'exact'
  else:
    ec.attacks = oblivious_entries(dataset)
    if kind == 'black':
      ec.threat_model = 'transfer'
      ec.source_workdir = runner.model_dir(root, dataset, budget, HELD_OUT)
    else:
      ec.threat_model = 'oblivious' if row.model in DENOISERS else 'white_box'
  return config


def _row_key(row: Row) -> str:
  key = row.model + (f'_on_{row.deploy_on}' if row.deploy_on else '')
  key += f'_x{row.residual_scale:g}' if row.residual_scale != 1 else ''
  return key + ('_classes' + ''.join(map(str, row.classes)) if row.classes else '')


def _columns(white: dict, black: dict, adaptive: dict) -> dict[str, float]:
  """The paper's columns (and ours) in % from the three reports."""
  def acc(report, label):
    return {r['attack']: r['accuracy'] for r in report['rows']}[label]
  out = {'Clean': 100 * white['clean_accuracy']}
  for i in (1, 2):
    out[f'White eps{i}'] = 50 * (acc(white, f'fgsm_eps{i}') + acc(white, f'ifgsm4_eps{i}'))
    out[f'Black eps{i}'] = 50 * (acc(black, f'fgsm_eps{i}') + acc(black, f'ifgsm4_eps{i}'))
    labels = [r['attack'] for r in adaptive['rows'] if r['attack'].endswith(f'_eps{i}')]
    out[f'Adaptive eps{i}'] = 100 * min(acc(adaptive, k) for k in labels)
  return out


def _adaptive_checks(reports: dict[str, dict]) -> list[str]:
  """The reproduction's own sanity check: at each eps, the adaptive attacks (through D and f)
  are at least as strong as every oblivious one (names of the failed checks)."""
  failed = []
  for i in (1, 2):
    white = [r['accuracy'] for r in reports['white']['rows'] if r['attack'].endswith(f'_eps{i}')]
    adaptive = [r['accuracy'] for r in reports['adaptive']['rows']
                if r['attack'].endswith(f'_eps{i}')]
    if white and adaptive and min(adaptive) > min(white):
      failed.append(f'adaptive at eps{i} weaker than an oblivious attack '
                    f'({min(adaptive):.3f} > {min(white):.3f})')
  return failed


def _detail(reports: dict[str, dict]) -> dict[str, Any]:
  """{'<white|black|adaptive>:<attack>': accuracy, counts, view} of every row."""
  return {f'{kind}:{r["attack"]}': {'accuracy': r['accuracy'], 'correct': r['correct'],
                                    'seen': r['seen'], 'view': r.get('view')}
          for kind, rep in reports.items() for r in rep['rows']}


def _evaluate_row(table, row, dataset, budget, root, data_dir, seed) -> dict[str, Any]:
  reports, dirs = {}, {}
  for kind in ('white', 'black', 'adaptive'):
    config = _eval_config(row, kind, dataset, budget, root, data_dir, seed)
    out_dir = os.path.join(os.path.abspath(root), f'{dataset}-{budget}', 'evals',
                           f'hgd_{_row_key(row)}_{kind}')
    print(f'=== hgd table {table} {dataset}: {row.label!r}, {kind} -> {out_dir}', flush=True)
    reports[kind], dirs[kind] = runner._evaluate(  # pylint: disable=protected-access
        config, _run_dir(root, dataset, budget, row.model), out_dir)
  ours = _columns(reports['white'], reports['black'], reports['adaptive'])
  failed = sorted({c['name'] for r in reports.values() for c in r['sanity_checks']
                   if not c['passed']}) + _adaptive_checks(reports)
  return {'label': row.label, 'model': row.model, 'deploy_on': row.deploy_on,
          'classes': list(row.classes), 'residual_scale': row.residual_scale,
          'paper': dict(zip(COLUMNS, row.paper)) if row.paper else None, 'ours': ours,
          'attacks': _detail(reports),
          'num_examples': {k: r['num_examples'] for k, r in reports.items()},
          'failed_checks': failed, 'eval_dirs': dirs}


# ---------------------------------------------------------------------------------------------
# Table 9: ensembles, evaluated in-process (no single run deploys them).


def _pipeline_defence(pipeline, dataset, budget, root, data_dir, ds):
  pres, classifiers = pipeline
  nets = [registry.build(classifier_config(dataset, c, budget, root, data_dir),
                         runner.model_dir(root, dataset, budget, c), ds) for c in classifiers]
  behind = nets[0] if len(nets) == 1 else base.ensemble(nets)
  if not pres:
    return behind
  built = [registry.hgd_preprocessor(denoiser_config(dataset, p, budget, root, data_dir),
                                     _run_dir(root, dataset, budget, p), ds) for p in pres]
  pre = built[0] if len(built) == 1 else hgd.averaged_preprocessors(built, '&'.join(pres))
  return base.preprocess(pre, behind)


def _table9(dataset, budget, root, data_dir, seed) -> list[dict[str, Any]]:
  config = classifier_config(dataset, TARGET, budget, root, data_dir, seed)
  ds = data_lib.dataset_of(config)
  f1 = registry.build(config, runner.model_dir(root, dataset, budget, TARGET), ds)
  held_out = registry.build(classifier_config(dataset, HELD_OUT, budget, root, data_dir),
                            runner.model_dir(root, dataset, budget, HELD_OUT), ds)
  images, labels = ds.test_images, ds.test_labels
  n, n_adv = EVAL_IMAGES[budget] or len(labels), ADAPTIVE_IMAGES[budget] or len(labels)
  thresholds = protocol.l2_thresholds(dataset)
  out = []
  for label, paper, pipelines in ROWS_9:
    path = os.path.join(os.path.abspath(root), f'{dataset}-{budget}', 'evals',
                        'hgd_table9_' + label.replace(' ', '').replace('>', '').replace(
                            '&', '+') + '.json')
    key = {'label': label, 'pipelines': json.loads(json.dumps(pipelines)), 'n': n,
           'n_adaptive': n_adv, 'steps': ADAPTIVE_STEPS[budget], 'seed': seed,
           'models': {m: _fingerprint(root, dataset, budget, m)
                      for p in pipelines for m in p[0] + p[1]}}
    if os.path.isfile(path):
      with open(path) as f:
        saved = json.load(f)
      if saved.get('key') == key:
        out.append(saved['row'])
        continue
    print(f'=== hgd table 9 {dataset}: {label!r}', flush=True)
    members = [_pipeline_defence(p, dataset, budget, root, data_dir, ds) for p in pipelines]
    defence = members[0] if len(members) == 1 else base.ensemble(members, label)
    ec = config.eval
    reports = {}
    for kind, source, n_k, entries in (
        ('white', f1, n, oblivious_entries(dataset)),
        ('black', held_out, n, oblivious_entries(dataset)),
        ('adaptive', None, n_adv, adaptive_entries(dataset, ADAPTIVE_STEPS[budget]))):
      specs = specs_lib.attack_specs(
          ml_collections.ConfigDict({**ec.to_dict(), 'attacks': entries}), dataset)
      rep = run_entries(
          defence, images[:n_k], labels[:n_k], specs, batch_size=ec.batch_size,
          key=jax.random.key(ec.seed), view='exact', eot_samples=1, eot_chunk=1, draws=1,
          source=source, thresholds=thresholds)
      reports[kind] = rep
    row = {'label': label, 'paper': dict(zip(COLUMNS, paper)),
           'ours': _columns(reports['white'], reports['black'], reports['adaptive']),
           'attacks': _detail(reports),
           'num_examples': {k: rep['num_examples'] for k, rep in reports.items()},
           'failed_checks': sorted({c['name'] for rep in reports.values()
                                    for c in rep['sanity_checks'] if not c['passed']}) +
                            _adaptive_checks(reports),
           'white_crafted_on': f1.name, 'black_crafted_on': held_out.name}
    files.write_json(path, {'key': key, 'row': row})
    out.append(row)
  return out


def _fingerprint(root, dataset, budget, model) -> str:
  with open(os.path.join(_run_dir(root, dataset, budget, model), 'train_summary.json')) as f:
    return json.load(f)['params_sha256']


# ---------------------------------------------------------------------------------------------
# Figs. 5 and 7: the error amplification and the predicted-vs-true noise.

FIGURE_IMAGES = {'cpu': 100, 'smoke': 8, 'paper': 30}  # the paper: 30 images
FIGURE_DENOISERS = (('pixel-guided DUNET', 'dunet_pixel'), ('LGD', 'lgd'))


def figures(dataset, budget, root, data_dir, figures_dir, seed=0) -> dict[str, Any]:
  """Fig. 5 (layer-wise perturbation levels: no defence, random noise, the pixel-guided
  denoiser, LGD) and Fig. 7 (predicted vs true noise) on I-FGSM-4 images crafted on the
  training ensemble at eps2 (the paper's "IFGSM4 x IncV3/IncResV2/Res", eps 16), the first
  FIGURE_IMAGES test images; PNGs in `figures_dir`, the numbers returned."""
  from defendpp_jax.evaluation import hgd_analysis  # pylint: disable=g-import-not-at-top
  config = classifier_config(dataset, TARGET, budget, root, data_dir, seed)
  config.model.conv = 'auto'
  ds = data_lib.dataset_of(config)
  n = FIGURE_IMAGES[budget]
  x = ds.test_images[:n]
  target = registry.build(config, runner.model_dir(root, dataset, budget, TARGET), ds)
  members = []
  for m in ENSEMBLE:
    c = classifier_config(dataset, m, budget, root, data_dir, seed)
    c.model.conv = 'auto'
    members.append(registry.build(c, runner.model_dir(root, dataset, budget, m), ds))
  eps = eps_pair(dataset)[1]
  vs = [target.variables] + [m.variables for m in members]
  craft = jax.jit(lambda vs, x, e, k: hgd.craft_batch(
      'ifgsm4_ensemble', lambda z: target.logits(vs[0], z),
      [lambda z, d=d, v=v: d.logits(v, z) for d, v in zip(members, vs[1:])], x, e, k)[0])
  adv = np.asarray(craft(vs, x, np.full(n, eps, np.float32), jax.random.key(seed)))
  sign = np.where(np.random.default_rng(seed).random(x.shape) < 0.5, -1.0, 1.0)
  noisy = np.clip(x + eps * sign, 0.0, 1.0).astype(np.float32)
  from defendpp_jax.defences import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  module = classifier_lib.module_of(config, ds)
  curves = {'no defence': hgd_analysis.amplification(module, target.variables, x, adv),
            'random noise (+-eps)': hgd_analysis.amplification(module, target.variables, x,
                                                                noisy)}
  curves_paper = dict(curves)
  slopes = {}
  for label, name in FIGURE_DENOISERS:
    pre = registry.hgd_preprocessor(denoiser_config(dataset, name, budget, root, data_dir, seed),
                                    _run_dir(root, dataset, budget, name), ds)
    den = lambda z, pre=pre: pre.apply(pre.variables, z, None, False)
    curves[label] = hgd_analysis.amplification(module, target.variables, x, adv, denoise=den)
    curves_paper[label] = hgd_analysis.amplification(module, target.variables, x, adv,
                                                     denoise=den, reference='clean')
    slopes[label] = hgd_analysis.noise_slope(x, adv, np.asarray(jax.jit(den)(adv)))
  tag = f'{dataset}{"_" + budget if budget != "cpu" else ""}'
  name = 'MNIST' if dataset == 'mnist' else 'CIFAR-10 (JPEG copy)'
  paths = {
      'fig5': hgd_analysis.plot_amplification(
          curves, os.path.join(figures_dir, f'hgd_fig5_{tag}.png'),
          title=f'{name}: ||f_l(D(x_adv)) - f_l(D(x))|| / ||f_l(D(x))||, I-FGSM-4 eps {eps:.3g}'),
      'fig5_paper_reference': hgd_analysis.plot_amplification(
          curves_paper, os.path.join(figures_dir, f'hgd_fig5_{tag}_vs_clean.png'),
          title=f'{name}: ||f_l(D(x_adv)) - f_l(x)|| / ||f_l(x)|| (the paper\'s formula)'),
      'fig7': hgd_analysis.plot_noise_slope(
          slopes, os.path.join(figures_dir, f'hgd_fig7_{tag}.png'),
          title=f'{name}: predicted vs true noise, I-FGSM-4 eps {eps:.3g}')}
  strip = lambda d: {k: v for k, v in d.items() if k != 'histogram'}
  return {'dataset': dataset, 'images': n, 'eps': eps, 'amplification': curves,
          'amplification_vs_clean': curves_paper,
          'noise_slope': {k: strip(v) for k, v in slopes.items()}, 'figures': paths}


# ---------------------------------------------------------------------------------------------
# Tables.


def models_of(table: str) -> list[str]:
  if table == '9':
    return sorted({m for _, _, ps in ROWS_9 for p in ps for m in p[0] + p[1]})
  return list(dict.fromkeys([r.model for r in ROWS[table]] +
                            [r.deploy_on for r in ROWS[table] if r.deploy_on]))


def run_hgd_table(table: str, workdir: str, budget: str = 'cpu',
                  data_dirs: dict[str, str] | None = None, results_dir: str = 'results',
                  seed: int = 0, datasets: tuple[str, ...] = DATASETS,
                  docs_path: str | None = None, figures_dir: str = 'docs/figures'
                  ) -> dict[str, Any]:
  """Trains (or reuses) every model of `table` on each dataset, evaluates its rows, writes
  RESULTS_DIR/hgd_table<N>[_<budget>].json / .md and, with `docs_path`, the table's generated
  section of that document (docs/HGD.md); Table 3 also draws Figs. 5 and 7 in `figures_dir`."""
  table = str(table)
  if table not in TABLES:
    raise ValueError(f'--table={table!r} is not one of {TABLES} (--paper=hgd)')
  for d in datasets:
    if d not in DATASETS:
      raise ValueError(f'--datasets: {d!r} is not one of {DATASETS}')
  result = {'table': table, 'budget': budget, 'seed': seed, 'datasets': {}}
  for dataset in datasets:
    data_dir = (data_dirs or {}).get(dataset, '')
    t0 = time.time()
    summaries = _train_all(models_of(table), dataset, budget, workdir, data_dir, seed)
    rows = (_table9(dataset, budget, workdir, data_dir, seed) if table == '9' else
            [_evaluate_row(table, r, dataset, budget, workdir, data_dir, seed)
             for r in ROWS[table]])
    e1, e2 = eps_pair(dataset)
    result['datasets'][dataset] = {
        'data_dir': data_dir,
        'cifar10_is_jpeg_copy': dataset == 'cifar10' and 'jpeg' in data_dir,
        'eps': [e1, e2], 'rows': rows,
        'models': {m: {'step': s['step'], 'clean_accuracy_full_test': s.get('clean_accuracy'),
                       'params_sha256': s['params_sha256'], 'model': s.get('model')}
                   for m, s in summaries.items()},
        'elapsed_s': time.time() - t0}
    if table == '3':  # its models are the figures' (Figs. 5 and 7)
      result['datasets'][dataset]['figures'] = figures(dataset, budget, workdir, data_dir,
                                                       figures_dir, seed)
  result['budget_overrides'] = {'cpu': HGD_CPU, 'smoke': HGD_SMOKE, 'paper': HGD_PAPER}[budget]
  name = f'hgd_table{table}{"_" + budget if budget != "cpu" else ""}'
  path = os.path.join(results_dir, f'{name}.json')
  if os.path.isfile(path):  # keep the other datasets' results of an earlier run
    with open(path) as f:
      old = json.load(f)
    for d, v in old.get('datasets', {}).items():
      result['datasets'].setdefault(d, v)
  files.write_json(path, result)
  md = markdown(result)
  files.write_text(os.path.join(results_dir, f'{name}.md'), md)
  if docs_path:
    files.write_generated(docs_path, f'<!-- hgd-table{table}:start (generated by python -m '
                          f'launch.reproduce --paper=hgd --table={table}) -->',
                          f'<!-- hgd-table{table}:end -->', md, 'HGD reproduced')
  print(md, flush=True)
  return result


def markdown(result: dict[str, Any]) -> str:
  """Paper (ImageNet) / ours per column, one line per row, per dataset."""
  lines = []
  for dataset, d in result['datasets'].items():
    jpeg = ' (CIFAR-10 = the JPEG re-encoded copy)' if d['cifar10_is_jpeg_copy'] else ''
    e1, e2 = d['eps']
    n = d['rows'][0]['num_examples']
    lines += [f'HGD Table {result["table"]}, {dataset}{jpeg}, budget `{result["budget"]}`; '
              f'accuracy in %, paper (ImageNet, IncV3) / ours; eps1 = {e1:.4g}, eps2 = '
              f'{e2:.4g}; white / black on {n["white"]} test images, adaptive on '
              f'{n["adaptive"]}:', '',
              '| row | ' + ' | '.join(COLUMNS + ADAPTIVE_COLUMNS) + ' | checks |',
              '|---' * (len(COLUMNS) + len(ADAPTIVE_COLUMNS) + 2) + '|']
    for r in d['rows']:
      cells = []
      for c in COLUMNS + ADAPTIVE_COLUMNS:
        p = (r['paper'] or {}).get(c)
        o = r['ours'].get(c)
        cells.append(f'{"-" if p is None else f"{p:.1f}"} / {"-" if o is None else f"{o:.1f}"}')
      checks = 'ok' if not r['failed_checks'] else 'FAILED: ' + '; '.join(r['failed_checks'])
      lines.append(f'| {r["label"]} | ' + ' | '.join(cells) + f' | {checks} |')
    k = ADAPTIVE_STEPS[result['budget']]
    lines += ['', 'White: FGSM and I-FGSM-4 (step eps/4) crafted on the target classifier '
              'alone (oblivious), the mean of the two; Black: the same crafted on the held-out '
              f'ResNet-34; Adaptive: the strongest of PGD-{k}, APGD-CE and APGD-DLR ({k} steps) '
              'through the whole pipeline (the paper has no such column).', '']
    if d.get('figures'):
      f = d['figures']
      lines += [f'Figs. 5 and 7 ({f["images"]} test images, I-FGSM-4 on the ensemble at eps '
                f'{f["eps"]:.3g}): ' + ', '.join(f'`{v}`' for v in f['figures'].values()) +
                '; noise slopes ' + ', '.join(f'{k}: {v["slope"]:.2f}'
                                              for k, v in f['noise_slope'].items()), '']
  return '\n'.join(lines)
