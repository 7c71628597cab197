"""Round trips through the EleutherAI and SAELens layouts, the peers' own loaders, and load errors."""

import json
import os

# SAELens imports huggingface_hub, which must not reach for the network in tests.
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from saejax import formats, sae

D, F, K = 16, 64, 4
DIMS = {'k': K, 'd_in': D, 'num_latents': F}
SAVERS = {'eleuther': formats.save_eleuther, 'saelens': formats.save_saelens}


def random_params(arch, seed=0):
  rng = np.random.default_rng(seed)
  W_dec_FxD = rng.normal(size=(F, D)).astype(np.float32)
  params = {
    'W_enc': (rng.normal(size=(F, D)) * 0.3).astype(np.float32),
    'b_enc': (rng.normal(size=F) * 0.1).astype(np.float32),
    'W_dec': W_dec_FxD / np.linalg.norm(W_dec_FxD, axis=-1, keepdims=True),
    'b_dec': (rng.normal(size=D) * 0.1).astype(np.float32),
  }
  if arch == 'gated':
    params['r_mag'] = (rng.normal(size=F) * 0.1).astype(np.float32)
    params['b_mag'] = (rng.normal(size=F) * 0.1).astype(np.float32)
  elif arch == 'jumprelu':
    params['threshold'] = rng.uniform(0.01, 0.3, size=F).astype(np.float32)
  elif arch in ('batchtopk', 'matryoshka'):
    params['threshold'] = np.asarray(0.15, np.float32)
  return params


def batch(seed=1, n=32):
  return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def saejax_recon(arch, params, x_BxD):
  spec = sae.SaeSpec(arch=arch, d_in=D, num_latents=F, k=K)
  jparams = {name: jnp.asarray(value) for name, value in params.items()}
  z_BxF = sae.get(arch).encode(jparams, jnp.asarray(x_BxD), spec)
  return np.asarray(z_BxF @ jparams['W_dec'] + jparams['b_dec'])


@pytest.mark.parametrize('layout', list(SAVERS))
@pytest.mark.parametrize('arch', formats.ARCHS)
def test_round_trip_is_exact(tmp_path, arch, layout):
  params = random_params(arch)
  SAVERS[layout](tmp_path / 'sae', params, arch=arch, **DIMS)
  loaded, cfg = formats.load_sae(tmp_path / 'sae')
  assert {name: cfg[name] for name in ('arch', 'k', 'd_in', 'num_latents')} == {'arch': arch, **DIMS}
  assert cfg['format'] == layout
  assert sorted(loaded) == sorted(params)
  for name, value in params.items():
    assert loaded[name].dtype == np.float32 and loaded[name].shape == value.shape, name
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_extra_cfg_is_kept(tmp_path):
  params = random_params('topk')
  formats.save_eleuther(tmp_path / 'e', params, arch='topk', **DIMS, extra_cfg={'hookpoint': 'layers.3'})
  formats.save_saelens(tmp_path / 's', params, arch='topk', **DIMS, hook_name='h.3', extra_cfg={'model_name': 'm'})
  assert formats.load_sae(tmp_path / 'e')[1]['file_cfg']['hookpoint'] == 'layers.3'
  metadata = formats.load_sae(tmp_path / 's')[1]['file_cfg']['metadata']
  assert metadata['model_name'] == 'm' and metadata['hook_name'] == 'h.3'
  with pytest.raises(ValueError, match='extra_cfg'):
    formats.save_eleuther(tmp_path / 'x', params, arch='topk', **DIMS, extra_cfg={'k': 8})


def test_overwrite_replaces_export_and_leaves_no_temp_folders(tmp_path):
  formats.save_eleuther(tmp_path / 'sae', random_params('topk', seed=0), arch='topk', **DIMS)
  second = random_params('gated', seed=5)
  formats.save_saelens(tmp_path / 'sae', second, arch='gated', **DIMS)
  loaded, cfg = formats.load_sae(tmp_path / 'sae')
  assert cfg['arch'] == 'gated' and cfg['format'] == 'saelens'
  np.testing.assert_array_equal(loaded['W_enc'], second['W_enc'])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['sae']


