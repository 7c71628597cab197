"""The run folder's stable layout, which the alignment and analysis tools read.

    DIR/config.json                              the resolved TrainConfig
    DIR/metrics.jsonl                            one line per logged step (and hookpoint, variant), per-seed lists
    DIR/checkpoints/<step>/                      Orbax (train state + data position)
    DIR/saes/<hookpoint>/seed<N>/                EleutherAI layout: sae.safetensors + cfg.json
    DIR/saelens/<hookpoint>/seed<N>/             SAELens layout: sae_weights.safetensors + cfg.json
    DIR/summary.json                             final per-seed metrics, `seed_stats` (mean, std over seeds)
                                                 (+ recovery for synthetic data)

A run with variants (saejax.variants) exports each as if it were its own run, one folder level deeper:
`DIR/saes/<hookpoint>/<variant>/seed<N>/` (and the same under saelens/), where <variant> spells its settings
(`k=16`, `k=16,lr=1e-4`); its summary.json holds each variant's block under 'variants'.

DIR may be local or on object storage (gs://bucket/run); every file is written atomically through
`saejax.storage`, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import re
from typing import Any

from saejax import storage
from saejax import variants as variants_lib
from saejax.config import TrainConfig

CONFIG = 'config.json'
METRICS = 'metrics.jsonl'
SUMMARY = 'summary.json'
# Fields that may change between a run and its resumption: they do not change the trained SAEs.
RESUMABLE_FIELDS = frozenset(
  {
    'log_every',
    'checkpoint_every',
    'keep_checkpoints',
    'mesh_data',
    'mesh_model',
    'seed_group_size',
    'tracker',
    'tracker_project',
  }
)


def sae_dir(workdir: str, hookpoint: str, seed: int, layout: str = 'saes', variant: str = '') -> str:
  return storage.join(workdir, layout, hookpoint, *([variant] if variant else []), f'seed{seed}')


def _seed_folders(folder: str) -> dict[str, str]:
  seeds = [name for name in storage.listdir(folder) if re.fullmatch(r'seed\d+', name)]
  return {name: storage.join(folder, name) for name in sorted(seeds, key=lambda n: int(n[4:]))}


def exported_variants(workdir: str, hookpoint: str) -> list[str]:
  """The variant folders of one exported hookpoint, in the order the run lists them ([] without variants)."""
  folder = storage.join(workdir, 'saes', hookpoint)
  found = [n for n in storage.listdir(folder) if not (re.fullmatch(r'seed\d+', n) or n.startswith('.'))]
  config = read_config(workdir) if storage.isfile(storage.join(workdir, CONFIG)) else {}
  listed = [name for name, _ in variants_lib.resolve(TrainConfig.from_json(config))] if config else []
  return [name for name in listed if name in found] + sorted(name for name in found if name not in listed)


def _choose(workdir: str, options: list[str], chosen: str | None, what: str, flag: str) -> str:
  """`chosen` among the run's `options` (the only one when None); else an error that says what to pass."""
  if chosen is None:
    if len(options) > 1:
      raise ValueError(f'{workdir} has several {what}s ({", ".join(options)}); choose one with --{flag}')
    chosen = options[0]
  if chosen not in options:
    raise ValueError(f'{workdir} has no {what} {chosen!r}; choose one of {", ".join(options)}')
  return chosen


def exported_hookpoint(workdir: str, hookpoint: str | None = None) -> str:
  """The run's exported hookpoint named `hookpoint` (default: the only one); an error that says what to pass."""
  root = storage.join(workdir, 'saes')
  hookpoints = storage.listdir(root)
  if not hookpoints:
    raise FileNotFoundError(f'{root} holds no exported SAEs; train first (python -m experiments.train ...)')
  return _choose(workdir, hookpoints, hookpoint, 'hookpoint', 'hookpoint')


def exported_sae_dirs(
  workdir: str, hookpoint: str | None = None, variant: str | None = None
) -> tuple[str, dict[str, str]]:
  """The hookpoint (the only one unless named) and its exported seed folders {'seed0': path}, in seed order;
  for a run with variants, those of `variant` (which may be left out only when the run has one)."""
  hookpoint = exported_hookpoint(workdir, hookpoint)
  folder = storage.join(workdir, 'saes', hookpoint)
  names = exported_variants(workdir, hookpoint)
  if not names:
    if variant:
      raise ValueError(f'{workdir} has no variants; drop --variant={variant}')
    return hookpoint, _seed_folders(folder)
  return hookpoint, _seed_folders(storage.join(folder, _choose(workdir, names, variant, 'variant', 'variant')))


def read_config(workdir: str) -> dict[str, Any]:
  """The run's config.json as a dict; a missing or unreadable file is an error that says what to do."""
  path = storage.join(workdir, CONFIG)
  if not storage.isfile(path):
    raise FileNotFoundError(f'{workdir} is not a training run folder (no config.json); pass --workdir=RUN')
  try:
    return storage.read_json(path)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f'{path} is unreadable ({error}); restore it or use a new --workdir') from error


