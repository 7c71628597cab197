"""Interrupted runs resume exactly: a run killed (SIGKILL) or stopped (SIGTERM) mid-way and rerun with the same
command exports bitwise the same SAEs, and logs the same steps, as one that was never interrupted.

The CLI runs as a subprocess on 2 fake CPU devices; every run compared here uses the same device count.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
BATCH = 128
# 25 checkpoints of ~0.1 s each leave a window of seconds between the first checkpoint and the end of the run.
STEPS = 100
FLAGS = (
  '--config=synthetic',
  '--config.d_in=16',
  '--config.num_features=64',
  '--config.num_latents=64',
  '--config.k=4',
  f'--config.batch_size={BATCH}',
  f'--config.num_tokens={BATCH * STEPS}',
  f'--config.init_seeds={",".join(map(str, SEEDS))}',
  # log_every does not divide checkpoint_every, so a killed run has logged steps past its last checkpoint.
  '--config.checkpoint_every=4',
  '--config.log_every=3',
  '--config.warmup_steps=5',
)
PER_SEED_KEYS = ('fvu', 'l0', 'dead_fraction', 'loss', 'grad_norm')
TIMEOUT = 120

pytestmark = pytest.mark.slow


def command(workdir) -> list[str]:
  return [sys.executable, '-m', 'experiments.train', *FLAGS, f'--workdir={workdir}']


def cli_env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2', HF_HUB_OFFLINE='1')
  return env


def run_to_completion(workdir) -> subprocess.CompletedProcess:
  result = forkserver.run(command(workdir), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def start(workdir, log_path) -> subprocess.Popen:
  """Starts a run in the background; its (long) log goes to a file so a full pipe never blocks it."""
  with open(log_path, 'w') as log:
    return forkserver.popen(command(workdir), cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)


def checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoint steps: integer-named folders (Orbax writes `<step>.orbax-checkpoint-tmp*` first)."""
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def wait_for_first_checkpoint(workdir, process: subprocess.Popen, log_path) -> int:
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline:
    steps = checkpoint_steps(workdir)
    if steps:
      assert process.poll() is None, 'the run ended before it could be interrupted'
      return steps[0]
    if process.poll() is not None:
      with open(log_path) as f:
        pytest.fail(f'the run exited ({process.returncode}) before its first checkpoint:\n{f.read()[-3000:]}')
    time.sleep(0.01)
  process.kill()
  pytest.fail('no checkpoint appeared in time')


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def assert_same_run(reference, resumed) -> None:
  """Bitwise-equal exports in both layouts and the same metrics log (timings aside)."""
  for layout, weights in (('saes', 'sae.safetensors'), ('saelens', 'sae_weights.safetensors')):
    for seed in SEEDS:
      expected = load_file(str(reference / layout / 'synthetic' / f'seed{seed}' / weights))
      actual = load_file(str(resumed / layout / 'synthetic' / f'seed{seed}' / weights))
      assert sorted(actual) == sorted(expected)
      for name, value in expected.items():
        assert actual[name].dtype == value.dtype, (layout, seed, name)
        assert np.array_equal(actual[name], value), f'{layout}/seed{seed} {name} differs after resume'

  expected_log, actual_log = read_metrics(reference), read_metrics(resumed)
  steps = [record['step'] for record in actual_log]
  assert len(steps) == len(set(steps)), f'duplicate steps in the resumed log: {steps}'
  assert steps == [record['step'] for record in expected_log]
  for expected, actual in zip(expected_log, actual_log):
    for key in ('step', 'tokens', 'lr', *PER_SEED_KEYS):
      assert actual[key] == expected[key], (expected['step'], key)

  with open(reference / 'summary.json') as f:
    expected_summary = json.load(f)
  with open(resumed / 'summary.json') as f:
    actual_summary = json.load(f)
  assert actual_summary['recovery'] == expected_summary['recovery']


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """The same run, never interrupted."""
  workdir = tmp_path_factory.mktemp('resume') / 'reference'
  run_to_completion(workdir)
  assert checkpoint_steps(workdir)[-1] == STEPS
  return workdir


def test_sigkill_then_rerun_is_bitwise_identical(reference_run, tmp_path):
  workdir, log_path = tmp_path / 'run', tmp_path / 'killed.log'
  process = start(workdir, log_path)
  wait_for_first_checkpoint(workdir, process, log_path)
  os.kill(process.pid, signal.SIGKILL)
  assert process.wait(timeout=TIMEOUT) == -signal.SIGKILL
  saved = checkpoint_steps(workdir)
  assert saved and saved[-1] < STEPS, f'the kill came too late to test a resume: {saved}'
  assert not (workdir / 'summary.json').exists()

  result = run_to_completion(workdir)
  assert f'resumed from step {saved[-1]}' in result.stderr, result.stderr[-3000:]
  assert_same_run(reference_run, workdir)


def test_sigterm_saves_exits_0_and_rerun_is_bitwise_identical(reference_run, tmp_path):
  workdir, log_path = tmp_path / 'run', tmp_path / 'stopped.log'
  process = start(workdir, log_path)
  first = wait_for_first_checkpoint(workdir, process, log_path)
  process.send_signal(signal.SIGTERM)
  returncode = process.wait(timeout=TIMEOUT)
  with open(log_path) as f:
    log = f.read()
  assert returncode == 0, log[-3000:]
  saved = checkpoint_steps(workdir)
  stopped = saved[-1]
  assert first < stopped < STEPS, saved
  assert f'stopped by SIGTERM at step {stopped}' in log, log[-3000:]
  assert not (workdir / 'summary.json').exists() and not (workdir / 'saes').exists(), 'a stopped run does not export'

  result = run_to_completion(workdir)
  assert f'resumed from step {stopped}' in result.stderr, result.stderr[-3000:]
  assert_same_run(reference_run, workdir)
