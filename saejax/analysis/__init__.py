"""Analysis of matched SAEs: one pair (pairs), many seeds (seeds) and the Fig. 2 curve fits (fits).

Importing this package does not import the matcher; saejax.align is loaded when a pair is first analysed.
"""

from saejax.analysis.fits import MODELS, fit_model, fit_unique_fraction
from saejax.analysis.pairs import SUMMARY_KEYS, SWEEP_THRESHOLDS, PairResult, analyse_pair, threshold_sweep
from saejax.analysis.seeds import (
  SeedsResult,
  analyse_seeds,
  directed_sharing,
  exactly_in_n_counts,
  sharing_masks,
  unique_fraction_curve,
  universality_table,
  write_universality_csv,
)

__all__ = [
  'MODELS',
  'SUMMARY_KEYS',
  'SWEEP_THRESHOLDS',
  'PairResult',
  'SeedsResult',
  'analyse_pair',
  'analyse_seeds',
  'directed_sharing',
  'exactly_in_n_counts',
  'fit_model',
  'fit_unique_fraction',
  'sharing_masks',
  'threshold_sweep',
  'unique_fraction_curve',
  'universality_table',
  'write_universality_csv',
]
