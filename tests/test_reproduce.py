"""The reproduction pipeline on a seconds-long budget: models shared, rows complete, reruns
equal."""

import json
import os

import pytest

from defendpp_jax import reproduce
from defendpp_jax.reproduce import runner as reproduce_runner
from defendpp_jax.runs import config as config_lib
from defendpp_jax.runs import saved as saved_lib

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
  # where the draws are kept is not what a run computes: ignored, and not removed from `saved`
  saved = config_lib.as_saved_json(config)
  saved['eval']['resume_dir'] = '/a/store'
  assert reproduce_runner._same_config(saved, config) and saved['eval']['resume_dir']
  saved['eval']['seed'] += 1
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


def test_a_saved_evaluation_is_reused_only_for_the_weights_it_measured(tmp_path, monkeypatch):
  # An evaluation is reused while its config and the weights of every run it read are those on
  # disk; a model retrained in the same directory (or a retrained protected classifier) is
  # evaluated again, as is a report from before reports named their weights.
  evaluated = []

  def fake_evaluate(config, workdir, progress=True, out_dir=None):
    evaluated.append(workdir)
    report = {'config': config.to_dict(), 'workdir': os.path.abspath(workdir),
              'weights_read': saved_lib.weights_read(config.to_dict(), workdir),
              'rows': [{'attack': 'fgsm'}]}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'robustness.json'), 'w') as f:
      json.dump(report, f)
    return report

  def finished(d, sha):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, saved_lib.SUMMARY), 'w') as f:
      json.dump({'params_sha256': sha}, f)

  monkeypatch.setattr(reproduce_runner.evaluation, 'evaluate', fake_evaluate)
  run, cls = str(tmp_path / 'run'), str(tmp_path / 'classifier')
  finished(run, 'a' * 64)
  finished(cls, 'c' * 64)
  config = reproduce.model_config('mnist', 'plain', 'cpu', str(tmp_path), '')
  config.eval.attacks = ('fgsm',)
  config.defense.classifier_workdir = cls
  out = str(tmp_path / 'evals' / 'e')
  for _ in range(2):
    report, where = reproduce_runner._evaluate(config, run, out)
  assert len(evaluated) == 1 and where == out
  assert report['weights_read'] == {os.path.abspath(run): 'a' * 64,
                                    os.path.abspath(cls): 'c' * 64}
  finished(run, 'b' * 64)                  # retrained in place
  reproduce_runner._evaluate(config, run, out)
  reproduce_runner._evaluate(config, run, out)
  assert len(evaluated) == 2
  finished(cls, 'd' * 64)                  # the classifier it protects retrained
  reproduce_runner._evaluate(config, run, out)
  assert len(evaluated) == 3
  path = os.path.join(out, 'robustness.json')
  old = json.load(open(path))
  del old['weights_read']
  json.dump(old, open(path, 'w'))
  reproduce_runner._evaluate(config, run, out)
  assert len(evaluated) == 4


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


