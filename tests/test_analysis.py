"""saejax.analysis: pair labels, the seed statistics (donut, Fig. 2 by hand), the curve fits and the CSV."""

import csv
import os
from math import comb

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from saejax.analysis import (
  SUMMARY_KEYS,
  SWEEP_THRESHOLDS,
  analyse_pair,
  analyse_seeds,
  exactly_in_n_counts,
  fit_unique_fraction,
  unique_fraction_curve,
  universality_table,
)
from saejax.analysis.seeds import popcount, stability_distribution

try:  # The real matcher once saejax.align exists; a scipy stand-in until then.
  from saejax.align.cosine import max_cosine  # noqa: F401
  from saejax.align.match import match_latents  # noqa: F401

  MATCH_KW = {}
except ImportError:
  from dataclasses import dataclass, field

  @dataclass
  class _Matching:
    partner: np.ndarray
    cos: np.ndarray
    total: float
    method: str
    certified_optimal: bool
    stats: dict = field(default_factory=dict)

  def _unit(W):
    W = np.asarray(W, np.float64)
    return W / np.maximum(np.linalg.norm(W, axis=1, keepdims=True), 1e-30)

  def _stand_in_match(A_NxD, B_MxD, method='auto', **_):
    cos_NxM = _unit(A_NxD) @ _unit(B_MxD).T
    rows, cols = linear_sum_assignment(cos_NxM, maximize=True)
    partner_N = np.empty(len(A_NxD), np.int64)
    partner_N[rows] = cols
    cos_N = cos_NxM[np.arange(len(A_NxD)), partner_N].astype(np.float32)
    return _Matching(partner_N, cos_N, float(cos_N.sum()), 'dense', True)

  def _stand_in_max_cos(A_NxD, B_MxD, **_):
    cos_NxM = _unit(A_NxD) @ _unit(B_MxD).T
    return cos_NxM.max(axis=1).astype(np.float32), cos_NxM.max(axis=0).astype(np.float32)

  MATCH_KW = {'matcher': _stand_in_match, 'max_cos_fn': _stand_in_max_cos}


def random_sae(rng, n_latents, d=16):
  return {'W_enc': rng.normal(size=(n_latents, d)), 'W_dec': rng.normal(size=(n_latents, d))}


def permuted(sae, perm_F, rng):
  """Rows reordered by perm_F (row j of the copy is row perm_F[j]) and rescaled by positive factors."""
  scale_Fx1 = rng.uniform(0.5, 2.0, size=(len(perm_F), 1))
  return {key: sae[key][perm_F] * scale_Fx1 for key in ('W_enc', 'W_dec')}


def test_permuted_copy_is_fully_shared_and_partner_is_the_inverse_permutation():
  rng = np.random.default_rng(0)
  sae_a = random_sae(rng, 48)
  perm_F = rng.permutation(48)
  result = analyse_pair(sae_a, permuted(sae_a, perm_F, rng), **MATCH_KW)
  inverse_F = np.argsort(perm_F)
  assert not result.swapped
  np.testing.assert_array_equal(result.enc_partner, inverse_F)
  np.testing.assert_array_equal(result.dec_partner, inverse_F)
  assert result.shared.all() and result.shared_notebook.all()
  np.testing.assert_allclose(result.enc_cos, 1.0, atol=1e-5)
  np.testing.assert_allclose(result.dec_max_cos, 1.0, atol=1e-5)
  summary = result.summary
  assert set(summary) == set(SUMMARY_KEYS)
  assert summary['shared_fraction'] == 1.0 and summary['partner_agreement'] == 1.0
  assert summary['certified_optimal'] is True
  assert summary['n_a'] == summary['n_b'] == 48 and summary['threshold'] == 0.7


def test_pw_mcc_matches_the_decoders_alone():
  """PW-MCC looks at decoders only: same decoders (permuted), unrelated encoders -> PW-MCC 1, nothing shared."""
  rng = np.random.default_rng(3)
  sae_a = random_sae(rng, 40)
  perm_F = rng.permutation(40)
  sae_b = {'W_enc': rng.normal(size=sae_a['W_enc'].shape), 'W_dec': 2.5 * sae_a['W_dec'][perm_F]}
  summary = analyse_pair(sae_a, sae_b, **MATCH_KW).summary
  assert summary['pw_mcc'] == pytest.approx(1.0, abs=1e-5)
  assert summary['shared_fraction'] == 0.0
  # A dead (all-zero) decoder row has cosine 0 with everything, so it pulls PW-MCC down by 1/F.
  sae_b['W_dec'][0] = 0.0
  assert analyse_pair(sae_a, sae_b, **MATCH_KW).summary['pw_mcc'] == pytest.approx(39 / 40, abs=1e-5)


