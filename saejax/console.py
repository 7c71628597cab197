"""What a person sees: a few lines that matter, printed by process 0 beside (not through) the progress bar.

Library INFO logs (Orbax's checkpoint threads, JAX's backend probing) stay behind absl's `--verbosity` flag
(experiments/cli.py); the lines here are the run's own: what is running, each checkpoint, the per-seed result and
where the files are. They go to stderr, like the bar and the logs, through `tqdm.write`, so a live bar is not
broken and stdout stays free for what a command prints to be read by another (JSON lines, commands).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
from tqdm.auto import tqdm


def say(message: str) -> None:
  """One console line, from process 0 only."""
  if jax.process_index() == 0:
    tqdm.write(message, file=sys.stderr)


def seed_range(seeds: Sequence[int]) -> str:
  """'0-8' for a contiguous range, else the list."""
  seeds = list(seeds)
  if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
    return f'{seeds[0]}-{seeds[-1]}'
  return ','.join(str(seed) for seed in seeds)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain aligned text table: floats to 4 significant digits, None as '-'."""

  def cell(value) -> str:
    if value is None:
      return '-'
    if isinstance(value, float):
      return f'{value:.4g}'
    return str(value)

  cells = [[str(h) for h in header], *[[cell(v) for v in row] for row in rows]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = ['  '.join(value.rjust(width) for value, width in zip(row, widths)) for row in cells]
  return '\n'.join([lines[0], '  '.join('-' * width for width in widths), *lines[1:]])