@pytest.mark.skipif(not os.path.isdir(MNIST), reason='needs ../shared/data/mnist')
def test_figs_7_and_8_reconstruct_fgsm_images_with_consistent_distances(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from defendpp_jax.reproduce import defendpp_figures  # pylint: disable=g-import-not-at-top
  results, figures = str(tmp_path / 'results'), str(tmp_path / 'figures')
  out = reproduce.run_table('fig7', str(tmp_path / 'repro'), 'smoke', {'mnist': MNIST},
                            results_dir=results, figures_dir=figures, datasets=('mnist',))
  r = out['datasets']['mnist']
  assert os.path.isfile(os.path.join(figures, 'fig7_mnist_smoke.png'))
  assert json.load(open(os.path.join(results, 'fig7_smoke.json')))['datasets']['mnist'] == r
  assert 0 <= r['fraction_R_in_0_1'] <= 1 and 0 <= r['adversarial_accuracy'] <= 1
  # Per image: R = D_rc / D_ra, the triangle inequality |D_rc - D_ra| <= ||x_adv - x||, and
  # the L-inf ball bounds the L2 size of the perturbation.
  run_dir = reproduce.model_dir(str(tmp_path / 'repro'), 'mnist', 'smoke', 'ours')
  config = reproduce.model_config('mnist', 'ours', 'smoke', str(tmp_path / 'repro'), MNIST)
  rec = defendpp_figures.analyse(config, run_dir)['rec']
  d = {k: np.asarray(v) for k, v in rec['distances'].items()}
  np.testing.assert_allclose(rec['ratio_R'], d['d_rc'] / d['d_ra'], rtol=1e-5)
  assert np.all(np.abs(d['d_rc'] - d['d_ra']) <= d['d_ac'] + 1e-4)
  assert np.all(d['d_ac'] <= r['eps'] * np.sqrt(28 * 28) + 1e-4) and np.all(d['d_ac'] > 0)
  assert np.all(d['d_clean'] > 0)
  assert len(d['d_rc']) == r['num_examples'] == out['datasets']['mnist']['num_examples']
  # Fig. 8 reuses the trained model and writes its histogram.
  again = reproduce.run_table('fig8', str(tmp_path / 'repro'), 'smoke', {'mnist': MNIST},
                              results_dir=results, figures_dir=figures, datasets=('mnist',))
  assert os.path.isfile(os.path.join(figures, 'fig8_mnist_smoke.png'))
  assert again['datasets']['mnist']['params_sha256'] == r['params_sha256']
  with pytest.raises(ValueError, match='--datasets'):
    reproduce.run_table('fig8', str(tmp_path / 'repro'), 'smoke', {}, datasets=('svhn',))


def test_medium_budget_is_wider_longer_with_the_papers_steps_rescaled():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from defendpp_jax.training import optim  # pylint: disable=g-import-not-at-top
  cpu = reproduce.model_config('mnist', 'ours', 'cpu', '/tmp/x', '')
  mnist = reproduce.model_config('mnist', 'ours', 'medium', '/tmp/x', '')
  cifar = reproduce.model_config('cifar10', 'plain', 'medium', '/tmp/x', '')
  assert (mnist.model.width, mnist.train.num_epochs) == (2 * cpu.model.width,
                                                         20 * cpu.train.num_epochs)
  assert (cifar.model.width, cifar.train.num_epochs) == (16, 30)
  assert mnist.eval.num_examples == 1000 and mnist.model.decoder == 'pyramid'
  # the paper's decays at epochs 100 and 200 of 250 (MNIST) / 300 (CIFAR-10), rescaled
  for config, steps, at in ((mnist, 10, (8, 16)), (cifar, 10, (10, 20))):
    _, schedule = optim.sgd_step_decay(config.train, steps)
    lr = config.train.learning_rate
    for epoch in at:
      assert float(schedule(epoch * steps - 1)) > float(schedule(epoch * steps))
    np.testing.assert_allclose(float(schedule(0)), lr)
    np.testing.assert_allclose(float(schedule(at[1] * steps)), lr * 0.01, rtol=1e-5)


@pytest.mark.skipif(not os.path.isdir(MNIST), reason='needs ../shared/data/mnist')
def test_models_flag_runs_some_rows_and_keeps_the_others(tmp_path):
  results, root = str(tmp_path / 'results'), str(tmp_path / 'repro')
  run = lambda models, **kw: reproduce.run_table('2', root, 'smoke', {'mnist': MNIST},
                                                 results_dir=results, attacks=('fgsm',),
                                                 models=models, **kw)
  first = run(('ours_gn',))
  assert [r['label'] for r in first['rows']] == ['ours + GN']
  both = run(('plain',))
  assert [r['label'] for r in both['rows']] == ['No defense', 'ours + GN']
  assert both['rows'][1] == first['rows'][0] and set(both['models']) >= {'plain', 'ours_gn'}
  saved = json.load(open(os.path.join(results, 'table2_smoke.json')))
  assert [r['label'] for r in saved['rows']] == ['No defense', 'ours + GN']
  with pytest.raises(ValueError, match="--models: \\['hourglass'\\]"):
    run(('hourglass',))
  # another seed in the same workdir would train over these models: refused, nothing lost
  with pytest.raises(ValueError, match='--seed=0; --seed=1'):
    run(('plain',), seed=1)
  assert json.load(open(os.path.join(results, 'table2_smoke.json'))) == saved
