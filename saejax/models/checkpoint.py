"""Finding a checkpoint and reading its `*.safetensors` (single or sharded) into the forward's parameter pytree.

Where: a local folder, the Hugging Face cache (read directly as `hub/models--ORG--NAME/snapshots/<rev>/`, so an
offline lookup never waits on the network; `HF_HUB_CACHE` / `HF_HOME` are read at call time), or the Hub when
online; a model that cannot be found is one `FileNotFoundError` line saying where the loader looked.

How: each family's key layout is converted to the common pytree (`(in, out)` weights, split q / k / v,
optional biases) one tensor at a time: read to host memory alone, converted, cast and `jax.device_put` straight
onto its sharding, so a model is never whole on one device (nor whole in host memory). With a mesh that has a
`model` axis, q / k / v / up / gate are split by output columns and o / down by input rows (the Megatron
pairing, so each attention and MLP needs one reduction), and the vocabulary axis of the embedding and
unembedding is split; vectors and indivisible matrices are replicated.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from saejax.models.config import ModelConfig
from saejax.sharding import MODEL

# What a forward and a tokenizer need; the Hub's pytorch / tf / flax weight files are never fetched.
ALLOW_PATTERNS = [
  'config.json',
  'generation_config.json',
  '*.safetensors',
  'model.safetensors.index.json',
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'vocab.json',
  'merges.txt',
]
_HINT = 'point it at a local copy with --config.model=/path/to/folder (holding config.json and *.safetensors)'


def hub_cache_dir() -> Path:
  for var in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
    if os.environ.get(var):
      return Path(os.environ[var]).expanduser()
  if os.environ.get('HF_HOME'):
    return Path(os.environ['HF_HOME']).expanduser() / 'hub'
  xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
  return Path(xdg).expanduser() / 'huggingface' / 'hub'


def is_offline() -> bool:
  return any(
    os.environ.get(var, '').strip().lower() in ('1', 'true', 'yes', 'on')
    for var in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')
  )


def _looks_like_path(path_or_id: str) -> bool:
  # Hub ids are `name` or `org/name`; anything else with a separator is meant as a filesystem path.
  return path_or_id.startswith(('/', '.', '~')) or path_or_id.count('/') > 1 or os.sep != '/' and os.sep in path_or_id


def cached_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path | None:
  """The cached snapshot folder of `repo_id` (the `main` ref, else the newest one with a config), or None."""
  repo_dir = (cache_dir or hub_cache_dir()) / ('models--' + repo_id.replace('/', '--'))
  snapshots = repo_dir / 'snapshots'
  if not snapshots.is_dir():
    return None
  ref = repo_dir / 'refs' / 'main'
  if ref.is_file():
    candidate = snapshots / ref.read_text().strip()
    if (candidate / 'config.json').is_file():
      return candidate
  found = [p for p in snapshots.iterdir() if (p / 'config.json').is_file()]
  return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve(path_or_id: str | os.PathLike) -> Path:
  """A folder with `config.json` for a local path, a cached Hub id, or a Hub id fetched when online."""
  text = os.fspath(path_or_id)
  if '://' in text:
    raise FileNotFoundError(
      f'{text} is a remote URL, which is not read directly; copy the folder to local disk first (e.g. gcloud '
      f'storage cp -r {text} /tmp/model) and pass --config.model=/tmp/model'
    )
  local = Path(text).expanduser()
  if local.is_dir():
    if not (local / 'config.json').is_file():
      raise FileNotFoundError(f'{local} has no config.json; {_HINT}')
    return local
  if local.exists() or _looks_like_path(text):
    raise FileNotFoundError(f'no model folder at {local}; {_HINT}')
  cache_dir = hub_cache_dir()
  cached = cached_snapshot(text, cache_dir)
  if cached is not None:
    return cached
  where = cache_dir / ('models--' + text.replace('/', '--'))
  if is_offline():
    raise FileNotFoundError(
      f'model {text!r} is not a local folder and not in the Hugging Face cache ({where}), and HF_HUB_OFFLINE is '
      f'set so nothing was downloaded; {_HINT}'
    )
  try:
    import huggingface_hub

    return Path(huggingface_hub.snapshot_download(text, allow_patterns=ALLOW_PATTERNS, cache_dir=cache_dir))
  except Exception as err:  # noqa: BLE001 - any Hub failure (network, auth, missing repo) means the same to a user
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise FileNotFoundError(
      f'model {text!r} is not a local folder, not in the Hugging Face cache ({where}), and the Hub download '
      f'failed ({type(err).__name__}: {first_line}); {_HINT}'
    ) from err


INDEX_FILE = 'model.safetensors.index.json'
COL, ROW = 1, 0  # which axis of an (in, out) matrix a `model` mesh axis splits


class TensorFiles(contextlib.AbstractContextManager):
  """Name -> tensor over one or several safetensors files, read lazily as numpy (bf16 via ml_dtypes)."""

  def __init__(self, folder: Path):
    self._stack = contextlib.ExitStack()
    self._handles = {}
    index = folder / INDEX_FILE
    if index.is_file():
      weight_map = json.loads(index.read_text())['weight_map']
      self.files = {name: folder / file for name, file in weight_map.items()}
    else:
      paths = sorted(folder.glob('*.safetensors'))
      if not paths:
        raise FileNotFoundError(
          f'{folder} has no *.safetensors weights (only safetensors checkpoints are read); point --config.model= '
          f'at a folder with config.json and *.safetensors'
        )
      self.files = {name: path for path in paths for name in self._handle(path).keys()}  # noqa: SIM118

  def _handle(self, path: Path):
    if path not in self._handles:
      self._handles[path] = self._stack.enter_context(safe_open(str(path), framework='numpy'))
    return self._handles[path]

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise KeyError(f'checkpoint has no tensor {name!r}')
    return self._handle(self.files[name]).get_tensor(name)

  def __exit__(self, *exc):
    self._stack.close()
    return None


class Placer:
  """Casts a host array to the model dtype and puts it on its sharding (default device without a mesh)."""

  def __init__(self, mesh: Mesh | None, dtype):
    self.mesh, self.dtype = mesh, np.dtype(dtype)
    self.model_size = mesh.shape[MODEL] if mesh is not None and MODEL in mesh.axis_names else 1

  def __call__(self, array: np.ndarray, shard_axis: int | None = None) -> jax.Array:
    array = np.ascontiguousarray(array.astype(self.dtype, copy=False))
    if self.mesh is None:
      return jax.device_put(array)
    spec = [None] * array.ndim
    if shard_axis is not None and self.model_size > 1 and array.shape[shard_axis] % self.model_size == 0:
      spec[shard_axis] = MODEL
    return jax.device_put(array, NamedSharding(self.mesh, P(*spec)))


def _norm(files: TensorFiles, put: Placer, name: str) -> dict:
  out = {'scale': put(files.get(f'{name}.weight'))}
  if f'{name}.bias' in files:
    out['bias'] = put(files.get(f'{name}.bias'))
  return out


def _linear(files, put, out: dict, name: str, w: str, b: str, shard_axis: int, transpose: bool = True):
  """torch `Linear` stores (out, in): transposed here so the forward is `x @ W`; GPT-2's `Conv1D` is (in, out)."""
  weight = files.get(f'{name}.weight')
  out[w] = put(weight.T if transpose else weight, shard_axis)
  if f'{name}.bias' in files:
    out[b] = put(files.get(f'{name}.bias'))


