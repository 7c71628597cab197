"""The building blocks shared by the three families: norms, activations, rotary embedding, attention, MLP.

Pure functions over one layer's parameter dict. Weights are stored `(in, out)` so every projection is
`x @ W`; optional biases are present in the dict or not. Norm statistics, rotary angles and the softmax run
in float32 whatever the compute dtype, as transformers does, so bf16 activations match the reference's bf16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from saejax import tuning
from saejax.models.config import ModelConfig


def precision_for(dtype) -> lax.Precision:
  # An fp32 model should compute in fp32: the default lets GPUs use TF32 and TPUs bf16 passes for fp32 dots.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def linear(x_BxTxI: jax.Array, params: dict, w: str, b: str, precision) -> jax.Array:
  y_BxTxO = jnp.matmul(x_BxTxI, params[w], precision=precision)
  if b in params:
    y_BxTxO = y_BxTxO + params[b]
  return y_BxTxO


def layer_norm(params: dict, x_BxTxD: jax.Array, eps: float) -> jax.Array:
  x32 = x_BxTxD.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * lax.rsqrt(var + eps) * params['scale'].astype(jnp.float32)
  if 'bias' in params:
    y = y + params['bias'].astype(jnp.float32)
  return y.astype(x_BxTxD.dtype)


def rms_norm(params: dict, x_BxTxD: jax.Array, eps: float) -> jax.Array:
  # Llama's order: normalise in fp32, cast back to the input dtype, then scale (no `1 + w`).
  x32 = x_BxTxD.astype(jnp.float32)
  y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return params['scale'] * y.astype(x_BxTxD.dtype)


def norm(cfg: ModelConfig, params: dict, x_BxTxD: jax.Array) -> jax.Array:
  if cfg.norm == 'rmsnorm':
    return rms_norm(params, x_BxTxD, cfg.norm_eps)
  return layer_norm(params, x_BxTxD, cfg.norm_eps)


def activation(name: str, x: jax.Array) -> jax.Array:
  if name == 'gelu':
    return jax.nn.gelu(x, approximate=False)  # GPT-NeoX: exact erf form (JAX's default is tanh)
  if name in ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast'):
    return jax.nn.gelu(x, approximate=True)
  if name == 'quick_gelu':
    return x * jax.nn.sigmoid(1.702 * x)
  if name == 'relu':
    return jax.nn.relu(x)
  return jax.nn.silu(x)


def rope_tables(cfg: ModelConfig, num_tokens: int) -> tuple[jax.Array, jax.Array]:
  """cos, sin [T, rotary_dim] in float32 for positions 0..T-1 (rotate-half layout: frequencies repeated)."""
  inv_freq_R = jnp.asarray(cfg.rope.inv_freq())
  angles_TxR = jnp.arange(num_tokens, dtype=jnp.float32)[:, None] * inv_freq_R[None, :]
  angles_TxR2 = jnp.concatenate([angles_TxR, angles_TxR], axis=-1)
  return jnp.cos(angles_TxR2), jnp.sin(angles_TxR2)


def apply_rope(x_BxTxHxK: jax.Array, cos_TxR: jax.Array, sin_TxR: jax.Array) -> jax.Array:
  """Rotates the first R dims of each head (partial rotary leaves the rest untouched)."""
  rot_dim = cos_TxR.shape[-1]
  x_rot, x_pass = x_BxTxHxK[..., :rot_dim], x_BxTxHxK[..., rot_dim:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  # transformers casts cos/sin to the activation dtype before the product; doing the same keeps bf16 parity.
  cos, sin = cos_TxR.astype(x_rot.dtype)[:, None, :], sin_TxR.astype(x_rot.dtype)[:, None, :]
  x_rot = x_rot * cos + rotated * sin
  return jnp.concatenate([x_rot, x_pass], axis=-1) if x_pass.shape[-1] else x_rot


def _causal_scores_probs(q_BxTxGxRxK, k_BxSxGxK, query_start: int, scale: float, precision) -> jax.Array:
  """Softmax over keys 0..S-1 of queries `query_start ...` (fp32 scores), causal: key s <= query t."""
  scores_BxGxRxTxS = (
    jnp.einsum('btgrk,bsgk->bgrts', q_BxTxGxRxK, k_BxSxGxK, precision=precision, preferred_element_type=jnp.float32)
    * scale
  )
  T, S = q_BxTxGxRxK.shape[1], k_BxSxGxK.shape[1]
  causal_TxS = np.arange(S)[None, :] <= np.arange(query_start, query_start + T)[:, None]
  scores_BxGxRxTxS = jnp.where(causal_TxS, scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(scores_BxGxRxTxS, axis=-1)


def causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale: float, precision, kind: str = 'dense', block: int = 64):
  """Causal grouped-query attention core, `[B, T, H, K]` out; kv head g serves query heads g*R .. (g+1)*R - 1.

  `dense` materialises the whole `[B, G, R, T, T]` fp32 score tensor; `chunked` runs blocks of `block` queries,
  each against the keys up to its last query only (the same numbers, without the upper triangle); `fused` is
  `jax.nn.dot_product_attention`'s XLA form; `cudnn` its cuDNN flash attention (GPU, bf16/fp16), which never
  writes the scores. `saejax.tuning` picks one.
  """
  B, T, H, K = q_BxTxHxK.shape
  G = k_BxTxGxK.shape[2]
  if kind in ('fused', 'cudnn'):
    implementation = 'cudnn' if kind == 'cudnn' else None
    return jax.nn.dot_product_attention(
      q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale=scale, is_causal=True, implementation=implementation
    )
  q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
  starts = range(0, T, block) if kind == 'chunked' else (0,)
  outs = []
  for start in starts:
    stop = min(T, start + block) if kind == 'chunked' else T
    probs_BxGxRxTxS = _causal_scores_probs(q_BxTxGxRxK[:, start:stop], k_BxTxGxK[:, :stop], start, scale, precision)
    probs_BxGxRxTxS = probs_BxGxRxTxS.astype(v_BxTxGxK.dtype)
    outs.append(jnp.einsum('bgrts,bsgk->btgrk', probs_BxGxRxTxS, v_BxTxGxK[:, :stop], precision=precision))
  out_BxTxGxRxK = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return out_BxTxGxRxK.reshape(B, T, H, K)


def attention(
  cfg: ModelConfig,
  params: dict,
  x_BxTxD: jax.Array,
  layer: int,
  rope,
  precision,
  kind: str = 'dense',
  block: int = tuning.CPU_ATTENTION_BLOCK,
) -> jax.Array:
  """Causal self-attention, output projection and its bias included (the `layers.N.attn` hookpoint)."""
  B, T, _ = x_BxTxD.shape
  H, G, K = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q_BxTxHxK = linear(x_BxTxD, params, 'wq', 'bq', precision).reshape(B, T, H, K)
  k_BxTxGxK = linear(x_BxTxD, params, 'wk', 'bk', precision).reshape(B, T, G, K)
  v_BxTxGxK = linear(x_BxTxD, params, 'wv', 'bv', precision).reshape(B, T, G, K)
  if rope is not None:
    q_BxTxHxK = apply_rope(q_BxTxHxK, *rope)
    k_BxTxGxK = apply_rope(k_BxTxGxK, *rope)
  scale = K**-0.5 / ((layer + 1) if cfg.attn_scale_by_layer else 1)
  out_BxTxHxK = causal_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, scale, precision, kind, block)
  return linear(out_BxTxHxK.reshape(B, T, H * K), params, 'wo', 'bo', precision)


def mlp(cfg: ModelConfig, params: dict, x_BxTxD: jax.Array, precision) -> jax.Array:
  """`down(act(up(x)))`, or Llama's gated `down(act(gate(x)) * up(x))` (the `layers.N.mlp` hookpoint)."""
  up_BxTxI = linear(x_BxTxD, params, 'w_up', 'b_up', precision)
  if cfg.gated_mlp:
    hidden_BxTxI = activation(cfg.activation, linear(x_BxTxD, params, 'w_gate', 'b_gate', precision)) * up_BxTxI
  else:
    hidden_BxTxI = activation(cfg.activation, up_BxTxI)
  return linear(hidden_BxTxI, params, 'w_down', 'b_down', precision)
