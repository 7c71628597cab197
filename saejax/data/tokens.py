"""Token streams: deterministic, resumable `[rows_per_host, context_length]` int32 batches for the LM source.

One interface for every token source (`TokenStream`):

- `batch_at(position)` returns global batch `position`, this host's rows only. A global batch is `global_rows`
  consecutive sequences of the source; host h of P takes rows `h*R/P ... (h+1)*R/P - 1`, so stacking every
  host's batch in process order gives the single-host batch.
- `next_batch()` is `batch_at(self.position)` and then advances `position`; iterating a stream yields batches
  until the source runs out, and `batch_at` past the end raises `StreamExhaustedError`. A final partial batch
  (fewer than `global_rows` sequences left) is dropped, as is a final partial sequence.
- `state_dict()` / `load_state_dict()` save and restore the position exactly (JSON-serialisable).

Random-access sources (`random_access = True`, the pre-tokenised memmap in `saejax.data.memmap`) answer
`batch_at` at any position in O(1). A text source is a stream: `batch_at` at the next position is cheap,
a later one tokenizes the batches in between, an earlier one replays from the first document; a restored
text stream continues at the exact token without re-tokenizing what it already consumed.

The sources: `saejax.data.memmap` (pre-tokenised rows) and `saejax.data.text` (documents tokenized on the fly).

Excluding BOS/EOS positions: the LM must still see every token (they are context), so masking happens on the
activations. `token_mask(tokens_BxT, exclude_ids)` is True at positions to keep; a consumer flattens it with
the activations and drops (or zero-weights) the False rows before they reach the SAE.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

MEMMAP_SUFFIXES = ('.bin', '.npy')


class StreamExhaustedError(IndexError):
  """The source has no full batch at the requested position."""


def token_mask(tokens_BxT: np.ndarray, exclude_ids: Iterable[int]) -> np.ndarray:
  """Bool [B, T], False where the token is one of `exclude_ids` (e.g. BOS/EOS), True where to keep it."""
  exclude = np.asarray(sorted({int(i) for i in exclude_ids}), dtype=np.int64)
  return ~np.isin(np.asarray(tokens_BxT), exclude)


def host_row_slice(global_rows: int, process_index: int, process_count: int) -> slice:
  """Rows of a global batch of `global_rows` that host `process_index` of `process_count` owns."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  if global_rows < 1 or global_rows % process_count:
    raise ValueError(
      f'global_rows={global_rows} does not split over {process_count} hosts; '
      f'pass a positive multiple of {process_count}'
    )
  rows = global_rows // process_count
  return slice(process_index * rows, (process_index + 1) * rows)


class TokenStream(abc.ABC):
  """Fixed-shape int32 token batches `[rows_per_host, context_length]` in a deterministic order."""

  random_access = False

  def __init__(
    self, global_rows: int, context_length: int, process_index: int | None = None, process_count: int | None = None
  ):
    if context_length < 1:
      raise ValueError(f'context_length={context_length} must be positive')
    if process_index is None or process_count is None:
      import jax

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.host_rows = host_row_slice(global_rows, process_index, process_count)
    self.global_rows = global_rows
    self.context_length = context_length
    self.process_index = process_index
    self.process_count = process_count
    self.rows_per_host = global_rows // process_count
    self.position = 0  # global batches handed out by next_batch

  @property
  def num_batches(self) -> int | None:
    """Full global batches in the source, or None when it is a stream of unknown length."""
    return None

  @abc.abstractmethod
  def batch_at(self, position: int) -> np.ndarray:
    """This host's rows of global batch `position`: int32 [rows_per_host, context_length]."""

  def next_batch(self) -> np.ndarray:
    batch_RxT = self.batch_at(self.position)
    self.position += 1
    return batch_RxT

  def seek(self, position: int) -> None:
    """Makes `position` the next batch handed out (a text stream pays for the move on the next read)."""
    if position < 0:
      raise ValueError(f'position={position} must be non-negative')
    self.position = int(position)

  def __iter__(self) -> Iterator[np.ndarray]:
    while True:
      try:
        yield self.next_batch()
      except StreamExhaustedError:
        return

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable position; restoring it with the same source and shapes resumes exactly."""
    return {'position': self.position, 'global_rows': self.global_rows, 'context_length': self.context_length}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    for key in ('global_rows', 'context_length'):
      if key in state and int(state[key]) != getattr(self, key):
        raise ValueError(
          f'the saved token-stream state has {key}={state[key]} but this stream has '
          f'{getattr(self, key)}; resume with the saved {key}'
        )
    self.seek(int(state['position']))

  def _check_position(self, position: int) -> None:
    if position < 0:
      raise ValueError(f'position={position} must be non-negative')
    if self.num_batches is not None and position >= self.num_batches:
      raise StreamExhaustedError(
        f'batch {position} is past the end of the data ({self.num_batches} full batches '
        f'of {self.global_rows}x{self.context_length} tokens); supply more data'
      )


def open_token_stream(
  dataset: str | Sequence[str], global_rows: int, context_length: int, *, tokenizer: Any = None, **kwargs
) -> TokenStream:
  """A memmap stream for .bin/.npy token files, else a text stream; `kwargs` go to the stream's constructor."""
  paths = [dataset] if isinstance(dataset, str) else [os.fspath(f) for f in dataset]
  if paths and all(p.endswith(MEMMAP_SUFFIXES) for p in paths):
    from saejax.data.memmap import MemmapTokenStream

    return MemmapTokenStream(dataset, global_rows, context_length, **kwargs)
  from saejax.data.text import TextTokenStream

  return TextTokenStream(dataset, tokenizer, global_rows, context_length, **kwargs)
