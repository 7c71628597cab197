"""The training loop: all seeds on one activation stream, with checkpoints, resume, logging and exports.

Side effects live here (files, signals, the progress bar); the math is the pure step in `step.py`. Host
metrics are read one step late, so the loop never waits on the device except to save a checkpoint.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from saejax import console, data, formats, storage
from saejax import sae as sae_lib
from saejax import sharding as shd
from saejax.config import TrainConfig
from saejax.train import checkpoint, optimizer, run_folder, seed_groups, tracking
from saejax.train import step as step_lib

PER_SEED_METRICS = ('loss', 'fvu', 'l0', 'dead_fraction', 'grad_norm')
# Seed means on each checkpoint line: (label, metric, format).
_SHOWN = (('fvu', 'fvu', '.4f'), ('l0', 'l0', '.1f'), ('dead', 'dead_fraction', '.3f'))


class NonFiniteError(RuntimeError):
  """Training produced NaN/inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
  status: str  # 'completed' or 'preempted'
  step: int
  summary: dict[str, Any]


class _Stop:
  """Turns SIGTERM into a flag the loop checks at step boundaries (single process).

  With several processes a flag set on one host would make only that host save, and the others would wait in
  the next step's collectives forever. There `jax.distributed`'s preemption service owns SIGTERM instead, and
  `Checkpointer.reached_preemption` turns true on every host at the same step; no handler is installed here.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no preemption save
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(metrics: dict[str, np.ndarray], step: int, seeds: tuple[int, ...], hookpoint: str | None) -> None:
  where = f' at {hookpoint}' if hookpoint else ''
  if not bool(np.all(metrics['input_finite'])):
    raise NonFiniteError(f'non-finite activations{where} in the batch of step {step}; the last good checkpoint is kept')
  bad = [seed for seed, loss in zip(seeds, metrics['loss']) if not np.isfinite(loss)]
  if bad:
    raise NonFiniteError(
      f'non-finite loss{where} at step {step} for seed(s) {bad}; the last good checkpoint is kept '
      f'(lower --config.lr or check the activations)'
    )


class Trainer:
  """Owns one run folder. `run()` trains (or resumes) to `num_steps`, then exports every seed."""

  def __init__(self, config: TrainConfig, workdir: str, mesh: jax.sharding.Mesh | None = None):
    config.validate()
    self.config = config
    self.workdir = workdir
    self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh_data, config.mesh_model)
    shd.check_batch_divisible(self.mesh, config.batch_size)
    self.source = data.make_source(config, shd.batch_sharding(self.mesh))
    self.arch = sae_lib.get(config.arch)
    platform = self.mesh.devices.flat[0].platform
    self.spec = sae_lib.SaeSpec.from_config(config, latent_shards=self.mesh.shape[shd.MODEL], platform=platform)
    self.tx, self.schedule = optimizer.make_optimizer(config)
    self.metrics_log = run_folder.MetricsLog(workdir)
    self.tracker = tracking.Tracker()
    # Records for the tracker: those the last saved checkpoint covers, and those after it (tracking.py says why).
    self._durable: list[dict] = []
    self._unsaved: list[dict] = []

  @property
  def hookpoints(self) -> list[str]:
    return self.source.hookpoints

  @property
  def keys(self) -> list[str]:
    return step_lib.hookpoint_keys(self.hookpoints)

  def fresh_state(self) -> dict[str, step_lib.TrainState]:
    """Per hookpoint: seed-stacked init on the mesh, with b_dec set from that hookpoint's first batch."""
    states = {}
    for key, first_batch in zip(self.keys, self.source.batches_at(0)):
      state = step_lib.create_state(self.arch, self.spec, self.tx, self.config.init_seeds, self.mesh)
      states[key] = step_lib.set_b_dec(state, sae_lib.data_b_dec(first_batch, self.config.b_dec_init))
    return states

  def compiled_step(self) -> seed_groups.SeedGroupStep:
    """The step of one hookpoint's seeds (shared by all hookpoints: they have the same shapes)."""
    group_size = self.config.resolved_seed_group_size(self.mesh.devices.flat[0].platform)
    seeds = len(self.config.init_seeds)
    return seed_groups.make(self.arch, self.spec, self.tx, self.config.dead_tokens, seeds, group_size, self.mesh)

  def next_inputs(self) -> dict[str, jax.Array]:
    return dict(zip(self.keys, self.source.next_batches()))

  def _initial_state(self, ckpt: checkpoint.Checkpointer) -> dict[str, step_lib.TrainState]:
    states = self.fresh_state()
    latest = ckpt.latest_step()
    if latest is None:
      return states
    states, data_state = ckpt.restore(latest, checkpoint.abstract_like(states))
    self.source.load_state_dict(data_state)
    if jax.process_index() == 0:
      self.metrics_log.truncate_after(latest)
      self.tracker.send(self.metrics_log.read())  # what the last checkpoint covers and the tracker has not had
    console.say(f'resumed from step {latest} of {self.config.num_steps:,} ({ckpt.directory})')
    return states

  def describe(self) -> str:
    """The run in one line: what trains, on what, for how long, and where it goes."""
    config, devices = self.config, self.mesh.devices
    hookpoints = ', '.join(self.hookpoints)
    return (
      f'{config.arch} x {len(config.init_seeds)} seeds ({console.seed_range(config.init_seeds)}), '
      f'{config.num_latents:,} latents, k={config.k} on {hookpoints}: {config.num_tokens:,} tokens in '
      f'{config.num_steps:,} steps of {config.batch_size:,}, {devices.size} {devices.flat[0].platform} '
      f'device{"s" if devices.size > 1 else ""} -> {self.workdir}'
    )

  def run(self) -> RunResult:
    config = self.config
    run_folder.prepare(self.workdir, config, write=jax.process_index() == 0)
    self.source.save_artifacts(self.workdir)
    console.say(f'train {self.describe()}')
    # The handler covers restore and compilation too: a SIGTERM there is honoured after the next step.
    with _Stop() as stop:
      ckpt = checkpoint.Checkpointer(self.workdir, keep=config.keep_checkpoints)
      self.tracker = tracking.open_tracker(config, self.workdir)
      try:
        state = self._initial_state(ckpt)
        train_step = self.compiled_step()
        start = int(state[self.keys[0]]['step'])
        groups, step, preempted = self._loop(split(train_step, state), start, train_step, ckpt, stop)
        state = merge(train_step, groups)
      finally:
        ckpt.close()
        self.tracker.send(self._durable)  # the last checkpoint is on disk now
      if preempted:
        self.tracker.close()
        console.say(f'stopped by SIGTERM at step {step}; checkpoint saved, rerun the same command to resume')
        return RunResult('preempted', step, {})
      summary = self._finish(state)
      self.tracker.summary(summary)
      self.tracker.close()
      return RunResult('completed', step, summary)

  def _loop(self, groups, start, train_step, ckpt, stop):
    config = self.config
    seeds = tuple(config.init_seeds)
    num_steps = config.num_steps
    started = time.time()
    pending = None  # (step, device metrics) of the last dispatched step, read one step late
    latest = {}  # the last logged step's means over seeds, for the checkpoint lines
    bar = tqdm(
      total=num_steps,
      initial=start,
      desc='train',
      unit='step',
      dynamic_ncols=True,
      disable=None if jax.process_index() == 0 else True,
    )

    def drain():
      nonlocal pending
      if pending is None:
        return
      done_step, device_metrics = pending
      pending = None
      host = jax.device_get(device_metrics)
      for key, hookpoint in zip(self.keys, self.hookpoints):
        _check_finite(host[key], done_step, seeds, hookpoint if len(self.keys) > 1 else None)
        latest[hookpoint] = '  '.join(f'{label} {np.mean(host[key][name]):{fmt}}' for label, name, fmt in _SHOWN)
      bar.update(1)
      if done_step % config.log_every == 0 or done_step == num_steps:
        for key, hookpoint in zip(self.keys, self.hookpoints):
          self._log(done_step, hookpoint, host[key], time.time() - started, bar, start)

    step = start
    while step < num_steps:
      groups, device_metrics = step_all(train_step, groups, self.next_inputs())
      step += 1
      drain()
      pending = (step, device_metrics)
      should_save = step % config.checkpoint_every == 0 or step == num_steps
      preempted = stop.requested or ckpt.reached_preemption(step)
      if should_save or preempted:
        drain()
        ckpt.save(step, merge(train_step, groups), self.source.state_dict())
        # Saving waited for the previous checkpoint, so the records it covers are safe to send.
        self.tracker.send(self._durable)
        self._durable, self._unsaved = self._unsaved, []
        console.say(f'checkpoint {step:,}/{num_steps:,}' + ''.join(f'  {hp}: {m}' for hp, m in latest.items()))
        if preempted:
          ckpt.wait()
          bar.close()
          return groups, step, True
    drain()
    bar.close()
    return groups, step, False

  def _log(self, step: int, hookpoint: str, host: dict[str, np.ndarray], elapsed: float, bar, start: int) -> None:
    """Appends the step's per-seed metrics to metrics.jsonl and shows their means on the bar."""
    record = {
      'step': step,
      'hookpoint': hookpoint,
      'tokens': step * self.config.batch_size,
      **{name: np.asarray(host[name]).round(6).tolist() for name in PER_SEED_METRICS},
      'lr': float(self.schedule(step - 1)),
      'elapsed_s': round(elapsed, 3),
      'time': round(time.time(), 3),
    }
    if jax.process_index() == 0:
      self.metrics_log.append(record)
      self._unsaved.append(record)
    fvu, l0, dead = (float(np.mean(host[n])) for n in ('fvu', 'l0', 'dead_fraction'))
    tokens_per_s = (step - start) * self.config.batch_size / max(elapsed, 1e-9)
    bar.set_postfix(fvu=f'{fvu:.4f}', l0=f'{l0:.1f}', dead=f'{dead:.3f}', tok_s=f'{tokens_per_s:,.0f}')

  def _finish(self, states) -> dict[str, Any]:
    """Exports every seed of every hookpoint in both layouts and writes summary.json."""
    config = self.config
    records = self.metrics_log.read()
    summary: dict[str, Any] = {'step': int(states[self.keys[0]]['step']), 'seeds': list(config.init_seeds)}
    per_hookpoint = {}
    for key, hookpoint in zip(self.keys, self.hookpoints):
      params = host_params(states[key]['params'])
      last = [r for r in records if r.get('hookpoint', hookpoint) == hookpoint][-1:] or [{}]
      per_hookpoint[hookpoint] = {
        'final': last[0],
        **self.source.final_report(params, self.spec, config.num_steps, hookpoint),
      }
      per_hookpoint[hookpoint]['seed_stats'] = run_folder.seed_stats(
        run_folder.per_seed_metrics(per_hookpoint[hookpoint])
      )
      if jax.process_index() == 0:
        self._export(hookpoint, params)
    if len(self.keys) == 1:
      summary.update(per_hookpoint[self.hookpoints[0]])
    else:
      summary['hookpoints'] = per_hookpoint
    if jax.process_index() == 0:
      storage.write_json(storage.join(self.workdir, run_folder.SUMMARY), summary)
    return summary

  def _export(self, hookpoint: str, params: dict[str, np.ndarray]) -> None:
    config = self.config
    sizes = {'arch': config.arch, 'k': config.k, 'd_in': config.d_in, 'num_latents': config.num_latents}
    # What training alone needs, recorded with the export (inference does not use it).
    extra = (
      {'matryoshka_widths': list(sae_lib.dense.matryoshka_widths(self.spec))} if config.arch == 'matryoshka' else None
    )
    for index, seed in enumerate(config.init_seeds):
      seed_params = {name: np.asarray(value[index]) for name, value in params.items()}
      formats.save_eleuther(run_folder.sae_dir(self.workdir, hookpoint, seed), seed_params, **sizes, extra_cfg=extra)
      formats.save_saelens(
        run_folder.sae_dir(self.workdir, hookpoint, seed, 'saelens'),
        seed_params,
        hook_name=hookpoint,
        **sizes,
        extra_cfg=extra,
      )


