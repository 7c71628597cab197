"""Firing frequency of every latent of every seed (the paper's Fig. 3 input).

A latent "fires" on a token when it is among the k active latents (TopK) or, for the other architectures,
when its activation is positive. Counts run on the accelerator over N tokens of an activation source, all
seeds in one jitted step per batch, and are stored in the run folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from saejax import sae as sae_lib
from saejax import storage
from saejax.sae import kernels

FIRING_FILE = 'firing_counts.npz'


def _path(workdir: str, key: str | None) -> str:
  """`firing_counts.npz`, or `firing_counts.<key>.npz` for runs with several hookpoints or variants."""
  name = FIRING_FILE if key is None else FIRING_FILE.replace('.npz', f'.{key}.npz')
  return storage.join(workdir, name)


def _count_fn(arch: sae_lib.Architecture, spec: sae_lib.SaeSpec):
  def seed_counts(params, x_BxD):
    if spec.arch == 'topk':
      pre_BxF = (x_BxD - params['b_dec']) @ params['W_enc'].T + params['b_enc']
      top_BxK, idx_BxK = kernels.global_top_k(pre_BxF, spec.k, spec.latent_shards, spec.topk_block)
      fired = (top_BxK > 0).reshape(-1).astype(jnp.int32)
      return jnp.zeros(spec.num_latents, jnp.int32).at[idx_BxK.reshape(-1)].add(fired)
    return jnp.sum(arch.encode(params, x_BxD, spec) > 0, axis=0, dtype=jnp.int32)

  return jax.jit(jax.vmap(seed_counts, in_axes=(0, None)))


def count_firing(
  params_S: Mapping[str, np.ndarray],
  spec: sae_lib.SaeSpec,
  source,
  num_tokens: int,
  start_position: int = 0,
  progress: bool = True,
  hookpoint_index: int = 0,
) -> tuple[np.ndarray, int]:
  """Counts per seed and latent over at least `num_tokens` tokens, reading batches from `start_position`.

  Returns (counts [S, F] int64, tokens counted). Positions after the training run's last step are tokens
  the SAEs never trained on. `hookpoint_index` picks the source's hookpoint when it has several.
  """
  arch = sae_lib.get(spec.arch)
  counts_fn = _count_fn(arch, spec)
  params = {name: jnp.asarray(value) for name, value in params_S.items()}
  num_batches = max(1, -(-num_tokens // source.batch_size))
  # int32 per batch on the device (< 2^31 tokens each), summed on the host in int64 every 256 batches.
  total_SxF = np.zeros((params['W_dec'].shape[0], spec.num_latents), np.int64)
  pending, counted = None, 0
  positions = range(start_position, start_position + num_batches)
  for n, position in enumerate(tqdm(positions, desc='firing', disable=None if progress else True)):
    try:
      batch = source.batches_at(position)[hookpoint_index]
    except IndexError:  # the data ran out (StreamExhaustedError): count what there was
      logging.warning('firing counts: data ran out after %d of %d batches', n, num_batches)
      break
    counts = counts_fn(params, batch)
    pending = counts if pending is None else pending + counts
    counted += 1
    if n % 256 == 255:
      total_SxF += np.asarray(pending)
      pending = None
  if pending is not None:
    total_SxF += np.asarray(pending)
  if counted == 0:
    raise ValueError(f'no tokens left after position {start_position} to count firing on; pass more data')
  return total_SxF, counted * source.batch_size


def save_counts(workdir: str, counts_SxF: np.ndarray, tokens: int, seeds: list[str], key: str | None = None) -> str:
  path = _path(workdir, key)
  return storage.write_npz(path, {'counts': counts_SxF, 'tokens': np.int64(tokens), 'seeds': np.asarray(seeds)})


def load_counts(workdir: str, key: str | None = None) -> dict[str, np.ndarray] | None:
  path = _path(workdir, key)
  return storage.read_npz(path) if storage.exists(path) else None


def counts_for_run(
  workdir: str,
  hookpoint: str,
  sae_dirs: Mapping[str, str],
  num_tokens: int,
  progress: bool = True,
  variant: str | None = None,
):
  """Counts firing of a run's exported seeds (of one variant, for a run with variants) over tokens after its
  training stream, and stores them in the run folder; stored counts are reused when they cover at least
  `num_tokens` tokens of the same seeds."""
  from saejax import data, formats, variants
  from saejax import sharding as shd
  from saejax.config import TrainConfig
  from saejax.train import run_folder

  config = TrainConfig.from_json(run_folder.read_config(workdir))
  own = variants.config_of(config, variant)
  parts = [hookpoint] if len(config.hookpoints) > 1 else []
  parts += [variant] if variant else []
  file_key = '.'.join(parts) or None
  stored = load_counts(workdir, file_key)
  if stored is not None and int(stored['tokens']) >= num_tokens and list(stored['seeds']) == list(sae_dirs):
    return stored
  loaded = [formats.load_sae(path)[0] for path in sae_dirs.values()]
  params = {name: np.stack([p[name] for p in loaded]) for name in loaded[0]}
  source = data.make_source(config, shd.batch_sharding(shd.make_mesh()))
  counts, tokens = count_firing(
    params,
    sae_lib.SaeSpec.from_config(own),
    source,
    num_tokens,
    start_position=config.num_steps,
    progress=progress,
    hookpoint_index=config.hookpoints.index(hookpoint),
  )
  save_counts(workdir, counts, tokens, list(sae_dirs), file_key)
  return load_counts(workdir, file_key)
