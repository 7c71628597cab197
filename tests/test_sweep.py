"""Sweeps build the paper's run matrices; a sweep runs locally end to end and `experiments.figures` plots it."""

import json
import os
import sys

import pytest

from experiments.ablations import SWEEPS
from tests import forkserver
from tests.tiny_lm import CLI_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = CLI_ENV


def run(module, *args):
  return forkserver.run(
    [sys.executable, '-m', module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
  )


def test_every_sweep_prints_a_train_and_an_align_command_per_run():
  expected_values = {'fig4_latents': 'num_latents', 'fig4_k': 'k', 'fig4_tokens': 'num_tokens'}
  for name, runs in SWEEPS.items():
    result = run('experiments.sweep', f'--sweep={name}', '--root=gs://bucket/runs')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 * len(runs)
    assert all('experiments.train' in line for line in lines[::2])
    assert all(line.startswith('python -m experiments.align --workdir=gs://bucket/runs/') for line in lines[1::2])
    if name in expected_values:
      assert all(f'--config.{expected_values[name]}=' in line for line in lines[::2])
  aligned = run('experiments.sweep', '--sweep=fig4_k', '--align=--firing_tokens=0').stdout.splitlines()[1::2]
  assert aligned and all(line.endswith(' --firing_tokens=0') for line in aligned)
  layers = run('experiments.sweep', '--sweep=fig5_layers').stdout
  assert all(f'--config.hookpoint=layers.{i}.mlp' in layers for i in range(12))
  assert run('experiments.sweep', '--sweep=nope').returncode == 2


# fig5_arch's three runs, made tiny by training on synthetic data instead of GPT-2.
SYNTHETIC_SETS = [
  'source=synthetic',
  'hookpoint=synthetic',
  'd_in=16',
  'num_features=32',
  'num_latents=32',
  'k=4',
  'batch_size=256',
  'num_tokens=5120',
  'init_seeds=0,1',
  'warmup_steps=2',
  'lr=3e-3',
]


@pytest.mark.slow
def test_architecture_sweep_runs_locally_and_plots(tmp_path):
  # Synthetic activations (SYNTHETIC_SETS): the sweep's plumbing, not the LM's, which tiny_lm_run covers.
  root = tmp_path / 'runs'
  result = run(
    'experiments.sweep',
    '--sweep=fig5_arch',
    '--mode=local',
    f'--root={root}',
    *[f'--set={item}' for item in SYNTHETIC_SETS],
    '--align=--firing_tokens=2560',  # Fig. 3's firing counts from 10 batches, not the default million tokens
    '--align=--nofigures',  # each run's PNGs: tests/test_align_cli.py; here the sweep's fig5 is what is drawn
  )
  assert result.returncode == 0, result.stderr[-3000:]
  for arch in ('topk', 'gated', 'relu'):
    config = json.loads((root / 'fig5_arch' / arch / 'config.json').read_text())
    assert config['arch'] == arch and config['num_latents'] == 32
    assert (root / 'fig5_arch' / arch / 'alignment' / 'summary.json').exists()
  result = run('experiments.figures', f'--root={root}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert (root / 'figures' / 'fig5.png').read_bytes()[:4] == b'\x89PNG'
  plotted = json.loads((root / 'figures' / 'figures.json').read_text())['results']['fig5_arch']
  assert [r['run'] for r in plotted] == ['topk', 'gated', 'relu']
  assert all(0.0 <= r['shared_fraction'] <= 1.0 for r in plotted)


FAKE_BABYSIT = """#!/usr/bin/env bash
# Stands in for the slice: records how it was called, then runs the command here (python: this interpreter).
printf '%s\\n' "$*" >> "$CALLS"
while [[ $1 != -- ]]; do shift; done
shift
[[ $1 == python ]] || exit 3
shift
[[ -z ${FAIL_ON:-} || " $* " != *"$FAIL_ON"* ]] || exit 1
exec "$PYTHON" "$@"
"""


@pytest.mark.slow
def test_pod_sweep_babysits_each_run_in_turn_and_skips_finished_ones(tmp_path):
  launch_dir = tmp_path / 'launch'
  launch_dir.mkdir()
  (launch_dir / 'babysit.sh').write_text(FAKE_BABYSIT)
  (launch_dir / 'babysit.sh').chmod(0o755)
  calls, root = tmp_path / 'calls', tmp_path / 'runs'
  env = {**ENV, 'CALLS': str(calls), 'PYTHON': sys.executable}
  args = [
    sys.executable,
    '-m',
    'experiments.sweep',
    '--sweep=fig5_arch',
    '--mode=pod',
    f'--root={root}',
    f'--launch_dir={launch_dir}',
    '--babysit=--max-restarts=3',
    *[f'--set={item}' for item in SYNTHETIC_SETS],
    '--align=--firing_tokens=2560',
    '--align=--nofigures',
  ]

  def sweep(**extra_env):
    return forkserver.run(args, cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True, timeout=900)

  failed = sweep(FAIL_ON='--config.arch=gated')
  assert failed.returncode == 1 and 'gated failed' in failed.stderr and 'rerun the sweep' in failed.stderr
  assert 'not gs://' in failed.stderr
  assert (root / 'fig5_arch' / 'topk' / 'alignment' / 'summary.json').exists()
  assert not (root / 'fig5_arch' / 'relu').exists()  # runs go in turn: nothing after the failure started
  first = calls.read_text().splitlines()
  assert [line.split()[1] for line in first] == ['fig5_arch.topk', 'fig5_arch.gated']
  assert all(line.split()[2:4] == ['--max-restarts=3', '--'] for line in first)
  assert all(f'--workdir={root}/fig5_arch/' in line for line in first)

  result = sweep()
  assert result.returncode == 0, result.stderr[-3000:]
  again = calls.read_text().splitlines()[len(first) :]
  assert [line.split()[1] for line in again] == ['fig5_arch.gated', 'fig5_arch.relu']  # topk was done
  for arch in ('topk', 'gated', 'relu'):
    assert json.loads((root / 'fig5_arch' / arch / 'config.json').read_text())['arch'] == arch
    assert (root / 'fig5_arch' / arch / 'alignment' / 'summary.json').exists()
  assert json.loads(result.stdout)['runs'][-1] == f'{root}/fig5_arch/relu'


def test_a_one_step_sweep_is_one_run_with_a_variant_per_setting():
  lines = run('experiments.sweep', '--sweep=fig4_k', '--one-step', '--root=r').stdout.strip().splitlines()
  assert lines == [
    "python -m experiments.train --config=pythia160m --workdir=r/fig4_k/one_step '--config.variants=k=16|k=32|k=64|"
    "k=128|k=256'",
    'python -m experiments.align --workdir=r/fig4_k/one_step',
  ]
  refused = run('experiments.sweep', '--sweep=fig4_tokens', '--one-step')
  assert refused.returncode == 2 and refused.stderr.count('error:') == 1 and 'varies num_tokens' in refused.stderr


@pytest.mark.slow
def test_one_step_sweep_trains_every_setting_beside_the_others_and_plots(tmp_path):
  root = tmp_path / 'runs'
  args = ['--sweep=fig5_arch', '--one-step', '--mode=local', f'--root={root}', '--align=--firing_tokens=2560']
  args.append('--align=--nofigures')
  result = run('experiments.sweep', *args, *[f'--set={item}' for item in SYNTHETIC_SETS])
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = root / 'fig5_arch' / 'one_step'
  assert json.loads(result.stdout)['runs'] == [str(workdir)]
  names = ['arch=topk', 'arch=gated,l1_coefficient=3.0,lr=2e-4', 'arch=relu,l1_coefficient=3.0,lr=2e-4']
  assert sorted(json.loads((workdir / 'summary.json').read_text())['variants']) == sorted(names)
  for name, arch in zip(names, ('topk', 'gated', 'relu')):
    cfg = json.loads((workdir / 'saes' / 'synthetic' / name / 'seed1' / 'cfg.json').read_text())
    assert cfg['arch'] == arch
    assert (workdir / 'alignment' / name / 'summary.json').exists()
  plotted = run('experiments.figures', f'--root={root}')
  assert plotted.returncode == 0, plotted.stderr[-3000:]
  rows = json.loads((root / 'figures' / 'figures.json').read_text())['results']['fig5_arch']
  assert [(r['run'], r['value']) for r in rows] == [('topk', 'topk'), ('gated', 'gated'), ('relu', 'relu')]
  assert all(0.0 <= r['shared_fraction'] <= 1.0 and r['pairs'] == 1 for r in rows)


def test_pod_sweep_needs_the_launch_scripts(tmp_path):
  result = run('experiments.sweep', '--sweep=fig4_k', '--mode=pod', f'--launch_dir={tmp_path}')
  assert result.returncode == 2 and result.stderr.count('error:') == 1 and 'babysit.sh' in result.stderr
