"""The survey's defences measured as published and adaptively: `--paper=survey`.

Usage:
  result = run_survey('transforms', workdir='runs/repro', budget='cpu', data_dirs={...})
  python -m launch.reproduce --paper=survey --table=transforms --workdir=runs/repro \
      --mnist_dir=../shared/data/mnist --cifar10_dir=../shared/data/cifar10-jpeg

Every defence sits in front of (or, SAP, inside) the same trained plain ResNet-18 of the Defend++
tables at the same budget (WORKDIR/<dataset>-<budget>/plain, trained if missing); RSE trains its
own net (WORKDIR/<dataset>-<budget>/rse). Each defence is evaluated in several modes, each an
attacker's view: `published` (its authors' evaluation: the attacker ignores the defence,
'oblivious', or differentiates the deployed model as it is with one draw, 'exact'), `naive`
(the exact gradient of whatever the forward pass computes, one draw: zero through a codec or a
quantiser) and its adaptive views (BPDA with the stand-ins it declares, EOT over k draws,
BPDA + EOT, the detector-aware loss). Every mode runs the same attacks (PGD-100, APGD-CE,
APGD-DLR) at the tables' eps and a smaller one; a mode's accuracy at an eps is its strongest
attack's (the minimum over attacks). Each evaluation is one robustness.json in
WORKDIR/<dataset>-<budget>/evals/survey_<defence>_<mode>, reused when its config is unchanged,
so that a stopped run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import ml_collections

from defendpp_jax import files
from defendpp_jax import protocol
from defendpp_jax.reproduce import runner
from defendpp_jax.reproduce import survey_report
from defendpp_jax.runs import saved as saved_runs

TABLES = ('transforms', 'board')  # board: defendpp_jax/reproduce/board.py
DATASETS = ('mnist', 'cifar10')
# The smaller eps of each dataset (the tables' are protocol.LINF_EPS: 0.2 MNIST, 0.05 CIFAR-10).
SMALL_EPS = {'mnist': 0.1, 'cifar10': 8 / 255}
# Evaluation at the `cpu` budget: the first 100 test images, EOT over 10 draws, randomised
# defences over 2 independent draws of everything (attack and classification).
SURVEY_EVAL = {'eval.num_examples': 100, 'eval.eot_samples': 10, 'eval.eot_chunk': 10,
               'eval.figures': False, 'model.conv': 'auto'}
RANDOMISED_DRAWS = 2
# Randomised defences' modes as a worst-case cascade (config.eval.worst_case): on CIFAR-10
# EOT-10 x 6 attacks x 100 steps x 100 images x 2 draws is ~1.2 M input gradients (~8 h here).
WORST_CASE_DATASETS = ('cifar10',)
# The `smoke` budget (tests): seconds-long versions of the same evaluations.
SMOKE_EVAL = {'eval.num_examples': 16, 'eval.eot_samples': 2, 'eval.figures': False,
              'defense.feature_squeezing.calibration_examples': 32,
              'defense.quilting.num_patches': 500, 'defense.tv_min.iters': 10,
              'defense.rse.passes': 2}
ANCHOR_GUO = ('obfuscated-gradients Table 1, Guo et al. (2018): 0% (ImageNet, L2 0.005 '
              'normalised; BPDA + EOT)')


@dataclasses.dataclass(frozen=True)
class Mode:
  """One attacker's view of a defence: a name, its config overrides, what it stands for, and
  its attack entries (dataset -> entries; None: the board's PGD-100, APGD-CE, APGD-DLR)."""
  name: str
  overrides: dict[str, Any]
  description: str
  attacks: Any = None


@dataclasses.dataclass(frozen=True)
class SurveyDefence:
  name: str                      # config.defense.name
  category: str                  # the survey's taxonomy
  published: Mode
  adaptive: tuple[Mode, ...]
  anchor: str                    # the published adaptive figure, where one exists
  randomised: bool = False
  trains: bool = False           # trains its own classifier (RSE)
  naive: bool = True             # also the exact view, one draw (if not already published)
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Config overrides of its training run (and of its evaluations, which build the same model).
  train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Trains a pre-processor in front of the board's plain classifier (Defense-GAN's generator).
  in_front: bool = False
  # The plain classifier itself (config.defense.name 'none'), attacked as the training-time
  # defences are: the baseline their rows are read against (not a board row: the board has its
  # own undefended row).
  reference: bool = False


