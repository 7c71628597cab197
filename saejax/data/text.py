"""Text token streams: documents from `datasets`, tokenized with the model's tokenizer, in fixed rows.

Text is tokenized with the model's `tokenizer.json`, or the tokenizer a `.gguf` file's metadata describes (no
special tokens added unless asked), each document is followed by `eos_id`, and the concatenation is cut into
`context_length`-token sequences (recipe section 3). Every host reads and tokenizes the whole text stream and
keeps its own rows. The stream's state records the documents consumed and the token offset into the next one,
so a restore skips those documents without tokenizing them (the `TokenStream` contract is in `saejax.data.tokens`).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from saejax.data.tokens import MEMMAP_SUFFIXES, StreamExhaustedError, TokenStream

# File extensions `datasets` can stream, by builder; compression suffixes are looked through.
BUILDERS = {
  '.json': 'json',
  '.jsonl': 'json',
  '.txt': 'text',
  '.text': 'text',
  '.parquet': 'parquet',
  '.arrow': 'arrow',
  '.csv': 'csv',
}
COMPRESSION = ('.gz', '.zst', '.bz2', '.xz', '.lz4')
EOS_NAMES = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>', '<|eos|>')


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f'{type(err).__name__}: {text[0] if text else ""}'


def builder_for(path: str) -> str | None:
  """The `datasets` builder that reads `path`, by extension (through .gz/.zst/...), or None."""
  root, ext = os.path.splitext(path.lower())
  if ext in COMPRESSION:
    ext = os.path.splitext(root)[1]
  return BUILDERS.get(ext)


def resolve_data_files(dataset: str | Sequence[str]) -> tuple[str, list[str]] | None:
  """(builder, files in order) for local data, None for a Hub dataset id; FileNotFoundError if nothing is there.

  A folder means its data files, recursively, sorted by path; a glob means its matches, sorted.
  """
  if not isinstance(dataset, str):
    files = [os.fspath(f) for f in dataset]
  elif os.path.isdir(dataset):
    files = sorted(
      os.path.join(root, name)
      for root, _, names in os.walk(dataset)
      for name in names
      if not name.startswith('.') and builder_for(name)
    )
  elif os.path.isfile(dataset):
    files = [dataset]
  elif glob.has_magic(dataset):
    files = sorted(f for f in glob.glob(dataset, recursive=True) if os.path.isfile(f))
  elif (
    os.path.isabs(dataset)
    or dataset.startswith(('.', '~'))
    or dataset.count('/') > 1
    or builder_for(dataset)
    or dataset.endswith(MEMMAP_SUFFIXES)
  ):
    raise FileNotFoundError(
      f'no data at {dataset!r}; pass an existing json/jsonl/txt/parquet/arrow file, folder or glob, or a Hub dataset id'
    )
  else:
    return None
  missing = [f for f in files if not os.path.isfile(f)]
  if not files or missing:
    raise FileNotFoundError(
      f'no data files at {missing[0] if missing else dataset!r}; pass existing json/jsonl/txt/parquet/arrow files'
    )
  builders = {builder_for(f) for f in files}
  if None in builders or len(builders) > 1:
    raise ValueError(
      f'cannot read {dataset!r} as one dataset (builders {sorted(map(str, builders))}); '
      f'pass files of one type: {", ".join(sorted(BUILDERS))}'
    )
  return builders.pop(), files


def load_tokenizer(tokenizer: Any):
  """(tokenizers.Tokenizer, source) from a Tokenizer, a tokenizer.json file, a model folder, a `.gguf` file or a
  known model name (`smollm2`).

  `source` is where the EOS id is looked up: the folder holding tokenizer.json, the `.gguf` file (whose metadata
  names it), or None for a Tokenizer passed in. A GGUF tokenizer is rebuilt from the file's metadata
  (`saejax.models.tokenizer`).
  """
  from tokenizers import Tokenizer

  if isinstance(tokenizer, Tokenizer):
    return tokenizer, None
  if tokenizer is None:
    raise ValueError('a text dataset needs a tokenizer; pass tokenizer=<model folder with tokenizer.json, or a .gguf>')
  from saejax.models import tokenizer as tokenizer_lib

  gguf_path = tokenizer_lib.find_gguf(tokenizer)
  if gguf_path is not None:
    return tokenizer_lib.tokenizer_from_gguf(gguf_path), os.fspath(gguf_path)
  path = os.fspath(tokenizer)
  file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(
      f'no tokenizer at {file!r}; pass a model folder that contains tokenizer.json (or the tokenizer.json file '
      f'itself), or a .gguf file'
    )
  loaded = Tokenizer.from_file(file)
  loaded.no_truncation()
  loaded.no_padding()
  return loaded, os.path.dirname(os.path.abspath(file))


def resolve_eos_id(tokenizer, folder: str | None) -> int:
  """EOS id from a `.gguf` source's metadata; for a folder from its config.json, then tokenizer_config.json; then
  a well-known EOS token name."""

  def read(name: str) -> dict[str, Any]:
    path = os.path.join(folder, name) if folder else ''
    if not os.path.isfile(path):
      return {}
    with open(path) as f:
      return json.load(f)

  if folder and os.path.isfile(folder):  # a .gguf file (see `load_tokenizer`)
    from saejax.models import tokenizer as tokenizer_lib

    eos = tokenizer_lib.gguf_special_ids(folder).get('eos')
    if eos is not None:
      return int(eos)
    token = None
  else:
    eos = read('config.json').get('eos_token_id')
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    if eos is not None:
      return int(eos)
    token = read('tokenizer_config.json').get('eos_token')
    token = token.get('content') if isinstance(token, dict) else token
  for name in ([token] if token else []) + list(EOS_NAMES):
    token_id = tokenizer.token_to_id(name)
    if token_id is not None:
      return int(token_id)
  raise ValueError(
    f'cannot tell the EOS id (no eos_token_id in {folder or "the tokenizer"}, none of '
    f'{", ".join(EOS_NAMES)} in the vocabulary); pass eos_id='
  )


class TextTokenStream(TokenStream):
  """Documents from a `datasets` stream, tokenized, joined with EOS and cut into fixed-length sequences.

  `dataset`: a Hub dataset id (online only), or local json/jsonl/txt/parquet/arrow/csv data: a file, a folder,
  a glob or a list of files, read in file order. `shuffle_seed` shuffles documents (shard order and a
  `shuffle_buffer` window), deterministically for a given seed; None keeps file order.
  """

  def __init__(
    self,
    dataset: str | Sequence[str],
    tokenizer: Any,
    global_rows: int,
    context_length: int,
    *,
    eos_id: int | None = None,
    text_column: str = 'text',
    split: str = 'train',
    dataset_config: str | None = None,
    add_special_tokens: bool = False,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 10_000,
    read_batch: int = 256,
    process_index: int | None = None,
    process_count: int | None = None,
  ):
    super().__init__(global_rows, context_length, process_index, process_count)
    self.dataset = dataset if isinstance(dataset, str) else [os.fspath(f) for f in dataset]
    self.local = resolve_data_files(dataset)
    if self.local is not None:  # `datasets` fails on an empty file instead of yielding nothing
      files = [f for f in self.local[1] if os.path.getsize(f)]
      if not files:
        raise ValueError(f'dataset {self._describe()} has no documents (empty files); pass a non-empty dataset')
      self.local = (self.local[0], files)
    self.tokenizer, folder = load_tokenizer(tokenizer)
    self.eos_id = resolve_eos_id(self.tokenizer, folder) if eos_id is None else int(eos_id)
    self.text_column = text_column
    self.split = split
    self.dataset_config = dataset_config
    self.add_special_tokens = add_special_tokens
    self.shuffle_seed = shuffle_seed
    self.shuffle_buffer = shuffle_buffer
    self.read_batch = read_batch
    self._restart(0, 0)
    first = next(self._texts, None)
    if first is None:
      raise ValueError(f'dataset {self._describe()} has no documents; pass a non-empty dataset')
    self._texts = itertools.chain([first], self._texts)

  def _describe(self) -> str:
    if self.local is None:
      return repr(self.dataset)
    files = self.local[1]
    return repr(files[0]) if len(files) == 1 else f'{files[0]!r} (+{len(files) - 1} files)'

  def _open(self):
    import datasets

    try:
      if self.local is None:
        ds = datasets.load_dataset(self.dataset, self.dataset_config, split=self.split, streaming=True)
      else:
        builder, files = self.local
        ds = datasets.load_dataset(builder, data_files={self.split: files}, split=self.split, streaming=True)
    except Exception as err:
      raise FileNotFoundError(
        f'cannot open dataset {self._describe()} ({_first_line(err)}); offline, pass '
        f'local json/jsonl/txt/parquet/arrow files'
      ) from err
    if self.shuffle_seed is not None:
      ds = ds.shuffle(seed=self.shuffle_seed, buffer_size=self.shuffle_buffer)
    return ds

  def _iter_texts(self) -> Iterator[Any]:
    if self.local is not None and self.shuffle_seed is None and all(f.endswith('.jsonl') for f in self.local[1]):
      yield from self._iter_jsonl(self.local[1])
      return
    for batch in self._open().iter(batch_size=self.read_batch):
      if self.text_column not in batch:
        raise self._no_text_column(', '.join(batch))
      yield from batch[self.text_column]

  def _no_text_column(self, columns: str) -> ValueError:
    return ValueError(
      f'dataset {self._describe()} has no column {self.text_column!r} (columns: {columns}); pass text_column='
    )

  def _iter_jsonl(self, files: list[str]) -> Iterator[Any]:
    """Plain JSON Lines in file order, read directly: the same documents as `datasets`' json builder, without
    its seconds of import and dataset resolution in every process (a tiny run's largest start-up cost)."""
    for path in files:
      with open(path, encoding='utf-8') as lines:
        for number, line in enumerate(lines, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as err:
            raise ValueError(f'line {number} of {path!r} is not JSON ({err.msg}); pass JSON Lines') from None
          if not isinstance(row, dict) or self.text_column not in row:
            raise self._no_text_column(', '.join(row) if isinstance(row, dict) else type(row).__name__)
          yield row[self.text_column]

  def _restart(self, document: int, offset: int) -> None:
    """Reopens the dataset at token `offset` of document `document`, skipping earlier ones untokenized."""
    self._texts = self._iter_texts()
    skipped = sum(1 for _ in itertools.islice(self._texts, document))
    if skipped < document:
      raise ValueError(
        f'the saved state points at document {document} but dataset {self._describe()} has '
        f'{skipped}; resume with the dataset the state was saved with'
      )
    self._queue: deque[np.ndarray] = deque()
    self._document = document  # index of the document at the head of the queue (or the next one to read)
    self._documents_read = document
    self._offset = 0  # tokens of the head document already handed out
    self._available = 0  # tokens queued and not handed out
    self._cursor = 0  # the global batch the queue head starts
    if offset:
      if not self._fill() or offset >= len(self._queue[0]):
        raise ValueError(
          f'the saved state points at token {offset} of document {document}, which dataset '
          f'{self._describe()} does not have; resume with the same dataset and tokenizer'
        )
      self._offset = offset
      self._available -= offset

  def _fill(self) -> bool:
    texts = list(itertools.islice(self._texts, self.read_batch))
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(
          f'document {self._documents_read + i} of {self._describe()} has a '
          f'{type(text).__name__} in column {self.text_column!r}; pass a text column'
        )
    encodings = self.tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
    for encoding in encodings:
      tokens_L = np.empty(len(encoding.ids) + 1, dtype=np.int32)
      tokens_L[:-1] = encoding.ids
      tokens_L[-1] = self.eos_id
      self._queue.append(tokens_L)
      self._available += len(tokens_L)
    self._documents_read += len(texts)
    return bool(texts)

  def _take(self, count: int) -> np.ndarray:
    while self._available < count:
      if not self._fill():
        if self._cursor == 0:
          raise ValueError(
            f'dataset {self._describe()} has {self._available} tokens, fewer than one batch of '
            f'{self.global_rows}x{self.context_length}; pass more data or a smaller batch'
          )
        raise StreamExhaustedError(
          f'dataset {self._describe()} ran out after {self._cursor} batches of '
          f'{self.global_rows}x{self.context_length} tokens; supply more data'
        )
    parts, needed = [], count
    while needed:
      head = self._queue[0]
      stop = min(len(head), self._offset + needed)
      parts.append(head[self._offset : stop])
      needed -= stop - self._offset
      if stop == len(head):
        self._queue.popleft()
        self._document += 1
        self._offset = 0
      else:
        self._offset = stop
    self._available -= count
    return np.concatenate(parts)

  def _move_to(self, position: int) -> None:
    if position < self._cursor:
      self._restart(0, 0)
    while self._cursor < position:
      self._take(self.global_rows * self.context_length)
      self._cursor += 1

  def batch_at(self, position: int) -> np.ndarray:
    if position < 0:
      raise ValueError(f'position={position} must be non-negative')
    self._move_to(position)
    tokens_RxT = self._take(self.global_rows * self.context_length).reshape(self.global_rows, self.context_length)
    self._cursor += 1
    return np.ascontiguousarray(tokens_RxT[self.host_rows])

  def state_dict(self) -> dict[str, Any]:
    """Adds `document` (documents fully consumed) and `offset` (tokens of the next one consumed)."""
    self._move_to(self.position)
    return {**super().state_dict(), 'document': self._document, 'offset': self._offset}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    super().load_state_dict(state)
    if 'document' in state:
      self._restart(int(state['document']), int(state['offset']))
      self._cursor = self.position
