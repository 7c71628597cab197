"""launch/: shellcheck-clean scripts, dry runs that print the right gcloud commands, one-line config errors, and
the worker-side run / status / stop scripts executed locally. Never touches the network: a failing fake gcloud
(and sbatch, srun, ...) is first on PATH and the tests check it was never called."""

import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = [
  'create.sh',
  'setup.sh',
  'sync.sh',
  'run.sh',
  'status.sh',
  'logs.sh',
  'stop.sh',
  'delete.sh',
  'babysit.sh',
  'slurm/submit.sh',
]
ENV_VARS = [
  'PROJECT',
  'ZONE',
  'TPU_NAME',
  'QR_NAME',
  'ACCELERATOR',
  'RUNTIME_VERSION',
  'SPOT',
  'BUCKET',
  'REPO_URL',
  'COMMIT',
  'PYTHON',
  'PYTHON_VERSION',
  'REMOTE_DIR',
  'VENV',
  'JAX_PIP',
  'PIP_EXTRA',
  'NETWORK',
  'SUBNETWORK',
  'SERVICE_ACCOUNT',
  'INTERNAL_IP',
]
COMMIT = '0123456789abcdef0123456789abcdef01234567'
TRAIN = ['python', '-m', 'experiments.train', '--config=pythia160m', '--workdir=gs://b/runs/x']
BASE_ENV = {
  'PROJECT': 'my-proj',
  'ZONE': 'us-east5-a',
  'TPU_NAME': 'sae-pod',
  'ACCELERATOR': 'v5p-64',
  'RUNTIME_VERSION': 'v2-alpha-tpuv5',
  'SPOT': '1',
  'BUCKET': 'gs://b',
  'REPO_URL': 'https://example.com/saejax.git',
  'COMMIT': COMMIT,
}
FAKES = ['gcloud', 'sbatch', 'srun', 'scancel', 'scontrol', 'ssh', 'scp']


@pytest.fixture
def sandbox(tmp_path):
  """Fake, failing cloud and cluster tools first on PATH; fails the test if any of them ran."""
  bin_dir = tmp_path / 'fakebin'
  bin_dir.mkdir()
  called = tmp_path / 'fake-tool-called'
  for tool in FAKES:
    path = bin_dir / tool
    path.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{called}"\necho "fake {tool}: must not run" >&2\nexit 97\n')
    path.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k not in ('DRY_RUN', 'LAUNCH_ENV')}
  env['PATH'] = f'{bin_dir}{os.pathsep}{env.get("PATH", "")}'
  yield tmp_path, env
  assert not called.exists(), 'a cloud tool was executed: ' + called.read_text()


def write_env(directory, **overrides):
  values = {**BASE_ENV, **overrides}
  path = directory / 'launch.env'
  path.write_text(''.join(f'{k}={shlex.quote(v)}\n' for k, v in values.items() if v is not None))
  return str(path)


def launch(sandbox, script, *args, env_file=None, dry=True, launch_dir=LAUNCH, **extra_env):
  tmp, env = sandbox
  env = dict(env, LAUNCH_ENV=env_file or write_env(tmp), **extra_env)
  if dry:
    env['DRY_RUN'] = '1'
  return subprocess.run(
    [os.path.join(launch_dir, script), *args],
    capture_output=True,
    text=True,
    env=env,
    stdin=subprocess.DEVNULL,
    timeout=60,
  )