OBLIVIOUS = Mode('published', {'eval.view': 'oblivious'},
                 'oblivious: crafted on the classifier alone, then classified through the defence')
EXACT_ONE_DRAW = Mode('published', {'eval.view': 'exact'},
                      'exact gradient of the deployed model, one draw of its randomness per step')
NAIVE = Mode('naive', {'eval.view': 'exact'},
             'exact gradient of what the forward pass computes, one draw per step')
BPDA = Mode('bpda', {'eval.view': 'bpda'}, 'BPDA (identity backward)')
EOT = Mode('eot', {'eval.view': 'eot'}, 'EOT over 10 draws')
BPDA_EOT = Mode('bpda+eot', {'eval.view': 'bpda+eot'}, 'BPDA (identity) + EOT over 10 draws')

DEFENCES = (
    SurveyDefence('jpeg', 'input transformation', OBLIVIOUS, (
        Mode('bpda_jpeg', {'eval.view': 'bpda', 'defense.jpeg.stand_in': 'differentiable'},
             'BPDA with the differentiable JAX JPEG (straight-through rounding)'),
        Mode('bpda_identity', {'eval.view': 'bpda', 'defense.jpeg.stand_in': 'identity'},
             'BPDA (identity backward)')), ANCHOR_GUO),
    SurveyDefence('bit_depth', 'input transformation (feature squeezing)', OBLIVIOUS, (BPDA,),
                  ANCHOR_GUO + ' (3-bit)'),
    SurveyDefence('median', 'input transformation (feature squeezing)', OBLIVIOUS, (
        Mode('exact', {'eval.view': 'exact'}, 'exact gradient (the median is differentiable)'),),
        'not in obfuscated-gradients Table 1', naive=False),
    SurveyDefence('feature_squeezing', 'detection (feature squeezing)', OBLIVIOUS, (
        Mode('detector_aware', {'eval.view': 'bpda'},
             'detector-aware loss (He et al. 2017: loss - 10 relu(score - 0.8 threshold)), '
             'BPDA through the bit-depth squeezer'),),
        'not in Table 1; He et al. (2017) evade it adaptively', naive=False),
    SurveyDefence('tv_min', 'input transformation', OBLIVIOUS, (BPDA_EOT,), ANCHOR_GUO,
                  randomised=True),
    SurveyDefence('quilting', 'input transformation', OBLIVIOUS, (BPDA_EOT,), ANCHOR_GUO,
                  randomised=True),
    SurveyDefence('resize_pad', 'randomisation (input)', OBLIVIOUS, (EOT,),
                  'obfuscated-gradients Table 1, Xie et al. (2018): 0% (ImageNet, L-inf 0.031; '
                  'EOT)', randomised=True),
    SurveyDefence('sap', 'randomisation (model)', EXACT_ONE_DRAW, (EOT,),
                  'obfuscated-gradients Table 1, Dhillon et al. (2018): 0% (CIFAR-10, L-inf '
                  '0.031; EOT)', randomised=True, naive=False),
    # RSE's prediction is already the average of 10 noisy passes: EOT over 2 draws of it
    # averages the gradient over 20 draws of the noise (EOT-10 would cost 100 passes a step).
    SurveyDefence('rse', 'randomisation (model, trained)', EXACT_ONE_DRAW, (
        Mode('eot', {'eval.view': 'eot', 'eval.eot_samples': 2},
             'EOT over 2 draws of the 10-pass prediction (20 noise draws)'),),
        'not in Table 1', randomised=True, trains=True, naive=False),
)


def published_attacks(dataset: str) -> tuple[str, ...]:
  """How the training-time defences' authors attacked them: FGSM and PGD on the CE loss."""
  out = []
  for eps in (protocol.linf_eps(dataset, 0.0), SMALL_EPS[dataset]):
    e = f'{eps:.6g}'
    out += [f'fgsm(eps={e}, label=fgsm_eps{e})', f'pgd(eps={e}, steps=100, label=pgd100_eps{e})']
  return tuple(out)


