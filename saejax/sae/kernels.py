"""Sparse TopK encode/decode with a hand-written backward that touches only the k selected latents.

The dense formulation (`relu(x W_enc^T) -> top-k -> z_BxF @ W_dec`) costs three [B,d]x[d,F] products per
step under autodiff: the encoder, its weight gradient, and the decoder. Here only the encoder product is
dense. The decoder gathers the k selected rows per token, and the backward scatters k rows per token into
the weight gradients. On CPU the gathered [B,k,d] working set, not the FLOPs, is what costs, so the gathers
and scatters run over small token chunks (`chunk_tokens`) that stay in cache. On accelerators
(`chunk_tokens=0`, saejax.tuning) they run over the whole batch at once: no sequential loop at all.

Token chunks are strided (chunk j holds tokens j, j+n, j+2n, ...) so that a batch sharded over the mesh's
`data` axis stays evenly sharded inside every chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def global_top_k(pre_BxF: jax.Array, k: int, shards: int = 1) -> tuple[jax.Array, jax.Array]:
  """Top-k over the latent axis, computed as a top-k of per-shard top-k's when latents are sharded.

  Ties break towards the lower latent index in both stages, so the result equals `lax.top_k` exactly.
  """
  num_latents = pre_BxF.shape[-1]
  if shards <= 1 or num_latents % shards or num_latents // shards < k:
    return lax.top_k(pre_BxF, k)
  per_shard = num_latents // shards
  blocks_BxNxL = pre_BxF.reshape(*pre_BxF.shape[:-1], shards, per_shard)
  local_vals, local_idx = lax.top_k(blocks_BxNxL, k)
  local_idx = local_idx + (jnp.arange(shards) * per_shard)[:, None]
  flat_shape = (*pre_BxF.shape[:-1], shards * k)
  vals, pos = lax.top_k(local_vals.reshape(flat_shape), k)
  return vals, jnp.take_along_axis(local_idx.reshape(flat_shape), pos, axis=-1)


def _whole_batch(batch: int, chunk_tokens: int) -> bool:
  return chunk_tokens <= 0 or chunk_tokens >= batch


def _to_chunks(a_Bx: jax.Array, chunk_tokens: int) -> jax.Array:
  """[B, ...] -> [num_chunks, chunk, ...] with strided token assignment."""
  batch = a_Bx.shape[0]
  chunk = _chunk_size(batch, chunk_tokens)
  return jnp.swapaxes(a_Bx.reshape(chunk, batch // chunk, *a_Bx.shape[1:]), 0, 1)


def _from_chunks(a_NxC: jax.Array) -> jax.Array:
  swapped = jnp.swapaxes(a_NxC, 0, 1)
  return swapped.reshape(-1, *a_NxC.shape[2:])


def _chunk_size(batch: int, chunk_tokens: int) -> int:
  """Largest divisor of `batch` not above `chunk_tokens`, so chunks tile the batch exactly."""
  for size in range(min(chunk_tokens, batch), 0, -1):
    if batch % size == 0:
      return size
  return 1


def sparse_decode(vals_BxK: jax.Array, idx_BxK: jax.Array, W_dec_FxD: jax.Array, chunk_tokens: int) -> jax.Array:
  """sum_j vals[b, j] * W_dec[idx[b, j]] without materialising all gathered rows at once."""

  def decode_chunk(args):
    vals_CxK, idx_CxK = args
    return jnp.einsum('ck,ckd->cd', vals_CxK, W_dec_FxD[idx_CxK])

  if _whole_batch(vals_BxK.shape[0], chunk_tokens):
    return decode_chunk((vals_BxK, idx_BxK))
  chunks = (_to_chunks(vals_BxK, chunk_tokens), _to_chunks(idx_BxK, chunk_tokens))
  return _from_chunks(lax.map(decode_chunk, chunks))


def _gathered_dot(e_BxD: jax.Array, idx_BxK: jax.Array, W_FxD: jax.Array, chunk_tokens: int) -> jax.Array:
  """out[b, j] = e[b] . W[idx[b, j]], chunked like `sparse_decode`."""

  def chunk_dot(args):
    e_CxD, idx_CxK = args
    return jnp.einsum('cd,ckd->ck', e_CxD, W_FxD[idx_CxK])

  if _whole_batch(e_BxD.shape[0], chunk_tokens):
    return chunk_dot((e_BxD, idx_BxK))
  chunks = (_to_chunks(e_BxD, chunk_tokens), _to_chunks(idx_BxK, chunk_tokens))
  return _from_chunks(lax.map(chunk_dot, chunks))


def _scatter_row_grads(idx_BxK, dpre_BxK, xc_BxD, vals_BxK, e_BxD, num_latents: int, chunk_tokens: int):
  """dW_enc[i] += dpre[b,j] xc[b] and dW_dec[i] += vals[b,j] e[b] for i = idx[b,j], chunk by chunk."""
  d_in = xc_BxD.shape[-1]

  def add_rows(grads, idx_CxK, dpre_CxK, xc_CxD, vals_CxK, e_CxD):
    dW_enc, dW_dec = grads
    rows = idx_CxK.reshape(-1)
    dW_enc = dW_enc.at[rows].add((dpre_CxK[..., None] * xc_CxD[:, None, :]).reshape(-1, d_in))
    dW_dec = dW_dec.at[rows].add((vals_CxK[..., None] * e_CxD[:, None, :]).reshape(-1, d_in))
    return dW_enc, dW_dec

  zeros = jnp.zeros((num_latents, d_in), xc_BxD.dtype)
  arrays = (idx_BxK, dpre_BxK, xc_BxD, vals_BxK, e_BxD)
  if _whole_batch(idx_BxK.shape[0], chunk_tokens):
    return add_rows((zeros, zeros), *arrays)
  chunked = [_to_chunks(a, chunk_tokens) for a in arrays]

  def body(n, grads):
    return add_rows(grads, *(a[n] for a in chunked))

  return lax.fori_loop(0, chunked[0].shape[0], body, (zeros, zeros))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def topk_autoencode(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k, shards, chunk_tokens):
  """TopK SAE forward: returns (reconstruction without b_dec [B,d], kept values [B,k], latent ids [B,k]).

  `x` is data: it gets a zero cotangent. `mask_bias_F` is added to the pre-activations (0 to allow a
  latent, -inf to exclude it; AuxK uses it to pick among dead latents) and gets a zero cotangent.
  """
  out, _ = _topk_fwd(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k, shards, chunk_tokens)
  return out


def _topk_fwd(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k, shards, chunk_tokens):
  xc_BxD = x_BxD - b_dec_D
  pre_BxF = jnp.einsum('bd,fd->bf', xc_BxD, W_enc_FxD) + (b_enc_F + mask_bias_F)
  top_BxK, idx_BxK = global_top_k(pre_BxF, k, shards)
  vals_BxK = jnp.maximum(top_BxK, 0.0)
  recon_BxD = sparse_decode(vals_BxK, idx_BxK, W_dec_FxD, chunk_tokens)
  residuals = (x_BxD, xc_BxD, vals_BxK, idx_BxK, W_enc_FxD, W_dec_FxD, mask_bias_F)
  return (recon_BxD, vals_BxK, idx_BxK), residuals


def _topk_bwd(k, shards, chunk_tokens, residuals, cotangents):
  del k, shards
  x_BxD, xc_BxD, vals_BxK, idx_BxK, W_enc_FxD, W_dec_FxD, mask_bias_F = residuals
  e_BxD, dvals_BxK, _ = cotangents
  num_latents = W_dec_FxD.shape[0]
  dvals_BxK = dvals_BxK + _gathered_dot(e_BxD, idx_BxK, W_dec_FxD, chunk_tokens)
  dpre_BxK = jnp.where(vals_BxK > 0, dvals_BxK, 0.0)
  dW_enc, dW_dec = _scatter_row_grads(idx_BxK, dpre_BxK, xc_BxD, vals_BxK, e_BxD, num_latents, chunk_tokens)
  db_enc_F = jax.ops.segment_sum(dpre_BxK.reshape(-1), idx_BxK.reshape(-1), num_segments=num_latents)
  db_dec_D = -(db_enc_F @ W_enc_FxD)
  return (jnp.zeros_like(x_BxD), db_dec_D, dW_enc, db_enc_F, dW_dec, jnp.zeros_like(mask_bias_F))


topk_autoencode.defvjp(_topk_fwd, _topk_bwd)


def topk_autoencode_reference(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k):
  """The dense formulation, differentiated by autodiff. Used by tests to check the custom backward."""
  x_BxD = lax.stop_gradient(x_BxD)
  pre_BxF = (x_BxD - b_dec_D) @ W_enc_FxD.T + b_enc_F + lax.stop_gradient(mask_bias_F)
  top_BxK, idx_BxK = lax.top_k(pre_BxF, k)
  vals_BxK = jnp.maximum(top_BxK, 0.0)
  z_BxF = jnp.zeros_like(pre_BxF).at[jnp.arange(pre_BxF.shape[0])[:, None], idx_BxK].set(vals_BxK)
  return z_BxF @ W_dec_FxD, vals_BxK, idx_BxK
