"""The training loop: all seeds on one activation stream, with checkpoints, resume, logging and exports.

Side effects live here (files, signals, the progress bar); the math is the pure step in `step.py`. Host
metrics are read one step late, so the loop never waits on the device except to save a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from saejax import data, formats, storage
from saejax import sae as sae_lib
from saejax import sharding as shd
from saejax.config import TrainConfig
from saejax.train import checkpoint, optimizer, run_folder
from saejax.train import step as step_lib

PER_SEED_METRICS = ('loss', 'fvu', 'l0', 'dead_fraction', 'grad_norm')


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
  if not bool(metrics['input_finite']):
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

  def compiled_step(self, states: dict[str, step_lib.TrainState]):
    step_fn = step_lib.make_train_step(
      self.arch,
      self.spec,
      self.tx,
      self.config.dead_tokens,
      self.config.resolved_seed_group_size(self.mesh.devices.flat[0].platform),
    )
    return step_lib.jit_train_step(step_fn, states, self.mesh, self.config.num_latents)

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
    logging.info('resumed from step %d (%s)', latest, ckpt.directory)
    return states

  def run(self) -> RunResult:
    config = self.config
    run_folder.prepare(self.workdir, config, write=jax.process_index() == 0)
    self.source.save_artifacts(self.workdir)
    # The handler covers restore and compilation too: a SIGTERM there is honoured after the next step.
    with _Stop() as stop:
      ckpt = checkpoint.Checkpointer(self.workdir, keep=config.keep_checkpoints)
      try:
        state = self._initial_state(ckpt)
        train_step = self.compiled_step(state)
        state, step, preempted = self._loop(state, int(state[self.keys[0]]['step']), train_step, ckpt, stop)
      finally:
        ckpt.close()
      if preempted:
        logging.info('stopped by SIGTERM at step %d; checkpoint saved, rerun the same command to resume', step)
        return RunResult('preempted', step, {})
      return RunResult('completed', step, self._finish(state))

  def _loop(self, state, start, train_step, ckpt, stop):
    config = self.config
    seeds = tuple(config.init_seeds)
    num_steps = config.num_steps
    started = time.time()
    pending = None  # (step, device metrics) of the last dispatched step, read one step late
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
      bar.update(1)
      if done_step % config.log_every == 0 or done_step == num_steps:
        for key, hookpoint in zip(self.keys, self.hookpoints):
          self._log(done_step, hookpoint, host[key], time.time() - started, bar)

    step = start
    while step < num_steps:
      state, device_metrics = train_step(state, self.next_inputs())
      step += 1
      drain()
      pending = (step, device_metrics)
      should_save = step % config.checkpoint_every == 0 or step == num_steps
      preempted = stop.requested or ckpt.reached_preemption(step)
      if should_save or preempted:
        drain()
        ckpt.save(step, state, self.source.state_dict())
        if preempted:
          ckpt.wait()
          bar.close()
          return state, step, True
    drain()
    bar.close()
    return state, step, False

  def _log(self, step: int, hookpoint: str, host: dict[str, np.ndarray], elapsed: float, bar) -> None:
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
    fvu, l0, dead = (float(np.mean(host[n])) for n in ('fvu', 'l0', 'dead_fraction'))
    bar.set_postfix(fvu=f'{fvu:.4f}', l0=f'{l0:.1f}', dead=f'{dead:.3f}')
    logging.info(
      'step %d/%d  %s  fvu %.4f  l0 %.1f  dead %.3f  lr %.2e',
      step,
      self.config.num_steps,
      hookpoint,
      fvu,
      l0,
      dead,
      record['lr'],
    )

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
    for index, seed in enumerate(config.init_seeds):
      seed_params = {name: np.asarray(value[index]) for name, value in params.items()}
      formats.save_eleuther(run_folder.sae_dir(self.workdir, hookpoint, seed), seed_params, **sizes)
      formats.save_saelens(
        run_folder.sae_dir(self.workdir, hookpoint, seed, 'saelens'), seed_params, hook_name=hookpoint, **sizes
      )


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
  states = trainer.fresh_state()
  train_step = trainer.compiled_step(states)
  history = []
  for _ in range(config.num_steps if num_steps is None else num_steps):
    states, metrics = train_step(states, trainer.next_inputs())
    history.append(jax.device_get(metrics))
  params = {hp: jax.device_get(states[key]['params']) for key, hp in zip(trainer.keys, trainer.hookpoints)}
  per_hookpoint_history = {hp: [h[key] for h in history] for key, hp in zip(trainer.keys, trainer.hookpoints)}
  if len(trainer.keys) == 1:
    return params[trainer.hookpoints[0]], per_hookpoint_history[trainer.hookpoints[0]]
  return params, per_hookpoint_history
