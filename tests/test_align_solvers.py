"""The exact matchers of saejax.align against SciPy's dense optimum, their certificate, and their guards."""

import warnings

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from saejax.align import certify, cosine, dense, match, sparse
from saejax.align.match import match_latents


def _pair(seed, n_a, n_b, d, planted=False):
  """Random rows; planted: half of A are noisy copies (cosine ~0.9) of distinct rows of B."""
  rng = np.random.default_rng(seed)
  B = rng.standard_normal((n_b, d)).astype(np.float32)
  A = rng.standard_normal((n_a, d)).astype(np.float32)
  if planted:
    half = n_a // 2
    A[:half] = B[rng.permutation(n_b)[:half]] + 0.48 * rng.standard_normal((half, d)).astype(np.float32)
  return A, B


def _cos64(A, B):
  a = A.astype(np.float64) / np.linalg.norm(A.astype(np.float64), axis=1, keepdims=True)
  b = B.astype(np.float64) / np.linalg.norm(B.astype(np.float64), axis=1, keepdims=True)
  return a @ b.T


def _scipy_optimum(A, B):
  cos = _cos64(A, B)
  rows, cols = linear_sum_assignment(cos, maximize=True)
  return cos[rows, cols].sum(), cols


@pytest.mark.parametrize('method', ['dense', 'sparse'])
def test_permuted_copy_is_recovered(method):
  A, _ = _pair(0, 300, 300, 32)
  perm = np.random.default_rng(1).permutation(300)
  B = A[perm]  # B[j] = A[perm[j]], so row i of A sits at inverse[i]
  result = match_latents(A, B, method=method, k=4)
  inverse = np.argsort(perm)
  np.testing.assert_array_equal(result.partner, inverse)
  np.testing.assert_allclose(result.cos, 1.0, atol=1e-6)
  assert result.method == method and result.certified_optimal
  assert result.partner.dtype == np.int64 and result.cos.dtype == np.float32


CASES = [  # seed, n_a, n_b, d, k, planted
  (0, 50, 50, 8, 2, False),
  (6, 64, 64, 2, 2, False),
  (8, 333, 333, 48, 8, True),
  (9, 390, 400, 8, 16, False),
  (1, 200, 200, 16, 2, True),
  (2, 150, 400, 16, 2, False),
  (3, 400, 400, 32, 64, True),
  (4, 300, 360, 24, 3, True),
  (5, 100, 100, 4, 1, False),
]


@pytest.mark.parametrize('seed,n_a,n_b,d,k,planted', CASES)
def test_dense_and_sparse_reach_the_scipy_optimum(seed, n_a, n_b, d, k, planted):
  A, B = _pair(seed, n_a, n_b, d, planted)
  best, _ = _scipy_optimum(A, B)
  for method in ('dense', 'sparse'):
    result = match_latents(A, B, method=method, k=k)
    assert result.certified_optimal, (method, result.stats)
    assert abs(result.total - best) < 1e-7, (method, result.total - best)
    assert len(np.unique(result.partner)) == n_a and result.partner.max() < n_b
    np.testing.assert_allclose(result.cos, _cos64(A, B)[np.arange(n_a), result.partner], atol=1e-6)
    if method == 'sparse' and k <= 2:
      assert len(result.stats['rounds']) > 1  # tiny k: column generation had to add pairs


@pytest.mark.parametrize('columns,bound_screen', [(True, True), (True, False), (False, False)])
def test_sparse_options_reach_the_optimum(columns, bound_screen):
  A, B = _pair(7, 250, 320, 16, planted=True)
  best, _ = _scipy_optimum(A, B)
  ua, ub = cosine.unit_rows(A), cosine.unit_rows(B)
  partner, certified, stats = sparse.solve_sparse(ua, ub, k=2, columns=columns, bound_screen=bound_screen)
  assert certified
  assert abs(_cos64(A, B)[np.arange(250), partner].sum() - best) < 1e-7
  if not bound_screen:
    assert all(r['rows_priced'] == 250 for r in stats['rounds'])


@pytest.mark.parametrize('seed', range(4))
def test_exact_ties_and_repeated_rows(seed):
  # Small integer vectors: many identical rows on both sides, so many optimal matchings and zero reduced costs.
  rng = np.random.default_rng(seed)
  A = rng.integers(1, 4, size=(90, 3)).astype(np.float32)
  B = rng.integers(1, 4, size=(120, 3)).astype(np.float32)
  best, optimum = _scipy_optimum(A, B)
  for method in ('dense', 'sparse'):
    result = match_latents(A, B, method=method, k=2)
    assert result.certified_optimal and abs(result.total - best) < 1e-9
  assert certify(A, B, optimum).optimal


def test_auto_picks_dense_for_small_problems():
  A, B = _pair(9, 64, 80, 8)
  result = match_latents(A, B)
  assert result.method == 'dense' and result.certified_optimal
  assert result.total == pytest.approx(float(result.cos.astype(np.float64).sum()), abs=1e-5)


