"""Multi-host training on one machine: `experiments.train` as 2 processes x 4 CPU devices (jax.distributed, gloo
collectives, a coordinator on 127.0.0.1) must export the same SAEs as 1 process x 8 devices on the same 4x2 mesh,
with one set of run files written by process 0; a SIGTERM to one host must stop every host at the same step, with
the run folder on gs:// (an in-memory GCS server on 127.0.0.1, as on a pod) and resume from there.

Every process gets a deadline: a hung collective fails the test and kills all processes instead of hanging CI.
The start-up rules of `saejax.distributed` (no-op, explicit, detected cluster) are checked in-process, without
starting anything.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from saejax import distributed, storage
from tests import forkserver
from tests.gcs_emulator import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
BATCH, STEPS = 256, 10
TINY = (
  '--config=synthetic',
  '--config.d_in=16',
  '--config.num_features=48',
  '--config.num_latents=64',
  '--config.k=4',
  f'--config.batch_size={BATCH}',
  f'--config.init_seeds={",".join(map(str, SEEDS))}',
  '--config.mesh_data=4',
  '--config.mesh_model=2',
  '--config.log_every=5',
  '--config.checkpoint_every=5',
)
DEADLINE_S = 150
# Cluster variables of a CI runner would make the single-process reference auto-initialise jax.distributed.
_CLUSTER_ENV_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'SAEJAX_', 'TPU_')


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def env_with_devices(count: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_ENV_PREFIXES)}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={count}', HF_HUB_OFFLINE='1')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return env


class Processes:
  """Started `experiments.train` processes, each logging to its own file; every one still running when a wait
  overruns, or when the test ends (the `processes` fixture), is killed."""

  def __init__(self, log_dir):
    self.log_dir = log_dir
    self.running: dict[str, tuple[subprocess.Popen, object]] = {}

  def start(self, name: str, args: list[str], devices: int) -> subprocess.Popen:
    log = open(self.log_dir / f'{name}.log', 'w')  # noqa: SIM115 - closed by kill()
    proc = forkserver.popen(
      [sys.executable, '-m', 'experiments.train', *args],
      cwd=ROOT,
      env=env_with_devices(devices),
      stdout=log,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.running[name] = (proc, log)
    return proc

  def log(self, name: str) -> str:
    return (self.log_dir / f'{name}.log').read_text()

  def fail(self, what: str) -> None:
    self.kill()
    tails = '\n'.join(f'--- {name} ---\n{self.log(name)[-2000:]}' for name in self.running)
    pytest.fail(f'{what}; all processes killed\n{tails}')

  def wait(self, deadline_s: float = DEADLINE_S) -> dict[str, int]:
    """Exit codes of the processes started since the last wait."""
    deadline = time.monotonic() + deadline_s
    for name, (proc, _) in self.running.items():
      try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.fail(f'{name} still running after {deadline_s}s (a hung collective?)')
    codes = {name: proc.returncode for name, (proc, _) in self.running.items()}
    self.kill()
    self.running.clear()
    return codes

  def wait_for(self, condition, what: str, deadline_s: float = DEADLINE_S) -> None:
    """Polls `condition` while every process is alive."""
    deadline = time.monotonic() + deadline_s
    while not condition():
      if time.monotonic() > deadline or any(proc.poll() is not None for proc, _ in self.running.values()):
        self.fail(f'{what} did not happen')
      time.sleep(0.2)

  def kill(self) -> None:
    """Kills (by handle) the processes this object started that are still running, and closes the logs."""
    for proc, log in self.running.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()


@pytest.fixture
def processes(tmp_path):
  procs = Processes(tmp_path)
  yield procs
  procs.kill()


def multihost_args(workdir, port: int, process_id: int, num_processes: int = 2) -> list[str]:
  return [
    f'--workdir={workdir}',
    f'--coordinator_address=127.0.0.1:{port}',
    f'--num_processes={num_processes}',
    f'--process_id={process_id}',
    f'--coordinator_bind_address=127.0.0.1:{port}',
  ]


def run_files(workdir) -> set[str]:
  """Every file of a run folder outside checkpoints/ (whose Orbax internals name the writing processes)."""
  files = set()
  for folder, _, names in os.walk(workdir):
    rel = os.path.relpath(folder, workdir)
    if rel.split(os.sep)[0] != 'checkpoints':
      files |= {os.path.normpath(os.path.join(rel, name)) for name in names}
  return files


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(name) for name in storage.listdir(storage.join(workdir, 'checkpoints')) if name.isdigit())


def read_metrics(workdir) -> list[dict]:
  """Complete lines only: process 0 may be appending while a test polls."""
  path = storage.join(workdir, 'metrics.jsonl')
  lines = storage.read_text(path).splitlines(keepends=True) if storage.exists(path) else []
  return [json.loads(line) for line in lines if line.endswith('\n') and line.strip()]


def assert_same_saes(a, b) -> None:
  for seed in SEEDS:
    left = load_file(a / 'saes' / 'synthetic' / f'seed{seed}' / 'sae.safetensors')
    right = load_file(b / 'saes' / 'synthetic' / f'seed{seed}' / 'sae.safetensors')
    assert left.keys() == right.keys()
    for name in left:
      np.testing.assert_allclose(left[name], right[name], rtol=1e-4, atol=1e-5, err_msg=f'seed{seed} {name}')


@pytest.fixture
def clean_env(monkeypatch):
  for name in list(os.environ):
    if name.startswith(_CLUSTER_ENV_PREFIXES):
      monkeypatch.delenv(name)
  return monkeypatch


def test_initialize_is_a_no_op_for_one_process(clean_env):
  assert distributed.detect_cluster() is None
  assert distributed.initialize() is False
  assert distributed.initialize('127.0.0.1:1234', num_processes=1, process_id=0) is False
  clean_env.setenv('SAEJAX_NUM_PROCESSES', '1')
  assert distributed.initialize() is False and not jax.distributed.is_initialized()


def test_initialize_refuses_incomplete_settings(clean_env):
  with pytest.raises(ValueError, match='needs a coordinator'):
    distributed.initialize(num_processes=2, process_id=0)
  clean_env.setenv('SAEJAX_COORDINATOR', '127.0.0.1:1234')
  with pytest.raises(ValueError, match='--num_processes and --process_id'):
    distributed.initialize(num_processes=2)
  clean_env.setenv('SAEJAX_PROCESS_ID', 'one')
  with pytest.raises(ValueError, match='SAEJAX_PROCESS_ID'):
    distributed.initialize(num_processes=2)
  assert not jax.distributed.is_initialized()


def test_cluster_detection(clean_env):
  slurm = {
    'SLURM_JOB_ID': '7',
    'SLURM_STEP_NODELIST': 'node[1-2]',
    'SLURM_NTASKS': '2',
    'SLURM_PROCID': '0',
    'SLURM_LOCALID': '0',
  }
  for name, value in slurm.items():
    clean_env.setenv(name, value)
  assert distributed.detect_cluster() == 'slurm'
  clean_env.setenv('SLURM_NTASKS', '1')  # a one-task job is a single process
  assert distributed.detect_cluster() is None
  clean_env.setenv('OMPI_MCA_orte_hnp_uri', '1531576320.0;tcp://10.96.0.1:34911')
  clean_env.setenv('OMPI_COMM_WORLD_SIZE', '4')
  assert distributed.detect_cluster() == 'openmpi'
  clean_env.delenv('OMPI_MCA_orte_hnp_uri')
  clean_env.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1')
  clean_env.setenv('JAX_PLATFORMS', 'cpu')  # CPU on a TPU VM stays one process
  assert distributed.detect_cluster() is None
  clean_env.setenv('JAX_PLATFORMS', 'tpu')
  assert distributed.detect_cluster() == 'tpu'


@pytest.mark.slow
def test_cli_num_processes_without_coordinator_exits_2(tmp_path):
  workdir = tmp_path / 'run'
  result = forkserver.run(
    [sys.executable, '-m', 'experiments.train', *TINY, f'--workdir={workdir}', '--num_processes=2', '--process_id=0'],
    cwd=ROOT,
    env=env_with_devices(4),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().startswith('error: multi-host start-up failed') and 'coordinator' in result.stderr
  assert 'Traceback' not in result.stderr and not workdir.exists()


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, processes):
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  port = free_port()
  tokens = f'--config.num_tokens={BATCH * STEPS}'
  for process_id in (0, 1):
    processes.start(f'host{process_id}', [*TINY, tokens, *multihost_args(multi, port, process_id)], devices=4)
  processes.start('single', [*TINY, tokens, f'--workdir={single}'], devices=8)
  codes = processes.wait()
  assert codes == {'host0': 0, 'host1': 0, 'single': 0}, {n: processes.log(n)[-3000:] for n in codes}

  assert_same_saes(multi, single)
  # One set of files: the same layout as the single-process run, no leftover temporaries, each step logged once.
  assert run_files(multi) == run_files(single)
  assert not [name for name in run_files(multi) if '.tmp' in name]
  metrics, reference = read_metrics(multi), read_metrics(single)
  assert [m['step'] for m in metrics] == [m['step'] for m in reference] == [5, 10]
  for got, want in zip(metrics, reference):
    np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-4, atol=1e-6)
  assert checkpoint_steps(multi) == [5, 10]
  summary = json.loads((multi / 'summary.json').read_text())
  assert summary['step'] == STEPS and len(summary['recovery']['seeds']) == len(SEEDS)
  # Process 1 ran the same program but logged nothing of its own.
  assert 'jax.distributed: process 1 of 2' in processes.log('host1')
  assert 'done: 10 steps' in processes.log('host0') and 'done:' not in processes.log('host1')
  assert 'checkpoint 10/10' in processes.log('host0') and 'checkpoint 10/10' not in processes.log('host1')


def start_pair(processes: Processes, args: list[str], workdir, run: str) -> list[subprocess.Popen]:
  port = free_port()
  return [processes.start(f'{run}{i}', [*args, *multihost_args(workdir, port, i)], devices=4) for i in (0, 1)]


@pytest.fixture
def gcs_workdir():
  """A fresh run folder in an emulated bucket; the server's address reaches the hosts through the environment."""
  with gcs_emulator('multihost') as _:
    yield f'gs://multihost/{uuid.uuid4().hex[:8]}/run'


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_the_same_step_and_resumes(gcs_workdir, processes):
  workdir = gcs_workdir
  tokens = f'--config.num_tokens={BATCH * 100_000}'  # far more than the test runs: each run ends by SIGTERM
  args = [*TINY, tokens, '--config.checkpoint_every=100000']

  hosts = start_pair(processes, args, workdir, 'first')
  processes.wait_for(lambda: read_metrics(workdir), 'a first logged step')
  hosts[1].send_signal(signal.SIGTERM)  # only process 1 is told; the preemption service tells process 0
  codes = processes.wait()
  assert codes == {'first0': 0, 'first1': 0}, {n: processes.log(n)[-3000:] for n in codes}
  (stopped,) = checkpoint_steps(workdir)
  assert f'stopped by SIGTERM at step {stopped}' in processes.log('first0')
  assert not storage.exists(storage.join(workdir, 'summary.json'))

  # The same command resumes on both hosts from that checkpoint; this time process 0 gets the SIGTERM.
  hosts = start_pair(processes, args, workdir, 'second')
  processes.wait_for(lambda: any(m['step'] > stopped for m in read_metrics(workdir)), 'a logged step after resume')
  hosts[0].send_signal(signal.SIGTERM)
  codes = processes.wait()
  assert codes == {'second0': 0, 'second1': 0}, {n: processes.log(n)[-3000:] for n in codes}
  assert f'resumed from step {stopped}' in processes.log('second0')
  steps = checkpoint_steps(workdir)
  assert len(steps) == 2 and steps[0] == stopped < steps[1]
  logged = [m['step'] for m in read_metrics(workdir)]
  assert logged == list(range(5, logged[-1] + 1, 5)), 'each logged step once, by process 0'
