"""Fig. 4's k and width sweeps as one run with three variants against three separate runs, side by side.

  python -m experiments.benchmark variants [--variants_sources=synthetic,cache,lm] [--variants_sweeps=k,width]
      [--variants_steps=5] [--variants_seeds=1]

For each source and sweep (k = 16, 32, 64 at 8,192 latents; width 4,096, 8,192, 16,384 at k=32), prints one JSON
line per arm and one comparing them, each naming the machine:
- `separate`: each setting as its own run (its own Trainer, its own pass over the data);
- `one_step`: one run with `--config.variants` listing the three, one pass over the data;
- per arm, seconds per step with reading (`step_s`), the SAE step alone on a batch already read (`sae_s`), the
  read alone (`read_s`: the synthetic generator, the cache, or the SmolLM2 forward), and tokens/s.
The comparison line holds the sums; the goal is a one-step run that costs the SAE steps plus one read. It also
holds whole runs' wall time (`--variants_run_steps` steps through `Trainer.run` into a temporary folder: compile,
checkpoints, exports and summary included), three runs one after another against the one run.
For the k sweep it also times what a masked top-k would cost at the least: one vmapped group of three at the
largest k (`masked_topk_floor_s`), against the three per-k groups that run now (`per_k_groups_s`).

Sources: `synthetic` (d=768, the synthetic source's generator), `cache` (SmolLM2-135M layers.6.mlp, d=576, a
cache written here first) and `lm` (the same model run live). The cache and lm sources need
`python -m experiments.fetch smollm2` and `python -m experiments.corpus`. Timings are the minimum over repeats.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time

import jax
from absl import flags

_SOURCES = flags.DEFINE_list('variants_sources', ['synthetic', 'cache', 'lm'], 'variants: activation sources.')
_SWEEPS = flags.DEFINE_list('variants_sweeps', ['k', 'width'], 'variants: which of Fig. 4 sweeps (k, width).')
_STEPS = flags.DEFINE_integer('variants_steps', 5, 'variants: timed steps per measurement.')
_SEEDS = flags.DEFINE_integer('variants_seeds', 1, 'variants: seeds per setting.')
_RUN_STEPS = flags.DEFINE_integer('variants_run_steps', 20, 'variants: steps of each whole run timed (0: skip).')

SWEEPS = {'k': ('k', (16, 32, 64)), 'width': ('num_latents', (4096, 8192, 16384))}


def _base_config(source: str, cache_dir: str | None):
  from experiments import presets
  from saejax.config import TrainConfig

  common = {'init_seeds': tuple(range(_SEEDS.value)), 'num_latents': 8192, 'k': 32, 'batch_size': 2048}
  if source == 'synthetic':
    return TrainConfig(source='synthetic', d_in=768, num_tokens=2048 * 1000, **common)
  config = dataclasses.replace(presets.smollm2(), eval_tokens=0, lm_dtype='float32', **common)
  if source == 'cache':
    # Every measurement reads fresh positions (1 + 4 x steps batches per arm; a whole run reads its own steps),
    # all from the cache's one pass.
    batches = max(4 * _STEPS.value + 2, _RUN_STEPS.value)
    config = dataclasses.replace(config, source='cache', dataset=cache_dir, num_tokens=2048 * batches)
  return config


def whole_run_seconds(config) -> float:
  """Wall time of `_RUN_STEPS` steps of `config` as `experiments.train` runs them, in a temporary run folder."""
  from saejax.train import trainer as trainer_lib

  steps = _RUN_STEPS.value
  config = dataclasses.replace(
    config, num_tokens=steps * config.batch_size, warmup_steps=1, log_every=steps, checkpoint_every=steps
  )
  with tempfile.TemporaryDirectory(prefix='saejax-bench-run-') as workdir:
    start = time.perf_counter()
    trainer_lib.Trainer(config, workdir).run()
    return time.perf_counter() - start


def _time(fn, repeats: int = 2) -> float:
  """Minimum over `repeats` of fn's wall time (fn blocks on its own results)."""
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def measure(config) -> dict:
  """Per-step seconds of one run: reading + all its SAE steps, the SAE steps alone, the read alone; compile."""
  from saejax import sharding as shd
  from saejax.train import trainer as trainer_lib

  steps = _STEPS.value
  trainer = trainer_lib.Trainer(config, workdir='', mesh=shd.make_mesh(-1, 1))
  step = trainer_lib.stepper(trainer)
  groups = step.fresh()
  start = time.perf_counter()
  groups, metrics = step(groups, trainer.inputs_at(0))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  position = iter(range(1, 10**9))

  def read_and_step():
    nonlocal groups
    for _ in range(steps):
      groups, out = step(groups, trainer.inputs_at(next(position)))
    jax.block_until_ready((groups, out))

  fixed = trainer.inputs_at(0)

  def sae_only():
    nonlocal groups
    for _ in range(steps):
      groups, out = step(groups, fixed)
    jax.block_until_ready((groups, out))

  def read_only():
    for _ in range(steps):
      jax.block_until_ready(trainer.source.batches_at(next(position)))

  return {
    'step_s': _time(read_and_step) / steps,
    'sae_s': _time(sae_only) / steps,
    'read_s': _time(read_only) / steps,
    'compile_s': compile_s,
  }


