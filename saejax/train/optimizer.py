"""The recipe's optimiser for one SAE: per-SAE clipping, decoder-gradient projection, Adam, and the warm-up and decay
schedule that the train step applies.

Built for a single SAE and vmapped over seeds by the step (`jax.vmap(tx.update)`), so the global-norm clip
is per seed: a joint clip would let one seed's large gradient shrink every other seed's update.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from saejax.sae.base import remove_parallel_component


def unit_lr(step, warmup_steps, num_steps, xp=jnp):
  """The recipe's learning rate at a peak of 1 for update `step` (0-based), in float32 (recipe.md section 1):
  linear warm-up from 1/w to 1 over the first w = `warmup_steps` updates (`TrainConfig.resolved_warmup_steps`,
  < `num_steps`), then linear decay to 0 at the last step.

  Plain arithmetic on its inputs, so it runs on traced values (the train step takes the step counts as inputs,
  and runs that differ only in their length or warm-up share one compiled program) and, with `xp=np`, on the
  host for the log.
  """
  f32 = xp.float32
  step, warmup, steps = (xp.asarray(v).astype(f32) for v in (step, warmup_steps, num_steps))
  span = xp.maximum(warmup, f32(1))
  start = f32(1) / span
  warm = start + (f32(1) - start) * (xp.minimum(step, span) / span)
  decay_span = xp.maximum(steps - warmup, f32(1))
  decay = f32(1) - xp.clip(step - warmup, f32(0), decay_span) / decay_span
  return xp.where(step < warmup, warm, decay)


def project_decoder_gradient() -> optax.GradientTransformation:
  """Removes from each decoder row's gradient its component along that row (rows stay unit-norm)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('project_decoder_gradient needs params')
    updates = {**updates, 'W_dec': remove_parallel_component(updates['W_dec'], params['W_dec'])}
    return updates, state

  return optax.GradientTransformation(init, update)


def make_optimizer(config) -> optax.GradientTransformation:
  """`config`'s optimiser at a constant rate of 1.

  The train step scales each SAE's update by its own peak rate times `unit_lr` at that step, both from inputs of
  the step (saejax.train.step.member_hparams), so variants that differ only in the rate or warm-up, and runs that
  differ only in length, share one compiled step. Adam's rate is a schedule returning 1 rather than a constant so
  that its state keeps a step count (the layout of checkpoints written before the schedule became an input).
  """
  return optax.chain(
    optax.clip_by_global_norm(config.grad_clip),
    project_decoder_gradient(),
    optax.adam(lambda count: 1.0, b1=0.9, b2=0.999, eps=1e-8),
  )


def learning_rate_at(config, step: int) -> float:
  """The rate `config`'s SAEs take at update `step` (0-based), as the log reports it."""
  return float(config.learning_rate * unit_lr(step, config.resolved_warmup_steps, config.num_steps, xp=np))