def _unembed(cfg: ModelConfig, files: TensorFiles, put: Placer, params: dict, name: str):
  if cfg.tie_word_embeddings:
    return
  if name not in files:
    raise ValueError(f'config says tie_word_embeddings=false but the checkpoint has no {name!r}')
  # Kept as the checkpoint's [V, d]: the forward contracts over d directly, so no host-side transpose.
  params['unembed'] = put(files.get(name), 0)


def _neox(cfg: ModelConfig, files: TensorFiles, put: Placer) -> dict:
  H, K, d = cfg.num_heads, cfg.head_dim, cfg.d_model
  params = {'embed': put(files.get('gpt_neox.embed_in.weight'), 0), 'layers': []}
  for i in range(cfg.num_layers):
    pre = f'gpt_neox.layers.{i}'
    # The fused projection is interleaved per head, [q_h0 | k_h0 | v_h0 | q_h1 | ...], not [Q | K | V].
    qkv_Hx3xKxd = files.get(f'{pre}.attention.query_key_value.weight').reshape(H, 3, K, d)
    attn = {w: put(qkv_Hx3xKxd[:, j].reshape(H * K, d).T, COL) for j, w in enumerate(('wq', 'wk', 'wv'))}
    if f'{pre}.attention.query_key_value.bias' in files:
      bias_Hx3xK = files.get(f'{pre}.attention.query_key_value.bias').reshape(H, 3, K)
      attn.update({b: put(bias_Hx3xK[:, j].reshape(H * K)) for j, b in enumerate(('bq', 'bk', 'bv'))})
    _linear(files, put, attn, f'{pre}.attention.dense', 'wo', 'bo', ROW)
    mlp = {}
    _linear(files, put, mlp, f'{pre}.mlp.dense_h_to_4h', 'w_up', 'b_up', COL)
    _linear(files, put, mlp, f'{pre}.mlp.dense_4h_to_h', 'w_down', 'b_down', ROW)
    params['layers'].append(
      {
        'ln1': _norm(files, put, f'{pre}.input_layernorm'),
        'ln2': _norm(files, put, f'{pre}.post_attention_layernorm'),
        'attn': attn,
        'mlp': mlp,
      }
    )
  params['final_norm'] = _norm(files, put, 'gpt_neox.final_layer_norm')
  _unembed(cfg, files, put, params, 'embed_out.weight')
  return params


