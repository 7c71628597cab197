"""`experiments.reproduce --quick` measures every claim and writes the report (verdicts are data, not asserted);
the L1-coefficient calibration that matches sparsity before the ReLU+L1 / Gated vs TopK comparison."""

import json
import os
import sys

import numpy as np
import pytest

from saejax.analysis import claims
from saejax.config import TrainConfig
from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMS = (
  'a permuted copy is 100% shared',
  'the matched-cosine distribution is bimodal',
  'more latents -> less sharing',
  'larger k -> less sharing',
  'longer training -> more sharing',
  'ReLU+L1 and Gated are more stable than TopK',
  'frequently firing latents are shared more often',
  'unique-vs-seeds fits a power law with offset',
  'shared latents match true features better than orphans',
)


@pytest.mark.slow
def test_quick_reproduction_reports_every_claim(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  result = forkserver.run(
    [sys.executable, '-m', 'experiments.reproduce', '--quick', f'--out={tmp_path}'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  claims = json.loads((tmp_path / 'claims.json').read_text())
  names = [c['claim'] for c in claims]
  for claim in CLAIMS:
    assert any(name.startswith(claim) for name in names), claim
  assert any(name.startswith('[random LM]') for name in names)
  assert all(c['holds'] in (True, False, None) and c['measured'] for c in claims)
  # Matryoshka BatchTopK is measured beside the L1 architectures (a row, not part of the verdict).
  arch = next(c for c in claims if c['claim'].startswith('ReLU+L1 and Gated'))
  assert 0.0 <= arch['details']['rows']['matryoshka']['shared'] <= 1.0 and 'matryoshka (beside' in arch['measured']
  # The one claim that is a mathematical certainty must hold, on both sources.
  assert all(c['holds'] for c in claims if 'permuted copy' in c['claim'])
  report = (tmp_path / 'report.md').read_text()
  claims_table, recovery_table = report.split('### Ground-truth recovery')
  assert claims_table.count('\n| ') == len(claims) + 1
  # Ground-truth recovery per seed (6 seeds), split by shared and orphan latents.
  recovery = next(c for c in claims if c['claim'].startswith('shared latents match'))['details']['recovery']
  assert len(recovery['per_seed']) == 6
  assert recovery_table.count('\n| seed') == 7  # the header and one row per seed


def _curve(coefficients, l0s):
  """A measured L0(coefficient) curve, interpolated in log-log like the real runs behave between points."""

  def measure(config):
    return float(np.exp(np.interp(np.log(config.l1_coefficient), np.log(coefficients), np.log(l0s))))

  return measure


# L0 against L1 coefficient measured with one seed on the full synthetic suite (TopK's L0 there is 7.9).
FULL_RELU = _curve([1, 3, 4, 5, 6, 7, 10, 100], [60, 33.8, 22.6, 14.1, 6.27, 0.92, 0.06, 0.001])
FULL_GATED = _curve([1, 3, 5, 10, 100], [80, 27.3, 9.7, 2.26, 0.02])


@pytest.mark.parametrize('measure', [FULL_RELU, FULL_GATED], ids=['relu', 'gated'])
@pytest.mark.parametrize('target', [2.0, 7.9, 30.0, 50.0])
def test_calibration_reaches_the_target_l0_in_few_runs(measure, target):
  calibration = claims.calibrate_l1_coefficient(TrainConfig(), target, measure_l0=measure)
  assert calibration.matched, calibration
  assert len(calibration.trace) <= 6
  assert calibration.trace[0][0] == claims.START_L1_COEFFICIENT
  assert abs(measure(TrainConfig(l1_coefficient=calibration.coefficient)) - target) <= 0.1 * target


def test_calibration_that_cannot_reach_the_target_says_so():
  plateau = _curve([0.01, 1000], [20.0, 19.0])  # L0 barely moves: no coefficient reaches 5
  calibration = claims.calibrate_l1_coefficient(TrainConfig(), 5.0, measure_l0=plateau)
  assert not calibration.matched
  assert len(calibration.trace) == claims.MAX_CALIBRATION_RUNS
  assert calibration.l0 == min(l0 for _, l0 in calibration.trace)


def test_next_coefficient_stays_inside_the_bracket():
  trace = [(3.0, 30.0), (10.0, 0.0)]  # a collapsed run (L0 0) must not pull the next try onto the dense end
  assert 3.0 < claims.next_l1_coefficient(trace, 8.0) < 10.0
  # Illinois: after two runs on the dense side, the next try moves further toward the sparse end than plain
  # regula falsi would.
  stuck = [(3.0, 30.0), (10.0, 0.5), (4.0, 20.0), (5.0, 12.0)]
  plain = [(3.0, 30.0), (10.0, 0.5), (5.0, 12.0)]
  assert claims.next_l1_coefficient(stuck, 8.0) > claims.next_l1_coefficient(plain, 8.0)


def _fake_l1_vs_topk(monkeypatch, calibrated_l0: float, two_seed_l0: float, l1_shared: float) -> claims.Claim:
  def fake_shared_fraction(config):
    if config.arch == 'topk':
      return 0.4, {'l0': 8.0, 'fvu': 0.1, 'l0_per_seed': [8.0, 8.0]}
    return l1_shared, {'l0': two_seed_l0, 'fvu': 0.5, 'l0_per_seed': [two_seed_l0] * 2}

  def fake_calibrate(config, target_l0):
    return claims.Calibration(5.0, calibrated_l0, ((3.0, 30.0), (5.0, calibrated_l0)), target_l0)

  monkeypatch.setattr(claims, 'shared_fraction', fake_shared_fraction)
  monkeypatch.setattr(claims, 'calibrate_l1_coefficient', fake_calibrate)
  return claims.l1_vs_topk(TrainConfig())


def test_l1_vs_topk_is_a_test_only_when_l0_is_matched(monkeypatch):
  assert _fake_l1_vs_topk(monkeypatch, 8.2, 8.5, l1_shared=0.6).holds is True
  assert _fake_l1_vs_topk(monkeypatch, 8.2, 8.5, l1_shared=0.2).holds is False
  failed = _fake_l1_vs_topk(monkeypatch, 12.0, 12.0, l1_shared=0.6)
  assert failed.holds is None and 'calibration reached L0 12.0' in failed.measured
  drifted = _fake_l1_vs_topk(monkeypatch, 8.2, 11.0, l1_shared=0.6)
  assert drifted.holds is None and 'two-seed L0 11.0 not within 25%' in drifted.measured
  assert drifted.details['rows']['relu']['calibration_trace'] == [[3.0, 30.0], [5.0, 8.2]]
