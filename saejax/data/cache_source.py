"""Training from an activation cache (`--config.source=cache --config.dataset=DIR`; layout in `saejax.data.cache`).

Order: the cache's `tokens / context_length` sequences are read in a fixed permutation per epoch, drawn from
`(data_seed, epoch)`, and the epochs follow one another as one stream of sequences; batch p is sequences
`p * rows ... (p + 1) * rows - 1` of that stream (`rows = batch_size / context_length`). The order depends on
neither `num_tokens` nor the batch size, so a shorter run's batches are a prefix of a longer one's, and the
position alone (in every checkpoint) resumes exactly. With several processes each reads only its rows of every
batch (`tokens.host_row_slice`) and `place_host_batch` assembles the global batch on the mesh.

Everything about the cache is checked when the source is built, before any training: it is complete, every
shard has its size, and its model, hookpoints, context length, d_in, LM dtype and special-token handling are
the config's; the run does not ask for more tokens than `cache_epochs` passes hold.

Held-out evaluation still runs the LM: `final_report` loads `config.model` then (and only then) and evaluates as
the LM source does (`lm.held_out_report`) on `eval_tokens` tokens of `eval_dataset`, or of the dataset the cache
was written from, starting right after the tokens the cache holds (never trained on).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from saejax import tuning
from saejax.data import cache as cache_lib
from saejax.data.base import ActivationSource, place_host_batch
from saejax.data.tokens import host_row_slice

ONE_HOST = {'process_index': 0, 'process_count': 1}  # every host reads all held-out rows, then keeps its own


def sequence_order(num_sequences: int, data_seed: int, epoch: int) -> np.ndarray:
  """The permutation of the cache's sequences in `epoch` (int64 [num_sequences])."""
  return np.random.default_rng([int(data_seed), int(epoch)]).permutation(num_sequences)


def check_config(meta: dict[str, Any], config, root: str) -> None:
  """ValueError (one line) when the config's view of the data disagrees with what the cache holds."""
  missing = [h for h in config.hookpoints if h not in meta['hookpoints']]
  if missing:
    raise ValueError(
      f'the cache {root} holds no hookpoint {missing[0]!r} (it has {", ".join(meta["hookpoints"])}); '
      f'pass --config.hookpoint= one of those, or write a cache of it'
    )
  for field, flag in (
    ('model', 'model'),
    ('context_length', 'context_length'),
    ('d_in', 'd_in'),
    ('lm_dtype', 'lm_dtype'),
    ('exclude_special_tokens', 'exclude_special_tokens'),
  ):
    value = config.resolved_lm_dtype() if field == 'lm_dtype' else getattr(config, field)
    if value != meta[field]:
      raise ValueError(
        f'the cache {root} was written with {field}={meta[field]!r} but the config has {value!r}; '
        f'pass --config.{flag}={meta[field]}'
      )


