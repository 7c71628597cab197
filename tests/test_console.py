"""The console a person reads: a run line, one line per checkpoint, the per-seed table and where the files are;
library INFO logs (Orbax, JAX, absl) only with --verbosity."""

import re
import subprocess
import sys

import pytest

from tests.test_resume import FLAGS, ROOT, SEEDS, TIMEOUT, cli_env

pytestmark = pytest.mark.slow
INFO_LINE = re.compile(r'^I\d{4} ')  # absl's INFO prefix: I<mmdd> <time> <thread> <file>:<line>]
QUIET = [*FLAGS, '--config.checkpoint_every=50', '--config.log_every=10']


def run(module, *flags):
  command = [sys.executable, '-m', f'experiments.{module}', *flags]
  result = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  return (result.stdout + result.stderr).splitlines()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('console') / 'run'
  return workdir, run('train', *QUIET, f'--workdir={workdir}')


def test_a_training_run_prints_a_handful_of_lines(trained):
  workdir, lines = trained
  assert not [line for line in lines if INFO_LINE.match(line)], lines
  assert len(lines) <= 8 + len(SEEDS), '\n'.join(lines)
  text = '\n'.join(lines)
  assert f'train topk x {len(SEEDS)} seeds (0-2)' in text and str(workdir) in text
  assert [line.split()[1] for line in lines if line.startswith('checkpoint ')] == ['50/100', '100/100']
  assert re.search(r'^ *seed +fvu +l0 +dead_fraction +recovered$', text, re.M)
  assert sum(bool(re.match(rf'^ +{seed} +0\.\d+', line)) for line in lines for seed in SEEDS) == len(SEEDS)
  assert 'done: 100 steps' in text and f'{workdir}/saes/' in text


def test_verbosity_brings_the_library_logs_back(tmp_path):
  lines = run('train', *QUIET, f'--workdir={tmp_path / "run"}', '--verbosity=0')
  assert sum(bool(INFO_LINE.match(line)) for line in lines) > 20


def test_align_prints_where_its_output_is(trained):
  workdir, _ = trained
  lines = run('align', f'--workdir={workdir}', '--firing_tokens=12800')
  assert not [line for line in lines if INFO_LINE.match(line)], lines
  assert len(lines) <= 5, '\n'.join(lines)
  assert lines[-1].startswith(f'alignment: {workdir}/alignment/')
