"""SAE architectures whose latent count per token is not fixed, so they use dense [B, F] codes.

- ReLU + L1 ("standard"), Gated (Rajamanoharan et al. 2024), JumpReLU (threshold kept in float32,
  straight-through rectangle-kernel gradients), BatchTopK (top B*k activations over the whole batch,
  with a running threshold for inference), and Matryoshka BatchTopK (Bussmann et al. 2025: BatchTopK whose
  nested dictionary prefixes each reconstruct the input too).

Sparsity penalties are scaled so that `l1_coefficient` means what it means in SAELens: SAELens's loss on
inputs rescaled to unit variance per dimension, divided by d_in so that it adds to the FVU. For JumpReLU
the same field is the L0 coefficient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from saejax.sae import base, kernels


def _pre(params, x_BxD, spec):
  return kernels.mm('bd,fd->bf', x_BxD - params['b_dec'], params['W_enc'], spec.sae_dtype) + params['b_enc']


def _l1_scale(x_BxD, spec):
  """Converts sum|z| per token into SAELens units on unit-variance inputs, divided by d_in."""
  per_dim_std = jnp.sqrt(base.total_variance(x_BxD) / (x_BxD.shape[0] * spec.d_in))
  return 1.0 / (per_dim_std * spec.d_in)


def _reconstruction_loss(params, x_BxD, z_BxF, spec):
  x_hat_BxD = kernels.mm('bf,fd->bd', z_BxF, params['W_dec'], spec.sae_dtype) + params['b_dec']
  return base.fvu(x_hat_BxD, x_BxD)


# ReLU + L1 -------------------------------------------------------------------------------------------


def relu_encode(params, x_BxD, spec):
  return jax.nn.relu(_pre(params, x_BxD, spec))


def relu_loss(params, x_BxD, dead_F, spec):
  del dead_F
  z_BxF = relu_encode(params, x_BxD, spec)
  fvu = _reconstruction_loss(params, x_BxD, z_BxF, spec)
  l1 = jnp.mean(jnp.sum(z_BxF, axis=-1)) * _l1_scale(x_BxD, spec)
  return fvu + spec.l1_coefficient * l1, {'fvu': fvu, 'l1': l1, **base.dense_stats(z_BxF)}


# Gated -----------------------------------------------------------------------------------------------


def gated_init(key, spec):
  params = base.init_linear(key, spec)
  return {**params, 'r_mag': jnp.zeros((spec.num_latents,)), 'b_mag': jnp.zeros((spec.num_latents,))}


def _gated_parts(params, x_BxD, spec):
  pi_gate_BxF = _pre(params, x_BxD, spec)
  pi_mag_BxF = jnp.exp(params['r_mag']) * (pi_gate_BxF - params['b_enc']) + params['b_mag']
  return pi_gate_BxF, jax.nn.relu(pi_mag_BxF)


def gated_encode(params, x_BxD, spec):
  pi_gate_BxF, mag_BxF = _gated_parts(params, x_BxD, spec)
  return jnp.where(pi_gate_BxF > 0, mag_BxF, 0.0)


def gated_loss(params, x_BxD, dead_F, spec):
  del dead_F
  pi_gate_BxF, mag_BxF = _gated_parts(params, x_BxD, spec)
  z_BxF = jnp.where(pi_gate_BxF > 0, mag_BxF, 0.0)
  fvu = _reconstruction_loss(params, x_BxD, z_BxF, spec)
  gate_BxF = jax.nn.relu(pi_gate_BxF)
  l1 = jnp.mean(jnp.sum(gate_BxF, axis=-1)) * _l1_scale(x_BxD, spec)
  frozen_decoder = {'W_dec': lax.stop_gradient(params['W_dec']), 'b_dec': lax.stop_gradient(params['b_dec'])}
  aux_fvu = _reconstruction_loss(frozen_decoder, x_BxD, gate_BxF, spec)
  total = fvu + spec.l1_coefficient * l1 + aux_fvu
  return total, {'fvu': fvu, 'l1': l1, 'gate_aux_fvu': aux_fvu, **base.dense_stats(z_BxF)}


# JumpReLU --------------------------------------------------------------------------------------------


@jax.custom_vjp
def _jump(pre_BxF, threshold_F, bandwidth):
  return jnp.where(pre_BxF > threshold_F, pre_BxF, 0.0)


def _jump_fwd(pre_BxF, threshold_F, bandwidth):
  return _jump(pre_BxF, threshold_F, bandwidth), (pre_BxF, threshold_F, bandwidth)


def _jump_bwd(residuals, ct_BxF):
  pre_BxF, threshold_F, bandwidth = residuals
  above_BxF = pre_BxF > threshold_F
  window_BxF = jnp.abs(pre_BxF - threshold_F) < bandwidth / 2
  d_threshold_F = jnp.sum(jnp.where(window_BxF, -threshold_F / bandwidth * ct_BxF, 0.0), axis=0)
  return jnp.where(above_BxF, ct_BxF, 0.0), d_threshold_F, jnp.zeros_like(bandwidth)


_jump.defvjp(_jump_fwd, _jump_bwd)


@jax.custom_vjp
def _step(pre_BxF, threshold_F, bandwidth):
  return (pre_BxF > threshold_F).astype(pre_BxF.dtype)


def _step_fwd(pre_BxF, threshold_F, bandwidth):
  return _step(pre_BxF, threshold_F, bandwidth), (pre_BxF, threshold_F, bandwidth)


def _step_bwd(residuals, ct_BxF):
  pre_BxF, threshold_F, bandwidth = residuals
  window_BxF = jnp.abs(pre_BxF - threshold_F) < bandwidth / 2
  d_threshold_F = jnp.sum(jnp.where(window_BxF, -ct_BxF / bandwidth, 0.0), axis=0)
  return jnp.zeros_like(pre_BxF), d_threshold_F, jnp.zeros_like(bandwidth)


_step.defvjp(_step_fwd, _step_bwd)


def jumprelu_init(key, spec):
  params = base.init_linear(key, spec)
  return {**params, 'threshold': jnp.full((spec.num_latents,), spec.jumprelu_threshold_init, jnp.float32)}


def jumprelu_encode(params, x_BxD, spec):
  pre_BxF = _pre(params, x_BxD, spec)
  return jnp.where(pre_BxF > params['threshold'], pre_BxF, 0.0)


def jumprelu_loss(params, x_BxD, dead_F, spec):
  del dead_F
  pre_BxF = jax.nn.relu(_pre(params, x_BxD, spec))
  # The threshold is a plain float32 parameter, never a log-threshold, which freezes under Adam.
  threshold_F = jnp.maximum(params['threshold'], 0.0)
  bandwidth = jnp.asarray(spec.jumprelu_bandwidth, jnp.float32)
  z_BxF = _jump(pre_BxF, threshold_F, bandwidth)
  fvu = _reconstruction_loss(params, x_BxD, z_BxF, spec)
  l0 = jnp.mean(jnp.sum(_step(pre_BxF, threshold_F, bandwidth), axis=-1))
  return fvu + spec.l1_coefficient * l0 / spec.d_in, {'fvu': fvu, **base.dense_stats(z_BxF)}


# BatchTopK -------------------------------------------------------------------------------------------

_THRESHOLD_DECAY = 0.99


def batchtopk_init(key, spec):
  return {**base.init_linear(key, spec), 'threshold': jnp.zeros((), jnp.float32)}


def _batch_top(pre_BxF, k):
  """Keeps the B*k largest activations of the whole batch; returns codes and the smallest kept value."""
  batch, num_latents = pre_BxF.shape
  flat = jax.nn.relu(pre_BxF).reshape(-1)
  vals, idx = lax.top_k(flat, batch * k)
  z = jnp.zeros_like(flat).at[idx].set(vals).reshape(batch, num_latents)
  return z, vals[-1]


def batchtopk_encode(params, x_BxD, spec):
  """Inference uses the running threshold, so a token's code does not depend on its batch."""
  pre_BxF = _pre(params, x_BxD, spec)
  return jnp.where(pre_BxF > params['threshold'], pre_BxF, 0.0)


