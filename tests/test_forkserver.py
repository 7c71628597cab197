"""tests/forkserver.py: a forked CLI child behaves as `python -m module` would, for everything the tests look at."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import forkserver

PROBE = """
import atexit, json, os, sys
import jax
atexit.register(lambda: print('atexit ran', flush=True))
print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'path0': sys.path[0], 'env': os.environ.get('PROBE'),
                  'devices': jax.device_count(), 'pid': os.getpid(), 'name': __name__}))
print('to stderr', file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def _env(**extra):
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', **extra}


@pytest.fixture
def modules(tmp_path):
  (tmp_path / 'probe.py').write_text(PROBE)
  (tmp_path / 'raiser.py').write_text('raise ValueError("boom")\n')
  (tmp_path / 'sleeper.py').write_text('import time\nprint("up", flush=True)\ntime.sleep(60)\n')
  (tmp_path / 'quitter.py').write_text('import sys\nsys.exit("a message")\n')
  return tmp_path


def test_a_child_gets_its_argv_cwd_env_devices_and_exit_status(modules):
  env = _env(PROBE='x', XLA_FLAGS='--xla_force_host_platform_device_count=3')
  result = forkserver.run(
    [sys.executable, '-m', 'probe', '3', 'b'], cwd=modules, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 3, result.stderr
  first, second = result.stdout.splitlines()
  seen = json.loads(first)
  assert seen['argv'] == ['3', 'b'] and seen['cwd'] == str(modules) == seen['path0']
  assert seen['env'] == 'x' and seen['name'] == '__main__'
  assert seen['devices'] == 3  # the child's XLA_FLAGS, not the server's or this process's 8
  assert seen['pid'] not in (os.getpid(), forkserver._servers[forkserver._signature(env)].process.pid)
  assert second == 'atexit ran' and result.stderr == 'to stderr\n'


def test_exceptions_and_exit_messages_end_as_in_python(modules):
  raised = forkserver.run([sys.executable, '-m', 'raiser'], cwd=modules, env=_env(), capture_output=True, text=True)
  assert raised.returncode == 1
  assert 'Traceback' in raised.stderr and raised.stderr.splitlines()[-1] == 'ValueError: boom'
  quit_ = forkserver.run([sys.executable, '-m', 'quitter'], cwd=modules, env=_env(), capture_output=True, text=True)
  assert (quit_.returncode, quit_.stderr) == (1, 'a message\n')


def test_signals_reach_the_child_and_a_timeout_kills_it(modules, tmp_path):
  with open(tmp_path / 'log', 'w') as log:
    child = forkserver.popen(
      [sys.executable, '-m', 'sleeper'], cwd=modules, env=_env(), stdout=log, stderr=subprocess.STDOUT
    )
  assert isinstance(child, forkserver.Popen)
  deadline = time.monotonic() + 60
  while 'up' not in (tmp_path / 'log').read_text():
    assert child.poll() is None and time.monotonic() < deadline
    time.sleep(0.05)
  child.send_signal(signal.SIGTERM)
  assert child.wait(30) == -signal.SIGTERM
  with pytest.raises(subprocess.TimeoutExpired):
    forkserver.run([sys.executable, '-m', 'sleeper'], cwd=modules, env=_env(), capture_output=True, timeout=1)


def test_anything_else_runs_as_a_plain_subprocess(modules):
  assert isinstance(forkserver.popen(['true']), subprocess.Popen)
  piped = forkserver.popen([sys.executable, '-m', 'raiser'], cwd=modules, env=_env(), stderr=subprocess.PIPE)
  assert isinstance(piped, subprocess.Popen)
  piped.communicate()
  assert piped.returncode == 1
