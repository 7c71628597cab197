"""The learning-rate schedule is an input of the train step: it is the recipe's warm-up and decay, and runs that
differ only in length, warm-up or dead-latent window compile one program."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from saejax import sae
from saejax.config import TrainConfig
from saejax.train import optimizer
from saejax.train import step as step_lib


@pytest.mark.parametrize('warmup,num_steps', [(5, 100), (0, 10), (1, 2), (100, 1500)])
def test_unit_lr_is_linear_warmup_then_linear_decay(warmup, num_steps):
  # optax's own schedules as the reference (what the optimiser used before the schedule became an input).
  warm = optax.linear_schedule(1.0 / max(warmup, 1), 1.0, warmup)
  decay = optax.linear_schedule(1.0, 0.0, max(num_steps - warmup, 1))
  reference = optax.join_schedules([warm, decay], [warmup])
  steps = np.arange(num_steps + 2)
  expected = np.asarray([float(reference(t)) for t in steps])
  on_host = optimizer.unit_lr(steps, warmup, num_steps, xp=np)
  traced = jax.jit(optimizer.unit_lr)(steps.astype(np.int32), np.int32(warmup), np.int32(num_steps))
  np.testing.assert_allclose(on_host, expected, rtol=0, atol=2e-7)
  np.testing.assert_allclose(np.asarray(traced), on_host, rtol=3e-7, atol=0)  # XLA may divide a last bit apart
  assert on_host[0] == np.float32(1 / max(warmup, 1)) and on_host[num_steps] == 0.0


def _lowered(config):
  arch = sae.get(config.arch)
  spec = sae.SaeSpec.from_config(config, platform='cpu')
  tx = optimizer.make_optimizer(config)
  group = jax.eval_shape(lambda: step_lib.init_state(arch, spec, tx, (0,)))
  x = jax.ShapeDtypeStruct((config.batch_size, config.d_in), np.float32)
  return jax.jit(step_lib.make_group_step(arch, spec, tx)).lower(group, x, step_lib.hparams_struct(1)).as_text()


def test_length_warmup_and_dead_window_do_not_change_the_program():
  base = TrainConfig(d_in=16, num_latents=64, k=4, batch_size=64, num_tokens=64 * 100, warmup_steps=5)
  same = _lowered(base)
  for change in ({'num_tokens': 64 * 7}, {'warmup_steps': 0}, {'dead_tokens': 123}, {'lr': 1e-2}):
    assert _lowered(dataclasses.replace(base, **change)) == same, change
  assert _lowered(dataclasses.replace(base, k=8)) != same  # a shape the program depends on does change it
