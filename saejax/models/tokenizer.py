"""`load_tokenizer(path_or_id)`: a `tokenizers.Tokenizer` from a model folder, a `tokenizer.json` or a GGUF file.

A GGUF file carries no `tokenizer.json`; its tokenizer is llama.cpp metadata (`tokenizer.ggml.*`): the token
list, the BPE merges, a type per token (1 normal, 3 control, 4 user-defined, ...), the special ids, a few flags
and `tokenizer.ggml.pre`, the name of the regex split that llama.cpp applies before BPE. This module rebuilds it
with the `tokenizers` library alone (no torch, no transformers):

- `tokenizer.ggml.model == 'gpt2'`, byte-level BPE, is supported. SentencePiece (`llama`) and the other models
  raise one ValueError line.
- Control tokens become special added tokens and user-defined ones plain added tokens, so both are matched whole
  in the text, as llama.cpp and transformers do; the bos/eos/unk/pad tokens are special too.
- `add_bos_token` / `add_eos_token` become a post-processor adding BOS/EOS under `add_special_tokens=True`.
  `add_space_prefix` is read but, for byte-level BPE, ignored by llama.cpp and transformers alike, so here too.
- The pre-tokenizer follows `tokenizer.ggml.pre` (`PRE_SPLITS`; an unknown name raises one ValueError line).
  By default (`reference='transformers'`) it splits exactly as `transformers.AutoTokenizer.from_pretrained(dir,
  gguf_file=name)` does, and so encodes and decodes the same ids. `reference='llama.cpp'` splits as llama.cpp
  does instead; for `smollm` (SmolLM's digits-first split) that differs from transformers on whitespace before
  a digit: 'a  1' is `a`, `ĠĠ`, `1` under llama.cpp (and SmolLM's own tokenizer.json), `a`, `Ġ`, `Ġ`, `1`
  under transformers.

The metadata of the last few files is cached by (path, size, mtime), so `load_tokenizer` and `gguf_special_ids`
read a file once (saejax.models.gguf_file parses SmolLM2's 49k tokens and merges in about 0.1 s).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

from saejax.models import gguf as gguf_lib

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (gguf.TokenType)
REFERENCES = ('transformers', 'llama.cpp')

# Regexes as the `tokenizers` library (Oniguruma) reads them. GPT-2's is the one `ByteLevel(use_regex=True)` uses.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_REST = r' ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+'
LLAMA3_SPLIT = _CONTRACTIONS + r'|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|' + _REST
QWEN2_SPLIT = _CONTRACTIONS + r'|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|' + _REST
DIGIT_SPLIT = r'\p{N}'
LLAMA_CPP_DEFAULT = (r'[\p{P}\$\+<=>\^~\|]+', GPT2_SPLIT, r'\p{N}+', r'[0-9][0-9][0-9]')

# `tokenizer.ggml.pre` -> (splits transformers' GGUF conversion applies, splits llama.cpp applies), each a tuple of
# regexes applied in turn (every match and every gap between matches becomes a piece) before byte-level BPE.
PRE_SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
  **{name: ((GPT2_SPLIT,), (GPT2_SPLIT,)) for name in ('gpt-2', 'mpt', 'olmo', 'jais')},
  'default': ((GPT2_SPLIT,), LLAMA_CPP_DEFAULT),
  **{
    name: ((GPT2_SPLIT,), (DIGIT_SPLIT, GPT2_SPLIT))
    for name in ('smollm', 'starcoder', 'refact', 'command-r', 'codeshell', 'exaone')
  },
  **{
    name: ((LLAMA3_SPLIT,), (LLAMA3_SPLIT,))
    for name in ('llama-bpe', 'llama3', 'llama-v3', 'falcon3', 'dbrx', 'smaug-bpe')
  },
  **{name: ((QWEN2_SPLIT,), (QWEN2_SPLIT,)) for name in ('qwen2', 'deepseek-r1-qwen')},
}

_SPECIAL_KEYS = {'bos': 'bos_token_id', 'eos': 'eos_token_id', 'unk': 'unknown_token_id', 'pad': 'padding_token_id'}


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerMetadata:
  """The `tokenizer.ggml.*` metadata of one GGUF file (what building its tokenizer needs)."""

  path: str
  model: str | None
  pre: str | None
  tokens: list[str]
  merges: list[str]
  token_types: list[int]
  special_ids: dict[str, int]  # bos/eos/unk/pad, those the file names
  add_bos: bool
  add_eos: bool
  add_space_prefix: bool | None


def find_gguf(path_or_id) -> Path | None:
  """The `.gguf` file `path_or_id` names (a file, a folder with one `.gguf` and no tokenizer.json, a registry name).

  None when it names something else; ValueError when a folder holds several `.gguf` files.
  """
  return gguf_lib.find(path_or_id, marker='tokenizer.json', required=False)


def read_gguf_tokenizer(path) -> GGUFTokenizerMetadata:
  """The tokenizer metadata of the GGUF file `path`, read once per (real path, size, mtime) and cached."""
  path = os.path.realpath(os.fspath(path))  # links to one file share its cache entry
  stat = os.stat(path)
  return _read_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFTokenizerMetadata:

  reader = gguf_lib.open_reader(path)  # one line for a file that is not GGUF, or is truncated

  def get(key: str, default: Any = None) -> Any:
    return reader.get(f'tokenizer.ggml.{key}', default)

  tokens = get('tokens') or []
  return GGUFTokenizerMetadata(
    path=path,
    model=get('model'),
    pre=get('pre'),
    tokens=tokens,
    merges=get('merges') or [],
    token_types=get('token_type') or [],
    special_ids={name: int(get(key)) for name, key in _SPECIAL_KEYS.items() if get(key) is not None},
    add_bos=bool(get('add_bos_token', False)),
    add_eos=bool(get('add_eos_token', False)),
    add_space_prefix=get('add_space_prefix'),
  )


def gguf_special_ids(path) -> dict[str, int]:
  """{'bos': id, 'eos': id, 'unk': id, 'pad': id} for the ids the GGUF file `path` names (SmolLM2: 1, 2, 0, 2)."""
  return dict(read_gguf_tokenizer(path).special_ids)


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves, the rest 256+."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  extra = (b for b in range(256) if b not in keep)
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _pre_tokenizer(pre: str | None, reference: str):
  from tokenizers import Regex, pre_tokenizers

  if pre not in PRE_SPLITS:
    raise ValueError(
      f'unknown GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: {", ".join(sorted(PRE_SPLITS))}'
    )
  splits = PRE_SPLITS[pre][REFERENCES.index(reference)]
  if splits == (GPT2_SPLIT,):  # what transformers' GPT2Tokenizer sets: byte-level with GPT-2's own regex
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  steps = [pre_tokenizers.Split(Regex(split), behavior='isolated') for split in splits]
  return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def tokenizer_from_gguf(path, reference: str = 'transformers'):
  """The byte-level BPE tokenizer GGUF file `path` describes; see the module docstring for what is kept."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors

  if reference not in REFERENCES:
    raise ValueError(f'reference={reference!r}; pass one of {", ".join(REFERENCES)}')
  meta = read_gguf_tokenizer(path)
  if meta.model != 'gpt2':
    kind = ' (SentencePiece)' if meta.model == 'llama' else ''
    raise ValueError(
      f'{meta.path}: GGUF tokenizer model tokenizer.ggml.model={meta.model!r}{kind} is not supported; '
      f'supported: gpt2 (byte-level BPE)'
    )
  if not meta.tokens:
    raise ValueError(f'{meta.path} has no tokenizer.ggml.tokens; it carries no tokenizer')
  pre_tokenizer = _pre_tokenizer(meta.pre, reference)

  # Tokens are stored in GPT-2's byte alphabet; one that is not is spelled out byte by byte (as transformers does).
  spelling = _byte_alphabet()
  alphabet = set(spelling.values())

  def spelled(token: str) -> str:
    return token if set(token) <= alphabet else ''.join(spelling[b] for b in token.encode('utf-8'))

  vocab = {spelled(token): index for index, token in enumerate(meta.tokens)}
  merges = []
  for merge in meta.merges:
    parts = merge.split(' ')
    if len(parts) != 2:
      raise ValueError(f'{meta.path}: merge {merge!r} is not two tokens separated by one space')
    merges.append((parts[0], parts[1]))
  tokenizer = Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=merges,
      continuing_subword_prefix='',
      end_of_word_suffix='',
      fuse_unk=False,
      byte_fallback=False,
    )
  )
  tokenizer.pre_tokenizer = pre_tokenizer
  tokenizer.decoder = decoders.ByteLevel()

  types = list(meta.token_types) + [1] * (len(meta.tokens) - len(meta.token_types))
  # A control token outside the byte alphabet is a converter's mislabel; transformers leaves it out, so do we.
  special = [t for t, kind in zip(meta.tokens, types) if kind == CONTROL and set(t) <= alphabet]
  named = [meta.tokens[i] for i in meta.special_ids.values() if 0 <= i < len(meta.tokens)]
  special += [t for t in named if t not in special]
  tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
  user = [t for t, kind in zip(meta.tokens, types) if kind == USER_DEFINED and t in vocab]
  tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

  edges = {}
  for name, flag in (('bos', meta.add_bos), ('eos', meta.add_eos)):
    if flag:
      token_id = meta.special_ids.get(name)
      if token_id is None or not 0 <= token_id < len(meta.tokens):
        raise ValueError(f'{meta.path} sets tokenizer.ggml.add_{name}_token but has no valid {name} token id')
      edges[name] = (tokenizer.id_to_token(token_id), token_id)

  def template(sequence: str, type_id: int) -> list[str]:
    bos = [f'{edges["bos"][0]}:{type_id}'] if 'bos' in edges else []
    eos = [f'{edges["eos"][0]}:{type_id}'] if 'eos' in edges else []
    return [*bos, f'${sequence}:{type_id}', *eos]

  tokenizer.post_processor = processors.TemplateProcessing(
    single=template('A', 0), pair=template('A', 0) + template('B', 1), special_tokens=list(edges.values())
  )
  tokenizer.no_truncation()
  tokenizer.no_padding()
  return tokenizer


def load_tokenizer(path_or_id, *, reference: str = 'transformers'):
  """A `tokenizers.Tokenizer` from a model folder (tokenizer.json, else its one `.gguf`), a tokenizer.json file,
  a `.gguf` file or a registry name (`smollm2`). No truncation, no padding.

  A GGUF tokenizer is rebuilt from the file's metadata (`tokenizer_from_gguf`); `reference` picks whose splits
  it reproduces, transformers' (the default) or llama.cpp's.
  """
  from tokenizers import Tokenizer

  if isinstance(path_or_id, Tokenizer):
    return path_or_id
  gguf_path = find_gguf(path_or_id)
  if gguf_path is not None:
    return tokenizer_from_gguf(gguf_path, reference)
  path = Path(os.fspath(path_or_id)).expanduser()
  file = path / 'tokenizer.json' if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(
      f'no tokenizer at {os.fspath(path_or_id)!r}; pass a model folder with tokenizer.json or one .gguf, a '
      f'tokenizer.json, a .gguf file or a known model name'
    )
  loaded = Tokenizer.from_file(str(file))
  loaded.no_truncation()
  loaded.no_padding()
  return loaded
