"""`python -m experiments.align` end to end on a tiny synthetic run, and its bad-input contract."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from saejax import formats
from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
PAIR_KEYS = {
  'a',
  'b',
  'shared_fraction',
  'shared_fraction_notebook',
  'partner_agreement',
  'mean_cos_enc',
  'mean_cos_dec',
  'mean_max_cos_enc',
  'mean_max_cos_dec',
  'method',
  'certified_optimal',
}


def run(module: str, *args: str) -> subprocess.CompletedProcess:
  return forkserver.run(
    [sys.executable, '-m', module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
  )


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('align') / 'run'
  result = run(
    'experiments.train',
    '--config=synthetic',
    f'--workdir={workdir}',
    '--config.d_in=16',
    '--config.num_features=48',
    '--config.num_latents=64',
    '--config.k=4',
    '--config.batch_size=256',
    '--config.num_tokens=25600',
    '--config.init_seeds=0,1,2,3',
    '--config.lr=3e-3',
    '--config.warmup_steps=5',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return workdir


@pytest.mark.slow
def test_align_workdir_writes_everything(trained_run):
  result = run('experiments.align', f'--workdir={trained_run}', '--firing_tokens=20000')
  assert result.returncode == 0, result.stderr[-3000:]
  out = trained_run / 'alignment'
  summary = json.loads((out / 'summary.json').read_text())
  assert len(summary['pairs']) == 6
  for pair in summary['pairs']:
    assert set(pair) >= PAIR_KEYS
    assert pair['certified_optimal'] is True
    assert 0.0 <= pair['shared_fraction'] <= pair['shared_fraction_notebook'] <= 1.0
    with np.load(out / 'pairs' / f'{pair["a"]}__{pair["b"]}.npz') as arrays:
      assert {'enc_partner', 'dec_partner', 'enc_cos', 'dec_cos', 'shared'} <= set(arrays.files)
      assert sorted(arrays['enc_partner']) == list(range(64))  # a bijection
  seeds = summary['seeds']
  assert set(seeds['unique_fraction_by_k']) == {'2', '3', '4'}
  assert all(sum(counts) == 64 and len(counts) == 4 for counts in seeds['exactly_in_n'].values())
  for name in (
    'fig1_cosines.png',
    'fig2_unique_vs_seeds.png',
    'fig3_frequency.png',
    'figA1_threshold_sweep.png',
    'figA2_max_cos.png',
  ):
    assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert name in (out / 'report.md').read_text()
  rows = (out / 'universality.csv').read_text().strip().splitlines()
  assert len(rows) == 1 + 4 * 64
  with np.load(trained_run / 'firing_counts.npz') as firing:
    assert firing['counts'].shape == (4, 64) and int(firing['tokens']) >= 20000
    # TopK: every token fires at most k latents.
    assert firing['counts'].sum(axis=1).max() <= 4 * int(firing['tokens'])

  # The synthetic run's ground truth: recovery per seed, split by sharing, consistent with the other outputs.
  recovery = seeds['ground_truth_recovery']
  assert recovery['num_features'] == 48 and list(recovery['per_seed']) == seeds['names']
  trained = json.loads((trained_run / 'summary.json').read_text())['recovery']['seeds']
  for index, (name, row) in enumerate(recovery['per_seed'].items()):
    assert row['shared_latents'] + row['orphan_latents'] == 64
    assert row['orphan_latents'] == seeds['exactly_in_n'][name][0]  # orphans: in exactly one SAE, the base
    assert row['features_recovered'] == pytest.approx(trained[index]['recovered_fraction'])
    assert row['features_recovered'] == pytest.approx(
      row['features_recovered_by_shared'] + row['features_recovered_only_by_orphans']
    )
  assert 'Ground-truth recovery' in (out / 'report.md').read_text()


@pytest.mark.slow
def test_align_saes_folders_and_bad_input(trained_run, tmp_path):
  seeds = sorted((trained_run / 'saes' / 'synthetic').iterdir())
  out = tmp_path / 'out'
  args = ['--saes', str(seeds[0]), str(seeds[1]), f'--out={out}', '--method=sparse', '--nofigures']
  result = run('experiments.align', *args)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((out / 'summary.json').read_text())
  assert [(p['a'], p['b']) for p in summary['pairs']] == [('seed0', 'seed1')]
  assert summary['pairs'][0]['method'] == 'sparse'
  assert 'ground_truth_recovery' not in summary['seeds']  # bare SAE folders carry no ground truth
  assert summary['figures'] == {} and not list(out.glob('*.png'))  # --nofigures: the numbers only

  # A permuted copy is 100% shared.
  params, cfg = formats.load_sae(seeds[0])
  perm = np.random.default_rng(0).permutation(cfg['num_latents'])
  permuted = {
    name: (value[perm] if value.shape[:1] == (cfg['num_latents'],) else value) for name, value in params.items()
  }
  formats.save_eleuther(
    tmp_path / 'permuted', permuted, arch=cfg['arch'], k=cfg['k'], d_in=cfg['d_in'], num_latents=cfg['num_latents']
  )
  permuted_args = ['--saes', str(seeds[0]), str(tmp_path / 'permuted'), f'--out={tmp_path / "p"}', '--nofigures']
  result = run('experiments.align', *permuted_args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((tmp_path / 'p' / 'summary.json').read_text())['pairs'][0]['shared_fraction'] == 1.0

  # Bad input: one line on stderr, exit 2, no output folder.
  wide = {
    name: np.concatenate([value, value], axis=-1) if name in ('W_enc', 'W_dec') else value
    for name, value in params.items()
  }
  wide['b_dec'] = np.concatenate([params['b_dec'], params['b_dec']])
  formats.save_eleuther(
    tmp_path / 'wide', wide, arch=cfg['arch'], k=cfg['k'], d_in=2 * cfg['d_in'], num_latents=cfg['num_latents']
  )
  nan_dir = tmp_path / 'nan'
  shutil.copytree(seeds[1], nan_dir)
  from safetensors.numpy import load_file, save_file

  tensors = load_file(nan_dir / 'sae.safetensors')
  tensors['W_dec'][0, 0] = np.nan
  save_file(tensors, nan_dir / 'sae.safetensors')
  cases = {
    'one SAE': ['--saes', str(seeds[0])],
    'd_in': ['--saes', str(seeds[0]), str(tmp_path / 'wide')],
    'missing': ['--saes', str(seeds[0]), str(tmp_path / 'nope')],
    'nan': ['--saes', str(seeds[0]), str(nan_dir)],
  }
  for label, args in cases.items():
    bad_out = tmp_path / f'bad_{label.replace(" ", "_")}'
    result = run('experiments.align', *args, f'--out={bad_out}')
    assert result.returncode == 2, (label, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith('error:')]
    assert len(lines) == 1, (label, result.stderr[-2000:])
    assert not bad_out.exists(), label
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f'.{bad_out.name}.tmp')], label


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['corrupt', 'wrong_width'])
def test_align_refuses_a_bad_ground_truth_file(trained_run, tmp_path, damage):
  run_copy = tmp_path / 'run'
  shutil.copytree(trained_run, run_copy, ignore=shutil.ignore_patterns('alignment', 'checkpoints'))
  truth = run_copy / 'ground_truth.npz'
  if damage == 'corrupt':
    truth.write_bytes(truth.read_bytes()[:100])
  else:
    np.savez(truth, features=np.ones((48, 17), np.float32))
  result = run('experiments.align', f'--workdir={run_copy}', '--firing_tokens=0')
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and 'ground' in lines[0], result.stderr[-2000:]
  assert not (run_copy / 'alignment').exists()