def commands(stdout):
  """The dry run's printed commands, each split back into its argv."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def remote_command(argv):
  """The --command given to `gcloud compute tpus tpu-vm ssh`, and the bash script inside it."""
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'], argv
  value = next(a for a in argv if a.startswith('--command='))[len('--command=') :]
  words = shlex.split(value)
  assert words[:2] == ['bash', '-c'] and len(words) == 3, value
  return value, words[2]


def ok(result):
  assert result.returncode == 0, result.stdout + result.stderr
  return result


# --- static checks -----------------------------------------------------------------------------------------------


def shell_files():
  found = []
  for folder, _, names in os.walk(LAUNCH):
    found += [os.path.join(folder, n) for n in names if n.endswith(('.sh', '.sbatch')) or n == 'env.example']
  return sorted(found)


def test_every_script_passes_shellcheck():
  shellcheck = shutil.which('shellcheck')
  if shellcheck is None:
    pytest.skip('shellcheck is not installed (apt-get install -y shellcheck); the scripts were not linted')
  result = subprocess.run(
    [shellcheck, '--external-sources', *shell_files()], capture_output=True, text=True, cwd=LAUNCH, timeout=60
  )
  assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_strict_executable_and_have_help(sandbox):
  for script in SCRIPTS + ['common.sh', 'slurm/train.sbatch']:
    text = pathlib.Path(LAUNCH, script).read_text()
    assert 'set -euo pipefail' in text, script
    assert 'pkill' not in text and 'killall' not in text, script
  for script in SCRIPTS:
    assert os.access(os.path.join(LAUNCH, script), os.X_OK), script
    # --help needs no env file.
    result = launch(sandbox, script, '--help', env_file='/nonexistent/env')
    assert result.returncode == 0 and result.stdout.startswith('usage:'), (script, result.stderr)


def test_env_example_holds_every_setting(sandbox):
  text = pathlib.Path(LAUNCH, 'env.example').read_text()
  for var in ENV_VARS:
    assert f'\n{var}=' in text, var
  commands_ = commands(ok(launch(sandbox, 'create.sh', env_file=os.path.join(LAUNCH, 'env.example'))).stdout)
  assert commands_[0][:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create']
  # Its COMMIT is left empty on purpose: nothing syncs before one is pinned.
  result = launch(sandbox, 'sync.sh', env_file=os.path.join(LAUNCH, 'env.example'))
  assert result.returncode == 2 and 'COMMIT' in result.stderr


def test_quoting_round_trips_awkward_arguments():
  awkward = ['plain', '', 'two words', "it's", '"dq"', '$HOME', '`id`', 'a\\b', '*', 'semi;colon', 'é', '--x=a b']
  quoted = subprocess.run(
    ['bash', '-c', 'source launch/common.sh; qjoin "$@"', 'test', *awkward],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=30,
  )
  assert quoted.returncode == 0, quoted.stderr
  assert shlex.split(quoted.stdout) == awkward
  # Newlines and tabs use bash's $'...', so a command stays on one line; bash reads every argument back.
  awkward += ['two\nlines', "tab\tand 'quote'\n\\n"]
  result = subprocess.run(
    [
      'bash',
      '-c',
      'source launch/common.sh; line=$(qjoin "$@"); [[ $line != *$\'\\n\'* ]]; '
      'eval "set -- $line"; printf "%s\\0" "$@"',
      'test',
      *awkward,
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=30,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split('\0')[:-1] == awkward


# --- dry runs ----------------------------------------------------------------------------------------------------


def test_create_prints_queued_resource_request(sandbox):
  (argv,) = commands(ok(launch(sandbox, 'create.sh')).stdout)
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'sae-pod']
  for flag in [
    '--node-id=sae-pod',
    '--accelerator-type=v5p-64',
    '--runtime-version=v2-alpha-tpuv5',
    '--spot',
    '--project=my-proj',
    '--zone=us-east5-a',
  ]:
    assert flag in argv
  tmp, _ = sandbox
  (argv,) = commands(ok(launch(sandbox, 'create.sh', '--dry-run', env_file=write_env(tmp, SPOT='0'), dry=False)).stdout)
  assert '--spot' not in argv and '--accelerator-type=v5p-64' in argv


def test_sync_checks_out_the_pinned_commit_on_all_workers(sandbox):
  (argv,) = commands(ok(launch(sandbox, 'sync.sh')).stdout)
  assert '--worker=all' in argv and 'sae-pod' in argv
  _, script = remote_command(argv)
  assert f'git -c advice.detachedHead=false checkout --quiet --detach {COMMIT}' in script
  assert 'git fetch --quiet origin' in script
  assert 'git clone --quiet https://example.com/saejax.git' in script


@pytest.mark.parametrize('commit', ['main', 'HEAD', '0123456', COMMIT.upper(), ''])
def test_sync_refuses_an_unpinned_commit(sandbox, commit):
  tmp, _ = sandbox
  result = launch(sandbox, 'sync.sh', env_file=write_env(tmp, COMMIT=commit))
  assert result.returncode == 2 and result.stdout == ''
  assert len(result.stderr.strip().splitlines()) == 1 and 'COMMIT' in result.stderr


def git(*args, cwd):
  subprocess.run(
    ['git', '-c', 'user.name=t', '-c', 'user.email=t@example.com', *args],
    cwd=cwd,
    check=True,
    capture_output=True,
    timeout=30,
  )


def test_sync_refuses_a_dirty_commit(sandbox):
  tmp, _ = sandbox
  repo = tmp / 'repo'
  shutil.copytree(LAUNCH, repo / 'launch')
  (repo / 'code.py').write_text('x = 1\n')
  git('init', '-q', cwd=repo)
  git('add', '.', cwd=repo)
  git('commit', '-q', '-m', 'c', cwd=repo)
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True).stdout.strip()
  env_file = write_env(tmp, COMMIT=head)
  ok(launch(sandbox, 'sync.sh', env_file=env_file, launch_dir=str(repo / 'launch')))
  (repo / 'code.py').write_text('x = 2\n')
  result = launch(sandbox, 'sync.sh', env_file=env_file, launch_dir=str(repo / 'launch'))
  assert result.returncode == 2 and result.stdout == ''
  assert len(result.stderr.strip().splitlines()) == 1 and 'uncommitted changes' in result.stderr


def test_run_starts_the_exact_command_on_all_workers(sandbox):
  result = ok(launch(sandbox, 'run.sh', '--name', 'x', '--', *TRAIN))
  (argv,) = commands(result.stdout)
  assert '--worker=all' in argv
  value, script = remote_command(argv)
  assert shlex.join(TRAIN) in value
  assert f'saejax-run {shlex.join(TRAIN)} >> "$log" 2>&1 < /dev/null &' in script
  assert 'setsid nohup' in script
  assert 'log="$dir"/host-"$host".log' in script and 'host=$(hostname)' in script and 'dir="$d"/logs/"$run"' in script
  assert 'pid_file="$dir"/host-"$host".pid' in script and '"$SAEJAX_PID_FILE"' in script
  assert f'!= {COMMIT}' in script  # refuses a worker not at the pinned commit
  assert 'not on gs://' not in result.stderr


def test_run_warns_about_a_local_workdir_and_needs_a_command(sandbox):
  result = ok(launch(sandbox, 'run.sh', '--', 'python', '-m', 'experiments.train', '--workdir=runs/x'))
  assert 'not on gs://' in result.stderr
  result = launch(sandbox, 'run.sh', '--name', 'x')
  assert result.returncode == 2 and 'no command' in result.stderr
  result = launch(sandbox, 'run.sh', '--name', 'a/b', '--', 'true')
  assert result.returncode == 2 and 'run name' in result.stderr


def test_stop_sends_sigterm_to_the_recorded_pid(sandbox):
  (argv,) = commands(ok(launch(sandbox, 'stop.sh', '--name', 'x')).stdout)
  assert '--worker=all' in argv
  _, script = remote_command(argv)
  assert 'pid_file="$dir"/host-"$host".pid' in script and 'pid=$(cat "$pid_file")' in script
  assert 'kill -TERM "$pid"' in script
  assert 'SAEJAX_RUN=${2:-$run}' in script  # only a process of this run
  assert 'kill -KILL' not in script
  (argv,) = commands(ok(launch(sandbox, 'stop.sh', '--name', 'x', '--force', '--worker', '0')).stdout)
  assert '--worker=0' in argv and 'kill -KILL "$pid"' in remote_command(argv)[1]


def test_delete_prints_the_delete_and_refuses_without_yes_off_a_terminal(sandbox):
  (argv,) = commands(ok(launch(sandbox, 'delete.sh')).stdout)
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'sae-pod']
  assert '--force' in argv and '--quiet' in argv and '--zone=us-east5-a' in argv
  result = launch(sandbox, 'delete.sh', dry=False)
  assert result.returncode == 2 and '--yes' in result.stderr and result.stdout == ''


def test_status_and_logs_dry_run(sandbox):
  cmds = commands(ok(launch(sandbox, 'status.sh', '--name', 'x')).stdout)
  assert cmds[0][:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'sae-pod']
  assert 'saejax-job' in remote_command(cmds[1])[1]
  (argv,) = commands(ok(launch(sandbox, 'logs.sh', '--name', 'x', '-n', '5', '--follow')).stdout)
  assert 'tail -n 5 -F "$log"' in remote_command(argv)[1]


def test_babysit_once_recreates_a_preempted_slice_and_reruns_the_command(sandbox):
  result = ok(launch(sandbox, 'babysit.sh', '--name', 'x', '--max-restarts', '1', '--once', '--', *TRAIN))
  cmds = commands(result.stdout)
  lines = [shlex.join(c) for c in cmds]

  def index(fragment):
    return next(i for i, line in enumerate(lines) if fragment in line)

  describe = index('queued-resources describe sae-pod')
  delete = index('queued-resources delete sae-pod')
  create = index('queued-resources create sae-pod')
  sync = index(f'checkout --quiet --detach {COMMIT}')
  setup = index('pip install --quiet -e')
  rerun = index('saejax-run ' + shlex.join(TRAIN))
  assert describe < delete < create < sync < setup < rerun
  assert '--spot' in cmds[create] and '--accelerator-type=v5p-64' in cmds[create]
  assert all('--worker=all' in cmds[i] for i in (sync, setup, rerun))
  assert shlex.join(TRAIN) in remote_command(cmds[rerun])[0]
  assert 'restart 1/1' in result.stderr


def test_babysit_gives_up_after_max_restarts(sandbox):
  result = launch(sandbox, 'babysit.sh', '--name', 'x', '--max-restarts', '0', '--once', '--', *TRAIN)
  assert result.returncode == 1 and 'max-restarts' in result.stderr
  assert not any('create' in c for c in commands(result.stdout))


def test_babysit_leaves_a_running_job_alone(sandbox):
  result = ok(launch(sandbox, 'babysit.sh', '--name', 'x', '--once', '--assume-state', 'ACTIVE', '--', *TRAIN))
  cmds = commands(result.stdout)
  assert len(cmds) == 2 and 'describe' in cmds[0] and 'saejax-job' in remote_command(cmds[1])[1]
  result = launch(sandbox, 'babysit.sh', '--once', '--', *TRAIN)
  assert result.returncode == 2 and '--name' in result.stderr


@pytest.mark.parametrize(
  'script,args',
  [
    ('create.sh', []),
    ('sync.sh', []),
    ('setup.sh', []),
    ('run.sh', ['--', *TRAIN]),
    ('status.sh', []),
    ('logs.sh', []),
    ('stop.sh', []),
    ('delete.sh', []),
    ('babysit.sh', ['--name', 'x', '--once', '--', *TRAIN]),
  ],
)
def test_missing_settings_give_one_line_and_exit_2(sandbox, script, args):
  tmp, _ = sandbox
  result = launch(sandbox, script, *args, env_file=write_env(tmp, PROJECT=None, ZONE=''))
  assert result.returncode == 2 and result.stdout == ''
  (line,) = result.stderr.strip().splitlines()
  assert 'PROJECT' in line and 'ZONE' in line and 'missing' in line
  result = launch(sandbox, script, *args, env_file=str(tmp / 'absent.env'))
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and 'env.example' in result.stderr


def test_bad_settings_give_one_line(sandbox):
  tmp, _ = sandbox
  for bad in [
    {'SPOT': 'maybe'},
    {'ACCELERATOR': 'h100'},
    {'BUCKET': 'my-bucket'},
    {'TPU_NAME': 'My_Pod'},
    {'REMOTE_DIR': '~/saejax'},
  ]:
    result = launch(sandbox, 'create.sh', env_file=write_env(tmp, **bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (bad, result.stderr)
    assert next(iter(bad)) in result.stderr


SCRIPTED_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$GCLOUD_LOG"
case "$*" in
  *"queued-resources describe"*) echo "$QR_STATE" ;;
  *"tpu-vm ssh"*saejax-job*) printf '%b' "$PROBE" ;;
  *"storage ls"*) exit "$SUMMARY_RC" ;;
  *) echo "fake gcloud: ok" ;;
esac
"""


