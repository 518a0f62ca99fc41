"""The benchmark's convolution inventory (launch.benchmark --ops) matches the architectures."""

import pytest

from launch import benchmark


def test_model_convs_counts_every_convolution():
  # ResNet-18: a stem conv, 8 basic blocks of 2 convs, 3 strided 1x1 projections.
  convs = benchmark.model_convs('resnet18', 4, (28, 28, 1), 2)
  assert sum(n for _, n in convs) == 1 + 16 + 3
  assert {c['w'][:2] for c, _ in convs} == {(3, 3), (1, 1)}
  # VGG16: 13 convolutions, all 3x3 stride 1.
  convs = benchmark.model_convs('vgg16', 4, (32, 32, 3), 2)
  assert sum(n for _, n in convs) == 13
  assert all(c['strides'] == (1, 1) and c['w'][:2] == (3, 3) for c, _ in convs)
  # Input shapes follow the network: the stem sees the image itself.
  assert any(c['x'] == (2, 32, 32, 3) for c, _ in convs)


def test_conv_im2col_equals_the_convolution():
  # The im2col form --conv_forms times must compute the same convolution, for every stride and
  # padding the classifiers use (3x3 SAME stride 1 / 2, 1x1 stride-2 projection, asymmetric).
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  for kernel, strides, padding in (((3, 3), (1, 1), ((1, 1), (1, 1))),
                                   ((3, 3), (2, 2), ((0, 1), (0, 1))),
                                   ((1, 1), (2, 2), ((0, 0), (0, 0))),
                                   ((3, 3), (2, 2), ((1, 1), (1, 1)))):
    x = rng.normal(size=(2, 9, 8, 3)).astype(np.float32)
    w = rng.normal(size=(*kernel, 3, 5)).astype(np.float32)
    want = jax.lax.conv_general_dilated(x, w, strides, padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    got = benchmark.conv_im2col(x, w, strides, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_defence_benchmark_measures_every_defence():
  # A seconds-long run of `launch.benchmark --defences` on a few of them (all of them compile
  # for minutes): each deployed defence's forward, the TV solver against scikit-image, the kNN
  # against the matmul ceiling, EOT-k PGD through the randomised ones, a ratio line for each.
  from launch import benchmark_defences
  names = ('jpeg', 'quilting', 'sap')
  records = benchmark_defences.bench_defences(2, (28, 28, 1), 4, (1, 2), 1, eot_batch=2,
                                              num_patches=300, names=names)
  forward = {r['defence'] for r in records if r['work'] == 'defence_forward'}
  assert forward == {'classifier', *names}
  eot = {(r['defence'], r['eot_samples']) for r in records if r['work'] == 'defence_eot_pgd'}
  assert eot == {(d, k) for d in ('quilting', 'sap') for k in (1, 2)}
  assert all(r['img_per_s'] > 0 for r in records if r['work'] != 'matmul')
  knn = next(r for r in records if r['work'] == 'knn')
  assert knn['queries'] == 4 * 9 * 9 and knn['database'] == 300 and knn['dims'] == 25
  lines = benchmark_defences.ratios(records)
  assert sum('EOT-2' in line for line in lines) == 2
  assert any('scikit-image' in line for line in lines)


def test_hgd_benchmark_times_the_denoiser_step_next_to_the_classifier_step():
  from launch import benchmark_defences
  records = benchmark_defences.bench_hgd(2, (28, 28, 1), 4, 1, losses=('lgd',))
  works = [(r['work'], r.get('loss')) for r in records]
  assert works == [('train_step', None), ('hgd_train_step', 'lgd')]
  assert records[1]['denoiser_widths'] == (2, 4, 8, 8, 8)
  assert all(r['img_per_s'] > 0 for r in records)
  lines = benchmark_defences.ratios(records)
  assert any('HGD denoiser training step (lgd)' in line for line in lines)


def test_training_defences_benchmark_times_each_recipe_next_to_the_plain_step():
  from launch import benchmark_defences
  names = ('parseval', 'cross_lipschitz')
  records = benchmark_defences.bench_training_defences(2, (28, 28, 1), 4, 1, names=names)
  assert [(r['work'], r['defence']) for r in records] == [
      ('train_step', 'none'), ('defence_train_step', 'parseval'),
      ('defence_train_step', 'cross_lipschitz'),
      ('defence_train_step', 'cross_lipschitz (projections=1)')]
  assert all(r['img_per_s'] > 0 for r in records)
  text = benchmark_defences.ratios(records)
  assert any(t.startswith('cross_lipschitz training step') for t in text)


def test_autoattack_benchmark_breakdown_is_the_evaluated_cascade():
  """The timed breakdown runs the very cascade `evaluate_defence(attacks=('autoattack',))`
  runs: the same robust accuracy after each component, every component on what was left."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from defendpp_jax import defences
  from defendpp_jax.evaluation.evaluate import evaluate_defence
  from launch import benchmark_attacks
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(28 * 28, 10)) * 0.05, jnp.float32)
  net = defences.from_logits_fn(lambda x: x.reshape(x.shape[0], -1) @ w, name='linear')
  x = rng.uniform(size=(12, 28, 28, 1)).astype(np.float32)
  y = np.asarray(jnp.argmax(net.logits({}, jnp.asarray(x)), -1), np.int32)
  records = benchmark_attacks.autoattack_breakdown(net, x, y, 4, eps=0.02, steps=5,
                                                   queries=20)
  report = evaluate_defence(
      net, x, y, ('autoattack(steps=5, queries=20)',), eps=0.02, batch_size=4)
  rows = {r['attack']: r['accuracy'] for r in report['rows']}
  parts = [r for r in records if r['work'] == 'autoattack_component']
  assert [p['component'] for p in parts] == ['clean', 'autoattack:apgd_ce', 'autoattack:apgd_t',
                                             'autoattack:fab_t', 'autoattack:square']
  assert parts[0]['robust_accuracy'] == 1.0 and parts[1]['attacked'] == 12
  acc = [p['robust_accuracy'] for p in parts]
  assert acc == sorted(acc, reverse=True)
  assert records[-1]['work'] == 'autoattack' and records[-1]['robust_accuracy'] == acc[-1]
  assert {p['component']: p['robust_accuracy'] for p in parts[1:]} == {
      k: v for k, v in rows.items() if k.startswith('autoattack:')}
  assert acc[-1] == rows['autoattack'] < 1.0
  sq = benchmark_attacks.bench_square(2, (28, 28, 1), 2, 10, 1)
  assert sq['img_per_s_per_1000_queries'] > 0
  assert len(benchmark_attacks.lines(records + [sq])) == len(records) + 1


def test_published_autoattack_records_read_its_log_and_score_its_output(monkeypatch):
  """The published AutoAttack's timing (launch.benchmark --autoattack): the cumulative time
  and robust accuracy after each attack come from its log lines, the final robust accuracy
  from classifying what it returns; the per-image agreement counts the four cases."""
  import sys
  import types
  import numpy as np
  torch = pytest.importorskip('torch')
  from launch import benchmark_attacks

  class FakeAutoAttack:  # the published class's interface and log format
    def __init__(self, model, norm, eps, version, seed, device):
      assert (norm, version, device) == ('Linf', 'standard', 'cpu')

    def run_standard_evaluation(self, x, y, bs):
      print('robust accuracy after APGD-CE: 50.00% (total time 1.5 s)')
      print('robust accuracy after APGD-T: 25.00% (total time 3.0 s)')
      return x

  monkeypatch.setitem(sys.modules, 'autoattack', types.SimpleNamespace(AutoAttack=FakeAutoAttack))
  net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
  with torch.no_grad():
    net[1].weight.copy_(torch.tensor([[1., 0, 0, 0], [0, 1., 0, 0]]))
  x = np.zeros((4, 2, 2, 1), np.float32)
  x[:, 0, 0, 0], x[:, 0, 1, 0] = [1, 1, 0, 0], [0, 0, 1, 1]   # predicted class: 0 0 1 1
  y = np.array([0, 1, 1, 1])
  records = benchmark_attacks.published_autoattack(net, x, y, 2, 0.1)
  parts = [r for r in records if r['work'] == 'published_autoattack_component']
  assert [(p['component'], p['cumulative_s'], p['robust_accuracy']) for p in parts] == [
      ('apgd-ce', 1.5, 0.5), ('apgd-t', 3.0, 0.25)]
  assert records[-1]['robust_accuracy'] == 0.75
  mask = records[-1][benchmark_attacks.ROBUST_MASK]
  assert mask.tolist() == [True, False, True, True]
  assert benchmark_attacks.agreement(np.array([True, True, False, False]), mask) == {
      'both_robust': 1, 'both_broken': 0, 'robust_for_ours_only': 1,
      'robust_for_published_only': 2, 'fraction': 0.25}
