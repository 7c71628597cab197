"""The paper's figures as pure plotting functions: Fig. 1, 2, 3, A1 and A2 from numpy arrays and plain dicts.

This module owns how the analysis results are drawn, and the atomic PNG write. It computes nothing the analysis
modules (pairs.py, seeds.py) report, apart from what a plot needs (densities, histograms, curve evaluations).
Every function saves one PNG to `path` atomically (through saejax.storage) and returns `path`.
Inputs may hold NaNs (dropped) and may be degenerate (empty, one latent, all equal): the figure is still written.
Headless: the Agg backend is selected at import.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402
from scipy.stats import gaussian_kde  # noqa: E402

from saejax import storage  # noqa: E402

AGREE_COLOR = '#1f77b4'  # blue: encoder and decoder partners agree (paper Fig. 1)
DISAGREE_COLOR = '#ff7f0e'  # orange: they disagree
CONTOUR_COLORS = {AGREE_COLOR: '#0b2e59', DISAGREE_COLOR: '#8c3a00'}  # darker, to stand out on the points
MAX_KDE_POINTS = 5000
MAX_SCATTER_POINTS = 100_000
DPI = 150
POINTS = {'linewidths': 0, 'rasterized': True}  # scatter style: no edges, rasterised
# Fig. 2's models: name -> (function of k and the params dict, mathtext label, parameter names).
FIT_MODELS = {
  'power_law_offset': (lambda k, p: p['a'] * k ** p['b'] + p['c'], r'$a\,k^{b} + c$', 'abc'),
  'power_law': (lambda k, p: p['a'] * k ** p['b'], r'$a\,k^{b}$', 'ab'),
  'exponential_offset': (lambda k, p: p['a'] * np.exp(-p['b'] * k) + p['c'], r'$a\,e^{-bk} + c$', 'abc'),
}
FIT_ALIASES = {'power_offset': 'power_law_offset', 'power': 'power_law', 'exp_offset': 'exponential_offset'}  # fits.py


def save_png_atomic(fig, path) -> str:
  """Saves `fig` as PNG to `path` atomically (saejax.storage, so gs:// works too); closes it. Returns `path`."""
  buffer = io.BytesIO()
  try:
    fig.savefig(buffer, format='png', dpi=DPI, bbox_inches='tight')
  finally:
    plt.close(fig)
  return storage.write_bytes(path, buffer.getvalue())


def fig1_cosine_scatter(enc_cos, dec_cos, partners_agree, path, threshold: float = 0.7) -> str:
  """Fig. 1: matched encoder vs decoder cosine of each latent of a pair, coloured by partner agreement.

  enc_cos, dec_cos: [F] matched cosines (Hungarian) of side 'a'; partners_agree: [F] bool, enc_partner ==
  dec_partner. Points in the upper-right quadrant of the threshold lines with agreeing partners are shared.
  """
  enc_F, dec_F = np.asarray(enc_cos, np.float64).ravel(), np.asarray(dec_cos, np.float64).ravel()
  agree_F = np.asarray(partners_agree, bool).ravel()
  if not enc_F.shape == dec_F.shape == agree_F.shape:
    raise ValueError(f'shapes differ: enc {enc_F.shape}, dec {dec_F.shape}, agree {agree_F.shape}')
  keep_F = np.isfinite(enc_F) & np.isfinite(dec_F)
  enc_F, dec_F, agree_F = enc_F[keep_F], dec_F[keep_F], agree_F[keep_F]
  shared_F = agree_F & (enc_F >= threshold) & (dec_F >= threshold)
  lo = min(0.0, float(np.min(enc_F, initial=0.0)), float(np.min(dec_F, initial=0.0))) - 0.03
  hi = max(1.0, float(np.max(enc_F, initial=1.0)), float(np.max(dec_F, initial=1.0))) + 0.03

  fig, ax = plt.subplots(figsize=(6.4, 6.0))
  rng = np.random.default_rng(0)
  for mask_F, color, name in ((agree_F, AGREE_COLOR, 'same partner'), (~agree_F, DISAGREE_COLOR, 'different partner')):
    x_N, y_N = _subsample(rng, MAX_SCATTER_POINTS, enc_F[mask_F], dec_F[mask_F])
    mean = f', mean cos {np.mean((enc_F[mask_F] + dec_F[mask_F]) / 2):.2f}' if mask_F.any() else ''
    label = f'{name} (n={int(mask_F.sum())}{mean})'
    ax.scatter(x_N, y_N, s=_marker_size(enc_F.size), c=color, alpha=0.35, label=label, **POINTS)
    _kde_contours(ax, rng, enc_F[mask_F], dec_F[mask_F], CONTOUR_COLORS[color], (lo, hi))
  ax.axvline(threshold, color='0.3', ls='--', lw=1)
  ax.axhline(threshold, color='0.3', ls='--', lw=1, label=f'threshold {threshold:g}')
  ax.set_xlim(lo, hi)
  ax.set_ylim(lo, hi)
  ax.set_aspect('equal')
  ax.set_xlabel('encoder matched cosine similarity')
  ax.set_ylabel('decoder matched cosine similarity')
  ax.set_title(f'Matched latents of a pair (F={enc_F.size}): shared {_percent(shared_F.mean() if enc_F.size else 0)}')
  legend = ax.legend(loc='upper left', fontsize=8, markerscale=max(1.0, (25 / _marker_size(enc_F.size)) ** 0.5))
  for handle in legend.legend_handles:
    handle.set_alpha(1)
  ax.grid(alpha=0.2)
  return save_png_atomic(fig, path)


def fig2_unique_vs_seeds(unique_fraction_by_k: Mapping, fits: Mapping, path) -> str:
  """Fig. 2: fraction of a base SAE's latents found in no other SAE vs the number of SAEs k, with fitted curves.

  unique_fraction_by_k: {k: fraction} (int or str keys). fits: {model: {'params': {...}, 'aic', 'asymptote',
  'error'}, 'best': model} for the models in FIT_MODELS (or fits.py's {'models': {...}, 'best'} and its model
  names, see fit_entries); entries with an 'error' are skipped. Left panel: the measured range, linear axes.
  Right panel: log-log, the fits extended to 10x the largest k, with asymptotes.
  """
  items = sorted((int(k), float(v)) for k, v in unique_fraction_by_k.items())
  k_K = np.array([k for k, _ in items], np.float64)
  frac_K = np.array([v for _, v in items], np.float64)
  entries, best = fit_entries(fits)
  fig, (ax_lin, ax_log) = plt.subplots(1, 2, figsize=(11.5, 4.6))
  k_max = float(k_K.max()) if k_K.size else 2.0
  k_min = float(k_K.min()) if k_K.size else 1.0
  grids = (np.linspace(k_min, k_max, 200), np.geomspace(max(k_min, 1.0), 10 * max(k_max, 1.0), 200))
  for i, (name, fit) in enumerate(_usable_fits(entries)):
    fn, formula, _ = FIT_MODELS[name]
    color = f'C{i + 1}'
    params = ', '.join(f'{p}={v:.3g}' for p, v in fit['params'].items())
    aic = fit.get('aic')
    label = f'{formula}  ({params}' + (f'; AIC {aic:.4g}' if aic is not None else '') + ')'
    label += '  best' if name == best else ''
    for ax, k_G in zip((ax_lin, ax_log), grids):
      with np.errstate(all='ignore'):
        y_G = np.asarray(fn(k_G, fit['params']), np.float64)
      style = {'lw': 2.2, 'ls': '-'} if name == best else {'lw': 1.3, 'ls': '--'}
      ax.plot(k_G, y_G, color=color, label=label if ax is ax_lin else None, **style)
    asymptote = fit.get('asymptote')
    if asymptote is not None and np.isfinite(asymptote) and asymptote > 0:
      ax_log.axhline(asymptote, color=color, lw=0.8, ls=':', label=f'{name} asymptote {asymptote:.3g}')
  for ax in (ax_lin, ax_log):
    ax.plot(k_K, frac_K, 'o', color='C0', ms=6, zorder=5, label='measured (mean over bases and subsets)')
    ax.set_xlabel('number of SAEs k')
    ax.grid(alpha=0.3, which='both')
  ax_lin.set_ylabel('fraction of base latents found in no other SAE')
  ax_lin.set_title('Latents only in the base SAE')
  if k_K.size:
    ax_lin.set_xticks(k_K if k_K.size <= 16 else np.unique(np.linspace(k_min, k_max, 9).round()))
    ax_lin.set_ylim(0, max(1e-3, float(np.nanmax(frac_K))) * 1.1)
  else:
    ax_lin.text(0.5, 0.5, 'no data', transform=ax_lin.transAxes, ha='center', va='center')
  ax_log.set_title('log-log, fits extrapolated to 10x k')
  if np.any(frac_K > 0):
    ax_log.set_xscale('log')
    ax_log.set_yscale('log')
    ax_log.set_ylim(float(np.min(frac_K[frac_K > 0])) / 3, 1.2)
    for axis, subs in ((ax_log.xaxis, (1.0, 2.0, 5.0)), (ax_log.yaxis, (1.0, 2.0, 3.0, 5.0))):
      axis.set_major_locator(LogLocator(subs=subs))
      axis.set_major_formatter(FormatStrFormatter('%g'))
      axis.set_minor_formatter(NullFormatter())
  ax_log.set_xlim(grids[1][0] * 0.9, grids[1][-1])
  ax_lin.legend(fontsize=7, loc='best')
  ax_log.legend(fontsize=7, loc='lower left')
  return save_png_atomic(fig, path)


def fig3_frequency(
  firing_frequency,
  mean_matched_cos,
  n_shared,
  path,
  n_range: tuple[int, int] | None = None,
  n_label: str = 'SAEs sharing the latent',
  count_scale: str = 'linear',
) -> str:
  """Fig. 3: firing frequency of each base latent vs its mean matched cosine over the other seeds.

  firing_frequency: [F] fraction of tokens where the latent is in the top-k (log x axis; latents that never
  fired are drawn at the left edge, left of a dotted line). mean_matched_cos: [F]. n_shared: [F] int, how many
  seeds share the latent (colour, discrete; other seeds only or base included, as the caller counts: say which
  in n_label). n_range: (lo, hi) of the colour bar, default the range of n_shared.
  Stacked marginal histograms by n_shared on both axes, as in the paper; count_scale: 'linear' (the layers keep
  their proportions) or 'log' (rare bins visible, as the paper's lower range).
  """
  freq_F = np.asarray(firing_frequency, np.float64).ravel()
  cos_F = np.asarray(mean_matched_cos, np.float64).ravel()
  n_F = np.asarray(n_shared).ravel().astype(np.int64)
  if not freq_F.shape == cos_F.shape == n_F.shape:
    raise ValueError(f'shapes differ: freq {freq_F.shape}, cos {cos_F.shape}, n_shared {n_F.shape}')
  keep_F = np.isfinite(freq_F) & np.isfinite(cos_F)
  freq_F, cos_F, n_F = freq_F[keep_F], cos_F[keep_F], n_F[keep_F]
  n_min, n_max = n_range if n_range is not None else (int(n_F.min(initial=0)), int(n_F.max(initial=0)))
  n_min, n_max = int(n_min), max(int(n_max), int(n_min) + 1)
  positive_F = freq_F > 0
  f_lo = float(freq_F[positive_F].min()) if positive_F.any() else 1e-4
  f_hi = float(freq_F[positive_F].max()) if positive_F.any() else 1.0
  zero_x = f_lo / 4  # where the never-firing latents are drawn
  x_F = np.where(positive_F, freq_F, zero_x)

  levels = list(range(n_min, n_max + 1))
  cmap = ListedColormap(plt.get_cmap('viridis')(np.linspace(0, 1, len(levels))))
  norm = BoundaryNorm(np.arange(n_min - 0.5, n_max + 1.5), cmap.N)
  fig = plt.figure(figsize=(8.2, 6.6))
  grid = fig.add_gridspec(2, 3, width_ratios=(4, 1.1, 0.15), height_ratios=(1.1, 4), wspace=0.06, hspace=0.06)
  ax = fig.add_subplot(grid[1, 0])
  ax_top = fig.add_subplot(grid[0, 0], sharex=ax)
  ax_right = fig.add_subplot(grid[1, 1], sharey=ax)
  ax_bar = fig.add_subplot(grid[1, 2])
  rng = np.random.default_rng(0)
  order_N = rng.permutation(x_F.size)[:MAX_SCATTER_POINTS]  # random draw order: no class hides another
  size = _marker_size(x_F.size)
  points = ax.scatter(x_F[order_N], cos_F[order_N], c=n_F[order_N], cmap=cmap, norm=norm, s=size, alpha=0.6, **POINTS)
  ax.set_xscale('log')
  x_lo, x_hi = zero_x / 2, min(1.5, f_hi * 2)
  ax.set_xlim(x_lo, x_hi)
  if not positive_F.all():  # the left edge holds the zeros: relabel it '0', no decade ticks left of the line
    decades = np.arange(np.ceil(np.log10(zero_x * 1.6)), np.floor(np.log10(x_hi)) + 1)
    decades = decades[::-1][:: int(np.ceil(decades.size / 9)) or 1][::-1]  # at most 9, keeping the largest
    ax.set_xticks([zero_x] + [10.0**d for d in decades], ['0'] + [f'$10^{{{int(d)}}}$' for d in decades])
    ax.axvline(zero_x * 1.6, color='0.4', ls=':', lw=1)
    box = {'facecolor': 'white', 'alpha': 0.8, 'lw': 0, 'pad': 1}
    text = f'\u2190 never fired (n={int((~positive_F).sum())})'
    ax.text(zero_x * 2, 0.985, text, transform=ax.get_xaxis_transform(), ha='left', va='top', fontsize=7, bbox=box)
  ax.set_xlabel('firing frequency in the base SAE (fraction of tokens)')
  ax.set_ylabel('mean matched cosine similarity over the other seeds')
  ax.grid(alpha=0.2, which='major')

  by_level = [n_F == n for n in levels]
  colors = [cmap(norm(n)) for n in levels]
  log_bins = np.geomspace(x_lo, x_hi, 41)
  cos_lo, cos_hi = _padded_range(cos_F)
  ax.set_ylim(cos_lo, cos_hi)
  log = count_scale == 'log' and x_F.size > 0
  stacked = {'stacked': True, 'color': colors, 'log': log}
  ax_top.hist([x_F[m] for m in by_level], bins=log_bins, **stacked)
  ax_right.hist([cos_F[m] for m in by_level], bins=np.linspace(cos_lo, cos_hi, 41), orientation='horizontal', **stacked)
  ax_top.set_ylabel('latents')
  ax_right.set_xlabel('latents')
  ax_top.tick_params(labelbottom=False)
  ax_right.tick_params(labelleft=False)
  ax_top.set_title(f'Similarity vs firing frequency (F={x_F.size})')
  bar = fig.colorbar(points, cax=ax_bar, ticks=levels if len(levels) <= 17 else None)
  bar.set_label(n_label)
  bar.solids.set_alpha(1)
  return save_png_atomic(fig, path)


def figA1_threshold_sweep(sweeps: Sequence[Mapping], path, threshold: float | None = 0.7) -> str:
  """Fig. A1 (right): shared fraction vs threshold, one colour per sweep; paper rule solid, notebook rule dashed.

  sweeps: [{'label', 'thresholds', 'shared_fraction', 'shared_fraction_notebook'}] (e.g. one per pair or per
  encoder/decoder choice); a missing 'shared_fraction_notebook' draws only the solid line.
  threshold: a grey vertical marker at the threshold used elsewhere (None: no marker).
  """
  fig, ax = plt.subplots(figsize=(6.6, 4.6))
  for i, sweep in enumerate(sweeps):
    t_T = np.asarray(sweep['thresholds'], np.float64)
    color = f'C{i % 10}'
    label = str(sweep.get('label', f'sweep {i}'))
    ax.plot(t_T, np.asarray(sweep['shared_fraction'], np.float64), color=color, marker='.', ms=4, label=label)
    if sweep.get('shared_fraction_notebook') is not None:
      ax.plot(t_T, np.asarray(sweep['shared_fraction_notebook'], np.float64), color=color, ls='--', lw=1.2)
  if threshold is not None:
    ax.axvline(threshold, color='0.5', lw=1, ls=':')
  labels = ax.legend(fontsize=8, loc='lower left', title='pair') if sweeps else None
  styles = [
    Line2D([], [], color='0.2', ls='-', label='paper rule (same partner, both >= t)'),
    Line2D([], [], color='0.2', ls='--', label='notebook rule (both >= t)'),
  ]
  ax.legend(handles=styles, fontsize=8, loc='upper right')
  if labels is not None:
    ax.add_artist(labels)
  ax.set_xlim(0, 1)
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlabel('cosine similarity threshold t (encoder and decoder)')
  ax.set_ylabel('fraction of latents shared')
  ax.set_title('Shared fraction vs threshold')
  ax.grid(alpha=0.3)
  return save_png_atomic(fig, path)


def figA2_hungarian_vs_max(matched_cos, max_cos, path, label: str = 'decoder', tol: float = 1e-4) -> str:
  """Fig. A2: distribution of the Hungarian matched cosine vs the max cosine (not a bijection) per latent.

  matched_cos, max_cos: [F] (same latents). Left: both histograms on shared bins. Right: histogram of
  max - matched (>= 0 when the matching is exact), with the fraction of latents whose match is their nearest one
  (gap <= tol: the two cosines may come from differently rounded matmuls).
  """
  matched_F = np.asarray(matched_cos, np.float64).ravel()
  max_F = np.asarray(max_cos, np.float64).ravel()
  if matched_F.shape != max_F.shape:
    raise ValueError(f'shapes differ: matched {matched_F.shape}, max {max_F.shape}')
  keep_F = np.isfinite(matched_F) & np.isfinite(max_F)
  matched_F, max_F = matched_F[keep_F], max_F[keep_F]
  gap_F = max_F - matched_F
  nearest = float(np.mean(np.abs(gap_F) <= tol)) if gap_F.size else 0.0
  fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11.5, 4.4))
  bins = np.linspace(*_padded_range(np.concatenate([matched_F, max_F])), 61)
  for values_F, name, color in ((matched_F, 'Hungarian matched', 'C0'), (max_F, 'max (not bijective)', 'C3')):
    mean = f', mean {values_F.mean():.3f}' if values_F.size else ''
    ax.hist(values_F, bins=bins, histtype='step', lw=1.6, color=color, label=f'{name}{mean}')
  ax.set_xlabel(f'{label} cosine similarity')
  ax.set_ylabel('latents')
  ax.set_title(f'{label.capitalize()}: Hungarian matched vs max cosine (F={matched_F.size})')
  ax.legend(fontsize=8, loc='upper left')
  ax.grid(alpha=0.3)
  gap_lo, gap_hi = _padded_range(gap_F, pad=0.01)
  ax_gap.hist(gap_F, bins=np.linspace(min(gap_lo, -0.01), max(gap_hi, 0.05), 61), color='C2', log=gap_F.size > 0)
  ax_gap.axvline(0, color='0.3', lw=1, ls=':')
  ax_gap.set_xlabel(f'max - matched {label} cosine')
  ax_gap.set_ylabel('latents (log)')
  ax_gap.set_title(f'matched to their nearest latent: {_percent(nearest)}')
  ax_gap.grid(alpha=0.3)
  return save_png_atomic(fig, path)


