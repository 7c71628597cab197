"""The jitted forward of a decoder-only LM, stopping at the deepest hookpoint that was asked for.

One function serves all three families; `ModelConfig` switches the per-family details (norm kind, learned
positions vs rotary, parallel vs sequential residual, gated MLP). Hookpoints are recorded as the forward
passes them, and `replace` functions splice a substitute activation into the stream at a hookpoint (an SAE
reconstruction, for the downstream loss). Only the layers up to `stop_layer` are passed in and computed: the
caller slices the layer list, so later layers and the unembedding are never touched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from saejax import tuning
from saejax.models import layers
from saejax.models.config import ModelConfig, hookpoint_name


def _block(cfg: ModelConfig, params: dict, x_BxTxD, layer: int, rope, precision, tap, attention: tuple[str, int]):
  """One pre-norm transformer block; `tap(name, act)` records and/or replaces each hookpoint's activation."""
  normed_BxTxD = layers.norm(cfg, params['ln1'], x_BxTxD)
  attn_BxTxD = layers.attention(cfg, params['attn'], normed_BxTxD, layer, rope, precision, *attention)
  attn_BxTxD = tap(hookpoint_name(layer, 'attn'), attn_BxTxD)
  if cfg.parallel_residual:
    # GPT-NeoX (Pythia): the MLP sees the norm of the block *input*, not of the post-attention stream.
    mlp_BxTxD = layers.mlp(cfg, params['mlp'], layers.norm(cfg, params['ln2'], x_BxTxD), precision)
    mlp_BxTxD = tap(hookpoint_name(layer, 'mlp'), mlp_BxTxD)
    out_BxTxD = mlp_BxTxD + attn_BxTxD + x_BxTxD  # transformers' summation order, for bitwise-close parity
  else:
    mid_BxTxD = attn_BxTxD + x_BxTxD
    mlp_BxTxD = layers.mlp(cfg, params['mlp'], layers.norm(cfg, params['ln2'], mid_BxTxD), precision)
    mlp_BxTxD = tap(hookpoint_name(layer, 'mlp'), mlp_BxTxD)
    out_BxTxD = mlp_BxTxD + mid_BxTxD
  return tap(hookpoint_name(layer, 'resid'), out_BxTxD)


def embed(cfg: ModelConfig, params: dict, tokens_BxT: jax.Array) -> jax.Array:
  x_BxTxD = jnp.take(params['embed'], tokens_BxT, axis=0)
  if cfg.learned_positions:
    x_BxTxD = x_BxTxD + params['pos_embed'][: tokens_BxT.shape[1]][None]
  return x_BxTxD


def unembed(cfg: ModelConfig, params: dict, x_BxTxD: jax.Array, precision) -> jax.Array:
  """Final norm and vocabulary projection, logits in float32."""
  h_BxTxD = layers.norm(cfg, params['final_norm'], x_BxTxD)
  # Both the untied head and the tied embedding are [V, d]: contract over d rather than materialise a transpose.
  table_VxD = params['unembed'] if 'unembed' in params else params['embed']
  return jnp.einsum('btd,vd->btv', h_BxTxD, table_VxD, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=('cfg', 'taps', 'want_logits', 'attention', 'attention_block'))
def forward(
  params: dict,
  tokens_BxT: jax.Array,
  replace: dict,
  *,
  cfg: ModelConfig,
  taps: tuple[str, ...],
  want_logits: bool,
  attention: str = 'dense',
  attention_block: int = tuning.CPU_ATTENTION_BLOCK,
):
  """Runs `len(params['layers'])` blocks; returns ({hookpoint: [B, T, d]}, logits [B, T, V] f32 or None).

  `attention` is the attention kernel (`layers.causal_attention`; `saejax.tuning.lm_attention` picks it per
  platform, with `attention_block` queries per block of 'chunked'): the numbers agree to rounding, the speed and
  the memory do not.

  `replace` maps hookpoint -> `jax.tree_util.Partial`: its arguments are traced like any other input, so an
  SAE's parameters passed that way are neither baked into the program nor a reason to recompile.
  """
  if cfg.learned_positions and tokens_BxT.shape[1] > cfg.max_position_embeddings:
    raise ValueError(f'{tokens_BxT.shape[1]} tokens exceed the {cfg.max_position_embeddings} learned positions')
  precision = layers.precision_for(params['embed'].dtype)
  acts = {}

  def tap(name, act_BxTxD):
    if name in taps:
      acts[name] = act_BxTxD
    if name in replace:
      act_BxTxD = jnp.asarray(replace[name](act_BxTxD)).astype(act_BxTxD.dtype)
    return act_BxTxD

  x_BxTxD = embed(cfg, params, tokens_BxT)
  rope = layers.rope_tables(cfg, tokens_BxT.shape[1]) if cfg.rope is not None else None
  for layer, layer_params in enumerate(params['layers']):
    x_BxTxD = _block(cfg, layer_params, x_BxTxD, layer, rope, precision, tap, (attention, attention_block))
  logits_BxTxV = unembed(cfg, params, x_BxTxD, precision) if want_logits else None
  return acts, logits_BxTxV


def as_partials(replace: dict | None) -> dict:
  """Wraps each replacement function as a pytree (`Partial`); a plain function becomes its static part."""
  out = {}
  for name, fn in (replace or {}).items():
    if not callable(fn):
      raise TypeError(f'replace[{name!r}] must be a function of the [B, T, d] activation, got {type(fn).__name__}')
    out[name] = fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)
  return out


def trim_params(params: dict, stop_layer: int, want_logits: bool) -> dict:
  """The subset of the parameter pytree a forward up to `stop_layer` (inclusive) needs."""
  keep = {'embed': params['embed'], 'layers': params['layers'][: stop_layer + 1]}
  if 'pos_embed' in params:
    keep['pos_embed'] = params['pos_embed']
  if want_logits:
    keep['final_norm'] = params['final_norm']
    if 'unembed' in params:
      keep['unembed'] = params['unembed']
  return keep