def strong_attacks(dataset: str) -> tuple[str, ...]:
  """The strong set: PGD-100 x 2 restarts (CE) and on the logit margin, APGD-CE, APGD-DLR at
  both eps; C&W-L2 and DDN (minimal-norm)."""
  out = []
  for eps in (protocol.linf_eps(dataset, 0.0), SMALL_EPS[dataset]):
    e = f'{eps:.6g}'
    out += [f'pgd(eps={e}, steps=100, restarts=2, label=pgd100x2_eps{e})',
            f'pgd(eps={e}, steps=100, loss=margin, label=pgd100_margin_eps{e})',
            f'apgd(eps={e}, steps=100, loss=ce, label=apgd_ce_eps{e})',
            f'apgd_dlr(eps={e}, steps=100, label=apgd_dlr_eps{e})']
  return tuple(out) + ('cw_l2', 'ddn')


AS_PUBLISHED = Mode('published', {'eval.view': 'exact'},
                    'as its authors attacked it: FGSM and PGD-100 on the CE loss', published_attacks)
STRONG = Mode('strong', {'eval.view': 'exact'},
              'the strong set: PGD-100 x 2 restarts, margin-loss PGD-100, APGD-CE, APGD-DLR, '
              'C&W-L2, DDN', strong_attacks)
_NOT_IN_TABLE1 = 'not in obfuscated-gradients Table 1'
TRAINING_TIME = (
    # T = 100; one epoch of the reference's loss leaves the MNIST teacher at 25.4%: x T (97.97%).
    SurveyDefence('distillation', 'training (distillation)', AS_PUBLISHED, (STRONG,),
                  'Carlini & Wagner (2017): C&W on the logits succeeds on 100% of distilled '
                  'MNIST / CIFAR-10 nets', trains=True, naive=False,
                  train_overrides={'defense.distillation.loss_scale': 100.0}),
    SurveyDefence('parseval', 'training (Lipschitz constraint)', AS_PUBLISHED, (STRONG,),
                  _NOT_IN_TABLE1, trains=True, naive=False),
    # Exact: 0.04 x the plain training step; one projection: 0.4 x (benchmark).
    SurveyDefence('cross_lipschitz', 'training (regulariser)', AS_PUBLISHED, (STRONG,),
                  _NOT_IN_TABLE1, trains=True, naive=False,
                  train_overrides={'defense.cross_lipschitz.projections': 1}),
    # On every example 0.007 x the plain step (~5 h an MNIST epoch): 32 of each batch's 256.
    # Fine-tuned at the reference's learning rate (5e-4, SGD with momentum 0.9); the gradient
    # clipped to norm 1 (not the reference's: without it the regulariser's spikes on
    # misclassified examples, exp(d rho), take the MNIST net to a non-finite loss by step 10).
    # One epoch of fine-tuning on every dataset (MNIST's budget is one epoch anyway): CIFAR-10's
    # four would take 75 min here (one epoch ran at 37-44 img/s, 22 min).
    SurveyDefence('deep_defense', 'training (regulariser)', AS_PUBLISHED, (STRONG,),
                  _NOT_IN_TABLE1, trains=True, naive=False,
                  train_overrides={'defense.deep_defense.examples': 32,
                                   'train.learning_rate': 5e-4, 'train.clip_grad_norm': 1.0,
                                   'train.num_epochs': 1}),
    SurveyDefence('adp', 'ensemble (diversity)', AS_PUBLISHED, (STRONG,),
                  'Tramer et al. (2020) break it with PGD on the averaged ensemble',
                  trains=True, naive=False),
    # The averaged 10-pass prediction: EOT over 2 draws of it (20 weight draws), as RSE.
    SurveyDefence('adv_bnn', 'randomisation (Bayesian, adversarially trained)',
                  dataclasses.replace(AS_PUBLISHED, description=AS_PUBLISHED.description +
                                      ', one weight draw per step'), (
        Mode('strong_eot', {'eval.view': 'eot', 'eval.eot_samples': 2},
             STRONG.description + '; EOT over 2 draws of the 10-pass prediction',
             strong_attacks),), _NOT_IN_TABLE1, randomised=True, trains=True, naive=False,
                  train_overrides={'train.adversarial': 'pgd'}),
)


