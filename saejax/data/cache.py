"""The activation cache on disk: run the LM once, write its activations, train many times from them.

Layout of a cache folder `DIR` (`python -m experiments.cache --config=PRESET --out=DIR --tokens=N`):

    DIR/cache.json                         what the cache holds (written first): `fingerprint`, a sha256 over the
                                           model (its `--config.model` string and the size and first-MB hash of
                                           every file of the loaded model), the dataset (its string and the same
                                           identity of its local files), the hookpoints, context length, dtype and
                                           the other fields below; readable fields `model`, `model_path`,
                                           `dataset`, `hookpoints`, `d_in`, `tokens`, `shard_tokens`,
                                           `num_shards`, `context_length`, `batch_size`, `dtype`, `lm_dtype`,
                                           `exclude_special_tokens`, `dataset_split`, `text_column`
    DIR/<hookpoint>/shard_00000.npy        activations [shard_tokens, d_in] (the last shard may be shorter), one
                                           `.npy` per shard: float32, or bfloat16 stored as its uint16 bits
                                           (`np.load(path, mmap_mode='r').view(ml_dtypes.bfloat16)`; `open_shard`)
    DIR/tokens/shard_00000.npy             the int32 token ids [shard_tokens / context_length, context_length]
                                           the activations of that shard came from
    DIR/progress.json                      shards written so far and the token stream's state after them
    DIR/COMPLETE                           written last: JSON with tokens, seconds and the token stream's state
                                           after the cache's tokens (where held-out evaluation text starts)

Shard i holds the LM batches `i * shard_tokens / batch_size ...` of the dataset in order (each batch is
`batch_size / context_length` whole sequences, flattened row-major), so row r of shard i is token
`(i * shard_tokens + r) % context_length` of sequence `(i * shard_tokens + r) // context_length`. BOS/EOS
positions, with `exclude_special_tokens`, hold the activation the LM source would feed (the nearest earlier
kept position). Every shard is written to a temporary name and renamed, so a killed writer leaves only whole
shards; rerunning the same command continues at the first missing shard. This module owns the layout, the
fingerprint and the checks (`open_cache`); `saejax.data.cache_writer` writes a cache, and
`saejax.data.cache_source` reads one as a training source.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import numpy as np

META = 'cache.json'
COMPLETE = 'COMPLETE'
PROGRESS = 'progress.json'
TOKENS = 'tokens'
FORMAT = 1
DTYPES = ('bfloat16', 'float32')
SHARD_BYTES = 512 * 2**20  # default target size of one hookpoint's shard
HEAD_BYTES = 2**20  # a file's identity: its size and the sha256 of its first MiB
_WRITE_HINT = 'write one with python -m experiments.cache --config=PRESET --out=DIR --tokens=N'


def shard_name(index: int) -> str:
  return f'shard_{index:05d}.npy'


def shard_path(root: str, name: str, index: int) -> str:
  """`root/<name>/shard_<index>.npy`; `name` is a hookpoint or `tokens`."""
  return os.path.join(root, name, shard_name(index))


def storage_dtype(dtype: str) -> np.dtype:
  """What a shard's `.npy` holds: uint16 bits for bfloat16."""
  return np.dtype(np.uint16) if dtype == 'bfloat16' else np.dtype(np.float32)


def open_shard(path: str, dtype: str) -> np.ndarray:
  """A read-only memory map of one activation shard, as `dtype` (bfloat16 via ml_dtypes)."""
  array = np.load(path, mmap_mode='r', allow_pickle=False)
  if dtype == 'bfloat16':
    import ml_dtypes

    return array.view(ml_dtypes.bfloat16)
  return array


def shard_tokens_at(meta: dict[str, Any], index: int) -> int:
  """Tokens (activation rows) of shard `index`: `shard_tokens`, fewer for the last one."""
  return min(meta['shard_tokens'], meta['tokens'] - index * meta['shard_tokens'])


# --- identity and fingerprint -------------------------------------------------------------------------------------


def file_identity(path: str) -> dict[str, Any]:
  """Size and sha256 of the first MiB: cheap, and changes when the file is replaced by another."""
  with open(path, 'rb') as f:
    head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()
  return {'size': os.path.getsize(path), 'head_sha256': head}


def path_identity(path: str) -> dict[str, Any]:
  """`file_identity` of a file, or of every (non-hidden) file under a folder by relative path."""
  if os.path.isfile(path):
    return {os.path.basename(path): file_identity(path)}
  files = {}
  for root, dirs, names in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(n for n in names if not n.startswith('.')):
      full = os.path.join(root, name)
      files[os.path.relpath(full, path)] = file_identity(full)
  return files


def dataset_identity(dataset: str) -> dict[str, Any]:
  """Identity of a dataset's local files (token rows or text), or its Hub id."""
  from saejax.data import text, tokens

  if dataset.endswith(tokens.MEMMAP_SUFFIXES):
    if not os.path.isfile(dataset):
      raise FileNotFoundError(f'no token file at {dataset!r}; pass --config.dataset=PATH of an existing file')
    return {'files': {os.path.abspath(dataset): file_identity(dataset)}}
  local = text.resolve_data_files(dataset)
  if local is None:
    return {'hub': dataset}
  return {'files': {os.path.abspath(f): file_identity(f) for f in local[1]}}


