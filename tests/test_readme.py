"""The README's Python API example runs, and its report says what the README says it does."""

import os
import re

from conftest import ROOT
from conftest import run_python


def test_readme_api_example_runs():
  text = open(os.path.join(ROOT, 'README.md')).read()
  code = re.search(r'<!-- api-example -->\s*```python\n(.*?)```', text, re.S).group(1)
  out = run_python(code, timeout=300).splitlines()
  rows = [line.split() for line in out[:3]]
  assert [r[0] for r in rows] == ['fgsm', 'pgd', 'apgd_dlr']
  for _, acc, worst, view, eot in rows:
    assert 0.0 <= float(worst) <= float(acc) <= 1.0
    assert view == 'eot' and eot == '10'  # a randomised defence is attacked with EOT by default
