"""The Markdown report of an analysis run: the per-pair table, the multi-seed numbers and the embedded figures.

This module owns `report.md`'s layout and number formatting (4 significant digits). It reads plain dicts (the
pair summaries of pairs.py, the seed statistics of seeds.py, the Fig. 2 fits of fits.py) and the figure paths
from figures.py; it computes nothing beyond a mean and a percentage. The file is written atomically
(through saejax.storage, so the folder may be on gs://).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from saejax import storage
from saejax.analysis.figures import fit_entries
from saejax.analysis.pairs import SUMMARY_KEYS

# The pair table: both names, then the per-pair keys of summary.json up to `certified_optimal`.
PAIR_COLUMNS = ('a', 'b', *SUMMARY_KEYS[: SUMMARY_KEYS.index('certified_optimal') + 1])
FIT_FORMULAS = {
  'power_law_offset': 'a·k^b + c',
  'power_law': 'a·k^b',
  'exponential_offset': 'a·exp(−b·k) + c',
}
# Figure key (or file name) prefix -> (title, one-line caption).
CAPTIONS = {
  '1': (
    'Fig. 1',
    'Encoder vs decoder matched cosine of every latent of one pair, coloured by whether the encoder '
    'and decoder matchings pick the same partner, with KDE density contours and the threshold lines.',
  ),
  '2': (
    'Fig. 2',
    "Fraction of a base SAE's latents found in no other SAE vs the number of SAEs k (mean over "
    'bases and subsets), with the fitted power laws and exponential.',
  ),
  '3': (
    'Fig. 3',
    'Firing frequency of each base latent vs its mean matched cosine over the other seeds, coloured '
    'by how many other seeds share it.',
  ),
  'a1': (
    'Fig. A1',
    'Fraction of shared latents vs the cosine threshold: paper rule (same partner in both '
    'matchings) solid, notebook rule (both cosines only) dashed.',
  ),
  'stability': (
    'Stability',
    'Distribution of per-latent stability (not in the paper): the fraction of the other seeds in which a '
    'latent has a shared partner, pooled over every seed.',
  ),
  'a2': (
    'Fig. A2',
    'Distribution of the Hungarian matched cosine vs the max cosine (not a bijection), and of their gap per latent.',
  ),
}


def write_report(out_dir, summary: Mapping[str, Any], figures: Mapping[str, str]) -> str:
  """Writes `out_dir/report.md` atomically and returns its path.

  summary: {'title'?: str, 'pairs': [{'a', 'b', 'shared_fraction', ...PAIR_COLUMNS}], 'seeds'?: {
  'unique_fraction_by_k': {k: frac}, 'exactly_in_n': {base: [count in exactly 1, 2, ... SAEs]}, 'fits': {...}}}.
  The fits may also come in fits.py's layout ({'models': {...}, 'best'}; figures.fit_entries).
  figures: {name: png path}, in the order to embed; a relative path is taken as relative to out_dir when it
  exists there or nowhere (a bare file name beside report.md), else as relative to the working directory.
  """
  out_dir = os.fspath(out_dir)
  storage.makedirs(out_dir)
  lines = [f'# {summary.get("title", "Seed dependence of SAE latents")}', '']
  lines += _pairs_section(summary.get('pairs') or [])
  if summary.get('seed_stats'):
    lines += seed_stats_section(summary['seed_stats'])
  if summary.get('seeds'):
    lines += _seeds_section(summary['seeds'])
  if figures:
    lines += ['## Figures', '']
    for name, fig_path in figures.items():
      title, caption = figure_caption(name, fig_path)
      rel = _link(os.fspath(fig_path), out_dir)
      lines += [f'![{title}]({rel})', '', f'*{title}.* {caption}', '']
  return storage.write_text(storage.join(out_dir, 'report.md'), '\n'.join(lines).rstrip() + '\n')


def figure_caption(name: str, fig_path: str = '') -> tuple[str, str]:
  """(title, caption) for a figure keyed like 'fig1' / 'figA2' (or so named on disk); a generic one otherwise."""
  if name in CAPTIONS:
    return CAPTIONS[name]
  for candidate in (name, os.path.basename(os.fspath(fig_path))):
    match = re.match(r'fig(?:ure)?[_ .-]?(a?\d+)(?!\d)', str(candidate).lower())
    if match and match.group(1) in CAPTIONS:
      return CAPTIONS[match.group(1)]
  return str(name), f'Figure {name}.'


def fmt(value: Any) -> str:
  """A table cell: 4 significant digits for floats, yes/no for booleans, '—' for None."""
  if value is None:
    return '—'
  if isinstance(value, bool | np.bool_):
    return 'yes' if value else 'no'
  if isinstance(value, int | np.integer):
    return str(int(value))
  if isinstance(value, float | np.floating):
    return f'{float(value):.4g}'
  return str(value).replace('|', '\\|').replace('\n', ' ')


def _link(fig_path: str, out_dir: str) -> str:
  """The path of the figure relative to out_dir, with '/' separators (see write_report's docstring)."""
  beside = not os.path.isabs(fig_path) and (
    os.path.exists(os.path.join(out_dir, fig_path)) or not os.path.exists(fig_path)
  )
  rel = fig_path if beside else os.path.relpath(os.path.abspath(fig_path), os.path.abspath(out_dir))
  return rel.replace(os.sep, '/')


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(fmt(cell) for cell in row) + ' |' for row in rows]
  return lines + ['']


