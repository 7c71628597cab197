"""The paper's section 5 from an alignment and the scores files: Fig. 6 (left and right), Table 1, report.md.

- Which latents: all of them, or a sample per alignment bin of the first seed's latents together with their
  matched partners in the second seed (so every sampled pair has scores on both sides).
- Fig. 6 left: detection scores grouped by the number of SAEs a latent is found in (1 + `n_shared` from
  `alignment/universality.csv`), every interpreted seed pooled.
- Fig. 6 right: seed-a vs seed-b scores of matched pairs, coloured by alignment (mean of the encoder and decoder
  matched cosines, from `alignment/pairs/<a>__<b>.npz`).
- Table 1: one pair per alignment bin, chosen as the paper does: above 0.7 the pair maximising both scores,
  below it the pair maximising seed a's score minus seed b's.

Figures are PNG (Agg, written atomically); `report.md` is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from saejax import storage
from saejax.analysis.figures import save_png_atomic

ALIGNMENT_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
SHARED_THRESHOLD = 0.7


def alignment_bin(cos: np.ndarray, edges: Sequence[float] = ALIGNMENT_EDGES) -> np.ndarray:
  """Bin index of every cosine (values below the first edge go to bin 0, the last bin is closed)."""
  return np.clip(np.digitize(np.asarray(cos, np.float64), edges[1:-1]), 0, len(edges) - 2)


def pair_alignment(alignment_dir: str, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
  """For every latent of seed `a`: its encoder-matched partner in `b` and the mean of its enc/dec cosines."""
  for first, second in ((a, b), (b, a)):
    path = storage.join(alignment_dir, 'pairs', f'{first}__{second}.npz')
    if storage.exists(path):
      break
  else:
    raise FileNotFoundError(f'no pair file for {a} and {b} in {alignment_dir}/pairs; run experiments.align first')
  pair = storage.read_npz(path)
  partner, cos = pair['enc_partner'].astype(np.int64), (pair['enc_cos'] + pair['dec_cos']) / 2
  side_a = second if bool(pair['swapped']) else first  # the side the arrays are indexed by
  n_b = int(pair['n_b'])
  if side_a == a:
    return partner, cos.astype(np.float64)
  partner_a, cos_a = np.full(n_b, -1, np.int64), np.full(n_b, np.nan)
  partner_a[partner], cos_a[partner] = np.arange(partner.size), cos
  return partner_a, cos_a


def sample_per_bin(cos: np.ndarray, per_bin: int, seed: int = 0) -> np.ndarray:
  """Up to `per_bin` latents drawn (without replacement, deterministically) from each alignment bin, sorted."""
  rng = np.random.default_rng(seed)
  valid = np.flatnonzero(np.isfinite(cos))
  bins = alignment_bin(cos[valid])
  chosen = [
    rng.choice(valid[bins == b], min(per_bin, int(np.sum(bins == b))), replace=False)
    for b in range(len(ALIGNMENT_EDGES) - 1)
  ]
  return np.sort(np.concatenate(chosen).astype(np.int64))


def read_universality(path: str) -> dict[str, dict[int, int]]:
  """seed -> latent -> number of SAEs it is found in (itself included)."""
  found: dict[str, dict[int, int]] = {}
  for row in csv.DictReader(io.StringIO(storage.read_text(path), newline='')):
    found.setdefault(row['seed'], {})[int(row['latent'])] = int(row['n_shared']) + 1
  return found


def score_table(records: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
  """latent -> its last record (a rerun may have appended a newer one)."""
  return {int(r['latent']): dict(r) for r in records}


def fig6_left(scores_by_count: Mapping[int, Sequence[float]], path: str) -> str:
  import matplotlib.pyplot as plt

  counts = sorted(scores_by_count)
  data = [np.asarray(scores_by_count[c], np.float64) for c in counts]
  fig, ax = plt.subplots(figsize=(6.0, 4.2))
  if counts:
    ax.boxplot(data, positions=range(len(counts)), widths=0.6, showmeans=True)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data):
      ax.scatter(i + rng.uniform(-0.2, 0.2, values.size), values, s=6, alpha=0.3, color='#1f77b4', linewidths=0)
    ax.set_xticks(range(len(counts)), [f'{c}\n(n={len(v)})' for c, v in zip(counts, data)])
  ax.set_xlabel('number of SAEs the latent is found in')
  ax.set_ylabel('detection score (balanced accuracy)')
  ax.set_ylim(-0.02, 1.02)
  ax.set_title('Fig. 6 (left): scores by sharing')
  return save_png_atomic(fig, path)


def fig6_right(score_a: np.ndarray, score_b: np.ndarray, cos: np.ndarray, labels: tuple[str, str], path: str) -> str:
  import matplotlib.pyplot as plt
  from matplotlib.colors import BoundaryNorm

  fig, ax = plt.subplots(figsize=(5.6, 4.8))
  norm = BoundaryNorm(ALIGNMENT_EDGES, 256)
  points = ax.scatter(score_a, score_b, c=cos, cmap='viridis', norm=norm, s=14, alpha=0.8, linewidths=0)
  fig.colorbar(points, ax=ax, label='alignment (mean enc/dec matched cosine)')
  ax.plot([0, 1], [0, 1], color='0.6', linewidth=0.8, linestyle='--')
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel(f'{labels[0]} score')
  ax.set_ylabel(f'{labels[1]} score')
  ax.set_title(f'Fig. 6 (right): matched pairs (n={len(score_a)})')
  return save_png_atomic(fig, path)


def matched_pairs(partner: np.ndarray, cos: np.ndarray, table_a: Mapping[int, dict], table_b: Mapping[int, dict]):
  """Rows (latent_a, latent_b, cos, record_a, record_b) of matched pairs with a score on both sides."""
  rows = []
  for latent_a, record_a in sorted(table_a.items()):
    if latent_a >= partner.size or partner[latent_a] < 0:
      continue
    record_b = table_b.get(int(partner[latent_a]))
    if record_b is None or record_a.get('score') is None or record_b.get('score') is None:
      continue
    rows.append((latent_a, int(partner[latent_a]), float(cos[latent_a]), record_a, record_b))
  return rows


def table1(rows: Sequence[tuple], labels: tuple[str, str]) -> list[dict[str, Any]]:
  """One pair per alignment bin: both scores high above the threshold, seed a high and seed b low below it."""
  picked = []
  bins = alignment_bin(np.array([row[2] for row in rows])) if rows else np.array([], int)
  for b in range(len(ALIGNMENT_EDGES) - 1):
    in_bin = [row for row, k in zip(rows, bins) if k == b]
    if not in_bin:
      continue

    def objective(row):
      sa, sb = row[3]['score'], row[4]['score']
      return sa + sb if row[2] > SHARED_THRESHOLD else sa - sb

    row = max(in_bin, key=objective)
    picked.append({'alignment': row[2], labels[0]: row[3], labels[1]: row[4]})
  return picked


def _cell(record: Mapping[str, Any]) -> str:
  text = (record.get('explanation') or '(none)').replace('|', '\\|')
  return f'{text} ({record["score"]:.2f}) [latent {record["latent"]}]'


def _stats(values: Sequence[float]) -> str:
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return 'n=0'
  q1, q2, q3 = np.percentile(v, [25, 50, 75])
  return f'n={v.size}, mean {v.mean():.3f}, quartiles {q1:.3f} / {q2:.3f} / {q3:.3f}'


def write_report(run: str, seeds: Sequence[str], tables: Mapping[str, Mapping[int, dict]], out: str) -> dict[str, Any]:
  """Fig. 6, Table 1 and report.md under `out` from the scores tables ({seed: {latent: record}})."""
  alignment = storage.join(run, 'alignment')
  found = read_universality(storage.join(alignment, 'universality.csv'))
  by_count: dict[int, list[float]] = {}
  lines = ['# Are orphan latents interpretable? (paper section 5)', '']
  for seed in seeds:
    scored = [r for r in tables.get(seed, {}).values() if r.get('score') is not None]
    lines.append(f'- {seed}: detection scores {_stats([r["score"] for r in scored])}')
    for record in scored:
      count = found.get(seed, {}).get(int(record['latent']))
      if count is not None:
        by_count.setdefault(count, []).append(float(record['score']))
  lines += ['', '## Scores by the number of SAEs a latent is found in', '', '| SAEs | scores |', '|---|---|']
  lines += [f'| {count} | {_stats(by_count[count])} |' for count in sorted(by_count)]
  made = {'fig6_left': storage.basename(fig6_left(by_count, storage.join(out, 'fig6_left_scores_by_sharing.png')))}
  picked = []
  if len(seeds) >= 2:
    a, b = seeds[0], seeds[1]
    partner, cos = pair_alignment(alignment, a, b)
    rows = matched_pairs(partner, cos, tables.get(a, {}), tables.get(b, {}))
    made['fig6_right'] = storage.basename(
      fig6_right(
        np.array([r[3]['score'] for r in rows]),
        np.array([r[4]['score'] for r in rows]),
        np.array([r[2] for r in rows]),
        (a, b),
        storage.join(out, 'fig6_right_matched_scores.png'),
      )
    )
    picked = table1(rows, (a, b))
    lines += [
      '',
      f'## Table 1: example pairs {a} / {b} per alignment bin',
      '',
      f'| alignment | {a} | {b} |',
      '|---|---|---|',
    ]
    lines += [f'| {p["alignment"]:.2f} | {_cell(p[a])} | {_cell(p[b])} |' for p in picked]
    lines += ['', f'{len(rows)} matched pairs scored on both sides.']
  lines += ['', '## Figures', '']
  lines += [f'![{name}]({file})' for name, file in made.items()]
  storage.write_text(storage.join(out, 'report.md'), '\n'.join(lines) + '\n')
  return {'figures': made, 'table1': picked, 'by_count': {str(k): len(v) for k, v in by_count.items()}}
