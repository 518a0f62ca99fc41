"""The evaluation pipeline on a tiny trained model: files, keys, counts, sanity checks, transfer."""

import json
import os

import numpy as np
import pytest

from configs import quickstart
from defendpp_jax import data as data_lib
from defendpp_jax import evaluation
from defendpp_jax import parallel
from defendpp_jax import training
from defendpp_jax.attacks import specs
from defendpp_jax.defences import registry
from defendpp_jax.evaluation import reporting
from defendpp_jax.evaluation import runner


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval')
  out = {}
  for name, decoder in (('defendpp', 'pyramid'), ('plain', 'none')):
    config = quickstart.get_config('smoke')
    config.model.decoder = decoder
    config.data.test_limit = 40  # 40 = one full batch of 32 + a padded one of 8
    config.eval.num_examples = 40
    workdir = str(root / name)
    training.train_and_evaluate(config, workdir)
    out[name] = (config, workdir)
  return out


def test_evaluate_writes_report_and_figures(runs):
  config, workdir = runs['defendpp']
  report = evaluation.evaluate(config, workdir, progress=False)
  with open(os.path.join(workdir, 'robustness.json')) as f:
    saved = json.load(f)
  assert saved['clean_accuracy'] == report['clean_accuracy']
  with open(os.path.join(workdir, 'train_summary.json')) as f:
    assert saved['clean_accuracy'] == json.load(f)['clean_accuracy']
  assert saved['model'] == 'resnet18-w4-pyramid' and saved['config']['data']['name'] == 'digits'
  rows = {r['attack']: r for r in saved['rows']}
  assert set(rows) == {'fgsm', 'bim', 'pgd', 'cw_l2', 'ddn', 'apgd'}
  for r in rows.values():
    for key in ('attack', 'norm', 'eps', 'steps', 'restarts', 'accuracy', 'correct', 'seen',
                'view', 'eot_samples', 'loss'):
      assert key in r
    assert r['view'] == 'exact' and r['eot_samples'] == 1  # a deterministic, differentiable net
    assert 'draws' not in r and 'accuracy_worst' not in r
    assert r['seen'] == 40  # the padded examples are not counted
    assert r['accuracy'] == r['correct'] / r['seen']
    assert r['accuracy'] <= saved['clean_accuracy'] + 1e-9
  assert rows['fgsm']['eps'] == 0.2 and rows['fgsm']['norm'] == 'linf'  # the paper's MNIST eps
  for name in ('cw_l2', 'ddn'):
    r = rows[name]
    assert r['eps'] is None and r['norm'] == 'l2'
    for key in ('median_l2', 'mean_l2', 'accuracy_at'):
      assert key in r
    # Accuracy at growing L2 thresholds can only fall, and never below the unbounded accuracy.
    at = list(r['accuracy_at'].values())
    assert all(a >= b for a, b in zip(at, at[1:])) and at[-1] >= r['accuracy']
  names = [c['name'] for c in saved['sanity_checks']]
  assert any('eps=0' in n for n in names) and any('eps=1.0' in n for n in names)
  eps0 = next(c for c in saved['sanity_checks'] if 'eps=0' in c['name'])
  assert eps0['passed'] and eps0['value'] == saved['clean_accuracy']
  assert saved['sanity_checks_passed'] == all(c['passed'] for c in saved['sanity_checks'])
  for fig in ('accuracy_vs_eps.png', 'reconstructions.png', 'ratio_histogram.png'):
    assert os.path.getsize(os.path.join(workdir, fig)) > 1000
  ratios = np.asarray(saved['reconstruction']['ratio_R'])
  assert ratios.shape == (40,) and np.all(ratios >= 0)
  md = open(os.path.join(workdir, 'robustness.md')).read()
  assert '| FGSM | BIM | PGD | C&W | DDN | APGD | Clean |' in md
  # the finished draws kept for a resume are gone once the report is written
  assert not os.path.exists(os.path.join(workdir, evaluation.RESUME_DIR))


