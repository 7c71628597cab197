"""The activation cache: written once from the tiny random GPT-NeoX over the jsonl corpus, read back exactly,
resumed after a kill to the same bytes, read in a fixed order by the cache source, trained from (and resumed
exactly), split over hosts, and refused with one line when it does not fit the config."""

import dataclasses
import hashlib
import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import presets
from saejax import models
from saejax import sharding as shd
from saejax.data import cache as cache_lib
from saejax.data import cache_writer
from saejax.data.cache_source import CacheActivationSource
from saejax.data.text import TextTokenStream
from saejax.train import trainer
from tests.tiny_lm import CONTEXT, ROWS
from tests.tiny_lm import run_cli as run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = CONTEXT * ROWS
HOOKPOINTS = ('layers.0.mlp', 'layers.1')
CACHE_BATCHES = 6  # 3 shards of 2 batches (the last one written alone in the resume test)


def lm_config(model, corpus, **overrides):
  fields = dict(
    model=str(model),
    dataset=str(corpus),
    hookpoint=','.join(HOOKPOINTS),
    d_in=32,
    lm_dtype='float32',
    context_length=CONTEXT,
    batch_size=BATCH,
    num_tokens=BATCH * 4,
    num_latents=32,
    k=4,
    init_seeds=(0, 1),
    lr=3e-3,
    warmup_steps=2,
    eval_tokens=0,
  )
  return dataclasses.replace(presets.pythia160m(), **{**fields, **overrides})


def cache_config(model, corpus, folder, **overrides):
  return lm_config(model, corpus, source='cache', dataset=str(folder), **overrides)


@pytest.fixture(scope='module')
def lm(tiny_lm):
  model_dir, corpus = tiny_lm
  mesh = shd.make_mesh()
  return model_dir, corpus, models.load_pretrained(str(model_dir), dtype=jnp.float32, mesh=mesh), mesh


@pytest.fixture(scope='module')
def caches(lm, tmp_path_factory):
  """{dtype: folder} of the same 6-batch, two-hookpoint cache in float32 and bfloat16."""
  model_dir, corpus, model, mesh = lm
  root = tmp_path_factory.mktemp('caches')
  folders = {}
  for dtype in ('float32', 'bfloat16'):
    folders[dtype] = root / dtype
    summary = cache_writer.write_cache(
      lm_config(model_dir, corpus),
      str(folders[dtype]),
      BATCH * CACHE_BATCHES + 5,
      dtype,
      shard_tokens=BATCH * 2,
      progress=False,
      mesh=mesh,
      model=model,
    )
    assert summary['status'] == 'written' and summary['tokens'] == BATCH * CACHE_BATCHES and summary['shards'] == 3
  return folders


def file_hashes(root) -> dict[str, str]:
  hashes = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        hashes[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return hashes


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_cached_values_are_the_model_activations_of_the_text_stream(lm, caches, dtype):
  model_dir, corpus, model, _ = lm
  folder = caches[dtype]
  meta = json.loads((folder / 'cache.json').read_text())
  assert meta['hookpoints'] == list(HOOKPOINTS) and meta['d_in'] == 32 and meta['tokens'] == BATCH * CACHE_BATCHES
  assert meta['shard_tokens'] == BATCH * 2 and meta['num_shards'] == 3 and meta['dtype'] == dtype
  assert len(meta['fingerprint']) == 64 and meta['model_identity'] and meta['dataset_identity']['files']
  assert (folder / 'COMPLETE').is_file()
  stream = TextTokenStream(str(corpus), str(model_dir), ROWS, CONTEXT, process_index=0, process_count=1)
  for shard in range(3):
    tokens = np.load(folder / 'tokens' / f'shard_{shard:05d}.npy', mmap_mode='r')
    assert tokens.dtype == np.int32 and tokens.shape == (2 * ROWS, CONTEXT)
    stored = {h: np.load(folder / h / f'shard_{shard:05d}.npy', mmap_mode='r') for h in HOOKPOINTS}
    for b in range(2):
      tokens_BxT = stream.batch_at(shard * 2 + b)
      np.testing.assert_array_equal(tokens[b * ROWS : (b + 1) * ROWS], tokens_BxT)
      expected = model.activations(tokens_BxT, list(HOOKPOINTS))  # one forward, both hookpoints
      for h in HOOKPOINTS:
        want_NxD = np.asarray(expected[h]).reshape(-1, 32)
        got_NxD = stored[h][b * BATCH : (b + 1) * BATCH]
        if dtype == 'bfloat16':
          assert got_NxD.dtype == np.uint16
          got_NxD = got_NxD.view(ml_dtypes.bfloat16)
          want_NxD = want_NxD.astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(got_NxD, np.float32), np.asarray(want_NxD, np.float32))