@pytest.mark.parametrize(
  'probe,summary_rc,code,expect,reran',
  [
    ('saejax-job w0 running 11\\nsaejax-job w1 running 12\\n', 1, 0, 'running on 2/2 hosts', False),
    ('saejax-job w0 exited 0\\nsaejax-job w1 exited 0\\n', 0, 0, 'finished on all 2 hosts', False),
    ('saejax-job w0 exited 0\\nsaejax-job w1 exited 0\\n', 1, 0, 'without gs://b/runs/x/summary.json', True),
    ('saejax-job w0 exited 1\\nsaejax-job w1 lost\\n', 1, 1, 'not restarting', False),
    ('saejax-job w0 running 11\\nsaejax-job w1 lost\\n', 1, 0, 'restart 1/3', True),
    ('saejax-job w0 absent\\nsaejax-job w1 absent\\n', 1, 0, 'has not started', True),
  ],
)
def test_babysit_decisions_on_an_active_slice(sandbox, probe, summary_rc, code, expect, reran):
  """Not a dry run: a scripted gcloud answers the state, the workers' probe and the summary.json lookup."""
  tmp, env = sandbox
  scripted = tmp / 'scripted'
  scripted.mkdir()
  (scripted / 'gcloud').write_text(SCRIPTED_GCLOUD)
  (scripted / 'gcloud').chmod(0o755)
  calls = tmp / 'gcloud.log'
  result = subprocess.run(
    [os.path.join(LAUNCH, 'babysit.sh'), '--name', 'x', '--max-restarts', '3', '--once', '--', *TRAIN],
    capture_output=True,
    text=True,
    timeout=60,
    stdin=subprocess.DEVNULL,
    env=dict(
      env,
      PATH=f'{scripted}{os.pathsep}{env["PATH"]}',
      LAUNCH_ENV=write_env(tmp),
      GCLOUD_LOG=str(calls),
      QR_STATE='ACTIVE',
      PROBE=probe,
      SUMMARY_RC=str(summary_rc),
      SSH_AUTH_SOCK='',
    ),
  )
  assert result.returncode == code, result.stderr
  assert expect in result.stderr
  log = calls.read_text()
  assert ('saejax-run ' + shlex.join(TRAIN) in log) == reran, log
  assert 'queued-resources create' not in log and 'queued-resources delete' not in log


