"""The recipe's optimiser for one SAE: per-SAE clipping, decoder-gradient projection, Adam with warm-up and decay.

Built for a single SAE and vmapped over seeds by the step (`jax.vmap(tx.update)`), so the global-norm clip
is per seed: a joint clip would let one seed's large gradient shrink every other seed's update.
"""

from __future__ import annotations

import optax

from saejax.sae.base import remove_parallel_component


def lr_schedule(peak_lr: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
  """Linear warm-up to `peak_lr` over `warmup_steps` (< `num_steps`; `TrainConfig.resolved_warmup_steps`), then
  linear decay to 0 at the last step (recipe.md section 1)."""
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
  """(tx at a peak rate of 1, that schedule at a peak of 1).

  The train step scales each SAE's update by its own peak rate (saejax.train.step.member_hparams), so variants
  that differ only in the rate share one optimiser and one compiled step; the rate a run logs at step t is
  `config.learning_rate * schedule(t)`.
  """
  unit = lr_schedule(1.0, config.resolved_warmup_steps, config.num_steps)
  tx = optax.chain(
    optax.clip_by_global_norm(config.grad_clip),
    project_decoder_gradient(),
    optax.adam(unit, b1=0.9, b2=0.999, eps=1e-8),
  )
  return tx, unit
