"""Cosine similarity between two sets of latent directions, swept blockwise over `A @ B.T` on the accelerator.

Owns the unit normalisation of rows (a zero-norm row has cosine 0 with everything, and the caller is warned), the
canonical float64 pair cosine that every exact solver in `saejax.align` is judged by (`pair_cos64`), the float32
error bound that lets a float32 screen stand in for it (`cos32_error_bound`), and the jitted sweeps: dense assembly on
the host, per-row and per-column top-k, per-row and per-column max, and the pricing screen of the sparse solver.

A sweep holds one [block_rows, n_b] block of the n_a x n_b matrix on the device at a time. Blocks are gathered by row
index and the last one is padded (with the index of an appended zero row) to the same shape, so each kernel compiles
once per problem size; padded rows are masked out of every column statistic. The products run at
`Precision.HIGHEST`: the GPU default is TF32, whose ~1e-3 error would break the float32 error bound.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# One block is at most 2**28 float32 (1 GiB): at n_b = 131,072 that is 2,048 rows, which keeps the CPU path under
# its 8 GB peak-RSS budget with room for top_k's temporaries.
MAX_BLOCK_ELEMS = 1 << 28
_U32 = 2.0**-24
_HOST_CHUNK = 8192
_HOST_THREADS = min(8, os.cpu_count() or 1)


class UnitRows(NamedTuple):
  """Rows prepared once: the caller's values (for float64 rechecks), 1/norm in float64, and float32 unit rows."""

  raw_NxD: np.ndarray
  inv_norm_N: np.ndarray
  unit32_NxD: np.ndarray


def unit_rows(X_NxD, name: str = 'A') -> UnitRows:
  """Normalises rows to unit norm in float64, then rounds once to float32; zero rows stay zero (cosine 0)."""
  if isinstance(X_NxD, UnitRows):
    return X_NxD
  raw_NxD = np.asarray(X_NxD)
  if raw_NxD.ndim != 2 or raw_NxD.shape[0] == 0:
    raise ValueError(f'{name} must be a non-empty [n, d] matrix, got shape {raw_NxD.shape}')
  n = raw_NxD.shape[0]
  sq_N = np.empty(n)
  for s in range(0, n, _HOST_CHUNK):  # chunked so a float64 copy of a 131K x 4096 matrix never exists
    sq_N[s : s + _HOST_CHUNK] = np.einsum(
      'nd,nd->n', raw_NxD[s : s + _HOST_CHUNK], raw_NxD[s : s + _HOST_CHUNK], dtype=np.float64
    )
  if not np.all(np.isfinite(sq_N)):
    raise ValueError(f'{name} has {int(np.sum(~np.isfinite(sq_N)))} rows with NaN or inf entries')
  zero_N = sq_N == 0
  if zero_N.any():
    warnings.warn(
      f'{int(zero_N.sum())} of {n} rows of {name} have zero norm; their cosine with every row is 0', stacklevel=3
    )
  inv_norm_N = np.where(zero_N, 0.0, 1.0 / np.sqrt(np.where(zero_N, 1.0, sq_N)))
  unit32_NxD = np.empty(raw_NxD.shape, np.float32)
  for s in range(0, n, _HOST_CHUNK):
    unit32_NxD[s : s + _HOST_CHUNK] = raw_NxD[s : s + _HOST_CHUNK] * inv_norm_N[s : s + _HOST_CHUNK, None]
  return UnitRows(raw_NxD, inv_norm_N, unit32_NxD)


def pair_cos64(ua: UnitRows, ub: UnitRows, rows_E: np.ndarray, cols_E: np.ndarray) -> np.ndarray:
  """The canonical cosine of pairs (rows_E[e], cols_E[e]) in float64: exact products, float64 sums.

  Gather-bound (two d-vectors per pair), so chunks run on a thread pool: numpy releases the GIL in both.
  """
  out_E = np.empty(len(rows_E))

  def chunk(s):
    r, c = rows_E[s : s + _HOST_CHUNK], cols_E[s : s + _HOST_CHUNK]
    dots = np.einsum('ed,ed->e', ua.raw_NxD[r], ub.raw_NxD[c], dtype=np.float64)
    out_E[s : s + _HOST_CHUNK] = dots * ua.inv_norm_N[r] * ub.inv_norm_N[c]

  starts = range(0, len(rows_E), _HOST_CHUNK)
  if len(starts) <= 1:
    for s in starts:
      chunk(s)
  else:
    with ThreadPoolExecutor(_HOST_THREADS) as pool:
      list(pool.map(chunk, starts))
  return out_E


