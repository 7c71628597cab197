"""AuxK: the loss and its gradient equal a plain dense formulation, and it revives latents that really died.

The reference is written from the definition (Gao et al. 2024, with sparsify's normalisation): the top
min(k_aux, n_dead) dead latents reconstruct the detached residual x - x_hat without b_dec, the squared error is
divided by the total variance of the input batch and scaled by min(n_dead / k_aux, 1).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from saejax import sae
from saejax import sharding as shd
from saejax.config import TrainConfig
from saejax.train.trainer import train_in_memory

SINGLE = shd.make_mesh(1, 1, jax.devices()[:1])


def _scatter_BxF(vals_BxK, idx_BxK, num_latents):
  rows_B1 = jnp.arange(vals_BxK.shape[0])[:, None]
  return jnp.zeros((vals_BxK.shape[0], num_latents), vals_BxK.dtype).at[rows_B1, idx_BxK].set(vals_BxK)


def _dense_loss(params, x_BxD, dead_F, k, coefficient):
  """TopK FVU + coefficient * AuxK, dense and differentiated by plain autodiff. `dead_F` must be concrete."""
  num_latents, d_in = params['W_enc'].shape
  pre_BxF = jax.nn.relu((x_BxD - params['b_dec']) @ params['W_enc'].T + params['b_enc'])
  top_BxK, idx_BxK = lax.top_k(pre_BxF, k)
  x_hat_BxD = _scatter_BxF(top_BxK, idx_BxK, num_latents) @ params['W_dec'] + params['b_dec']
  total_variance = jnp.sum(jnp.square(x_BxD - jnp.mean(x_BxD, axis=0)))
  fvu = jnp.sum(jnp.square(x_hat_BxD - x_BxD)) / total_variance
  num_dead = int(np.sum(dead_F))
  k_aux = d_in // 2
  # Live latents sit below every relu'd dead pre-activation, so they are never among the picks.
  aux_top_BxA, aux_idx_BxA = lax.top_k(jnp.where(dead_F, pre_BxF, -1.0), min(k_aux, num_dead))
  aux_recon_BxD = _scatter_BxF(aux_top_BxA, aux_idx_BxA, num_latents) @ params['W_dec']
  residual_BxD = lax.stop_gradient(x_BxD - x_hat_BxD)
  auxk = min(num_dead / k_aux, 1.0) * jnp.sum(jnp.square(aux_recon_BxD - residual_BxD)) / total_variance
  return fvu + coefficient * auxk, auxk


def _problem(num_latents=64, d_in=16, batch=48):
  spec = sae.SaeSpec(arch='topk', d_in=d_in, num_latents=num_latents, k=4, auxk=True, chunk_tokens=8)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = sae.get('topk').init(keys[0], spec)
  x_BxD = jax.random.normal(keys[1], (batch, d_in)) + 0.5
  # Nonzero biases so the b_dec and b_enc paths of the backward are exercised.
  params['b_dec'] = jnp.mean(x_BxD, axis=0) + 0.1 * jax.random.normal(keys[2], (d_in,))
  params['b_enc'] = 0.05 * jax.random.normal(keys[3], (num_latents,))
  return spec, params, x_BxD


@pytest.mark.parametrize('num_dead,shards', [(5, 1), (40, 1), (40, 4)])
def test_auxk_loss_and_gradient_equal_dense_reference(num_dead, shards):
  spec, params, x_BxD = _problem()
  spec = dataclasses.replace(spec, latent_shards=shards)
  # Fewer dead latents than k_aux = 8 (spare aux slots) and more (a real top-k among the dead).
  dead_F = np.zeros(spec.num_latents, bool)
  dead_F[np.random.default_rng(0).choice(spec.num_latents, num_dead, replace=False)] = True

  def kernel_loss(p):
    total, aux = sae.get('topk').loss(p, x_BxD, jnp.asarray(dead_F), spec)
    return total, aux['auxk_loss']

  def dense_loss(p):
    return _dense_loss(p, x_BxD, dead_F, spec.k, spec.auxk_coefficient)

  # Jitted: eager dispatch of the chunked kernel costs seconds on CPU.
  (total, auxk), grads = jax.jit(jax.value_and_grad(kernel_loss, has_aux=True))(params)
  (want_total, want_auxk), want_grads = jax.jit(jax.value_and_grad(dense_loss, has_aux=True))(params)
  assert float(want_auxk) > 0.01  # the term is really there
  np.testing.assert_allclose(auxk, want_auxk, rtol=1e-5)
  np.testing.assert_allclose(total, want_total, rtol=1e-5)
  for name, want in want_grads.items():
    np.testing.assert_allclose(grads[name], want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))), err_msg=name)


def test_auxk_term_is_normalised_by_the_input_variance_not_the_residual_variance():
  spec, params, x_BxD = _problem()
  dead_F = jnp.arange(spec.num_latents) < 2 * spec.d_in  # 32 dead >= k_aux: scale 1
  # Dead latents that cannot fire give e_hat = 0, so the term is |residual|^2 / total variance of x: exactly
  # the main FVU. Dividing by the residual's own variance instead would give a value >= 1 (here ~2x the FVU).
  params = {**params, 'b_enc': jnp.where(dead_F, -1e3, params['b_enc'])}
  _, aux = sae.get('topk').loss(params, x_BxD, dead_F, spec)
  assert 0.1 < float(aux['fvu']) < 0.9
  np.testing.assert_allclose(aux['auxk_loss'], aux['fvu'], rtol=1e-5)


def test_auxk_revives_latents_killed_by_a_high_learning_rate():
  # More ground-truth features than latents, so the residual holds directions that dead latents can take up;
  # lr 3e-2 kills about 40% of the latents early. Dead window: 10 batches. Measured: 0.44 dead without AuxK,
  # 0.01 with it (FVU 0.467 vs 0.457).
  config = TrainConfig(
    d_in=32,
    num_features=2048,
    feature_max_firing_prob=0.08,
    feature_firing_exponent=0.3,
    num_latents=512,
    k=4,
    batch_size=256,
    num_tokens=256 * 300,
    lr=3e-2,
    warmup_steps=20,
    init_seeds=(0,),
    dead_tokens=256 * 10,
    kernel_chunk_tokens=16,
  )
  _, without = train_in_memory(config, SINGLE)
  _, with_auxk = train_in_memory(dataclasses.replace(config, auxk=True), SINGLE)
  dead_without, dead_with = without[-1]['dead_fraction'], with_auxk[-1]['dead_fraction']
  assert np.all(dead_without > 0.3), dead_without
  assert np.all(dead_with < 0.1), dead_with
  assert np.mean(with_auxk[-1]['fvu']) < np.mean(without[-1]['fvu'])
