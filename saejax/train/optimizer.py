"""The recipe's optimiser for one SAE: per-SAE clipping, decoder-gradient projection, Adam with warm-up and decay.

Built for a single SAE and vmapped over seeds by the step (`jax.vmap(tx.update)`), so the global-norm clip
is per seed: a joint clip would let one seed's large gradient shrink every other seed's update.
"""

from __future__ import annotations

import logging

import optax

from saejax.sae.base import remove_parallel_component

_WARNED: set[tuple[int, int]] = set()


def lr_schedule(peak_lr: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
  """Linear warm-up to `peak_lr`, then linear decay to 0 at the last step (recipe.md section 1)."""
  if warmup_steps >= num_steps:
    shortened = max(1, num_steps // 10)
    if (warmup_steps, num_steps) not in _WARNED:  # once per run, not once per variant
      _WARNED.add((warmup_steps, num_steps))
      logging.warning('warmup_steps=%d >= num_steps=%d; warming up over %d steps', warmup_steps, num_steps, shortened)
    warmup_steps = shortened
  warmup = optax.linear_schedule(peak_lr / max(warmup_steps, 1), peak_lr, warmup_steps)
  decay = optax.linear_schedule(peak_lr, 0.0, max(num_steps - warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [warmup_steps])


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


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx at a peak rate of 1, the run's learning-rate schedule for logging).

  The train step scales each SAE's update by its own peak rate (saejax.train.step.member_hparams), so variants
  that differ only in the rate share one optimiser and one compiled step.
  """
  unit = lr_schedule(1.0, config.warmup_steps, config.num_steps)
  tx = optax.chain(
    optax.clip_by_global_norm(config.grad_clip),
    project_decoder_gradient(),
    optax.adam(unit, b1=0.9, b2=0.999, eps=1e-8),
  )
  peak = config.learning_rate
  return tx, lambda step: peak * unit(step)
