"""The train step exported for a platform this machine need not have: what an accelerator would run, checked here.

`export_train_step(config, 'cuda')` lowers the paper-size step of `config` with `jax.export` for CUDA (or TPU)
from abstract shapes alone: nothing is allocated and nothing runs, so a CPU can inspect the StableHLO a GPU would
compile. The per-platform choices (saejax.tuning) resolve for the target platform, not for this machine.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from saejax import sae as sae_lib
from saejax.config import TrainConfig
from saejax.train import optimizer
from saejax.train import step as step_lib

# jax.export's platform names -> the device platform names saejax.tuning takes.
TUNING_PLATFORM = {'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu', 'cpu': 'cpu'}


def export_train_step(config: TrainConfig, platform: str) -> jax.export.Exported:
  """The single-device step `(state, x_BxD) -> (state, metrics)` for all of `config.init_seeds`, exported."""
  target = TUNING_PLATFORM[platform]
  arch = sae_lib.get(config.arch)
  spec = sae_lib.SaeSpec.from_config(config, platform=target)
  tx, _ = optimizer.make_optimizer(config)
  step_fn = step_lib.make_train_step(arch, spec, tx, config.dead_tokens, config.resolved_seed_group_size(target))
  state = jax.eval_shape(lambda: step_lib.init_state(arch, spec, tx, config.init_seeds))
  x_BxD = jax.ShapeDtypeStruct((config.batch_size, config.d_in), jnp.float32)
  return jax.export.export(jax.jit(step_fn), platforms=[platform])(state, x_BxD)


def while_loops(exported: jax.export.Exported) -> int:
  """How many `while` ops the exported module holds (a sequential loop on the device)."""
  return len(re.findall(r'stablehlo\.while', exported.mlir_module()))


def operand_types(exported: jax.export.Exported, op: str) -> list[str]:
  """The textual operand types of every `op` (e.g. 'stablehlo.dot_general') in the exported module."""
  pattern = re.compile(rf'{re.escape(op)}\b[^\n]*?:\s*\(([^)]*)\)')
  return pattern.findall(exported.mlir_module())
