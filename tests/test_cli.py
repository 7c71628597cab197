"""The training CLI end to end, as a subprocess: flag errors, the run-folder layout, config mismatch, corrupt
checkpoints and non-finite values. Each run is tiny (3 seeds, d_in=16, 64 latents) so it takes seconds on a CPU.
"""

import hashlib
import json
import os
import re
import shutil
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
STEPS = 10
PER_SEED_KEYS = ('fvu', 'l0', 'dead_fraction', 'loss', 'grad_norm')
METRIC_KEYS = {'step', 'hookpoint', 'tokens', 'lr', 'elapsed_s', 'time', *PER_SEED_KEYS}
TINY = (
  '--config=synthetic',
  '--config.d_in=16',
  '--config.num_features=64',
  '--config.num_latents=64',
  '--config.k=4',
  f'--config.batch_size={BATCH}',
  f'--config.init_seeds={",".join(map(str, SEEDS))}',
  '--config.checkpoint_every=5',
  '--config.log_every=5',
  '--config.warmup_steps=5',
)


def cli_env() -> dict[str, str]:
  """CPU with 2 fake devices in every subprocess (conftest gives this process 8; runs compared here share 2)."""
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2', HF_HUB_OFFLINE='1')
  return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  return forkserver.run(
    [sys.executable, '-m', 'experiments.train', *args],
    cwd=ROOT,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_tiny(workdir, *extra: str, steps: int = STEPS) -> subprocess.CompletedProcess:
  return run_cli(*TINY, f'--config.num_tokens={BATCH * steps}', f'--workdir={workdir}', *extra)


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one `error: ...` line on stderr, and no traceback."""
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return lines[0]


def checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoint steps: integer-named folders (Orbax writes `<step>.orbax-checkpoint-tmp*` first)."""
  path = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(path):
    return []
  return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def snapshot(root) -> dict[str, tuple[str, int]]:
  """Relative path -> (sha256 of the bytes, mtime in ns) of every file under `root`."""
  files = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      files[os.path.relpath(path, root)] = (digest, os.stat(path).st_mtime_ns)
  return files


def read_metrics(workdir) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):  # a run that failed before its first logged step
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """One completed tiny run; tests that modify a run folder copy it first (copy2 keeps mtimes)."""
  workdir = tmp_path_factory.mktemp('cli') / 'run'
  result = run_tiny(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def copy_run(source, tmp_path):
  target = tmp_path / 'run'
  shutil.copytree(source, target, copy_function=shutil.copy2)
  return target


# --- flag errors: exit 2, one line, before JAX initialises -------------------------------------------------------


@pytest.mark.parametrize(
  'args, names',
  [
    (('--config=nope', '--workdir={w}'), ('nope', 'synthetic')),
    (('--config=synthetic', '--workdir={w}', '--config.foo=1'), ('foo',)),
    (('--config=synthetic', '--workdir={w}', '--config.k=abc'), ('config.k', 'abc')),
    (('--config=synthetic',), ('--workdir',)),
  ],
  ids=['unknown-preset', 'unknown-field', 'wrong-type', 'missing-workdir'],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, args, names):
  workdir = tmp_path / 'run'
  started = time.monotonic()
  result = run_cli(*(arg.format(w=workdir) for arg in args))
  elapsed = time.monotonic() - started
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip() == error_line(result), 'a flag error prints only the error line'
  for name in names:
    assert name in error_line(result)
  assert elapsed < 15, f'a flag error took {elapsed:.1f}s'
  assert not workdir.exists(), 'a flag error must not create the run folder'


def test_lm_preset_offline_without_weights_names_what_is_missing(tmp_path):
  workdir = tmp_path / 'run'
  started = time.monotonic()
  result = run_cli('--config=pythia160m', f'--workdir={workdir}')
  elapsed = time.monotonic() - started
  assert result.returncode == 2, result.stderr[-3000:]
  line = error_line(result)
  assert 'pythia-160m' in line and 'offline' in line.lower(), line
  assert '--config.model=' in line, 'the message says how to supply a local copy'
  assert elapsed < 30, f'the LM preset took {elapsed:.1f}s to fail'
  assert not workdir.exists(), 'a run that cannot start must not create its folder'


@pytest.mark.parametrize('where', ['under-a-file', 'unknown-scheme'])
def test_unusable_workdir_exits_2_with_one_line(tmp_path, where):
  (tmp_path / 'file').write_text('not a folder')
  workdir = {'under-a-file': tmp_path / 'file' / 'run', 'unknown-scheme': 'ftp://host/run'}[where]
  result = run_tiny(workdir, steps=2)
  assert result.returncode == 2, result.stderr[-3000:]
  assert str(workdir) in error_line(result) and ('--workdir' in error_line(result) or 'gs://' in error_line(result))
  assert (tmp_path / 'file').read_text() == 'not a folder'


# --- a complete run ------------------------------------------------------------------------------------------------


def test_run_folder_layout(finished_run):
  workdir = finished_run
  for name in ('config.json', 'metrics.jsonl', 'summary.json', 'ground_truth.npz'):
    assert (workdir / name).is_file(), name
  with open(workdir / 'config.json') as f:
    config = json.load(f)
  assert config['k'] == 4 and config['num_latents'] == 64 and config['init_seeds'] == list(SEEDS)

  steps = checkpoint_steps(workdir)
  assert steps and steps[-1] == STEPS, steps
  assert (workdir / 'checkpoints' / str(STEPS) / 'state').is_dir()

  records = read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(5, STEPS + 1, 5))
  for record in records:
    assert set(record) == METRIC_KEYS, sorted(record)
    assert record['tokens'] == record['step'] * BATCH
    for key in PER_SEED_KEYS:
      assert len(record[key]) == len(SEEDS), key
      assert np.all(np.isfinite(record[key])), key
    assert record['l0'] == [4.0] * len(SEEDS)  # TopK: exactly k active

  for seed in SEEDS:
    eleuther = workdir / 'saes' / 'synthetic' / f'seed{seed}'
    saelens = workdir / 'saelens' / 'synthetic' / f'seed{seed}'
    with open(eleuther / 'cfg.json') as f:
      cfg = json.load(f)
    assert (cfg['num_latents'], cfg['k'], cfg['d_in']) == (64, 4, 16)
    tensors = load_file(str(eleuther / 'sae.safetensors'))
    assert tensors['W_dec'].shape == (64, 16)
    assert (saelens / 'cfg.json').is_file() and (saelens / 'sae_weights.safetensors').is_file()

  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['step'] == STEPS and summary['seeds'] == list(SEEDS)
  recovery = summary['recovery']
  assert len(recovery['seeds']) == len(SEEDS)
  for entry in recovery['seeds']:
    assert len(entry['best_cos']) == recovery['num_features'] == 64
    assert 0.0 <= entry['recovered_fraction'] <= 1.0


