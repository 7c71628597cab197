"""The train state of S seeds and the pure step that advances a group of them on one batch.

The step is written for one SAE and vmapped over the leading seed axis with the batch broadcast
(`in_axes=None`), so the shared activations are never copied per seed and seeds never interact: each has
its own clipping, Adam moments and dead-latent counter. saejax.train.seed_groups compiles and runs it.

The learning rate, the L1 coefficient, the schedule's step counts and the dead-latent window are inputs of the
step, one value per member of the group (`member_hparams`), not constants compiled into it: variants that differ
only in the rate or the coefficient (saejax.variants) share one compiled step and fill its groups, runs that differ
only in length, warm-up or window share one program (and its compilation), and a setting runs the same program
whatever its values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from saejax import sae as sae_lib
from saejax import sharding as shd
from saejax.train import optimizer

TrainState = dict[str, Any]
# Counters saturate instead of wrapping: a never-firing latent at 8B tokens overflows int32.
_COUNTER_CAP = np.iinfo(np.int32).max
# The per-member values a group step takes as inputs, each read from the member's config attribute (with its
# dtype): peak learning rate, L1 coefficient, the schedule's step counts and the dead-latent window.
_HPARAM_ATTRS = {
  'lr': ('learning_rate', np.float32),
  'l1_coefficient': ('l1_coefficient', np.float32),
  'warmup_steps': ('resolved_warmup_steps', np.int32),
  'num_steps': ('num_steps', np.int32),
  'dead_tokens': ('dead_tokens', np.int32),
}
HPARAMS = tuple(_HPARAM_ATTRS)


def member_hparams(configs: Sequence[Any]) -> dict[str, np.ndarray]:
  """{name: [M]}: the HPARAMS of each member's config (one config per member, in member order)."""
  return {name: np.asarray([getattr(c, attr) for c in configs], dtype) for name, (attr, dtype) in _HPARAM_ATTRS.items()}


def hparams_struct(group_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of one group's hparams (for lowering and export without values)."""
  return {name: jax.ShapeDtypeStruct((group_size,), dtype) for name, (_, dtype) in _HPARAM_ATTRS.items()}


def seed_keys(init_seeds: Sequence[int]) -> jax.Array:
  """One PRNG key per seed, each depending only on its own seed."""
  return jnp.stack([jax.random.PRNGKey(seed) for seed in init_seeds])


def init_state(
  arch: sae_lib.Architecture, spec: sae_lib.SaeSpec, tx: optax.GradientTransformation, init_seeds: Sequence[int]
) -> TrainState:
  params = jax.vmap(lambda key: arch.init(key, spec))(seed_keys(init_seeds))
  return {
    'params': params,
    'opt_state': jax.vmap(tx.init)(params),
    'tokens_since_fired': jnp.zeros((len(init_seeds), spec.num_latents), jnp.int32),
    'step': jnp.zeros((), jnp.int32),
  }


def create_state(arch, spec, tx, init_seeds, mesh: Mesh) -> TrainState:
  """Initialises directly onto the mesh, so no host ever holds a full replicated copy.

  Each seed is initialised by the same one-seed program and the results stacked, so a seed's initial SAE does
  not depend on which seeds share the run (the step's guarantee, saejax.train.seed_groups, starts here).
  """
  one = jax.eval_shape(lambda: init_state(arch, spec, tx, init_seeds[:1]))
  init_one = jax.jit(
    lambda seed: init_state(arch, spec, tx, [seed]), out_shardings=shd.state_shardings(mesh, one, spec.num_latents)
  )
  per_seed = [init_one(seed) for seed in init_seeds]
  abstract = jax.eval_shape(lambda: init_state(arch, spec, tx, init_seeds))
  shardings = shd.state_shardings(mesh, abstract, spec.num_latents)

  def stack(states):
    def concat(*leaves):
      return jnp.concatenate(leaves)

    stacked = {key: jax.tree.map(concat, *[s[key] for s in states]) for key in states[0] if key != 'step'}
    return {**stacked, 'step': states[0]['step']}

  return jax.jit(stack, out_shardings=shardings)(per_seed)


def set_b_dec(state: TrainState, b_dec_D: jax.Array) -> TrainState:
  """Every seed starts from the same data-derived b_dec (the first batch's mean or geometric median)."""
  params = state['params']
  b_dec_SxD = jnp.broadcast_to(b_dec_D, params['b_dec'].shape).astype(params['b_dec'].dtype)
  return {**state, 'params': {**params, 'b_dec': b_dec_SxD}}


def make_group_step(
  arch: sae_lib.Architecture, spec: sae_lib.SaeSpec, tx: optax.GradientTransformation
) -> Callable[[TrainState, jax.Array], tuple]:
  """Returns the pure step `(state, x_BxD, hparams) -> (state, metrics)` of the g seeds stacked in `state`.

  `hparams` holds [g] values of each HPARAMS name; `tx` is the optimiser at a constant rate of 1, and each
  member's update is scaled by its own peak rate times its schedule at this step (optimizer.unit_lr of its
  `warmup_steps` and `num_steps`). Metrics hold one value per seed. The seeds
  never interact, and saejax.train.seed_groups runs S seeds as calls of this step on fixed-size groups, so a seed's
  result does not depend on S.
  """

  def seed_step(params, opt_state, since_fired_F, x_BxD, hparams, step):
    dead_tokens = hparams['dead_tokens']
    dead_F = since_fired_F >= dead_tokens
    own = dataclasses.replace(spec, l1_coefficient=hparams['l1_coefficient'])
    (loss, aux), grads = jax.value_and_grad(arch.loss, has_aux=True)(params, x_BxD, dead_F, own)
    updates, opt_state = tx.update(grads, opt_state, params)
    rate = hparams['lr'] * optimizer.unit_lr(step, hparams['warmup_steps'], hparams['num_steps'])
    updates = jax.tree.map(lambda update: rate * update, updates)
    params = arch.post_update(optax.apply_updates(params, updates), aux, own)
    num_tokens = x_BxD.shape[0]
    since_fired_F = jnp.where(aux['fired_F'], 0, jnp.minimum(since_fired_F, _COUNTER_CAP - num_tokens) + num_tokens)
    metrics = {
      'loss': loss,
      'fvu': aux['fvu'],
      'l0': aux['l0'],
      'dead_fraction': jnp.mean(since_fired_F >= dead_tokens),
      'grad_norm': optax.tree.norm(grads),
      'input_finite': jnp.all(jnp.isfinite(x_BxD)),
    }
    return params, opt_state, since_fired_F, metrics

  seeds_step = jax.vmap(seed_step, in_axes=(0, 0, 0, None, 0, None))

  def group_step(state: TrainState, x_BxD: jax.Array, hparams: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    params, opt_state, since_fired, metrics = seeds_step(
      state['params'], state['opt_state'], state['tokens_since_fired'], x_BxD, hparams, state['step']
    )
    new_state = {'params': params, 'opt_state': opt_state, 'tokens_since_fired': since_fired, 'step': state['step'] + 1}
    return new_state, metrics

  return group_step
