"""SAE quality on the language model: what splicing each seed's reconstruction into the model costs.

Per seed, over held-out token batches: the next-token cross-entropy with the SAE's reconstruction replacing the
hookpoint activation, its increase over the clean model, the KL divergence from the clean next-token
distribution, and FVU, L0 and the dead fraction (latents that never fired) on the same tokens.

With several processes every one calls `evaluate_on_lm` with its own rows of each batch; the batches are
assembled on the mesh and every process returns the same numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from saejax import sae as sae_lib


def _next_token_ce(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1))


def _kl(clean_BxTxV: jax.Array, spliced_BxTxV: jax.Array) -> jax.Array:
  """Mean over positions of KL(clean || spliced)."""
  logp = jax.nn.log_softmax(clean_BxTxV.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(spliced_BxTxV.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1))


def _reconstruct(spec: sae_lib.SaeSpec, params, acts_BxTxD):
  flat_NxD = acts_BxTxD.reshape(-1, acts_BxTxD.shape[-1]).astype(jnp.float32)
  z_NxF = sae_lib.get(spec.arch).encode(params, flat_NxD, spec)
  return (z_NxF @ params['W_dec'] + params['b_dec']).reshape(acts_BxTxD.shape).astype(acts_BxTxD.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _sae_stats(spec: sae_lib.SaeSpec, params, acts_BxTxD):
  flat_NxD = acts_BxTxD.reshape(-1, acts_BxTxD.shape[-1]).astype(jnp.float32)
  z_NxF = sae_lib.get(spec.arch).encode(params, flat_NxD, spec)
  sq_err = jnp.sum(jnp.square(z_NxF @ params['W_dec'] + params['b_dec'] - flat_NxD))
  return sq_err, jnp.mean(jnp.sum(z_NxF > 0, axis=-1)), jnp.any(z_NxF > 0, axis=0)


_ce = jax.jit(_next_token_ce)
_kl_jit = jax.jit(_kl)


def _multi_process(model) -> bool:
  return jax.process_count() > 1 and getattr(model, 'mesh', None) is not None


def _put_tokens(model, tokens_BxT) -> jax.Array:
  """One process: the batch as given. Several: this process's rows, assembled into the global batch."""
  if _multi_process(model):
    return model.place_tokens(tokens_BxT)
  return jnp.asarray(np.asarray(tokens_BxT, np.int32))


def _put(model, value: np.ndarray) -> jax.Array:
  """Seed params: on the default device, or replicated over the model's mesh when it spans processes."""
  if _multi_process(model):
    return jax.make_array_from_process_local_data(NamedSharding(model.mesh, P()), np.asarray(value), np.shape(value))
  return jnp.asarray(value)


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host; an array spanning processes is all-gathered (every process must call)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def evaluate_on_lm(
  model, hookpoint: str, params_S: Mapping[str, np.ndarray], spec: sae_lib.SaeSpec, token_batches: Iterable[np.ndarray]
) -> dict[str, Any]:
  """Returns {'tokens', 'ce_clean', 'seeds': [{ce, ce_increase, kl, fvu, l0, dead_fraction}, ...]}.

  The reconstruction enters the forward as `jax.tree_util.Partial(fn, params)`, so one compiled forward
  serves every seed.
  """
  num_seeds = int(np.shape(params_S['W_dec'])[0])
  seed_params = [{name: _put(model, value[s]) for name, value in params_S.items()} for s in range(num_seeds)]
  splice = functools.partial(_reconstruct, spec)
  totals = np.zeros((num_seeds, 4))  # ce, kl, squared error, l0
  fired = np.zeros((num_seeds, spec.num_latents), bool)
  ce_clean, batches, tokens, sum_x, sum_xx = 0.0, 0, 0, 0.0, 0.0
  for tokens_BxT in token_batches:
    tokens_BxT = _put_tokens(model, tokens_BxT)
    clean_logits = model.logits(tokens_BxT)
    acts_BxTxD = model.activations(tokens_BxT, [hookpoint])[hookpoint]
    ce_clean += float(_ce(clean_logits, tokens_BxT))
    flat = np.asarray(_to_host(acts_BxTxD), np.float64).reshape(-1, acts_BxTxD.shape[-1])
    sum_x, sum_xx = sum_x + flat.sum(axis=0), sum_xx + np.square(flat).sum(axis=0)
    for s, params in enumerate(seed_params):
      spliced = model.logits(tokens_BxT, replace={hookpoint: jax.tree_util.Partial(splice, params)})
      sq_err, l0, fired_F = _sae_stats(spec, params, acts_BxTxD)
      totals[s] += [float(_ce(spliced, tokens_BxT)), float(_kl_jit(clean_logits, spliced)), float(sq_err), float(l0)]
      fired[s] |= _to_host(fired_F)
    batches, tokens = batches + 1, tokens + flat.shape[0]
  if batches == 0:
    raise ValueError('no evaluation batches: raise eval_tokens or check the dataset')
  variance = float(np.sum(sum_xx - np.square(sum_x) / tokens))
  ce_clean /= batches
  seeds = [
    {
      'ce': totals[s, 0] / batches,
      'ce_increase': totals[s, 0] / batches - ce_clean,
      'kl': totals[s, 1] / batches,
      'fvu': totals[s, 2] / variance,
      'l0': totals[s, 3] / batches,
      'dead_fraction': float(1.0 - fired[s].mean()),
    }
    for s in range(num_seeds)
  ]
  return {'tokens': tokens, 'ce_clean': ce_clean, 'seeds': seeds}
