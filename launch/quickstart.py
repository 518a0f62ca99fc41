"""The quickstart behind `make run`: Defend++ and a plain baseline on the embedded digits.

  python -m launch.quickstart --workdir=runs/quickstart

Trains configs/quickstart.py twice (decoder=pyramid and decoder=none; resumes if already
trained), attacks both with FGSM, BIM, PGD, C&W, DDN and APGD, and prints the robustness table.
Needs no download: the digits ship with scikit-learn.
"""

import os

from absl import app
from absl import flags
from absl import logging

from configs import quickstart
from defendpp_jax import evaluation
from defendpp_jax import training
from defendpp_jax.evaluation import reporting

_WORKDIR = flags.DEFINE_string('workdir', 'runs/quickstart', 'Output directory.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Seconds-long version (tests).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  tables = []
  for name, decoder in (('defendpp', 'pyramid'), ('plain', 'none')):
    config = quickstart.get_config('smoke' if _SMOKE.value else None)
    config.model.decoder = decoder
    workdir = os.path.join(_WORKDIR.value, name)
    print(f'=== training {name} (decoder={decoder}) in {workdir}', flush=True)
    summary = training.train_and_evaluate(config, workdir)
    print(f'=== {name}: clean test accuracy {summary["clean_accuracy"]:.4f}', flush=True)
    print(f'=== attacking {name}', flush=True)
    report = evaluation.evaluate(config, workdir)
    tables.append(reporting.markdown_table(report, title=f'{name}: {report["model"]}'))
  print('\n'.join(['', '=' * 80, 'Quickstart robustness (digits)', ''] + tables), flush=True)


if __name__ == '__main__':
  app.run(main)
