"""experiments/device_check.py at tiny shapes on CPU, without the packages the GPU image lacks."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not on the GPU image (the device README's package list); lapjv travels as a wheel, gguf only for --gguf.
MISSING_ON_THE_GPU_IMAGE = ('ml_collections', 'datasets', 'gguf', 'sae_lens', 'sparsify')
RUN = (
  'import sys, runpy\n'
  f'for name in {MISSING_ON_THE_GPU_IMAGE!r}: sys.modules[name] = None\n'
  'sys.argv = ["device_check", *sys.argv[1:]]\n'
  'runpy.run_module("experiments.device_check", run_name="__main__")\n'
)


def _dry_run(*flags) -> list[dict]:
  """The script's JSON lines, run as the GPU image would: without the packages it lacks."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  command = [sys.executable, '-c', RUN, '--dry-run', *flags]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]


def test_dry_run_prints_every_measurement_as_json(tmp_path):
  # The GPU image has transformers and torch, and the script times their forward beside ours.
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  out = tmp_path / 'device_check.jsonl'
  lines = _dry_run(f'--out={out}')
  assert lines == [json.loads(line) for line in out.read_text().splitlines()]
  assert [line['measure'] for line in lines][0] == 'machine' and lines[-1]['measure'] == 'done'
  failed = [line for line in lines if 'error' in line or 'skipped' in line]
  assert not failed, failed
  steps = [line for line in lines if line['measure'] == 'sae_step']
  assert {(s['seeds'], s['sae_dtype'], s['topk_kernel']) for s in steps} == {
    (seeds, dtype, kernel)
    for dtype in ('float32', 'bfloat16')
    for seeds, kernel in ((1, 'sparse'), (3, 'sparse'), (1, 'dense'))
  }
  for step in steps:
    assert step['plan']['sae_dtype'] == step['sae_dtype'] and step['plan']['topk_kernel'] == step['topk_kernel']
    assert step['step_s'] > 0 and step['encoder_matmul_s'] > 0
    ratio = step['step_s'] / (step['seeds'] * step['encoder_matmul_s'])
    assert math.isclose(step['step_over_S_matmul'], ratio, rel_tol=0.05)
  forwards = {line['model']: line for line in lines if line['measure'] == 'lm_forward'}
  assert set(forwards) == {'pythia', 'smollm2'}
  assert all(f['tokens_per_s'] > 0 and f['torch_forward_s'] > 0 for f in forwards.values())
  (full,) = [line for line in lines if line['measure'] == 'full_step']
  assert 0 < full['lm_share'] < 1 and full['paper_run_hours'] > 0
  aligns = [line for line in lines if line['measure'] == 'align']
  assert [a['n'] for a in aligns] == [256, 512] and all(a['certified'] for a in aligns)
  (variants,) = [line for line in lines if line['measure'] == 'variants_step']
  by_k = variants['group_step_s_by_k']
  assert list(by_k) == ['2', '4', '8'] and variants['num_latents'] == 64
  assert math.isclose(variants['per_k_groups_s'], sum(by_k.values()), rel_tol=1e-3)
  assert math.isclose(variants['masked_floor_full_groups_s'], 3 * by_k['8'], rel_tol=1e-3)


def test_past_the_budget_measurements_are_skipped_not_lost():
  lines = _dry_run('--budget_s=0')
  measured = [line for line in lines if line['measure'] not in ('machine', 'done')]
  assert measured and all('skipped' in line for line in measured)