def rows_cos64(ua: UnitRows, ub: UnitRows, rows_R: np.ndarray) -> np.ndarray:
  """Whole rows of the canonical cosine matrix, [len(rows_R), n_b] float64 (for the rare full-row rechecks)."""
  A64_RxD = ua.raw_NxD[rows_R].astype(np.float64) * ua.inv_norm_N[rows_R, None]
  out_RxM = np.empty((len(rows_R), ub.raw_NxD.shape[0]))
  for s in range(0, ub.raw_NxD.shape[0], _HOST_CHUNK):
    B64_CxD = ub.raw_NxD[s : s + _HOST_CHUNK].astype(np.float64) * ub.inv_norm_N[s : s + _HOST_CHUNK, None]
    out_RxM[:, s : s + _HOST_CHUNK] = A64_RxD @ B64_CxD.T
  return out_RxM


def cos32_error_bound(d: int) -> float:
  """Bound on |cos32 - cos64| for the kernels' float32 products of float32 unit rows, any summation order.

  Rounding the unit rows to float32 moves the dot by <= 2u; a float32 dot of length d errs by <= gamma_d ~ d*u
  (sum |a_k b_k| <= 1 by Cauchy-Schwarz). Both hold for FMA and blocked sums, i.e. for any BLAS or GPU GEMM.
  """
  return 1.01 * (d + 3) * _U32


def on_accelerator() -> bool:
  return jax.default_backend() != 'cpu'


class Operands(NamedTuple):
  """Device-resident unit rows: A with one zero row appended (the padding target) and B."""

  A_dev: jax.Array
  B_dev: jax.Array
  n_a: int
  n_b: int
  block_rows: int


