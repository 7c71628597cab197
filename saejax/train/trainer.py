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

from saejax import console, data, formats, storage
from saejax import sae as sae_lib
from saejax import sharding as shd
from saejax.config import TrainConfig
from saejax.train import checkpoint, optimizer, run_folder, slots, tracking
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


def _check_finite(metrics: dict[str, np.ndarray], step: int, seeds: tuple[int, ...], where: str | None) -> None:
  where = f' at {where}' if where else ''
  if not bool(np.all(metrics['input_finite'])):
    raise NonFiniteError(f'non-finite activations{where} in the batch of step {step}; the last good checkpoint is kept')
  bad = [seed for seed, loss in zip(seeds, metrics['loss']) if not np.isfinite(loss)]
  if bad:
    raise NonFiniteError(
      f'non-finite loss{where} at step {step} for seed(s) {bad}; the last good checkpoint is kept '
      f'(lower --config.lr or check the activations)'
    )


class Trainer:
  """Owns one run folder. `run()` trains (or resumes) to `num_steps`, then exports every seed of every variant."""

  def __init__(self, config: TrainConfig, workdir: str, mesh: jax.sharding.Mesh | None = None):
    config.validate()
    self.config = config
    self.workdir = workdir
    self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh_data, config.mesh_model)
    shd.check_batch_divisible(self.mesh, config.batch_size)
    self.source = data.make_source(config, shd.batch_sharding(self.mesh))
    self.families = slots.families(config, self.mesh)
    self.variants = [plan for family in self.families for plan in family.variants]
    for warmup, num_steps, shortened in sorted(
      {(c.warmup_steps, c.num_steps, c.resolved_warmup_steps) for c in (p.config for p in self.variants)}
    ):
      if warmup >= num_steps:  # once per distinct warm-up, however many variants share it
        logging.warning('warmup_steps=%d >= num_steps=%d; warming up over %d steps', warmup, num_steps, shortened)
    self.slots = slots.make(self.hookpoints, self.families)
    self.views = slots.views(self.slots)  # every (hookpoint, variant): what is logged, checked and exported
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
    return [slot.key for slot in self.slots]

  def label(self, view: slots.View) -> str:
    return slots.label(view, self.views)

  def fresh_state(self) -> dict[str, step_lib.TrainState]:
    """Per slot (hookpoint and family): stacked init on the mesh, b_dec from its hookpoint's first batch."""
    first = self.source.batches_at(0)
    return {slot.key: slots.fresh_state(slot, first[slot.hookpoint_index], self.mesh) for slot in self.slots}

  def next_inputs(self) -> dict[str, jax.Array]:
    return slots.inputs(self.slots, self.source.next_batches())

  def inputs_at(self, position: int) -> dict[str, jax.Array]:
    return slots.inputs(self.slots, self.source.batches_at(position))

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
    # What the variants vary is in their names; the line shows the base value of the rest.
    shown = {'arch': config.arch, 'num_latents': f'{config.num_latents:,} latents', 'k': f'k={config.k}'}
    for name in list(shown):
      if any(getattr(plan.config, name) != getattr(config, name) for plan in self.variants):
        del shown[name]
    sae = shown.pop('arch', '')
    if self.variants[0].name:
      names = ' | '.join(plan.name for plan in self.variants)
      sae = f'{len(self.variants)} variants ({names})' + (f' of {sae}' if sae else '')
    sizes = ', '.join(shown.values())
    return (
      f'{sae} x {len(config.init_seeds)} seeds ({console.seed_range(config.init_seeds)})'
      f'{", " + sizes if sizes else ""} on {hookpoints}: {config.num_tokens:,} tokens in '
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
        start = int(state[self.keys[0]]['step'])
        groups, step, preempted = self._loop(slots.split(self.slots, state), start, ckpt, stop)
        state = slots.merge(self.slots, groups)
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

  def _loop(self, groups, start, ckpt, stop):
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
      for view in self.views:
        mine = {name: values[view.members] for name, values in host[view.slot.key].items()}
        _check_finite(mine, done_step, seeds, self.label(view) if len(self.views) > 1 else None)
        latest[self.label(view)] = '  '.join(f'{lb} {np.mean(mine[n]):{fmt}}' for lb, n, fmt in _SHOWN)
        if done_step % config.log_every == 0 or done_step == num_steps:
          self._log(done_step, view, mine, time.time() - started, bar, start)
      bar.update(1)

    step = start
    while step < num_steps:
      groups, device_metrics = slots.step_all(self.slots, groups, self.next_inputs())
      step += 1
      drain()
      pending = (step, device_metrics)
      should_save = step % config.checkpoint_every == 0 or step == num_steps
      preempted = stop.requested or ckpt.reached_preemption(step)
      if should_save or preempted:
        drain()
        ckpt.save(step, slots.merge(self.slots, groups), self.source.state_dict())
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

  def _log(self, step: int, view: slots.View, host: dict[str, np.ndarray], elapsed: float, bar, start: int) -> None:
    """Appends the step's per-seed metrics to metrics.jsonl and shows their means on the bar."""
    record = {
      'step': step,
      'hookpoint': view.slot.hookpoint,
      **({'variant': view.variant.name} if view.variant.name else {}),
      'tokens': step * self.config.batch_size,
      **{name: np.asarray(host[name]).round(6).tolist() for name in PER_SEED_METRICS},
      'lr': optimizer.learning_rate_at(view.variant.config, step - 1),
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
    """Exports every seed of every slot in both layouts and writes summary.json.

    Without variants the summary holds the hookpoint's results at the top (or under 'hookpoints' when there
    are several); with variants, that same block per variant under 'variants'.
    """
    config = self.config
    records = self.metrics_log.read()
    summary: dict[str, Any] = {'step': int(states[self.keys[0]]['step']), 'seeds': list(config.init_seeds)}
    per_variant: dict[str, dict[str, Any]] = {plan.name: {} for plan in self.variants}
    stacked = {slot.key: host_params(states[slot.key]['params']) for slot in self.slots}
    for view in self.views:
      plan, hookpoint = view.variant, view.slot.hookpoint
      params = {name: values[view.members] for name, values in stacked[view.slot.key].items()}
      mine = [r for r in records if r.get('hookpoint', hookpoint) == hookpoint and r.get('variant', '') == plan.name]
      section = {'final': mine[-1] if mine else {}}
      section.update(self.source.final_report(params, view.slot.family.spec, config.num_steps, hookpoint))
      section['seed_stats'] = run_folder.seed_stats(run_folder.per_seed_metrics(section))
      per_variant[plan.name][hookpoint] = section
      if jax.process_index() == 0:
        self._export(view, params)
    blocks = {
      name: sections[self.hookpoints[0]] if len(self.hookpoints) == 1 else {'hookpoints': sections}
      for name, sections in per_variant.items()
    }
    if self.variants[0].name:
      summary['variants'] = blocks
    else:
      summary.update(blocks[''])
    if jax.process_index() == 0:
      storage.write_json(storage.join(self.workdir, run_folder.SUMMARY), summary)
    return summary

  def _export(self, view: slots.View, params: dict[str, np.ndarray]) -> None:
    config, hookpoint, variant = view.variant.config, view.slot.hookpoint, view.variant.name
    sizes = {'arch': config.arch, 'k': config.k, 'd_in': config.d_in, 'num_latents': config.num_latents}
    # What training alone needs, recorded with the export (inference does not use it).
    extra = (
      {'matryoshka_widths': list(sae_lib.dense.matryoshka_widths(view.slot.family.spec))}
      if config.arch == 'matryoshka'
      else None
    )
    for index, seed in enumerate(config.init_seeds):
      seed_params = {name: np.asarray(value[index]) for name, value in params.items()}
      formats.save_eleuther(
        run_folder.sae_dir(self.workdir, hookpoint, seed, variant=variant), seed_params, **sizes, extra_cfg=extra
      )
      formats.save_saelens(
        run_folder.sae_dir(self.workdir, hookpoint, seed, 'saelens', variant=variant),
        seed_params,
        hook_name=hookpoint,
        **sizes,
        extra_cfg=extra,
      )


@dataclasses.dataclass
class Stepper:
  """`stepper(trainer)(groups, inputs) -> (groups, metrics)`: the trainer's step for benchmarks and notebooks."""

  trainer: Trainer

  def fresh(self) -> dict:
    return slots.split(self.trainer.slots, self.trainer.fresh_state())

  def __call__(self, groups: dict, inputs: dict) -> tuple[dict, dict]:
    return slots.step_all(self.trainer.slots, groups, inputs)

  def stacked(self, groups: dict) -> dict:
    return slots.merge(self.trainer.slots, groups)


def stepper(trainer: Trainer) -> Stepper:
  return Stepper(trainer)


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
  """Trains without touching disk (for notebooks and tests): returns host params [S, ...] and per-step metrics.

  With several hookpoints or variants both come keyed by slot label (`slots.label`: the hookpoint, the variant,
  or `hookpoint/variant`).
  """
  trainer = Trainer(config, workdir='', mesh=mesh)
  step = stepper(trainer)
  groups = step.fresh()
  history = []
  for _ in range(config.num_steps if num_steps is None else num_steps):
    groups, metrics = step(groups, trainer.next_inputs())
    history.append(jax.device_get(metrics))
  states = step.stacked(groups)
  stacked = {key: jax.device_get(state['params']) for key, state in states.items()}
  params, per_view_history = {}, {}
  for view in trainer.views:
    name, key = trainer.label(view), view.slot.key
    params[name] = {field: value[view.members] for field, value in stacked[key].items()}
    per_view_history[name] = [{metric: m[view.members] for metric, m in h[key].items()} for h in history]
  if len(trainer.views) == 1:
    return params[name], per_view_history[name]
  return params, per_view_history
