"""Reproduces a paper's table: trains (or reuses) its models, evaluates every row.

  python -m launch.reproduce --table=2 --workdir=runs/repro --budget=cpu \
      --mnist_dir=../shared/data/mnist --cifar10_dir=../shared/data/cifar10-jpeg
  python -m launch.reproduce --paper=survey --table=transforms --workdir=runs/repro \
      --mnist_dir=../shared/data/mnist --cifar10_dir=../shared/data/cifar10-jpeg

--paper=defendpp (default): Tables 1, 2, 3, 5, 6, 7, 8 and `fig6`, `fig7`, `fig8` of Defend++
(Figs. 7 / 8: the auto-encoder's reconstructions of clean and FGSM images / the histogram of
R = D_rc / D_ra, for "ours" on each of --datasets; PNGs in docs/figures/ at the cpu budget). `--budget=cpu`
is the reduced budget documented in defendpp_jax/reproduce/defendpp_mm2020.py (CPU_BUDGET) and
docs/REPRODUCTION.md; `--budget=medium` twice its width and 20x its epochs (MEDIUM_BUDGET: MNIST
width 16 for 20 epochs, CIFAR-10 30, the paper's learning-rate steps rescaled to the run);
`--budget=paper` the paper's (the configs' epochs and widths, the whole test set). `--models`
runs a table's rows of those models only (e.g. `--table=2 --budget=medium
--models=plain,ours,ours_gn`; `--table=1 ... --models=ours,hourglass,hourglass_sc,hourglass_sa`). A second `--seed` needs its
own --workdir and --results_dir (a workdir's models are one seed's; it refuses to retrain them). `--strong` evaluates the same models with PGD-100 x 5 restarts, APGD-CE and APGD-DLR
at the paper's eps, C&W and DDN. Models are shared between tables (same WORKDIR): Table 1 reuses
Table 2's "ours". Results go to RESULTS_DIR/table<N>[_strong].json and .md.

--paper=survey --table=transforms: the survey's input-transformation and randomised defences in
front of the same trained classifier, as published and adaptively (defendpp_jax/reproduce/
survey.py); --datasets / --defences restrict the run (the results file keeps the other rows).
Writes RESULTS_DIR/survey_transforms.json / .md and, at the cpu budget, docs/DEFENCES.md.

--paper=survey --table=board: one row per defence in the lab (defendpp_jax/reproduce/board.py):
the undefended net, Defend++ (+ GN), ComDefend, adversarial training (FGSM / PGD / DDN), HGD's
LGD and every survey defence, at one eps per dataset (MNIST 0.2; CIFAR-10 0.05 and 8/255): clean,
as published, autoattack (or autoattack_rand), the strongest adaptive mode, robust (the worse of
the two), the gap and the checks that fired. --defences takes row sources (plain, ours, ours_gn,
comdefend, adv_fgsm, adv_pgd, adv_ddn, hgd_lgd, jpeg, ...); the survey rows share their
evaluations with --table=transforms, and --from_transforms takes the rows that add nothing to
that table (Defense-GAN: no autoattack) from its results file. Writes RESULTS_DIR/
survey_board.json / .md and the board's section of docs/DEFENCES.md.

--paper=hgd --table=2|3|4|5|8|9: HGD's tables (defendpp_jax/reproduce/hgd_cvpr2018.py): the
target ResNet-18, its training ensemble (VGG16, ResNet-50), the held-out ResNet-34 and the
denoisers, each trained once in WORKDIR/<dataset>-<budget>/ and shared by every table. Writes
RESULTS_DIR/hgd_table<N>.json / .md and, at the cpu budget, the table's section of docs/HGD.md.

--resume_dir=DIR: every evaluation keeps its attacks' finished draws in DIR (kept; see
config.eval.resume_dir), so that an evaluation longer than a machine's life resumes on the
next one, provided it retrains bit-identical weights (the same command on the same CPU kind).

--model_store=DIR: every model the command trains or reuses is kept in
DIR/<dataset>-<budget>/<model>/seed<k>/ (its parameters, batch statistics and
train_summary.json; defendpp_jax/runs/store.py), and a model not in WORKDIR is taken from there
instead of being trained when its saved config is the one asked for: the weights, and with
--resume_dir the evaluations kept under them, outlive the machine that trained them.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from defendpp_jax import evaluation
from defendpp_jax import reproduce
from defendpp_jax.reproduce import hgd_cvpr2018
from defendpp_jax.reproduce import hgd_runner
from defendpp_jax.reproduce import survey
from defendpp_jax.runs import store

PAPERS = ('defendpp', 'survey', 'hgd')
_PAPER = flags.DEFINE_enum('paper', 'defendpp', list(PAPERS), 'Which paper.')
_TABLE = flags.DEFINE_string('table', None, 'Which table: Defend++ '
                             f'{"/".join(reproduce.TABLES)}; survey {"/".join(survey.TABLES)}; hgd '
                             f'{"/".join(hgd_cvpr2018.TABLES)}.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory of the models and evaluations.')
_BUDGET = flags.DEFINE_enum('budget', 'cpu', list(reproduce.BUDGETS), 'Training budget.')
_STRONG = flags.DEFINE_bool('strong', False, 'Strong evaluation (PGD restarts, APGD).')
_RESULTS = flags.DEFINE_string('results_dir', 'results', 'Where table<N>.json / .md go.')
_MNIST = flags.DEFINE_string('mnist_dir', '', 'MNIST raw files ("" = tfds).')
_CIFAR = flags.DEFINE_string('cifar10_dir', '', 'CIFAR-10 python batches ("" = tfds).')
_SEED = flags.DEFINE_integer('seed', 0, 'Training seed of every model.')
_DATASETS = flags.DEFINE_list('datasets', list(survey.DATASETS),
                              'Survey / HGD / Defend++ Figs. 7-8: datasets to run.')
_MODELS = flags.DEFINE_list('models', [], 'Defend++ tables: run only the rows of these models '
                            '(plain, ours, ours_gn, hourglass, ...; [] = all); the results file '
                            'keeps its other rows.')
_DEFENCES = flags.DEFINE_list('defences', [], 'Survey: defences (board: row sources) to run ([] = all).')
_FROM_TRANSFORMS = flags.DEFINE_bool(
    'from_transforms', False, 'Survey board: take the --defences rows whose board modes are '
    'exactly the transforms table\'s (no autoattack: defense_gan) from RESULTS_DIR/'
    'survey_transforms.json (the same evaluation configs) instead of evaluating them again.')
_DOCS = flags.DEFINE_string('docs', '', 'Survey / HGD: the document written ("" = '
                            'docs/DEFENCES.md / docs/HGD.md at the cpu budget, none otherwise).')
_RESUME_DIR = flags.DEFINE_string(
    'resume_dir', '', 'Where every evaluation keeps its attacks\' finished draws and finds them '
    'again (config.eval.resume_dir, here through $DEFENDPP_RESUME_DIR): a store kept after the '
    'reports are written, whose files name the weights, config, attack, images and key they '
    'hold, so that a long evaluation stopped on one machine resumes on another that retrains '
    'the same weights ("" = each evaluation\'s own partial/, removed with its report).')
_MODEL_STORE = flags.DEFINE_string(
    'model_store', '', 'Where every trained model is kept, and taken from instead of being '
    'trained when its config matches ($DEFENDPP_MODEL_STORE; "" = none).')
flags.mark_flags_as_required(['table', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  data_dirs = {'mnist': _MNIST.value, 'cifar10': _CIFAR.value}
  if _RESUME_DIR.value:
    os.environ[evaluation.RESUME_ENV] = os.path.abspath(_RESUME_DIR.value)
  if _MODEL_STORE.value:
    os.environ[store.STORE_ENV] = os.path.abspath(_MODEL_STORE.value)
  try:
    if _PAPER.value == 'hgd':
      hgd_runner.run_hgd_table(
          _TABLE.value, _WORKDIR.value, _BUDGET.value, data_dirs, results_dir=_RESULTS.value,
          seed=_SEED.value, datasets=tuple(_DATASETS.value),
          docs_path=_DOCS.value or ('docs/HGD.md' if _BUDGET.value == 'cpu' else None),
          figures_dir='docs/figures' if _BUDGET.value == 'cpu' else _RESULTS.value)
    elif _PAPER.value == 'survey':
      survey.run_survey(_TABLE.value, _WORKDIR.value, _BUDGET.value, data_dirs,
                        results_dir=_RESULTS.value,
                        docs_path=_DOCS.value or ('docs/DEFENCES.md' if _BUDGET.value == 'cpu'
                                                  else None),
                        seed=_SEED.value, datasets=tuple(_DATASETS.value),
                        defences=tuple(_DEFENCES.value) or None,
                        from_transforms=_FROM_TRANSFORMS.value)
    else:
      if _TABLE.value not in reproduce.TABLES:
        raise app.UsageError(f'--table={_TABLE.value!r} is not one of {reproduce.TABLES}')
      reproduce.run_table(_TABLE.value, _WORKDIR.value, _BUDGET.value, data_dirs,
                          strong=_STRONG.value, results_dir=_RESULTS.value, seed=_SEED.value,
                          figures_dir='docs/figures' if _BUDGET.value == 'cpu'
                          else _RESULTS.value, datasets=tuple(_DATASETS.value),
                          models=tuple(_MODELS.value) or None)
  except reproduce.Preempted as e:
    print(f'stopped: {e}', flush=True)
    sys.exit(143)  # the conventional status of a process ended by SIGTERM


if __name__ == '__main__':
  app.run(main)
