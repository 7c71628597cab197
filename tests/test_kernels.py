"""The sparse TopK kernel: its hand-written backward equals autodiff of the dense formulation; the two-stage
top-k is exactly lax.top_k."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saejax import sae as sae_lib
from saejax import sharding as shd
from saejax.sae import kernels


def _problem(batch=48, d_in=12, num_latents=96, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  return (
    jax.random.normal(keys[0], (batch, d_in)),
    0.1 * jax.random.normal(keys[1], (d_in,)),
    jax.random.normal(keys[2], (num_latents, d_in)) / np.sqrt(d_in),
    0.1 * jax.random.normal(keys[3], (num_latents,)),
    jax.random.normal(keys[4], (num_latents, d_in)),
  )


CHUNKINGS = [
  (1, kernels.Chunking(tokens=1)),
  (1, kernels.Chunking(tokens=7)),
  (4, kernels.Chunking(tokens=16)),
  (8, kernels.Chunking(tokens=48)),
  (1, kernels.Chunking()),
  (4, kernels.Chunking()),
  (1, kernels.Chunking(blocks=8)),
  (4, kernels.Chunking(blocks=5)),
]


def _objective(x, mask_bias, autoencode):
  def f(b_dec, W_enc, b_enc, W_dec):
    recon, vals, _ = autoencode(x, b_dec, W_enc, b_enc, W_dec, mask_bias)
    return jnp.sum(jnp.sin(recon)) + 0.3 * jnp.sum(vals**2)

  return f


def _assert_same_value_and_grads(f, g, rtol, args):
  np.testing.assert_allclose(f(*args), g(*args), rtol=rtol)
  for got, want in zip(jax.grad(f, argnums=(0, 1, 2, 3))(*args), jax.grad(g, argnums=(0, 1, 2, 3))(*args)):
    np.testing.assert_allclose(got, want, rtol=2 * rtol, atol=2 * rtol * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize('shards,chunk', CHUNKINGS)
def test_custom_backward_matches_autodiff(shards, chunk):
  x, b_dec, W_enc, b_enc, W_dec = _problem()
  mask_bias = jnp.zeros(W_enc.shape[0])

  sparse = _objective(x, mask_bias, lambda *a: kernels.topk_autoencode(*a, 5, shards, chunk))
  reference = _objective(x, mask_bias, lambda *a: kernels.topk_autoencode_reference(*a, 5))
  _assert_same_value_and_grads(sparse, reference, 1e-4, (b_dec, W_enc, b_enc, W_dec))


@pytest.mark.parametrize('shards', [1, 4])
def test_dense_formulation_matches_autodiff_reference(shards):
  x, b_dec, W_enc, b_enc, W_dec = _problem()
  mask_bias = jnp.where(jnp.arange(W_enc.shape[0]) % 5 == 0, -jnp.inf, 0.0)
  dense = _objective(x, mask_bias, lambda *a: kernels.topk_autoencode_dense(*a, 5, shards, 'float32'))
  reference = _objective(x, mask_bias, lambda *a: kernels.topk_autoencode_reference(*a, 5))
  _assert_same_value_and_grads(dense, reference, 1e-4, (b_dec, W_enc, b_enc, W_dec))


def _bf16_operand_reference(x, b_dec, W_enc, b_enc, W_dec, mask_bias, k):
  """What bf16 operands with float32 accumulation mean: float32 products of bf16-rounded operands."""

  def rounded(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)

  highest = jax.lax.Precision.HIGHEST
  pre = jnp.matmul(rounded(x - b_dec), rounded(W_enc).T, precision=highest) + b_enc + mask_bias
  top, idx = jax.lax.top_k(pre, k)
  vals = jnp.maximum(top, 0.0)
  z = jnp.zeros_like(pre).at[jnp.arange(pre.shape[0])[:, None], idx].set(rounded(vals))
  return jnp.matmul(z, rounded(W_dec), precision=highest), vals, idx


@pytest.mark.parametrize('formulation', ['sparse', 'dense'])
def test_bfloat16_means_bf16_operands_with_float32_accumulation(formulation):
  x, b_dec, W_enc, b_enc, W_dec = _problem(batch=64, d_in=32, num_latents=128)
  mask_bias = jnp.zeros(W_enc.shape[0])

  def run(dtype):
    if formulation == 'dense':
      return lambda *a: kernels.topk_autoencode_dense(*a, 5, 1, dtype)
    return lambda *a: kernels.topk_autoencode(*a, 5, 1, kernels.Chunking(tokens=8), dtype)

  recon, vals, idx = run('bfloat16')(x, b_dec, W_enc, b_enc, W_dec, mask_bias)
  want_recon, want_vals, want_idx = _bf16_operand_reference(x, b_dec, W_enc, b_enc, W_dec, mask_bias, 5)
  assert recon.dtype == vals.dtype == jnp.float32
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(vals, want_vals, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(recon, want_recon, rtol=1e-4, atol=1e-5)
  # And it is not float32 in disguise: the selection or the values move by bf16's rounding.
  recon32, _, _ = run('float32')(x, b_dec, W_enc, b_enc, W_dec, mask_bias)
  assert float(jnp.max(jnp.abs(recon - recon32))) > 1e-4
  # Gradients come back float32 and agree with the rounded reference's to bf16 precision.
  grad_args = (b_dec, W_enc, b_enc, W_dec)
  got = jax.grad(_objective(x, mask_bias, run('bfloat16')), argnums=(1, 3))(*grad_args)
  reference = _objective(x, mask_bias, lambda *a: _bf16_operand_reference(*a, 5))
  for g, w in zip(got, jax.grad(reference, argnums=(1, 3))(*grad_args)):
    assert g.dtype == jnp.float32
    assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < 2e-2


def test_mask_bias_excludes_latents_and_gets_no_gradient():
  x, b_dec, W_enc, b_enc, W_dec = _problem()
  allowed = jnp.arange(W_enc.shape[0]) % 3 == 0
  mask_bias = jnp.where(allowed, 0.0, -jnp.inf)
  _, vals, idx = kernels.topk_autoencode(x, b_dec, W_enc, b_enc, W_dec, mask_bias, 4, 1, kernels.Chunking(8))
  assert bool(jnp.all(allowed[idx] | (vals == 0)))
  chunking = kernels.Chunking(8)
  grad = jax.grad(lambda m: jnp.sum(kernels.topk_autoencode(x, b_dec, W_enc, b_enc, W_dec, m, 4, 1, chunking)[0]))(
    mask_bias
  )
  assert not bool(jnp.any(grad))


@pytest.mark.parametrize('shards', [2, 4, 8])
def test_two_stage_top_k_equals_global_top_k_including_ties(shards):
  pre = jax.random.normal(jax.random.PRNGKey(1), (32, 64))
  pre = jnp.round(pre * 2) / 2  # many exact ties
  vals, idx = kernels.global_top_k(pre, 6, shards)
  want_vals, want_idx = jax.lax.top_k(pre, 6)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(vals, want_vals)


def _hard_rows(key, rows: int, num_latents: int) -> jax.Array:
  """Rows that break a careless top-k: exact ties, -0.0 beside +0.0, -inf (AuxK's mask), all-equal rows, NaN."""
  pre = jnp.round(jax.random.normal(key, (rows, num_latents)) * 2) / 2  # many exact ties
  pre = pre.at[0].set(jnp.where(jnp.arange(num_latents) % 3 == 0, -0.0, 0.0))  # only signed zeros
  pre = pre.at[1].set(-jnp.inf).at[2].set(1.0)  # all masked; all equal
  pre = pre.at[3, ::5].set(-jnp.inf).at[4, 7].set(jnp.nan).at[5, num_latents - 1].set(jnp.inf)
  return pre


@pytest.mark.parametrize('num_latents,k,block', [(1024, 8, 8), (1024, 4, 16), (512, 4, 8), (4096, 16, 8)])
def test_block_top_k_is_lax_top_k_exactly(num_latents, k, block):
  pre = _hard_rows(jax.random.PRNGKey(num_latents + k), 48, num_latents)
  assert kernels.uses_blocks(num_latents, k, block)
  vals, idx = jax.jit(kernels.global_top_k, static_argnums=(1, 2, 3))(pre, k, 1, block)
  want_vals, want_idx = jax.lax.top_k(pre, k)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(np.signbit(vals), np.signbit(want_vals))  # +0.0 ranks above -0.0
  np.testing.assert_array_equal(vals, want_vals)
  # Leading axes are kept, as lax.top_k keeps them.
  stacked_vals, stacked_idx = kernels.global_top_k(pre.reshape(4, 12, num_latents), k, 1, block)
  np.testing.assert_array_equal(stacked_idx.reshape(48, k), want_idx)
  np.testing.assert_array_equal(stacked_vals.reshape(48, k), want_vals)


def test_block_top_k_only_where_it_pays():
  assert not kernels.uses_blocks(1024, 32, 8)  # k * block candidates would be a quarter of the row
  assert not kernels.uses_blocks(1004, 4, 8)  # blocks must tile the row
  assert not kernels.uses_blocks(1024, 8, 0)

  def top_k_ops(num_latents):
    pre = jnp.zeros((16, num_latents))
    return jax.jit(lambda p: kernels.global_top_k(p, 4, 1, 8)).lower(pre).as_text().count('chlo.top_k')

  assert top_k_ops(64) == 1 and top_k_ops(1024) == 2  # 64 < 16 * k * block: one lax.top_k


def test_the_cpu_plan_uses_block_top_k_and_trains_the_same_saes():
  """The CPU default (topk_block=8) and one lax.top_k give bitwise the same SAE: only the speed differs."""
  from saejax.config import TrainConfig
  from saejax.train.trainer import train_in_memory

  config = TrainConfig(d_in=16, num_features=64, num_latents=512, k=4, batch_size=128, num_tokens=128 * 30)
  config.validate()
  assert sae_lib.SaeSpec.from_config(config, platform='cpu').topk_block == 8
  assert sae_lib.SaeSpec.from_config(config, platform='gpu').topk_block == 0
  assert kernels.uses_blocks(config.num_latents, config.k, 8)
  mesh = shd.make_mesh(1, 1, jax.devices()[:1])
  blocked, _ = train_in_memory(config, mesh)
  plain, _ = train_in_memory(dataclasses.replace(config, topk_block=0), mesh)
  for name in blocked:
    np.testing.assert_array_equal(blocked[name], plain[name], err_msg=name)


def test_chunking_tiles_batch_exactly():
  for batch, chunk in [(12, 5), (7, 32), (64, 32), (30, 1)]:
    size = kernels.Chunking(tokens=chunk).chunk_size(batch)
    assert batch % size == 0 and size <= max(chunk, 1)
  # Blocks: a trip count that does not grow with the batch (the paper's 32 x 2049 tokens make 8 blocks).
  for batch in (32 * 2049, 64 * 2049, 4096, 2**20):
    assert batch // kernels.Chunking(blocks=8).chunk_size(batch) == 8
  assert kernels.Chunking(blocks=8).chunk_size(8191) == 8191  # prime: one pass, never 8,191 one-token blocks
  assert kernels.Chunking().chunk_size(100) == 100
  a = jnp.arange(24).reshape(12, 2)
  np.testing.assert_array_equal(kernels._from_chunks(kernels._to_chunks(a, 4)), a)
