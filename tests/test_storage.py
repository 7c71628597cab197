"""Run folders on object storage: `saejax.storage` on local disk and on gs:// (a local GCS emulator), and a whole
run (train, SIGTERM, resume, export, align) against gs:// giving bitwise the SAEs of the same run on disk."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from saejax import formats, storage
from tests import forkserver
from tests.gcs_emulator import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'saejax-test'


@pytest.fixture(scope='module')
def gcs_env():
  with gcs_emulator(BUCKET) as env:
    yield env


@pytest.fixture(params=['local', 'gs'])
def folder(request, tmp_path):
  """A fresh folder path: under tmp_path, or a new prefix in the emulated bucket."""
  if request.param == 'local':
    return str(tmp_path / 'run')
  request.getfixturevalue('gcs_env')
  return f'gs://{BUCKET}/{uuid.uuid4().hex[:8]}/run'


def test_files_round_trip(folder):
  arrays = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.int64(7)}
  storage.write_json(storage.join(folder, 'sub', 'x.json'), {'k': [1, 2]})
  storage.write_npz(storage.join(folder, 'y.npz'), arrays)
  storage.write_text(storage.join(folder, 'z.txt'), 'héllo\n')
  assert storage.read_json(storage.join(folder, 'sub', 'x.json')) == {'k': [1, 2]}
  loaded = storage.read_npz(storage.join(folder, 'y.npz'))
  assert set(loaded) == {'a', 'b'} and np.array_equal(loaded['a'], arrays['a']) and loaded['b'] == 7
  assert storage.read_text(storage.join(folder, 'z.txt')) == 'héllo\n'
  assert storage.listdir(folder) == ['sub', 'y.npz', 'z.txt']
  assert storage.isdir(storage.join(folder, 'sub')) and storage.isfile(storage.join(folder, 'z.txt'))
  assert not storage.exists(storage.join(folder, 'missing')) and storage.listdir(storage.join(folder, 'missing')) == []
  storage.write_json(storage.join(folder, 'sub', 'x.json'), {'k': 3})  # overwrite
  assert storage.read_json(storage.join(folder, 'sub', 'x.json')) == {'k': 3}


def test_append_lines_starts_a_fresh_line_after_a_cut_one(folder):
  path = storage.join(folder, 'log.jsonl')
  storage.append_lines(path, ['{"step": 1}'])
  storage.write_text(path, storage.read_text(path) + '{"step": 2, "cut')  # a kill mid-write
  storage.append_lines(path, ['{"step": 3}', '{"step": 4}'])
  assert storage.read_text(path).splitlines() == ['{"step": 1}', '{"step": 2, "cut', '{"step": 3}', '{"step": 4}']


def test_staged_dir_publishes_whole_folders_and_keeps_the_old_one_on_failure(folder):
  target = storage.join(folder, 'out')
  with storage.staged_dir(target, complete_marker='done.json') as staging:
    os.makedirs(os.path.join(staging, 'pairs'))
    for name in ('pairs/a.npz', 'stale.txt', 'done.json'):
      with open(os.path.join(staging, name), 'w') as f:
        f.write(f'first {name}')
  assert storage.read_text(storage.join(target, 'pairs', 'a.npz')) == 'first pairs/a.npz'
  with storage.staged_dir(target, complete_marker='done.json') as staging:
    for name in ('keep.txt', 'done.json'):
      with open(os.path.join(staging, name), 'w') as f:
        f.write(f'second {name}')
  assert storage.listdir(target) == ['done.json', 'keep.txt']  # the earlier folder's other files are gone
  assert storage.read_text(storage.join(target, 'done.json')) == 'second done.json'
  with pytest.raises(RuntimeError, match='interrupted'), storage.staged_dir(target, 'done.json') as staging:
    with open(os.path.join(staging, 'done.json'), 'w') as f:
      f.write('third')
    raise RuntimeError('interrupted')
  assert storage.read_text(storage.join(target, 'done.json')) == 'second done.json'
  assert not os.path.exists(staging)
  if not storage.is_remote(folder):
    assert sorted(os.listdir(folder)) == ['out']  # no hidden staging or .old folders left beside it


def test_sae_export_round_trips(folder):
  rng = np.random.default_rng(0)
  params = {
    'W_enc': rng.normal(size=(32, 8)),
    'b_enc': rng.normal(size=32),
    'W_dec': rng.normal(size=(32, 8)),
    'b_dec': rng.normal(size=8),
  }
  sizes = {'arch': 'topk', 'k': 4, 'd_in': 8, 'num_latents': 32}
  for save in (formats.save_eleuther, formats.save_saelens):
    where = storage.join(folder, save.__name__)
    save(where, params, **sizes)
    loaded, cfg = formats.load_sae(where)
    assert cfg['arch'] == 'topk' and cfg['k'] == 4
    for name, value in params.items():
      np.testing.assert_array_equal(loaded[name], value.astype(np.float32))


def test_listings_see_files_other_processes_wrote(gcs_env):
  """Another host's writes must show up at once: no fsspec listing cache may hide them."""
  import gcsfs

  folder = f'{BUCKET}/{uuid.uuid4().hex[:8]}'
  storage.write_text(f'gs://{folder}/a.txt', 'a')
  assert storage.listdir(f'gs://{folder}') == ['a.txt'] and not storage.exists(f'gs://{folder}/b.txt')
  other_host = gcsfs.GCSFileSystem(skip_instance_cache=True)
  other_host.pipe(f'{folder}/b.txt', b'b')
  assert storage.listdir(f'gs://{folder}') == ['a.txt', 'b.txt'] and storage.exists(f'gs://{folder}/b.txt')