def _gpt2(cfg: ModelConfig, files: TensorFiles, put: Placer) -> dict:
  # Hub files name keys `h.0...`; files saved by transformers 5 prefix them with `transformer.`.
  pre = 'transformer.' if 'transformer.wte.weight' in files else ''
  d = cfg.d_model
  params = {
    'embed': put(files.get(f'{pre}wte.weight'), 0),
    'pos_embed': put(files.get(f'{pre}wpe.weight')),
    'layers': [],
  }
  for i in range(cfg.num_layers):
    block = f'{pre}h.{i}'
    # Conv1D is already (in, out) and c_attn's columns are contiguous [Q | K | V] blocks.
    qkv_dx3d = files.get(f'{block}.attn.c_attn.weight')
    attn = {w: put(qkv_dx3d[:, j * d : (j + 1) * d], COL) for j, w in enumerate(('wq', 'wk', 'wv'))}
    qkv_bias_3d = files.get(f'{block}.attn.c_attn.bias')
    attn.update({b: put(qkv_bias_3d[j * d : (j + 1) * d]) for j, b in enumerate(('bq', 'bk', 'bv'))})
    _linear(files, put, attn, f'{block}.attn.c_proj', 'wo', 'bo', ROW, transpose=False)
    mlp = {}
    _linear(files, put, mlp, f'{block}.mlp.c_fc', 'w_up', 'b_up', COL, transpose=False)
    _linear(files, put, mlp, f'{block}.mlp.c_proj', 'w_down', 'b_down', ROW, transpose=False)
    params['layers'].append(
      {
        'ln1': _norm(files, put, f'{block}.ln_1'),
        'ln2': _norm(files, put, f'{block}.ln_2'),
        'attn': attn,
        'mlp': mlp,
      }
    )
  params['final_norm'] = _norm(files, put, f'{pre}ln_f')
  _unembed(cfg, files, put, params, 'lm_head.weight')
  return params


def _llama(cfg: ModelConfig, files: TensorFiles, put: Placer) -> dict:
  params = {'embed': put(files.get('model.embed_tokens.weight'), 0), 'layers': []}
  for i in range(cfg.num_layers):
    pre = f'model.layers.{i}'
    attn, mlp = {}, {}
    for proj, axis in (('q', COL), ('k', COL), ('v', COL), ('o', ROW)):
      _linear(files, put, attn, f'{pre}.self_attn.{proj}_proj', f'w{proj}', f'b{proj}', axis)
    for proj, axis in (('gate', COL), ('up', COL), ('down', ROW)):
      _linear(files, put, mlp, f'{pre}.mlp.{proj}_proj', f'w_{proj}', f'b_{proj}', axis)
    params['layers'].append(
      {
        'ln1': _norm(files, put, f'{pre}.input_layernorm'),
        'ln2': _norm(files, put, f'{pre}.post_attention_layernorm'),
        'attn': attn,
        'mlp': mlp,
      }
    )
  params['final_norm'] = _norm(files, put, 'model.norm')
  _unembed(cfg, files, put, params, 'lm_head.weight')
  return params


_CONVERTERS = {'gpt_neox': _neox, 'gpt2': _gpt2, 'llama': _llama}


def load_params(cfg: ModelConfig, folder: Path, dtype, mesh: Mesh | None = None) -> dict:
  """The parameter pytree of the checkpoint in `folder`, each leaf cast to `dtype` and placed on `mesh`."""
  with TensorFiles(folder) as files:
    return _CONVERTERS[cfg.family](cfg, files, Placer(mesh, dtype))