class CacheActivationSource(ActivationSource):
  """`batch_size`-token float32 batches of `config.hookpoints` from the cache folder `config.dataset`."""

  def __init__(
    self, config, sharding: NamedSharding, process_index: int | None = None, process_count: int | None = None
  ):
    super().__init__(sharding)
    root = config.dataset
    self.cache = cache_lib.open_cache(root)
    meta = self.cache.meta
    check_config(meta, config, root)
    self.config = config
    self.meta = meta
    self._hookpoints = config.hookpoints
    self.hookpoint = self._hookpoints[0]
    self.d_in = meta['d_in']
    self.batch_size = config.batch_size
    self.context_length = meta['context_length']
    self.rows = config.batch_size // self.context_length
    self.num_sequences = meta['tokens'] // self.context_length
    self.sequences_per_shard = meta['shard_tokens'] // self.context_length
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    self.host_rows = host_row_slice(self.rows, process_index, process_count)
    needed = config.num_steps * self.rows
    if needed > config.cache_epochs * self.num_sequences:
      raise ValueError(
        f'num_tokens={config.num_tokens} needs {needed * self.context_length} tokens but the cache {root} holds '
        f'{meta["tokens"]} (cache_epochs={config.cache_epochs}); pass fewer --config.num_tokens, more '
        f'--config.cache_epochs, or write a bigger cache'
      )
    self.eval_tokens = config.eval_tokens
    self.eval_dataset = config.eval_dataset or meta['dataset']
    if self.eval_tokens > 0:
      _check_eval_dataset(config.eval_dataset, meta, root)
    self._held_out = None  # [batches, rows_per_host, T] held-out tokens, read at the first final_report
    self._order = functools.lru_cache(maxsize=2)(
      lambda epoch: sequence_order(self.num_sequences, config.data_seed, epoch)
    )

  @property
  def hookpoints(self) -> list[str]:
    return list(self._hookpoints)

  def sequences_at(self, position: int) -> np.ndarray:
    """Cache sequence ids of this host's rows of batch `position` (int64 [rows_per_host])."""
    if position < 0:
      raise ValueError(f'position={position} must be non-negative')
    stream = position * self.rows + np.arange(self.rows)[self.host_rows]
    epochs, within = np.divmod(stream, self.num_sequences)
    ids = np.empty(len(stream), np.int64)
    for epoch in np.unique(epochs):
      ids[epochs == epoch] = self._order(int(epoch))[within[epochs == epoch]]
    return ids

  def _gather(self, name: str, ids: np.ndarray, per_sequence: int) -> np.ndarray:
    """Rows of sequences `ids` from the shards of `name` ([len(ids) * per_sequence, ...] when per_sequence > 1)."""
    shards, offsets = np.divmod(ids, self.sequences_per_shard)
    parts = []
    for shard, offset in zip(shards.tolist(), offsets.tolist()):
      array = self.cache.shard(name, shard)
      parts.append(array[offset * per_sequence : (offset + 1) * per_sequence])
    return np.concatenate(parts)

  def host_batches_at(self, position: int) -> tuple[np.ndarray, ...]:
    """This host's rows of batch `position` per hookpoint, [rows_per_host * T, d] in the cache dtype."""
    ids = self.sequences_at(position)
    return tuple(self._gather(name, ids, self.context_length) for name in self._hookpoints)

  def token_batch(self, position: int) -> np.ndarray:
    """The token ids of this host's rows of batch `position` (int32 [rows_per_host, T])."""
    return self._gather(cache_lib.TOKENS, self.sequences_at(position), 1)

  def batches_at(self, position: int) -> tuple[jax.Array, ...]:
    return tuple(self._to_float32(place_host_batch(b, self.sharding)) for b in self.host_batches_at(position))

  def batch_at(self, position: int) -> jax.Array:
    return self.batches_at(position)[0]

  @functools.cached_property
  def _to_float32(self):
    if self.meta['dtype'] == 'bfloat16':  # bf16 travels to the device as bf16 (half the bytes), widens there
      return jax.jit(lambda a: a.astype(jnp.float32), out_shardings=self.sharding)
    return lambda a: a

  def state_dict(self) -> dict[str, Any]:
    return {'position': self.position, 'cache_fingerprint': self.meta['fingerprint']}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    saved = state.get('cache_fingerprint')
    if saved is not None and saved != self.meta['fingerprint']:
      raise ValueError(
        f'the checkpoint was trained on another cache (fingerprint {saved[:12]}, {self.config.dataset} has '
        f'{self.meta["fingerprint"][:12]}); resume with the cache it was trained on'
      )
    super().load_state_dict(state)

  @functools.cached_property
  def model(self):
    """The LM, loaded on first use (held-out evaluation at the end of a run)."""
    from saejax import models

    dtype = jnp.dtype(self.config.resolved_lm_dtype(tuning.platform_of(self.sharding.mesh)))
    return models.load_pretrained(self.config.model, dtype=dtype, mesh=self.sharding.mesh)

  def held_out_tokens(self) -> np.ndarray:
    """`eval_tokens` worth of whole batches of this host's rows: [batches, rows_per_host, T] int32."""
    from saejax.data import lm

    num_batches = max(1, -(-self.eval_tokens // self.batch_size))
    needed = num_batches * self.rows
    if self.config.eval_dataset:
      per_read = self.rows
      stream = lm.open_tokens(self.eval_dataset, self.config, per_read, self.model.path, **ONE_HOST)
    else:  # the cache's dataset, in the cache's batches, from the first batch after the cache
      per_read = self.meta['batch_size'] // self.context_length
      written = dataclasses.replace(
        self.config, text_column=self.meta['text_column'], dataset_split=self.meta['dataset_split']
      )
      stream = lm.open_tokens(self.meta['dataset'], written, per_read, self.model.path, **ONE_HOST)
      stream.load_state_dict(self.cache.complete['stream'])
    reads = -(-needed // per_read)
    rows_NxT = np.concatenate([stream.batch_at(stream.position + i) for i in range(reads)])[:needed]
    return rows_NxT.reshape(num_batches, self.rows, self.context_length)[:, self.host_rows]

  def final_report(self, params_S, spec, held_out_position: int, hookpoint: str | None = None) -> dict[str, Any]:
    """As `LMActivationSource.final_report`, on held-out text (see the module docstring)."""
    from saejax.data import lm

    del held_out_position  # the cache's own batches were all trainable; held-out text comes from the dataset
    if self.eval_tokens <= 0:
      return {}
    if self._held_out is None:
      self._held_out = self.held_out_tokens()
    return lm.held_out_report(
      self.model,
      hookpoint or self.hookpoint,
      params_S,
      spec,
      lambda p: self._held_out[p],
      0,
      self.eval_tokens,
      self.batch_size,
    )


def _check_eval_dataset(eval_dataset: str, meta: dict[str, Any], root: str) -> None:
  """The held-out text is there: `eval_dataset`'s files exist, or the cache's dataset is unchanged since."""
  if eval_dataset:
    cache_lib.dataset_identity(eval_dataset)  # FileNotFoundError (one line) for missing local data
    return
  if cache_lib.dataset_identity(meta['dataset']) != meta['dataset_identity']:
    raise ValueError(
      f'the dataset {meta["dataset"]!r} that the cache {root} was written from changed since, so the held-out '
      f'tokens after it are unknown; pass --config.eval_dataset=TEXT or --config.eval_tokens=0'
    )
