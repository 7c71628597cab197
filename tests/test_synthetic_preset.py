"""The offline default, run exactly as the README says: every seed reaches FVU < 0.2 and recovers the most
frequent true features; and bf16 SAE matmuls (the accelerators' default) train it as well as float32."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_preset(workdir, *overrides):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  result = subprocess.run(
    [sys.executable, '-m', 'experiments.train', '--config=synthetic', f'--workdir={workdir}', *overrides],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((workdir / 'summary.json').read_text())


@pytest.fixture(scope='module')
def float32_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('preset') / 'synthetic'
  return workdir, _train_preset(workdir)


def _fvu_and_recovery(summary):
  recovered = [report['recovered_fraction'] for report in summary['recovery']['seeds']]
  return np.asarray(summary['final']['fvu']), np.asarray(recovered)


@pytest.mark.slow
def test_synthetic_preset_learns_the_true_features(float32_run):
  workdir, summary = float32_run
  assert len(summary['seeds']) == 9
  assert max(summary['final']['fvu']) < 0.2, summary['final']['fvu']
  firing_prob = np.load(workdir / 'ground_truth.npz')['firing_prob']
  most_frequent = np.argsort(-firing_prob)[:25]
  for seed, report in zip(summary['seeds'], summary['recovery']['seeds']):
    best_cos = np.asarray(report['best_cos'])
    assert np.all(best_cos[most_frequent] >= 0.9), (seed, best_cos[most_frequent].min())
    assert report['recovered_fraction'] > 0.5, (seed, report['recovered_fraction'])


@pytest.mark.slow
def test_bfloat16_sae_matmuls_match_float32_on_the_preset(float32_run, tmp_path):
  # The rule that makes bf16 the accelerators' default (saejax.tuning): over the preset's nine seeds, mean FVU
  # within 0.01 and mean recovered fraction within 1 point of float32. Means, because a single seed's trajectory
  # diverges with the rounding: one seed's recovery moved 3 points either way (RESULTS.md), the mean 0.4.
  _, float32 = float32_run
  bfloat16 = _train_preset(tmp_path / 'bf16', '--config.sae_dtype=bfloat16')
  assert json.loads((tmp_path / 'bf16' / 'config.json').read_text())['sae_dtype'] == 'bfloat16'
  fvu32, recovered32 = _fvu_and_recovery(float32)
  fvu16, recovered16 = _fvu_and_recovery(bfloat16)
  assert len(fvu16) == len(fvu32) == 9
  assert abs(fvu16.mean() - fvu32.mean()) <= 0.01, (fvu16, fvu32)
  assert abs(recovered16.mean() - recovered32.mean()) <= 0.01, (recovered16, recovered32)
