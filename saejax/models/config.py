"""What a checkpoint's `config.json` says about the forward, and the hookpoint names that address it.

Owns `ModelConfig` (one frozen, hashable description shared by GPT-NeoX, GPT-2 and Llama, so it can be a
static argument of the jitted forward), the reading of both config spellings (Hub files: `rotary_pct`,
`rotary_emb_base`, `rope_scaling`; transformers 5: `rope_parameters`), and `parse_hookpoint`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

FAMILIES = ('gpt_neox', 'gpt2', 'llama')
_ARCHITECTURES = {'GPTNeoXForCausalLM': 'gpt_neox', 'GPT2LMHeadModel': 'gpt2', 'LlamaForCausalLM': 'llama'}
ACTIVATIONS = ('gelu', 'gelu_new', 'gelu_pytorch_tanh', 'gelu_fast', 'quick_gelu', 'relu', 'silu', 'swish')
HOOK_KINDS = ('resid', 'attn', 'mlp')
_HOOK_RE = re.compile(r'layers\.(\d+)(?:\.(attn|mlp))?')


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  """Rotary embedding of the first `dim` dims of each head, rotate-half layout."""

  dim: int
  theta: float
  rope_type: str = 'default'  # 'default' | 'linear' | 'llama3'
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def inv_freq(self) -> np.ndarray:
    """[dim // 2] inverse frequencies, computed in float32 as transformers does (the angles then match bitwise)."""
    exponent = np.arange(0, self.dim, 2, dtype=np.int64).astype(np.float32) / np.float32(self.dim)
    inv_freq = np.float32(1.0) / (np.float32(self.theta) ** exponent)
    if self.rope_type == 'linear':
      return inv_freq / np.float32(self.factor)
    if self.rope_type != 'llama3':
      return inv_freq
    # Llama 3.1 keeps high frequencies, divides low ones by `factor`, and blends smoothly in between.
    old_len = np.float32(self.original_max_position_embeddings)
    low_wavelen = old_len / np.float32(self.low_freq_factor)
    high_wavelen = old_len / np.float32(self.high_freq_factor)
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(self.factor), inv_freq)
    smooth = (old_len / wavelen - np.float32(self.low_freq_factor)) / np.float32(
      self.high_freq_factor - self.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str
  num_layers: int
  d_model: int
  vocab_size: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm: str  # 'layernorm' | 'rmsnorm'
  norm_eps: float
  activation: str
  gated_mlp: bool
  parallel_residual: bool
  tie_word_embeddings: bool
  max_position_embeddings: int
  rope: RopeSpec | None = None
  learned_positions: bool = False
  attn_scale_by_layer: bool = False  # GPT-2 `scale_attn_by_inverse_layer_idx`
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None


def parse_hookpoint(name: str, num_layers: int | None = None) -> tuple[int, str]:
  """`layers.N` -> (N, 'resid'), `layers.N.attn` -> (N, 'attn'), `layers.N.mlp` -> (N, 'mlp')."""
  match = _HOOK_RE.fullmatch(name) if isinstance(name, str) else None
  if match is None:
    raise ValueError(
      f'bad hookpoint {name!r}: expected layers.N (residual after block N), layers.N.attn or layers.N.mlp'
    )
  layer, kind = int(match.group(1)), match.group(2) or 'resid'
  if num_layers is not None and layer >= num_layers:
    raise ValueError(
      f'hookpoint {name!r} is out of range: the model has {num_layers} layers (layers.0 .. layers.{num_layers - 1})'
    )
  return layer, kind


def hookpoint_name(layer: int, kind: str) -> str:
  return f'layers.{layer}' if kind == 'resid' else f'layers.{layer}.{kind}'


def family_of(raw: dict[str, Any]) -> str:
  model_type = raw.get('model_type')
  if model_type in FAMILIES:
    return model_type
  for arch in raw.get('architectures') or ():
    if arch in _ARCHITECTURES:
      return _ARCHITECTURES[arch]
  name = model_type or (raw.get('architectures') or ['?'])[0]
  raise ValueError(
    f'unsupported architecture {name!r}: supported are {", ".join(FAMILIES)} ({", ".join(_ARCHITECTURES)})'
  )


def _first(raw: dict[str, Any], *keys: str, default: Any = None) -> Any:
  for key in keys:
    if raw.get(key) is not None:
      return raw[key]
  return default


def _token_id(value):
  return tuple(value) if isinstance(value, list) else value


def _rope_spec(raw: dict[str, Any], head_dim: int, default_fraction: float, default_theta: float) -> RopeSpec:
  # transformers 5 writes `rope_parameters`; older files use `rope_scaling` plus top-level theta / fraction keys.
  params = dict(raw.get('rope_parameters') or raw.get('rope_scaling') or {})
  fraction = _first(params, 'partial_rotary_factor', default=None)
  if fraction is None:
    fraction = _first(raw, 'partial_rotary_factor', 'rotary_pct', default=default_fraction)
  theta = _first(params, 'rope_theta', default=None)
  if theta is None:
    theta = _first(raw, 'rope_theta', 'rotary_emb_base', default=default_theta)
  rope_type = params.get('rope_type') or params.get('type') or 'default'
  if rope_type not in ('default', 'linear', 'llama3'):
    raise ValueError(f'unsupported rope_type {rope_type!r}: supported are default, linear, llama3')
  extra = {}
  if rope_type in ('linear', 'llama3'):
    extra['factor'] = float(params['factor'])
  if rope_type == 'llama3':
    extra.update(
      low_freq_factor=float(params['low_freq_factor']),
      high_freq_factor=float(params['high_freq_factor']),
      original_max_position_embeddings=int(
        params.get('original_max_position_embeddings') or raw['max_position_embeddings']
      ),
    )
  return RopeSpec(dim=int(head_dim * float(fraction)), theta=float(theta), rope_type=rope_type, **extra)


def _check_activation(name: str) -> str:
  if name not in ACTIVATIONS:
    raise ValueError(f'unsupported activation {name!r}: supported are {", ".join(ACTIVATIONS)}')
  return name


def from_hf_config(raw: dict[str, Any]) -> ModelConfig:
  """A `ModelConfig` from the parsed `config.json` of a GPT-NeoX, GPT-2 or Llama checkpoint."""
  family = family_of(raw)
  common = dict(
    family=family,
    vocab_size=int(raw['vocab_size']),
    bos_token_id=_token_id(raw.get('bos_token_id')),
    eos_token_id=_token_id(raw.get('eos_token_id')),
  )
  if family == 'gpt2':
    d_model = int(_first(raw, 'n_embd', 'hidden_size'))
    num_heads = int(_first(raw, 'n_head', 'num_attention_heads'))
    return ModelConfig(
      **common,
      num_layers=int(_first(raw, 'n_layer', 'num_hidden_layers')),
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_heads,
      head_dim=d_model // num_heads,
      intermediate_size=int(_first(raw, 'n_inner', default=4 * d_model)),
      norm='layernorm',
      norm_eps=float(_first(raw, 'layer_norm_epsilon', default=1e-5)),
      activation=_check_activation(_first(raw, 'activation_function', default='gelu_new')),
      gated_mlp=False,
      parallel_residual=False,
      tie_word_embeddings=bool(raw.get('tie_word_embeddings', True)),
      max_position_embeddings=int(_first(raw, 'n_positions', 'max_position_embeddings', default=1024)),
      learned_positions=True,
      attn_scale_by_layer=bool(raw.get('scale_attn_by_inverse_layer_idx', False)),
    )
  d_model = int(raw['hidden_size'])
  num_heads = int(raw['num_attention_heads'])
  head_dim = int(raw.get('head_dim') or d_model // num_heads)
  if family == 'gpt_neox':
    return ModelConfig(
      **common,
      num_layers=int(raw['num_hidden_layers']),
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_heads,
      head_dim=head_dim,
      intermediate_size=int(raw['intermediate_size']),
      norm='layernorm',
      norm_eps=float(raw.get('layer_norm_eps', 1e-5)),
      activation=_check_activation(raw.get('hidden_act', 'gelu')),
      gated_mlp=False,
      parallel_residual=bool(raw.get('use_parallel_residual', True)),
      tie_word_embeddings=bool(raw.get('tie_word_embeddings', False)),
      max_position_embeddings=int(raw.get('max_position_embeddings', 2048)),
      rope=_rope_spec(raw, head_dim, default_fraction=0.25, default_theta=10000.0),
    )
  if raw.get('pretraining_tp', 1) not in (1, None):
    raise ValueError('Llama configs with pretraining_tp > 1 are not supported')
  return ModelConfig(
    **common,
    num_layers=int(raw['num_hidden_layers']),
    d_model=d_model,
    num_heads=num_heads,
    num_kv_heads=int(raw.get('num_key_value_heads') or num_heads),
    head_dim=head_dim,
    intermediate_size=int(raw['intermediate_size']),
    norm='rmsnorm',
    norm_eps=float(raw.get('rms_norm_eps', 1e-6)),
    activation=_check_activation(raw.get('hidden_act', 'silu')),
    gated_mlp=True,
    parallel_residual=False,
    tie_word_embeddings=bool(raw.get('tie_word_embeddings', False)),
    max_position_embeddings=int(raw.get('max_position_embeddings', 2048)),
    rope=_rope_spec(raw, head_dim, default_fraction=1.0, default_theta=10000.0),
  )