def gan_attacks(steps: int, latent: bool = False, pgd_only: bool = False):
  """Defense-GAN's entries at both eps: PGD and (unless `pgd_only`) APGD-DLR with `steps`
  steps, or the latent attack (`latent`: 100 Adam steps on z from the projection's z*)."""
  def entries(dataset):
    out = []
    for eps in (protocol.linf_eps(dataset, 0.0), SMALL_EPS[dataset]):
      e = f'{eps:.6g}'
      if latent:
        out.append(f'latent(eps={e}, steps=100, label=latent_eps{e})')
      else:
        out.append(f'pgd(eps={e}, steps={steps}, label=pgd{steps}_eps{e})')
        if not pgd_only:
          out.append(f'apgd_dlr(eps={e}, steps={steps}, label=apgd_dlr{steps}_eps{e})')
    return tuple(out)
  return entries


# Defense-GAN at the cpu budget: a width-16 WGAN-GP trained 10 epochs (batch 64: 1,874
# generator updates), the projection R = 10 x L = 200 (the reference's). One projection costs
# ~0.3 s per image here and a gradient through it ~3 times that, so the modes that
# differentiate or re-run the projection at every attack step (naive: through the unrolled
# steps; BPDA + EOT: 4 projections a step) attack the first 20 test images, one draw, with
# PGD-10; the oblivious and latent modes the board's 100 images, 2 draws.
GAN_TRAIN = {'defense.defense_gan.width': 16, 'train.num_epochs': 10, 'train.batch_size': 64,
             'train.checkpoint_every_steps': 1000, 'train.log_every_steps': 500}
GAN_COSTLY = {'eval.num_examples': 20, 'eval.draws': 1}
# Every mode's sanity checks (PGD-5 at eps 0 and PGD-20 at eps 1 in the strongest view, BPDA +
# EOT, whatever the mode) on the first 20 images, EOT over 4 draws: over all 100 with EOT-10
# they alone would take ~4 h here.
GAN_CHECKS = {'eval.check_examples': 20, 'eval.eot_samples': 4}
DEFENSE_GAN = SurveyDefence(
    'defense_gan', 'input purification (generative)', dataclasses.replace(
        OBLIVIOUS, attacks=gan_attacks(100)), (
        Mode('bpda+eot', {'eval.view': 'bpda+eot', 'eval.eot_samples': 4, **GAN_COSTLY},
             'BPDA (identity) + EOT over 4 draws; PGD-10, 20 images, 1 draw',
             gan_attacks(10, pgd_only=True)),
        Mode('latent', {'eval.view': 'latent'},
             'latent-space attack (Athalye et al. 2018): 100 Adam steps on z from the '
             'projection\'s z*, min ||G(z) - x||^2 - margin(f(G(z))), G(z) brought into the ball',
             gan_attacks(0, latent=True))),
    'obfuscated-gradients (Athalye et al. 2018), Defense-GAN on MNIST: 55% at L2 0.005 '
    '(normalised) for the real projection, 0% for the idealised one (latent attack)',
    randomised=True, trains=True, in_front=True, train_overrides=GAN_TRAIN,
    overrides=GAN_CHECKS)
NAIVE_GAN = Mode('naive', {'eval.view': 'exact', **GAN_COSTLY},
                 NAIVE.description + ': through the unrolled R x L projection steps; PGD-10, '
                 '20 images, 1 draw', gan_attacks(10, pgd_only=True))
# The undefended classifier under the training-time defences' attacks, on the same images.
REFERENCE = SurveyDefence('none', 'none (reference: the classifier the others are compared with)',
                          AS_PUBLISHED, (STRONG,), 'the undefended net, attacked as the '
                          'training-time defences are', naive=False, reference=True)
