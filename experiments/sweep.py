"""Every ablation of the paper as a run matrix: print the commands, run them here, or run them on a TPU slice.

  python -m experiments.sweep --sweep=fig4_latents                        # print train + align commands
  python -m experiments.sweep --sweep=fig4_k --mode=local --root=runs     # run them one after another, here
  python -m experiments.sweep --sweep=fig4_k --mode=pod --root=gs://BUCKET/runs   # one after another, on the slice
  python -m experiments.sweep --sweep=fig5_layers --set=model=/data/pythia-160m --set=dataset=/data/pile.bin
  python -m experiments.sweep --sweep=fig4_k --one-step --mode=local      # every k as a variant of one run

Each run is a preset plus overrides; `--set FIELD=VALUE` adds overrides to every run (local weights, fewer
tokens for a smoke test), and `--align FLAG` adds an option to every align command (`--align=--firing_tokens=0`
skips Fig. 3's firing counts). Runs that already finished are skipped, and an interrupted run resumes, so rerunning
the same sweep command continues where it stopped.

`--one-step` trains a sweep whose runs differ only in variant fields (k, lr, L1, width, architecture) as one
run, `ROOT/<sweep>/one_step`, with each run a variant beside the others in the same step: the data (and the LM)
is read once. It is aligned variant by variant into `one_step/alignment/<variant>/`, which the figures read.

`--mode=pod` trains each run on the TPU slice of `launch/env` (or `LAUNCH_ENV`) through `launch/babysit.sh`,
which creates the slice if needed, starts the command on every worker, recreates a preempted spot slice, and
returns once the run's `summary.json` exists; each run is then aligned on this machine (which needs the `gcs`
extra for a gs:// root). Leave it running where it survives: `nohup python -m experiments.sweep ... &`.

`python -m experiments.figures --root=...` then collects the alignments into the paper's plots.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from absl import app, flags

from experiments.ablations import SWEEPS, Run, one_step_run, sweep_runs
from experiments.cli import fail, parse_flags
from saejax import storage

LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'launch')

_SWEEP = flags.DEFINE_string('sweep', None, 'Which ablation (see SWEEPS).')
_MODE = flags.DEFINE_enum(
  'mode',
  'print',
  ['print', 'local', 'pod'],
  'print the commands, run them here, or train on the TPU slice of launch/env.',
)
_ROOT = flags.DEFINE_string('root', 'runs', 'Folder (or gs:// prefix) holding one workdir per run.')
_SET = flags.DEFINE_multi_string('set', [], 'FIELD=VALUE override applied to every run.')
_ALIGN = flags.DEFINE_multi_string(
  'align', [], "An option for every run's experiments.align, e.g. --align=--firing_tokens=100000 (repeatable)."
)
_BABYSIT = flags.DEFINE_multi_string(
  'babysit', [], 'pod mode: an option for launch/babysit.sh, e.g. --babysit=--max-restarts=20 (repeatable).'
)
_ONE_STEP = flags.DEFINE_boolean(
  'one-step', False, "Train the sweep's runs as variants of one run in the same step (k, lr, L1, width, arch)."
)
_LAUNCH_DIR = flags.DEFINE_string('launch_dir', LAUNCH_DIR, 'pod mode: the folder holding babysit.sh.')


def _done(run: Run, root: str, sweep: str, aligned: bool) -> bool:
  if aligned:
    return all(storage.exists(path) for path in run.alignment_summaries(root, sweep))
  return storage.exists(storage.join(run.workdir(root, sweep), 'summary.json'))


def pod_train_command(run: Run, root: str, sweep: str, extra: list[str]) -> list[str]:
  """The babysitter's command line for one run; the workers' venv supplies `python`."""
  train = ['python', *run.train_command(root, sweep, extra)[1:]]
  babysit = os.path.join(_LAUNCH_DIR.value, 'babysit.sh')
  return [babysit, '--name', f'{sweep}.{run.name}', *_BABYSIT.value, '--', *train]


def main(argv: list[str]) -> None:
  if len(argv) > 1 or not _SWEEP.value:
    fail(f'give --sweep=NAME, one of: {", ".join(SWEEPS)}')
  try:
    runs = [one_step_run(_SWEEP.value)] if _ONE_STEP.value else sweep_runs(_SWEEP.value)
  except ValueError as error:
    fail(str(error))
  root, sweep, mode = _ROOT.value, _SWEEP.value, _MODE.value
  if mode == 'pod':
    if not os.access(os.path.join(_LAUNCH_DIR.value, 'babysit.sh'), os.X_OK):
      fail(f'no executable babysit.sh in {_LAUNCH_DIR.value!r}; run from a saejax checkout or pass --launch_dir')
    if not root.startswith('gs://'):
      print(
        f'warning: --root={root} is not gs://: every worker and this machine must see the same folder', file=sys.stderr
      )
  for run in runs:
    train = (
      pod_train_command(run, root, sweep, _SET.value) if mode == 'pod' else run.train_command(root, sweep, _SET.value)
    )
    commands = [train, run.align_command(root, sweep, _ALIGN.value)]
    if mode == 'print':
      for command in commands:
        print(shlex.join(['python', *command[1:]]))
      continue
    for aligned, command in zip((False, True), commands):
      if _done(run, root, sweep, aligned):
        continue
      done = subprocess.run(command)
      if done.returncode != 0:
        fail(f'{run.name} failed ({shlex.join(command)}); rerun the sweep to resume', done.returncode)
  if mode != 'print':
    print(json.dumps({'sweep': sweep, 'runs': [run.workdir(root, sweep) for run in runs]}))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