def test_transfer_and_failed_check_is_flagged(runs):
  config, workdir = runs['plain']
  config = config.copy_and_resolve_references()
  config.eval.attacks = ('fgsm',)
  config.eval.figures = False
  config.eval.source_workdir = runs['defendpp'][1]
  report = evaluation.evaluate(config, workdir, progress=False)
  assert report['transfer']['source_model'] == 'resnet18-w4-pyramid'
  assert report['transfer']['rows'][0]['seen'] == 40
  # The report names the weights of both runs it read, as their training summaries give them.
  sha = {os.path.abspath(d): json.load(open(os.path.join(d, 'train_summary.json')))[
      'params_sha256'] for d in (workdir, runs['defendpp'][1])}
  assert report['weights_read'] == sha and len(set(sha.values())) == 2
  assert any('transfer' in c['name'] for c in report['sanity_checks'])
  md = open(os.path.join(workdir, 'robustness.md')).read()
  assert 'transfer from resnet18-w4-pyramid' in md
  # threat_model='transfer': only the rows crafted on the source, the same as the transfer block.
  config.eval.threat_model = 'transfer'
  only = evaluation.evaluate(config, workdir, progress=False)
  assert only['transfer'] is None and only['crafted_on'] == 'resnet18-w4-pyramid'
  assert [(r['attack'], r['correct'], r['seen']) for r in only['rows']] == [
      (r['attack'], r['correct'], r['seen']) for r in report['transfer']['rows']]
  assert 'transfer: crafted on resnet18-w4-pyramid' in reporting.markdown_table(only)
  # The second evaluation classified the images the first one crafted (kept in memory); crafting
  # them afresh gives the same counts.
  assert len(runner._CRAFTED) >= 1
  runner._CRAFTED.clear()
  fresh = evaluation.evaluate(config, workdir, progress=False)
  assert fresh['rows'] == only['rows'] and len(runner._CRAFTED) == 1
  config.eval.source_workdir = ''
  with pytest.raises(ValueError, match='config.eval.source_workdir'):
    evaluation.evaluate(config, workdir, progress=False)
  # A failing check is flagged loudly in the Markdown.
  report['sanity_checks'][0]['passed'] = False
  report['sanity_checks_passed'] = False
  assert 'SANITY CHECK FAILED' in reporting.markdown_table(report)


def test_a_run_is_loaded_only_as_the_classifier_it_trained(runs, tmp_path):
  # Same parameter shapes, different function: refused by name instead of evaluated silently.
  import shutil  # pylint: disable=g-import-not-at-top
  config, workdir = runs['plain']
  ds = data_lib.dataset_of(config)
  assert config.model.padding == 'torch'
  registry.build(config, workdir, ds)
  for path, value in (('model.padding', 'same'), ('data.name', 'mnist')):
    other = config.copy_and_resolve_references()
    section, field = path.split('.')
    other[section][field] = value
    with pytest.raises(ValueError, match=rf'config\.{path}=.*pass --config\.{path}='):
      registry.build(other, workdir, ds)
  # A config naming a decoder the run never trained would fail only after every attack, in the
  # reconstruction analysis: refused up front.
  other = config.copy_and_resolve_references()
  other.model.decoder = 'pyramid'
  with pytest.raises(ValueError, match=r"config\.model\.decoder='none'.*auto-encoders differ"):
    registry.build(other, workdir, ds)
  # A run saved before `model.padding` existed was trained with 'SAME' padding.
  old = str(tmp_path / 'old')
  shutil.copytree(workdir, old)
  path = os.path.join(old, 'train_summary.json')
  with open(path) as f:
    summary = json.load(f)
  del summary['config']['model']['padding']
  with open(path, 'w') as f:
    json.dump(summary, f)
  with pytest.raises(ValueError, match=r"config\.model\.padding='same'"):
    registry.build(config, old, ds)
  other = config.copy_and_resolve_references()
  other.model.padding = 'same'
  registry.build(other, old, ds)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  config = quickstart.get_config('smoke')
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    evaluation.evaluate(config, str(tmp_path))
  config.eval.attacks = ('fgsm', 'deepfool')
  with pytest.raises(ValueError, match='deepfool'):
    specs.attack_specs(config.eval, 'digits')


def test_progress_without_a_terminal_prints_one_line_per_item(capsys):
  assert list(reporting.progress(iter('abc'), 3, 'pgd')) == ['a', 'b', 'c']
  lines = capsys.readouterr().err.splitlines()
  assert [l.split(',')[0].strip() for l in lines] == ['pgd 1/3', 'pgd 2/3', 'pgd 3/3']
  assert list(reporting.progress(iter('ab'), 2, 'pgd', enabled=False)) == ['a', 'b']
  assert capsys.readouterr().err == ''