def split(train_step: seed_groups.SeedGroupStep, states: dict) -> dict:
  return {key: train_step.split(state) for key, state in states.items()}


def merge(train_step: seed_groups.SeedGroupStep, groups: dict) -> dict:
  return {key: train_step.merge(state_groups) for key, state_groups in groups.items()}


def step_all(train_step: seed_groups.SeedGroupStep, groups: dict, inputs: dict) -> tuple[dict, dict]:
  """One step of every hookpoint's seeds: (groups, metrics), keyed by hookpoint key."""
  outs = {key: train_step(groups[key], inputs[key]) for key in groups}
  return {key: out[0] for key, out in outs.items()}, {key: out[1] for key, out in outs.items()}


@dataclasses.dataclass
class Stepper:
  """`stepper(trainer)(groups, inputs) -> (groups, metrics)`: the trainer's step for benchmarks and notebooks."""

  trainer: Trainer
  train_step: seed_groups.SeedGroupStep

  def fresh(self) -> dict:
    return split(self.train_step, self.trainer.fresh_state())

  def __call__(self, groups: dict, inputs: dict) -> tuple[dict, dict]:
    return step_all(self.train_step, groups, inputs)

  def stacked(self, groups: dict) -> dict:
    return merge(self.train_step, groups)


def stepper(trainer: Trainer) -> Stepper:
  return Stepper(trainer, trainer.compiled_step())