# --- the worker side, run locally --------------------------------------------------------------------------------

WORKER_PROGRAM = r"""
import json, signal, sys, time
def on_term(*_):
  print('SIGTERM: checkpoint saved', flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
json.dump(sys.argv[1:], open('argv.json', 'w'))
print('training', flush=True)
while True:
  time.sleep(0.05)
"""


def on_worker(sandbox, script, *args, env_file):
  """Runs what `script` would send to the workers, here, as sshd would (`sh -c COMMAND`)."""
  (argv,) = [c for c in commands(ok(launch(sandbox, script, *args, env_file=env_file)).stdout) if 'ssh' in c]
  value, _ = remote_command(argv)
  return subprocess.run(['sh', '-c', value], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not os.path.isdir('/proc/self') or shutil.which('setsid') is None, reason='needs Linux setsid')
def test_run_status_stop_on_a_local_worker(sandbox):
  tmp, _ = sandbox
  checkout = tmp / 'worker-checkout'
  checkout.mkdir()
  (checkout / 'README').write_text('x\n')
  git('init', '-q', cwd=checkout)
  git('add', '.', cwd=checkout)
  git('commit', '-q', '-m', 'c', cwd=checkout)
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=checkout, capture_output=True, text=True).stdout.strip()
  env_file = write_env(tmp, COMMIT=head, REMOTE_DIR=str(checkout), VENV=str(tmp / 'no-venv'))
  host = socket.gethostname()
  run_dir = checkout / 'logs' / 'r1'
  awkward = ["it's", 'two words', '$HOME', '`id`', '"q"', '--workdir=gs://b/runs/x']
  command = [sys.executable, '-c', WORKER_PROGRAM, *awkward]
  pid = None
  try:
    started = on_worker(sandbox, 'run.sh', '--name', 'r1', '--', *command, env_file=env_file)
    assert started.returncode == 0, started.stderr
    pid = int((run_dir / f'host-{host}.pid').read_text())
    deadline = time.time() + 20
    while not (checkout / 'argv.json').exists() and time.time() < deadline:
      time.sleep(0.05)
    assert json.loads((checkout / 'argv.json').read_text()) == awkward  # every argument arrived intact
    assert os.readlink(checkout / 'logs' / 'latest') == 'r1'

    status = on_worker(sandbox, 'status.sh', '--name', 'r1', env_file=env_file)
    assert f'saejax-job {host} running {pid}' in status.stdout, status.stdout + status.stderr
    again = on_worker(sandbox, 'run.sh', '--name', 'r1', '--', *command, env_file=env_file)
    assert again.returncode == 1 and 'already running' in again.stderr
    other = on_worker(sandbox, 'run.sh', '--name', 'r2', '--', *command, env_file=env_file)
    assert other.returncode == 1 and 'run r1 is still running' in other.stderr
    assert not (checkout / 'logs' / 'r2').exists() or not list((checkout / 'logs' / 'r2').glob('*.pid'))

    stopped = on_worker(sandbox, 'stop.sh', '--wait', '20', env_file=env_file)  # default: logs/latest
    assert stopped.returncode == 0, stopped.stderr
    assert f'sent SIGTERM to pid {pid}' in stopped.stdout and 'exited, code 0' in stopped.stdout
    pid = None
    assert (run_dir / f'host-{host}.rc').read_text().strip() == '0'
    log = (run_dir / f'host-{host}.log').read_text()
    assert 'training' in log and 'SIGTERM: checkpoint saved' in log and f'commit={head}' in log

    status = on_worker(sandbox, 'status.sh', env_file=env_file)
    assert f'saejax-job {host} exited 0' in status.stdout
    logs = on_worker(sandbox, 'logs.sh', '-n', '3', env_file=env_file)
    assert f'[{host}] == ' in logs.stdout and 'exit code 0' in logs.stdout
    # A stale pid file is never trusted: this pid exists but is not a process of run r1.
    (run_dir / f'host-{host}.pid').write_text(f'{os.getpid()}\n')
    stale = on_worker(sandbox, 'stop.sh', '--name', 'r1', env_file=env_file)
    assert stale.returncode == 0 and 'is not running' in stale.stdout
  finally:
    if pid is not None:
      os.kill(pid, signal.SIGKILL)


