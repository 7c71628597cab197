"""The smollm2 suite's outputs: plan.json (and the check that a folder keeps its plan), claims.json, summary.json
and report.md, with the claims table, the paper's numbers beside the measured ones, and every run's metrics."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import platform
from importlib import metadata
from typing import Any

import numpy as np

from saejax import storage
from saejax.analysis import report

VERDICTS = {True: 'HOLDS', False: 'DOES NOT HOLD', None: 'NOT TESTED'}
# The paper's value for each claim of the suite (Paulo & Belrose; Pythia-160M unless stated).
PAPER_CLAIMS = {
  'the matched-cosine distribution is bimodal': 'two modes (Fig. 1)',
  'frequently firing latents are shared more often': 'the most frequent are shared with all 8 (Fig. 3)',
  'unique-vs-seeds fits a power law with offset better than without': 'power law with offset (Fig. 2)',
  'longer training -> more sharing': 'rises with tokens (Fig. 4 right)',
  'more latents -> less sharing': 'falls with latents (Fig. 4 left)',
  'larger k -> less sharing': 'falls with k (Fig. 4 middle)',
  'an early layer shares less than a middle one': 'lower for the early layers (Fig. 5 left)',
  'sharing is about constant from the middle to the later layers': 'almost constant across the middle (Fig. 5 left)',
  'ReLU+L1 and Gated are more stable than TopK at matched L0': 'ReLU+L1, Gated > TopK on GPT-2 (Fig. 5 right)',
}
# (label, paper value, how to read it from the base alignment)
PAPER_NUMBERS = (
  ('shared fraction', 0.42, 'shared_fraction'),
  ('partner agreement', 0.79, 'partner_agreement'),
  ('mean matched cosine, decoder', 0.677, 'mean_cos_dec'),
  ('mean matched cosine, encoder', 0.594, 'mean_cos_enc'),
  ('PW-MCC (Song et al. 2025: TopK, Pythia-160M layer 8, 16K latents)', 0.80, 'pw_mcc'),
)
PAPER_UNIQUE_AT_9 = 0.35


def check_plan(out: str, plan) -> None:
  """Writes out/plan.json, or refuses a folder made with another plan (its runs would not be this plan's)."""
  path = storage.join(out, 'plan.json')
  wanted = dataclasses.asdict(plan)
  if storage.isfile(path):
    saved = storage.read_json(path)
    measured = [f.name for f in dataclasses.fields(plan) if not f.metadata.get('presentation')]
    changed = [name for name in measured if saved.get(name) != _jsonable(wanted[name])]
    if changed:
      raise ValueError(f'{out} holds the runs of another plan (differs in {", ".join(changed[:4])}); use a new --out')
    return
  storage.makedirs(out)
  storage.write_json(path, wanted)


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value


def universality_rows(path: str, seed: str) -> list[dict[str, str]]:
  with io.StringIO(storage.read_text(path)) as text:
    return [row for row in csv.DictReader(text) if row['seed'] == seed]


def versions() -> dict[str, str]:
  names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'scipy', 'gguf', 'tokenizers', 'lapjv')
  found = {'python': platform.python_version()}
  for name in names:
    with contextlib.suppress(metadata.PackageNotFoundError):
      found[name] = metadata.version(name)
  return found


def run_rows(suite) -> list[dict[str, Any]]:
  rows = []
  for name, run in suite.runs.items():
    alignment = run['alignment']
    pair = alignment['pairs'][0] if alignment else {}
    rows.append(
      {
        'run': name,
        'setting': run['setting'],
        'seeds': run['seeds'],
        'shared_fraction': pair.get('shared_fraction'),
        'pw_mcc': pair.get('pw_mcc'),
        'seed_stats': (alignment or {}).get('seed_stats') or run['train'].get('seed_stats') or {},
      }
    )
  return rows


def base_numbers(alignment: dict[str, Any]) -> list[list[Any]]:
  rows = []
  for label, paper, key in PAPER_NUMBERS:
    values = np.array([pair[key] for pair in alignment['pairs']], np.float64)
    rows.append([label, f'{values.mean():.4g} ± {values.std():.2g}', paper])
  unique = alignment['seeds']['unique_fraction_by_k']
  top = max(unique, key=int)
  rows.append([f'unique to the base SAE at {top} seeds (Fig. 2)', f'{unique[top]:.4g}', PAPER_UNIQUE_AT_9])
  return rows