def fig_stability(distribution: Mapping, path) -> str:
  """Per-latent stability (not in the paper): the fraction of latents, over every seed, shared with 0..S-1 others.

  distribution: seeds.stability_distribution's dict ('values', 'fraction_of_latents', 'mean').
  """
  values = np.asarray(distribution['values'], np.float64)
  fractions = np.asarray(distribution['fraction_of_latents'], np.float64)
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  width = 0.8 * (values[1] - values[0]) if values.size > 1 else 0.5
  ax.bar(values, fractions, width=width, color='C0')
  ax.axvline(float(distribution['mean']), color='C3', ls='--', lw=1.2, label=f'mean {distribution["mean"]:.3f}')
  ax.set_xlabel('stability: fraction of the other seeds with a shared partner')
  ax.set_ylabel('fraction of latents (all seeds)')
  ax.set_title(f'Per-latent stability over {values.size} seeds')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  return save_png_atomic(fig, path)


def fit_entries(fits: Mapping | None) -> tuple[list[tuple[str, Mapping]], str | None]:
  """([(model name, fit)], best name) from either fits layout, fits.py's model names mapped to FIT_MODELS'.

  Layouts: {model: fit, ..., 'best': model} or fits.py's {'k', 'y', 'models': {model: fit}, 'best': model}.
  """
  fits = fits if isinstance(fits, Mapping) else {}
  models = fits['models'] if isinstance(fits.get('models'), Mapping) else fits
  entries = [(FIT_ALIASES.get(name, name), fit) for name, fit in models.items() if isinstance(fit, Mapping)]
  best = fits.get('best')
  return entries, FIT_ALIASES.get(best, best) if isinstance(best, str) else None


