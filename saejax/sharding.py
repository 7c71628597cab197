"""The device mesh and where every array of a run lives on it.

Layout (jax-practice.md): batch over `data`, latents over `model`, the seed axis replicated. Nine seeds do
not divide a 4- or 8-way axis, and replicating them costs nothing extra because every seed's latents are
already split over `model`. Axes are `Auto` (classic GSPMD propagation) so the sparse gathers and scatters
of the TopK kernels partition without per-op output shardings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = 'data', 'model'


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `data` x `model` mesh over `devices` (default: all). `data=-1` takes every device `model` leaves."""
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ValueError(f'mesh_model={model} must divide the {len(devices)} devices')
  if data == -1:
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f'mesh {data}x{model} needs {data * model} devices but {len(devices)} are present')
  grid = np.asarray(devices, dtype=object).reshape(data, model)
  return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Activations [tokens, d]: tokens split over `data`."""
  return NamedSharding(mesh, P(DATA, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(path: tuple, leaf: jax.Array, num_latents: int, model_size: int) -> P:
  """Seed-stacked leaves: [S, F, D] and [S, F] split F over `model`; everything else replicated."""
  del path
  shape = getattr(leaf, 'shape', ())
  if len(shape) >= 2 and shape[1] == num_latents and num_latents % model_size == 0:
    return P(None, MODEL, *([None] * (len(shape) - 2)))
  return P()


def state_shardings(mesh: Mesh, state, num_latents: int):
  """A NamedSharding for every leaf of a seed-stacked train state (params, Adam moments, counters)."""
  model_size = mesh.shape[MODEL]

  def leaf_sharding(path, leaf):
    return NamedSharding(mesh, _leaf_spec(path, leaf, num_latents, model_size))

  return jax.tree_util.tree_map_with_path(leaf_sharding, state)


def check_batch_divisible(mesh: Mesh, batch_size: int) -> None:
  data_size = mesh.shape[DATA]
  if batch_size % data_size:
    raise ValueError(
      f'batch_size={batch_size} tokens does not split over the {data_size}-way data axis; use a multiple of {data_size}'
    )


def num_devices(mesh: Mesh) -> int:
  return math.prod(mesh.shape.values())
