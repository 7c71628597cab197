"""TopK encode/decode with a hand-written backward that touches only the k selected latents, and its dense twin.

The dense formulation (`relu(x W_enc^T) -> top-k -> z_BxF @ W_dec`) costs five [B,d]x[d,F] products per step
under autodiff: encoder and decoder forward, then the decoder's input and weight gradients and the encoder's
weight gradient. `topk_autoencode` keeps only the encoder product dense: the decoder gathers the k selected rows
per token, and the backward scatters k rows per token into the weight gradients. `topk_autoencode_dense` is the
five-product form, for hardware whose scatters cost more than matrix products (saejax.tuning picks).

How the gathers and scatters split the batch is a `Chunking`. On CPU the gathered [B,k,d] working set, not the
FLOPs, is what costs, so they loop over small token chunks that stay in cache. On accelerators a loop of small
chunks is thousands of tiny kernel launches, so they run over the whole batch, or a few large blocks whose
number does not grow with the batch. Token chunks are strided (chunk j holds tokens j, j+n, j+2n, ...) so that
a batch sharded over the mesh's `data` axis stays evenly sharded inside every chunk.

`compute_dtype='bfloat16'` casts the operands of the products and gathers to bf16 and accumulates in float32;
the parameters, their gradients, the pre-activations and the top-k stay float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def global_top_k(pre_BxF: jax.Array, k: int, shards: int = 1, block: int = 0) -> tuple[jax.Array, jax.Array]:
  """Top-k over the latent axis: exactly `lax.top_k` (values, indices, ties), computed in pieces where faster.

  With latents sharded, a top-k of per-shard top-k's. Else with `block` > 0 (saejax.tuning: on CPU) and enough
  latents, `block_top_k`. Ties break towards the lower latent index in every stage, as in `lax.top_k`.
  """
  num_latents = pre_BxF.shape[-1]
  if shards <= 1 or num_latents % shards or num_latents // shards < k:
    if uses_blocks(num_latents, k, block):
      return block_top_k(pre_BxF, k, block)
    return lax.top_k(pre_BxF, k)
  per_shard = num_latents // shards
  blocks_BxNxL = pre_BxF.reshape(*pre_BxF.shape[:-1], shards, per_shard)
  local_vals, local_idx = lax.top_k(blocks_BxNxL, k)
  local_idx = local_idx + (jnp.arange(shards) * per_shard)[:, None]
  flat_shape = (*pre_BxF.shape[:-1], shards * k)
  vals, pos = lax.top_k(local_vals.reshape(flat_shape), k)
  return vals, jnp.take_along_axis(local_idx.reshape(flat_shape), pos, axis=-1)


# Blocks pay off only when the two small top-k's see far fewer values than the whole row: F / block block
# maxima and k * block candidates (RESULTS.md, issue 14, seventh session: slower at F=1024, k=32, block 8).
_BLOCKS_MIN_RATIO = 16


def uses_blocks(num_latents: int, k: int, block: int) -> bool:
  """Whether `global_top_k` takes the two-stage path for this row length, k and block size."""
  return block > 0 and num_latents % block == 0 and num_latents >= _BLOCKS_MIN_RATIO * k * block


def _flip_negatives(bits: jax.Array) -> jax.Array:
  """Maps float32 bits to int32 keys in `lax.top_k`'s total order of float32 (-0.0 below +0.0, NaN by its bits),
  so an integer max is the exact max in that order; the map is its own inverse."""
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def block_top_k(pre_BxF: jax.Array, k: int, block: int) -> tuple[jax.Array, jax.Array]:
  """`lax.top_k(pre_BxF, k)` exactly, as a top-k of block maxima, then a top-k of the k best blocks' values.

  XLA:CPU's top-k costs about 5 ns per value whatever k (a partial sort per row); a block max is a vectorised
  reduction. Why it is exact: if a top-k value t lay in an unselected block b, each of the k selected blocks
  would hold a maximum that ranks ahead of t (a larger value, or an equal one at a lower index, since the
  selection breaks ties towards lower blocks), so t would not be in the top k. The selected blocks are
  gathered in ascending order, so the second top-k breaks ties towards the lower latent index too.
  """
  *lead, num_latents = pre_BxF.shape
  num_blocks = num_latents // block
  blocks_BxNxL = pre_BxF.reshape(-1, num_blocks, block)
  keys_BxNxL = _flip_negatives(lax.bitcast_convert_type(blocks_BxNxL.astype(jnp.float32), jnp.int32))
  block_max_BxN = lax.bitcast_convert_type(_flip_negatives(jnp.max(keys_BxNxL, axis=-1)), jnp.float32)
  _, chosen_BxK = lax.top_k(block_max_BxN, k)
  chosen_BxK = jnp.sort(chosen_BxK, axis=-1)
  candidates_BxKL = jnp.take_along_axis(blocks_BxNxL, chosen_BxK[:, :, None], axis=1).reshape(-1, k * block)
  vals_BxK, pos_BxK = lax.top_k(candidates_BxKL, k)
  idx_BxK = jnp.take_along_axis(chosen_BxK, pos_BxK // block, axis=-1) * block + pos_BxK % block
  return vals_BxK.reshape(*lead, k), idx_BxK.reshape(*lead, k)


class Chunking(NamedTuple):
  """How the kernels split their work (saejax.tuning picks it per platform): the gathers and scatters the batch,
  the top-k the latents (`topk_block` > 0: `block_top_k` over blocks of that many latents, where it pays).

  `tokens` > 0: strided chunks of that many tokens (cache-sized on CPU; the trip count grows with the batch).
  Else `blocks` > 1: about that many equal blocks, whatever the batch (a fixed, small trip count that bounds the
  gathered `[B/blocks, k, d]` working set on accelerators). Else the whole batch in one pass, no loop.
  """

  tokens: int = 0
  blocks: int = 0
  topk_block: int = 0

  def chunk_size(self, batch: int) -> int:
    """Tokens per chunk; `batch` means no loop."""
    if self.tokens > 0:
      return _largest_divisor_at_most(batch, self.tokens)
    if self.blocks > 1:
      # The fewest blocks >= `blocks` that tile the batch; an awkward batch runs whole rather than in tiny blocks.
      for count in range(self.blocks, 4 * self.blocks + 1):
        if batch % count == 0:
          return batch // count
    return batch


def _largest_divisor_at_most(batch: int, limit: int) -> int:
  """Largest divisor of `batch` not above `limit`, so chunks tile the batch exactly."""
  for size in range(min(limit, batch), 0, -1):
    if batch % size == 0:
      return size
  return 1


def _to_chunks(a_Bx: jax.Array, chunk: int) -> jax.Array:
  """[B, ...] -> [num_chunks, chunk, ...] with strided token assignment."""
  batch = a_Bx.shape[0]
  return jnp.swapaxes(a_Bx.reshape(chunk, batch // chunk, *a_Bx.shape[1:]), 0, 1)


def _from_chunks(a_NxC: jax.Array) -> jax.Array:
  swapped = jnp.swapaxes(a_NxC, 0, 1)
  return swapped.reshape(-1, *a_NxC.shape[2:])


def _map_chunks(fn, arrays: tuple, chunking: Chunking) -> jax.Array:
  """`fn(*arrays)` over the batch, as one pass or as a sequential map over chunks (same result)."""
  batch = arrays[0].shape[0]
  chunk = chunking.chunk_size(batch)
  if chunk >= batch:
    return fn(*arrays)
  return _from_chunks(lax.map(lambda chunked: fn(*chunked), tuple(_to_chunks(a, chunk) for a in arrays)))


def mm(subscripts: str, a: jax.Array, b: jax.Array, compute_dtype: str) -> jax.Array:
  """An einsum whose operands are cast to `compute_dtype` ('float32' or 'bfloat16'), accumulated in float32."""
  dtype = jnp.dtype(compute_dtype)
  return jnp.einsum(subscripts, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def sparse_decode(vals_BxK, idx_BxK, W_dec_FxD, chunking: Chunking, compute_dtype: str = 'float32') -> jax.Array:
  """sum_j vals[b, j] * W_dec[idx[b, j]] without materialising all gathered rows at once."""
  W_FxD = W_dec_FxD.astype(compute_dtype)  # cast once, so each chunk gathers rows of the compute dtype
  return _map_chunks(
    lambda vals_CxK, idx_CxK: mm('ck,ckd->cd', vals_CxK, W_FxD[idx_CxK], compute_dtype), (vals_BxK, idx_BxK), chunking
  )


def _gathered_dot(e_BxD, idx_BxK, W_FxD, chunking: Chunking, compute_dtype: str) -> jax.Array:
  """out[b, j] = e[b] . W[idx[b, j]], chunked like `sparse_decode`."""
  W_FxD = W_FxD.astype(compute_dtype)
  return _map_chunks(
    lambda e_CxD, idx_CxK: mm('cd,ckd->ck', e_CxD, W_FxD[idx_CxK], compute_dtype), (e_BxD, idx_BxK), chunking
  )


def _scatter_row_grads(idx_BxK, dpre_BxK, xc_BxD, vals_BxK, e_BxD, num_latents: int, chunking: Chunking):
  """dW_enc[i] += dpre[b,j] xc[b] and dW_dec[i] += vals[b,j] e[b] for i = idx[b,j], chunk by chunk (float32)."""
  d_in = xc_BxD.shape[-1]

  def add_rows(grads, idx_CxK, dpre_CxK, xc_CxD, vals_CxK, e_CxD):
    dW_enc, dW_dec = grads
    rows = idx_CxK.reshape(-1)
    dW_enc = dW_enc.at[rows].add((dpre_CxK[..., None] * xc_CxD[:, None, :]).reshape(-1, d_in))
    dW_dec = dW_dec.at[rows].add((vals_CxK[..., None] * e_CxD[:, None, :]).reshape(-1, d_in))
    return dW_enc, dW_dec

  zeros = jnp.zeros((num_latents, d_in), jnp.float32)
  arrays = (idx_BxK, dpre_BxK, xc_BxD, vals_BxK, e_BxD)
  batch = idx_BxK.shape[0]
  chunk = chunking.chunk_size(batch)
  if chunk >= batch:
    return add_rows((zeros, zeros), *arrays)
  chunked = [_to_chunks(a, chunk) for a in arrays]

  def body(n, grads):
    return add_rows(grads, *(a[n] for a in chunked))

  return lax.fori_loop(0, batch // chunk, body, (zeros, zeros))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def topk_autoencode(
  x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k, shards, chunking, compute_dtype='float32'
):
  """TopK SAE forward: returns (reconstruction without b_dec [B,d], kept values [B,k], latent ids [B,k]).

  `x` is data: it gets a zero cotangent. `mask_bias_F` is added to the pre-activations (0 to allow a
  latent, -inf to exclude it; AuxK uses it to pick among dead latents) and gets a zero cotangent.
  The encoder product, the decode and the backward's gathered dot take `compute_dtype` operands and accumulate
  in float32; the pre-activations, the top-k and the row-gradient scatters stay float32.
  """
  out, _ = _topk_fwd(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k, shards, chunking, compute_dtype)
  return out


def _encode_top_k(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, mask_bias_F, k, shards, compute_dtype, topk_block=0):
  xc_BxD = x_BxD - b_dec_D
  pre_BxF = mm('bd,fd->bf', xc_BxD, W_enc_FxD, compute_dtype) + (b_enc_F + mask_bias_F)
  top_BxK, idx_BxK = global_top_k(pre_BxF, k, shards, topk_block)
  return xc_BxD, jnp.maximum(top_BxK, 0.0), idx_BxK


def _topk_fwd(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k, shards, chunking, compute_dtype):
  xc_BxD, vals_BxK, idx_BxK = _encode_top_k(
    x_BxD, b_dec_D, W_enc_FxD, b_enc_F, mask_bias_F, k, shards, compute_dtype, chunking.topk_block
  )
  recon_BxD = sparse_decode(vals_BxK, idx_BxK, W_dec_FxD, chunking, compute_dtype)
  residuals = (x_BxD, xc_BxD, vals_BxK, idx_BxK, W_enc_FxD, W_dec_FxD, mask_bias_F)
  return (recon_BxD, vals_BxK, idx_BxK), residuals


def _topk_bwd(k, shards, chunking, compute_dtype, residuals, cotangents):
  del k, shards
  x_BxD, xc_BxD, vals_BxK, idx_BxK, W_enc_FxD, W_dec_FxD, mask_bias_F = residuals
  e_BxD, dvals_BxK, _ = cotangents
  num_latents = W_dec_FxD.shape[0]
  dvals_BxK = dvals_BxK + _gathered_dot(e_BxD, idx_BxK, W_dec_FxD, chunking, compute_dtype)
  dpre_BxK = jnp.where(vals_BxK > 0, dvals_BxK, 0.0)
  dW_enc, dW_dec = _scatter_row_grads(idx_BxK, dpre_BxK, xc_BxD, vals_BxK, e_BxD, num_latents, chunking)
  db_enc_F = jax.ops.segment_sum(dpre_BxK.reshape(-1), idx_BxK.reshape(-1), num_segments=num_latents)
  db_dec_D = -(db_enc_F @ W_enc_FxD)
  return (jnp.zeros_like(x_BxD), db_dec_D, dW_enc, db_enc_F, dW_dec, jnp.zeros_like(mask_bias_F))


topk_autoencode.defvjp(_topk_fwd, _topk_bwd)


def topk_autoencode_dense(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k, shards, compute_dtype):
  """`topk_autoencode` as dense products, differentiated by autodiff: `z_BxF @ W_dec` and a masked dense backward.

  Five [B,d]x[d,F]-sized products per step instead of one, but no gathers or row scatters: the formulation for
  hardware whose matrix units are cheap and whose scatters are not (saejax.tuning).
  """
  x_BxD, mask_bias_F = lax.stop_gradient(x_BxD), lax.stop_gradient(mask_bias_F)
  _, vals_BxK, idx_BxK = _encode_top_k(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, mask_bias_F, k, shards, compute_dtype)
  rows_B1 = jnp.arange(x_BxD.shape[0])[:, None]
  z_BxF = jnp.zeros((x_BxD.shape[0], W_dec_FxD.shape[0]), jnp.float32).at[rows_B1, idx_BxK].set(vals_BxK)
  return mm('bf,fd->bd', z_BxF, W_dec_FxD, compute_dtype), vals_BxK, idx_BxK


def topk_autoencode_reference(x_BxD, b_dec_D, W_enc_FxD, b_enc_F, W_dec_FxD, mask_bias_F, k):
  """The dense formulation, differentiated by autodiff. Used by tests to check the custom backward."""
  x_BxD = lax.stop_gradient(x_BxD)
  pre_BxF = (x_BxD - b_dec_D) @ W_enc_FxD.T + b_enc_F + lax.stop_gradient(mask_bias_F)
  top_BxK, idx_BxK = lax.top_k(pre_BxF, k)
  vals_BxK = jnp.maximum(top_BxK, 0.0)
  z_BxF = jnp.zeros_like(pre_BxF).at[jnp.arange(pre_BxF.shape[0])[:, None], idx_BxK].set(vals_BxK)
  return z_BxF @ W_dec_FxD, vals_BxK, idx_BxK
