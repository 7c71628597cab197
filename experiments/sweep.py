"""Every ablation of the paper as a run matrix: print the commands (for a pod) or run them here in sequence.

  python -m experiments.sweep --sweep=fig4_latents                        # print train + align commands
  python -m experiments.sweep --sweep=fig4_k --mode=local --root=runs     # run them one after another
  python -m experiments.sweep --sweep=fig5_layers --set=model=/data/pythia-160m --set=dataset=/data/pile.bin

Each run is a preset plus overrides; `--set FIELD=VALUE` adds overrides to every run (local weights, fewer
tokens for a smoke test). Runs that already finished are skipped locally, since rerunning resumes.
`python -m experiments.figures --root=...` then collects the alignments into the paper's plots.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from absl import app, flags

from experiments.ablations import SWEEPS, sweep_runs
from saejax import storage

_SWEEP = flags.DEFINE_string('sweep', None, 'Which ablation (see SWEEPS).')
_MODE = flags.DEFINE_enum('mode', 'print', ['print', 'local'], 'print the commands, or run them here.')
_ROOT = flags.DEFINE_string('root', 'runs', 'Folder (or gs:// prefix) holding one workdir per run.')
_SET = flags.DEFINE_multi_string('set', [], 'FIELD=VALUE override applied to every run.')


def _done(workdir: str, aligned: bool) -> bool:
  return storage.exists(storage.join(workdir, 'alignment', 'summary.json') if aligned
                        else storage.join(workdir, 'summary.json'))


def main(argv: list[str]) -> None:
  if len(argv) > 1 or not _SWEEP.value:
    print(f'error: give --sweep=NAME, one of: {", ".join(SWEEPS)}', file=sys.stderr)
    sys.exit(2)
  try:
    runs = sweep_runs(_SWEEP.value)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  root, sweep = _ROOT.value, _SWEEP.value
  for run in runs:
    commands = [run.train_command(root, sweep, _SET.value), run.align_command(root, sweep)]
    if _MODE.value == 'print':
      for command in commands:
        print(shlex.join(['python', *command[1:]]))
      continue
    workdir = run.workdir(root, sweep)
    for aligned, command in zip((False, True), commands):
      if _done(workdir, aligned):
        continue
      done = subprocess.run(command)
      if done.returncode != 0:
        print(f'error: {run.name} failed ({shlex.join(command[1:])}); rerun the sweep to resume', file=sys.stderr)
        sys.exit(done.returncode)
  if _MODE.value == 'local':
    print(json.dumps({'sweep': sweep, 'runs': [run.workdir(root, sweep) for run in runs]}))


if __name__ == '__main__':
  app.run(main)