@pytest.mark.parametrize('n_a,n_b', [(200, 200), (120, 200)])
def test_certificate_accepts_the_optimum_and_rejects_others(n_a, n_b):
  A, B = _pair(11, n_a, n_b, 16, planted=True)
  _, optimum = _scipy_optimum(A, B)
  for bound_screen in (True, False):
    cert = certify(A, B, optimum, bound_screen=bound_screen)
    assert cert.optimal and cert.n_violations == 0
  swapped = optimum.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  for bound_screen in (True, False):
    cert = certify(A, B, swapped, bound_screen=bound_screen)
    assert not cert.optimal and cert.n_violations >= 1
  # A pair far outside the candidate graph: row 2 to its least similar column (swapped with that column's row).
  worst = optimum.copy()
  j = int(np.argmin(_cos64(A, B)[2]))
  owner = np.flatnonzero(worst == j)
  if len(owner):
    worst[owner[0]] = worst[2]
  worst[2] = j
  cert = certify(A, B, worst, k=2)
  assert not cert.optimal and cert.n_violations >= 1


def test_certificate_rejects_an_unused_column_that_is_worse():
  # Rectangular: moving a row to a free column it likes less keeps a valid matching; only the dummy-row duals
  # (unmatched columns share the top potential) expose it.
  A, B = _pair(12, 80, 200, 16)
  _, optimum = _scipy_optimum(A, B)
  cos = _cos64(A, B)
  free = np.setdiff1d(np.arange(200), optimum)
  moved = optimum.copy()
  moved[5] = free[np.argmin(cos[5, free])]
  assert cos[5, moved[5]] < cos[5, optimum[5]]
  cert = certify(A, B, moved)
  assert not cert.optimal and cert.n_violations >= 1
  assert certify(A, B, optimum).optimal


def test_zero_norm_rows_get_cosine_zero_and_a_warning():
  A, B = _pair(3, 60, 70, 8)
  A[4] = 0
  B[9] = 0
  with pytest.warns(UserWarning) as record:
    result = match_latents(A, B, method='sparse', k=4)
  messages = sorted(str(w.message) for w in record)
  assert messages[0].startswith('1 of 60 rows of A have zero norm') and messages[1].startswith('1 of 70 rows of B')
  assert result.cos[4] == 0 and result.certified_optimal
  with pytest.warns(UserWarning, match='zero norm'):
    row_max, col_max = cosine.max_cosine(A, B)
  assert row_max[4] == 0 and col_max[9] == 0
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    dense_result = match_latents(A, B, method='dense')
    cos = np.nan_to_num(_cos64(A, B))  # NaN from the zero rows -> 0, the convention under test
  rows, cols = linear_sum_assignment(cos, maximize=True)
  assert dense_result.cos[4] == 0 and dense_result.certified_optimal
  assert abs(dense_result.total - cos[rows, cols].sum()) < 1e-7 and abs(result.total - cos[rows, cols].sum()) < 1e-7


def test_lapjv_guard_raises_before_calling_lapjv(monkeypatch):
  def fail(*_):
    raise AssertionError('lapjv must not be called')

  monkeypatch.setattr(dense, '_lapjv', lambda: fail)
  A = np.ones((dense.LAPJV_MAX_N, 2), np.float32)
  with pytest.raises(ValueError, match='46,341'):
    match_latents(A, A, method='dense')
  with pytest.raises(ValueError, match='segfault'):
    dense.check_lapjv_size(46_341)
  dense.check_lapjv_size(46_340)
  assert match.choose_method(46_341, 46_341) == 'sparse'
  assert match.choose_method(1000, 1000) == 'dense'
  assert match.choose_method(1000, 1000, max_dense_bytes=1000) == 'sparse'
  assert match.choose_method(30_000, 30_000) == 'sparse'


def test_dense_answer_short_of_the_optimum_is_repaired(monkeypatch):
  # Stands in for lapjv's float32 arithmetic missing the float64 optimum: a lapjv that returns the identity.
  def identity(cost):
    n = cost.shape[0]
    return np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), (0.0, None, None)

  monkeypatch.setattr(dense, '_lapjv', lambda: identity)
  A, B = _pair(13, 100, 130, 8, planted=True)
  best, _ = _scipy_optimum(A, B)
  result = match_latents(A, B, method='dense')
  assert result.stats['certificate_violations'] >= 1 and 'repair' in result.stats
  assert result.certified_optimal and abs(result.total - best) < 1e-9


def test_more_rows_than_columns_is_refused():
  A, B = _pair(0, 20, 10, 4)
  with pytest.raises(ValueError, match='more rows'):
    match_latents(A, B)


def test_kernels_match_numpy_with_a_padded_last_block():
  A, B = _pair(5, 150, 90, 12)
  cos = _cos64(A, B)
  np.testing.assert_allclose(cosine.dense_cosine(A, B, block_rows=64), cos, atol=2e-6)
  vals, idx = cosine.topk_candidates(A, B, k=5, block_rows=64)
  np.testing.assert_allclose(vals, np.sort(cos, axis=1)[:, ::-1][:, :5], atol=2e-6)
  np.testing.assert_allclose(np.take_along_axis(cos, idx.astype(np.int64), 1), vals, atol=2e-6)
  _, _, col_vals, col_idx = cosine.topk_candidates(A, B, k=7, block_rows=64, columns=True)
  np.testing.assert_allclose(col_vals, np.sort(cos.T, axis=1)[:, ::-1][:, :7], atol=2e-6)
  assert col_idx.max() < 150  # padded rows never enter a column's top-k
  row_max, col_max = cosine.max_cosine(A, B, block_rows=64)
  np.testing.assert_allclose(row_max, cos.max(1), atol=2e-6)
  np.testing.assert_allclose(col_max, cos.max(0), atol=2e-6)
  assert (
    abs(cosine.pair_cos64(cosine.unit_rows(A), cosine.unit_rows(B), np.array([3]), np.array([7]))[0] - cos[3, 7])
    < 1e-12
  )
