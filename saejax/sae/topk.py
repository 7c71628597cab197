"""TopK, the paper's architecture (recipe.md section 1), with the optional AuxK and Multi-TopK terms.

The loss runs on `kernels.topk_autoencode`, whose backward touches only the selected latents. AuxK and
Multi-TopK each add one more encoder product when enabled; both are off in the paper's runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from saejax.sae import base, kernels


def _autoencode(params, x_BxD, k, spec, mask_bias_F=None):
  if mask_bias_F is None:
    mask_bias_F = jnp.zeros_like(params['b_enc'])
  args = (x_BxD, params['b_dec'], params['W_enc'], params['b_enc'], params['W_dec'], mask_bias_F, k, spec.latent_shards)
  if spec.topk_kernel == 'dense':
    return kernels.topk_autoencode_dense(*args, spec.sae_dtype)
  return kernels.topk_autoencode(*args, spec.chunking, spec.sae_dtype)


def loss(params: base.Params, x_BxD: jax.Array, dead_F: jax.Array, spec: base.SaeSpec):
  recon_BxD, vals_BxK, idx_BxK = _autoencode(params, x_BxD, spec.k, spec)
  x_hat_BxD = recon_BxD + params['b_dec']
  fvu = base.fvu(x_hat_BxD, x_BxD)
  total = fvu
  aux = {
    'fvu': fvu,
    'l0': jnp.mean(jnp.sum(vals_BxK > 0, axis=-1)),
    'fired_F': jnp.zeros(spec.num_latents, bool).at[idx_BxK.reshape(-1)].max((vals_BxK > 0).reshape(-1)),
  }
  if spec.auxk:
    auxk_loss = _auxk_loss(params, x_BxD, x_hat_BxD, dead_F, spec)
    aux['auxk_loss'] = auxk_loss
    total = total + spec.auxk_coefficient * auxk_loss
  if spec.multi_topk:
    multi_recon_BxD, _, _ = _autoencode(params, x_BxD, min(4 * spec.k, spec.num_latents), spec)
    multi_fvu = base.fvu(multi_recon_BxD + params['b_dec'], x_BxD)
    aux['multi_topk_fvu'] = multi_fvu
    total = total + multi_fvu / 8
  return total, aux


def _auxk_loss(params, x_BxD, x_hat_BxD, dead_F, spec):
  """Dead latents reconstruct the detached residual; scaled by min(n_dead / k_aux, 1) as in sparsify.

  The squared error is divided by the total variance of the INPUT batch (sparsify's `total_variance`), the same
  denominator as the main FVU. Dividing by the residual's own variance instead inflates the term by about
  1 / FVU, so the AuxK weight would grow as reconstruction improves.
  """
  k_aux = min(spec.d_in // 2, spec.num_latents)
  # Live latents get -inf: with fewer than k_aux dead latents the spare slots hold zero activations, which
  # is sparsify's min(k_aux, n_dead) without a data-dependent shape.
  mask_bias_F = jnp.where(dead_F, 0.0, -jnp.inf)
  residual_BxD = lax.stop_gradient(x_BxD - x_hat_BxD)
  # The kernel subtracts b_dec before encoding but adds no b_dec to its output: b_dec is not added twice.
  aux_recon_BxD, _, _ = _autoencode(params, x_BxD, k_aux, spec, mask_bias_F)
  num_dead = jnp.sum(dead_F)
  scale = jnp.minimum(num_dead / k_aux, 1.0)
  value = jnp.sum(jnp.square(aux_recon_BxD - residual_BxD)) / base.total_variance(x_BxD)
  return jnp.where(num_dead > 0, scale * value, 0.0)


def encode(params: base.Params, x_BxD: jax.Array, spec: base.SaeSpec) -> jax.Array:
  pre_BxF = kernels.mm('bd,fd->bf', x_BxD - params['b_dec'], params['W_enc'], spec.sae_dtype) + params['b_enc']
  top_BxK, idx_BxK = kernels.global_top_k(pre_BxF, spec.k, spec.latent_shards, spec.topk_block)
  rows_B1 = jnp.arange(pre_BxF.shape[0])[:, None]
  return jnp.zeros_like(pre_BxF).at[rows_B1, idx_BxK].set(jnp.maximum(top_BxK, 0.0))


ARCH = base.Architecture('topk', base.init_linear, loss, encode, base.normalise_decoder)