def write(out: str, plan, suite, results) -> None:
  from experiments.benchmark import machine

  base = suite.runs['base']
  runs = run_rows(suite)
  summary = {
    'plan': dataclasses.asdict(plan),
    'machine': machine(),
    'versions': versions(),
    'timings_s': suite.timings.seconds,
    'wall_s': suite.timings.total,
    'claims': [{**dataclasses.asdict(c), 'paper': PAPER_CLAIMS.get(c.claim)} for c in results],
    'runs': runs,
    'base': {'pairs': len(base['alignment']['pairs']), 'stability': base['alignment']['seeds']['stability']},
  }
  storage.write_json(storage.join(out, 'claims.json'), summary['claims'], default=float)
  storage.write_json(storage.join(out, 'summary.json'), summary, default=float)
  storage.write_text(storage.join(out, 'report.md'), '\n'.join(_report_lines(summary, base)).rstrip() + '\n')


def _report_lines(summary: dict[str, Any], base: dict[str, Any]) -> list[str]:
  plan, box = summary['plan'], summary['machine']
  alignment = base['alignment']
  stats = [
    f'{report.SEED_STAT_NAMES.get(k, k)} {report.fmt(v["mean"])} ± {report.fmt(v["std"])}'
    for k, v in (alignment.get('seed_stats') or {}).items()
  ]
  lines = [
    "# The paper's claims on SmolLM2-135M",
    '',
    f'Plan `{plan["name"]}` (experiments/suite_smollm2.py). Machine: {box["cpu"]} ({box["cpu_count"]} cores), '
    f'{box["platform"]} backend; ' + ', '.join(f'{k} {v}' for k, v in summary['versions'].items()) + '.',
    f"Wall time of the suite's own stages: {summary['wall_s'] / 60:.1f} min (timings.json, summed over resumptions).",
    '',
    '## Claims',
    '',
    '| claim | measured | paper | verdict |',
    '|---|---|---|---|',
    *[f'| {c["claim"]} | {c["measured"]} | {c["paper"] or "—"} | {VERDICTS[c["holds"]]} |' for c in summary['claims']],
    '',
    f'## The base setting against the paper ({plan["num_seeds"]} seeds, {summary["base"]["pairs"]} pairs)',
    '',
    'Measured: mean ± std over every pair. Paper: Pythia-160M layers.6.mlp, 32K latents, k=32, 8B tokens.',
    '',
    *report.table(['metric', 'measured', 'paper'], base_numbers(alignment)),
    f'Per-seed metrics of the base run (held-out text): {"; ".join(stats) or "none"}.',
    '',
  ]
  stability = summary['base']['stability']
  lines += [
    '### Per-latent stability of the base run',
    '',
    f'The fraction of the other seeds in which a latent has a shared partner: mean {report.fmt(stability["mean"])}, '
    f'median {report.fmt(stability["median"])}.',
    '',
    *report.table(
      ['stability', 'fraction of latents'], list(zip(stability['values'], stability['fraction_of_latents']))
    ),
    'Fig. 1-3, A1, A2, the stability histogram, the exactly-in-n counts and the fits: '
    '[runs/base/alignment/report.md](runs/base/alignment/report.md).',
    '',
    '## Every run',
    '',
    'Shared fraction and PW-MCC: the seed0-seed1 pair. Metrics: mean ± std across seeds on held-out text.',
    '',
  ]
  names = list(report.SEED_STAT_NAMES)
  table = []
  for row in summary['runs']:
    cells = [
      f'{report.fmt(row["seed_stats"][n]["mean"])} ± {report.fmt(row["seed_stats"][n]["std"])}'
      if n in row['seed_stats']
      else None
      for n in names
    ]
    table.append([row['run'], row['setting'], row['seeds'], row['shared_fraction'], row['pw_mcc'], *cells])
  header = ['run', 'setting', 'seeds', 'shared', 'PW-MCC', *report.SEED_STAT_NAMES.values()]
  return lines + report.table(header, table)
