"""Figures and report: every plot writes a PNG, also from degenerate inputs; the report embeds figures and pairs."""

import os
import pathlib

import numpy as np
import pytest

from saejax.analysis import figures, report

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
FITS = {
  'power_law_offset': {'params': {'a': 0.5, 'b': -0.8, 'c': 0.3}, 'aic': -40.1, 'asymptote': 0.3, 'error': None},
  'power_law': {'params': {'a': 0.9, 'b': -0.3}, 'aic': -30.2, 'asymptote': 0.0, 'error': None},
  'exponential_offset': {'params': None, 'aic': None, 'asymptote': None, 'error': 'did not converge'},
  'best': 'power_law_offset',
}

# fits.py's layout: models under 'models', its own model names.
FITS_NESTED = {
  'k': [2.0, 3.0],
  'y': [0.6, 0.5],
  'models': {
    'power_offset': {
      'model': 'power_offset',
      'params': {'a': 0.5, 'b': -0.8, 'c': 0.3},
      'aic': -40.1,
      'asymptote': 0.3,
      'error': None,
    },
    'power': {'model': 'power', 'params': {'a': 0.9, 'b': -0.3}, 'aic': -30.2, 'asymptote': 0.0, 'error': None},
    'exp_offset': {
      'model': 'exp_offset',
      'params': None,
      'aic': float('nan'),
      'asymptote': float('nan'),
      'error': 'RuntimeError: did not converge',
    },
  },
  'best': 'power_offset',
}


def assert_png(path, expected):
  assert path == os.fspath(expected)
  with open(path, 'rb') as f:
    data = f.read()
  assert len(data) > 1000 and data.startswith(PNG_MAGIC)
  assert [name for name in os.listdir(os.path.dirname(path)) if '.tmp' in name] == []


def pair_cosines(rng, n):
  agree_F = rng.random(n) < 0.5
  enc_F = np.where(agree_F, rng.normal(0.85, 0.07, n), rng.normal(0.3, 0.1, n)).clip(-1, 1)
  dec_F = (enc_F + rng.normal(0, 0.05, n)).clip(-1, 1)
  return enc_F, dec_F, agree_F


@pytest.mark.parametrize('case', ['random', 'all_equal', 'single', 'empty', 'collinear', 'nan'])
def test_fig1_cosine_scatter(tmp_path, case):
  rng = np.random.default_rng(0)
  enc_F, dec_F, agree_F = pair_cosines(rng, 400)
  if case == 'all_equal':
    enc_F, dec_F = np.full(50, 0.8), np.full(50, 0.8)
    agree_F = np.ones(50, bool)
  elif case == 'single':
    enc_F, dec_F, agree_F = enc_F[:1], dec_F[:1], agree_F[:1]
  elif case == 'empty':
    enc_F, dec_F, agree_F = enc_F[:0], dec_F[:0], agree_F[:0]
  elif case == 'collinear':
    dec_F = enc_F.copy()
  elif case == 'nan':
    enc_F[::7] = np.nan
  path = tmp_path / 'figs' / 'fig1_cosine_scatter.png'
  assert_png(figures.fig1_cosine_scatter(enc_F, dec_F, agree_F, path), path)


def test_fig1_subsamples_the_kde(tmp_path, monkeypatch):
  monkeypatch.setattr(figures, 'MAX_KDE_POINTS', 100)
  enc_F, dec_F, agree_F = pair_cosines(np.random.default_rng(1), 3000)
  path = tmp_path / 'fig1.png'
  assert_png(figures.fig1_cosine_scatter(enc_F, dec_F, agree_F, str(path), threshold=0.5), path)


def test_fig1_rejects_mismatched_shapes(tmp_path):
  with pytest.raises(ValueError):
    figures.fig1_cosine_scatter(np.zeros(3), np.zeros(4), np.zeros(3, bool), tmp_path / 'x.png')


def test_fit_entries_reads_both_layouts():
  flat, best_flat = figures.fit_entries(FITS)
  nested, best_nested = figures.fit_entries(FITS_NESTED)
  assert [name for name, _ in flat] == [name for name, _ in nested] == list(figures.FIT_MODELS)
  assert best_flat == best_nested == 'power_law_offset'
  assert [name for name, _ in figures._usable_fits(nested)] == ['power_law_offset', 'power_law']
  assert figures.fit_entries(None) == ([], None)