def test_config_mismatch_exits_2_and_leaves_folder_untouched(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  before = snapshot(workdir)
  result = run_tiny(workdir, '--config.k=8')
  assert result.returncode == 2, result.stderr[-3000:]
  line = error_line(result)
  assert 'k: 4 -> 8' in line, line
  assert snapshot(workdir) == before, 'a refused rerun must not touch the run folder'


def test_corrupt_checkpoint_exits_2_and_keeps_everything(finished_run, tmp_path):
  workdir = copy_run(finished_run, tmp_path)
  latest = workdir / 'checkpoints' / str(checkpoint_steps(workdir)[-1])
  corrupted = 0
  for folder, _, names in os.walk(latest / 'state'):
    for name in names:
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(b'garbage')
      corrupted += 1
  assert corrupted
  before = snapshot(workdir)
  result = run_tiny(workdir)  # the identical command: config matches, so the restore is what fails
  assert result.returncode == 2, result.stderr[-3000:]
  line = error_line(result)
  assert str(latest) in line, line
  after = snapshot(workdir)
  # config.json may be rewritten with the same bytes; everything else keeps its bytes and mtime.
  assert after.pop('config.json')[0] == before.pop('config.json')[0]
  assert after == before, 'the corrupt checkpoint, older checkpoints and exports must be left as they were'


# --- non-finite values: exit 1, nothing saved past the failure ---------------------------------------------------


def assert_nothing_saved_past(workdir, failed_step: int) -> None:
  steps = checkpoint_steps(workdir)
  assert all(step < failed_step for step in steps), steps
  if failed_step > 1:  # checkpoint_every=1: the step before the failure was saved and must still be there
    assert steps and steps[-1] == failed_step - 1, steps
  assert not (workdir / 'summary.json').exists()
  assert not (workdir / 'saes').exists()
  for record in read_metrics(workdir):
    assert record['step'] < failed_step
    assert all(np.all(np.isfinite(record[key])) for key in PER_SEED_KEYS)


@pytest.mark.parametrize('noise', ['inf', 'nan'])
def test_non_finite_activations_exit_1(tmp_path, noise):
  workdir = tmp_path / 'run'
  result = run_tiny(
    workdir, f'--config.feature_noise_std={noise}', '--config.checkpoint_every=1', '--config.log_every=1'
  )
  assert result.returncode == 1, result.stderr[-3000:]
  line = error_line(result)
  match = re.search(r'non-finite activations in the batch of step (\d+)', line)
  assert match, line
  assert_nothing_saved_past(workdir, int(match.group(1)))


def test_non_finite_loss_exit_1_names_step_and_seeds(tmp_path):
  workdir = tmp_path / 'run'
  result = run_tiny(workdir, '--config.lr=1e38', '--config.checkpoint_every=1', '--config.log_every=1')
  assert result.returncode == 1, result.stderr[-3000:]
  line = error_line(result)
  match = re.search(r'non-finite loss at step (\d+) for seed\(s\) \[([\d, ]+)\]', line)
  assert match, line
  failed_step = int(match.group(1))
  bad_seeds = [int(seed) for seed in match.group(2).split(',')]
  assert bad_seeds and set(bad_seeds) <= set(SEEDS)
  assert failed_step > 1, 'the first step computes its loss before any update, so it is finite'
  assert_nothing_saved_past(workdir, failed_step)