def test_interrupted_export_keeps_previous_folder(tmp_path, monkeypatch):
  first = random_params('topk', seed=0)
  formats.save_eleuther(tmp_path / 'sae', first, arch='topk', **DIMS)

  def crash(tensors, filename, metadata=None):
    with open(filename, 'wb') as f:
      f.write(b'half a file')
    raise KeyboardInterrupt

  monkeypatch.setattr(formats, 'save_file', crash)
  with pytest.raises(KeyboardInterrupt):
    formats.save_eleuther(tmp_path / 'sae', random_params('topk', seed=3), arch='topk', **DIMS)
  with pytest.raises(KeyboardInterrupt):
    formats.save_eleuther(tmp_path / 'fresh', first, arch='topk', **DIMS)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['sae']
  np.testing.assert_array_equal(formats.load_sae(tmp_path / 'sae')[0]['W_enc'], first['W_enc'])


def test_old_sparsify_cfg_loads(tmp_path):
  params = random_params('topk')
  formats.save_eleuther(tmp_path / 'sae', params, arch='topk', **DIMS)
  cfg_path = tmp_path / 'sae' / 'cfg.json'
  # sparsify <= 1.0 wrote `signed` and neither `activation` nor `arch`.
  old = {'expansion_factor': F // D, 'normalize_decoder': True, 'num_latents': 0, 'k': K, 'signed': False, 'd_in': D}
  cfg_path.write_text(json.dumps(old))
  loaded, cfg = formats.load_sae(tmp_path / 'sae')
  assert cfg['arch'] == 'topk' and cfg['num_latents'] == F
  np.testing.assert_array_equal(loaded['W_dec'], params['W_dec'])


def test_sparsify_loads_eleuther_export(tmp_path):
  sparsify = pytest.importorskip('sparsify')
  torch = pytest.importorskip('torch')
  params = random_params('topk')
  formats.save_eleuther(tmp_path / 'sae', params, arch='topk', **DIMS, extra_cfg={'hookpoint': 'layers.0'})
  coder = sparsify.SparseCoder.load_from_disk(tmp_path / 'sae', device='cpu')
  assert coder.cfg.k == K and coder.num_latents == F
  x_BxD = batch()
  with torch.no_grad():
    enc = coder.encode(torch.from_numpy(x_BxD))
    theirs = coder.decode(enc.top_acts, enc.top_indices).numpy()
  np.testing.assert_allclose(theirs, saejax_recon('topk', params, x_BxD), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('arch', ['relu', 'gated', 'batchtopk'])
def test_sparsify_refuses_non_topk_export(tmp_path, arch):
  sparsify = pytest.importorskip('sparsify')
  formats.save_eleuther(tmp_path / 'sae', random_params(arch), arch=arch, **DIMS)
  with pytest.raises(TypeError, match='Literal'):
    sparsify.SparseCoder.load_from_disk(tmp_path / 'sae', device='cpu')


@pytest.fixture(scope='module')
def sae_lens():
  return pytest.importorskip('sae_lens')


@pytest.mark.parametrize('arch', formats.ARCHS)
def test_saelens_loads_saelens_export(tmp_path, sae_lens, arch):
  import torch

  params = random_params(arch)
  formats.save_saelens(tmp_path / 'sae', params, arch=arch, **DIMS, hook_name='blocks.0.hook_resid_post')
  model = sae_lens.SAE.load_from_disk(str(tmp_path / 'sae'), device='cpu')
  expected_class = {'topk': 'TopKSAE', 'relu': 'StandardSAE', 'gated': 'GatedSAE'}.get(arch, 'JumpReLUSAE')
  assert type(model).__name__ == expected_class
  assert model.cfg.metadata.hook_name == 'blocks.0.hook_resid_post'
  x_BxD = batch()
  with torch.no_grad():
    z_BxF = model.encode(torch.from_numpy(x_BxD))
    theirs = model.decode(z_BxF).numpy()
  assert (z_BxF > 0).any(), 'test params should make some latents fire'
  np.testing.assert_allclose(theirs, saejax_recon(arch, params, x_BxD), atol=1e-5, rtol=1e-5)


def test_saelens_resave_loads_back(tmp_path, sae_lens):
  params = random_params('batchtopk')
  formats.save_saelens(tmp_path / 'ours', params, arch='batchtopk', **DIMS)
  sae_lens.SAE.load_from_disk(str(tmp_path / 'ours'), device='cpu').save_model(str(tmp_path / 'theirs'))
  loaded, cfg = formats.load_sae(tmp_path / 'theirs')
  assert cfg['arch'] == 'batchtopk' and cfg['k'] == K
  for name, value in params.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_missing_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='no SAE folder'):
    formats.load_sae(tmp_path / 'nope')


def test_folder_without_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither sae.safetensors'):
    formats.load_sae(tmp_path)


def test_missing_cfg(tmp_path):
  formats.save_eleuther(tmp_path / 'sae', random_params('topk'), arch='topk', **DIMS)
  (tmp_path / 'sae' / 'cfg.json').unlink()
  with pytest.raises(FileNotFoundError, match='cfg.json is missing'):
    formats.load_sae(tmp_path / 'sae')


@pytest.mark.parametrize('layout', list(SAVERS))
def test_corrupt_safetensors(tmp_path, layout):
  SAVERS[layout](tmp_path / 'sae', random_params('relu'), arch='relu', **DIMS)
  weights = next((tmp_path / 'sae').glob('*.safetensors'))
  weights.write_bytes(weights.read_bytes()[:100])
  with pytest.raises(ValueError, match='cannot read .*corrupt'):
    formats.load_sae(tmp_path / 'sae')


def test_corrupt_cfg(tmp_path):
  formats.save_saelens(tmp_path / 'sae', random_params('relu'), arch='relu', **DIMS)
  (tmp_path / 'sae' / 'cfg.json').write_text('{"d_in": 16,')
  with pytest.raises(ValueError, match='cannot parse'):
    formats.load_sae(tmp_path / 'sae')


def test_nan_weights_refused_on_save_and_load(tmp_path):
  params = random_params('jumprelu')
  params['W_dec'][3, 2] = np.nan
  with pytest.raises(ValueError, match="'W_dec' has 1 non-finite"):
    formats.save_saelens(tmp_path / 'sae', params, arch='jumprelu', **DIMS)
  assert not (tmp_path / 'sae').exists()
  formats.save_eleuther(tmp_path / 'sae', random_params('topk'), arch='topk', **DIMS)
  weights = tmp_path / 'sae' / 'sae.safetensors'
  tensors = formats._read_tensors(weights)
  tensors['encoder.bias'][0] = np.inf
  save_file(tensors, str(weights))
  with pytest.raises(ValueError, match="'encoder.bias' has 1 non-finite"):
    formats.load_sae(tmp_path / 'sae')


def test_missing_key_and_wrong_shape(tmp_path):
  formats.save_saelens(tmp_path / 'sae', random_params('gated'), arch='gated', **DIMS)
  weights = tmp_path / 'sae' / 'sae_weights.safetensors'
  tensors = formats._read_tensors(weights)
  save_file({name: value for name, value in tensors.items() if name != 'r_mag'}, str(weights))
  with pytest.raises(ValueError, match=r"missing tensors \['r_mag'\]"):
    formats.load_sae(tmp_path / 'sae')
  save_file({**tensors, 'b_mag': np.zeros(F + 1, np.float32)}, str(weights))
  with pytest.raises(ValueError, match=r"'b_mag' has shape \[65\], expected \[64\]"):
    formats.load_sae(tmp_path / 'sae')
  bad = random_params('gated')
  del bad['b_mag']
  with pytest.raises(ValueError, match='missing tensors'):
    formats.save_eleuther(tmp_path / 'other', bad, arch='gated', **DIMS)


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match='unknown SAE architecture'):
    formats.save_eleuther(tmp_path / 'sae', random_params('topk'), arch='transcoder', **DIMS)
  with pytest.raises(ValueError, match='1 <= k'):
    formats.save_saelens(tmp_path / 'sae', random_params('topk'), arch='topk', k=0, d_in=D, num_latents=F)
