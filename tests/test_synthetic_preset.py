"""The offline default, run exactly as the README says: every seed reaches FVU < 0.2 and recovers the most
frequent true features; and bf16 SAE matmuls (the accelerators' default) train it as well as float32."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start_preset(workdir, *overrides) -> subprocess.Popen:
  """Starts the preset; its console goes to a file beside the run (a pipe nobody reads would fill and stall it)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  command = [sys.executable, '-m', 'experiments.train', '--config=synthetic', f'--workdir={workdir}', *overrides]
  with open(f'{workdir}.log', 'w') as log:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _summary(process: subprocess.Popen, workdir) -> dict:
  process.wait(timeout=900)
  assert process.returncode == 0, Path(f'{workdir}.log').read_text()[-3000:]
  return json.loads((workdir / 'summary.json').read_text())


@pytest.fixture(scope='module')
def preset_runs(tmp_path_factory):
  """The preset as the README runs it, and with bf16 SAE matmuls: both trained at once (each is one core's work)."""
  root = tmp_path_factory.mktemp('preset')
  workdirs = {'float32': root / 'synthetic', 'bfloat16': root / 'bf16'}
  processes = {
    'float32': _start_preset(workdirs['float32']),
    'bfloat16': _start_preset(workdirs['bfloat16'], '--config.sae_dtype=bfloat16'),
  }
  try:
    return {dtype: (workdirs[dtype], _summary(processes[dtype], workdirs[dtype])) for dtype in processes}
  finally:
    for process in processes.values():
      process.kill()  # a no-op for a finished one; stops the other when the first failed


def _fvu_and_recovery(summary):
  recovered = [report['recovered_fraction'] for report in summary['recovery']['seeds']]
  return np.asarray(summary['final']['fvu']), np.asarray(recovered)


@pytest.mark.slow
def test_synthetic_preset_learns_the_true_features(preset_runs):
  workdir, summary = preset_runs['float32']
  assert len(summary['seeds']) == 9
  assert max(summary['final']['fvu']) < 0.2, summary['final']['fvu']
  firing_prob = np.load(workdir / 'ground_truth.npz')['firing_prob']
  most_frequent = np.argsort(-firing_prob)[:25]
  for seed, report in zip(summary['seeds'], summary['recovery']['seeds']):
    best_cos = np.asarray(report['best_cos'])
    assert np.all(best_cos[most_frequent] >= 0.9), (seed, best_cos[most_frequent].min())
    assert report['recovered_fraction'] > 0.5, (seed, report['recovered_fraction'])


@pytest.mark.slow
def test_bfloat16_sae_matmuls_match_float32_on_the_preset(preset_runs):
  # The rule that makes bf16 the accelerators' default (saejax.tuning): over the preset's nine seeds, mean FVU
  # within 0.01 and mean recovered fraction within 1 point of float32. Means, because a single seed's trajectory
  # diverges with the rounding: one seed's recovery moved 3 points either way (RESULTS.md), the mean 0.4.
  _, float32 = preset_runs['float32']
  bf16_dir, bfloat16 = preset_runs['bfloat16']
  assert json.loads((bf16_dir / 'config.json').read_text())['sae_dtype'] == 'bfloat16'
  fvu32, recovered32 = _fvu_and_recovery(float32)
  fvu16, recovered16 = _fvu_and_recovery(bfloat16)
  assert len(fvu16) == len(fvu32) == 9
  assert abs(fvu16.mean() - fvu32.mean()) <= 0.01, (fvu16, fvu32)
  assert abs(recovered16.mean() - recovered32.mean()) <= 0.01, (recovered16, recovered32)