# --- Slurm -------------------------------------------------------------------------------------------------------


def test_slurm_submit_dry_run_snapshots_and_submits(sandbox):
  tmp, _ = sandbox
  repo = tmp / 'repo'
  shutil.copytree(LAUNCH, repo / 'launch')
  git('init', '-q', cwd=repo)
  git('add', '.', cwd=repo)
  git('commit', '-q', '-m', 'c', cwd=repo)
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True).stdout.strip()
  result = launch(
    sandbox,
    'slurm/submit.sh',
    '--sbatch=--nodes=4',
    '--',
    *TRAIN,
    launch_dir=str(repo / 'launch'),
    SAEJAX_SNAPSHOTS=str(tmp / 'snaps'),
  )
  worktree, sbatch = commands(ok(result).stdout)
  snapshot = str(tmp / 'snaps' / head)
  assert worktree == ['git', '-C', str(repo), 'worktree', 'add', '--detach', snapshot, head]
  assert sbatch == ['sbatch', f'--chdir={snapshot}', '--nodes=4', f'{snapshot}/launch/slurm/train.sbatch', *TRAIN]
  (repo / 'launch' / 'README.md').write_text('edited\n')
  result = launch(sandbox, 'slurm/submit.sh', '--', *TRAIN, launch_dir=str(repo / 'launch'))
  assert result.returncode == 2 and 'uncommitted' in result.stderr


