"""What every SAE architecture shares: the static spec, the parameter layout, init, FVU and decoder geometry.

Parameters of one SAE are a dict pytree of float32 arrays, the same layout as EleutherAI's checkpoints:
`W_enc [F, D]`, `b_enc [F]`, `W_dec [F, D]`, `b_dec [D]`, plus architecture extras (Gated: `r_mag`, `b_mag`;
JumpReLU: `threshold`; BatchTopK: an inference `threshold`). Everything here is written for ONE SAE; the
trainer vmaps it over a leading seed axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from saejax.sae import kernels

Params = dict[str, jax.Array]
Aux = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SaeSpec:
  """The hashable subset of the run config that the SAE math depends on (a static jit argument)."""

  arch: str
  d_in: int
  num_latents: int
  k: int
  l1_coefficient: float = 3.0
  jumprelu_threshold_init: float = 0.001
  jumprelu_bandwidth: float = 0.001
  auxk: bool = False
  auxk_coefficient: float = 1.0 / 32.0
  multi_topk: bool = False
  matryoshka_widths: tuple[int, ...] = ()  # Matryoshka BatchTopK's nested prefixes (dense.matryoshka_widths)
  latent_shards: int = 1
  # The per-platform kernel plan (saejax.tuning; TrainConfig resolves its -1/'auto' fields for a platform).
  chunk_tokens: int = 32  # tokens per chunk of the sparse TopK gathers and scatters; 0: no token chunks
  kernel_blocks: int = 0  # with chunk_tokens=0: about this many equal blocks (0 or 1: the whole batch)
  topk_kernel: str = 'sparse'  # 'sparse' (gathers, k rows per token) or 'dense' (masked dense products)
  topk_block: int = 0  # latents per block of the two-stage exact top-k (kernels.block_top_k); 0: one lax.top_k
  sae_dtype: str = 'float32'  # matmul operands: 'float32' or 'bfloat16' (float32 accumulation and master weights)

  @property
  def chunking(self) -> kernels.Chunking:
    return kernels.Chunking(self.chunk_tokens, self.kernel_blocks, self.topk_block)

  @classmethod
  def from_config(cls, config: Any, latent_shards: int = 1, platform: str | None = None) -> SaeSpec:
    """The spec of `config`; per-platform fields resolve for `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    resolved = config.resolved_kernel_plan(platform)
    names = {f.name for f in dataclasses.fields(cls)} - {'latent_shards', *resolved}
    values = {name: getattr(config, name) for name in names}
    return cls(**values, **resolved, latent_shards=latent_shards)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The functions a trainer and an exporter need from one SAE architecture.

  loss(params, x_BxD, dead_F, spec) -> (scalar loss, aux) where aux holds at least `fvu`, `l0` and
  `fired_F` (bool: the latent was active on some token of the batch).
  encode(params, x_BxD, spec) -> dense latent activations z_BxF (inference semantics).
  post_update(params, aux, spec) -> params after the optimiser step (unit-norm decoder, running stats).
  """

  name: str
  init: Callable[[jax.Array, SaeSpec], Params]
  loss: Callable[..., tuple[jax.Array, Aux]]
  encode: Callable[[Params, jax.Array, SaeSpec], jax.Array]
  post_update: Callable[[Params, Aux, SaeSpec], Params]


def init_linear(key: jax.Array, spec: SaeSpec) -> Params:
  """Recipe init: W_enc uniform +-1/sqrt(d) (PyTorch Linear), b_enc = 0, W_dec = row-normalised W_enc.

  b_dec starts at 0 and is set from the first batch by the trainer (`data_b_dec`).
  """
  bound = 1.0 / jnp.sqrt(spec.d_in)
  W_enc_FxD = jax.random.uniform(key, (spec.num_latents, spec.d_in), jnp.float32, -bound, bound)
  return {
    'W_enc': W_enc_FxD,
    'b_enc': jnp.zeros((spec.num_latents,), jnp.float32),
    'W_dec': unit_rows(W_enc_FxD),
    'b_dec': jnp.zeros((spec.d_in,), jnp.float32),
  }


def unit_rows(W_FxD: jax.Array, eps: float = 1e-12) -> jax.Array:
  norms_F1 = jnp.linalg.norm(W_FxD, axis=-1, keepdims=True)
  return W_FxD / jnp.maximum(norms_F1, eps)


def remove_parallel_component(grad_FxD: jax.Array, W_FxD: jax.Array) -> jax.Array:
  """Projects each decoder row's gradient onto the tangent space of the unit sphere at that row."""
  return grad_FxD - jnp.sum(grad_FxD * W_FxD, axis=-1, keepdims=True) * W_FxD


def total_variance(x_BxD: jax.Array) -> jax.Array:
  """sum((x - mean_over_batch(x))^2): the FVU denominator, one scalar for the whole batch."""
  return jnp.sum(jnp.square(x_BxD - jnp.mean(x_BxD, axis=0)))


def fvu(x_hat_BxD: jax.Array, x_BxD: jax.Array) -> jax.Array:
  """Fraction of variance unexplained over the whole batch and all dims (recipe.md section 1)."""
  return jnp.sum(jnp.square(x_hat_BxD - x_BxD)) / total_variance(x_BxD)


def dense_stats(z_BxF: jax.Array) -> Aux:
  """L0 and firing mask from dense latent activations."""
  active_BxF = z_BxF > 0
  return {'l0': jnp.mean(jnp.sum(active_BxF, axis=-1)), 'fired_F': jnp.any(active_BxF, axis=0)}


def normalise_decoder(params: Params, aux: Aux, spec: SaeSpec) -> Params:
  del aux, spec
  return {**params, 'W_dec': unit_rows(params['W_dec'])}


def geometric_median(x_BxD: jax.Array, max_iter: int = 100, tol: float = 1e-5) -> jax.Array:
  """Weiszfeld's algorithm, as in the mid-2024 trainer that set b_dec for the paper's seed 1."""

  def step(state):
    guess, _, i = state
    weights_B = 1.0 / jnp.maximum(jnp.linalg.norm(x_BxD - guess, axis=-1), 1e-8)
    new = jnp.sum(weights_B[:, None] * x_BxD, axis=0) / jnp.sum(weights_B)
    return new, jnp.linalg.norm(new - guess), i + 1

  def not_done(state):
    _, shift, i = state
    return (shift > tol) & (i < max_iter)

  start = jnp.mean(x_BxD, axis=0)
  median, _, _ = jax.lax.while_loop(not_done, step, (start, jnp.asarray(jnp.inf, x_BxD.dtype), 0))
  return median


def data_b_dec(x_BxD: jax.Array, method: str) -> jax.Array:
  if method == 'mean':
    return jnp.mean(x_BxD, axis=0)
  if method == 'geometric_median':
    return geometric_median(x_BxD)
  raise ValueError(f'b_dec_init={method!r}; use mean or geometric_median')
