"""Experiment trackers beside the metrics.jsonl every run writes: TensorBoard (tensorboardX) or Weights & Biases.

`--config.tracker=tensorboard|wandb` (extras `saejax[tensorboard]`, `saejax[wandb]`). Each gets one series per
seed and hookpoint (`<hookpoint>/seed<N>/<metric>`; `<hookpoint>/<variant>/seed<N>/<metric>` in a run with
variants), the config, and at the end the summary and figures as images.

Records reach the tracker once the checkpoint that covers them is on disk, never before: a run killed between two
checkpoints resumes from the earlier one and recomputes the steps after it, which the tracker has not seen. The
run folder's `tracker.json` keeps the tracker's run id and the last step sent, so a resumed run continues the same
tracker run, first sending what its last checkpoint covers and the tracker has not had: every step exactly once.
Only process 0 logs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

from saejax import storage
from saejax.config import TrainConfig

STATE_FILE = 'tracker.json'
SERIES = ('loss', 'fvu', 'l0', 'dead_fraction', 'grad_norm')


def scalars(record: dict[str, Any], seeds) -> dict[str, float]:
  """A metrics.jsonl record as flat tracker scalars: `<hookpoint>/seed<N>/<metric>`, plus the learning rate; a
  variant's records as `<hookpoint>/<variant>/seed<N>/<metric>` and `<variant>/lr`."""
  variant = record.get('variant')
  out = {f'{variant}/lr' if variant else 'lr': float(record['lr']), 'tokens': float(record['tokens'])}
  where = f'{record["hookpoint"]}/{variant}' if variant else record['hookpoint']
  for name in SERIES:
    for seed, value in zip(seeds, record[name]):
      out[f'{where}/seed{seed}/{name}'] = float(value)
  return out


def _flat(summary: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested summary -> {'a/b': number or text}; per-seed lists become one key per index."""
  out = {}
  for key, value in summary.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flat(value, f'{name}/'))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[name] = value
    elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value) and len(value) <= 64:
      out.update({f'{name}/{i}': v for i, v in enumerate(value)})
  return out


class Tracker:
  """No tracker: every call does nothing (also what processes other than 0 get)."""

  workdir = ''

  def send(self, records: list[dict[str, Any]]) -> None:
    """Logs the records after the last step sent (all of them covered by a saved checkpoint)."""
    if not self.workdir:
      return
    state = _state(self.workdir)
    fresh = [r for r in records if r['step'] > state.get('sent_step', 0)]
    if fresh:
      self.log(fresh)
      storage.write_json(storage.join(self.workdir, STATE_FILE), {**state, 'sent_step': fresh[-1]['step']})

  def log(self, records: list[dict[str, Any]]) -> None:
    del records

  def summary(self, summary: dict[str, Any]) -> None:
    del summary

  def images(self, paths: dict[str, str], step: int) -> None:
    del paths, step

  def close(self) -> None:
    pass


class TensorBoard(Tracker):
  def __init__(self, workdir: str, config, seeds):
    from tensorboardX import SummaryWriter

    self.workdir, self.seeds = workdir, seeds
    # tensorboardX names event files by the second and the host only, so two writers opened within one second (an
    # align of several variants, a quick resume) would write the same file; the nanosecond suffix keeps each one's
    # own file, in the order they were opened.
    logdir = storage.join(workdir, 'tensorboard')
    self.writer = SummaryWriter(logdir=logdir, filename_suffix=f'.{time.time_ns()}')
    self.writer.add_text('config', f'```\n{json.dumps(config.to_json(), indent=1)}\n```')

  def log(self, records):
    for record in records:
      for tag, value in scalars(record, self.seeds).items():
        self.writer.add_scalar(tag, value, record['step'])
    self.writer.flush()

  def summary(self, summary):
    self.writer.add_text('summary', f'```\n{json.dumps(summary, indent=1, default=str)[:60_000]}\n```')
    self.writer.flush()

  def images(self, paths, step):
    import matplotlib.image

    for name, path in paths.items():
      pixels = matplotlib.image.imread(path)[..., :3]
      self.writer.add_image(name, np.asarray(pixels), step, dataformats='HWC')
    self.writer.flush()

  def close(self):
    self.writer.close()


class Wandb(Tracker):
  def __init__(self, workdir: str, config, seeds, run_id: str):
    import wandb

    self.workdir, self.seeds, self.wandb = workdir, seeds, wandb
    project = config.tracker_project or 'saejax'
    name = os.path.basename(os.path.normpath(workdir)) or None
    # Quiet, and not capturing the console: the run's own lines stay as they are (saejax/console.py).
    settings = wandb.Settings(silent=True, console='off', disable_git=True)
    self.run = wandb.init(
      project=project, dir=workdir, id=run_id, resume='allow', name=name, config=config.to_json(), settings=settings
    )

  def log(self, records):
    by_step: dict[int, dict[str, float]] = {}
    for record in records:  # one wandb step per training step, all hookpoints together
      by_step.setdefault(record['step'], {}).update(scalars(record, self.seeds))
    for step in sorted(by_step):
      self.run.log(by_step[step], step=step)

  def summary(self, summary):
    self.run.summary.update(_flat(summary))

  def images(self, paths, step):
    del step  # wandb steps only grow; the figures go to the step after the last one logged
    self.run.log({name: self.wandb.Image(path) for name, path in paths.items()})

  def close(self):
    self.run.finish()


def _state(workdir: str) -> dict[str, Any]:
  path = storage.join(workdir, STATE_FILE)
  return storage.read_json(path) if storage.isfile(path) else {}


def _run_id(workdir: str, kind: str) -> str:
  """The tracker run id of this run folder, made on first use and kept in `tracker.json`."""
  state = _state(workdir)
  if state.get('tracker') == kind and state.get('run_id'):
    return state['run_id']
  import uuid

  run_id = uuid.uuid4().hex[:12]
  storage.write_json(storage.join(workdir, STATE_FILE), {'tracker': kind, 'run_id': run_id, 'sent_step': 0})
  return run_id


def open_tracker(config, workdir: str) -> Tracker:
  """The run's tracker (a no-op one for 'none', without a run folder, and on processes other than 0)."""
  if config.tracker == 'none' or not workdir or jax.process_index() != 0:
    return Tracker()
  seeds = list(config.init_seeds)
  try:
    if config.tracker == 'tensorboard':
      _run_id(workdir, 'tensorboard')  # starts the state file
      return TensorBoard(workdir, config, seeds)
    return Wandb(workdir, config, seeds, _run_id(workdir, 'wandb'))
  except ImportError as error:
    extra = 'tensorboard' if config.tracker == 'tensorboard' else 'wandb'
    raise ValueError(
      f'--config.tracker={config.tracker} needs {error.name}: pip install "saejax[{extra}]" (or use tracker=none)'
    ) from error


def log_alignment(workdir: str, out_dir: str, summary: dict[str, Any], name: str = 'alignment') -> None:
  """Adds an alignment of the run in `workdir` to its tracker run (if it has one): figures as images, numbers,
  under `name` (`alignment/<variant>` for one variant's)."""
  from saejax.train import run_folder

  config = TrainConfig.from_json(run_folder.read_config(workdir))
  if config.tracker == 'none':
    return
  tracker = open_tracker(config, workdir)
  paths = {f'{name}/{figure}': os.path.join(out_dir, file) for figure, file in summary.get('figures', {}).items()}
  tracker.images({name: path for name, path in paths.items() if os.path.isfile(path)}, config.num_steps)
  tracker.summary({name: {key: value for key, value in summary.items() if key != 'figures'}})
  tracker.close()