def describe(config, num_tokens: int, dtype: str) -> dict[str, Any]:
  """The fields of cache.json that the config determines (no model needed)."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; use bfloat16 or float32')
  if config.source == 'cache':
    raise ValueError('config.source=cache reads a cache; write one from the LM with --config.source=lm')
  if config.batch_size % config.context_length:
    raise ValueError(
      f'batch_size={config.batch_size} must be a multiple of context_length={config.context_length} (whole sequences)'
    )
  tokens = num_tokens // config.batch_size * config.batch_size
  if tokens <= 0:
    raise ValueError(f'tokens={num_tokens} is less than one batch ({config.batch_size}); pass more --tokens')
  return {
    'format': FORMAT,
    'model': config.model,
    'dataset': config.dataset,
    'dataset_split': config.dataset_split,
    'text_column': config.text_column,
    'hookpoints': config.hookpoints,
    'context_length': config.context_length,
    'batch_size': config.batch_size,
    'tokens': tokens,
    'dtype': dtype,
    'lm_dtype': config.resolved_lm_dtype(),
    'exclude_special_tokens': config.exclude_special_tokens,
  }


def fingerprint(meta: dict[str, Any]) -> str:
  """sha256 of everything that determines the cache's bytes (readable fields and file identities)."""
  keys = sorted(k for k in meta if k not in ('fingerprint', 'model_path', 'num_shards'))
  return hashlib.sha256(json.dumps({k: meta[k] for k in keys}, sort_keys=True).encode()).hexdigest()


def differences_from(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """'field: old -> new' per differing readable field; file identities and hashes are only named."""
  return [
    f'{k} changed' if isinstance(v, dict) or k == 'fingerprint' else f'{k}: {saved.get(k)!r} -> {v!r}'
    for k, v in wanted.items()
    if saved.get(k) != v
  ]


# --- reading ------------------------------------------------------------------------------------------------------


def read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f'{path} is unreadable ({type(error).__name__}); {what}') from error


def read_meta(root: str) -> dict[str, Any]:
  path = os.path.join(root, META)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no activation cache at {root} (no {META}); {_WRITE_HINT}')
  return read_json(path, f'write the cache again into a new folder ({_WRITE_HINT})')


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, header bytes) of a .npy file without mapping it."""
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype, f.tell()


def check_shard(path: str, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
  """None when `path` is a whole .npy of `shape` and `dtype`, else what is wrong with it."""
  if not os.path.isfile(path):
    return 'is missing'
  try:
    found_shape, found_dtype, header = _npy_header(path)
  except (OSError, ValueError) as error:
    return f'is not a readable .npy ({type(error).__name__})'
  if tuple(found_shape) != tuple(shape) or found_dtype != dtype:
    return f'holds {found_dtype} {tuple(found_shape)}, not {np.dtype(dtype)} {tuple(shape)}'
  if os.path.getsize(path) != header + int(np.prod(shape)) * dtype.itemsize:
    return f'has {os.path.getsize(path)} bytes, not the {header + int(np.prod(shape)) * dtype.itemsize} its header says'
  return None


@dataclasses.dataclass
class Cache:
  """A complete, checked cache folder: its metadata and completion record; shards are mapped on demand."""

  root: str
  meta: dict[str, Any]
  complete: dict[str, Any]

  def __post_init__(self):
    self._open = functools.lru_cache(maxsize=64)(self._map)  # bounds the open memory maps

  @property
  def hookpoints(self) -> list[str]:
    return list(self.meta['hookpoints'])

  def shard(self, name: str, index: int) -> np.ndarray:
    """Shard `index` of hookpoint `name` ([tokens, d], in the cache dtype) or of `tokens` ([rows, T] int32)."""
    return self._open(name, index)

  def _map(self, name: str, index: int) -> np.ndarray:
    path = shard_path(self.root, name, index)
    if name == TOKENS:
      return np.load(path, mmap_mode='r', allow_pickle=False)
    return open_shard(path, self.meta['dtype'])


def open_cache(root: str) -> Cache:
  """A complete cache, every shard checked for presence, shape and dtype; one-line errors otherwise."""
  meta = read_meta(root)
  if meta.get('format') != FORMAT:
    raise ValueError(f'{root} holds a cache of format {meta.get("format")!r}, not {FORMAT}; write it again')
  if not os.path.isfile(os.path.join(root, COMPLETE)):
    raise ValueError(
      f'{root} is a half-written cache (no {COMPLETE} marker); rerun the python -m experiments.cache command that '
      f'wrote it to finish it'
    )
  complete = read_json(os.path.join(root, COMPLETE), 'rerun the command that wrote the cache')
  store = storage_dtype(meta['dtype'])
  for index in range(meta['num_shards']):
    tokens = shard_tokens_at(meta, index)
    expected = [(name, (tokens, meta['d_in']), store) for name in meta['hookpoints']]
    expected.append((TOKENS, (tokens // meta['context_length'], meta['context_length']), np.dtype(np.int32)))
    for name, shape, dtype in expected:
      problem = check_shard(shard_path(root, name, index), shape, dtype)
      if problem:
        raise ValueError(
          f'{shard_path(root, name, index)} {problem}: the cache is damaged; write it again into a new folder'
        )
  return Cache(root, meta, complete)


# --- writing ------------------------------------------------------------------------------------------------------
