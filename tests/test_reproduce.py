"""The reproduction pipeline on a seconds-long budget: models shared, rows complete, reruns
equal."""

import json
import os

import pytest

from defendpp_jax import reproduce
from defendpp_jax.reproduce import runner as reproduce_runner
from defendpp_jax.runs import config as config_lib

from conftest import SHARED_DATA

MNIST = os.path.join(SHARED_DATA, 'mnist')


@pytest.mark.skipif(not os.path.isdir(MNIST), reason='needs ../shared/data/mnist')
def test_table2_smoke_has_every_row_and_reuses_models(tmp_path):
  results = str(tmp_path / 'results')
  out = reproduce.run_table('2', str(tmp_path / 'repro'), 'smoke', {'mnist': MNIST},
                            results_dir=results, attacks=('fgsm', 'ddn'))
  labels = [r['label'] for r in out['rows']]
  assert labels == ['No defense', 'Adv. FGSM', 'Adv. DDN', 'ComDefend', 'ComDefend-wb', 'ours',
                    'ours + GN']
  for r in out['rows']:
    # Defended rows add C&W / DDN crafted on the undefended classifier (the authors' scripts).
    extra = ({'C&W transfer', 'DDN transfer'} if r['label'] in ('Adv. FGSM', 'Adv. DDN', 'ours',
                                                               'ours + GN') else set())
    assert set(r['ours']) == {'FGSM', 'DDN', 'Clean'} | extra
    if extra:
      t = json.load(open(os.path.join(r['transfer']['eval_dir'], 'robustness.json')))
      assert t['threat_model'] == 'transfer' and t['crafted_on'] == 'resnet18-w4-none'
      assert [x['attack'] for x in t['rows']] == ['cw_l2', 'ddn']
    assert r['median_l2']['ddn'] is None or r['median_l2']['ddn'] >= 0
    assert set(r['paper']) == {'FGSM', 'BIM', 'C&W', 'DDN', 'Clean'}
    assert all(0.0 <= v <= 100.0 for v in r['ours'].values())
  rows = {r['label']: r for r in out['rows']}
  assert rows['ComDefend']['threat_model'] == 'grey_box'
  assert rows['ComDefend-wb']['threat_model'] == 'white_box'
  # The same reformer, evaluated two ways: same clean accuracy.
  assert rows['ComDefend']['ours']['Clean'] == rows['ComDefend-wb']['ours']['Clean']
  saved = json.load(open(os.path.join(results, 'table2_smoke.json')))
  assert saved['rows'][0]['paper']['FGSM'] == 31.94
  assert '| No defense | 31.94 /' in open(os.path.join(results, 'table2_smoke.md')).read()
  for name in ('plain', 'adv_fgsm', 'adv_ddn', 'comdefend', 'ours', 'ours_gn'):
    assert len(saved['models'][name]['params_sha256']) == 64
  # Running again reuses the trained models and their evaluations: identical numbers.
  again = reproduce.run_table('2', str(tmp_path / 'repro'), 'smoke', {'mnist': MNIST},
                              results_dir=results, attacks=('fgsm', 'ddn'))
  assert [r['ours'] for r in again['rows']] == [r['ours'] for r in out['rows']]
  assert again['elapsed_s'] < out['elapsed_s']


def test_unknown_table_and_budget_are_clear_errors():
  with pytest.raises(ValueError, match='--table'):
    reproduce.table_spec('4')
  with pytest.raises(ValueError, match='--budget'):
    reproduce.model_config('mnist', 'ours', 'huge', '/tmp/x', '')


def test_saved_configs_without_later_fields_still_match():
  # A model trained before a config field existed behaved as that field's default: it is
  # reused; a saved config that differs in any value is not.
  config = reproduce.model_config('mnist', 'ours', 'cpu', '/tmp/r', '')
  saved = config_lib.as_saved_json(config)
  assert reproduce_runner._same_config(saved, config)
  del saved['train']['init_from']          # default '' -> still the same run
  assert reproduce_runner._same_config(saved, config)
  config.train.init_from = '/elsewhere'    # not the default -> a different run
  assert not reproduce_runner._same_config(saved, config)
  config.train.init_from = ''
  saved['train']['num_epochs'] = 2
  assert not reproduce_runner._same_config(saved, config)
  # Runs from before `model.padding` used 'SAME': the cpu budget (which pins it) reuses them,
  # a budget with PyTorch's padding does not.
  config = reproduce.model_config('mnist', 'ours', 'cpu', '/tmp/r', '')
  saved = config_lib.as_saved_json(config)
  del saved['model']['padding']
  assert config.model.padding == 'same' and reproduce_runner._same_config(saved, config)
  config = reproduce.model_config('mnist', 'ours', 'paper', '/tmp/r', '')
  saved = config_lib.as_saved_json(config)
  del saved['model']['padding']
  assert config.model.padding == 'torch' and not reproduce_runner._same_config(saved, config)


def test_a_preempted_training_stops_the_table(tmp_path, monkeypatch):
  # SIGTERM during one model's training (the trainer saves and returns 'preempted'): the table
  # run stops there instead of going on to train the next model.
  trained = []

  def fake_train(config, workdir):
    trained.append(workdir)
    return {'step': 3, 'preempted': True}

  monkeypatch.setattr(reproduce_runner.training, 'train_and_evaluate', fake_train)
  with pytest.raises(reproduce.Preempted, match='step 3'):
    reproduce.run_table('2', str(tmp_path), 'smoke', {'mnist': ''})
  assert len(trained) == 1