def _record(kind: str, source: str, sweep: str, timings: dict, batch: int, machine: dict, **extra) -> dict:
  rounded = {name: round(value, 4) for name, value in timings.items()}
  return {
    'bench': 'variants',
    'arm': kind,
    'source': source,
    'sweep': sweep,
    **extra,
    **rounded,
    'tokens_per_s': round(batch / timings['step_s'], 1),
    'machine': machine,
  }


def bench_sweep(source: str, sweep: str, cache_dir: str | None, machine: dict) -> list[dict]:
  field, values = SWEEPS[sweep]
  base = _base_config(source, cache_dir)
  records, separate = [], []
  for value in values:
    timings = measure(dataclasses.replace(base, **{field: value}))
    separate.append(timings)
    records.append(_record('separate', source, sweep, timings, base.batch_size, machine, setting=f'{field}={value}'))
  variants = f'{field}={",".join(str(v) for v in values)}'
  one = measure(dataclasses.replace(base, variants=variants))
  records.append(_record('one_step', source, sweep, one, base.batch_size, machine, setting=variants))
  comparison = {
    'bench': 'variants',
    'arm': 'comparison',
    'source': source,
    'sweep': sweep,
    'seeds': len(base.init_seeds),
    'separate_step_s_sum': round(sum(t['step_s'] for t in separate), 4),
    'separate_sae_s_sum': round(sum(t['sae_s'] for t in separate), 4),
    'one_step_step_s': round(one['step_s'], 4),
    'one_step_over_separate': round(one['step_s'] / sum(t['step_s'] for t in separate), 3),
    'one_step_over_sae_sum_plus_one_read': round(
      one['step_s'] / (sum(t['sae_s'] for t in separate) + min(t['read_s'] for t in separate)), 3
    ),
    'machine': machine,
  }
  if _RUN_STEPS.value > 0:
    separate_runs = [whole_run_seconds(dataclasses.replace(base, **{field: value})) for value in values]
    one_run = whole_run_seconds(dataclasses.replace(base, variants=variants))
    comparison.update(
      run_steps=_RUN_STEPS.value,
      separate_runs_s=[round(t, 2) for t in separate_runs],
      separate_runs_s_sum=round(sum(separate_runs), 2),
      one_run_s=round(one_run, 2),
      one_run_over_separate_runs=round(one_run / sum(separate_runs), 3),
      one_run_tokens_per_s=round(_RUN_STEPS.value * base.batch_size / one_run, 1),
      separate_runs_tokens_per_s=round(_RUN_STEPS.value * base.batch_size / sum(separate_runs), 1),
    )
  if sweep == 'k':
    top = dataclasses.replace(base, k=max(values), init_seeds=(0, 1, 2), seed_group_size=3)
    comparison['masked_topk_floor_s'] = round(measure(top)['sae_s'], 4)
    comparison['per_k_groups_s'] = round(sum(t['sae_s'] for t in separate) / len(base.init_seeds), 4)
  records.append(comparison)
  return records


def run(machine: dict) -> None:
  with tempfile.TemporaryDirectory(prefix='saejax-bench-variants-') as cache_dir:
    if 'cache' in _SOURCES.value:
      from saejax.data import cache_writer

      config = _base_config('cache', cache_dir)
      lm_config = dataclasses.replace(config, source='lm', dataset=_base_config('lm', None).dataset)
      cache_writer.write_cache(lm_config, cache_dir, config.num_tokens, 'bfloat16', progress=False)
    for source in _SOURCES.value:
      for sweep in _SWEEPS.value:
        for record in bench_sweep(source, sweep, cache_dir, machine):
          print(json.dumps(record), flush=True)
