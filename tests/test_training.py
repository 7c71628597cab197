"""Training behaviour: every architecture learns, seeds are independent, and the mesh does not change results."""

import dataclasses
import json

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
  'matryoshka': {'matryoshka_widths': (8, 24, 64)},
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


def test_every_matryoshka_prefix_reconstructs_and_learns():
  """Each nested prefix of a Matryoshka SAE reconstructs on its own: a wider prefix explains more, and training
  lowers the FVU of every prefix (measured with the prefix's own latents only, on a batch it did not train on)."""
  from saejax import data

  config = dataclasses.replace(TINY, arch='matryoshka', **ARCH_OVERRIDES['matryoshka'])
  spec = sae.SaeSpec.from_config(config, platform='cpu')
  arch = sae.get('matryoshka')
  source = data.make_source(config, shd.batch_sharding(SINGLE))
  (first_BxD,), (held_out_BxD,) = source.batches_at(0), source.batches_at(config.num_steps)

  def prefix_fvus(params):
    return np.asarray(arch.loss(params, held_out_BxD, jnp.zeros(config.num_latents, bool), spec)[1]['prefix_fvu'])

  trained, _ = train_in_memory(config, SINGLE)
  batchtopk, _ = train_in_memory(dataclasses.replace(config, arch='batchtopk'), SINGLE)
  for index, seed in enumerate(config.init_seeds):
    initial = {**arch.init(jax.random.PRNGKey(seed), spec), 'b_dec': sae.data_b_dec(first_BxD, config.b_dec_init)}
    before = prefix_fvus(initial)
    after = prefix_fvus({name: jnp.asarray(value[index]) for name, value in trained.items()})
    assert after.shape == (3,) and np.all(np.diff(after) < 0), after  # each wider prefix explains more
    assert np.all(after < 0.8 * before), (before, after)  # training lowered every prefix's FVU
    # What the nesting buys: plain BatchTopK, trained the same, leaves its first latents far worse on their own.
    plain = prefix_fvus({name: jnp.asarray(value[index]) for name, value in batchtopk.items()})
    assert after[0] < plain[0], (after, plain)


@pytest.mark.parametrize('widths', [(8, 8, 64), (8, 24), (0, 64), (24, 8, 64)])
def test_matryoshka_widths_must_rise_to_the_dictionary(widths):
  with pytest.raises(ValueError, match='matryoshka_widths=.* must rise strictly'):
    dataclasses.replace(TINY, arch='matryoshka', matryoshka_widths=widths).validate()


def test_matryoshka_widths_survive_the_config_file():
  config = dataclasses.replace(TINY, arch='matryoshka', matryoshka_widths=(8, 24, 64))
  config.validate()
  assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


LONG = dataclasses.replace(TINY, num_tokens=256 * 500, lr=1e-3, dead_tokens=2000)
# Seed 3 at different places: alone, second of four, third of nine (so with groups of three it sits at each
# position of a group, padded or not).
SEED_SETS = ((3,), (2, 3, 0, 1), (5, 4, 3, 0, 1, 2, 6, 7, 8))


@pytest.mark.parametrize('arch,group', [('topk', -1), ('relu', -1), ('topk', 3)])
def test_a_seed_is_bitwise_the_same_whatever_trains_beside_it(arch, group):
  config = dataclasses.replace(LONG, arch=arch, seed_group_size=group, **ARCH_OVERRIDES[arch])
  runs = []
  for seeds in SEED_SETS:
    params, history = train_in_memory(dataclasses.replace(config, init_seeds=seeds), SINGLE)
    where = seeds.index(3)
    runs.append(({name: value[where] for name, value in params.items()}, [h['fvu'][where] for h in history]))
  (alone, alone_fvu), *others = runs
  assert len(alone_fvu) == 500
  for params, fvu in others:
    for name in alone:
      np.testing.assert_array_equal(params[name], alone[name], err_msg=name)
    np.testing.assert_array_equal(fvu, alone_fvu)
  # And the seeds really differ from each other.
  nine, _ = train_in_memory(dataclasses.replace(config, init_seeds=SEED_SETS[2], num_tokens=256 * 2), SINGLE)
  assert not np.allclose(nine['W_enc'][0], nine['W_enc'][1])


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


MESH_CONFIG = dataclasses.replace(TINY, init_seeds=(0, 1, 2), num_tokens=256 * 15)


@pytest.fixture(scope='module')
def single_device_saes() -> dict[str, np.ndarray]:
  """MESH_CONFIG on one device, trained once for every mesh below. Read-only."""
  return train_in_memory(MESH_CONFIG, SINGLE)[0]


@pytest.mark.parametrize('data,model', [(2, 1), (1, 2), (4, 1), (2, 2), (8, 1), (4, 2), (2, 4)])
def test_same_saes_on_any_mesh(data, model, single_device_saes):
  config, reference = MESH_CONFIG, single_device_saes
  mesh = shd.make_mesh(data, model, jax.devices()[: data * model])
  params, _ = train_in_memory(config, mesh)
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('group', [0, 3])
def test_other_seed_group_sizes_give_the_same_saes_to_rounding(group):
  config = dataclasses.replace(TINY, init_seeds=(0, 1, 2, 3, 4, 5), num_tokens=256 * 15)
  reference, reference_history = train_in_memory(config, SINGLE)
  params, history = train_in_memory(dataclasses.replace(config, seed_group_size=group), SINGLE)
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], rtol=1e-4, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(history[-1]['fvu'], reference_history[-1]['fvu'], rtol=1e-4)
