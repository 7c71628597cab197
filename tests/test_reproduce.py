"""`experiments.reproduce --quick` measures every claim and writes the report (verdicts are data, not asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMS = (
  'a permuted copy is 100% shared', 'the matched-cosine distribution is bimodal', 'more latents -> less sharing',
  'larger k -> less sharing', 'longer training -> more sharing', 'ReLU+L1 and Gated are more stable than TopK',
  'frequently firing latents are shared more often', 'unique-vs-seeds fits a power law with offset',
  'shared latents match true features better than orphans',
)


@pytest.mark.slow
def test_quick_reproduction_reports_every_claim(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  result = subprocess.run([sys.executable, '-m', 'experiments.reproduce', '--quick', f'--out={tmp_path}'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  claims = json.loads((tmp_path / 'claims.json').read_text())
  names = [c['claim'] for c in claims]
  for claim in CLAIMS:
    assert any(name.startswith(claim) for name in names), claim
  assert any(name.startswith('[random LM]') for name in names)
  assert all(c['holds'] in (True, False, None) and c['measured'] for c in claims)
  # The one claim that is a mathematical certainty must hold, on both sources.
  assert all(c['holds'] for c in claims if 'permuted copy' in c['claim'])
  report = (tmp_path / 'report.md').read_text()
  assert report.count('\n| ') == len(claims) + 1
