"""One board of every defence in the lab: `--paper=survey --table=board`.

Usage:
  result = run_board('runs/repro', budget='cpu', data_dirs={...}, docs_path='docs/DEFENCES.md')
  python -m launch.reproduce --paper=survey --table=board --workdir=runs/repro \
      --mnist_dir=../shared/data/mnist --cifar10_dir=../shared/data/cifar10-jpeg

A row per defence — the undefended net, Defend++ and its GN variant, ComDefend, adversarial
training (FGSM, PGD, DDN), HGD's LGD, every input transformation, randomised and training-time
defence of the survey, Defense-GAN — on each dataset, at one eps per dataset (BOARD_EPS: the
tables' 0.2 on MNIST; 0.05 and 8/255 on CIFAR-10), with: its clean accuracy; its accuracy as
its authors evaluated it; under `autoattack` (APGD-CE -> APGD-T -> FAB-T -> Square, the worst case per
image; `autoattack_rand`, APGD-CE and APGD-DLR with EOT 20, for randomised defences) on the
deployed model as it is (the exact view: what a user who runs AutoAttack on it gets); under
its specific adaptive attacks (the strongest of: the exact gradient of the whole pipeline, BPDA /
EOT / the detector-aware loss / latent / the strong white-box set); the gap between the first and the last; the checks that fired; the published adaptive
figure. The survey's defences are evaluated in exactly the modes of `--table=transforms` (the
same configs: one table's evaluations are the other's), plus the autoattack mode.

Every evaluation is one robustness.json under WORKDIR/<dataset>-<budget>/evals/, reused by any
table whose config is the same; the models are the Defend++ / HGD / survey tables' (trained if
missing). `--defences` restricts the rows run (the others are kept from results/); a row whose
evaluations have not run is absent, and the board says which rows are missing.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import ml_collections

from defendpp_jax.reproduce import board_report
from defendpp_jax.reproduce import hgd_cvpr2018 as hgd_spec
from defendpp_jax.reproduce import runner
from defendpp_jax.reproduce import survey
from defendpp_jax.reproduce import survey_report
from defendpp_jax.reproduce.board_report import END, START  # pylint: disable=unused-import  (the markers)
from defendpp_jax.runs import saved as saved_runs

# One eps per dataset: the Defend++ tables' (protocol.LINF_EPS); CIFAR-10 also at 8/255.
BOARD_EPS = {'mnist': (0.2,), 'cifar10': (0.05, 8 / 255)}


def _eps_keys(dataset: str) -> list[str]:
  return [f'{e:.6g}' for e in BOARD_EPS[dataset]]


def _at_board_eps(make: Callable[[str], list[str]]) -> Callable[[str], tuple[str, ...]]:
  """Attack entries (`make(e)`: the entries at eps e, given as text) at the board's eps."""
  return lambda dataset: tuple(a for e in _eps_keys(dataset) for a in make(e))


def published_white_box(attack: str):
  """FGSM and `attack` (bim / pgd) with 100 steps at the board's eps: the white-box evaluation
  of the Defend++ paper (BIM) and of adversarial training (PGD)."""
  return _at_board_eps(lambda e: [f'fgsm(eps={e}, label=fgsm_eps{e})',
                                  f'{attack}(eps={e}, steps=100, label={attack}100_eps{e})'])


# The strong white-box set at the board's eps (the minimal-norm attacks are in the Defend++
# tables' strong evaluations).
STRONG_AT_EPS = _at_board_eps(lambda e: [
    f'pgd(eps={e}, steps=100, restarts=2, label=pgd100x2_eps{e})',
    f'pgd(eps={e}, steps=100, loss=margin, label=pgd100_margin_eps{e})',
    f'apgd(eps={e}, steps=100, loss=ce, label=apgd_ce_eps{e})',
    f'apgd_dlr(eps={e}, steps=100, label=apgd_dlr_eps{e})'])
STRONG_DESC = ('the strong white-box set: PGD-100 x 2 restarts, margin-loss PGD-100, APGD-CE, '
               'APGD-DLR')


def autoattack_mode(randomised: bool) -> survey.Mode:
  name = 'autoattack_rand' if randomised else 'autoattack'
  desc = ('autoattack_rand: APGD-CE -> APGD-DLR, 100 steps, EOT 20, on the deployed model as '
          'it is (exact view)' if randomised else
          'autoattack: APGD-CE -> APGD-T (9 targets) -> FAB-T (9 targets) -> Square (5,000 '
          'queries), 100 steps, on '
          'the deployed model as it is (exact view)')
  return survey.Mode('autoattack', {'eval.view': 'exact'}, desc,
                     _at_board_eps(lambda e: [f'{name}(eps={e}, label={name}_eps{e})']))