def test_threshold_sweep_is_monotone_non_increasing():
  rng = np.random.default_rng(1)
  sae_a = random_sae(rng, 64)
  noisy = {
    key: value + rng.normal(scale=rng.uniform(0.0, 1.5, size=(64, 1)), size=value.shape)
    for key, value in permuted(sae_a, rng.permutation(64), rng).items()
  }
  sweep = analyse_pair(sae_a, noisy, **MATCH_KW).summary['threshold_sweep']
  assert sweep['thresholds'] == list(SWEEP_THRESHOLDS) and len(sweep['thresholds']) == 21
  assert sweep['thresholds'][0] == 0.0 and sweep['thresholds'][-1] == 1.0
  for key in ('shared_fraction', 'shared_fraction_notebook'):
    values = np.asarray(sweep[key])
    assert np.all(np.diff(values) <= 0), key
    assert 0.0 < values[8] < 1.0  # the noise makes a genuine mixture at 0.4
  assert np.all(np.asarray(sweep['shared_fraction']) <= np.asarray(sweep['shared_fraction_notebook']))


@pytest.mark.parametrize('larger_first', [False, True])
def test_rectangular_pair_matches_the_smaller_into_the_larger(tmp_path, larger_first):
  rng = np.random.default_rng(2)
  small = random_sae(rng, 32)
  perm_F = rng.permutation(64)
  extra = random_sae(rng, 32)
  stacked = {key: np.concatenate([small[key], extra[key]]) for key in small}
  large = {key: value[perm_F] for key, value in stacked.items()}  # small's row i sits at argsort(perm)[i]
  result = analyse_pair(large, small, **MATCH_KW) if larger_first else analyse_pair(small, large, **MATCH_KW)
  assert result.swapped is larger_first
  assert result.summary['n_a'] == 32 and result.summary['n_b'] == 64
  assert result.enc_partner.shape == result.shared.shape == result.enc_max_cos.shape == (32,)
  np.testing.assert_array_equal(result.enc_partner, np.argsort(perm_F)[:32])
  assert result.summary['shared_fraction'] == 1.0
  path = os.path.join(tmp_path, 'pair.npz')
  result.to_npz(path)
  assert os.listdir(tmp_path) == ['pair.npz']
  with np.load(path) as saved:
    for name in (
      'enc_partner',
      'dec_partner',
      'enc_cos',
      'dec_cos',
      'shared',
      'shared_notebook',
      'enc_max_cos',
      'dec_max_cos',
    ):
      np.testing.assert_array_equal(saved[name], getattr(result, name))
    assert bool(saved['swapped']) is larger_first


def test_notebook_rule_ignores_partners_and_paper_rule_does_not():
  rng = np.random.default_rng(3)
  sae_a = random_sae(rng, 8)
  sae_b = {'W_enc': sae_a['W_enc'].copy(), 'W_dec': sae_a['W_dec'].copy()}
  sae_b['W_dec'][[0, 1]] = sae_a['W_dec'][[1, 0]]  # the decoder matching crosses latents 0 and 1, cosine 1
  result = analyse_pair(sae_a, sae_b, **MATCH_KW)
  np.testing.assert_array_equal(result.enc_partner, np.arange(8))
  np.testing.assert_array_equal(result.dec_partner, [1, 0, 2, 3, 4, 5, 6, 7])
  np.testing.assert_array_equal(result.shared, [False, False] + [True] * 6)
  assert result.shared_notebook.all()
  assert result.summary['partner_agreement'] == 0.75
  assert result.summary['shared_fraction'] == 0.75 and result.summary['shared_fraction_notebook'] == 1.0


