"""`load_pretrained` and `LanguageModel`: the activation source the SAE trainer and evaluators call.

Owns the public surface: which layers a request needs (the deepest hookpoint), where the token batch lives
on the mesh, and the `replace` splice used to measure the downstream loss of an SAE reconstruction. The
forward itself is `forward.forward`; the weights come from `checkpoint.resolve` and `checkpoint.load_params`
(safetensors folders) or from `gguf.find` and `gguf.load` (llama.cpp `.gguf` files and registry names).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saejax import tuning
from saejax.models import config as config_lib
from saejax.models import forward as forward_lib
from saejax.models import gguf as gguf_lib
from saejax.models.checkpoint import load_params, resolve
from saejax.sharding import DATA

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(eq=False)
class LanguageModel:
  """A loaded decoder-only LM: `config`, the parameter pytree `params`, and where they live (`mesh`)."""

  config: config_lib.ModelConfig
  params: dict
  dtype: jnp.dtype
  mesh: Mesh | None = None
  path: str | None = None
  # The attention kernel (`layers.causal_attention`); None: `saejax.tuning`'s choice for the params' platform.
  attention_kind: str | None = None

  @property
  def d_model(self) -> int:
    return self.config.d_model

  @property
  def platform(self) -> str:
    return tuning.platform_of(self.mesh if self.mesh is not None else self.params['embed'])

  @property
  def attention(self) -> str:
    if self.attention_kind is not None:
      return self.attention_kind
    return tuning.lm_attention(self.platform, self.dtype, self.config.head_dim)

  def parse_hookpoint(self, name: str) -> tuple[int, str]:
    """(layer, kind) with kind in 'resid' | 'attn' | 'mlp'; ValueError for bad names or out-of-range layers."""
    return config_lib.parse_hookpoint(name, self.config.num_layers)

  def place_tokens(self, tokens_BxT) -> jax.Array:
    """The int32 token batch the forward consumes, on the mesh.

    With several processes each passes only its own rows (a token stream's host slice) and gets back the
    global batch of every process's rows, split over `data`; an array that is already global passes through.
    """
    return self._tokens(tokens_BxT)

  def _tokens(self, tokens_BxT) -> jax.Array:
    # Host batches go straight to their sharding (cast to int32 there: datasets yield int64).
    if isinstance(tokens_BxT, jax.Array):
      tokens_BxT = tokens_BxT.astype(jnp.int32)
    else:
      tokens_BxT = np.asarray(tokens_BxT, dtype=np.int32)
    if tokens_BxT.ndim != 2:
      raise ValueError(f'tokens must be [batch, seq], got shape {tokens_BxT.shape}')
    if self.mesh is None:
      return jnp.asarray(tokens_BxT)
    if jax.process_count() > 1 and not (isinstance(tokens_BxT, jax.Array) and not tokens_BxT.is_fully_addressable):
      return self._global_tokens(np.asarray(tokens_BxT))
    data_size = self.mesh.shape.get(DATA, 1)
    split = data_size > 1 and tokens_BxT.shape[0] % data_size == 0
    return jax.device_put(tokens_BxT, NamedSharding(self.mesh, P(DATA if split else None, None)))

  def _global_tokens(self, local_RxT: np.ndarray) -> jax.Array:
    """This process's rows -> the global [rows * process_count, T] batch, rows split over `data`.

    Each process's rows fill the rows of the data shards its devices hold (process order when the mesh lists
    devices process by process); the data axis has to split the global rows and span the processes.
    """
    global_shape = (local_RxT.shape[0] * jax.process_count(), local_RxT.shape[1])
    data_size = self.mesh.shape.get(DATA, 1)
    sharding = NamedSharding(self.mesh, P(DATA, None))
    try:
      if global_shape[0] % data_size:
        raise ValueError(f'{global_shape[0]} rows do not split over the {data_size}-way data axis')
      return jax.make_array_from_process_local_data(sharding, local_RxT, global_shape)
    except ValueError as error:
      raise ValueError(
        f'cannot assemble a {global_shape[0]}-row token batch from {local_RxT.shape[0]} rows on each of '
        f'{jax.process_count()} processes ({str(error).splitlines()[0]}); use a mesh whose data axis splits the '
        f'rows and spans the processes (--config.mesh_data / --config.mesh_model)'
      ) from error

  def _run(self, tokens_BxT, taps: Iterable[str], replace, want_logits: bool):
    taps = tuple(sorted(set(taps)))
    replace = dict(replace or {})
    layers_needed = [self.parse_hookpoint(name)[0] for name in (*taps, *replace)]
    stop_layer = self.config.num_layers - 1 if want_logits else max(layers_needed)
    params = forward_lib.trim_params(self.params, stop_layer, want_logits)
    return forward_lib.forward(
      params,
      self._tokens(tokens_BxT),
      forward_lib.as_partials(replace),
      cfg=self.config,
      taps=taps,
      want_logits=want_logits,
      attention=self.attention,
      attention_block=tuning.attention_block(self.platform),
    )

  def activations(
    self, tokens_BxT, hookpoints: Iterable[str], replace: Mapping[str, Callable] | None = None
  ) -> dict[str, jax.Array]:
    """{hookpoint: [B, T, d]} in the model dtype; only layers up to the deepest hookpoint are computed."""
    hookpoints = list(hookpoints)
    if not hookpoints:
      raise ValueError('activations() needs at least one hookpoint, e.g. layers.6.mlp')
    acts, _ = self._run(tokens_BxT, hookpoints, replace, want_logits=False)
    return {name: acts[name] for name in hookpoints}

  def logits(self, tokens_BxT, replace: Mapping[str, Callable] | None = None) -> jax.Array:
    """[B, T, V] float32. `replace` maps hookpoint -> fn([B, T, d]) -> [B, T, d] used downstream in its place.

    A fn is traced into the jitted forward: a plain function or lambda is part of the compiled program (its
    closed-over arrays become constants, and a new lambda recompiles), while `jax.tree_util.Partial(fn,
    sae_params)` passes its arguments as inputs, so one compilation serves every SAE of the same shapes.
    """
    _, logits_BxTxV = self._run(tokens_BxT, (), replace, want_logits=True)
    return logits_BxTxV


def read_config(path) -> config_lib.ModelConfig:
  """The `ModelConfig` of a folder's `config.json`, or of a GGUF file / folder / registry name (no weights read)."""
  gguf_path = gguf_lib.find(path)
  if gguf_path is not None:
    return gguf_lib.read_config(gguf_path)
  with open(os.path.join(path, 'config.json')) as f:
    return config_lib.from_hf_config(json.load(f))


