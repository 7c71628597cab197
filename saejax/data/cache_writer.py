"""Writing an activation cache: the LM once over the dataset, every hookpoint to shards, resumable after a kill.

`write_cache` is what `python -m experiments.cache` runs. The layout, the fingerprint and the checks it writes
against live in `saejax.data.cache`; this module owns the side effects: the folder's first file (`cache.json`),
whole shards written under temporary names and renamed, `progress.json` after each one (so a rerun continues at
the first missing shard without re-tokenizing), and the `COMPLETE` marker last.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from saejax import tuning
from saejax.data.cache import (
  COMPLETE,
  META,
  PROGRESS,
  SHARD_BYTES,
  TOKENS,
  dataset_identity,
  describe,
  differences_from,
  fingerprint,
  path_identity,
  read_json,
  read_meta,
  shard_path,
  shard_tokens_at,
  storage_dtype,
)


def _write_json(path: str, value: dict[str, Any]) -> None:
  temporary = path + '.tmp'
  with open(temporary, 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(temporary, path)


def _write_npy(path: str, array: np.ndarray) -> None:
  temporary = path + '.tmp'
  with open(temporary, 'wb') as f:
    np.save(f, array, allow_pickle=False)
  os.replace(temporary, path)


def _shard_done(root: str, names: list[str], index: int) -> bool:
  return all(os.path.isfile(shard_path(root, name, index)) for name in names)


def _check_existing(out: str, wanted: dict[str, Any]) -> dict[str, Any] | None:
  """The saved metadata of a cache in `out` if it matches `wanted`; None when `out` is empty or absent."""
  if not os.path.exists(out):
    return None
  if not os.path.isdir(out):
    raise ValueError(f'{out} is a file, not a cache folder; pass a new --out')
  if not os.path.isfile(os.path.join(out, META)):
    if os.listdir(out):
      raise ValueError(f'{out} is not empty and holds no {META}; pass a new or empty --out')
    return None
  saved = read_meta(out)
  differences = differences_from(saved, wanted)
  if differences:
    raise ValueError(
      f'{out} holds a cache with a different fingerprint ({"; ".join(differences[:3])}); '
      f'pass a new --out, or the flags that wrote it'
    )
  return saved


def write_cache(
  config,
  out: str,
  num_tokens: int,
  dtype: str = 'bfloat16',
  *,
  shard_tokens: int | None = None,
  progress: bool = True,
  mesh=None,
  model=None,
  on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
  """Writes (or finishes) the cache of `config.hookpoints` over the first `num_tokens` tokens of `config.dataset`.

  `num_tokens` is rounded down to whole batches of `config.batch_size`; `shard_tokens` (default: about 512 MiB
  per hookpoint shard) up to whole batches. A folder with the same fingerprint is continued at its first missing
  shard, a complete one is left alone; a different fingerprint raises ValueError and nothing is touched.
  `on_shard(index)` is called after each shard is on disk (tests interrupt the writer there). Returns a summary:
  status ('written', 'resumed' or 'complete'), tokens, tokens_written, seconds, tokens_per_s, shards, bytes.
  """
  import jax
  import jax.numpy as jnp
  from tqdm.auto import tqdm

  from saejax import models
  from saejax import sharding as shd
  from saejax.data.lm import LMActivationSource

  if jax.process_count() > 1:
    raise ValueError('experiments.cache runs as one process; start it on one host')
  wanted = {**describe(config, num_tokens, dtype), 'dataset_identity': dataset_identity(config.dataset)}
  if shard_tokens is not None:
    rounded = -(-max(1, shard_tokens) // config.batch_size) * config.batch_size
    wanted['shard_tokens'] = min(rounded, wanted['tokens'])
  saved = _check_existing(out, wanted)
  if saved is not None and os.path.isfile(os.path.join(out, COMPLETE)):
    if os.path.exists(saved.get('model_path') or '') and path_identity(saved['model_path']) != saved['model_identity']:
      raise ValueError(f'{out} holds a cache of {saved["model_path"]}, whose files changed since; pass a new --out')
    complete = read_json(os.path.join(out, COMPLETE), 'delete the folder and write the cache again')
    return {
      'status': 'complete',
      'out': out,
      'tokens': saved['tokens'],
      'tokens_written': 0,
      'seconds': 0.0,
      'tokens_per_s': 0.0,
      'shards': saved['num_shards'],
      'bytes': complete.get('bytes', 0),
    }

  mesh = mesh if mesh is not None else shd.make_mesh(config.mesh_data, config.mesh_model)
  lm_dtype = jnp.dtype(config.resolved_lm_dtype(tuning.platform_of(mesh)))
  model = model if model is not None else models.load_pretrained(config.model, dtype=lm_dtype, mesh=mesh)
  source_config = dataclasses.replace(config, source='lm', d_in=model.d_model, eval_tokens=0)
  source = LMActivationSource(source_config, shd.batch_sharding(mesh), model=model)  # checks the hookpoints
  d = model.d_model
  store = storage_dtype(dtype)
  if 'shard_tokens' not in wanted:
    per_batch = config.batch_size * d * store.itemsize
    wanted['shard_tokens'] = max(1, SHARD_BYTES // per_batch) * config.batch_size
  wanted['shard_tokens'] = min(wanted['shard_tokens'], wanted['tokens'])
  meta = {**wanted, 'd_in': d, 'model_path': model.path, 'model_identity': path_identity(model.path)}
  meta['num_shards'] = -(-meta['tokens'] // meta['shard_tokens'])
  meta['fingerprint'] = fingerprint(meta)
  if saved is not None:
    _check_existing(out, {'fingerprint': meta['fingerprint'], **meta})
  else:
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, META), meta)  # first: a folder with anything in it says what it is
  names = [*meta['hookpoints'], TOKENS]
  for name in names:
    os.makedirs(os.path.join(out, name), exist_ok=True)

  batches_per_shard = meta['shard_tokens'] // config.batch_size
  num_batches = meta['tokens'] // config.batch_size
  first = next((i for i in range(meta['num_shards']) if not _shard_done(out, names, i)), meta['num_shards'])
  stream = source.tokens
  progress_path = os.path.join(out, PROGRESS)
  resumed = os.path.isfile(progress_path) and read_json(progress_path, 'delete it to resume by seeking')
  if first and resumed and resumed.get('shards') == first:
    stream.load_state_dict(resumed['stream'])  # a text stream continues without re-tokenizing
  stream.seek(first * batches_per_shard)
  rows_per_batch = config.batch_size // config.context_length
  started = time.time()
  bar = tqdm(
    total=meta['tokens'],
    initial=first * meta['shard_tokens'],
    desc='cache',
    unit='tok',
    unit_scale=True,
    dynamic_ncols=True,
    disable=not progress,
  )

  def commit(index: int, buffers: dict[str, np.ndarray], stream_state: dict[str, Any]) -> None:
    for name in names:
      _write_npy(shard_path(out, name, index), buffers[name])
    _write_json(progress_path, {'shards': index + 1, 'stream': stream_state})

  def new_buffers(index: int) -> dict[str, np.ndarray]:
    tokens = shard_tokens_at(meta, index)
    buffers = {name: np.empty((tokens, d), store) for name in meta['hookpoints']}
    buffers[TOKENS] = np.empty((tokens // config.context_length, config.context_length), np.int32)
    return buffers

  def stream_state(position: int) -> dict[str, Any]:
    stream.seek(position)  # the stream has read exactly the batches before `position`: no replay
    return stream.state_dict()

  writer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  in_flight: tuple[int, concurrent.futures.Future] | None = None

  def wait_for_write() -> None:
    nonlocal in_flight
    if in_flight is not None:
      index, future = in_flight
      in_flight = None
      future.result()
      if on_shard is not None:
        on_shard(index)

  def consume(position: int, tokens_RxT: np.ndarray, acts: tuple, buffers: dict[str, np.ndarray]) -> None:
    offset = (position % batches_per_shard) * config.batch_size
    for name, acts_NxD in zip(meta['hookpoints'], acts):
      host_NxD = np.asarray(acts_NxD)
      buffers[name][offset : offset + len(host_NxD)] = host_NxD.view(store) if dtype == 'bfloat16' else host_NxD
    row = (position % batches_per_shard) * rows_per_batch
    buffers[TOKENS][row : row + len(tokens_RxT)] = tokens_RxT
    bar.update(config.batch_size)

  cast = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  pending = None
  buffers = new_buffers(first) if first < meta['num_shards'] else {}
  try:
    for position in range(first * batches_per_shard, num_batches + 1):
      state = stream_state(position) if position % batches_per_shard == 0 or position == num_batches else None
      current = None
      if position < num_batches:
        tokens_RxT = stream.batch_at(position)
        current = (position, tokens_RxT, source.activations_for(tokens_RxT, cast))  # dispatched, not awaited
      if pending is not None:
        consume(*pending, buffers)
        index = pending[0] // batches_per_shard
        if state is not None:  # `pending` was the last batch of shard `index`
          wait_for_write()
          in_flight = (index, writer.submit(commit, index, buffers, state))
          buffers = new_buffers(index + 1) if index + 1 < meta['num_shards'] else {}
      pending = current
    wait_for_write()
    final_state = stream_state(num_batches)
  finally:
    writer.shutdown(wait=True)
    bar.close()
  seconds = time.time() - started
  written = meta['tokens'] - first * meta['shard_tokens']
  total_bytes = sum(
    os.path.getsize(shard_path(out, name, i)) for name in meta['hookpoints'] for i in range(meta['num_shards'])
  )
  _write_json(
    os.path.join(out, COMPLETE),
    {'tokens': meta['tokens'], 'seconds': round(seconds, 3), 'bytes': total_bytes, 'stream': final_state},
  )
  return {
    'status': 'resumed' if first else 'written',
    'out': out,
    'tokens': meta['tokens'],
    'tokens_written': written,
    'seconds': seconds,
    'tokens_per_s': written / seconds if seconds > 0 else 0.0,
    'shards': meta['num_shards'],
    'bytes': total_bytes,
  }
