"""Collect the alignments of a sweep's runs into the paper's Fig. 4, Fig. 5 and Fig. A3.

  python -m experiments.figures --root=runs --out=figures/

Reads `ROOT/<sweep>/<run>/config.json` and `ROOT/<sweep>/<run>/alignment/summary.json` for every sweep of
`experiments.sweep` that has results, writes one PNG per figure and `figures.json` with the plotted numbers.
A sweep trained as one run (`experiments.sweep --one-step`) is read from `ROOT/<sweep>/one_step/`, each of its
runs from `alignment/<variant>/summary.json`; a separate run of the same setting takes precedence.
Runs without an alignment yet are listed as missing, not plotted.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.ablations import ONE_STEP, SWEEPS, variant_names  # noqa: E402
from experiments.cli import parse_flags
from saejax import storage, variants  # noqa: E402
from saejax.analysis.figures import save_png_atomic  # noqa: E402
from saejax.analysis.pairs import SUMMARY_KEYS  # noqa: E402
from saejax.config import TrainConfig  # noqa: E402

_ROOT = flags.DEFINE_string('root', 'runs', 'The --root the sweeps ran under.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (default ROOT/figures).')

# The numeric per-pair keys of an alignment's summary.json, each averaged over the run's pairs.
AVERAGED_KEYS = SUMMARY_KEYS[: SUMMARY_KEYS.index('mean_max_cos_dec') + 1]


def collect(root: str) -> tuple[dict[str, list[dict]], list[str]]:
  """{sweep: [{run, field, value, shared_fraction, mean_cos_enc, ...}, ...]} and the runs still missing."""
  results, missing = {}, []
  for sweep, runs in SWEEPS.items():
    rows = []
    one_step = f'{root.rstrip("/")}/{sweep}/{ONE_STEP}'
    names = variant_names(runs) if len(runs) > 1 else [''] * len(runs)
    for run, variant in zip(runs, names):
      workdir = run.workdir(root, sweep)
      found = _aligned(workdir, None) or (_aligned(one_step, variant) if variant else None)
      if found is None:
        missing += [path for path in (workdir, one_step) if storage.exists(path)][:1]
        continue
      config, pairs = found
      row = {'run': run.name, 'field': run.varied, 'value': getattr(config, run.varied), 'pairs': len(pairs)}
      for key in AVERAGED_KEYS:
        row[key] = float(np.mean([p[key] for p in pairs]))
      rows.append(row)
    if rows:
      results[sweep] = rows
  return results, sorted(set(missing))


def _aligned(workdir: str, variant: str | None) -> tuple[TrainConfig, list[dict]] | None:
  """(the config that trained it, its alignment's pairs) of a run, or of one variant of a one-step run."""
  summary_path = storage.join(workdir, 'alignment', *([variant] if variant else []), 'summary.json')
  if not storage.exists(summary_path):
    return None
  config = variants.config_of(TrainConfig.from_json(storage.read_json(storage.join(workdir, 'config.json'))), variant)
  return config, storage.read_json(summary_path)['pairs']


def _line(ax, rows, key, label=None, **style):
  rows = sorted(rows, key=lambda r: r['value'])
  ax.plot([r['value'] for r in rows], [r[key] for r in rows], marker='o', label=label, **style)


def _bars(ax, rows, key='shared_fraction'):
  ax.bar([r['run'] for r in rows], [r[key] for r in rows], color='tab:blue')
  ax.tick_params(axis='x', rotation=30)


def plot_fig4(results, path) -> str | None:
  sweeps = [s for s in ('fig4_latents', 'fig4_k', 'fig4_tokens') if s in results]
  if not sweeps:
    return None
  fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.6), squeeze=False)
  for ax, sweep in zip(axes[0], sweeps):
    _line(ax, results[sweep], 'shared_fraction')
    ax.set_xscale('log')
    ax.set_xlabel(results[sweep][0]['field'])
    ax.set_ylabel('fraction of shared latents')
  fig.tight_layout()
  return save_png_atomic(fig, path)


def plot_fig5(results, path) -> str | None:
  panels = [s for s in ('fig5_layers', 'fig5_models', 'fig5_arch') if s in results]
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
  for ax, sweep in zip(axes[0], panels):
    if sweep == 'fig5_layers':
      for size in sorted({r['run'].split('_')[0] for r in results[sweep]}):
        rows = [{**r, 'value': int(r['value'].split('.')[1])} for r in results[sweep] if r['run'].startswith(size)]
        _line(ax, rows, 'shared_fraction', label=size)
      ax.set_xlabel('layer')
      ax.legend()
    else:
      _bars(ax, results[sweep])
    ax.set_ylabel('fraction of shared latents')
  fig.tight_layout()
  return save_png_atomic(fig, path)


def plot_figA3(results, path) -> str | None:
  sweeps = [s for s in ('fig4_latents', 'fig4_k', 'fig4_tokens') if s in results]
  if not sweeps:
    return None
  fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.6), squeeze=False)
  for ax, sweep in zip(axes[0], sweeps):
    for key, label in (
      ('mean_cos_dec', 'matched (decoder)'),
      ('mean_max_cos_dec', 'max (decoder)'),
      ('mean_cos_enc', 'matched (encoder)'),
      ('mean_max_cos_enc', 'max (encoder)'),
    ):
      _line(ax, results[sweep], key, label=label)
    ax.set_xscale('log')
    ax.set_xlabel(results[sweep][0]['field'])
    ax.set_ylabel('mean cosine similarity')
    ax.legend(fontsize=7)
  fig.tight_layout()
  return save_png_atomic(fig, path)


def main(argv: list[str]) -> None:
  del argv
  root = _ROOT.value
  out = _OUT.value or storage.join(root, 'figures')
  results, missing = collect(root)
  if not results:
    print(f'error: no aligned sweep runs under {root!r}; run python -m experiments.sweep first', file=sys.stderr)
    sys.exit(2)
  made = {
    name: fn(results, storage.join(out, f'{name}.png'))
    for name, fn in (('fig4', plot_fig4), ('fig5', plot_fig5), ('figA3', plot_figA3))
  }
  storage.write_json(
    storage.join(out, 'figures.json'),
    {'results': results, 'missing': missing, 'figures': {k: v for k, v in made.items() if v}},
  )
  print(json.dumps({'figures': [v for v in made.values() if v], 'missing_runs': missing}))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