def host_params(params: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """Full numpy copies of seed-stacked params on every process; with several processes the latent shards of
  other hosts are all-gathered first (a collective: every process must call this)."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  return multihost_utils.process_allgather(params, tiled=True)


def train(config: TrainConfig, workdir: str) -> RunResult:
  return Trainer(config, workdir).run()


def train_in_memory(
  config: TrainConfig, mesh: jax.sharding.Mesh | None = None, num_steps: int | None = None
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
  """Trains without touching disk (for notebooks and tests): returns host params [S, ...] and per-step metrics."""
  trainer = Trainer(config, workdir='', mesh=mesh)
  step = stepper(trainer)
  groups = step.fresh()
  history = []
  for _ in range(config.num_steps if num_steps is None else num_steps):
    groups, metrics = step(groups, trainer.next_inputs())
    history.append(jax.device_get(metrics))
  states = step.stacked(groups)
  params = {hp: jax.device_get(states[key]['params']) for key, hp in zip(trainer.keys, trainer.hookpoints)}
  per_hookpoint_history = {hp: [h[key] for h in history] for key, hp in zip(trainer.keys, trainer.hookpoints)}
  if len(trainer.keys) == 1:
    return params[trainer.hookpoints[0]], per_hookpoint_history[trainer.hookpoints[0]]
  return params, per_hookpoint_history