@pytest.mark.parametrize('case', ['fits', 'nested_fits', 'str_keys', 'no_fits', 'single_k', 'empty', 'zeros'])
def test_fig2_unique_vs_seeds(tmp_path, case):
  k_K = np.arange(2, 10)
  curve = {int(k): float(0.5 * k**-0.8 + 0.3) for k in k_K}
  fits = FITS
  if case == 'nested_fits':
    fits = FITS_NESTED
  elif case == 'str_keys':
    curve = {str(k): v for k, v in curve.items()}
  elif case == 'no_fits':
    fits = {}
  elif case == 'single_k':
    curve = {2: 0.6}
  elif case == 'empty':
    curve, fits = {}, {'best': None}
  elif case == 'zeros':
    curve = {k: 0.0 for k in curve}
  path = tmp_path / 'fig2_unique_vs_seeds.png'
  assert_png(figures.fig2_unique_vs_seeds(curve, fits, path), path)


@pytest.mark.parametrize('case', ['random', 'zero_freq', 'all_zero_freq', 'single', 'all_equal', 'empty'])
def test_fig3_frequency(tmp_path, case):
  rng = np.random.default_rng(2)
  n = 500
  n_shared_F = rng.integers(0, 9, n)
  freq_F = 10 ** rng.uniform(-6, -1, n)
  cos_F = (0.3 + 0.08 * n_shared_F + rng.normal(0, 0.05, n)).clip(-1, 1)
  if case == 'zero_freq':
    freq_F[::10] = 0
  elif case == 'all_zero_freq':
    freq_F[:] = 0
  elif case == 'single':
    freq_F, cos_F, n_shared_F = freq_F[:1], cos_F[:1], n_shared_F[:1]
  elif case == 'all_equal':
    freq_F, cos_F, n_shared_F = np.full(n, 0.01), np.full(n, 0.5), np.zeros(n, int)
  elif case == 'empty':
    freq_F, cos_F, n_shared_F = freq_F[:0], cos_F[:0], n_shared_F[:0]
  path = tmp_path / 'fig3_frequency.png'
  assert_png(figures.fig3_frequency(freq_F, cos_F, n_shared_F, path), path)


def test_fig3_frequency_fixed_colour_range(tmp_path):
  rng = np.random.default_rng(4)
  n_shared_F = 1 + rng.integers(0, 3, 200)  # base included: 1..3 of 9 SAEs
  path = tmp_path / 'fig3.png'
  out = figures.fig3_frequency(
    rng.random(200),
    rng.random(200),
    n_shared_F,
    path,
    n_range=(1, 9),
    n_label='SAEs with the latent (base included)',
    count_scale='log',
  )
  assert_png(out, path)


@pytest.mark.parametrize('n_sweeps', [0, 1, 3])
def test_figA1_threshold_sweep(tmp_path, n_sweeps):
  t_T = np.linspace(0, 1, 21)
  sweeps = [
    {
      'label': f'seed0 vs seed{i + 1}',
      'thresholds': t_T.tolist(),
      'shared_fraction': (1 - t_T ** (2 + i)).tolist(),
      'shared_fraction_notebook': (1 - t_T ** (3 + i)).tolist(),
    }
    for i in range(n_sweeps)
  ]
  if sweeps:
    del sweeps[0]['shared_fraction_notebook']  # only the solid line for this one
  path = tmp_path / 'figA1_threshold_sweep.png'
  assert_png(figures.figA1_threshold_sweep(sweeps, path), path)


@pytest.mark.parametrize('case', ['random', 'all_equal', 'single', 'empty'])
def test_figA2_hungarian_vs_max(tmp_path, case):
  rng = np.random.default_rng(3)
  matched_F = rng.uniform(0, 1, 300)
  max_F = np.where(rng.random(300) < 0.8, matched_F, np.minimum(1, matched_F + rng.uniform(0, 0.3, 300)))
  if case == 'all_equal':
    matched_F = max_F = np.full(20, 0.9)
  elif case == 'single':
    matched_F, max_F = matched_F[:1], max_F[:1]
  elif case == 'empty':
    matched_F, max_F = matched_F[:0], max_F[:0]
  path = tmp_path / 'figA2_hungarian_vs_max.png'
  assert_png(figures.figA2_hungarian_vs_max(matched_F, max_F, path, label='encoder'), path)


