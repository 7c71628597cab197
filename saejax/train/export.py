"""What an accelerator would run, built and inspected on a machine that has none.

`export_train_step(config, 'cuda')` lowers the step of `config` with `jax.export` for CUDA (or TPU), and
`export_lm_forward(cfg, 'cuda', ...)` the LM forward, from abstract shapes alone: nothing is allocated and nothing
runs, so a CPU can inspect the StableHLO a GPU would compile at the paper's sizes. The per-platform choices
(saejax.tuning) resolve for the target platform, not for this machine. The inspectors read the module's text:
`while_loop_trip_counts` (sequential loops on the device), `tensor_types`, `operand_types` and `custom_calls`.
`compile_seconds` times XLA's compile of a function for this machine's backend, from shapes alone too.
"""

from __future__ import annotations

import functools
import re
import time

import jax
import jax.numpy as jnp

from saejax import sae as sae_lib
from saejax import tuning
from saejax.config import TrainConfig
from saejax.models import forward as forward_lib
from saejax.models import shapes
from saejax.models.config import ModelConfig
from saejax.train import optimizer
from saejax.train import step as step_lib

# jax.export's platform names -> the device platform names saejax.tuning takes.
TUNING_PLATFORM = {'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu', 'cpu': 'cpu'}
# cuDNN's attention custom calls carry no serialisation guarantee; exporting them is fine for inspection.
_CUDNN_CALLS = ('__cudnn$fmhaSoftmax', '__cudnn$fmhaSoftmaxBackward')


def train_step_parts(config: TrainConfig, platform: str):
  """`(group_step, init_fn, x_struct, hparams_struct)` for `config` on `platform` ('cpu', 'gpu', 'tpu'): the pure
  step `(state, x_BxD, hparams) -> (state, metrics)` of one seed group (what each call runs;
  saejax.train.seed_groups), the function making a fresh group state, the batch's shape and the members' hparams'."""
  arch = sae_lib.get(config.arch)
  spec = sae_lib.SaeSpec.from_config(config, platform=platform)
  tx = optimizer.make_optimizer(config)
  group_step = step_lib.make_group_step(arch, spec, tx)
  group_size = config.resolved_seed_group_size(platform) or len(config.init_seeds)
  init_fn = functools.partial(step_lib.init_state, arch, spec, tx, tuple(range(group_size)))
  hparams = step_lib.hparams_struct(group_size)
  return group_step, init_fn, jax.ShapeDtypeStruct((config.batch_size, config.d_in), jnp.float32), hparams


def export_train_step(config: TrainConfig, platform: str) -> jax.export.Exported:
  """`config`'s group step exported for `platform` ('cuda', 'tpu', 'cpu')."""
  step_fn, init_fn, x_struct, hparams = train_step_parts(config, TUNING_PLATFORM[platform])
  return jax.export.export(jax.jit(step_fn), platforms=[platform])(jax.eval_shape(init_fn), x_struct, hparams)


def lm_forward_fn(cfg: ModelConfig, platform: str, dtype: str, stop_layer: int | None = None, attention=None):
  """`run(params, tokens_BxT)`: the forward to `stop_layer`'s MLP output, or through every block to the logits if
  None, with `platform`'s attention (saejax.tuning's choice for a `dtype` model here, unless `attention` says)."""
  attention = attention or tuning.lm_attention(platform, dtype, cfg.head_dim)
  want_logits = stop_layer is None
  taps = () if want_logits else (f'layers.{stop_layer}.mlp',)

  def run(params, tokens_BxT):
    params = forward_lib.trim_params(params, cfg.num_layers - 1 if want_logits else stop_layer, want_logits)
    acts, logits = forward_lib.forward(
      params,
      tokens_BxT,
      {},
      cfg=cfg,
      taps=taps,
      want_logits=want_logits,
      attention=attention,
      attention_block=tuning.attention_block(platform),
    )
    return logits if want_logits else acts[taps[0]]

  return run


def export_lm_forward(
  cfg: ModelConfig, platform: str, batch: int, seq: int, dtype: str = 'bfloat16', stop_layer=None, attention=None
) -> jax.export.Exported:
  """The LM forward exported for `platform`; `attention=None` is saejax.tuning's choice for that platform here."""
  target = TUNING_PLATFORM[platform]
  run = lm_forward_fn(cfg, target, dtype, stop_layer, attention)
  args = (shapes.abstract_params(cfg, jnp.dtype(dtype)), jax.ShapeDtypeStruct((batch, seq), jnp.int32))
  checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in _CUDNN_CALLS]
  return jax.export.export(jax.jit(run), platforms=[platform], disabled_checks=checks)(*args)


def compile_seconds(fn, args) -> float:
  """Seconds to lower and compile `jax.jit(fn)` for this machine's default backend at `args`' shapes."""
  start = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - start


_FUNC = re.compile(r'func\.func ')
_INT_CONSTANT = re.compile(r'(%[\w.#]+) = stablehlo\.constant dense<(-?\d+)> : tensor<i(?:32|64)>')
_COMPARE_LT = re.compile(r'stablehlo\.compare\s+LT,\s*(%[\w.#]+),\s*(%[\w.#]+)')


def while_loop_trip_counts(exported: jax.export.Exported) -> list[int]:
  """The trip count of every `while` loop in the module (-1 where it is not a constant), in program order.

  jax lowers `lax.map`, `fori_loop` and `scan` to a `while` whose condition is `counter < constant` with the
  counter starting at 0, so the constant is the trip count.
  """
  counts = []
  for body in _FUNC.split(exported.mlir_module())[1:]:
    constants, in_cond = {}, False
    for line in body.splitlines():
      for name, value in _INT_CONSTANT.findall(line):
        constants[name] = int(value)
      stripped = line.strip()
      if stripped == 'cond {':
        in_cond = True
      elif in_cond and (match := _COMPARE_LT.search(line)):
        counts.append(constants.get(match.group(2), -1))
        in_cond = False
  return counts


def tensor_types(exported: jax.export.Exported) -> set[str]:
  """Every tensor type the module mentions, e.g. 'tensor<32x12x2049x2049xf32>'."""
  return set(re.findall(r'tensor<[^<>]*>', exported.mlir_module()))


def operand_types(exported: jax.export.Exported, op: str) -> list[str]:
  """The textual operand types of every `op` (e.g. 'stablehlo.dot_general') in the exported module."""
  pattern = re.compile(rf'{re.escape(op)}\b[^\n]*?:\s*\(([^)]*)\)')
  return pattern.findall(exported.mlir_module())


def custom_calls(exported: jax.export.Exported) -> list[str]:
  """The targets of the module's custom calls (e.g. cuDNN's '__cudnn$fmhaSoftmax')."""
  return re.findall(r'stablehlo\.custom_call @([\w$.]+)', exported.mlir_module())
