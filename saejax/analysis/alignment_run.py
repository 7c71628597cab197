"""One alignment run end to end: load SAEs, match every pair, write summary.json, pair files, figures, report.

Everything is written into a staging folder and published at the end (`storage.staged_dir`: a rename on disk,
an upload with summary.json last on gs://), so a failed or interrupted run never leaves a half-written output
folder, and on disk never destroys an earlier complete one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from saejax import formats, storage
from saejax.analysis import figures, fits, ground_truth, report
from saejax.analysis.seeds import SeedsResult, analyse_seeds, stability_distribution


class AlignmentInputError(ValueError):
  """The SAEs given cannot be aligned; the message says why and what to do."""


def load_saes(sae_dirs: Mapping[str, str]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
  """Loads every folder (EleutherAI or SAELens layout) and checks they can be compared."""
  if len(sae_dirs) < 2:
    raise AlignmentInputError(f'need at least 2 SAEs to align, got {len(sae_dirs)}; pass more --saes folders')
  saes, cfgs = {}, {}
  for name, folder in sae_dirs.items():
    params, cfg = formats.load_sae(folder)
    saes[name] = {'W_enc': params['W_enc'], 'W_dec': params['W_dec']}
    cfgs[name] = cfg
  widths = {name: cfg['d_in'] for name, cfg in cfgs.items()}
  if len(set(widths.values())) > 1:
    raise AlignmentInputError(f'SAEs have different d_in {widths}; only SAEs of the same hookpoint width align')
  return saes, cfgs


def _cos_for_side(result: SeedsResult, base: str, other: str) -> np.ndarray:
  """Per latent of `base`: mean of its encoder and decoder matched cosines with `other` (shared or not)."""
  key = (base, other) if (base, other) in result.pairs else (other, base)
  pair = result.pairs[key]
  base_is_a = (key[0] == base) != pair.swapped
  matched = (pair.enc_cos + pair.dec_cos) / 2
  if base_is_a:
    return matched
  per_base = np.full(int(pair.summary['n_b']), np.nan, np.float32)
  per_base[pair.enc_partner] = matched
  return per_base


def mean_matched_cos(result: SeedsResult, base: str) -> np.ndarray:
  others = [name for name in result.names if name != base]
  return np.nanmean(np.stack([_cos_for_side(result, base, other) for other in others]), axis=0)


def _summary(result: SeedsResult, method: str) -> dict[str, Any]:
  pairs = [{'a': a, 'b': b, **pair.summary} for (a, b), pair in result.pairs.items()]
  k_values = sorted(result.unique_fraction_by_k)
  curve_fits = fits.fit_unique_fraction(k_values, [result.unique_fraction_by_k[k] for k in k_values])
  seeds = {
    'names': result.names,
    'rule': result.rule,
    'unique_fraction_by_k': {str(k): result.unique_fraction_by_k[k] for k in k_values},
    'exactly_in_n': result.exactly_in_n,
    'subsets_by_k': {str(k): v for k, v in result.subsets_by_k.items()},
    'fits': curve_fits,
    'stability': stability_distribution(result.masks, result.names),
  }
  return {'threshold': result.threshold, 'method': method, 'pairs': pairs, 'seeds': seeds}


def _figures(out: str, result: SeedsResult, summary: dict, firing: Mapping[str, np.ndarray] | None) -> dict[str, str]:
  first = result.pairs[next(iter(result.pairs))]
  made = {
    'fig1': figures.fig1_cosine_scatter(
      first.enc_cos,
      first.dec_cos,
      first.enc_partner == first.dec_partner,
      os.path.join(out, 'fig1_cosines.png'),
      threshold=result.threshold,
    ),
    'figA1': figures.figA1_threshold_sweep(
      [{'label': f'{a} vs {b}', **pair.summary['threshold_sweep']} for (a, b), pair in result.pairs.items()],
      os.path.join(out, 'figA1_threshold_sweep.png'),
    ),
    'figA2': figures.figA2_hungarian_vs_max(first.dec_cos, first.dec_max_cos, os.path.join(out, 'figA2_max_cos.png')),
  }
  made['stability'] = figures.fig_stability(summary['seeds']['stability'], os.path.join(out, 'stability.png'))
  if len(result.names) >= 3:
    made['fig2'] = figures.fig2_unique_vs_seeds(
      {int(k): v for k, v in summary['seeds']['unique_fraction_by_k'].items()},
      summary['seeds']['fits'],
      os.path.join(out, 'fig2_unique_vs_seeds.png'),
    )
  if firing is not None:
    base = result.names[0]
    frequency = firing['counts'][list(firing['seeds']).index(base)] / float(firing['tokens'])
    n_shared = 1 + np.array([bin(int(m)).count('1') for m in result.masks[base]])
    made['fig3'] = figures.fig3_frequency(
      frequency, mean_matched_cos(result, base), n_shared, os.path.join(out, 'fig3_frequency.png')
    )
  return made


def run_alignment(
  sae_dirs: Mapping[str, str],
  out_dir: str,
  threshold: float = 0.7,
  method: str = 'auto',
  workers: int | None = None,
  firing: Mapping[str, np.ndarray] | None = None,
  true_features: np.ndarray | None = None,
  seed_stats: Mapping[str, Mapping[str, float]] | None = None,
  figures: bool = True,
) -> dict[str, Any]:
  """Aligns all pairs of `sae_dirs` ({name: folder}) and writes the full output folder `out_dir`.

  figures: False skips the PNGs (summary.json `figures` is then empty and the report embeds none); a figure
  costs about half a second to draw, which adds up over a suite's many small alignments.

  seed_stats: the training run's {metric: {mean, std}} across seeds (run_folder.seed_stats), copied into
  summary.json and the report beside the shared fractions.
  true_features: [F, D], the true dictionary of a synthetic run; adds each seed's ground-truth recovery split
  into shared and orphan latents (summary.json `seeds.ground_truth_recovery`, and the report).
  """
  saes, _ = load_saes(sae_dirs)
  if true_features is not None:
    ground_truth.check_shapes(true_features, next(iter(saes.values()))['W_dec'])
  result = analyse_seeds(saes, threshold=threshold, method=method, workers=workers)
  summary = _summary(result, method)
  if seed_stats:
    summary['seed_stats'] = dict(seed_stats)
  if true_features is not None:
    summary['seeds']['ground_truth_recovery'] = ground_truth.recovery_by_sharing(
      true_features, {name: sae['W_dec'] for name, sae in saes.items()}, result.masks
    )
  # summary.json marks a complete alignment: it is published last (sweeps wait for it).
  with storage.staged_dir(out_dir, complete_marker='summary.json') as staging:
    os.makedirs(os.path.join(staging, 'pairs'))
    for (a, b), pair in result.pairs.items():
      pair.to_npz(os.path.join(staging, 'pairs', f'{a}__{b}.npz'))
    result.write_universality_csv(os.path.join(staging, 'universality.csv'))
    made = _figures(staging, result, summary, firing) if figures else {}
    summary['figures'] = {name: os.path.basename(path) for name, path in made.items()}
    storage.write_json(os.path.join(staging, 'summary.json'), summary)
    report.write_report(staging, summary, summary['figures'])
  return summary
