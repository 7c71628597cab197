"""Variants: several settings train beside the seeds in one step, each bitwise the setting trained alone, each
exported, aligned and plotted as if it were its own run."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from saejax import formats, variants
from saejax.train import run_folder
from saejax.train import trainer as trainer_lib
from saejax.train.trainer import train_in_memory
from tests import tracker_files
from tests.test_training import LONG, SINGLE
from tests.tiny_lm import run_cli

BASE = dataclasses.replace(LONG, init_seeds=(3, 0))  # 500 steps of test_training's tiny synthetic SAE


def test_variant_spellings_name_their_settings():
  def names(text, **base):
    return [(v.name, v.overrides) for v in variants.parse(dataclasses.replace(BASE, variants=text, **base))]

  three = [('k=16', (('k', 16),)), ('k=32', (('k', 32),)), ('k=64', (('k', 64),))]
  assert names('k=16,32,64', num_latents=128) == three
  assert [n for n, _ in names('k=8,16;lr=1e-4,3e-4')] == ['k=8,lr=1e-4', 'k=8,lr=3e-4', 'k=16,lr=1e-4', 'k=16,lr=3e-4']
  assert names('arch=topk|arch=relu,l1_coefficient=3') == [
    ('arch=topk', (('arch', 'topk'),)),
    ('arch=relu,l1_coefficient=3', (('arch', 'relu'), ('l1_coefficient', 3.0))),
  ]
  assert names('auxk=true') == [('auxk=true', (('auxk', True),))]
  assert names('') == []
  resolved = dict(variants.resolve(dataclasses.replace(BASE, variants='num_latents=32,128')))
  assert resolved['num_latents=32'].num_latents == 32 and resolved['num_latents=128'].variants == ''


@pytest.mark.parametrize(
  'text,message',
  [
    ('batch_size=128,256', "'batch_size' cannot vary within one run"),
    ('hookpoint=a,b', "'hookpoint' cannot vary"),
    ('k=4,many', "k='many' is not a valid int"),
    ('k', 'is not field=v1,v2'),
    ('k=4;k=8', 'names a field twice'),
    ('k=4|k=4', 'appear more than once'),
    ('k=4,128', 'variant k=128: k=128 must be in'),
    ('arch=sparse', "variant arch=sparse: arch='sparse' is unknown"),
  ],
)
def test_bad_variants_are_one_line_that_says_what_to_change(text, message):
  with pytest.raises(ValueError, match=message) as error:
    dataclasses.replace(BASE, variants=text).validate()
  assert '\n' not in str(error.value)


# Variants of their own programs (k, width, architecture) and variants that share one (the lr and L1 values are
# inputs of the step, so `k=8` and `k=8,lr=3e-3` are one family, as are the two ReLU coefficients).
AMONG = 'k=2|k=8|k=8,lr=3e-3|num_latents=32|arch=relu,l1_coefficient=0.5|arch=relu,l1_coefficient=0.1'
FAMILIES = ['k=2', 'k=8 k=8,lr=3e-3', 'num_latents=32', 'arch=relu,l1_coefficient=0.5 arch=relu,l1_coefficient=0.1']


@pytest.mark.parametrize(
  'among,group',
  [(AMONG, -1), ('k=8|k=8,lr=3e-3|arch=relu,l1_coefficient=0.5|arch=relu,l1_coefficient=0.1', 3)],
)
def test_a_variant_among_others_is_bitwise_the_setting_trained_alone(among, group):
  """Alone, a setting's two seeds fill a group of three with one pad; among its family they share groups with
  another variant's seeds, at other positions. Either way each member's SAE is bitwise the same."""
  config = dataclasses.replace(BASE, variants=among, seed_group_size=group)
  families = trainer_lib.Trainer(config, workdir='', mesh=SINGLE).families
  assert [' '.join(p.name for p in f.variants) for f in families] == [f for f in FAMILIES if f.split()[0] in among]
  trained, trained_history = train_in_memory(config, SINGLE)
  assert list(trained) == among.split('|')
  for name, own in variants.resolve(config):
    alone, alone_history = train_in_memory(own, SINGLE)
    assert len(alone_history) == 500
    for field in alone:
      np.testing.assert_array_equal(trained[name][field], alone[field], err_msg=f'{name} {field}')
    np.testing.assert_array_equal([h['fvu'] for h in trained_history[name]], [h['fvu'] for h in alone_history])
  # The variants really are different SAEs: k shows in L0, the rate and the L1 coefficient in the weights.
  assert not np.allclose(trained['k=8']['W_enc'], trained['k=8,lr=3e-3']['W_enc'], atol=1e-3)
  relu = [trained[f'arch=relu,l1_coefficient={c}'] for c in ('0.5', '0.1')]
  assert not np.allclose(relu[0]['W_enc'], relu[1]['W_enc'], atol=1e-3)
  if 'k=2' in trained:
    assert np.mean(trained_history['k=2'][-1]['l0']) <= 2 < np.mean(trained_history['k=8'][-1]['l0'])
    assert trained['num_latents=32']['W_dec'].shape == (2, 32, 16) and trained['k=8']['W_dec'].shape == (2, 64, 16)


TINY_CLI = [
  '--config=synthetic',
  '--config.d_in=16',
  '--config.num_features=48',
  '--config.num_latents=64',
  '--config.k=4',
  '--config.batch_size=256',
  '--config.num_tokens=10240',
  '--config.init_seeds=0,1',
  '--config.warmup_steps=2',
  '--config.checkpoint_every=20',
]


def test_variants_export_align_and_report_as_their_own_runs(tmp_path):
  workdir = tmp_path / 'run'
  run_flags = [*TINY_CLI, '--config.variants=k=2,8', '--config.tracker=tensorboard']
  trained = run_cli('experiments.train', *run_flags, f'--workdir={workdir}')
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert '2 variants (k=2 | k=8)' in trained.stderr and '<hookpoint>/<variant>/seed<N>/' in trained.stderr
  for variant, k in (('k=2', 2), ('k=8', 8)):
    for seed in (0, 1):
      params, cfg = formats.load_sae(str(workdir / 'saes' / 'synthetic' / variant / f'seed{seed}'))
      lens = json.loads((workdir / 'saelens' / 'synthetic' / variant / f'seed{seed}' / 'cfg.json').read_text())
      assert cfg['k'] == k and lens['d_sae'] == 64 and params['W_dec'].shape == (64, 16)
  summary = json.loads((workdir / 'summary.json').read_text())
  assert sorted(summary['variants']) == ['k=2', 'k=8']
  assert summary['variants']['k=2']['final']['l0'] == [2.0, 2.0]
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {r['variant'] for r in records} == {'k=2', 'k=8'} and len(records) == 2  # the last step, per variant
  with pytest.raises(ValueError, match='several variants'):
    run_folder.exported_sae_dirs(str(workdir))
  assert run_folder.read_seed_stats(str(workdir), variant='k=8')['l0']['mean'] == 8.0

  one = run_cli('experiments.align', f'--workdir={workdir}', '--variant=k=8', '--firing_tokens=2560', '--nofigures')
  assert one.returncode == 0, one.stderr[-3000:]
  aligned = json.loads((workdir / 'alignment' / 'k=8' / 'summary.json').read_text())
  assert [(p['a'], p['b']) for p in aligned['pairs']] == [('seed0', 'seed1')]
  assert not (workdir / 'alignment' / 'k=2').exists()
  every = run_cli('experiments.align', f'--workdir={workdir}', '--firing_tokens=0')
  assert every.returncode == 0 and (workdir / 'alignment' / 'k=2' / 'summary.json').exists()

  # The tracker: one series per variant and seed, and each variant's alignment figures. TensorBoard spells the
  # characters its tags do not allow ('=', ',') as '_': k=2 shows as k_2.
  got = tracker_files.tensorboard_scalars(workdir / 'tensorboard')
  for variant in ('k_2', 'k_8'):
    assert [step for step, _ in got[f'{variant}/lr']] == [40]
    for seed in (0, 1):
      assert [step for step, _ in got[f'synthetic/{variant}/seed{seed}/l0']] == [40]
  assert got['synthetic/k_2/seed1/l0'][0][1] == 2.0 and got['synthetic/k_8/seed1/l0'][0][1] == 8.0
  images = tracker_files.tensorboard_tags(workdir / 'tensorboard', 'image')
  assert {'alignment/k_2/fig1', 'alignment/k_8/fig1'} <= images, images
  unknown = run_cli('experiments.align', f'--workdir={workdir}', '--variant=k=5')
  assert unknown.returncode == 2 and unknown.stderr.count('\n') == 1 and 'choose one of k=2, k=8' in unknown.stderr

  refused = run_cli('experiments.interpret', f'--workdir={workdir}', '--base_url=http://127.0.0.1:9/v1', '--model=m')
  assert refused.returncode == 2 and refused.stderr.count('\n') == 1 and 'trained variants' in refused.stderr

  # Resume: the run as it stood after its first checkpoint (step 20 of 40), rerun, ends bitwise the same.
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns('40', 'saes', 'saelens', 'summary.json'))
  again = run_cli('experiments.train', *run_flags, f'--workdir={resumed}')
  assert again.returncode == 0 and 'resumed from step 20' in again.stderr, again.stderr[-3000:]
  for variant in ('k=2', 'k=8'):
    for seed in (0, 1):
      expected = formats.load_sae(str(workdir / 'saes' / 'synthetic' / variant / f'seed{seed}'))[0]
      actual = formats.load_sae(str(resumed / 'saes' / 'synthetic' / variant / f'seed{seed}'))[0]
      for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=f'{variant} seed{seed} {name}')


def test_a_variant_that_cannot_share_the_step_is_refused_at_the_command_line(tmp_path):
  result = run_cli('experiments.train', *TINY_CLI, f'--workdir={tmp_path / "run"}', '--config.variants=d_in=8,16')
  assert result.returncode == 2 and result.stderr.count('error:') == 1 and "'d_in' cannot vary" in result.stderr
  assert not (tmp_path / 'run').exists()