def test_a_killed_writer_resumes_to_identical_bytes_and_a_complete_cache_is_left_alone(
  lm, caches, tmp_path, monkeypatch
):
  model_dir, corpus, model, mesh = lm
  folder = tmp_path / 'killed'

  class KilledError(Exception):
    pass

  def kill_after_first(index):
    if index == 0:
      raise KilledError

  def write(**kwargs):
    return cache_writer.write_cache(
      lm_config(model_dir, corpus),
      str(folder),
      BATCH * CACHE_BATCHES,
      'bfloat16',
      shard_tokens=BATCH * 2,
      progress=False,
      mesh=mesh,
      model=model,
      **kwargs,
    )

  with pytest.raises(KilledError):
    write(on_shard=kill_after_first)
  assert (folder / 'layers.1' / 'shard_00000.npy').is_file() and not (folder / 'layers.1' / 'shard_00001.npy').exists()
  assert not (folder / 'COMPLETE').exists()
  with pytest.raises(ValueError, match='half-written'):
    cache_lib.open_cache(str(folder))
  # The text stream restores from progress.json instead of replaying from the first document.
  replays = []
  original = TextTokenStream._restart
  monkeypatch.setattr(TextTokenStream, '_restart', lambda self, d, o: (replays.append((d, o)), original(self, d, o))[1])
  summary = write()
  monkeypatch.undo()
  assert summary['status'] == 'resumed' and summary['tokens_written'] == BATCH * 4
  assert replays[-1] != (0, 0), replays
  reference = file_hashes(caches['bfloat16'])
  resumed = file_hashes(folder)
  shards = {k: v for k, v in reference.items() if k.endswith('.npy')}
  assert len(shards) == 9 and all(resumed[k] == v for k, v in shards.items())
  before = {p: os.stat(folder / p).st_mtime_ns for p in resumed}
  assert write()['status'] == 'complete'
  assert {p: os.stat(folder / p).st_mtime_ns for p in resumed} == before