def batchtopk_loss(params, x_BxD, dead_F, spec):
  del dead_F
  z_BxF, min_kept = _batch_top(_pre(params, x_BxD, spec), spec.k)
  fvu = _reconstruction_loss(params, x_BxD, z_BxF, spec)
  return fvu, {'fvu': fvu, 'min_kept': min_kept, **base.dense_stats(z_BxF)}


def batchtopk_post_update(params, aux, spec):
  params = base.normalise_decoder(params, aux, spec)
  first = params['threshold'] == 0
  blended = _THRESHOLD_DECAY * params['threshold'] + (1 - _THRESHOLD_DECAY) * aux['min_kept']
  return {**params, 'threshold': jnp.where(first, aux['min_kept'], blended)}


# Matryoshka BatchTopK ---------------------------------------------------------------------------------


def matryoshka_widths(spec) -> tuple[int, ...]:
  """The nested prefix widths, the last being the whole dictionary; () means M/16, M/4 and M."""
  if spec.matryoshka_widths:
    return tuple(spec.matryoshka_widths)
  return tuple(sorted({w for w in (spec.num_latents // 16, spec.num_latents // 4) if w > 0} | {spec.num_latents}))


def matryoshka_loss(params, x_BxD, dead_F, spec):
  """Sum over the prefixes of their FVU: codes are BatchTopK's over the whole dictionary, and prefix i decodes
  with latents [0, widths[i]) only, so early latents must reconstruct on their own (SAELens's and
  dictionary_learning's loss, in FVU units). The last prefix is the whole SAE, whose FVU is the reported one."""
  del dead_F
  z_BxF, min_kept = _batch_top(_pre(params, x_BxD, spec), spec.k)
  recon_BxD = jnp.broadcast_to(params['b_dec'], x_BxD.shape)
  prefix_fvus, start = [], 0
  for width in matryoshka_widths(spec):
    recon_BxD = recon_BxD + kernels.mm('bf,fd->bd', z_BxF[:, start:width], params['W_dec'][start:width], spec.sae_dtype)
    prefix_fvus.append(base.fvu(recon_BxD, x_BxD))
    start = width
  prefix_fvu = jnp.stack(prefix_fvus)
  aux = {'fvu': prefix_fvu[-1], 'prefix_fvu': prefix_fvu, 'min_kept': min_kept, **base.dense_stats(z_BxF)}
  return jnp.sum(prefix_fvu), aux


RELU = base.Architecture('relu', base.init_linear, relu_loss, relu_encode, base.normalise_decoder)
GATED = base.Architecture('gated', gated_init, gated_loss, gated_encode, base.normalise_decoder)
JUMPRELU = base.Architecture('jumprelu', jumprelu_init, jumprelu_loss, jumprelu_encode, base.normalise_decoder)
BATCHTOPK = base.Architecture('batchtopk', batchtopk_init, batchtopk_loss, batchtopk_encode, batchtopk_post_update)
# Inference and the running threshold are BatchTopK's, so the exports are too (SAELens: JumpReLU).
MATRYOSHKA = base.Architecture('matryoshka', batchtopk_init, matryoshka_loss, batchtopk_encode, batchtopk_post_update)