def test_crafted_images_are_kept_least_recently_used_first_out(monkeypatch):
  monkeypatch.setattr(runner, '_CRAFTED', {})
  monkeypatch.setattr(runner, 'CRAFTED_MAX_BYTES', 2 * 400)
  batch = lambda: np.zeros((100,), np.float32)  # 400 bytes
  runner._crafted_batches('a').append(batch())
  runner._crafted_batches('b').append(batch())
  assert runner._crafted_batches('a') and list(runner._CRAFTED) == ['b', 'a']  # a hit
  runner._crafted_batches('c').append(batch())  # 800 bytes kept: nothing evicted yet
  assert list(runner._CRAFTED) == ['b', 'a', 'c']
  assert runner._crafted_batches('d') == []  # 1,200 > 800: b goes, then 800 is within
  assert list(runner._CRAFTED) == ['a', 'c', 'd']


# ---------------------------------------------------------------------------------------------
# The worst-case cascade (config.eval.worst_case) on a linear model whose answers are known.

def _mean_threshold_model():
  """Class 1 iff the mean pixel exceeds 0.5: under L-inf eps (no clipping for pixels in
  [0.25, 0.75] and eps <= 0.25) an example is robust iff |mean - 0.5| > eps, and FGSM reaches
  that worst case exactly."""
  import jax.numpy as jnp
  from defendpp_jax import defences
  return defences.from_logits_fn(
      lambda x: jnp.stack([0.5 - x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], -1) * 10.0)


def _linear_set(n=37, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(0.25, 0.75, size=(n, 2, 2, 1)).astype(np.float32)
  mean = images.mean((1, 2, 3))
  labels = (mean > 0.5).astype(np.int32)
  labels[:5] = 1 - labels[:5]  # misclassified without attack: broken in every row
  return images, labels, mean


def test_worst_case_cascade_gives_the_analytic_robust_set():
  images, labels, mean = _linear_set()
  report = evaluation.evaluate_defence(
      _mean_threshold_model(), images, labels,
      ('fgsm(eps=0.1, label=f10)', 'pgd(eps=0.02, steps=5, label=p02)', 'fgsm(eps=0.02)'),
      batch_size=16, worst_case=True)
  rows = report['rows']
  assert [r['eps'] for r in rows] == [0.02, 0.02, 0.1]  # increasing eps, order kept within
  assert [r['attack'] for r in rows][:2] == ['p02', 'fgsm']
  clean_ok = np.arange(len(labels)) >= 5
  for r in rows:
    assert r['worst_case'] and r['seen'] == len(labels)
    robust = clean_ok & (np.abs(mean - 0.5) > r['eps'] + 1e-6)
    near = np.abs(np.abs(mean - 0.5) - r['eps']) < 1e-5  # float ties on the boundary
    assert abs(r['correct'] - robust.sum()) <= near.sum()
  assert rows[-1]['correct'] < rows[0]['correct']


def coin_defence(std):
  """The mean-threshold model plus logit noise: predictions change from draw to draw."""
  import jax
  import jax.numpy as jnp
  from defendpp_jax import defences

  def logits_fn(x, key):
    m = x.mean((1, 2, 3)) - 0.5 + std * jax.random.normal(key, x.shape[:1])
    return jnp.stack([-m, m], -1)
  return defences.from_logits_fn(logits_fn, randomised=True)


def _mlp_model(seed=0):
  import jax.numpy as jnp
  from defendpp_jax import defences
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=(4, 16)).astype(np.float32)
  w2 = rng.normal(size=(16, 2)).astype(np.float32)
  return defences.from_logits_fn(lambda x: jnp.tanh(x.reshape(len(x), -1) @ w1 - 1.0) @ w2)


