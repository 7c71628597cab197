"""Ground-truth recovery split by sharing, on decoders whose answers are known by construction."""

import numpy as np
import pytest

from saejax.analysis import ground_truth, report


def _decoder_and_features():
  """8 true features (the axes of R^8) and a 6-latent decoder:

  latents 0-2 are features 0-2 exactly, latent 3 is feature 3 at cosine 0.8 (not a true feature at 0.9),
  latent 4 is feature 4 scaled by 3 (a true feature: direction, not norm, counts), latent 5 is -feature 5.
  """
  features = np.eye(8, dtype=np.float32)
  W_dec = np.zeros((6, 8), np.float32)
  W_dec[:3, :3] = np.eye(3)
  W_dec[3, 3], W_dec[3, 6] = 0.8, 0.6
  W_dec[4, 4] = 3.0
  W_dec[5, 5] = -1.0
  return features, W_dec


def test_seed_recovery_splits_latents_and_features_by_sharing():
  features, W_dec = _decoder_and_features()
  shared = np.array([True, True, False, True, False, False])
  row = ground_truth.seed_recovery(features, W_dec, shared)
  assert (row['shared_latents'], row['orphan_latents']) == (3, 3)
  # Best cosines: 1, 1, 1, 0.8, 1, 0 (latent 5 points away from feature 5 and is orthogonal to the rest).
  assert row['mean_best_cos_shared'] == pytest.approx((1 + 1 + 0.8) / 3)
  assert row['mean_best_cos_orphan'] == pytest.approx((1 + 1 + 0) / 3)
  assert row['true_fraction_shared'] == pytest.approx(2 / 3)
  assert row['true_fraction_orphan'] == pytest.approx(2 / 3)
  # Features 0, 1 by shared latents; 2 and 4 only by orphans; 3 (cos 0.8), 5 (negated), 6, 7 by nobody.
  assert row['features_recovered'] == pytest.approx(4 / 8)
  assert row['features_recovered_by_shared'] == pytest.approx(2 / 8)
  assert row['features_recovered_only_by_orphans'] == pytest.approx(2 / 8)
  assert set(row) == set(ground_truth.PER_SEED_KEYS)


def test_a_threshold_changes_what_counts_as_recovered():
  features, W_dec = _decoder_and_features()
  row = ground_truth.seed_recovery(features, W_dec, np.ones(6, bool), threshold=0.75)
  assert row['features_recovered'] == pytest.approx(5 / 8)  # latent 3 now recovers feature 3
  assert row['orphan_latents'] == 0 and row['mean_best_cos_orphan'] is None


def test_recovery_by_sharing_reads_bitmasks_per_seed_and_averages():
  features, W_dec = _decoder_and_features()
  masks = {'a': np.array([1, 2, 0, 4, 0, 0], np.uint64), 'b': np.zeros(6, np.uint64)}
  recovery = ground_truth.recovery_by_sharing(features, {'a': W_dec, 'b': W_dec}, masks)
  assert recovery['num_features'] == 8 and recovery['threshold'] == ground_truth.RECOVERY_THRESHOLD
  assert recovery['per_seed']['a']['shared_latents'] == 3
  assert recovery['per_seed']['b']['shared_latents'] == 0
  # Seed b has no shared latents, so only seed a enters the mean over seeds.
  assert ground_truth.mean_over_seeds(recovery, 'mean_best_cos_shared') == pytest.approx(2.8 / 3)
  assert ground_truth.mean_over_seeds(recovery, 'orphan_latents') == pytest.approx(4.5)
  section = '\n'.join(report.ground_truth_section(recovery))
  assert section.count('\n| a |') == 1 and section.count('\n| b |') == 1


@pytest.mark.parametrize(
  'features, W_dec, shared',
  [
    (np.eye(8), np.ones((6, 7)), np.ones(6, bool)),  # different D
    (np.eye(8)[None], np.ones((6, 8)), np.ones(6, bool)),  # not a matrix
    (np.eye(8), np.ones((6, 8)), np.ones(5, bool)),  # mask of the wrong length
    (np.full((8, 8), np.nan), np.ones((6, 8)), np.ones(6, bool)),  # corrupt ground truth
  ],
)
def test_bad_shapes_and_values_are_refused(features, W_dec, shared):
  with pytest.raises(ValueError):
    ground_truth.seed_recovery(features, W_dec, shared)
