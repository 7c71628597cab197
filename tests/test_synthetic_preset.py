"""The offline default, run exactly as the README says: every seed reaches FVU < 0.2 and recovers the most
frequent true features."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_synthetic_preset_learns_the_true_features(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  workdir = tmp_path / 'synthetic'
  result = subprocess.run(
    [sys.executable, '-m', 'experiments.train', '--config=synthetic', f'--workdir={workdir}'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  assert len(summary['seeds']) == 9
  assert max(summary['final']['fvu']) < 0.2, summary['final']['fvu']
  firing_prob = np.load(workdir / 'ground_truth.npz')['firing_prob']
  most_frequent = np.argsort(-firing_prob)[:25]
  for seed, report in zip(summary['seeds'], summary['recovery']['seeds']):
    best_cos = np.asarray(report['best_cos'])
    assert np.all(best_cos[most_frequent] >= 0.9), (seed, best_cos[most_frequent].min())
    assert report['recovered_fraction'] > 0.5, (seed, report['recovered_fraction'])
