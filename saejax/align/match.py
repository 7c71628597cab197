"""`match_latents`: the maximum-total-cosine one-to-one matching of A's latents into B's, and the `Matching` result.

Owns the choice between the two exact solvers and the shape of the answer. 'dense' builds the float32 cosine
matrix and runs lapjv (fast while the matrix is small; refused from n = 46,341, where lapjv's 32-bit indexing
segfaults); 'sparse' is the certified column-generation method (any n; memory ~ n * k). 'auto' takes dense below
DENSE_CROSSOVER_N and sparse from there, at n >= 46,341, or when the dense matrix would exceed `max_dense_bytes`.

Both paths end with the same LP-duality certificate when `certify=True` (the sparse path has it built in; the dense
path runs `sparse.certify` on lapjv's answer, and if lapjv's float32 arithmetic left it short of the float64 optimum,
the sparse solver takes over: stats['repair']), so `certified_optimal` means the total is the exact optimum of the
float64 cosines, not that a solver returned without error.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from saejax.align import cosine, dense, sparse

# Measured on the 2-core x86-64 CPU (JAX 0.10 CPU backend, lapjv 1.3.29) on planted pairs (half of A noisy copies of
# distinct rows of B, cosine ~0.9, half random), seconds per matching with compiled kernels; both certified, always
# the same total. dense = cosine matrix + lapjv + certificate (without the certificate in brackets), sparse
# = k = 64, row candidates only (the CPU default).
#   n      d=64: dense  sparse   d=256: dense  sparse   d=768: dense  sparse
#   1,024  0.05 (0.02)  0.03            0.06 (0.01) 0.04        0.07 (0.03) 0.09
#   2,048  0.14 (0.09)  0.09            0.19 (0.09) 0.12        0.25 (0.14) 0.24
#   4,096  0.60 (0.38)  0.22            0.62 (0.41) 0.29        1.21 (0.56) 0.58
#   8,192  2.57 (1.65)  0.66            2.78 (1.88) 0.77        3.39 (2.03) 1.49
#   32,768 at d = 768: sparse 14 s, peak RSS 1.4 GB (the notes: lapjv 88 s, 5.3 GB); at
#   131,072 x 768: sparse 177 s, peak RSS 5.3 GB, 3 pricing rounds, 2 LAP solves of 21 s.
# The two tie around n = 1,024-2,048 and sparse wins from there; dense is kept below as the independent solver.
DENSE_CROSSOVER_N = 2048
DEFAULT_MAX_DENSE_BYTES = 8 << 30
METHODS = ('auto', 'dense', 'sparse')


@dataclasses.dataclass
class Matching:
  """Row i of A is matched to column partner[i] of B, with cosine cos[i]; total is the float64 sum of those."""

  partner: np.ndarray
  cos: np.ndarray
  total: float
  method: str
  certified_optimal: bool
  stats: dict = dataclasses.field(default_factory=dict)


def choose_method(n_a: int, n_b: int, max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES) -> str:
  if n_b >= dense.LAPJV_MAX_N or dense.dense_bytes(n_a, n_b) > max_dense_bytes:
    return 'sparse'
  return 'dense' if n_b < DENSE_CROSSOVER_N else 'sparse'


def match_latents(
  A_NxD,
  B_MxD,
  method: str = 'auto',
  k: int = sparse.DEFAULT_K,
  block_rows: int = 4096,
  max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
  certify: bool = True,
  columns: bool | None = None,
) -> Matching:
  """Matches every row of A (n_a x d) to a distinct row of B (n_b x d, n_a <= n_b), maximising total cosine.

  Rows are normalised first; zero rows have cosine 0 with everything (with a warning). k is the sparse path's
  candidates per row and per column; any k gives the exact optimum, k = 64 usually in one LAP solve.
  certify=False skips the dense path's certificate (the sparse path cannot skip it: it is how it finds the optimum).
  columns: also take each column's top-k as candidates (None: on accelerators only; see sparse.candidates).
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  ua, ub = cosine.unit_rows(A_NxD, 'A'), cosine.unit_rows(B_MxD, 'B')
  n_a, n_b = ua.unit32_NxD.shape[0], ub.unit32_NxD.shape[0]
  if n_a > n_b:
    raise ValueError(f'A has more rows than B ({n_a} > {n_b}): pass the smaller set as A')
  if ua.unit32_NxD.shape[1] != ub.unit32_NxD.shape[1]:
    raise ValueError(f'A and B must have the same width, got {ua.unit32_NxD.shape} and {ub.unit32_NxD.shape}')
  if method == 'auto':
    method = choose_method(n_a, n_b, max_dense_bytes)
  start = time.perf_counter()
  if method == 'dense':
    partner_N, stats = dense.solve_dense(ua, ub, block_rows)
    certified = False
    if certify:
      clock = time.perf_counter()
      cert = sparse.certify(ua, ub, partner_N, block_rows=block_rows, columns=columns)
      certified = cert.optimal
      stats.update(
        certificate_s=time.perf_counter() - clock, certificate=cert.stats, certificate_violations=cert.n_violations
      )
      if not certified:
        # lapjv optimises float32 costs: on near-ties its answer can trail the float64 optimum by ~1e-7 (seen at
        # d = 2). The sparse solver, cheaper than lapjv at these sizes, then finds and certifies the exact one.
        partner_N, certified, stats['repair'] = sparse.solve_sparse(ua, ub, k=k, block_rows=block_rows, columns=columns)
  else:
    partner_N, certified, stats = sparse.solve_sparse(ua, ub, k=k, block_rows=block_rows, columns=columns)
  cos_N = cosine.pair_cos64(ua, ub, np.arange(n_a), partner_N)
  stats['seconds'] = time.perf_counter() - start
  return Matching(partner_N, cos_N.astype(np.float32), float(cos_N.sum()), method, bool(certified), stats)
