"""The survey's defences as runs: evaluated in front of a trained classifier run (the issue's
command), RSE trained through its recipe, and the survey board at the smoke budget (its files,
its resume, its errors).

Run: JAX_COMPILATION_CACHE_DIR=.cache/jax python -m pytest -q tests/test_survey_runs.py
"""

import json
import os

import jax
import numpy as np
import pytest

from conftest import SHARED_DATA
from conftest import quickstart_smoke_config
from conftest import run_python_args
from defendpp_jax import data as data_lib
from defendpp_jax import evaluation
from defendpp_jax import training
from defendpp_jax import validate
from defendpp_jax.defences import registry
from defendpp_jax.reproduce import board
from defendpp_jax.reproduce import survey
from defendpp_jax.training import recipes


def _smoke(decoder='none'):
  config = quickstart_smoke_config()
  config.model.decoder = decoder
  return config


def test_the_issue_command_evaluates_jpeg_in_front_of_a_trained_run(plain_run, tmp_path):
  _, run = plain_run
  out = tmp_path / 'jpeg'
  run_python_args(['-m', 'launch.evaluate', '--config=configs/quickstart.py:smoke',
                   f'--workdir={out}', '--config.defense.name=jpeg',
                   f'--config.defense.classifier_workdir={run}', '--config.eval.view=bpda',
                   '--config.data.test_limit=96', '--config.eval.num_examples=24',
                   "--config.eval.attacks=('fgsm',)", '--config.eval.figures=False'])
  report = json.loads((out / 'robustness.json').read_text())
  assert report['model'] == 'jpeg-q75' and report['step'] is None
  assert report['stand_ins'] == [['jpeg(quality=75)',
                                  'differentiable JPEG (JAX, straight-through rounding)']]
  assert [r['view'] for r in report['rows']] == ['bpda']
  assert report['rows'][0]['seen'] == 24


def test_every_untrained_defence_builds_and_classifies_in_front_of_the_run(plain_run):
  config, run = plain_run
  ds = data_lib.dataset_of(config)
  x, y = ds.test_images[:8], ds.test_labels[:8]
  for name in registry.UNTRAINED:
    c = config.copy_and_resolve_references()
    c.defense.name = name
    c.defense.classifier_workdir = run
    c.defense.quilting.num_patches = 300
    c.defense.tv_min.iters = 5
    c.defense.feature_squeezing.calibration_examples = 64
    validate.validate_config(c)
    defence = registry.build(c, '', ds)
    assert defence.name == registry.run_name(c)
    key = jax.random.key(0) if defence.randomised else None
    logits = np.asarray(jax.jit(defence.logits)(defence.variables, x, key))
    classes = ds.num_classes + (1 if defence.rejects else 0)
    assert logits.shape == (8, classes) and np.all(np.isfinite(logits)), name
  # A detector calibrated on images it is also evaluated on would under-state its false
  # positives: the calibration images must lie beyond the evaluated ones.
  c = config.copy_and_resolve_references()
  c.defense.update(name='feature_squeezing', classifier_workdir=run)
  c.defense.feature_squeezing.calibration_examples = 90
  with pytest.raises(ValueError, match='calibration_examples'):
    registry.build(c, '', ds)


def test_rse_trains_with_its_noise_on_and_deploys_randomised(tmp_path):
  config = _smoke()
  config.defense.name = 'rse'
  config.defense.rse.passes = 2
  # EOT over 2 draws of the 2-pass prediction, PGD-3 alone: the eot view is what is tested
  config.eval.update(eot_samples=2, eot_chunk=2, attacks=('pgd(steps=3)',))
  ds = data_lib.dataset_of(config)
  recipe = recipes.make_recipe(config, ds, 4)
  state = recipe.init(jax.random.key(0))
  x, y = ds.train_images[:8], ds.train_labels[:8]

  def ce(key, std):
    c = config.copy_and_resolve_references()
    c.defense.rse.input_std = c.defense.rse.inner_std = std
    loss = recipes.make_recipe(c, ds, 4).loss
    return float(loss(state.params, state, x, y, key, None, None)[0]['ce'])

  # The noise is drawn from the step's key: two keys differ, no noise does not depend on it.
  assert ce(jax.random.key(1), 0.2) != ce(jax.random.key(2), 0.2)
  assert ce(jax.random.key(1), 0.0) == ce(jax.random.key(2), 0.0)
  assert not recipe.precise_bn  # BN statistics stay those of the noisy batches
  workdir = str(tmp_path / 'rse')
  summary = training.train_and_evaluate(config, workdir)
  assert np.isfinite(summary['clean_accuracy'])
  report = evaluation.evaluate(config, workdir, progress=False)
  assert report['randomised'] and report['model'].endswith('-rse-x2')
  assert {r['view'] for r in report['rows']} == {'eot'}
  bad = _smoke('pyramid')
  bad.defense.name = 'rse'
  with pytest.raises(ValueError, match="decoder='none'"):
    recipes.make_recipe(bad, ds, 4)


