"""Ground-truth recovery split by sharing: are the latents that several seeds agree on the true features?

Only synthetic data can answer this, since only there the true dictionary is known (`ground_truth.npz` of a
synthetic run). For every seed this module splits the latents into shared (shared with at least one other seed,
by the alignment's rule) and orphan, and measures against the true features, by decoder-row cosine:

- latent side: each latent's best cosine to any true feature, and the fraction of latents whose best cosine
  reaches the threshold (the latent *is* a true feature), for shared and for orphan latents;
- feature side: the fraction of true features that some latent of the seed recovers (cosine >= threshold), that
  a shared latent recovers, and that only orphan latents recover.

No existing SAE library reports this; the paper could not (no ground truth on a language model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# The cosine at which a learned decoder row counts as a true feature, as in a synthetic run's summary.json.
from saejax.data.synthetic import RECOVERY_THRESHOLD

PER_SEED_KEYS = (
  'shared_latents',
  'orphan_latents',
  'mean_best_cos_shared',
  'mean_best_cos_orphan',
  'true_fraction_shared',
  'true_fraction_orphan',
  'features_recovered',
  'features_recovered_by_shared',
  'features_recovered_only_by_orphans',
)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
  matrix = np.asarray(matrix, np.float64)
  return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)


def _mean_or_none(values: np.ndarray) -> float | None:
  return float(values.mean()) if values.size else None


def check_shapes(features_FxD: np.ndarray, W_dec_MxD: np.ndarray) -> None:
  """Raises ValueError unless the true features and the decoder rows live in the same space."""
  features_shape, decoder_shape = np.shape(features_FxD), np.shape(W_dec_MxD)
  if len(features_shape) != 2 or len(decoder_shape) != 2 or features_shape[1] != decoder_shape[1]:
    raise ValueError(
      f'true features {features_shape} and decoder {decoder_shape} must be [F, D] and [M, D] with '
      'the same D; pass the ground truth of the run these SAEs were trained on'
    )
  if not np.isfinite(features_FxD).all():
    raise ValueError('the true features hold non-finite values; the ground-truth file is corrupt')


def seed_recovery(
  features_FxD: np.ndarray, W_dec_MxD: np.ndarray, shared_M: np.ndarray, threshold: float = RECOVERY_THRESHOLD
) -> dict[str, Any]:
  """One seed's recovery numbers (PER_SEED_KEYS); a mean over no latents is None."""
  check_shapes(features_FxD, W_dec_MxD)
  shared_M = np.asarray(shared_M, bool)
  if shared_M.shape != (W_dec_MxD.shape[0],):
    raise ValueError(f'sharing mask of shape {shared_M.shape} does not match {W_dec_MxD.shape[0]} latents')
  cos_MxF = _unit_rows(W_dec_MxD) @ _unit_rows(features_FxD).T
  best_cos_M = cos_MxF.max(axis=1)
  is_true_M = best_cos_M >= threshold
  recovered_by_shared_F = (cos_MxF[shared_M] >= threshold).any(axis=0)
  recovered_by_orphan_F = (cos_MxF[~shared_M] >= threshold).any(axis=0)
  return {
    'shared_latents': int(shared_M.sum()),
    'orphan_latents': int((~shared_M).sum()),
    'mean_best_cos_shared': _mean_or_none(best_cos_M[shared_M]),
    'mean_best_cos_orphan': _mean_or_none(best_cos_M[~shared_M]),
    'true_fraction_shared': _mean_or_none(is_true_M[shared_M]),
    'true_fraction_orphan': _mean_or_none(is_true_M[~shared_M]),
    'features_recovered': float((recovered_by_shared_F | recovered_by_orphan_F).mean()),
    'features_recovered_by_shared': float(recovered_by_shared_F.mean()),
    'features_recovered_only_by_orphans': float((recovered_by_orphan_F & ~recovered_by_shared_F).mean()),
  }


def recovery_by_sharing(
  features_FxD: np.ndarray,
  W_dec_by_seed: Mapping[str, np.ndarray],
  masks: Mapping[str, np.ndarray],
  threshold: float = RECOVERY_THRESHOLD,
) -> dict[str, Any]:
  """{'threshold', 'num_features', 'per_seed': {seed: seed_recovery(...)}}.

  masks: per seed, the sharing bitmasks of `saejax.analysis.seeds` (non-zero: shared with some other seed).
  """
  per_seed = {
    name: seed_recovery(features_FxD, W_dec_by_seed[name], np.asarray(masks[name]) > 0, threshold)
    for name in W_dec_by_seed
  }
  return {'threshold': threshold, 'num_features': int(np.asarray(features_FxD).shape[0]), 'per_seed': per_seed}


def mean_over_seeds(recovery: Mapping[str, Any], key: str) -> float | None:
  """The mean of one PER_SEED_KEYS entry over the seeds that have it (None where no seed does)."""
  values = [row[key] for row in recovery['per_seed'].values() if row[key] is not None]
  return float(np.mean(values)) if values else None
