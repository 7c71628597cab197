"""Training behaviour: every architecture learns, seeds are independent, and the mesh does not change results."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import sae
from saejax import sharding as shd
from saejax.config import TrainConfig
from saejax.train.trainer import train_in_memory

TINY = TrainConfig(
  d_in=16,
  num_features=48,
  feature_max_firing_prob=0.2,
  feature_firing_exponent=0.5,
  num_latents=64,
  k=4,
  batch_size=256,
  num_tokens=256 * 100,
  lr=3e-3,
  warmup_steps=5,
  init_seeds=(0, 1),
  dead_tokens=10_000,
  kernel_chunk_tokens=16,
)
SINGLE = shd.make_mesh(1, 1, jax.devices()[:1])

ARCH_OVERRIDES = {
  'topk': {},
  'batchtopk': {},
  'relu': {'l1_coefficient': 0.5},
  'gated': {'l1_coefficient': 0.5},
  'jumprelu': {'l1_coefficient': 0.05, 'jumprelu_threshold_init': 0.01, 'jumprelu_bandwidth': 0.05},
}


@pytest.mark.parametrize('arch', sorted(ARCH_OVERRIDES))
def test_every_architecture_lowers_fvu(arch):
  config = dataclasses.replace(TINY, arch=arch, **ARCH_OVERRIDES[arch])
  params, history = train_in_memory(config, SINGLE)
  first, last = np.mean(history[0]['fvu']), np.mean([h['fvu'] for h in history[-5:]])
  assert last < 0.7 * first, (arch, first, last)
  assert all(np.all(np.isfinite(h['loss'])) for h in history)
  np.testing.assert_allclose(np.linalg.norm(params['W_dec'], axis=-1), 1.0, rtol=1e-5)
  if arch == 'topk':
    assert all(np.all(h['l0'] <= config.k) for h in history)


def test_seed_trained_alone_equals_seed_trained_among_nine():
  nine = dataclasses.replace(TINY, init_seeds=tuple(range(9)), num_tokens=256 * 20)
  alone = dataclasses.replace(nine, init_seeds=(3,))
  params_nine, _ = train_in_memory(nine, SINGLE)
  params_alone, _ = train_in_memory(alone, SINGLE)
  for name in params_alone:
    np.testing.assert_allclose(params_nine[name][3], params_alone[name][0], rtol=1e-4, atol=1e-5, err_msg=name)
  # And the seeds really differ from each other.
  assert not np.allclose(params_nine['W_enc'][3], params_nine['W_enc'][4])


def test_auxk_sends_gradient_to_dead_latents_only_when_enabled():
  spec = sae.SaeSpec(arch='topk', d_in=16, num_latents=64, k=4, chunk_tokens=8)
  params = sae.get('topk').init(jax.random.PRNGKey(0), spec)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16))  # 4 tokens fire at most 16 of 64 latents
  _, aux = sae.get('topk').loss(params, x, jnp.zeros(64, bool), spec)
  dead = ~aux['fired_F']
  assert 0 < int(dead.sum()) < 64
  for auxk in (False, True):
    auxk_spec = dataclasses.replace(spec, auxk=auxk)
    grads = jax.grad(lambda p, s=auxk_spec: sae.get('topk').loss(p, x, dead, s)[0])(params)
    dead_rows = np.abs(np.asarray(grads['W_enc'])[np.asarray(dead)]).sum()
    assert (dead_rows > 0) == auxk


def test_auxk_and_multi_topk_train():
  config = dataclasses.replace(TINY, auxk=True, multi_topk=True, dead_tokens=512, num_latents=128)
  _, history = train_in_memory(config, SINGLE)
  assert np.mean(history[-1]['fvu']) < 0.7 * np.mean(history[0]['fvu'])
  assert all(np.all(np.isfinite(h['loss'])) for h in history)


@pytest.mark.parametrize('data,model', [(2, 1), (1, 2), (4, 1), (2, 2), (8, 1), (4, 2), (2, 4)])
def test_same_saes_on_any_mesh(data, model):
  config = dataclasses.replace(TINY, init_seeds=(0, 1, 2), num_tokens=256 * 15)
  reference, _ = train_in_memory(config, SINGLE)
  mesh = shd.make_mesh(data, model, jax.devices()[: data * model])
  params, _ = train_in_memory(config, mesh)
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('group', [1, 3])
def test_seed_groups_give_the_same_saes(group):
  config = dataclasses.replace(TINY, init_seeds=(0, 1, 2, 3, 4, 5), num_tokens=256 * 15)
  reference, reference_history = train_in_memory(config, SINGLE)
  params, history = train_in_memory(dataclasses.replace(config, seed_group_size=group), SINGLE)
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(history[-1]['fvu'], reference_history[-1]['fvu'], rtol=1e-4)