def test_order_is_a_fixed_permutation_per_epoch_and_a_prefix(caches):
  folder = caches['float32']
  sharding = shd.batch_sharding(shd.make_mesh())
  model, corpus = 'unused', 'unused'

  def source(**overrides):
    config = cache_config(model, corpus, folder, **overrides)
    config.model = json.loads((folder / 'cache.json').read_text())['model']
    return CacheActivationSource(config, sharding)

  short, long = source(num_tokens=BATCH * 2), source(num_tokens=BATCH * 12, cache_epochs=2)
  for p in range(2):
    for a, b in zip(short.batches_at(p), long.batches_at(p)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ids = np.concatenate([long.sequences_at(p) for p in range(12)])
  num = CACHE_BATCHES * ROWS
  assert sorted(ids[:num]) == list(range(num)) and sorted(ids[num:]) == list(range(num))
  assert not np.array_equal(ids[:num], ids[num:]), 'each epoch has its own permutation'
  assert not np.array_equal(ids[:num], np.arange(num)), 'the cache order is shuffled'
  other = source(num_tokens=BATCH * 2, data_seed=1)
  assert not np.array_equal(other.sequences_at(0), short.sequences_at(0))
  # A batch is the cache rows of its sequences; a doubled batch is two consecutive batches.
  stored = np.concatenate([np.load(folder / 'layers.1' / f'shard_{i:05d}.npy') for i in range(3)])
  tokens = np.concatenate([np.load(folder / 'tokens' / f'shard_{i:05d}.npy') for i in range(3)])
  got = np.asarray(long.batches_at(7)[1]).reshape(ROWS, CONTEXT, 32)
  np.testing.assert_array_equal(got, stored.reshape(-1, CONTEXT, 32)[long.sequences_at(7)])
  np.testing.assert_array_equal(long.token_batch(7), tokens[long.sequences_at(7)])
  wide = source(num_tokens=BATCH * 2, batch_size=BATCH * 2)
  np.testing.assert_array_equal(wide.sequences_at(1), np.concatenate([short.sequences_at(2), short.sequences_at(3)]))
  assert np.asarray(wide.batches_at(0)[0]).dtype == np.float32 and wide.batches_at(0)[0].sharding == sharding
  for dtype in ('float32', 'bfloat16'):
    cached = caches[dtype]
    src = CacheActivationSource(dataclasses.replace(short.config, dataset=str(cached)), sharding)
    np.testing.assert_allclose(np.asarray(src.batch_at(3)), np.asarray(short.batch_at(3)), rtol=1e-2, atol=1e-3)


def test_each_host_reads_its_rows_and_the_stack_is_the_single_host_batch(caches):
  folder = caches['bfloat16']
  config = cache_config('x', 'x', folder, num_tokens=BATCH * 4)
  config.model = json.loads((folder / 'cache.json').read_text())['model']
  sharding = shd.batch_sharding(shd.make_mesh())
  single = CacheActivationSource(config, sharding, process_index=0, process_count=1)
  for count in (2, 4):
    hosts = [CacheActivationSource(config, sharding, process_index=i, process_count=count) for i in range(count)]
    for position in (0, 5, 9):
      assert all(len(h.sequences_at(position)) == ROWS // count for h in hosts)
      for index, expected in enumerate(single.host_batches_at(position)):
        stacked = np.concatenate([h.host_batches_at(position)[index] for h in hosts])
        assert stacked.shape == (BATCH, 32)
        np.testing.assert_array_equal(stacked.view(np.uint16), np.asarray(expected).view(np.uint16))
      np.testing.assert_array_equal(
        np.concatenate([h.token_batch(position) for h in hosts]), single.token_batch(position)
      )


def test_training_from_the_cache_resumes_exactly_and_evaluates_on_held_out_text(lm, caches, tmp_path, capsys):
  model_dir, corpus, _, _ = lm
  config = cache_config(
    model_dir,
    corpus,
    caches['float32'],
    hookpoint='layers.1',
    num_tokens=BATCH * 6,
    checkpoint_every=3,
    eval_tokens=BATCH,
  )
  source = CacheActivationSource(config, shd.batch_sharding(shd.make_mesh()))
  assert 'model' not in source.__dict__, 'the LM is loaded only for the final evaluation'
  # The held-out text is the batch right after the cache's six.
  stream = TextTokenStream(str(corpus), str(model_dir), ROWS, CONTEXT, process_index=0, process_count=1)
  np.testing.assert_array_equal(source.held_out_tokens()[0], stream.batch_at(CACHE_BATCHES))

  full, resumed = tmp_path / 'full', tmp_path / 'resumed'
  assert trainer.train(dataclasses.replace(config), str(full)).status == 'completed'
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '6')
  shutil.rmtree(resumed / 'saes')
  (resumed / 'summary.json').unlink()
  capsys.readouterr()
  assert trainer.train(dataclasses.replace(config), str(resumed)).status == 'completed'
  assert 'resumed from step 3' in capsys.readouterr().err
  for seed in (0, 1):
    a = load_file(full / 'saes' / 'layers.1' / f'seed{seed}' / 'sae.safetensors')
    b = load_file(resumed / 'saes' / 'layers.1' / f'seed{seed}' / 'sae.safetensors')
    assert all(np.array_equal(a[name], b[name]) for name in a)
  summary = json.loads((full / 'summary.json').read_text())
  assert summary['lm_eval']['tokens'] == BATCH and len(summary['lm_eval']['seeds']) == 2
  assert summary['lm_eval'] == json.loads((resumed / 'summary.json').read_text())['lm_eval']
  # The same steps from the cache in memory give the same SAEs (the source, not the run folder, fixes the order).
  params, _ = trainer.train_in_memory(dataclasses.replace(config, eval_tokens=0))
  a = load_file(full / 'saes' / 'layers.1' / 'seed1' / 'sae.safetensors')
  np.testing.assert_array_equal(np.asarray(params['W_dec'][1]), a['W_dec'])


def test_bad_caches_are_refused_at_start(lm, caches, tmp_path):
  model_dir, corpus, _, _ = lm
  sharding = shd.batch_sharding(shd.make_mesh())
  good = caches['float32']

  def make(folder=good, **overrides):
    overrides = {'model': model_dir, **overrides}
    return CacheActivationSource(cache_config(overrides.pop('model'), corpus, folder, **overrides), sharding)

  make()
  cases = [
    ({'model': str(tmp_path)}, 'model='),
    ({'hookpoint': 'layers.2'}, "no hookpoint 'layers.2'"),
    ({'context_length': CONTEXT + 1, 'batch_size': (CONTEXT + 1) * ROWS}, 'context_length=17'),
    ({'d_in': 64}, 'd_in=32'),
    ({'num_tokens': BATCH * (CACHE_BATCHES + 1)}, 'holds 816'),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      make(**overrides)
  make(num_tokens=BATCH * (CACHE_BATCHES + 1), cache_epochs=2)
  damaged = tmp_path / 'damaged'
  shutil.copytree(good, damaged)
  shard = damaged / 'layers.1' / 'shard_00001.npy'
  shard.write_bytes(shard.read_bytes()[:-4])
  with pytest.raises(ValueError, match='shard_00001.npy has'):
    make(damaged)
  shard.unlink()
  with pytest.raises(ValueError, match='shard_00001.npy is missing'):
    make(damaged)
  (damaged / 'COMPLETE').unlink()
  with pytest.raises(ValueError, match='half-written'):
    make(damaged)
  with pytest.raises(FileNotFoundError, match='no activation cache'):
    make(tmp_path / 'nothing')


# --- through the CLIs: exit 2, one `error:` line, nothing overwritten --------------------------------------------


def error_line(result) -> str:
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return lines[0]


def cache_args(model, corpus, out, *extra):
  return [
    '--config=pythia160m',
    f'--out={out}',
    f'--tokens={BATCH * CACHE_BATCHES}',
    '--dtype=float32',
    f'--shard_tokens={BATCH * 2}',
    f'--config.model={model}',
    f'--config.dataset={corpus}',
    f'--config.hookpoint={",".join(HOOKPOINTS)}',
    '--config.lm_dtype=float32',
    f'--config.context_length={CONTEXT}',
    f'--config.batch_size={BATCH}',
    *extra,
  ]


@pytest.mark.slow
def test_cache_cli_completes_refuses_another_fingerprint_and_leaves_a_complete_cache(lm, caches, tmp_path):
  model_dir, corpus, _, _ = lm
  folder = tmp_path / 'copy'
  shutil.copytree(caches['float32'], folder)
  before = {p: (h, os.stat(folder / p).st_mtime_ns) for p, h in file_hashes(folder).items()}
  result = run('experiments.cache', *cache_args(model_dir, corpus, folder))
  assert result.returncode == 0 and 'already a complete cache' in result.stdout, result.stderr[-3000:]
  for extra in (['--config.hookpoint=layers.0.mlp'], ['--dtype=bfloat16'], ['--config.exclude_special_tokens=true']):
    assert 'different fingerprint' in error_line(
      run('experiments.cache', *cache_args(model_dir, corpus, folder), *extra)
    )
  assert {p: (h, os.stat(folder / p).st_mtime_ns) for p, h in file_hashes(folder).items()} == before
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  assert 'holds no cache.json' in error_line(run('experiments.cache', *cache_args(model_dir, corpus, other)))
  assert os.listdir(other) == ['notes.txt']
  fresh = tmp_path / 'fresh'
  result = run(
    'experiments.cache', *cache_args(model_dir, corpus, fresh, '--tokens=300', '--config.hookpoint=layers.0')
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'written' in result.stdout and 'tokens/s' in result.stdout and 'tok/s' in result.stderr
  assert json.loads((fresh / 'cache.json').read_text())['tokens'] == BATCH * 2 and (fresh / 'COMPLETE').exists()


@pytest.mark.slow
def test_train_cli_refuses_a_cache_that_does_not_fit(lm, caches, tmp_path):
  model_dir, corpus, _, _ = lm
  half, damaged = tmp_path / 'half', tmp_path / 'damaged'
  shutil.copytree(caches['float32'], half)
  (half / 'COMPLETE').unlink()
  shutil.copytree(caches['float32'], damaged)
  shard = damaged / 'layers.1' / 'shard_00002.npy'
  shard.write_bytes(shard.read_bytes()[:-1])
  common = [
    '--config=pythia160m',
    '--config.source=cache',
    f'--config.model={model_dir}',
    '--config.hookpoint=layers.1',
    '--config.d_in=32',
    '--config.lm_dtype=float32',
    f'--config.context_length={CONTEXT}',
    f'--config.batch_size={BATCH}',
    f'--config.num_tokens={BATCH * 4}',
    '--config.num_latents=32',
    '--config.k=4',
    '--config.eval_tokens=0',
  ]
  good = f'--config.dataset={caches["float32"]}'
  cases = [
    ([good, '--config.hookpoint=layers.2'], 'no hookpoint'),
    ([good, '--config.d_in=16'], 'd_in=32'),
    ([good, f'--config.num_tokens={BATCH * 7}'], 'cache_epochs=1'),
    ([good, f'--config.model={tmp_path}'], 'was written with model='),
    ([good, f'--config.context_length={CONTEXT - 1}', f'--config.batch_size={(CONTEXT - 1) * ROWS}'], 'context_length'),
    ([f'--config.dataset={half}'], 'half-written'),
    ([f'--config.dataset={damaged}'], 'shard_00002.npy has'),
  ]
  for extra, message in cases:
    workdir = tmp_path / f'run{len(extra)}{len(message)}'
    assert message in error_line(run('experiments.train', *common, f'--workdir={workdir}', *extra))
    assert not (workdir / 'checkpoints').exists()
  assert not (half / 'COMPLETE').exists()