@dataclasses.dataclass(frozen=True)
class Entry:
  """A board row: a survey defence (`survey`), a trained model of the Defend++ tables
  (`model`, a runner MODELS key) or an HGD denoiser in front of its target (`hgd`)."""
  name: str
  category: str
  published: survey.Mode | None = None   # None: the survey defence's own modes
  adaptive: tuple[survey.Mode, ...] = ()
  anchor: str = ''
  survey: str = ''
  model: str = ''
  hgd: str = ''
  # autoattack not run, and why (its cost here); '' = run.
  no_autoattack: str = ''

  @property
  def randomised(self) -> bool:
    return bool(self.survey) and survey.BY_NAME[self.survey].randomised


_EXACT = {'eval.view': 'exact'}
WB_FGSM_PGD = survey.Mode('published', _EXACT, 'white-box FGSM and PGD-100 (CE)',
                          published_white_box('pgd'))
WB_FGSM_BIM = survey.Mode('published', _EXACT, 'white-box FGSM and BIM-100, as the Defend++ '
                          'paper attacks it', published_white_box('bim'))
STRONG = survey.Mode('strong', _EXACT, STRONG_DESC, STRONG_AT_EPS)
_MADRY = ('Madry et al. (2018) PGD training: MNIST 88.5% at 0.3 and CIFAR-10 44.0% at 8/255 '
          'under AutoAttack (RobustBench; much larger nets and budgets)')
_NONE = 'no published adaptive evaluation'
MODEL_ENTRIES = (
    Entry('plain (no defence)', 'none (reference)', WB_FGSM_PGD, (STRONG,),
          'standard training: 0.0% under AutoAttack (RobustBench, CIFAR-10 8/255)', model='plain'),
    Entry('Defend++', 'training (bottleneck reinforcement)', WB_FGSM_BIM, (STRONG,), _NONE,
          model='ours'),
    Entry('Defend++ + GN', 'training (bottleneck reinforcement)', WB_FGSM_BIM, (STRONG,), _NONE,
          model='ours_gn'),
    Entry('ComDefend', 'input purification (compression)', survey.Mode(
        'published', {'eval.view': 'oblivious'}, 'oblivious FGSM and BIM-100, as its authors '
        'attack it (crafted on the classifier behind)', published_white_box('bim')),
          (survey.Mode('strong', {'eval.view': 'auto'}, STRONG_DESC + ', through the whole '
                       'pipeline (BPDA for its binarisation)', STRONG_AT_EPS),), _NONE,
          model='comdefend'),
    Entry('adversarial training (FGSM)', 'training (adversarial)', WB_FGSM_PGD, (STRONG,),
          'Wong et al. (2020): FGSM training needs random init to avoid catastrophic '
          'overfitting', model='adv_fgsm'),
    Entry('adversarial training (PGD)', 'training (adversarial)', WB_FGSM_PGD, (STRONG,),
          _MADRY, model='adv_pgd'),
    Entry('adversarial training (DDN)', 'training (adversarial)', WB_FGSM_PGD, (STRONG,),
          'Rony et al. (2019), DDN training: CIFAR-10 66.4% at L2 0.5 under AutoAttack',
          model='adv_ddn'),
    Entry('HGD (LGD)', 'input purification (learned denoiser)', survey.Mode(
        'published', {'eval.view': 'oblivious'}, 'oblivious FGSM and BIM-100 (crafted on the '
        'classifier behind; HGD\'s authors: FGSM / IFGSM on the classifiers)',
        published_white_box('bim')),
          (survey.Mode('strong', _EXACT, STRONG_DESC + ', through the denoiser and the '
                       'classifier', STRONG_AT_EPS),),
          'Athalye & Carlini (2018): 0% (ImageNet, L-inf 4/255, PGD-100 through HGD)', hgd='lgd'),
)
SURVEY_ENTRIES = tuple(
    Entry(d.name, d.category, anchor=d.anchor, survey=d.name,
          no_autoattack=('EOT-20 APGD through Defense-GAN\'s projection (10 x 200 steps an '
                         'image, ~0.3 s here) is ~7 h for 20 images x 200 steps; its adaptive '
                         'and latent attacks stand' if d.name == 'defense_gan' else ''))
    for d in survey.DEFENCES if not d.reference)
