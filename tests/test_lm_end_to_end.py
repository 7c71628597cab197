"""The pythia160m preset scaled down, end to end and offline: a tiny random GPT-NeoX in a temp folder, a tiny
locally trained tokenizer and a jsonl corpus, through `experiments.train` and then `experiments.align`."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.tiny_lm import CONTEXT, ROWS, run_cli


@pytest.mark.slow
def test_pythia_preset_scaled_down_trains_and_aligns(tiny_lm_run):
  # tiny_lm_run is `experiments.train` with tiny_train_args, then `experiments.align --firing_tokens=4 batches`.
  workdir = tiny_lm_run
  batch = CONTEXT * ROWS
  summary = json.loads((workdir / 'summary.json').read_text())
  evaluation = summary['lm_eval']
  assert evaluation['tokens'] == batch * 2 and len(evaluation['seeds']) == 3
  for seed in evaluation['seeds']:
    assert np.isfinite(seed['ce']) and seed['kl'] >= 0.0 and 0.0 < seed['fvu'] < 1.0 and seed['l0'] <= 4
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert metrics[-1]['step'] == 40 and np.mean(metrics[-1]['fvu']) < np.mean(metrics[0]['fvu'])
  for seed in (0, 1, 2):
    cfg = json.loads((workdir / 'saes' / 'layers.1.mlp' / f'seed{seed}' / 'cfg.json').read_text())
    assert cfg['d_in'] == 32 and cfg['num_latents'] == 64

  aligned = json.loads((workdir / 'alignment' / 'summary.json').read_text())
  assert len(aligned['pairs']) == 3 and all(p['certified_optimal'] for p in aligned['pairs'])
  with np.load(workdir / 'firing_counts.npz') as firing:
    assert firing['counts'].shape == (3, 64) and int(firing['tokens']) == batch * 4


@pytest.mark.slow
def test_resume_over_a_text_stream_is_bitwise(tiny_lm, tmp_path):
  """Resuming mid-run over a (non random-access) text stream gives bitwise the same SAEs."""
  model, corpus = tiny_lm
  batch = CONTEXT * ROWS
  common = [
    '--config=pythia160m',
    f'--config.model={model}',
    f'--config.dataset={corpus}',
    '--config.hookpoint=layers.0',
    '--config.d_in=32',
    '--config.lm_dtype=float32',
    '--config.num_latents=32',
    '--config.k=4',
    f'--config.context_length={CONTEXT}',
    f'--config.batch_size={batch}',
    f'--config.num_tokens={batch * 12}',
    '--config.init_seeds=0,1',
    '--config.eval_tokens=0',
    '--config.checkpoint_every=4',
  ]
  full, resumed = tmp_path / 'full', tmp_path / 'resumed'
  assert run_cli('experiments.train', f'--workdir={full}', *common).returncode == 0
  # A run killed after its step-8 checkpoint looks like this folder without its last checkpoint and exports.
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '12')
  shutil.rmtree(resumed / 'saes')
  result = run_cli('experiments.train', f'--workdir={resumed}', *common)
  assert result.returncode == 0, result.stderr[-3000:]
  for seed in (0, 1):
    a = load_file(full / 'saes' / 'layers.0' / f'seed{seed}' / 'sae.safetensors')
    b = load_file(resumed / 'saes' / 'layers.0' / f'seed{seed}' / 'sae.safetensors')
    assert all(np.array_equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_two_hookpoints_share_one_forward_and_match_single_runs(tiny_lm, tmp_path):
  model, corpus = tiny_lm
  batch = CONTEXT * ROWS
  common = [
    '--config=pythia160m',
    f'--config.model={model}',
    f'--config.dataset={corpus}',
    '--config.d_in=32',
    '--config.lm_dtype=float32',
    '--config.num_latents=32',
    '--config.k=4',
    f'--config.context_length={CONTEXT}',
    f'--config.batch_size={batch}',
    f'--config.num_tokens={batch * 10}',
    '--config.init_seeds=0,1',
    f'--config.eval_tokens={batch}',
    '--config.lr=3e-3',
    '--config.warmup_steps=2',
  ]
  both, single = tmp_path / 'both', tmp_path / 'single'
  result = run_cli('experiments.train', f'--workdir={both}', *common, '--config.hookpoint=layers.0.mlp,layers.1')
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_cli('experiments.train', f'--workdir={single}', *common, '--config.hookpoint=layers.1')
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((both / 'summary.json').read_text())
  assert set(summary['hookpoints']) == {'layers.0.mlp', 'layers.1'}
  assert all(len(h['lm_eval']['seeds']) == 2 for h in summary['hookpoints'].values())
  records = [json.loads(line) for line in (both / 'metrics.jsonl').read_text().splitlines()]
  assert {r['hookpoint'] for r in records} == {'layers.0.mlp', 'layers.1'}
  for seed in (0, 1):
    a = load_file(both / 'saes' / 'layers.1' / f'seed{seed}' / 'sae.safetensors')
    b = load_file(single / 'saes' / 'layers.1' / f'seed{seed}' / 'sae.safetensors')
    for name in a:
      np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert (both / 'saes' / 'layers.0.mlp' / f'seed{seed}' / 'sae.safetensors').exists()
  args = ['--hookpoint=layers.0.mlp', f'--firing_tokens={batch * 2}', '--nofigures']
  result = run_cli('experiments.align', f'--workdir={both}', *args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (both / 'firing_counts.layers.0.mlp.npz').exists()
  assert json.loads((both / 'alignment' / 'summary.json').read_text())['pairs'][0]['a'] == 'seed0'
  result = run_cli('experiments.align', f'--workdir={both}', '--firing_tokens=0')
  assert result.returncode == 2 and 'choose one with --hookpoint' in result.stderr