def _usable_fits(entries: Sequence[tuple[str, Mapping]]) -> list[tuple[str, Mapping]]:
  """The fits that can be drawn: a known model, no error, all its params finite."""
  usable = []
  for name, fit in entries:
    if name not in FIT_MODELS or fit.get('error') is not None:
      continue
    params = fit.get('params') or {}
    if all(params.get(p) is not None and np.isfinite(params[p]) for p in FIT_MODELS[name][2]):
      usable.append((name, fit))
  return usable


def _kde_contours(ax, rng, x_N, y_N, color, lims: tuple[float, float], levels: int = 5) -> None:
  """Gaussian-KDE density contours of the points (at most MAX_KDE_POINTS); skipped when degenerate."""
  x_N, y_N = _subsample(rng, MAX_KDE_POINTS, x_N, y_N)
  if x_N.size < 3:
    return
  xy_2xN = np.stack([x_N, y_N])
  if np.linalg.matrix_rank(xy_2xN - xy_2xN.mean(axis=1, keepdims=True), tol=1e-9) < 2:
    return  # identical or collinear points: the covariance is singular
  try:
    kde = gaussian_kde(xy_2xN)
    grid_G = np.linspace(lims[0], lims[1], 120)
    gx_GxG, gy_GxG = np.meshgrid(grid_G, grid_G)
    density_GxG = kde(np.stack([gx_GxG.ravel(), gy_GxG.ravel()])).reshape(gx_GxG.shape)
  except (np.linalg.LinAlgError, ValueError):
    return
  top = float(density_GxG.max())
  if not np.isfinite(top) or top <= 0:
    return
  contour_levels = np.linspace(top / (levels + 1), top, levels, endpoint=False)
  ax.contour(gx_GxG, gy_GxG, density_GxG, levels=contour_levels, colors=[color], linewidths=1.0)


def _subsample(rng, limit: int, *arrays_N):
  """The same random subset (at most `limit`) of each array."""
  n = arrays_N[0].size
  if n <= limit:
    return arrays_N
  idx_L = np.sort(rng.choice(n, size=limit, replace=False))
  return tuple(a[idx_L] for a in arrays_N)


def _marker_size(n: int) -> float:
  """Scatter marker area shrinking with the number of points."""
  return float(np.clip(300 / max(n, 1) ** 0.5, 1.0, 30.0))


def _padded_range(values, pad: float = 0.02) -> tuple[float, float]:
  """(lo, hi) of the values with a margin; a unit-free default when empty, a widened one when all equal."""
  if values.size == 0:
    return 0.0, 1.0
  lo, hi = float(values.min()), float(values.max())
  margin = max(pad * (hi - lo), pad)
  return lo - margin, hi + margin


def _percent(x) -> str:
  return f'{100 * float(x):.1f}%'