# Hand example: 4 seeds A, B, C, D with 3 latents each. Bit t = seed t (A=1, B=2, C=4, D=8).
#   A: l0 in all, l1 shared with B, l2 only in A
#   B: l0 in all, l1 shared with A, l2 shared with C
#   C: l0 in all, l1 shared with B, l2 only in C
#   D: l0 in all, l1 and l2 only in D
A, B, C, D = 1, 2, 4, 8
HAND_NAMES = ['A', 'B', 'C', 'D']
HAND_MASKS = {
  'A': np.array([B | C | D, B, 0], np.uint64),
  'B': np.array([A | C | D, A, C], np.uint64),
  'C': np.array([A | B | D, B, 0], np.uint64),
  'D': np.array([A | B | C, 0, 0], np.uint64),
}
# Fraction of the base's 3 latents with no bit of the subset, counted by hand for every base and subset:
HAND_UNIQUE = {
  2: {  # one other seed
    'A': {'B': 1 / 3, 'C': 2 / 3, 'D': 2 / 3},  # {B}: l2; {C}: l1, l2; {D}: l1, l2
    'B': {'A': 1 / 3, 'C': 1 / 3, 'D': 2 / 3},  # {A}: l2; {C}: l1; {D}: l1, l2
    'C': {'A': 2 / 3, 'B': 1 / 3, 'D': 2 / 3},  # {A}: l1, l2; {B}: l2; {D}: l1, l2
    'D': {'A': 2 / 3, 'B': 2 / 3, 'C': 2 / 3},  # l1, l2 each time
  },
  3: {  # two other seeds
    'A': {'BC': 1 / 3, 'BD': 1 / 3, 'CD': 2 / 3},  # l2; l2; l1, l2
    'B': {'AC': 0 / 3, 'AD': 1 / 3, 'CD': 1 / 3},  # none; l2; l1
    'C': {'AB': 1 / 3, 'AD': 2 / 3, 'BD': 1 / 3},  # l2; l1, l2; l2
    'D': {'AB': 2 / 3, 'AC': 2 / 3, 'BC': 2 / 3},  # l1, l2 each time
  },
  4: {'A': {'BCD': 1 / 3}, 'B': {'ACD': 0 / 3}, 'C': {'ABD': 1 / 3}, 'D': {'ABC': 2 / 3}},  # l2; none; l2; l1, l2
}
# Means: k=2: (5/9 + 4/9 + 5/9 + 6/9) / 4 = 5/9; k=3: (4/9 + 2/9 + 4/9 + 6/9) / 4 = 4/9; k=4: (1+0+1+2)/12 = 1/3.
HAND_CURVE = {2: 5 / 9, 3: 4 / 9, 4: 1 / 3}


def test_fig2_curve_matches_the_hand_count():
  curve = unique_fraction_curve(HAND_MASKS, HAND_NAMES)
  for k, by_base in HAND_UNIQUE.items():
    for base, by_subset in by_base.items():
      assert len(by_subset) == comb(3, k - 1)
      assert curve['unique_fraction_by_k_per_base'][base][k] == pytest.approx(np.mean(list(by_subset.values())))
    assert curve['unique_fraction_by_k'][k] == pytest.approx(HAND_CURVE[k])
  assert curve['subsets_by_k'] == {2: 3, 3: 3, 4: 1}
  assert curve['n_subsets_per_base'] == 7 and curve['n_experiments'] == 28 == sum(k * comb(4, k) for k in (2, 3, 4))


def test_exactly_in_n_matches_the_hand_count():
  # counts[n - 1]: A: l2 in 1, l1 in 2, l0 in 4; B: l1, l2 in 2, l0 in 4; C like A; D: l1, l2 in 1, l0 in 4.
  assert exactly_in_n_counts(HAND_MASKS, HAND_NAMES) == {
    'A': [1, 1, 0, 1],
    'B': [0, 2, 0, 1],
    'C': [1, 1, 0, 1],
    'D': [2, 0, 0, 1],
  }


def test_fig2_enumeration_agrees_with_the_closed_form_for_nine_seeds():
  # A latent with p sharers avoids C(S-1-p, m) of the C(S-1, m) subsets of size m.
  rng = np.random.default_rng(4)
  names = [f's{t}' for t in range(9)]
  masks = {}
  for t, name in enumerate(names):
    bits_FxS = rng.random((500, 9)) < rng.uniform(0.1, 0.9)
    bits_FxS[:, t] = False
    masks[name] = (bits_FxS.astype(np.uint64) << np.arange(9, dtype=np.uint64)).sum(axis=1).astype(np.uint64)
  curve = unique_fraction_curve(masks, names)
  assert curve['n_subsets_per_base'] == 255 and curve['n_experiments'] == 9 * 255
  for k in range(2, 10):
    expected = np.mean(
      [np.mean([comb(8 - p, k - 1) / comb(8, k - 1) for p in popcount(masks[name])]) for name in names]
    )
    assert curve['unique_fraction_by_k'][k] == pytest.approx(expected, rel=1e-12)
  counts = exactly_in_n_counts(masks, names)
  assert all(sum(c) == 500 for c in counts.values())
  assert counts['s0'][8] == int(np.sum(masks['s0'] == (0b111111110)))


