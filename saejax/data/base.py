"""The one interface every activation source implements, so the trainer never knows where activations come from.

A source yields `[tokens, d_in]` float32 batches already placed on the mesh, in a deterministic order that
depends only on its config, and can be restored to any saved position. Every seed of a run trains on the
same batch in the same step, so the source (and its language model, for the LM source) is paid once.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


class ActivationSource(abc.ABC):
  """A deterministic, resumable stream of activation batches on the mesh."""

  hookpoint: str
  d_in: int
  batch_size: int

  def __init__(self, sharding: NamedSharding):
    self.sharding = sharding
    self.position = 0  # batches handed out so far

  @abc.abstractmethod
  def batch_at(self, position: int) -> jax.Array:
    """The batch at `position`, placed with `self.sharding`. Must not depend on earlier calls."""

  @property
  def hookpoints(self) -> list[str]:
    return [self.hookpoint]

  def batches_at(self, position: int) -> tuple[jax.Array, ...]:
    """One batch per hookpoint, from one pass of the underlying model; a single-hookpoint source has one."""
    return (self.batch_at(position),)

  def next_batch(self) -> jax.Array:
    batch = self.batch_at(self.position)
    self.position += 1
    return batch

  def next_batches(self) -> tuple[jax.Array, ...]:
    batches = self.batches_at(self.position)
    self.position += 1
    return batches

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable position, stored in every checkpoint."""
    return {'position': self.position}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self.position = int(state['position'])

  def save_artifacts(self, workdir: str) -> None:  # noqa: B027 - optional hook
    """Writes anything the run folder should keep about the data (e.g. a ground-truth dictionary)."""

  def final_report(
    self, params_S: dict[str, np.ndarray], spec, held_out_position: int, hookpoint: str | None = None
  ) -> dict[str, Any]:
    """Source-specific evaluation of one hookpoint's trained SAEs (params stacked over seeds); batches from
    `held_out_position` on were never trained on. Empty by default."""
    del params_S, spec, held_out_position, hookpoint
    return {}


def place_host_batch(batch_BxD: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places this process's slice of a global batch on the mesh (one call per host on a pod)."""
  global_shape = (batch_BxD.shape[0] * jax.process_count(), batch_BxD.shape[1])
  return jax.make_array_from_process_local_data(sharding, batch_BxD, global_shape)
