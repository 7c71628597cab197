"""The real-model benchmark: SmolLM2-135M from its GGUF, side by side with transformers+torch, and the cache.

  python -m experiments.benchmark smollm2 [--smollm2_rows=4 --smollm2_context=512 --smollm2_hookpoint=layers.6.mlp]

Prints one JSON line per measurement, each naming the machine:
- `smollm2_lm`: saejax's forward up to the hookpoint against transformers' GGUF load truncated to the same layers
  (torch with 2 threads), on the same real tokens (the corpus's first batch), in float32 and bfloat16; timings
  are the minimum over interleaved repeats, and the ratio is the one to read;
- `smollm2_cache_write`: `experiments.cache` tokens/s (the LM included) into a temporary folder;
- `smollm2_cache_read`: batches read from that cache onto the device, tokens/s;
- `smollm2_train_from_cache`: the nine-seed step fed from the cache, tokens/s, and the share of a step spent reading.
Needs `python -m experiments.fetch smollm2` and `python -m experiments.corpus` first.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

_ROWS = flags.DEFINE_integer('smollm2_rows', 4, 'smollm2: sequences per LM batch.')
_CONTEXT = flags.DEFINE_integer('smollm2_context', 512, 'smollm2: tokens per sequence.')
_HOOKPOINT = flags.DEFINE_string('smollm2_hookpoint', 'layers.6.mlp', 'smollm2: where the LM forward stops.')
_CACHE_BATCHES = flags.DEFINE_integer('smollm2_cache_batches', 24, 'smollm2: LM batches written to the cache.')
_TRAIN_STEPS = flags.DEFINE_integer('smollm2_train_steps', 8, 'smollm2: timed nine-seed steps from the cache.')
_THREADS = flags.DEFINE_integer('torch_threads', 2, 'smollm2: torch intra-op threads.')


def _min_time(fn, repeats: int) -> float:
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def _config():
  from experiments import presets

  config = presets.smollm2()  # its batch (4 x 512 tokens) unless the flags say otherwise
  config.context_length = _CONTEXT.value
  config.batch_size = _ROWS.value * _CONTEXT.value
  config.hookpoint = _HOOKPOINT.value
  config.eval_tokens = 0
  return config


def _torch_model(path: str, dtype_name: str, stop_layer: int):
  import torch
  import transformers

  torch.set_num_threads(_THREADS.value)
  folder, name = path.rsplit('/', 1)
  dtype = torch.float32 if dtype_name == 'float32' else torch.bfloat16
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval()
  model.model.layers = model.model.layers[: stop_layer + 1]  # the same layers saejax runs
  return model


def bench_lm_forward(config, tokens_RxT: np.ndarray, machine: dict, repeats: int) -> list[dict]:
  import torch

  from saejax import models

  layer, _ = models.parse_hookpoint(config.hookpoint)
  records = []
  tokens_torch = torch.from_numpy(tokens_RxT.astype(np.int64))
  for dtype_name in ('float32', 'bfloat16'):
    model = models.load_pretrained(config.model, dtype=jnp.dtype(dtype_name))
    reference = _torch_model(model.path, dtype_name, layer)

    def ours(model=model):
      return model.activations(tokens_RxT, [config.hookpoint])[config.hookpoint]

    def theirs(reference=reference):
      with torch.inference_mode():
        return reference.model(tokens_torch).last_hidden_state

    jax.block_until_ready(ours())
    theirs()
    ours_s = theirs_s = float('inf')
    for _ in range(repeats):  # interleaved, so both see the same machine load
      ours_s = min(ours_s, _min_time(ours, 1))
      theirs_s = min(theirs_s, _min_time(theirs, 1))
    tokens = tokens_RxT.size
    records.append(
      {
        'bench': 'smollm2_lm',
        'model': 'SmolLM2-135M-Instruct Q4_1 GGUF, dequantized',
        'dtype': dtype_name,
        'hookpoint': config.hookpoint,
        'tokens': tokens,
        'saejax_s': round(ours_s, 4),
        'torch_s': round(theirs_s, 4),
        'saejax_over_torch': round(ours_s / theirs_s, 3),
        'saejax_tokens_per_s': round(tokens / ours_s, 1),
        'torch_tokens_per_s': round(tokens / theirs_s, 1),
        'torch': {'version': torch.__version__, 'threads': torch.get_num_threads()},
        'machine': machine,
      }
    )
    del model, reference
  return records


def bench_cache(config, machine: dict, repeats: int) -> list[dict]:
  from saejax import sharding as shd
  from saejax.data import cache_writer
  from saejax.data.cache_source import CacheActivationSource
  from saejax.train import trainer as trainer_lib
  from saejax.train.trainer import Trainer

  records = []
  with tempfile.TemporaryDirectory(prefix='saejax-bench-cache-') as out:
    num_tokens = _CACHE_BATCHES.value * config.batch_size
    written = cache_writer.write_cache(config, out, num_tokens, 'bfloat16', progress=False)
    records.append(
      {
        'bench': 'smollm2_cache_write',
        'hookpoint': config.hookpoint,
        'lm_dtype': config.lm_dtype,
        'cache_dtype': 'bfloat16',
        'tokens': written['tokens'],
        'seconds': round(written['seconds'], 3),
        'tokens_per_s': round(written['tokens_per_s'], 1),
        'machine': machine,
      }
    )
    train = dataclasses.replace(
      config,
      source='cache',
      dataset=out,
      num_tokens=written['tokens'],
      init_seeds=tuple(range(9)),
    )
    mesh = shd.make_mesh(-1, 1)
    source = CacheActivationSource(train, shd.batch_sharding(mesh))
    batches = source.num_sequences * train.context_length // train.batch_size
    jax.block_until_ready(source.batch_at(0))
    start = time.perf_counter()
    for position in range(batches):
      jax.block_until_ready(source.batch_at(position))
    read_s = (time.perf_counter() - start) / batches
    records.append(
      {
        'bench': 'smollm2_cache_read',
        'batch': train.batch_size,
        'batches': batches,
        'batch_s': round(read_s, 5),
        'tokens_per_s': round(train.batch_size / read_s, 1),
        'machine': machine,
      }
    )
    trainer = Trainer(train, workdir='', mesh=mesh)
    step = trainer_lib.stepper(trainer)
    state = step.fresh()
    state, _ = step(state, trainer.next_inputs())  # compile
    jax.block_until_ready(state)
    steps = min(_TRAIN_STEPS.value, batches - 1)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, trainer.next_inputs())
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / steps
    records.append(
      {
        'bench': 'smollm2_train_from_cache',
        'seeds': 9,
        'num_latents': train.num_latents,
        'k': train.k,
        'batch': train.batch_size,
        'step_s': round(step_s, 4),
        'tokens_per_s': round(train.batch_size / step_s, 1),
        'read_share_of_step': round(read_s / step_s, 4),
        'machine': machine,
      }
    )
  del repeats
  return records


def run(machine: dict, repeats: int) -> None:
  from saejax.data.lm import open_tokens
  from saejax.models import registry

  config = _config()
  tokens_RxT = open_tokens(config.dataset, config, _ROWS.value, str(registry.gguf_file('smollm2'))).batch_at(0)
  for record in bench_lm_forward(config, tokens_RxT, machine, repeats):
    print(json.dumps(record), flush=True)
  for record in bench_cache(config, machine, repeats):
    print(json.dumps(record), flush=True)