DEFENCES = DEFENCES + (REFERENCE,) + TRAINING_TIME + (DEFENSE_GAN,)
BY_NAME = {d.name: d for d in DEFENCES}
# Deep Defense fine-tunes the board's trained plain classifier (as its authors fine-tune).
FINE_TUNED = ('deep_defense',)


def attack_entries(dataset: str) -> tuple[str, ...]:
  """PGD-100, APGD-CE and APGD-DLR (100 steps) at the tables' eps and the smaller one."""
  entries = []
  for eps in (protocol.linf_eps(dataset, 0.0), SMALL_EPS[dataset]):
    e = f'{eps:.6g}'
    entries += [f'pgd(eps={e}, steps=100, label=pgd100_eps{e})',
                f'apgd(eps={e}, steps=100, loss=ce, label=apgd_ce_eps{e})',
                f'apgd_dlr(eps={e}, steps=100, label=apgd_dlr_eps{e})']
  return tuple(entries)


def modes(d: SurveyDefence) -> list[Mode]:
  out = [d.published]
  if d.naive and d.published.overrides.get('eval.view') != 'exact':
    out.append(NAIVE_GAN if d.name == 'defense_gan' else NAIVE)
  return out + list(d.adaptive)


def eval_config(d: SurveyDefence, mode: Mode, dataset: str, budget: str, workdir: str,
                data_dir: str, seed: int) -> ml_collections.ConfigDict:
  config = runner.model_config(dataset, 'plain', budget, workdir, data_dir)
  config.train.seed = seed
  config.defense.name = d.name
  if (not d.trains or d.in_front) and not d.reference:
    config.defense.classifier_workdir = runner.model_dir(workdir, dataset, budget, 'plain')
  if d.trains:
    config.model.conv = 'auto'
  runner._override(config, SMOKE_EVAL if budget == 'smoke' else SURVEY_EVAL)  # pylint: disable=protected-access
  config.eval.draws = RANDOMISED_DRAWS if d.randomised else 1
  runner._override(config, {**d.train_overrides, **d.overrides, **mode.overrides})  # pylint: disable=protected-access
  config.eval.attacks = (mode.attacks or attack_entries)(dataset)
  if budget == 'smoke':  # PGD-3 alone at both eps
    config.eval.attacks = tuple(a.replace('steps=100', 'steps=3') for a in config.eval.attacks
                                if a.startswith('pgd'))
  config.eval.worst_case = d.randomised and dataset in WORST_CASE_DATASETS
  return config


def _train_config(d: SurveyDefence, dataset, budget, workdir, data_dir, seed):
  config = runner.model_config(dataset, 'plain', budget, workdir, data_dir)
  config.train.seed = seed
  if d.trains:
    config.defense.name = d.name
    config.model.conv = 'auto'  # a new model: the faster kernels
    runner._override(config, d.train_overrides)  # pylint: disable=protected-access
  if d.in_front:
    config.defense.classifier_workdir = runner.model_dir(workdir, dataset, budget, 'plain')
  if d.name in FINE_TUNED:
    config.train.init_from = runner.model_dir(workdir, dataset, budget, 'plain')
  return config