def fit_block_rows(block_rows: int, n_a: int, n_b: int) -> int:
  """Caps a block at MAX_BLOCK_ELEMS and at n_a (rounded up to 8) so tiny problems do not pad to 4096 rows."""
  cap = max(8, MAX_BLOCK_ELEMS // max(n_b, 1))
  return int(max(1, min(block_rows, cap, -(-n_a // 8) * 8)))


def operands(ua: UnitRows, ub: UnitRows, block_rows: int) -> Operands:
  if ua.unit32_NxD.shape[1] != ub.unit32_NxD.shape[1]:
    raise ValueError(f'A and B must have the same width, got {ua.unit32_NxD.shape} and {ub.unit32_NxD.shape}')
  n_a, n_b = ua.unit32_NxD.shape[0], ub.unit32_NxD.shape[0]
  A_pad = np.concatenate([ua.unit32_NxD, np.zeros((1, ua.unit32_NxD.shape[1]), np.float32)])
  return Operands(jnp.asarray(A_pad), jnp.asarray(ub.unit32_NxD), n_a, n_b, fit_block_rows(block_rows, n_a, n_b))


def row_blocks(ops: Operands, rows_R: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
  """(start, count, padded row ids) per block; padding points at A's appended zero row (index n_a).

  A short row list gets a power-of-two block, not a full one: pricing a few dozen rows should not cost a full
  block's GEMM, and powers of two bound the number of compiled shapes.
  """
  rows_R = np.arange(ops.n_a) if rows_R is None else np.asarray(rows_R)
  block = min(ops.block_rows, 1 << max(3, int(len(rows_R) - 1).bit_length()))
  for start in range(0, len(rows_R), block):
    ids = rows_R[start : start + block].astype(np.int32)
    padded = np.full(block, ops.n_a, np.int32)
    padded[: len(ids)] = ids
    yield start, len(ids), padded


def _pipelined(calls: Iterator, consume: Callable) -> None:
  """Dispatches block t+1 before pulling block t to the host, so transfers overlap the next GEMM."""
  pending = None
  for item in calls:
    if pending is not None:
      consume(*pending)
    pending = item
  if pending is not None:
    consume(*pending)


def _block_cos(A_dev, B_dev, rows_R):
  return jnp.dot(A_dev[rows_R], B_dev.T, precision=lax.Precision.HIGHEST)


_cos_kernel = jax.jit(_block_cos)


@functools.partial(jax.jit, static_argnames=('k', 'k_col'), donate_argnums=(3, 4))
def _topk_kernel(A_dev, B_dev, rows_R, col_vals_MxK, col_idx_MxK, *, k, k_col):
  # [n_b, R] layout: the column top-k reads contiguous rows, and the one transpose feeds the row top-k.
  cos_MxR = jnp.dot(B_dev, A_dev[rows_R].T, precision=lax.Precision.HIGHEST)
  row_vals, row_idx = lax.top_k(cos_MxR.T, k)
  if k_col == 0:
    return row_vals, row_idx, col_vals_MxK, col_idx_MxK
  valid_R = rows_R < A_dev.shape[0] - 1
  blk_vals, pos = lax.top_k(jnp.where(valid_R[None, :], cos_MxR, -jnp.inf), min(k_col, rows_R.shape[0]))
  merged_vals = jnp.concatenate([col_vals_MxK, blk_vals], axis=1)
  merged_idx = jnp.concatenate([col_idx_MxK, rows_R[pos]], axis=1)
  col_vals_MxK, keep = lax.top_k(merged_vals, k_col)
  return row_vals, row_idx, col_vals_MxK, jnp.take_along_axis(merged_idx, keep, axis=1)


@jax.jit
def _max_kernel(A_dev, B_dev, rows_R, col_max_M):
  cos_RxM = _block_cos(A_dev, B_dev, rows_R)
  valid_R = rows_R < A_dev.shape[0] - 1
  return cos_RxM.max(axis=1), jnp.maximum(col_max_M, jnp.where(valid_R[:, None], cos_RxM, -jnp.inf).max(axis=0))


@functools.partial(jax.jit, static_argnames=('m',))
def _price_kernel(A_dev, B_dev, rows_R, alpha_R, skip_R, v_M, margin, *, m):
  # slack = cos + v_j - alpha_i = -(reduced cost); alpha = +inf on padded rows, so they never flag.
  slack_RxM = _block_cos(A_dev, B_dev, rows_R) + v_M[None, :] - alpha_R[:, None]
  slack_RxM = jnp.where(jnp.arange(v_M.shape[0])[None, :] == skip_R[:, None], -jnp.inf, slack_RxM)
  count_R = jnp.sum(slack_RxM > -margin, axis=1, dtype=jnp.int32)
  top_vals, top_idx = lax.top_k(slack_RxM, m)
  return count_R, top_vals, top_idx


def dense_cosine(A_NxD, B_MxD, block_rows: int = 4096, out: np.ndarray | None = None) -> np.ndarray:
  """The full [n_a, n_b] float32 cosine matrix, assembled on the host block by block (into `out` if given)."""
  ua, ub = unit_rows(A_NxD, 'A'), unit_rows(B_MxD, 'B')
  ops = operands(ua, ub, block_rows)
  cos_NxM = np.empty((ops.n_a, ops.n_b), np.float32) if out is None else out
  if cos_NxM.shape != (ops.n_a, ops.n_b) or cos_NxM.dtype != np.float32:
    raise ValueError(f'out must be float32 {(ops.n_a, ops.n_b)}, got {cos_NxM.dtype} {cos_NxM.shape}')

  def consume(start, count, block):
    cos_NxM[start : start + count] = np.asarray(block)[:count]

  calls = ((s, c, _cos_kernel(ops.A_dev, ops.B_dev, rows)) for s, c, rows in row_blocks(ops))
  _pipelined(calls, consume)
  return cos_NxM


def topk_sweep(ops: Operands, k: int, k_col: int = 0) -> tuple[np.ndarray, ...]:
  """Per-row top-k (vals, idx) and, if k_col > 0, per-column top-k_col (vals, row idx), in one GEMM sweep."""
  k, k_col = min(k, ops.n_b), min(k_col, ops.n_a)
  row_vals = np.empty((ops.n_a, k), np.float32)
  row_idx = np.empty((ops.n_a, k), np.int32)
  col_state = [jnp.full((ops.n_b, max(k_col, 1)), -jnp.inf), jnp.zeros((ops.n_b, max(k_col, 1)), jnp.int32)]

  def calls():
    for start, count, rows in row_blocks(ops):
      vals, idx, col_state[0], col_state[1] = _topk_kernel(ops.A_dev, ops.B_dev, rows, *col_state, k=k, k_col=k_col)
      yield start, count, vals, idx

  def consume(start, count, vals, idx):
    row_vals[start : start + count] = np.asarray(vals)[:count]
    row_idx[start : start + count] = np.asarray(idx)[:count]

  _pipelined(calls(), consume)
  if k_col == 0:
    return row_vals, row_idx
  return row_vals, row_idx, np.asarray(col_state[0]), np.asarray(col_state[1])


def topk_candidates(A_NxD, B_MxD, k: int, block_rows: int = 4096, columns: bool = False) -> tuple[np.ndarray, ...]:
  """Each row's top-k columns by cosine: (vals [n_a, k] f32, idx [n_a, k] int32), best first.

  columns=True also returns each column's top-k rows (col_vals [n_b, k], col_idx [n_b, k]) from the same sweep,
  so the candidate graph can be the union of both.
  """
  ops = operands(unit_rows(A_NxD, 'A'), unit_rows(B_MxD, 'B'), block_rows)
  return topk_sweep(ops, k, k if columns else 0)


def max_cosine(A_NxD, B_MxD, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """(row_max [n_a], col_max [n_b]) float32: each latent's best cosine over all latents of the other set."""
  ops = operands(unit_rows(A_NxD, 'A'), unit_rows(B_MxD, 'B'), block_rows)
  row_max = np.empty(ops.n_a, np.float32)
  col_max = [jnp.full(ops.n_b, -jnp.inf)]

  def calls():
    for start, count, rows in row_blocks(ops):
      block_max, col_max[0] = _max_kernel(ops.A_dev, ops.B_dev, rows, col_max[0])
      yield start, count, block_max

  def consume(start, count, block_max):
    row_max[start : start + count] = np.asarray(block_max)[:count]

  _pipelined(calls(), consume)
  return row_max, np.asarray(col_max[0])


def pricing_screen(
  ops: Operands,
  rows_R: np.ndarray,
  alpha_R: np.ndarray,
  skip_R: np.ndarray,
  v_M: np.ndarray,
  margin: float,
  m: int = 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Float32 screen of the reduced costs r_ij = alpha_i - cos_ij - v_j of rows_R against every column.

  Returns per row the number of pairs with r32 < margin (pair (i, skip_i) excluded) and the m pairs of smallest
  r32 as (count [R], slack [R, m] = -r32, cols [R, m]). Nothing of size [R, n_b] leaves the device.
  """
  m = min(m, ops.n_b)
  count_R = np.empty(len(rows_R), np.int64)
  slack_RxK = np.empty((len(rows_R), m), np.float32)
  cols_RxK = np.empty((len(rows_R), m), np.int64)
  v_dev, margin = jnp.asarray(v_M, jnp.float32), jnp.float32(margin)

  def calls():
    for start, count, rows in row_blocks(ops, rows_R):
      alpha = np.full(len(rows), np.inf, np.float32)
      alpha[:count] = alpha_R[start : start + count]
      skip = np.full(len(rows), -1, np.int32)
      skip[:count] = skip_R[start : start + count]
      yield start, count, _price_kernel(ops.A_dev, ops.B_dev, rows, alpha, skip, v_dev, margin, m=m)

  def consume(start, count, result):
    counts, vals, idx = (np.asarray(x)[:count] for x in result)
    count_R[start : start + count], slack_RxK[start : start + count], cols_RxK[start : start + count] = (
      counts,
      vals,
      idx,
    )

  _pipelined(calls(), consume)
  return count_R, slack_RxK, cols_RxK
