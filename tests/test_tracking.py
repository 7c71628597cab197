"""Experiment tracking: TensorBoard and wandb (offline) get one series per seed, the config, the summary and the
alignment figures; a stopped or killed run resumes into the same tracker run and every step arrives exactly once."""

import json
import os
import signal
import subprocess
import sys

import pytest

from saejax.train import tracking
from tests import forkserver, tracker_files
from tests.test_resume import (
  BATCH,
  FLAGS,
  PER_SEED_KEYS,
  ROOT,
  SEEDS,
  STEPS,
  TIMEOUT,
  cli_env,
  read_metrics,
  wait_for_first_checkpoint,
)

pytestmark = pytest.mark.slow


def train(workdir, *extra, env=None):
  command = [sys.executable, '-m', 'experiments.train', *FLAGS, f'--workdir={workdir}', *extra]
  result = forkserver.run(command, cwd=ROOT, env=env or cli_env(), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def align(workdir, env=None):
  command = [sys.executable, '-m', 'experiments.align', f'--workdir={workdir}', f'--firing_tokens={BATCH * 20}']
  result = forkserver.run(command, cwd=ROOT, env=env or cli_env(), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]


def interrupt(workdir, tmp_path, how, *extra, env=None):
  """Starts the run, interrupts it after its first checkpoint, and reruns it to the end."""
  log_path = tmp_path / 'first.log'
  command_env = env or cli_env()
  command = [sys.executable, '-m', 'experiments.train', *FLAGS, f'--workdir={workdir}', *extra]
  with open(log_path, 'w') as log:
    process = forkserver.popen(command, cwd=ROOT, env=command_env, stdout=log, stderr=subprocess.STDOUT)
  wait_for_first_checkpoint(workdir, process, log_path)
  process.send_signal(how)
  process.wait(timeout=TIMEOUT)
  assert os.path.isfile(workdir / 'summary.json') is False, 'the run finished before it was interrupted'
  return train(workdir, *extra, env=command_env)


def expected_series(workdir):
  """metrics.jsonl as {tag: [(step, value)]}, the tags the trackers use."""
  series = {}
  for record in read_metrics(workdir):
    for tag, value in tracking.scalars(record, SEEDS).items():
      series.setdefault(tag, []).append((record['step'], value))
  return series


def test_tensorboard_gets_every_step_once_across_a_kill(tmp_path):
  workdir = tmp_path / 'tb'
  interrupt(workdir, tmp_path, signal.SIGKILL, '--config.tracker=tensorboard')
  align(workdir)
  got = tracker_files.tensorboard_scalars(workdir / 'tensorboard')
  want = expected_series(workdir)
  assert set(want) <= set(got) and f'synthetic/seed{SEEDS[-1]}/fvu' in got
  for tag, points in want.items():
    assert [step for step, _ in got[tag]] == [step for step, _ in points], tag  # each logged step once, in order
    for (_, value), (_, expected) in zip(got[tag], points):
      assert value == pytest.approx(expected, rel=1e-6), tag
  assert {'config/text_summary', 'summary/text_summary'} <= tracker_files.tensorboard_tags(
    workdir / 'tensorboard', 'tensor'
  )
  images = tracker_files.tensorboard_tags(workdir / 'tensorboard', 'image')
  assert {'alignment/fig1', 'alignment/fig3'} <= images, images


def test_wandb_offline_run_resumes_under_one_id_without_duplicates(tmp_path):
  pytest.importorskip('wandb')
  env = {**cli_env(), 'WANDB_MODE': 'offline', 'WANDB_SILENT': 'true'}
  workdir = tmp_path / 'wb'
  interrupt(workdir, tmp_path, signal.SIGTERM, '--config.tracker=wandb', env=env)
  align(workdir, env=env)
  run_id = json.loads((workdir / 'tracker.json').read_text())['run_id']
  runs = tracker_files.wandb_runs(workdir, run_id)
  assert len(runs) == 3  # the stopped run, its resumption and the alignment, all under one id
  rows = [row for run in runs for row in run['history'] if 'lr' in row]
  steps = [row['_step'] for row in rows]
  want = expected_series(workdir)
  assert steps == [step for step, _ in want['lr']] and len(steps) == len(set(steps))
  for row in rows:
    for name in PER_SEED_KEYS:
      for seed in SEEDS:
        tag = f'synthetic/seed{seed}/{name}'
        assert row[tag] == pytest.approx(dict(want[tag])[row['_step']], rel=1e-6), (row['_step'], tag)
  assert runs[0]['config']['init_seeds'] == list(SEEDS) and runs[0]['config']['tracker'] == 'wandb'
  summary = {key: value for run in runs for key, value in run['summary'].items()}
  assert f'final/fvu/{len(SEEDS) - 1}' in summary and 'step' in summary
  images = {key.split('/')[1] for run in runs for row in run['history'] for key in row if key.startswith('alignment/')}
  assert {'fig1', 'fig3'} <= images
  assert max(steps) == STEPS


def test_records_after_the_last_step_sent_are_the_only_ones_sent(tmp_path):
  sent = []

  class Recorder(tracking.Tracker):
    def log(self, records):
      sent.extend(r['step'] for r in records)

  recorder = Recorder()
  recorder.workdir = str(tmp_path)
  records = [{'step': step} for step in (3, 6, 9)]
  recorder.send(records[:2])
  recorder.send(records)  # a resumed run sends what its checkpoint covers again
  assert sent == [3, 6, 9]
  assert json.loads((tmp_path / tracking.STATE_FILE).read_text())['sent_step'] == 9


def test_unknown_tracker_is_bad_input(tmp_path):
  command = [
    sys.executable,
    '-m',
    'experiments.train',
    *FLAGS,
    f'--workdir={tmp_path / "x"}',
    '--config.tracker=mlflow',
  ]
  result = forkserver.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: tracker='mlflow'")