def run_survey(table: str, workdir: str, budget: str = 'cpu',
               data_dirs: dict[str, str] | None = None, results_dir: str = 'results',
               docs_path: str | None = None, seed: int = 0,
               datasets: tuple[str, ...] = DATASETS,
               defences: tuple[str, ...] | None = None,
               from_transforms: bool = False) -> dict[str, Any]:
  """Trains (or reuses) the classifiers, evaluates every defence in every mode, writes
  results/survey_<table>[_<budget>].json / .md and the board into `docs_path` (if given).
  `from_transforms`: board only (board.run_board)."""
  if table not in TABLES:
    raise ValueError(f'--table={table!r} is not one of the survey tables {TABLES}')
  if table == 'board':
    from defendpp_jax.reproduce import board  # pylint: disable=g-import-not-at-top
    return board.run_board(workdir, budget, data_dirs, results_dir, docs_path, seed, datasets,
                           defences, from_transforms)
  if from_transforms:
    raise ValueError('--from_transforms takes board rows from the transforms table: it needs '
                     '--table=board')
  unknown = sorted(set(defences or ()) - set(BY_NAME))
  if unknown:
    raise ValueError(f'--defences: unknown {unknown}; known: {tuple(BY_NAME)}')
  chosen = [BY_NAME[n] for n in defences] if defences else list(DEFENCES)
  t0 = time.time()
  result = {'table': table, 'budget': budget, 'seed': seed, 'datasets': {},
            'eval': SURVEY_EVAL, 'randomised_draws': RANDOMISED_DRAWS}
  name = results_name(table, budget)
  path = os.path.join(results_dir, f'{name}.json')
  result['datasets'] = saved_datasets(path)  # keep the rows of defences / datasets not run
  for dataset in datasets:
    data_dir = (data_dirs or {}).get(dataset, '')
    plain = _train_config(BY_NAME['jpeg'], dataset, budget, workdir, data_dir, seed)
    print(f'=== survey {dataset}: classifier in '
          f'{runner.model_dir(workdir, dataset, budget, "plain")}', flush=True)
    runner._train(plain, runner.model_dir(workdir, dataset, budget, 'plain'))  # pylint: disable=protected-access
    rows = result['datasets'].setdefault(dataset, {'defences': []})
    rows.update(cifar10_is_jpeg_copy=dataset == 'cifar10' and 'jpeg' in data_dir,
                eps=[protocol.linf_eps(dataset, 0.0), SMALL_EPS[dataset]])
    for d in chosen:
      run_dir = runner.model_dir(workdir, dataset, budget, d.name if d.trains else 'plain')
      if d.trains:
        print(f'=== survey {dataset}: {d.name} trains in {run_dir}', flush=True)
        runner._train(_train_config(d, dataset, budget, workdir, data_dir, seed), run_dir)  # pylint: disable=protected-access
      models = {'plain': runner.model_dir(workdir, dataset, budget, 'plain'),
                **({d.name: run_dir} if d.trains else {})}
      entry = {'defence': d.name, 'category': d.category, 'anchor': d.anchor,
               'randomised': d.randomised, 'models': saved_runs.fingerprints(models),
               'modes': []}
      for mode in modes(d):
        config = eval_config(d, mode, dataset, budget, workdir, data_dir, seed)
        out_dir = os.path.join(os.path.abspath(workdir), f'{dataset}-{budget}', 'evals',
                               f'survey_{d.name}_{mode.name}')
        print(f'=== survey {dataset}: {d.name}, {mode.name} -> {out_dir}', flush=True)
        target_dir = run_dir if d.trains or d.reference else out_dir
        report, eval_dir = runner._evaluate(config, target_dir, out_dir)  # pylint: disable=protected-access
        entry['modes'].append(survey_report.mode_summary(mode, report, eval_dir))
      order = [x.name for x in DEFENCES]
      rows['defences'] = sorted([e for e in rows['defences'] if e['defence'] != d.name]
                                + [entry], key=lambda e: order.index(e['defence']))
      result['elapsed_s'] = time.time() - t0
      # Another run (e.g. of the other dataset) may have written meanwhile: keep its datasets.
      result['datasets'] = {**saved_datasets(path), dataset: rows}
      _write(result, name, results_dir, docs_path)
  return result


def results_name(table: str, budget: str) -> str:
  """The stem of a survey table's results files: survey_<table>, then _<budget> unless cpu."""
  return f'survey_{table}{"" if budget == "cpu" else "_" + budget}'


def saved_results(path: str) -> dict[str, Any]:
  """A saved survey / board results file ({} if none)."""
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def saved_datasets(path: str) -> dict[str, Any]:
  """The `datasets` of a saved survey / board results file ({} if none)."""
  return saved_results(path).get('datasets', {})


def _write(result, name, results_dir, docs_path) -> None:
  result['attacks'] = {ds: list(attack_entries(ds)) for ds in result['datasets']}
  files.write_json(os.path.join(results_dir, f'{name}.json'), result)
  md = survey_report.markdown(result)
  files.write_text(os.path.join(results_dir, f'{name}.md'), md)
  if docs_path:
    survey_report.write_doc(result, docs_path)
  print(md, flush=True)
