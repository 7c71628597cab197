"""Pre-tokenised token files (Pythia's Pile): fixed-length rows of token ids, memory-mapped, read in file order.

A `.bin` file is raw uint16 token ids, `row_length` (2049 for Pythia) per row, no header: what Pythia's
pre-shuffled Pile is after unsharding. A `.npy` file holds a uint16 or int32 array `[N, row_length]`. Several
files are read one after the other as one sequence of rows. Nothing is read until a batch asks for it: global
batch p is rows `p*R ... (p+1)*R - 1` (each truncated to `context_length` tokens), so any batch can be read
directly and resuming is a seek. The final rows that do not fill a global batch are never handed out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from saejax.data.tokens import TokenStream

PYTHIA_ROW_LENGTH = 2049
NPY_DTYPES = (np.dtype(np.uint16), np.dtype(np.int32))


def open_token_file(path: str, row_length: int | None = None) -> np.ndarray:
  """A read-only memory map `[rows, row_length]` of one .bin (uint16) or .npy (uint16/int32) token file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no token file at {path!r}; pass a .bin of uint16 token ids or a .npy [rows, tokens]')
  if path.endswith('.bin'):
    row_length = row_length or PYTHIA_ROW_LENGTH
    size = os.path.getsize(path)
    row_bytes = row_length * np.dtype(np.uint16).itemsize
    if size == 0:
      raise ValueError(f'token file {path!r} is empty; pass a file with at least one row')
    if size % row_bytes:
      raise ValueError(
        f'token file {path!r} has {size} bytes, not a whole number of rows of {row_length} uint16 '
        f'tokens ({row_bytes} bytes); pass row_length= or unshard the file first'
      )
    return np.memmap(path, dtype=np.uint16, mode='r', shape=(size // row_bytes, row_length))
  if path.endswith('.npy'):
    try:
      tokens_NxL = np.load(path, mmap_mode='r', allow_pickle=False)
    except ValueError as err:
      raise ValueError(
        f'token file {path!r} is not a readable .npy array ({err}); pass a [rows, tokens] '
        f'uint16/int32 array saved with np.save'
      ) from err
    if tokens_NxL.ndim != 2 or tokens_NxL.dtype not in NPY_DTYPES:
      raise ValueError(
        f'token file {path!r} holds {tokens_NxL.dtype} {tokens_NxL.shape}; pass a 2-D '
        f'[rows, tokens] array of uint16 or int32'
      )
    if tokens_NxL.size == 0:
      raise ValueError(f'token file {path!r} is empty ({tokens_NxL.shape}); pass a file with at least one row')
    if row_length is not None and tokens_NxL.shape[1] != row_length:
      raise ValueError(
        f'token file {path!r} has rows of {tokens_NxL.shape[1]} tokens, not row_length='
        f'{row_length}; pass the matching row_length'
      )
    return tokens_NxL
  raise ValueError(f'cannot read token file {path!r}; pass a .bin (raw uint16) or .npy file')


class MemmapTokenStream(TokenStream):
  """Random-access batches of rows from pre-tokenised files; `context_length` defaults to the row length.

  A `context_length` below the row length keeps the first `context_length` tokens of each row.
  """

  random_access = True

  def __init__(
    self,
    path: str | os.PathLike | Sequence[str | os.PathLike],
    global_rows: int,
    context_length: int | None = None,
    *,
    row_length: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    paths = [os.fspath(path)] if isinstance(path, str | os.PathLike) else [os.fspath(p) for p in path]
    if not paths:
      raise FileNotFoundError('no token files given; pass a .bin or .npy path (or a list of them)')
    self.paths = paths
    self.files = [open_token_file(p, row_length) for p in paths]
    lengths = sorted({f.shape[1] for f in self.files})
    if len(lengths) > 1:
      raise ValueError(f'token files have different row lengths {lengths}; pass files with one row length')
    self.row_length = lengths[0]
    context_length = self.row_length if context_length is None else context_length
    if context_length > self.row_length:
      raise ValueError(
        f'context_length={context_length} is longer than the rows of {paths[0]!r} '
        f'({self.row_length} tokens); pass context_length <= {self.row_length}'
      )
    super().__init__(global_rows, context_length, process_index, process_count)
    self.file_starts = np.cumsum([0] + [len(f) for f in self.files])
    self.num_rows = int(self.file_starts[-1])
    if self.num_rows < global_rows:
      raise ValueError(
        f'{paths[0]!r} has {self.num_rows} rows, fewer than one batch of global_rows='
        f'{global_rows}; pass more data or fewer rows'
      )

  @property
  def num_batches(self) -> int:
    return self.num_rows // self.global_rows

  def rows(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) across the files in order, first `context_length` tokens, as int32 [stop-start, T]."""
    parts = []
    first = int(np.searchsorted(self.file_starts, start, side='right')) - 1
    for index in range(first, len(self.files)):
      begin = max(start, int(self.file_starts[index]))
      end = min(stop, int(self.file_starts[index + 1]))
      if begin >= end:
        break
      offset = int(self.file_starts[index])
      parts.append(self.files[index][begin - offset : end - offset, : self.context_length])
    tokens_RxT = parts[0].astype(np.int32) if len(parts) == 1 else np.concatenate(parts).astype(np.int32)
    return tokens_RxT

  def batch_at(self, position: int) -> np.ndarray:
    self._check_position(position)
    start = position * self.global_rows + self.host_rows.start
    return self.rows(start, start + self.rows_per_host)
