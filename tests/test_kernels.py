"""The sparse TopK kernel: its hand-written backward equals autodiff of the dense formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize('shards,chunk', [(1, 1), (1, 7), (4, 16), (8, 48), (1, 0), (4, 0)])
def test_custom_backward_matches_autodiff(shards, chunk):
  x, b_dec, W_enc, b_enc, W_dec = _problem()
  mask_bias = jnp.zeros(W_enc.shape[0])

  def objective(autoencode):
    def f(b_dec, W_enc, b_enc, W_dec):
      recon, vals, _ = autoencode(x, b_dec, W_enc, b_enc, W_dec, mask_bias)
      return jnp.sum(jnp.sin(recon)) + 0.3 * jnp.sum(vals**2)

    return f

  sparse = objective(lambda *a: kernels.topk_autoencode(*a, 5, shards, chunk))
  dense = objective(lambda *a: kernels.topk_autoencode_reference(*a, 5))
  args = (b_dec, W_enc, b_enc, W_dec)
  np.testing.assert_allclose(sparse(*args), dense(*args), rtol=1e-5)
  for got, want in zip(jax.grad(sparse, argnums=(0, 1, 2, 3))(*args), jax.grad(dense, argnums=(0, 1, 2, 3))(*args)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(want))))


def test_mask_bias_excludes_latents_and_gets_no_gradient():
  x, b_dec, W_enc, b_enc, W_dec = _problem()
  allowed = jnp.arange(W_enc.shape[0]) % 3 == 0
  mask_bias = jnp.where(allowed, 0.0, -jnp.inf)
  _, vals, idx = kernels.topk_autoencode(x, b_dec, W_enc, b_enc, W_dec, mask_bias, 4, 1, 8)
  assert bool(jnp.all(allowed[idx] | (vals == 0)))
  grad = jax.grad(lambda m: jnp.sum(kernels.topk_autoencode(x, b_dec, W_enc, b_enc, W_dec, m, 4, 1, 8)[0]))(mask_bias)
  assert not bool(jnp.any(grad))


@pytest.mark.parametrize('shards', [2, 4, 8])
def test_two_stage_top_k_equals_global_top_k_including_ties(shards):
  pre = jax.random.normal(jax.random.PRNGKey(1), (32, 64))
  pre = jnp.round(pre * 2) / 2  # many exact ties
  vals, idx = kernels.global_top_k(pre, 6, shards)
  want_vals, want_idx = jax.lax.top_k(pre, 6)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(vals, want_vals)


def test_chunking_tiles_batch_exactly():
  for batch, chunk in [(12, 5), (7, 32), (64, 32), (30, 1)]:
    size = kernels._chunk_size(batch, chunk)
    assert batch % size == 0 and size <= max(chunk, 1)
  a = jnp.arange(24).reshape(12, 2)
  np.testing.assert_array_equal(kernels._from_chunks(kernels._to_chunks(a, 4)), a)
