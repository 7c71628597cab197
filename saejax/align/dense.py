"""Exact dense assignment: the full float32 cosine matrix, solved by `lapjv` (Jonker-Volgenant) on the host.

Owns the guards around lapjv 1.3.x, whose API is `lapjv(cost) -> (row_ind, col_ind, (total, u, v))` on a square
float32 matrix that it minimises:
- its C++ core indexes with 32-bit ints (`i * dim`) and segfaults from n ~ 46,400, taking the process down, so
  n >= LAPJV_MAX_N (46,341: the first n with n*n > 2**31 - 1) is refused before lapjv is called;
- it minimises and is square-only: it is given `-cos`, with the n_b - n_a missing rows of a rectangular problem
  padded as zero-cost dummy rows (a dummy row takes any column at no cost, so the real rows get the best subset);
- it accumulates its total in float32, so the total is recomputed in float64 from the indices.
"""

from __future__ import annotations

import time

import numpy as np

from saejax.align import cosine

LAPJV_MAX_N = 46_341


def _lapjv():
  # Looked up at call time so tests can replace it (and prove the size guard fires before any call).
  from lapjv import lapjv

  return lapjv


def check_lapjv_size(n: int) -> None:
  if n >= LAPJV_MAX_N:
    raise ValueError(
      f"lapjv cannot take n = {n:,} (>= {LAPJV_MAX_N:,}): its 32-bit indexing segfaults there; use method='sparse'"
    )


def dense_bytes(n_a: int, n_b: int) -> int:
  """Host memory the dense path needs: the square float32 cost matrix lapjv works on."""
  n = max(n_a, n_b)
  return 4 * n * n


def solve_dense(ua: cosine.UnitRows, ub: cosine.UnitRows, block_rows: int = 4096) -> tuple[np.ndarray, dict]:
  """partner [n_a] int64 maximising the total cosine (n_a <= n_b), and timing stats."""
  n_a, n_b = ua.unit32_NxD.shape[0], ub.unit32_NxD.shape[0]
  if n_a > n_b:
    raise ValueError(f'dense matching needs n_a <= n_b, got {n_a} > {n_b}')
  check_lapjv_size(n_b)
  stats = {}
  start = time.perf_counter()
  cost_NxN = np.zeros((n_b, n_b), np.float32)
  cosine.dense_cosine(ua, ub, block_rows, out=cost_NxN[:n_a])
  np.negative(cost_NxN[:n_a], out=cost_NxN[:n_a])
  stats['cosine_s'] = time.perf_counter() - start
  start = time.perf_counter()
  row_ind, _, _ = _lapjv()(cost_NxN)
  stats['lapjv_s'] = time.perf_counter() - start
  del cost_NxN
  partner_N = np.asarray(row_ind[:n_a], np.int64)
  if len(np.unique(partner_N)) != n_a or partner_N.min() < 0 or partner_N.max() >= n_b:
    raise RuntimeError('lapjv returned an invalid assignment (NaN or inf in the cost matrix?)')
  return partner_N, stats
