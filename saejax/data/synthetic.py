"""Synthetic ground truth: activations built from known sparse features, so recovery can be measured.

Each token is a sparse non-negative combination of `F` hidden unit-norm directions in `d` dims (F > d gives
superposition). Feature i fires independently with probability `p_max * (i + 1)^-alpha` (a power law, so
feature 0 is the most frequent); with `group_size > 1` consecutive features also fire together in
correlated groups. Magnitudes are uniform in [0.5, 1.5], Gaussian noise is optional, and a fixed offset
gives `b_dec` something to learn.

Batches are generated on the accelerator from `fold_in(key, position)`: any position can be produced
without replaying the ones before it (exact resume), and the values do not depend on the mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from saejax import storage
from saejax.data.base import ActivationSource

GROUND_TRUTH_FILE = 'ground_truth.npz'
RECOVERY_THRESHOLD = 0.9


def firing_probabilities(num_features: int, max_prob: float, exponent: float) -> np.ndarray:
  ranks = np.arange(1, num_features + 1, dtype=np.float64)
  return np.clip(max_prob * ranks**-exponent, 0.0, 1.0).astype(np.float32)


class SyntheticSource(ActivationSource):
  """Power-law sparse features in superposition; `config` is a `TrainConfig`."""

  def __init__(self, config, sharding: NamedSharding):
    super().__init__(sharding)
    self.hookpoint = 'synthetic'
    self.d_in = config.d_in
    self.batch_size = config.batch_size
    self.noise_std = config.feature_noise_std
    self.group_size = max(1, config.feature_group_size)
    self.group_coactivation = config.feature_group_coactivation
    feature_key, offset_key, self._stream_key = jax.random.split(jax.random.PRNGKey(config.data_seed), 3)
    features = jax.random.normal(feature_key, (config.num_features, config.d_in), jnp.float32)
    self.features_FxD = np.asarray(features / jnp.linalg.norm(features, axis=-1, keepdims=True))
    self.offset_D = np.asarray(jax.random.normal(offset_key, (config.d_in,)) / np.sqrt(config.d_in))
    self.firing_prob_F = firing_probabilities(
      config.num_features, config.feature_max_firing_prob, config.feature_firing_exponent
    )
    self._generate = jax.jit(self._generate_batch, out_shardings=sharding)

  def batch_at(self, position: int) -> jax.Array:
    return self._generate(jax.random.fold_in(self._stream_key, position))

  def _generate_batch(self, key: jax.Array) -> jax.Array:
    fire_key, group_key, member_key, magnitude_key, noise_key = jax.random.split(key, 5)
    shape = (self.batch_size, len(self.firing_prob_F))
    fires_BxF = jax.random.uniform(fire_key, shape) < self.firing_prob_F
    if self.group_size > 1:
      fires_BxF = fires_BxF | self._group_fires(group_key, member_key, shape)
    magnitudes_BxF = jax.random.uniform(magnitude_key, shape, minval=0.5, maxval=1.5)
    coefficients_BxF = jnp.where(fires_BxF, magnitudes_BxF, 0.0)
    x_BxD = coefficients_BxF @ self.features_FxD + self.offset_D
    if self.noise_std != 0:  # NaN noise must reach the trainer's finite check, not vanish here
      x_BxD = x_BxD + self.noise_std * jax.random.normal(noise_key, x_BxD.shape)
    return x_BxD

  def _group_fires(self, group_key, member_key, shape):
    """A group fires with its members' mean probability; then each member joins with `group_coactivation`."""
    num_features = shape[1]
    group_of_F = np.arange(num_features) // self.group_size
    num_groups = int(group_of_F[-1]) + 1
    group_prob = np.bincount(group_of_F, self.firing_prob_F) / np.bincount(group_of_F)
    group_fires_BxG = jax.random.uniform(group_key, (shape[0], num_groups)) < group_prob.astype(np.float32)
    joins_BxF = jax.random.uniform(member_key, shape) < self.group_coactivation
    return group_fires_BxG[:, group_of_F] & joins_BxF

  @functools.cached_property
  def expected_l0(self) -> float:
    return float(self.firing_prob_F.sum())

  def save_artifacts(self, workdir: str) -> None:
    path = storage.join(workdir, GROUND_TRUTH_FILE)
    if jax.process_index() != 0 or storage.exists(path):
      return
    storage.write_npz(path, {'features': self.features_FxD, 'firing_prob': self.firing_prob_F, 'offset': self.offset_D})

  def final_report(self, params_S, spec, held_out_position: int, hookpoint: str | None = None) -> dict[str, Any]:
    del spec, held_out_position, hookpoint
    return {'recovery': recovery_report(self.features_FxD, self.firing_prob_F, np.asarray(params_S['W_dec']))}


def recovery_report(features_FxD: np.ndarray, firing_prob_F: np.ndarray, W_dec_SxMxD: np.ndarray) -> dict[str, Any]:
  """Per seed: the best cosine of each true feature to any learned decoder row, and summaries of it."""
  true_unit = features_FxD / np.linalg.norm(features_FxD, axis=-1, keepdims=True)
  order = np.argsort(-firing_prob_F, kind='stable')
  top = order[: max(1, len(order) // 10)]
  per_seed = []
  for W_dec_MxD in W_dec_SxMxD:
    learned_unit = W_dec_MxD / np.maximum(np.linalg.norm(W_dec_MxD, axis=-1, keepdims=True), 1e-12)
    best_cos_F = (true_unit @ learned_unit.T).max(axis=1)
    per_seed.append(
      {
        'mean_best_cos': float(best_cos_F.mean()),
        'recovered_fraction': float((best_cos_F >= RECOVERY_THRESHOLD).mean()),
        'top10pct_recovered_fraction': float((best_cos_F[top] >= RECOVERY_THRESHOLD).mean()),
        'best_cos': best_cos_F.round(5).tolist(),
      }
    )
  return {'threshold': RECOVERY_THRESHOLD, 'num_features': int(len(firing_prob_F)), 'seeds': per_seed}