ENTRIES = MODEL_ENTRIES + SURVEY_ENTRIES
BY_NAME = {e.name: e for e in ENTRIES}


def entry_modes(e: Entry) -> list[survey.Mode]:
  """The published mode, the adaptive ones, then autoattack. A survey defence: its modes of
  the transforms table, the naive one included (the exact gradient of the whole pipeline is an
  adaptive attack too: on Defense-GAN it is the strongest one measured)."""
  if e.survey:
    ms = survey.modes(survey.BY_NAME[e.survey])
  else:
    ms = [e.published, *e.adaptive]
  return ms + ([] if e.no_autoattack else [autoattack_mode(e.randomised)])


def eval_config(e: Entry, mode: survey.Mode, dataset: str, budget: str, workdir: str,
                data_dir: str, seed: int) -> tuple[ml_collections.ConfigDict, str | None]:
  """(config, the run directory evaluated; None: the evaluation's own) of one mode of a row."""
  if e.survey:
    d = survey.BY_NAME[e.survey]
    config = survey.eval_config(d, mode, dataset, budget, workdir, data_dir, seed)
    if mode.name == 'autoattack':  # (the survey's smoke budget keeps only its PGD entries)
      config.eval.attacks = mode.attacks(dataset)
      if budget == 'smoke':
        config.eval.attacks = _smoke_attacks(config.eval.attacks)
    # (as the transforms table: a defence in front of the plain classifier is evaluated with
    # its evaluation directory as the run directory)
    own = _own_run(e, dataset, budget, workdir)
    return config, own[1] if own else None
  if e.hgd:
    config = hgd_spec.denoiser_config(dataset, e.hgd, budget, workdir, data_dir, seed)
  else:
    config = runner.model_config(dataset, e.model, budget, workdir, data_dir)
    config.train.seed = seed
  run_dir = _run_dirs(e, dataset, budget, workdir)[f'hgd_{e.hgd}' if e.hgd else e.model]
  runner._override(config, survey.SMOKE_EVAL if budget == 'smoke' else survey.SURVEY_EVAL)  # pylint: disable=protected-access
  runner._override(config, mode.overrides)  # pylint: disable=protected-access
  config.eval.attacks = mode.attacks(dataset)
  if budget == 'smoke':
    config.eval.attacks = _smoke_attacks(config.eval.attacks)
  return config, run_dir


def _smoke_attacks(entries) -> tuple[str, ...]:
  """At the smoke budget: 3 steps, 50 Square queries, 2 targets."""
  out = []
  for a in entries:
    a = a.replace('steps=100', 'steps=3').replace(', restarts=2', '')
    if a.startswith('autoattack'):
      a = a.replace('(eps=', '(steps=3, queries=50, targets=2, eps=', 1)
    out.append(a)
  return tuple(out)


def _train(e: Entry, dataset, budget, workdir, data_dir, seed) -> None:
  """Trains (or reuses) what the row deploys: the plain classifier first (every defence in
  front of one, and ComDefend / HGD, use it), then the row's own model."""
  plain = runner.model_config(dataset, 'plain', budget, workdir, data_dir)
  plain.train.seed = seed
  runner._train(plain, runner.model_dir(workdir, dataset, budget, 'plain'))  # pylint: disable=protected-access
  if e.survey:
    d = survey.BY_NAME[e.survey]
    if d.trains:
      runner._train(survey._train_config(d, dataset, budget, workdir, data_dir, seed),  # pylint: disable=protected-access
                    runner.model_dir(workdir, dataset, budget, d.name))
  elif e.hgd:
    from defendpp_jax.reproduce import hgd_runner  # pylint: disable=g-import-not-at-top
    hgd_runner._train_all([e.hgd], dataset, budget, workdir, data_dir, seed)  # pylint: disable=protected-access
  elif e.model != 'plain':
    config = runner.model_config(dataset, e.model, budget, workdir, data_dir)
    config.train.seed = seed
    runner._train(config, runner.model_dir(workdir, dataset, budget, e.model))  # pylint: disable=protected-access