def test_survey_board_writes_results_and_resumes(tmp_path):
  data_dirs = {'mnist': os.path.join(SHARED_DATA, 'mnist')}
  kwargs = dict(workdir=str(tmp_path / 'w'), budget='smoke', data_dirs=data_dirs,
                results_dir=str(tmp_path / 'results'), docs_path=str(tmp_path / 'DEFENCES.md'),
                datasets=('mnist',), defences=('bit_depth', 'feature_squeezing'))
  result = survey.run_survey('transforms', **kwargs)
  entries = result['datasets']['mnist']['defences']
  assert [e['defence'] for e in entries] == ['bit_depth', 'feature_squeezing']
  assert [m['mode'] for m in entries[0]['modes']] == ['published', 'naive', 'bpda']
  assert [m['mode'] for m in entries[1]['modes']] == ['published', 'detector_aware']
  for e in entries:
    for m in e['modes']:
      assert sorted(m['per_eps']) == ['0.1', '0.2']
      for pe in m['per_eps'].values():
        assert pe['accuracy'] == min(a['accuracy'] for a in pe['attacks'].values())
        assert len(pe['attacks']) == 1  # the smoke budget runs PGD alone
  assert entries[1]['modes'][0]['detector']['clean_rejected'] >= 0
  saved = json.loads((tmp_path / 'results' / 'survey_transforms_smoke.json').read_text())
  assert saved['datasets']['mnist']['defences'][0]['defence'] == 'bit_depth'
  doc = (tmp_path / 'DEFENCES.md').read_text()
  assert survey_marker_count(doc) == 2 and '| bit_depth |' in doc
  # Each entry names the weights it measured: both defences protect the one plain net.
  plain = json.loads((tmp_path / 'w' / 'mnist-smoke' / 'plain' / 'train_summary.json').read_text())
  for e in entries:
    assert e['models'] == {'plain': {'params_sha256': plain['params_sha256'],
                                     'clean_accuracy_test_set': plain['clean_accuracy']}}
  assert f'- **bit_depth** (weights plain `{plain["params_sha256"][:12]}`' in doc
  # Re-running reuses every evaluation (the same directories, not re-written) and keeps the
  # rows of defences not run this time.
  evals = [m['eval_dir'] for e in entries for m in e['modes']]
  mtimes = [os.path.getmtime(os.path.join(d, 'robustness.json')) for d in evals]
  again = survey.run_survey('transforms', **{**kwargs, 'defences': ('bit_depth',)})
  assert [os.path.getmtime(os.path.join(d, 'robustness.json')) for d in evals] == mtimes
  assert [e['defence'] for e in again['datasets']['mnist']['defences']] == [
      'bit_depth', 'feature_squeezing']
  with pytest.raises(ValueError, match='--defences'):
    survey.run_survey('transforms', **{**kwargs, 'defences': ('nope',)})
  with pytest.raises(ValueError, match='--table'):
    survey.run_survey('nope', **kwargs)
  # The board of every defence: bit_depth's published and adaptive evaluations are the
  # transforms table's (reused, not re-run); autoattack and the undefended net's are new.
  res = survey.run_survey('board', **{**kwargs, 'defences': ('bit_depth', 'plain')})
  rows = res['datasets']['mnist']['rows']
  assert [r['defence'] for r in rows] == ['plain (no defence)', 'bit_depth']
  assert [m['mode'] for m in rows[1]['modes']] == ['published', 'naive', 'bpda', 'autoattack']
  assert [m['eval_dir'] for m in rows[1]['modes'][:3]] == evals[:3]
  assert [os.path.getmtime(os.path.join(d, 'robustness.json')) for d in evals] == mtimes
  for r in rows:
    assert sorted(r['columns']) == ['0.2']  # the board's one MNIST eps
    c = r['columns']['0.2']
    aa = next(m for m in r['modes'] if m['mode'] == 'autoattack')['per_eps']['0.2']
    # the ensemble's row is the per-image worst case: never above any of its components
    assert aa['accuracy'] == aa['attacks']['autoattack_eps0.2']['accuracy'] == c['autoattack']
    assert sorted(aa['attacks']) == ['autoattack_eps0.2', 'autoattack_eps0.2:apgd_ce',
                                     'autoattack_eps0.2:apgd_t', 'autoattack_eps0.2:fab_t',
                                     'autoattack_eps0.2:square']
    assert all(a['accuracy'] >= c['autoattack'] for a in aa['attacks'].values())
    assert c['robust'] == min(c['autoattack'], c['adaptive'])
    adaptive = [m['per_eps']['0.2']['accuracy'] for m in r['modes']
                if m['mode'] not in ('published', 'autoattack')]
    assert c['adaptive'] == min(adaptive)  # the strongest adaptive mode, naive included
    assert c['gap'] == pytest.approx(c['published'] - c['adaptive'])
  assert rows[0]['columns']['0.2']['adaptive_mode'] == 'strong'
  # Each row names the weights it measured: here both protect / are the one plain net.
  for r in rows:
    assert r['models'] == {'plain': {'params_sha256': plain['params_sha256'],
                                     'clean_accuracy_test_set': plain['clean_accuracy']}}
  board_doc = (tmp_path / 'DEFENCES.md').read_text()
  assert survey_marker_count(board_doc) == 2 and '| bit_depth |' in board_doc
  assert board_doc.count(board.START) == 1 and 'Not measured yet on mnist: Defend++' in board_doc
  assert f'weights plain `{plain["params_sha256"][:12]}`' in board_doc
  saved = json.loads((tmp_path / 'results' / 'survey_board_smoke.json').read_text())
  assert saved['datasets']['mnist']['rows'][1]['columns'] == rows[1]['columns']