def pair_row(a, b, fraction):
  return {
    'a': a,
    'b': b,
    'shared_fraction': fraction,
    'shared_fraction_notebook': fraction + 0.0312345,
    'partner_agreement': np.float32(0.8123456),
    'mean_cos_enc': 0.61234567,
    'mean_cos_dec': 0.65,
    'mean_max_cos_enc': 0.7,
    'mean_max_cos_dec': 0.71,
    'method': 'lapjv',
    'certified_optimal': True,
    'threshold': 0.7,
  }


def test_write_report(tmp_path):
  out_dir = tmp_path / 'run'
  fig_dir = out_dir / 'figures'
  names = {
    'fig1': 'fig1_cosine_scatter.png',
    'fig2': 'fig2_unique_vs_seeds.png',
    'fig3': 'fig3_frequency.png',
    'figA1': 'figA1_threshold_sweep.png',
    'figA2': 'figA2_hungarian_vs_max.png',
    'extra': 'other.png',
  }
  fig_paths = {key: str(fig_dir / name) for key, name in names.items()}
  pairs = [pair_row('seed0', 'seed1', 0.421234), pair_row('seed0', 'seed2', 0.43), pair_row('seed1', 'seed2', 0.44)]
  summary = {
    'pairs': pairs,
    'seeds': {
      'names': ['seed0', 'seed1', 'seed2'],
      'unique_fraction_by_k': {'2': 0.5, '3': 0.41234567},
      'exactly_in_n': {'seed0': [10, 20, 70], 'seed1': [0, 0, 0]},
      'fits': FITS,
    },
  }
  path = report.write_report(out_dir, summary, fig_paths)
  assert path == os.path.join(out_dir, 'report.md')
  text = pathlib.Path(path).read_text(encoding='utf-8')
  for key, name in names.items():
    assert f'](figures/{name})' in text, key
  for title in ('Fig. 1', 'Fig. 2', 'Fig. 3', 'Fig. A1', 'Fig. A2'):
    assert f'![{title}](' in text
  for pair in pairs:
    assert f'| {pair["a"]} | {pair["b"]} | {pair["shared_fraction"]:.4g} | ' in text
  assert '0.8123 |' in text and '0.6123 |' in text and '| yes |' in text  # 4 significant digits, booleans
  assert '| 3 | 0.4123 |' in text  # string keys of the k curve
  assert '10 (10%)' in text and '**power_law_offset** (best)' in text and 'did not converge' in text
  assert [name for name in os.listdir(out_dir) if '.tmp' in name] == []


def test_write_report_bare_names_and_nested_fits(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  out_dir = tmp_path / 'out'
  out_dir.mkdir()
  (out_dir / 'fig1_cosines.png').write_bytes(PNG_MAGIC)
  summary = {'pairs': [pair_row('a', 'b', 0.5)], 'seeds': {'unique_fraction_by_k': {2: 0.6}, 'fits': FITS_NESTED}}
  figs = {'fig1': 'fig1_cosines.png', 'fig2': 'fig2_unique_vs_seeds.png', 'figA2': str(tmp_path / 'elsewhere.png')}
  text = pathlib.Path(report.write_report(str(out_dir), summary, figs)).read_text(encoding='utf-8')
  assert '![Fig. 1](fig1_cosines.png)' in text and '![Fig. 2](fig2_unique_vs_seeds.png)' in text
  assert '![Fig. A2](../elsewhere.png)' in text
  assert '**power_law_offset** (best)' in text and 'RuntimeError: did not converge' in text


def test_write_report_pairs_only(tmp_path):
  path = report.write_report(tmp_path, {'pairs': [pair_row('a', 'b', 0.5)]}, {})
  text = pathlib.Path(path).read_text(encoding='utf-8')
  assert '| a | b | 0.5 |' in text and '## Seeds' not in text and '## Figures' not in text