def test_an_attack_at_another_eps_reuses_its_program_and_matches_its_constant_build():
  # The eps (and step size) of an attack are arguments of its jitted program: the second eps
  # is neither traced nor compiled again, and crafts what the attack compiled with its
  # settings as constants crafts.
  import functools
  import jax
  from defendpp_jax import attacks
  from defendpp_jax import defences
  images, labels, _ = _linear_set(n=16, seed=2)
  base = _mlp_model()
  traces = []

  def logits(x):
    traces.append(x.shape)  # Python runs once per trace, never per call of a compiled program
    return base.logits({}, x, None)
  model = defences.from_logits_fn(logits)
  key = jax.random.key(3)
  for name, settings in (('fgsm', {}), ('pgd', {'steps': 5}), ('apgd', {'steps': 8}),
                         ('pgd', {'steps': 5, 'norm': 'l2'})):
    traced = None
    for eps in (0.1, 0.2):
      spec = specs.make_spec(name, eps=eps, **settings)
      x_adv = np.asarray(runner.make_attack_fn(spec, model, 'exact', 1, 1)(
          model.variables, images, labels, key))
      traced = len(traces) if traced is None else traced
      assert len(traces) == traced, (name, eps)
      want = jax.jit(functools.partial(attacks.ATTACKS[spec.attack],
                                       lambda x: base.logits({}, x, None), key=key,
                                       **spec.kwargs))(images, labels)
      np.testing.assert_allclose(x_adv, np.asarray(want), rtol=0, atol=1e-6)
      delta = (x_adv - images).reshape(len(images), -1)
      if settings.get('norm') == 'l2':
        assert np.max(np.linalg.norm(delta, axis=1)) <= eps + 1e-5, (name, eps)
      else:
        assert np.max(np.abs(delta)) <= eps + 1e-6, (name, eps)
      assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_worst_case_equals_the_per_example_and_over_deterministic_attacks():
  import jax
  images, labels, _ = _linear_set(n=40, seed=1)
  model = _mlp_model()
  labels = np.array(model.logits({}, images, None).argmax(-1), np.int32)
  labels[:4] = 1 - labels[:4]
  key = jax.random.key(0)
  entries = [specs.make_spec('fgsm', eps=0.4, label='f40'), specs.make_spec('fgsm', eps=0.15),
             specs.make_spec('bim', eps=0.15, steps=5)]
  run = lambda s: runner.run_attack(s, model, images, labels, 16, key, progress=False)
  ind = {s.key: run(s).ok_per_draw[0] for s in entries}
  clean = runner.clean_predictions(model, images, labels, 16)
  casc = evaluation.worst_case_results(model, images, labels, entries, 16, key,
                                       progress=False)
  assert list(casc) == ['fgsm', 'bim', 'f40']
  expect = clean.copy()
  for name in casc:
    expect &= ind[name]
    got = casc[name].ok_per_draw[0]
    assert casc[name].cascade and np.sum(got != expect) <= 1, name  # <= 1: float ties
    assert casc[name].correct <= min(ind[n].sum() for n in ind if n != 'f40' or name == 'f40')
  assert casc['f40'].correct < casc['bim'].correct <= casc['fgsm'].correct < clean.sum()


def test_worst_case_of_a_randomised_defence_shrinks_per_draw():
  images, labels, _ = _linear_set(n=40, seed=1)
  entries = ('fgsm(eps=0.05)', 'pgd(eps=0.05, steps=3)', 'fgsm(eps=0.1, label=f10)')
  report = evaluation.evaluate_defence(coin_defence(0.5), images, labels, entries,
                                       batch_size=16, view='exact', draws=3, worst_case=True)
  rows = {r['attack']: r for r in report['rows']}
  assert list(rows) == ['fgsm', 'pgd', 'f10']
  assert all(r['draws'] == 3 and r['worst_case'] for r in rows.values())
  for a, b in (('fgsm', 'pgd'), ('pgd', 'f10')):
    assert all(y <= x for x, y in zip(rows[a]['correct_per_draw'], rows[b]['correct_per_draw']))
  assert rows['fgsm']['correct_per_draw'][0] < len(labels) - 5


def test_survivor_batches_are_powers_of_two_within_the_full_batch():
  mesh = parallel.make_mesh()
  got = [runner.survivor_batch(n, 64, mesh) for n in (1, 2, 3, 5, 33, 64, 100)]
  d = mesh.size
  assert got == [max(d, b) if b <= 64 else 64 for b in (1, 2, 4, 8, 64, 64, 128)]


@pytest.fixture
def attacks_run(monkeypatch):
  """The key of every attack run from here on (one per call of the function
  runner.make_attack_fn gives), the sanity checks' included."""
  calls = []
  make = runner.make_attack_fn

  def counting(spec, *args):
    fn = make(spec, *args)
    def run(*a):
      calls.append(spec.key)
      return fn(*a)
    return run
  monkeypatch.setattr(runner, 'make_attack_fn', counting)
  return calls