def _own_run(e: Entry, dataset: str, budget: str, workdir: str) -> tuple[str, str] | None:
  """(name, run directory) of the model the row trains itself (None: it deploys the plain
  classifier, or nothing trained)."""
  if e.survey:
    d = survey.BY_NAME[e.survey]
    return (d.name, runner.model_dir(workdir, dataset, budget, d.name)) if d.trains else None
  if e.hgd:
    return f'hgd_{e.hgd}', hgd_spec.run_dir(workdir, dataset, budget, e.hgd)
  if e.model != 'plain':
    return e.model, runner.model_dir(workdir, dataset, budget, e.model)
  return None


def _run_dirs(e: Entry, dataset: str, budget: str, workdir: str) -> dict[str, str]:
  """{name: run directory} of every trained model the row deploys: the plain classifier (the
  one every defence in front of a classifier protects) and the row's own model, if any."""
  dirs = {'plain': runner.model_dir(workdir, dataset, budget, 'plain')}
  own = _own_run(e, dataset, budget, workdir)
  if own:
    dirs[own[0]] = own[1]
  return dirs


def model_fingerprints(e: Entry, dataset: str, budget: str, workdir: str) -> dict[str, Any]:
  """saved_runs.fingerprints of the row's trained models."""
  return saved_runs.fingerprints(_run_dirs(e, dataset, budget, workdir))


def _row(e: Entry, modes: list[dict[str, Any]], dataset: str,
         models: dict[str, Any]) -> dict[str, Any]:
  """The row's columns at the board's eps from its modes' summaries (survey_report.mode_summary);
  `models`: model_fingerprints of the weights measured."""
  by = {m['mode']: m for m in modes}
  pub, aa = by.get('published'), by.get('autoattack')
  adaptive = [m for m in modes if m['mode'] not in ('published', 'autoattack')]
  cols = {}
  for k in _eps_keys(dataset):
    acc = lambda m: m['per_eps'][k]['accuracy'] if m and k in m['per_eps'] else None
    ad = [m for m in adaptive if acc(m) is not None]
    best = min(ad, key=acc) if ad else None
    vals = [v for v in (acc(aa), acc(best)) if v is not None]
    cols[k] = {'published': acc(pub), 'autoattack': acc(aa),
               'adaptive': acc(best), 'adaptive_mode': best['mode'] if best else None,
               'adaptive_attack': best['per_eps'][k]['strongest'] if best else None,
               'robust': min(vals) if vals else None,
               'gap': (acc(pub) - acc(best)) if best and acc(pub) is not None else None}
  first = modes[0]
  return {'defence': e.name, 'category': e.category, 'anchor': e.anchor,
          'randomised': e.randomised, 'source': e.survey or e.model or f'hgd_{e.hgd}',
          'clean_accuracy': first['clean_accuracy'],
          'clean_accuracy_worst': first.get('clean_accuracy_worst'),
          'detector': first.get('detector'), 'columns': cols,
          'no_autoattack': e.no_autoattack,
          'checks_fired': {m['mode']: m['failed_checks'] for m in modes if m['failed_checks']},
          'models': models, 'modes': modes}