def load_pretrained(path_or_id, dtype=jnp.float32, mesh: Mesh | None = None) -> LanguageModel:
  """A GPT-NeoX, GPT-2 or Llama model from a local folder, the Hugging Face cache, the Hub when online, or GGUF.

  GGUF (llama.cpp's format; Llama architecture): a `.gguf` file, a folder holding exactly one `.gguf` and no
  `config.json`, or a registry name such as `smollm2` (fetched once by `python -m experiments.fetch smollm2`);
  every quantization type the `gguf` package can dequantize is read, and `model.path` is the `.gguf` file.

  Each tensor is cast to `dtype` and placed on its sharding over `mesh` as it is read (the default device when
  `mesh` is None). Raises FileNotFoundError (one line: where it looked, how to pass a local folder) when the
  model cannot be found, and ValueError (one line) for an architecture other than GPT-NeoX, GPT-2 or Llama, or
  a GGUF file that is truncated, not GGUF, or quantized in a type that cannot be dequantized.
  """
  if not any(jnp.dtype(dtype) == jnp.dtype(ok) for ok in _DTYPES):
    raise ValueError(f'dtype must be float32, bfloat16 or float16, got {dtype}')
  gguf_path = gguf_lib.find(path_or_id)
  if gguf_path is not None:
    cfg, params = gguf_lib.load(gguf_path, jnp.dtype(dtype), mesh)
    return LanguageModel(config=cfg, params=params, dtype=jnp.dtype(dtype), mesh=mesh, path=str(gguf_path))
  folder = resolve(path_or_id)
  cfg = read_config(folder)
  params = load_params(cfg, folder, jnp.dtype(dtype), mesh)
  return LanguageModel(config=cfg, params=params, dtype=jnp.dtype(dtype), mesh=mesh, path=str(folder))