def test_unusable_storage_is_one_clear_error(monkeypatch):
  with pytest.raises(ValueError, match=r'unsupported storage scheme ftp://'):
    storage.exists('ftp://host/run')
  monkeypatch.setitem(storage._BACKEND_PACKAGES, 's3', ('not_a_real_package_xyz', 's3'))
  with pytest.raises(ValueError, match=r'pip install "saejax\[s3\]"'):
    storage.check_reachable('s3://bucket/run')


# --- a whole run on gs:// -------------------------------------------------------------------------------------

BATCH, STEPS, SEEDS = 128, 60, (0, 1)
TRAIN_FLAGS = (
  '--config=synthetic',
  '--config.d_in=16',
  '--config.num_features=64',
  '--config.num_latents=64',
  '--config.k=4',
  f'--config.batch_size={BATCH}',
  f'--config.num_tokens={BATCH * STEPS}',
  '--config.init_seeds=0,1',
  '--config.checkpoint_every=10',
  '--config.log_every=5',
  '--config.warmup_steps=5',
)
TIMEOUT = 180


def _env(gcs: dict[str, str]) -> dict[str, str]:
  return {**os.environ, **gcs, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


def _run(env, *args) -> subprocess.CompletedProcess:
  result = forkserver.run(
    [sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _stop_after_first_checkpoint(env, workdir: str, log_path) -> None:
  """Starts training, sends SIGTERM once a checkpoint is in the bucket, and checks it stopped cleanly early."""
  with open(log_path, 'w') as log:
    process = forkserver.popen(
      [sys.executable, '-m', 'experiments.train', *TRAIN_FLAGS, f'--workdir={workdir}'],
      cwd=ROOT,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )
  deadline = time.monotonic() + TIMEOUT
  while not any(name.isdigit() for name in storage.listdir(storage.join(workdir, 'checkpoints'))):
    if process.poll() is not None or time.monotonic() > deadline:
      process.kill()
      pytest.fail(f'no checkpoint before the run ended:\n{log_path.read_text()[-3000:]}')
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  assert process.wait(TIMEOUT) == 0, log_path.read_text()[-3000:]
  assert not storage.exists(storage.join(workdir, 'summary.json')), 'the run finished before SIGTERM arrived'


@pytest.mark.slow
def test_train_resume_and_align_on_gcs_match_a_local_run(gcs_env, tmp_path):
  env = _env(gcs_env)
  local, remote = str(tmp_path / 'local'), f'gs://{BUCKET}/{uuid.uuid4().hex[:8]}/run'
  _run(env, 'experiments.train', *TRAIN_FLAGS, f'--workdir={local}')
  _stop_after_first_checkpoint(env, remote, tmp_path / 'stopped.log')
  resumed = _run(env, 'experiments.train', *TRAIN_FLAGS, f'--workdir={remote}')
  assert 'resumed from step' in resumed.stderr

  for seed in SEEDS:
    for layout in ('saes', 'saelens'):
      ours, theirs = (formats.load_sae(f'{root}/{layout}/synthetic/seed{seed}')[0] for root in (remote, local))
      for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f'{layout} seed{seed} {name}')
  metrics = [json.loads(line) for line in storage.read_text(f'{remote}/metrics.jsonl').splitlines()]
  assert [m['step'] for m in metrics] == list(range(5, STEPS + 1, 5))
  assert storage.read_npz(f'{remote}/ground_truth.npz')['features'].shape == (64, 16)

  for workdir in (local, remote):
    _run(env, 'experiments.align', f'--workdir={workdir}', f'--firing_tokens={BATCH * 4}')
  summaries = [storage.read_json(f'{workdir}/alignment/summary.json') for workdir in (remote, local)]
  assert summaries[0]['pairs'] == summaries[1]['pairs']
  assert storage.listdir(f'{remote}/alignment') == sorted(os.listdir(f'{local}/alignment'))
  assert storage.exists(f'{remote}/firing_counts.npz')