def test_seeds_end_to_end_donut_curve_and_universality_csv(tmp_path):
  rng = np.random.default_rng(5)
  base = random_sae(rng, 24)
  perms = {'s0': np.arange(24), 's1': rng.permutation(24), 's2': rng.permutation(24)}
  saes = {name: permuted(base, perm_F, rng) for name, perm_F in perms.items()}
  # In s2, the rows holding base latents 20..23 become fresh random rows: orphans everywhere.
  fresh = np.isin(perms['s2'], np.arange(20, 24))
  for key in ('W_enc', 'W_dec'):
    saes['s2'][key][fresh] = rng.normal(size=(4, 16))
  result = analyse_seeds(saes, workers=2, progress=False, **MATCH_KW)
  assert list(result.pairs) == [('s0', 's1'), ('s0', 's2'), ('s1', 's2')]
  # Latent i of s_a holds base latent perm_a[i]; its partner in s_b holds the same base latent.
  for a in perms:
    for b in perms:
      if a != b:
        in_b_F = np.argsort(perms[b])[perms[a]]
        expected_F = np.where(result.shared[a][b], in_b_F, -1)
        np.testing.assert_array_equal(result.partners[a][b], expected_F)
        assert result.shared[a][b].sum() == (20 if 's2' in (a, b) else 24)
  assert result.exactly_in_n['s0'] == [0, 4, 20]
  assert result.exactly_in_n['s2'] == [4, 0, 20]
  assert result.unique_fraction_by_k[3] == pytest.approx(4 / 24 / 3)
  rows = universality_table(result)
  assert len(rows) == 3 * 24
  path = os.path.join(tmp_path, 'universality.csv')
  result.write_universality_csv(path)
  with open(path, newline='') as f:
    written = list(csv.DictReader(f))
  assert len(written) == 3 * 24 == sum(len(saes[name]['W_enc']) for name in saes)
  assert [(row['seed'], int(row['latent'])) for row in written] == [(n, i) for n in saes for i in range(24)]
  assert set(written[0]) == {'seed', 'latent', 'n_shared', 'stability', 'partner_s0', 'partner_s1', 'partner_s2'}
  assert written[0]['partner_s0'] == ''
  assert sum(int(row['n_shared']) for row in written) == 2 * 24 + 4 * 20
  # Stability: the fraction of the 2 other seeds with a shared partner.
  assert all(float(row['stability']) == int(row['n_shared']) / 2 for row in written)
  distribution = stability_distribution(result.masks, result.names)
  assert distribution['values'] == [0.0, 0.5, 1.0]
  # s0 and s1: 20 latents shared with both, 4 with one; s2: 20 with both, 4 with none (exactly_in_n above).
  assert distribution['fraction_of_latents'] == pytest.approx([4 / 72, 8 / 72, 60 / 72])
  assert distribution['mean'] == pytest.approx((8 * 0.5 + 60) / 72)


def test_fits_recover_a_power_law_with_offset():
  k_K = np.arange(2, 10)
  y_K = 0.8 * k_K**-0.6 + 0.2
  report = fit_unique_fraction(dict(zip(k_K.tolist(), y_K.tolist())))
  power_offset = report['models']['power_offset']
  assert power_offset['error'] is None
  assert power_offset['params'] == pytest.approx({'a': 0.8, 'b': -0.6, 'c': 0.2}, abs=1e-4)
  assert power_offset['asymptote'] == pytest.approx(0.2, abs=1e-4)
  assert len(power_offset['residuals']) == 8 and power_offset['rss'] < 1e-12
  assert report['models']['power']['asymptote'] == 0.0
  assert report['models']['power']['rss'] > power_offset['rss']
  assert report['best'] == 'power_offset'
  for model in report['models'].values():
    n, rss, p = model['n'], model['rss'], model['n_params']
    assert model['aic'] == pytest.approx(n * np.log(max(rss, np.finfo(float).tiny) / n) + 2 * p)


def test_fits_report_failures_instead_of_raising():
  report = fit_unique_fraction([2, 3], [0.5, 0.4])
  assert report['models']['power_offset']['error'] and report['models']['exp_offset']['error']
  assert report['models']['power']['error'] is None and report['best'] == 'power'
  nothing = fit_unique_fraction([2.0], [np.nan])
  assert nothing['best'] is None and all(m['error'] for m in nothing['models'].values())