def transforms_modes(e: Entry, dataset: str, budget: str, seed: int,
                     results_dir: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
  """(mode summaries, model fingerprints or None) of row `e` as `--table=transforms` saved them
  in results_dir, for a row whose board modes are exactly that table's (no autoattack:
  Defense-GAN). A clear error if the file, the dataset or the row is missing, or if the saved
  seed or modes are not the board's."""
  if not (e.survey and e.no_autoattack):
    raise ValueError(f'--from_transforms: the board row {e.name!r} adds autoattack to the '
                     "transforms table's modes, so it is evaluated here; only rows without "
                     'autoattack are taken from the transforms table ('
                     + ', '.join(x.survey for x in SURVEY_ENTRIES if x.no_autoattack) + ')')
  path = os.path.join(results_dir, f'{survey.results_name("transforms", budget)}.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--from_transforms: no {path} (run --table=transforms first)')
  saved = survey.saved_results(path)
  if saved.get('seed') != seed:
    raise ValueError(f'--from_transforms: {path} was measured with seed {saved.get("seed")}, '
                     f'the board with --seed={seed}')
  rows = saved.get('datasets', {}).get(dataset, {}).get('defences', [])
  row = next((r for r in rows if r['defence'] == e.survey), None)
  if row is None:
    raise ValueError(f'--from_transforms: {path} has no {dataset} row of {e.survey}')
  names = [m['mode'] for m in row['modes']]
  want = [m.name for m in entry_modes(e)]
  if names != want:
    raise ValueError(f'--from_transforms: {path} has the modes {names} of {e.survey} on '
                     f'{dataset}, the board evaluates {want}')
  return [dict(m, measured_in=os.path.basename(path)) for m in row['modes']], row.get('models')


def _evaluate_modes(e: Entry, dataset: str, budget: str, workdir: str, data_dir: str,
                    seed: int) -> list[dict[str, Any]]:
  """Evaluates (or reuses) row `e` in each of its modes: their summaries."""
  modes = []
  for mode in entry_modes(e):
    config, run_dir = eval_config(e, mode, dataset, budget, workdir, data_dir, seed)
    tag = e.survey or e.model or f'hgd_{e.hgd}'
    name = f'survey_{tag}_{mode.name}' if e.survey else f'board_{tag}_{mode.name}'
    out_dir = os.path.join(os.path.abspath(workdir), f'{dataset}-{budget}', 'evals', name)
    print(f'=== board {dataset}: {e.name}, {mode.name} -> {out_dir}', flush=True)
    report, eval_dir = runner._evaluate(config, run_dir or out_dir, out_dir)  # pylint: disable=protected-access
    modes.append(survey_report.mode_summary(mode, report, eval_dir))
  return modes


def run_board(workdir: str, budget: str = 'cpu', data_dirs: dict[str, str] | None = None,
              results_dir: str = 'results', docs_path: str | None = None, seed: int = 0,
              datasets: tuple[str, ...] = survey.DATASETS,
              defences: tuple[str, ...] | None = None,
              from_transforms: bool = False) -> dict[str, Any]:
  """Trains (or reuses) and evaluates the rows, writes results/survey_board[_<budget>].json /
  .md and the board into `docs_path` (if given). `defences`: row names or their sources
  (e.g. `ours`, `jpeg`, `hgd_lgd`). `from_transforms`: the chosen rows (each without
  autoattack: Defense-GAN) are taken from the transforms table's results in `results_dir`
  (the same evaluation configs) instead of being trained and evaluated here."""
  chosen = list(ENTRIES)
  if defences:
    by_source = {e.survey or e.model or f'hgd_{e.hgd}': e for e in ENTRIES}
    unknown = sorted(set(defences) - set(BY_NAME) - set(by_source))
    if unknown:
      raise ValueError(f'--defences: unknown {unknown}; known: {sorted(by_source)}')
    chosen = [e for e in ENTRIES if e.name in defences or (e.survey or e.model or
                                                           f'hgd_{e.hgd}') in defences]
  elif from_transforms:
    chosen = [e for e in SURVEY_ENTRIES if e.no_autoattack]
  t0 = time.time()
  name = survey.results_name('board', budget)
  path = os.path.join(results_dir, f'{name}.json')
  result = {'table': 'board', 'budget': budget, 'seed': seed,
            'eps': {ds: list(BOARD_EPS[ds]) for ds in datasets},
            'eval': survey.SURVEY_EVAL, 'randomised_draws': survey.RANDOMISED_DRAWS,
            'datasets': survey.saved_datasets(path)}
  for dataset in datasets:
    data_dir = (data_dirs or {}).get(dataset, '')
    ds_rows = result['datasets'].setdefault(dataset, {'rows': []})
    ds_rows['cifar10_is_jpeg_copy'] = dataset == 'cifar10' and 'jpeg' in data_dir
    ds_rows['eps'] = list(BOARD_EPS[dataset])
    for e in chosen:
      print(f'=== board {dataset}: {e.name}', flush=True)
      if from_transforms:
        modes, models = transforms_modes(e, dataset, budget, seed, results_dir)
      else:
        _train(e, dataset, budget, workdir, data_dir, seed)
        modes = _evaluate_modes(e, dataset, budget, workdir, data_dir, seed)
        models = model_fingerprints(e, dataset, budget, workdir)
      order = [x.name for x in ENTRIES]
      ds_rows['rows'] = sorted([r for r in ds_rows['rows'] if r['defence'] != e.name]
                               + [_row(e, modes, dataset, models)],
                               key=lambda r: order.index(r['defence']))
      result['elapsed_s'] = time.time() - t0
      result['datasets'] = {**survey.saved_datasets(path), dataset: ds_rows}
      board_report.write(result, name, results_dir, docs_path, order)
  return result