def test_a_stopped_evaluation_resumes_at_the_draw_it_was_in(tmp_path, attacks_run):
  """Every finished draw of every attack is kept; a re-run loads them instead of attacking
  (the attack never runs when all are kept), attacks only the missing ones, and gives the same
  report; another evaluation's digest reuses nothing."""
  import jax
  images, labels, _ = _linear_set(n=40, seed=1)
  entries = [specs.make_spec('fgsm', eps=0.05), specs.make_spec('pgd', eps=0.05, steps=3),
             specs.make_spec('ddn', steps=5)]
  calls = attacks_run  # the entries' attacks and the sanity checks' two
  kept = runner.Resume(str(tmp_path / 'partial'), 'config-a')
  run = lambda resume, attacks=entries: evaluation.run_entries(
      coin_defence(0.5), images, labels, attacks, batch_size=16, key=jax.random.key(0),
      view='exact', eot_samples=1, eot_chunk=1, draws=3, progress=False, worst_case=True,
      resume=resume)
  full = run(kept)
  n_calls = len(calls)
  # three attacks x three draws, and the two sanity-check attacks' three draws
  assert len(os.listdir(kept.directory)) == 3 * 3 + 2 * 3
  calls.clear()
  assert run(kept)['rows'] == full['rows'] and calls == []  # all loaded: nothing attacked
  # stopped after the first attack's draws (the files a run of it alone keeps): the rest is
  # attacked again, the report unchanged
  first = runner.Resume(str(tmp_path / 'first'), kept.digest)
  run(first, entries[:1])
  first_files = set(os.listdir(first.directory))
  assert len(first_files) == 3 + 2 * 3 and first_files < set(os.listdir(kept.directory))
  for f in set(os.listdir(kept.directory)) - first_files:
    os.remove(os.path.join(kept.directory, f))
  calls.clear()
  again = run(kept)
  assert again['rows'] == full['rows']
  assert 0 < len(calls) < n_calls and 'fgsm' not in calls
  ddn = {r['attack']: r for r in again['rows']}['ddn']
  assert ddn['median_l2'] == {r['attack']: r for r in full['rows']}['ddn']['median_l2']
  calls.clear()
  run(runner.Resume(kept.directory, 'config-b'))  # another config: everything attacked
  assert len(calls) == n_calls
  kept.clear()
  assert not os.path.exists(kept.directory)


def test_a_shared_draw_store_is_kept_and_found_by_another_evaluation(runs, tmp_path, monkeypatch,
                                                                     attacks_run):
  """config.eval.resume_dir / $DEFENDPP_RESUME_DIR: the draws outlive the report and serve an
  evaluation of the same weights and config written elsewhere; another config attacks anew."""
  from defendpp_jax.reproduce import runner as reproduce_runner
  base, workdir = runs['plain']
  config = base.copy_and_resolve_references()
  config.eval.attacks = ('fgsm', 'pgd(steps=3)')
  config.eval.figures = False
  store = tmp_path / 'store'
  config.eval.resume_dir = str(store)
  first = evaluation.evaluate(config, workdir, progress=False, out_dir=str(tmp_path / 'a'))
  kept = set(os.listdir(store))
  assert len(kept) == 4  # two attacks and the two sanity-check attacks, one draw each
  assert not os.path.exists(tmp_path / 'a' / evaluation.RESUME_DIR)
  calls = attacks_run
  calls.clear()
  runner._CRAFTED.clear()  # pylint: disable=protected-access
  # the same evaluation, the store named by the environment instead of the config
  again = config.copy_and_resolve_references()
  again.eval.resume_dir = ''
  monkeypatch.setenv(evaluation.RESUME_ENV, str(store))
  second = evaluation.evaluate(again, workdir, progress=False, out_dir=str(tmp_path / 'b'))
  assert calls == []  # every draw loaded, the checks' too
  assert second['rows'] == first['rows']
  assert second['sanity_checks'] == first['sanity_checks']
  with open(tmp_path / 'a' / 'robustness.json') as f:
    assert reproduce_runner._same_config(json.load(f)['config'], again)  # pylint: disable=protected-access
  other = again.copy_and_resolve_references()
  other.eval.seed = config.eval.seed + 1  # another key: nothing of the store applies
  runner._CRAFTED.clear()  # pylint: disable=protected-access
  evaluation.evaluate(other, workdir, progress=False, out_dir=str(tmp_path / 'c'))
  assert sorted(set(calls)) == ['fgsm', 'pgd', 'pgd_eps0', 'pgd_eps1']
  assert kept < set(os.listdir(store))