def prepare(workdir: str, config: TrainConfig, write: bool = True) -> None:
  """Creates the folder and writes config.json, or checks that an existing run has the same config.

  Every process of a multi-host run checks; only the one with `write` (process 0) creates and writes.
  """
  storage.check_reachable(workdir)
  if write:
    try:
      storage.makedirs(workdir)
    except OSError as error:
      raise ValueError(
        f'cannot create the run folder {workdir} ({error.strerror or error}); pass a --workdir you can write to'
      ) from error
  path = storage.join(workdir, CONFIG)
  if storage.exists(path):
    # Fields newer than the saved run read as their defaults (they did not exist, so they did not change it).
    saved = {**json.loads(json.dumps(TrainConfig().to_json())), **read_config(workdir)}
    differences = [
      f'{name}: {saved.get(name)!r} -> {value!r}'
      for name, value in json.loads(json.dumps(config.to_json())).items()
      if name not in RESUMABLE_FIELDS and saved.get(name) != value
    ]
    if differences:
      raise ValueError(
        f'{workdir} holds a run with a different config ({"; ".join(differences[:4])}); '
        f'rerun with its original flags to resume, or use a new --workdir'
      )
  if write:
    storage.write_json(path, config.to_json())


# Per-seed metrics that get a mean and standard deviation across seeds wherever they are reported.
SEED_METRICS = ('fvu', 'l0', 'dead_fraction', 'ce_increase', 'kl')


def per_seed_metrics(section: dict[str, Any]) -> list[dict[str, float]]:
  """One hookpoint's summary section as one row per seed: held-out LM numbers where the run has them (CE, KL,
  FVU, L0, dead fraction on text no run trained on), else the last logged training step's."""
  held_out = (section.get('lm_eval') or {}).get('seeds')
  if held_out:
    return [{name: row[name] for name in SEED_METRICS if name in row} for row in held_out]
  final = section.get('final') or {}
  lists = {name: final[name] for name in SEED_METRICS if isinstance(final.get(name), list)}
  num_seeds = max((len(values) for values in lists.values()), default=0)
  return [{name: float(values[i]) for name, values in lists.items()} for i in range(num_seeds)]


def sections(summary: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, Any]]:
  """{(variant, hookpoint): results}: every block of a summary ('' for a run without variants, None for its
  only hookpoint)."""
  out = {}
  for variant, block in (summary.get('variants') or {'': summary}).items():
    for hookpoint, section in (block.get('hookpoints') or {None: block}).items():
      out[variant, hookpoint] = section
  return out


def seed_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """(header, rows) of a finished run's per-seed results: one row per variant, hookpoint and seed, with the
  held-out LM numbers or the last training step's, and the recovered fraction of a synthetic run."""
  blocks = sections(summary)
  variant_column = any(variant for variant, _ in blocks)
  hookpoint_column = any(hookpoint is not None for _, hookpoint in blocks)
  names = [name for name in SEED_METRICS if any(name in row for s in blocks.values() for row in per_seed_metrics(s))]
  recovery = any('recovery' in section for section in blocks.values())
  header = [
    *(['variant'] if variant_column else []),
    *(['hookpoint'] if hookpoint_column else []),
    'seed',
    *names,
    *(['recovered'] if recovery else []),
  ]
  rows = []
  for (variant, hookpoint), section in blocks.items():
    recovered = [r.get('recovered_fraction') for r in (section.get('recovery') or {}).get('seeds', [])]
    where = [*([variant] if variant_column else []), *([hookpoint] if hookpoint_column else [])]
    for i, (seed, metrics) in enumerate(zip(summary.get('seeds', []), per_seed_metrics(section))):
      row = [*where, seed, *(metrics.get(name) for name in names)]
      rows.append(row + ([recovered[i] if i < len(recovered) else None] if recovery else []))
  return header, rows


def seed_stats(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
  """{metric: {'mean', 'std'}} across seeds (population std; 0 for one seed) for every SEED_METRICS key present."""
  stats = {}
  for name in SEED_METRICS:
    values = [float(row[name]) for row in rows if row.get(name) is not None]
    if values:
      mean = sum(values) / len(values)
      std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
      stats[name] = {'mean': mean, 'std': std}
  return stats


def read_seed_stats(
  workdir: str, hookpoint: str | None = None, variant: str | None = None
) -> dict[str, dict[str, float]] | None:
  """The finished run's seed statistics for one hookpoint and variant (None when there is no summary.json yet)."""
  path = storage.join(workdir, SUMMARY)
  if not storage.isfile(path):
    return None
  summary = storage.read_json(path)
  block = summary.get('variants', {}).get(variant, summary) if variant else summary
  section = block.get('hookpoints', {}).get(hookpoint, block) if hookpoint else block
  return section.get('seed_stats') or seed_stats(per_seed_metrics(section))


class MetricsLog:
  """Appends JSON lines to DIR/metrics.jsonl; on resume drops lines past the restored step."""

  def __init__(self, workdir: str):
    self.path = storage.join(workdir, METRICS)

  def truncate_after(self, step: int) -> None:
    """Keeps lines with step <= `step`, so a resumed run's log reads like an uninterrupted one."""
    if not storage.exists(self.path):
      return
    kept = []
    for line in storage.read_text(self.path).splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a kill mid-write
      if record.get('step', 0) <= step:
        kept.append(line + '\n')
    storage.write_text(self.path, ''.join(kept))

  def append(self, record: dict[str, Any]) -> None:
    storage.append_lines(self.path, [json.dumps(record)])

  def read(self) -> list[dict[str, Any]]:
    if not storage.exists(self.path):
      return []
    return [json.loads(line) for line in storage.read_text(self.path).splitlines() if line.strip()]