def _pairs_section(pairs: list[Mapping[str, Any]]) -> list[str]:
  lines = ['## Pairs', '']
  if not pairs:
    return lines + ['No pairs.', '']
  threshold = pairs[0].get('threshold')
  rule = 'a latent is shared when its encoder and decoder matchings pick the same partner and both cosines are'
  lines += [
    f'Paper rule: {rule} >= {fmt(threshold) if threshold is not None else "the threshold"}; the notebook '
    'rule drops the same-partner condition. Cosines are of Hungarian-matched latents, max cosines of the '
    'nearest latent (not a bijection).',
    '',
  ]
  lines += table(list(PAIR_COLUMNS), [[pair.get(col) for col in PAIR_COLUMNS] for pair in pairs])
  fractions = np.array([p['shared_fraction'] for p in pairs if p.get('shared_fraction') is not None], np.float64)
  if fractions.size > 1:
    lines += [
      f'Shared fraction over {fractions.size} pairs: mean {fmt(fractions.mean())}, std '
      f'{fmt(fractions.std())}, range {fmt(fractions.min())}–{fmt(fractions.max())}.',
      '',
    ]
  return lines


def _seeds_section(seeds: Mapping[str, Any]) -> list[str]:
  lines = ['## Seeds', '']
  if seeds.get('names'):
    lines += [
      f'{len(seeds["names"])} SAEs: {", ".join(map(str, seeds["names"]))}.'
      + (f' Rule: {seeds["rule"]}.' if seeds.get('rule') else ''),
      '',
    ]
  curve = seeds.get('unique_fraction_by_k') or {}
  if curve:
    lines += ['### Latents found only in the base SAE (Fig. 2)', '']
    lines += table(['k', 'unique fraction'], [[int(k), float(v)] for k, v in sorted(curve.items(), key=_int_key)])
  exactly = seeds.get('exactly_in_n') or {}
  if exactly:
    width = max(len(counts) for counts in exactly.values())
    lines += ['### Latents in exactly n SAEs (base included)', '']
    rows = []
    for base, counts in exactly.items():
      total = sum(counts)
      cells = [f'{int(c)} ({100 * c / total:.3g}%)' if total else str(int(c)) for c in counts]
      rows.append([str(base)] + cells + [''] * (width - len(counts)))
    lines += table(['base'] + [f'n={n}' for n in range(1, width + 1)], rows)
  if seeds.get('stability'):
    lines += _stability_section(seeds['stability'])
  models, best = fit_entries(seeds.get('fits'))
  if models:
    lines += ['### Fits of the unique fraction vs k', '']
    rows = []
    for name, fit in models:
      params = ', '.join(f'{p}={fmt(v)}' for p, v in (fit.get('params') or {}).items())
      label = f'**{name}** (best)' if name == best else name
      rows.append(
        [label, FIT_FORMULAS.get(name, '?'), params or None, fit.get('aic'), fit.get('asymptote'), fit.get('error')]
      )
    lines += table(['model', 'formula', 'params', 'AIC', 'asymptote', 'error'], rows)
  if seeds.get('ground_truth_recovery'):
    lines += ground_truth_section(seeds['ground_truth_recovery'])
  return lines


SEED_STAT_NAMES = {
  'fvu': 'FVU',
  'l0': 'L0',
  'dead_fraction': 'dead fraction',
  'ce_increase': 'CE increase (nats)',
  'kl': 'KL (nats)',
}


def seed_stats_section(stats: Mapping[str, Mapping[str, float]]) -> list[str]:
  """Mean ± standard deviation across seeds of each per-seed metric (held-out text where the run has it)."""
  rows = [[SEED_STAT_NAMES.get(name, name), f'{fmt(s["mean"])} ± {fmt(s["std"])}'] for name, s in stats.items()]
  return ['## Per-seed metrics (mean ± std across seeds)', '', *table(['metric', 'mean ± std'], rows)]


def _stability_section(distribution: Mapping[str, Any]) -> list[str]:
  lines = [
    '### Per-latent stability',
    '',
    'Stability of a latent: the fraction of the other seeds in which it has a shared partner (not in the '
    f'paper). Mean {fmt(distribution["mean"])}, median {fmt(distribution["median"])}, over every latent of every seed.',
    '',
  ]
  rows = [[value, fraction] for value, fraction in zip(distribution['values'], distribution['fraction_of_latents'])]
  return lines + table(['stability', 'fraction of latents'], rows)


GROUND_TRUTH_COLUMNS = {
  'shared_latents': 'shared latents',
  'orphan_latents': 'orphans',
  'mean_best_cos_shared': 'best cos, shared',
  'mean_best_cos_orphan': 'best cos, orphans',
  'true_fraction_shared': 'shared that are true features',
  'true_fraction_orphan': 'orphans that are true features',
  'features_recovered': 'features recovered',
  'features_recovered_by_shared': 'by a shared latent',
  'features_recovered_only_by_orphans': 'only by orphans',
}


def ground_truth_section(recovery: Mapping[str, Any]) -> list[str]:
  """The per-seed table of saejax.analysis.ground_truth.recovery_by_sharing."""
  threshold = fmt(recovery['threshold'])
  lines = [
    '### Ground-truth recovery, shared vs orphan latents',
    '',
    f'Synthetic data: {recovery["num_features"]} true features. Shared: shared with at least one other seed. '
    f'"Best cos" is a latent\'s best decoder cosine to any true feature; a latent *is* a true feature, and a '
    f'feature is *recovered*, at cosine >= {threshold}.',
    '',
  ]
  rows = [[name, *(row[key] for key in GROUND_TRUTH_COLUMNS)] for name, row in recovery['per_seed'].items()]
  return lines + table(['seed', *GROUND_TRUTH_COLUMNS.values()], rows)


def _int_key(item) -> int:
  return int(item[0])