FAKE_SRUN = r"""#!/usr/bin/env bash
out=/dev/null
while [[ $1 == --* ]]; do case $1 in --output=*) out=${1#*=} ;; esac; shift; done
out=${out//%N/node0}; out=${out//%t/0}
"$@" > "$out" 2>&1 &
echo $! > "$FAKE_SLURM/task.pid"
wait $!
"""
SLURM_TASK = r"""
import os, signal, sys, time
def on_term(*_):
  print('SIGTERM: checkpoint saved', flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print('JAX_LOCAL_DEVICE_IDS=' + os.environ.get('JAX_LOCAL_DEVICE_IDS', '-'), flush=True)
while True:
  time.sleep(0.05)
"""


def test_slurm_batch_script_uses_all_gpus_and_requeues_at_the_time_limit(sandbox):
  tmp, env = sandbox
  fake = tmp / 'fakeslurm'
  fake.mkdir()
  (fake / 'srun').write_text(FAKE_SRUN)
  (fake / 'scancel').write_text('#!/usr/bin/env bash\nkill -TERM "$(cat "$FAKE_SLURM/task.pid")"\n')
  (fake / 'scontrol').write_text('#!/usr/bin/env bash\necho "$*" > "$FAKE_SLURM/scontrol"\n')
  for tool in ('srun', 'scancel', 'scontrol'):
    (fake / tool).chmod(0o755)
  work = tmp / 'work'
  work.mkdir()
  env = dict(
    env,
    PATH=f'{fake}{os.pathsep}{env["PATH"]}',
    FAKE_SLURM=str(fake),
    SLURM_JOB_ID='4242',
    SLURM_JOB_NAME='t',
    SLURM_NTASKS_PER_NODE='1',
    CUDA_VISIBLE_DEVICES='0,1,2,3',
  )
  batch = subprocess.Popen(
    ['bash', os.path.join(LAUNCH, 'slurm', 'train.sbatch'), sys.executable, '-c', SLURM_TASK],
    cwd=work,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  task_log = work / 'logs' / 't-4242' / 'host-node0-task-0.log'
  try:
    deadline = time.time() + 20
    while 'JAX_LOCAL_DEVICE_IDS' not in (task_log.read_text() if task_log.exists() else '') and time.time() < deadline:
      time.sleep(0.05)
    assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3' in task_log.read_text()
    batch.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does near the time limit
    out, _ = batch.communicate(timeout=20)
  finally:
    if batch.poll() is None:
      batch.kill()
  assert batch.returncode == 0, out
  assert 'SIGTERM: checkpoint saved' in task_log.read_text()
  assert (fake / 'scontrol').read_text().split() == ['requeue', '4242']
