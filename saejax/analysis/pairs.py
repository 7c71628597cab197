"""One pair of SAEs: encoder and decoder matchings, the shared / orphan labels, and the per-pair summary.

This module owns the paper's definition of a shared latent (section 3), its notebook variant, the max-cosine
comparison (Fig. A2), the threshold sweep (Fig. A1), PW-MCC, the summary keys, and the per-pair `.npz` file.

PW-MCC (Song et al. 2025, "pairwise mean correlation coefficient"): the mean matched decoder cosine under the
optimal matching of the decoders alone, i.e. the decoder matching's mean cosine. A dead (all-zero) row counts 0.

Side convention: the matcher needs `n_a <= n_b`, so when the first SAE has more latents than the second the two
are swapped and `PairResult.swapped` is True. Every per-latent array is indexed by the result's side 'a', which
is always the smaller SAE (the first argument when both have the same size): `enc_partner[i]` is the latent of
side 'b' that latent `i` of side 'a' is matched to. With `swapped`, side 'a' is the second argument.

Shared latent (paper rule): the same partner in the encoder and the decoder matchings AND cosine >= threshold in
both. Notebook rule: cosine >= threshold in both, partners not compared. Matched rows are normalised to unit
norm here, so the matched and the max cosines are cosines whatever the scale of the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saejax import storage

# Fig. A1's x axis: 0.00, 0.05, ..., 1.00.
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))
SUMMARY_KEYS = (
  'shared_fraction',
  'shared_fraction_notebook',
  'pw_mcc',
  'partner_agreement',
  'mean_cos_enc',
  'mean_cos_dec',
  'mean_max_cos_enc',
  'mean_max_cos_dec',
  'method',
  'certified_optimal',
  'threshold',
  'n_a',
  'n_b',
  'threshold_sweep',
)
NPZ_ARRAYS = (
  'enc_partner',
  'dec_partner',
  'enc_cos',
  'dec_cos',
  'shared',
  'shared_notebook',
  'enc_max_cos',
  'dec_max_cos',
)


@dataclass
class PairResult:
  """Matchings of one pair. Arrays are indexed by side 'a' (the smaller SAE; see the module docstring)."""

  enc_partner: np.ndarray  # [n_a] int64, latent of b matched by the encoder matching
  dec_partner: np.ndarray  # [n_a] int64, latent of b matched by the decoder matching
  enc_cos: np.ndarray  # [n_a] float32 matched encoder cosine
  dec_cos: np.ndarray  # [n_a] float32 matched decoder cosine
  shared: np.ndarray  # [n_a] bool, paper rule
  shared_notebook: np.ndarray  # [n_a] bool, notebook rule
  enc_max_cos: np.ndarray  # [n_a] float32 best encoder cosine over all of b (not a bijection)
  dec_max_cos: np.ndarray  # [n_a] float32 best decoder cosine over all of b
  summary: dict[str, Any]
  swapped: bool = False  # True: side 'a' is the second argument of analyse_pair
  stats: dict[str, Any] = field(default_factory=dict)  # the matcher's stats, {'enc': ..., 'dec': ...}

  def to_npz(self, path: str) -> None:
    """Writes the per-latent arrays (plus `swapped`, `threshold`, `n_a`, `n_b`) atomically to `path`."""
    arrays = {name: getattr(self, name) for name in NPZ_ARRAYS}
    arrays['swapped'] = np.asarray(self.swapped)
    arrays['threshold'] = np.asarray(self.summary['threshold'], np.float64)
    arrays['n_a'] = np.asarray(self.summary['n_a'], np.int64)
    arrays['n_b'] = np.asarray(self.summary['n_b'], np.int64)
    storage.write_npz(path, arrays)


def unit_rows(W_FxD) -> np.ndarray:
  """float32 rows scaled to unit norm; all-zero (dead) rows stay zero, so their cosines are 0."""
  W_FxD = np.asarray(W_FxD, dtype=np.float32)
  if W_FxD.ndim != 2:
    raise ValueError(f'expected a [F, D] weight matrix, got shape {W_FxD.shape}')
  norm_Fx1 = np.linalg.norm(W_FxD, axis=1, keepdims=True)
  return W_FxD / np.where(norm_Fx1 > 0, norm_Fx1, 1.0).astype(np.float32)


def shared_masks(enc_partner, dec_partner, enc_cos, dec_cos, threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """(paper rule, notebook rule) boolean masks for one threshold."""
  both_high = (np.asarray(enc_cos) >= threshold) & (np.asarray(dec_cos) >= threshold)
  return both_high & (np.asarray(enc_partner) == np.asarray(dec_partner)), both_high


def threshold_sweep(enc_partner, dec_partner, enc_cos, dec_cos, thresholds=SWEEP_THRESHOLDS) -> dict[str, list]:
  """Fig. A1 (right): the shared fraction under both rules as the threshold goes from 0 to 1."""
  sweep = {'thresholds': [float(t) for t in thresholds], 'shared_fraction': [], 'shared_fraction_notebook': []}
  for t in thresholds:
    shared_A, notebook_A = shared_masks(enc_partner, dec_partner, enc_cos, dec_cos, t)
    sweep['shared_fraction'].append(_mean(shared_A))
    sweep['shared_fraction_notebook'].append(_mean(notebook_A))
  return sweep


def default_matcher() -> Callable:
  from saejax.align.match import match_latents

  return match_latents


def default_max_cos() -> Callable:
  from saejax.align.cosine import max_cosine

  return max_cosine


def analyse_pair(
  sae_a: Mapping,
  sae_b: Mapping,
  threshold: float = 0.7,
  method: str = 'auto',
  matcher: Callable | None = None,
  max_cos_fn: Callable | None = None,
) -> PairResult:
  """Matches the encoder rows and, separately, the decoder rows of two SAEs and labels each latent.

  sae_a, sae_b: mappings with 'W_enc' and 'W_dec', both [F, D] (numpy, JAX or anything np.asarray takes).
  matcher: `match_latents(A, B, method=...) -> Matching` (default saejax.align.match.match_latents).
  max_cos_fn: `max_cosine(A, B) -> (row_max, col_max)` (default saejax.align.cosine.max_cosine).
  The smaller SAE becomes side 'a' of the result (see the module docstring).
  """
  matcher = matcher or default_matcher()
  max_cos_fn = max_cos_fn or default_max_cos()
  for name, sae in (('sae_a', sae_a), ('sae_b', sae_b)):
    for key in ('W_enc', 'W_dec'):
      if key not in sae:
        raise KeyError(f'{name} has no {key!r} (expected W_enc and W_dec, both [F, D])')
  n_first, n_second = np.shape(sae_a['W_enc'])[0], np.shape(sae_b['W_enc'])[0]
  swapped = n_first > n_second
  if swapped:
    sae_a, sae_b = sae_b, sae_a
  out: dict[str, Any] = {}
  stats, methods, certified = {}, [], True
  for side in ('enc', 'dec'):
    key = f'W_{side}'
    A_NxD, B_MxD = unit_rows(sae_a[key]), unit_rows(sae_b[key])
    if A_NxD.shape[1] != B_MxD.shape[1] or A_NxD.shape[0] != np.shape(sae_a['W_enc'])[0]:
      raise ValueError(f'{key} shapes do not fit: {A_NxD.shape} vs {B_MxD.shape}')
    matching = matcher(A_NxD, B_MxD, method=method)
    partner_N = np.asarray(matching.partner, dtype=np.int64)
    cos_N = np.asarray(matching.cos, dtype=np.float32)
    if partner_N.shape != (A_NxD.shape[0],) or cos_N.shape != partner_N.shape:
      raise ValueError(f'matcher returned partner {partner_N.shape}, cos {cos_N.shape} for {A_NxD.shape[0]} rows')
    row_max_N, _ = max_cos_fn(A_NxD, B_MxD)
    out[f'{side}_partner'] = partner_N
    out[f'{side}_cos'] = cos_N
    out[f'{side}_max_cos'] = np.asarray(row_max_N, dtype=np.float32)
    stats[side] = dict(getattr(matching, 'stats', {}) or {})
    methods.append(str(matching.method))
    certified = certified and bool(matching.certified_optimal)
  shared_A, notebook_A = shared_masks(out['enc_partner'], out['dec_partner'], out['enc_cos'], out['dec_cos'], threshold)
  summary = {
    'shared_fraction': _mean(shared_A),
    'shared_fraction_notebook': _mean(notebook_A),
    'pw_mcc': _mean(out['dec_cos']),  # the decoder matching alone (module docstring)
    'partner_agreement': _mean(out['enc_partner'] == out['dec_partner']),
    'mean_cos_enc': _mean(out['enc_cos']),
    'mean_cos_dec': _mean(out['dec_cos']),
    'mean_max_cos_enc': _mean(out['enc_max_cos']),
    'mean_max_cos_dec': _mean(out['dec_max_cos']),
    'method': methods[0] if methods[0] == methods[1] else '/'.join(methods),
    'certified_optimal': certified,
    'threshold': float(threshold),
    'n_a': int(shared_A.shape[0]),
    'n_b': int(np.shape(sae_b['W_enc'])[0]),
    'threshold_sweep': threshold_sweep(out['enc_partner'], out['dec_partner'], out['enc_cos'], out['dec_cos']),
  }
  return PairResult(**out, shared=shared_A, shared_notebook=notebook_A, summary=summary, swapped=swapped, stats=stats)


def _mean(x) -> float:
  x = np.asarray(x)
  return float(x.mean(dtype=np.float64)) if x.size else float('nan')