def survey_marker_count(doc: str) -> int:
  from defendpp_jax.reproduce import survey_report
  return doc.count(survey_report.START) + doc.count(survey_report.END)


def test_training_time_defences_join_the_board_with_their_own_attacks(tmp_path):
  for d in survey.TRAINING_TIME:
    modes = survey.modes(d)
    assert [m.name for m in modes][0] == 'published' and d.trains
    for mode in modes:
      c = survey.eval_config(d, mode, 'mnist', 'cpu', str(tmp_path), '', 0)
      validate.validate_config(c)
      assert c.defense.name == d.name and c.eval.num_examples == 100
      attacks = ' '.join(c.eval.attacks)
      if mode.name == 'published':
        assert 'fgsm(eps=0.2' in attacks and 'apgd' not in attacks
      else:
        assert 'loss=margin' in attacks and 'apgd_dlr' in attacks and 'cw_l2' in attacks
    t = survey._train_config(d, 'mnist', 'cpu', str(tmp_path), '', 0)  # pylint: disable=protected-access
    assert t.defense.name == d.name
    assert bool(t.train.init_from) == (d.name == 'deep_defense')
    if d.name == 'adv_bnn':
      assert t.train.adversarial == 'pgd' and c.eval.view == 'eot'
  data_dirs = {'mnist': os.path.join(SHARED_DATA, 'mnist')}
  result = survey.run_survey('transforms', workdir=str(tmp_path / 'w'), budget='smoke',
                             data_dirs=data_dirs, results_dir=str(tmp_path / 'results'),
                             datasets=('mnist',), defences=('none', 'parseval'))
  reference, entry = result['datasets']['mnist']['defences']
  # The reference row: the plain classifier itself, under the same two modes and attacks.
  assert reference['defence'] == 'none' and reference['modes'][0]['model'].endswith('-none')
  assert [m['mode'] for m in reference['modes']] == ['published', 'strong']
  plain = json.loads((tmp_path / 'w' / 'mnist-smoke' / 'plain' / 'train_summary.json')
                     .read_text())
  assert reference['modes'][0]['model'] == plain['model']
  assert 'none' not in {e.survey for e in board.ENTRIES}  # the board has its own plain row
  assert [m['mode'] for m in entry['modes']] == ['published', 'strong']
  assert entry['modes'][0]['model'].endswith('-parseval-b0.0003')
  own = json.loads((tmp_path / 'w' / 'mnist-smoke' / 'parseval' / 'train_summary.json')
                   .read_text())
  assert entry['models']['parseval']['params_sha256'] == own['params_sha256']
  assert entry['models']['plain']['params_sha256'] == plain['params_sha256'] != own['params_sha256']
  assert set(entry['modes'][1]['per_eps']['0.2']['attacks']) == {'pgd100x2_eps0.2',
                                                                 'pgd100_margin_eps0.2'}


def test_every_board_row_evaluates_the_models_it_trains_and_names(tmp_path):
  """Each row's evaluations run on the directory of the model it trains (its own, or the plain
  classifier's for a defence in front of it) and its fingerprints name exactly those runs."""
  from defendpp_jax.reproduce import hgd_cvpr2018 as hgd_spec
  from defendpp_jax.reproduce import runner
  root = str(tmp_path)
  plain = runner.model_dir(root, 'mnist', 'cpu', 'plain')
  for e in board.ENTRIES:
    dirs = board._run_dirs(e, 'mnist', 'cpu', root)  # pylint: disable=protected-access
    mode = board.entry_modes(e)[0]
    config, run_dir = board.eval_config(e, mode, 'mnist', 'cpu', root, '', 0)
    validate.validate_config(config)
    if e.survey:
      d = survey.BY_NAME[e.survey]
      own = runner.model_dir(root, 'mnist', 'cpu', d.name)
      assert run_dir == (own if d.trains else None), e.name
      assert dirs == ({'plain': plain, d.name: own} if d.trains else {'plain': plain}), e.name
    elif e.hgd:
      assert run_dir == hgd_spec.run_dir(root, 'mnist', 'cpu', e.hgd) == dirs[f'hgd_{e.hgd}']
      assert sorted(dirs) == sorted(['plain', f'hgd_{e.hgd}'])
    else:
      assert run_dir == runner.model_dir(root, 'mnist', 'cpu', e.model) == dirs[e.model]
      assert sorted(dirs) == sorted({'plain', e.model}), e.name
