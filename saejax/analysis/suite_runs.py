"""Resumable runs for an experiment suite: train a run folder unless it is finished, align it unless aligned.

A suite is many run folders under one root. Each step here is idempotent: a finished run (summary.json at its
last step) is read back, not retrained; a run killed midway resumes from its last Orbax checkpoint; an alignment
with its summary.json is read back. So a killed suite, rerun with the same command, continues where it stopped,
and a finished one rereads every result in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import numpy as np

from saejax import storage
from saejax.config import TrainConfig
from saejax.train import run_folder


class SuiteInterruptedError(RuntimeError):
  """A run stopped before its last step (SIGTERM); rerunning the suite continues it."""


@dataclasses.dataclass
class Timings:
  """Seconds spent per stage, accumulated over every invocation of the suite (DIR/timings.json)."""

  path: str
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  @classmethod
  def load(cls, path: str) -> Timings:
    return cls(path, storage.read_json(path) if storage.isfile(path) else {})

  def add(self, stage: str, seconds: float) -> None:
    self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
    storage.write_json(self.path, self.seconds)

  @property
  def total(self) -> float:
    return float(sum(self.seconds.values()))


def finished_summary(workdir: str, config: TrainConfig) -> dict[str, Any] | None:
  """The run's summary.json when it finished training `config` (same config, last step reached), else None."""
  path = storage.join(workdir, run_folder.SUMMARY)
  if not storage.isfile(path):
    return None
  saved = run_folder.read_config(workdir)
  wanted = json.loads(json.dumps(config.to_json()))
  if any(saved.get(name) != value for name, value in wanted.items() if name not in run_folder.RESUMABLE_FIELDS):
    raise ValueError(f'{workdir} holds a run with another config; delete it or use a new --out')
  summary = storage.read_json(path)
  return summary if summary.get('step') == config.num_steps else None


def train(config: TrainConfig, workdir: str, timings: Timings | None = None, stage: str = 'train') -> dict[str, Any]:
  """Trains (or resumes, or reads back) the run folder `workdir`; returns its summary.json."""
  from saejax.train.trainer import train as train_run

  done = finished_summary(workdir, config)
  if done is not None:
    return done
  started = time.time()
  result = train_run(config, workdir)
  if timings is not None:
    timings.add(stage, time.time() - started)
  if result.status != 'completed':
    raise SuiteInterruptedError(f'{workdir} stopped at step {result.step}; rerun the same command to continue')
  return result.summary


def align(
  workdir: str,
  firing_tokens: int = 0,
  threshold: float = 0.7,
  timings: Timings | None = None,
  stage: str = 'align',
  figures: bool = True,
) -> dict[str, Any]:
  """Aligns every seed of the run's one hookpoint into RUN/alignment (firing counts for Fig. 3 when asked;
  `figures=False`: no PNGs)."""
  from saejax.analysis import alignment_run, firing

  out = storage.join(workdir, 'alignment')
  summary_path = storage.join(out, 'summary.json')
  if storage.isfile(summary_path):
    return storage.read_json(summary_path)
  started = time.time()
  hookpoint, sae_dirs = run_folder.exported_sae_dirs(workdir)
  counts = firing.counts_for_run(workdir, hookpoint, sae_dirs, firing_tokens) if firing_tokens > 0 else None
  summary = alignment_run.run_alignment(
    sae_dirs,
    out,
    threshold=threshold,
    firing=counts,
    seed_stats=run_folder.read_seed_stats(workdir, hookpoint),
    figures=figures,
  )
  if timings is not None:
    timings.add(stage, time.time() - started)
  return summary


def tail_l0(workdir: str) -> float:
  """Mean L0 over seeds and the last 5% of the logged steps (one batch's L0 moves by a few percent)."""
  records = run_folder.MetricsLog(workdir).read()
  if not records:
    raise ValueError(f'{workdir} has no logged steps to read L0 from')
  tail = records[-max(1, len(records) // 20) :]
  return float(np.mean([np.mean(record['l0']) for record in tail]))


def first_pair_npz(workdir: str) -> dict[str, np.ndarray]:
  """The per-latent arrays of the alignment's first pair (seed0 vs seed1)."""
  summary = storage.read_json(storage.join(workdir, 'alignment', 'summary.json'))
  first = summary['pairs'][0]
  return storage.read_npz(storage.join(workdir, 'alignment', 'pairs', f'{first["a"]}__{first["b"]}.npz'))
