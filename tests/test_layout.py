"""The package layout: no import cycle, evaluation never imports the trainer, the library never
imports configs/, modules stay readable."""

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, 'defendpp_jax')


def _modules():
  """{module name: set of defendpp_jax / configs modules it imports}."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if not f.endswith('.py'):
        continue
      path = os.path.join(root, f)
      rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
      name = rel[:-len('.__init__')] if rel.endswith('.__init__') else rel
      deps = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module:
          deps.add(node.module)
          deps.update(f'{node.module}.{a.name}' for a in node.names)
        elif isinstance(node, ast.Import):
          deps.update(a.name for a in node.names)
      out[name] = deps
  return out


def _package_of(dep, modules):
  """The library module a dependency names (the longest known prefix), else None."""
  parts = dep.split('.')
  for i in range(len(parts), 0, -1):
    if '.'.join(parts[:i]) in modules:
      return '.'.join(parts[:i])
  return None


def test_no_import_cycle_and_the_rules_of_the_layout():
  modules = _modules()
  graph = {m: {p for d in deps if (p := _package_of(d, modules)) and p != m}
           for m, deps in modules.items()}
  for m, deps in modules.items():
    assert not any(d == 'configs' or d.startswith('configs.') for d in deps), m
    if m.startswith('defendpp_jax.evaluation'):
      assert not any(p.startswith('defendpp_jax.training') for p in graph[m]), m
  # Cycles among subpackages (a package's __init__ re-exporting its modules is not a cycle).
  top = lambda m: '.'.join(m.split('.')[:2])
  pkg_graph = {}
  for m, deps in graph.items():
    pkg_graph.setdefault(top(m), set()).update(top(d) for d in deps if top(d) != top(m))
  state = {}

  def visit(p, stack):
    state[p] = 'active'
    for q in pkg_graph.get(p, ()):
      assert state.get(q) != 'active', f'import cycle: {" -> ".join(stack + [q])}'
      if q not in state:
        visit(q, stack + [q])
    state[p] = 'done'

  for p in pkg_graph:
    if p not in state:
      visit(p, [p])
  assert 'defendpp_jax.training' in pkg_graph and 'defendpp_jax.evaluation' in pkg_graph


def test_modules_stay_readable():
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        with open(os.path.join(root, f)) as fh:
          n = sum(1 for _ in fh)
        assert n <= 400, f'{os.path.join(root, f)} has {n} lines'


def test_configs_base_documents_every_training_time_defence_field():
  """configs/base.py names every training-time defence and each of its fields (a field added
  without a line there fails), and builds the configs its argument names."""
  import pytest  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  from defendpp_jax.runs import config as presets  # pylint: disable=g-import-not-at-top
  doc = base.__doc__
  defence = presets.get_base_config().defense
  for name in ('distillation', 'parseval', 'cross_lipschitz', 'deep_defense', 'adp', 'adv_bnn',
               'rse'):
    assert f'`{name}`' in doc, name
    for field in defence[name]:
      assert f'.{field}`' in doc, f'config.defense.{name}.{field} is not in configs/base.py'
  assert base.get_config('mnist').to_dict() == presets.dataset_config('mnist').to_dict()
  assert base.get_config('cifar10,smoke').model.width == 4
  assert base.get_config().to_dict() == presets.get_base_config().to_dict()
  with pytest.raises(ValueError, match='configs/base.py'):
    base.get_config('imagenet')
