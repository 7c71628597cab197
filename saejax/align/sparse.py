"""Certified-exact sparse assignment (maximum total cosine) at any n, and the optimality certificate behind it.

Method (shared/notes/alignment-at-scale.md): candidates = each row's top-k columns (united with each column's top-k
rows on accelerators; see `candidates`), from one blockwise GEMM sweep; fallback edges make the candidate graph hold
a full matching; the LAP on the candidates is solved by `min_weight_full_bipartite_matching` on cost c = 2 - cos
(strictly positive: zero means "no edge" there). Then the certificate: with sigma optimal on the candidates, dual
potentials v are shortest-path distances for v_j <= v_sigma(i) + c_ij - c_isigma(i) (Bellman-Ford), u_i =
c_isigma(i) - v_sigma(i), and every one of the n_a * n_b reduced costs c_ij - u_i - v_j = alpha_i - cos_ij - v_j
(alpha_i = cos_isigma(i) + v_sigma(i)) is priced. None below -tol proves sigma optimal by LP duality; otherwise the
violators join the candidates and the LAP is solved again (column generation), so any k, even 2, ends at the exact
optimum. A round whose added pairs do not improve on the current matching (no negative cycle through them) only
recomputes the duals and skips the LAP solve.

Rectangular n_a < n_b is the square problem with n_b - n_a zero-cost dummy rows, handled implicitly: a dummy row
takes an unmatched column m, and its constraints u_r + v_j <= 0 = u_r + v_m say v_j <= v_m for all j. In the
shortest-path graph that is a hub node H with edges m -> H and H -> j of weight 0 (so all unmatched columns end with
the same, maximal, potential: the LP's v_j <= 0 with v_m = 0 after a shift).

Precision: costs, potentials and rechecks are float64 on the host (`cosine.pair_cos64`). The all-pairs pricing runs
in float32 on the accelerator with a margin covering the float32 error bound, and every flagged pair is rechecked in
float64. Rows can also be cleared without the sweep (`bound_screen`): a pair outside the initial top-k sets has
cos_ij <= min(t_i, s_j), the row's and the column's k-th cosine, so max_j min(t_i, s_j) + v_j <= alpha_i - err clears
row i exactly; only uncleared rows go through the GEMM.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import maximum_bipartite_matching, min_weight_full_bipartite_matching

from saejax.align import cosine

DEFAULT_K = 64
# Reduced costs down to -TOL (cosine units) count as zero: float64 path sums over hundreds of edges err ~1e-13.
TOL = 1e-9
_RELAX_EPS = 1e-13
_CYCLE_CHECK_EVERY = 16
_RECHECK_ROWS = 256


class Certificate(NamedTuple):
  optimal: bool
  n_violations: int
  min_reduced_cost: float
  stats: dict


class Edges(NamedTuple):
  """Candidate pairs as sorted unique keys i * n_b + j, with their canonical float64 cosines."""

  keys_E: np.ndarray
  cos_E: np.ndarray
  n_a: int
  n_b: int

  def rows(self) -> np.ndarray:
    return self.keys_E // self.n_b

  def cols(self) -> np.ndarray:
    return self.keys_E % self.n_b

  def indptr(self) -> np.ndarray:
    return np.searchsorted(self.keys_E, np.arange(self.n_a + 1, dtype=np.int64) * self.n_b)


def add_edges(ua, ub, edges: Edges, rows, cols) -> Edges:
  """Union with new pairs; cosines are computed only for pairs not yet present."""
  keys = np.sort(np.asarray(rows, np.int64) * edges.n_b + np.asarray(cols, np.int64))
  # Sort-based dedup: numpy 2's hash-based np.unique is ~6x slower on millions of int64 keys.
  keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys
  if len(edges.keys_E):
    at = np.minimum(np.searchsorted(edges.keys_E, keys), len(edges.keys_E) - 1)
    keys = keys[edges.keys_E[at] != keys]
  if not len(keys):
    return edges
  cos = cosine.pair_cos64(ua, ub, keys // edges.n_b, keys % edges.n_b)
  if not len(edges.keys_E):
    return Edges(keys, cos, edges.n_a, edges.n_b)
  keys_E, cos_E = np.concatenate([edges.keys_E, keys]), np.concatenate([edges.cos_E, cos])
  order = np.argsort(keys_E, kind='stable')
  return Edges(keys_E[order], cos_E[order], edges.n_a, edges.n_b)


def complete(ua, ub, edges: Edges) -> tuple[Edges, int]:
  """Adds fallback edges (unmatched row -> free column) until the graph holds a matching of every row."""
  ones = np.ones(len(edges.keys_E), np.int8)
  graph = sp.csr_array((ones, edges.cols(), edges.indptr()), shape=(edges.n_a, edges.n_b))
  match_N = maximum_bipartite_matching(graph, perm_type='column')
  free_rows = np.flatnonzero(match_N < 0)
  if not len(free_rows):
    return edges, 0
  used_M = np.zeros(edges.n_b, bool)
  used_M[match_N[match_N >= 0]] = True
  return add_edges(ua, ub, edges, free_rows, np.flatnonzero(~used_M)[: len(free_rows)]), len(free_rows)


def solve_lap(edges: Edges) -> np.ndarray:
  """The min-cost full matching on the candidate edges, cost 2 - cos (> 0): partner [n_a] int64."""
  graph = sp.csr_array((2.0 - edges.cos_E, edges.cols(), edges.indptr()), shape=(edges.n_a, edges.n_b))
  row_ind, col_ind = min_weight_full_bipartite_matching(graph)
  partner_N = np.full(edges.n_a, -1, np.int64)
  partner_N[row_ind] = col_ind
  return partner_N


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
  """Concatenated aranges [starts[i], starts[i] + lens[i]) without a Python loop."""
  ends = np.cumsum(lens)
  return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - lens - starts, lens)


def _has_cycle(parent: np.ndarray) -> bool:
  """Whether the parent pointers (root = -1) contain a cycle, by pointer doubling."""
  n = len(parent)
  nxt = np.append(np.where(parent < 0, n, parent), n)
  for _ in range(int(np.ceil(np.log2(n + 1))) + 1):
    nxt = nxt[nxt]
  return bool(np.any(nxt[:n] != n))


def potentials(edges: Edges, partner_N: np.ndarray, max_passes: int | None = None) -> tuple[np.ndarray, dict]:
  """Column potentials v [n_b + 1] (last: the hub) from shortest paths; stats['negative_cycle'] if there are none.

  Frontier Bellman-Ford: a pass relaxes only the out-edges of columns whose distance changed in the pass before,
  each as one gather plus `np.minimum.at`. A cycle in the parent pointers means a negative cycle, i.e. partner is
  not optimal on these edges.
  """
  n_a, n_b = edges.n_a, edges.n_b
  rows_E, cols_E, indptr = edges.rows(), edges.cols(), edges.indptr()
  match_keys = np.arange(n_a, dtype=np.int64) * n_b + partner_N
  at = np.minimum(np.searchsorted(edges.keys_E, match_keys), len(edges.keys_E) - 1)
  if np.any(edges.keys_E[at] != match_keys):
    raise ValueError('every matched pair must be a candidate edge')
  w_E = edges.cos_E[at][rows_E] - edges.cos_E  # c_ij - c_isigma(i) with c = 2 - cos
  src_E = partner_N[rows_E]
  row_of_col = np.full(n_b, -1, np.int64)
  row_of_col[partner_N] = np.arange(n_a)
  hub = n_b
  d = np.zeros(n_b + 1)
  parent = np.full(n_b + 1, -1, np.int64)
  active, free_changed, hub_active = np.arange(n_a), np.zeros(0, np.int64), False
  max_passes = max_passes or n_b + 2
  stats = {'negative_cycle': False, 'converged': False}
  for passes in range(1, max_passes + 1):
    if not len(active) and not len(free_changed) and not hub_active:
      stats['converged'] = True
      break
    e = _ranges(indptr[active], indptr[active + 1] - indptr[active])
    src, tgt = src_E[e], cols_E[e]
    cand = d[src] + w_E[e]
    best = np.full(n_b + 1, np.inf)
    np.minimum.at(best, tgt, cand)
    if hub_active:
      np.minimum(best[:n_b], d[hub], out=best[:n_b])
    if len(free_changed):
      best[hub] = min(best[hub], d[free_changed].min())
    improved = best < d - _RELAX_EPS
    from_edge = improved[tgt] & (cand == best[tgt])
    parent[tgt[from_edge]] = src[from_edge]
    if hub_active:
      parent[:n_b][improved[:n_b] & (best[:n_b] == d[hub])] = hub
    if improved[hub]:
      parent[hub] = free_changed[np.argmin(d[free_changed])]
    changed = np.flatnonzero(improved[:n_b])
    d[improved] = best[improved]
    active = row_of_col[changed]
    free_changed = changed[active < 0]
    active, hub_active = active[active >= 0], bool(improved[hub])
    if passes % _CYCLE_CHECK_EVERY == 0 and _has_cycle(parent):
      stats['negative_cycle'] = True
      break
  stats['passes'] = passes
  return d, stats


def _margin(d: int, v_M: np.ndarray, alpha_N: np.ndarray, tol: float) -> float:
  # cos32 error, plus float32 rounding of cos + v - alpha in the kernel.
  scale = 1.0 + np.abs(v_M).max(initial=0.0) + np.abs(alpha_N).max(initial=0.0)
  return cosine.cos32_error_bound(d) + 8 * 2.0**-24 * scale + tol


def price(ops, ua, ub, partner_N, alpha_N, v_M, rows_R, tol: float, m: int = 16) -> tuple[np.ndarray, ...]:
  """Violating pairs (rows, cols, reduced cost) among rows_R x all columns: float32 screen, float64 recheck.

  Rows whose float32 flags overflow the m returned pairs without a confirmed violation are rechecked whole in float64,
  so an empty result is exact. With violations, at most m per row are returned (enough to add per round).
  """
  empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
  if not len(rows_R):
    return empty
  margin = _margin(ua.unit32_NxD.shape[1], v_M, alpha_N, tol)
  count_R, slack_RxK, cols_RxK = cosine.pricing_screen(ops, rows_R, alpha_N[rows_R], partner_N[rows_R], v_M, margin, m)
  sel_RxK = slack_RxK > -margin
  r_rows, r_cols = np.broadcast_to(rows_R[:, None], sel_RxK.shape)[sel_RxK], cols_RxK[sel_RxK]
  red = alpha_N[r_rows] - cosine.pair_cos64(ua, ub, r_rows, r_cols) - v_M[r_cols]
  bad = red < -tol
  found_R = np.zeros(ua.unit32_NxD.shape[0], bool)
  found_R[r_rows[bad]] = True
  out = [(r_rows[bad], r_cols[bad], red[bad])]
  overflow = rows_R[(count_R > sel_RxK.shape[1]) & ~found_R[rows_R]]
  for s in range(0, len(overflow), _RECHECK_ROWS):
    rows = overflow[s : s + _RECHECK_ROWS]
    red_RxM = alpha_N[rows, None] - cosine.rows_cos64(ua, ub, rows) - v_M[None, :]
    red_RxM[np.arange(len(rows)), partner_N[rows]] = np.inf
    worst = np.argsort(red_RxM, axis=1)[:, :m]
    worst_red = np.take_along_axis(red_RxM, worst, axis=1)
    keep = worst_red < -tol
    out.append((np.broadcast_to(rows[:, None], keep.shape)[keep], worst[keep], worst_red[keep]))
  return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def bound_clears(t_N, s_M, v_M, alpha_N, err: float, tol: float) -> np.ndarray:
  """Rows whose pairs outside the initial top-k sets provably all price >= -tol (module docstring)."""
  order = np.argsort(s_M)
  s_sorted, v_sorted = s_M[order], v_M[order]
  with np.errstate(invalid='ignore'):
    g = np.where(np.isneginf(s_sorted), -np.inf, s_sorted + v_sorted)
  prefix = np.concatenate([[-np.inf], np.maximum.accumulate(g)])  # prefix[p] = max over s_j < t of s_j + v_j
  suffix = np.concatenate([np.maximum.accumulate(v_sorted[::-1])[::-1], [-np.inf]])  # max v_j over s_j >= t
  p = np.searchsorted(s_sorted, t_N, side='left')
  with np.errstate(invalid='ignore'):
    via_t = np.where(np.isneginf(t_N), -np.inf, t_N + suffix[p])
  return np.maximum(prefix[p], via_t) + err <= alpha_N + tol


def _duals_and_check(edges, partner_N, tol):
  v_all, bf = potentials(edges, partner_N)
  v_M = v_all[:-1]
  alpha_N = edges.cos_E[np.searchsorted(edges.keys_E, np.arange(edges.n_a) * edges.n_b + partner_N)] + v_M[partner_N]
  red_E = alpha_N[edges.rows()] - edges.cos_E - v_M[edges.cols()]
  bf['min_edge_reduced_cost'] = float(red_E.min())
  bf['edge_violations'] = int(np.sum(red_E < -tol))
  # Dummy rows (n_a < n_b) need v_j <= v_m for every column j and unmatched column m; the hub enforces it, and it
  # is checked here rather than assumed.
  free_M = np.ones(edges.n_b, bool)
  free_M[partner_N] = False
  if free_M.any():
    bf['edge_violations'] += int(np.sum(v_M > v_M[free_M].min() + tol))
  return v_M, alpha_N, bf


class Candidates(NamedTuple):
  """The candidate graph and the bounds t_N, s_M that every pair outside its initial top-k sets obeys."""

  edges: Edges
  t_N: np.ndarray
  s_M: np.ndarray


def candidates(ua, ub, ops, k: int, columns: bool | None = None) -> Candidates:
  """Row top-k (united with column top-k if `columns`) from one sweep; t_N / s_M: the row's / column's k-th cosine.

  columns=None unites on accelerators only. On the 2-core CPU the column top-k doubled the sweep (8,192 x 768:
  sweep 0.51 -> 0.99 s; whole solve 1.5 -> 2.4 s at k = 64; 16,384 x 256: 3.2 -> 5.4 s) and saved no LAP round
  on planted data: fallback edges plus column generation cover columns that no row ranks highly.
  """
  n_a, n_b = ops.n_a, ops.n_b
  if columns is None:
    columns = cosine.on_accelerator()
  k_col = min(k, n_a) if columns else 0
  sweep = cosine.topk_sweep(ops, k, k_col)
  row_idx = sweep[1]
  rows, cols = np.repeat(np.arange(n_a), row_idx.shape[1]), row_idx.ravel()
  t_N = sweep[0][:, -1].astype(np.float64) if row_idx.shape[1] < n_b else np.full(n_a, -np.inf)
  s_M = np.full(n_b, np.inf)
  if k_col:
    rows, cols = np.concatenate([rows, sweep[3].ravel()]), np.concatenate([cols, np.repeat(np.arange(n_b), k_col)])
    s_M = sweep[2][:, -1].astype(np.float64) if k_col < n_a else np.full(n_b, -np.inf)
  del sweep, row_idx
  edges = add_edges(ua, ub, Edges(np.zeros(0, np.int64), np.zeros(0), n_a, n_b), rows, cols)
  return Candidates(edges, t_N, s_M)


def _price_round(ops, ua, ub, cands: Candidates, edges: Edges, partner_N, tol, bound_screen, m):
  """One certificate attempt for partner: (violating rows, cols, reduced costs, info); no violations = optimal."""
  clock = time.perf_counter()
  v_M, alpha_N, info = _duals_and_check(edges, partner_N, tol)
  info['duals_s'] = time.perf_counter() - clock
  if info['negative_cycle'] or not info['converged'] or info['edge_violations']:
    return None, info
  clock = time.perf_counter()
  err = cosine.cos32_error_bound(ua.unit32_NxD.shape[1])
  if bound_screen:
    todo = np.flatnonzero(~bound_clears(cands.t_N, cands.s_M, v_M, alpha_N, err, tol))
  else:
    todo = np.arange(edges.n_a)
  found = price(ops, ua, ub, partner_N, alpha_N, v_M, todo, tol, m=m)
  info.update(rows_priced=len(todo), violations=len(found[0]), pricing_s=time.perf_counter() - clock)
  return found, info


def _timed_lap(edges: Edges) -> tuple[np.ndarray, bool, float]:
  clock = time.perf_counter()
  partner_N = solve_lap(edges)
  return partner_N, True, time.perf_counter() - clock


def solve_sparse(
  ua,
  ub,
  k: int = DEFAULT_K,
  block_rows: int = 4096,
  columns: bool | None = None,
  bound_screen: bool = True,
  max_rounds: int = 50,
  add_per_row: int = 16,
  tol: float = TOL,
) -> tuple[np.ndarray, bool, dict]:
  """(partner [n_a] int64, certified_optimal, stats) maximising the total cosine; n_a <= n_b.

  ua, ub: `cosine.UnitRows` or raw [n, d] arrays. add_per_row: violating pairs added per row and round.
  """
  ua, ub = cosine.unit_rows(ua, 'A'), cosine.unit_rows(ub, 'B')
  n_a, n_b = ua.unit32_NxD.shape[0], ub.unit32_NxD.shape[0]
  if n_a > n_b:
    raise ValueError(f'sparse matching needs n_a <= n_b, got {n_a} > {n_b}')
  stats = {'k': k, 'rounds': []}
  clock = time.perf_counter()
  ops = cosine.operands(ua, ub, block_rows)
  cands = candidates(ua, ub, ops, k, columns)
  edges, stats['fallback_edges'] = complete(ua, ub, cands.edges)
  stats['candidates_s'] = time.perf_counter() - clock
  certified, partner_N, fresh = False, None, False
  for round_ in range(1, max_rounds + 1):
    info = {'edges': len(edges.keys_E)}
    if partner_N is None:
      partner_N, fresh, info['lap_s'] = _timed_lap(edges)
    found, pinfo = _price_round(ops, ua, ub, cands, edges, partner_N, tol, bound_screen, add_per_row)
    if found is None and not fresh:
      # The added pairs improve on partner (a negative cycle): only now is a new LAP solve needed. Otherwise the
      # old partner stays optimal and the round only recomputed duals, which is much cheaper at large n.
      partner_N, fresh, info['lap_s'] = _timed_lap(edges)
      found, pinfo = _price_round(ops, ua, ub, cands, edges, partner_N, tol, bound_screen, add_per_row)
    info.update(pinfo)
    stats['rounds'].append(info)
    logging.info('sparse matcher round %d: %s', round_, info)
    if found is None:
      warnings.warn(
        f'sparse matcher: no dual certificate on the candidates ({info}); result not certified', stacklevel=2
      )
      break
    if not len(found[0]):
      certified = True
      break
    edges, fresh = add_edges(ua, ub, edges, found[0], found[1]), False
  stats['certified_optimal'] = certified
  return partner_N, certified, stats


def certify(
  A_NxD,
  B_MxD,
  partner_N,
  k: int = 16,
  block_rows: int = 4096,
  tol: float = TOL,
  bound_screen: bool = True,
  max_rounds: int = 50,
  columns: bool | None = None,
) -> Certificate:
  """Checks that a given matching (row i -> column partner_N[i], n_a <= n_b) maximises the total cosine.

  Duals come from shortest paths on the top-k candidates plus the matching's own edges, and all
  n_a * n_b pairs are priced (rows cleared by the bound screen exactly, the rest by the sweep). Duals that price
  badly but carry no negative cycle only mean the graph was too small: violators are added and the duals
  recomputed with the matching held fixed. A negative cycle rejects the matching, with the candidate edges whose
  reduced cost is below -tol counted as violations (at least one lies on the cycle).
  """
  ua, ub = cosine.unit_rows(A_NxD, 'A'), cosine.unit_rows(B_MxD, 'B')
  n_a, n_b = ua.unit32_NxD.shape[0], ub.unit32_NxD.shape[0]
  partner_N = np.asarray(partner_N, np.int64)
  if partner_N.shape != (n_a,) or partner_N.min() < 0 or partner_N.max() >= n_b or len(np.unique(partner_N)) != n_a:
    raise ValueError('partner must map the n_a rows to distinct columns in [0, n_b)')
  ops = cosine.operands(ua, ub, block_rows)
  cands = candidates(ua, ub, ops, k, columns)
  edges = add_edges(ua, ub, cands.edges, np.arange(n_a), partner_N)
  stats = {'rounds': 0}
  for _ in range(max_rounds):
    stats['rounds'] += 1
    found, info = _price_round(ops, ua, ub, cands, edges, partner_N, tol, bound_screen, 16)
    stats.update(info)
    if found is None:
      return Certificate(False, max(info['edge_violations'], 1), info['min_edge_reduced_cost'], stats)
    if not len(found[0]):
      return Certificate(True, 0, info['min_edge_reduced_cost'], stats)
    edges = add_edges(ua, ub, edges, found[0], found[1])
  return Certificate(False, len(found[0]), float(found[2].min()), stats)
