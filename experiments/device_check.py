"""The one device script: what saejax's accelerator path costs, one JSON line per measurement.

  python -m experiments.device_check --out=device_check.jsonl [--gguf=SmolLM2-135M-Instruct.Q4_1.gguf]
  python -m experiments.device_check --dry-run     # tiny shapes on CPU, in the test suite

Runs in <= 8 minutes on one H200 (`--budget_s`, default 450: a measurement that would start later prints a
`skipped` line instead). Needs only the checkout and what the GPU image has (jax with CUDA, flax, optax, orbax,
transformers, torch, scipy, tqdm), plus a cp312 `lapjv` wheel; `--gguf` also needs the `gguf` wheel. In order:

1. `sae_step`: the paper-size step (d=768, M=32768, k=32, 32 x 2049 tokens) for S=1 and S=9 seeds in float32
   and bfloat16, and the dense TopK formulation at S=1, each next to S x the encoder matmul [B,d] x [d,M] in
   the same dtype, measured in the same process. Each line has the kernel plan, XLA's temp bytes and the
   device's peak memory so far.
2. `lm_forward`: Pythia-160M-shaped random weights to layers.6.mlp, and SmolLM2-135M through all 30 blocks (the
   GGUF with `--gguf`; else its shapes with random weights, which run at the same speed), bf16, 32 x 2049
   tokens, next to transformers+torch (sdpa attention, bf16) on the same device and shapes.
3. `full_step`: the Pythia forward to layers.6.mlp plus nine bf16 SAEs per batch, and the paper's run
   (9 x 32K latents, 8B tokens) extrapolated in hours.
4. `align`: one encoder and one decoder matching of a planted 32,768 pair and of a 131,072 pair.
5. `variants_step`: Fig. 4's k sweep (k/2, k, 2k at M/4 latents, bf16) as the trainer runs variants now, one
   group of three seeds per k, against what a masked top-k (one vmapped group at the largest k) would cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp

from experiments.benchmark import cpu_model, planted_pair
from saejax import sharding as shd
from saejax import tuning
from saejax.config import TrainConfig
from saejax.models import shapes
from saejax.models.config import RopeSpec
from saejax.sae import kernels
from saejax.train import export, seed_groups

PAPER_RUN_TOKENS = 8_000_000_000


@dataclasses.dataclass(frozen=True)
class Sizes:
  d_in: int = 768
  num_latents: int = 32768
  k: int = 32
  rows: int = 32
  seq: int = 2049
  seeds: tuple[int, ...] = (1, 9)
  align_ns: tuple[int, ...] = (32768, 131072)
  pythia: str = 'pythia-160m'
  smollm2: str = 'smollm2-135m'
  pythia_layer: int = 6
  repeats: int = 5

  def model(self, name: str):
    return shapes.PRESETS[name]


@dataclasses.dataclass(frozen=True)
class DrySizes(Sizes):
  d_in: int = 32
  num_latents: int = 256
  k: int = 4
  rows: int = 2
  seq: int = 33
  seeds: tuple[int, ...] = (1, 3)
  align_ns: tuple[int, ...] = (256, 512)
  pythia_layer: int = 1
  repeats: int = 2

  def model(self, name: str):
    tiny = {'num_layers': 2, 'd_model': 64, 'vocab_size': 512, 'head_dim': 16, 'intermediate_size': 128}
    heads = {'num_heads': 4, 'num_kv_heads': 4 if name == 'pythia-160m' else 2}
    rope = RopeSpec(4 if name == 'pythia-160m' else 16, shapes.PRESETS[name].rope.theta)
    return dataclasses.replace(shapes.PRESETS[name], **tiny, **heads, rope=rope)


class Report:
  """Prints one JSON line per measurement (and appends it to --out), skipping what would start past the budget."""

  def __init__(self, out: str | None, budget_s: float):
    self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()

  def emit(self, record: dict) -> None:
    line = json.dumps({**record, 'elapsed_s': sig(time.perf_counter() - self.start)})
    print(line, flush=True)
    if self.out:
      with open(self.out, 'a') as f:
        f.write(line + '\n')

  def run(self, measure: str, labels: dict, fn, *args) -> None:
    """Emits `fn(*args)` labelled, or why it did not run."""
    if time.perf_counter() - self.start > self.budget_s:
      self.emit({'measure': measure, **labels, 'skipped': f'past the {self.budget_s:.0f} s budget'})
      return
    try:
      self.emit({'measure': measure, **labels, **fn(*args), **memory()})
    except Exception as error:  # noqa: BLE001 - one failed measurement must not lose the others
      self.emit({'measure': measure, **labels, 'error': f'{type(error).__name__}: {str(error)[:300]}'})


def sig(value: float) -> float:
  """Four significant figures: tiny dry-run times stay meaningful, long ones readable."""
  return float(f'{value:.4g}')


def memory() -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  return {'device_peak_bytes': stats.get('peak_bytes_in_use'), 'device_bytes_in_use': stats.get('bytes_in_use')}


def best_seconds(fn, repeats: int) -> float:
  """Minimum wall time of `fn()` (run to completion) over `repeats`, after one untimed call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def sae_config(sizes: Sizes, num_seeds: int, sae_dtype: str, topk_kernel: str = 'auto') -> TrainConfig:
  batch = sizes.rows * sizes.seq
  return TrainConfig(
    source='synthetic',
    d_in=sizes.d_in,
    num_latents=sizes.num_latents,
    k=sizes.k,
    batch_size=batch,
    num_tokens=batch * 100_000,
    init_seeds=tuple(range(num_seeds)),
    sae_dtype=sae_dtype,
    topk_kernel=topk_kernel,
  )


def grouped_step(config: TrainConfig):
  """(step over all seeds, its fresh grouped state, XLA temp bytes of one group call), as the trainer runs it on
  the first device (whose platform decides the kernel plan)."""
  mesh = shd.make_mesh(1, 1, jax.devices()[:1])
  step = seed_groups.from_config(config, mesh)
  groups = step.split(step.create_state(config.init_seeds))
  x_struct = jax.ShapeDtypeStruct((config.batch_size, config.d_in), jnp.float32)
  lowered = step.compiled(groups[0]).lower(groups[0], x_struct, step.group_hparams(0))
  analysis = lowered.compile().memory_analysis()
  return step, groups, getattr(analysis, 'temp_size_in_bytes', None)


def sae_step(sizes: Sizes, num_seeds: int, sae_dtype: str, topk_kernel: str, platform: str) -> dict:
  config = sae_config(sizes, num_seeds, sae_dtype, topk_kernel)
  step, groups, temp_bytes = grouped_step(config)
  x_BxD = jax.random.normal(jax.random.PRNGKey(0), (config.batch_size, sizes.d_in), jnp.float32)
  holder = {'state': groups}

  def one_step():
    holder['state'], metrics = step(holder['state'], x_BxD)
    return holder['state'], metrics

  step_s = best_seconds(one_step, sizes.repeats)
  W_FxD = jax.random.normal(jax.random.PRNGKey(1), (sizes.num_latents, sizes.d_in), jnp.float32)
  encoder = jax.jit(lambda x, w: kernels.mm('bd,fd->bf', x, w, sae_dtype))
  matmul_s = best_seconds(lambda: encoder(x_BxD, W_FxD), sizes.repeats)
  holder.clear()  # frees the state before the next measurement
  return {
    'plan': {**config.resolved_kernel_plan(platform), 'seed_group_size': config.resolved_seed_group_size(platform)},
    'step_s': sig(step_s),
    'tokens_per_s': sig(config.batch_size / step_s),
    'encoder_matmul_s': sig(matmul_s),
    'step_over_S_matmul': sig(step_s / (num_seeds * matmul_s)),
    'xla_temp_bytes': temp_bytes,
  }


def variants_step(sizes: Sizes, platform: str) -> dict:
  """Per-k group steps of Fig. 4's k sweep, and the floor of a masked top-k over the same three settings.

  Variants run as one seed-group step each (saejax/train/slots.py). With S seeds per variant the k sweep is then
  3 x ceil(S / g) calls at their own k; a masked top-k would be ceil(3S / g) calls at the largest k. With full
  groups the per-k calls cost no more; with S < g (a padded group per variant) the masked floor can be lower.
  """
  ks = (sizes.k // 2, sizes.k, 2 * sizes.k)
  narrow = dataclasses.replace(sizes, num_latents=sizes.num_latents // 4)
  group = tuning.ACCELERATOR_SEED_GROUP
  by_k = {k: sae_step(dataclasses.replace(narrow, k=k), group, 'bfloat16', 'sparse', platform)['step_s'] for k in ks}
  return {
    'num_latents': narrow.num_latents,
    'seeds_per_group': group,
    'group_step_s_by_k': {str(k): v for k, v in by_k.items()},
    'per_k_groups_s': sig(sum(by_k.values())),  # one full group per k: S = g seeds of each variant
    'masked_floor_full_groups_s': sig(len(ks) * by_k[ks[-1]]),  # the same 3g members at the largest k
    'masked_floor_one_seed_s': sig(by_k[ks[-1]]),  # S = 1: one group holds the three variants
  }


def lm_params(sizes: Sizes, name: str, gguf_path: str | None):
  if gguf_path and name == 'smollm2-135m':
    from saejax.models import gguf

    cfg, params = gguf.load(gguf_path, jnp.bfloat16)
    return cfg, params, f'GGUF {gguf_path}'
  cfg = sizes.model(name)
  return cfg, shapes.random_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16), "random (the model's shapes)"


def lm_forward(sizes: Sizes, name: str, stop_layer: int | None, gguf_path: str | None, platform: str) -> dict:
  cfg, params, weights = lm_params(sizes, name, gguf_path)
  stop_layer = cfg.num_layers - 1 if stop_layer is None else stop_layer
  run = export.lm_forward_fn(cfg, platform, 'bfloat16', stop_layer)
  tokens_BxT = jax.random.randint(jax.random.PRNGKey(2), (sizes.rows, sizes.seq), 0, cfg.vocab_size, jnp.int32)
  forward = jax.jit(run)
  forward_s = best_seconds(lambda: forward(params, tokens_BxT), sizes.repeats)
  tokens = sizes.rows * sizes.seq
  record = {
    'weights': weights,
    'hookpoint': f'layers.{stop_layer}.mlp',
    'attention': tuning.lm_attention(platform, 'bfloat16', cfg.head_dim),
    'tokens': tokens,
    'forward_s': sig(forward_s),
    'tokens_per_s': sig(tokens / forward_s),
  }
  record.update(torch_forward(cfg, stop_layer, sizes))
  if 'torch_forward_s' in record:
    record['torch_over_saejax_time'] = sig(record['torch_forward_s'] / forward_s)
  return record


def hf_config(cfg, num_layers: int):
  import transformers

  common = dict(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.d_model,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=num_layers,
    num_attention_heads=cfg.num_heads,
    max_position_embeddings=max(cfg.max_position_embeddings, 4096),
    attn_implementation='sdpa',
  )
  if cfg.family == 'llama':
    return transformers.LlamaConfig(
      **common, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps
    )
  return transformers.GPTNeoXConfig(**common, rotary_pct=cfg.rope.dim / cfg.head_dim, use_parallel_residual=True)


def torch_forward(cfg, stop_layer: int, sizes: Sizes) -> dict:
  """transformers+torch's base model with `stop_layer + 1` blocks, bf16, on this machine's GPU (else CPU)."""
  try:
    import torch
    import transformers
  except ImportError as error:
    return {'torch': f'not importable: {error}'}
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model_cls = transformers.LlamaModel if cfg.family == 'llama' else transformers.GPTNeoXModel
  model = model_cls(hf_config(cfg, stop_layer + 1)).to(device=device, dtype=torch.bfloat16).eval()
  ids = torch.randint(0, cfg.vocab_size, (sizes.rows, sizes.seq), device=device)

  def run():
    with torch.inference_mode():
      model(input_ids=ids)
    if device == 'cuda':
      torch.cuda.synchronize()

  run()
  times = []
  for _ in range(sizes.repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  model.to('meta')  # frees the weights before the next measurement
  if device == 'cuda':
    torch.cuda.empty_cache()
  return {'torch_forward_s': sig(min(times)), 'torch': f'{torch.__version__} on {device}'}


def full_step(sizes: Sizes, platform: str) -> dict:
  """The trainer's per-batch work: the LM forward to the hookpoint, then nine SAEs on its activations."""
  cfg = sizes.model(sizes.pythia)
  params = shapes.random_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
  forward = jax.jit(export.lm_forward_fn(cfg, platform, 'bfloat16', sizes.pythia_layer))
  config = dataclasses.replace(sae_config(sizes, 9, 'auto'), d_in=cfg.d_model)
  step, groups, _ = grouped_step(config)
  tokens_BxT = jax.random.randint(jax.random.PRNGKey(2), (sizes.rows, sizes.seq), 0, cfg.vocab_size, jnp.int32)
  holder = {'state': groups}

  def one_batch():
    acts_BxD = forward(params, tokens_BxT).reshape(-1, cfg.d_model).astype(jnp.float32)
    holder['state'], metrics = step(holder['state'], acts_BxD)
    return holder['state'], metrics

  batch_s = best_seconds(one_batch, sizes.repeats)
  forward_s = best_seconds(lambda: forward(params, tokens_BxT), sizes.repeats)
  tokens_per_s = config.batch_size / batch_s
  return {
    'seeds': 9,
    'plan': config.resolved_kernel_plan(platform),
    'batch_s': sig(batch_s),
    'tokens_per_s': sig(tokens_per_s),
    'lm_share': sig(forward_s / batch_s),
    'paper_run_hours': sig(PAPER_RUN_TOKENS / tokens_per_s / 3600),
  }


def align_pair(sizes: Sizes, n: int) -> dict:
  from saejax.align.match import match_latents

  seconds, methods, certified = [], [], []
  for matching in range(2):  # encoder and decoder, as for one pair of SAEs
    A_NxD, B_NxD = planted_pair(n, sizes.d_in, seed=matching)
    start = time.perf_counter()
    result = match_latents(A_NxD, B_NxD)
    seconds.append(time.perf_counter() - start)
    methods.append(result.method)
    certified.append(bool(result.certified_optimal))
  return {'n': n, 'seconds': sig(sum(seconds)), 'per_matching_s': [sig(s) for s in seconds],
          'method': methods[0], 'certified': all(certified)}  # fmt: skip


def machine() -> dict:
  device = jax.devices()[0]
  name, flags = cpu_model()
  return {'platform': device.platform, 'device': device.device_kind, 'jax': jax.__version__,
          'python': sys.version.split()[0], 'cpu': name, 'cpu_flags': flags}  # fmt: skip


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dry-run', action='store_true', help='tiny shapes (CPU), for the test suite')
  parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
  parser.add_argument('--gguf', default=None, help='SmolLM2 GGUF file (default: random weights of its shapes)')
  parser.add_argument('--budget_s', type=float, default=450.0, help='start no measurement after this many seconds')
  args = parser.parse_args(argv)
  sizes = DrySizes() if args.dry_run else Sizes()
  platform = jax.devices()[0].platform
  report = Report(args.out, args.budget_s)
  report.emit({'measure': 'machine', **machine(), 'sizes': dataclasses.asdict(sizes)})
  for sae_dtype in ('float32', 'bfloat16'):
    for num_seeds, topk_kernel in [*((seeds, 'sparse') for seeds in sizes.seeds), (1, 'dense')]:
      labels = {'seeds': num_seeds, 'sae_dtype': sae_dtype, 'topk_kernel': topk_kernel}
      report.run('sae_step', labels, sae_step, sizes, num_seeds, sae_dtype, topk_kernel, platform)
  report.run('lm_forward', {'model': 'pythia'}, lm_forward, sizes, sizes.pythia, sizes.pythia_layer, None, platform)
  report.run('lm_forward', {'model': 'smollm2'}, lm_forward, sizes, sizes.smollm2, None, args.gguf, platform)
  report.run('full_step', {'model': 'pythia', 'hookpoint': sizes.pythia_layer}, full_step, sizes, platform)
  for n in sizes.align_ns:
    report.run('align', {'n': n}, align_pair, sizes, n)
  report.run('variants_step', {'sweep': 'k'}, variants_step, sizes, platform)
  report.emit({'measure': 'done'})
  return 0


if __name__ == '__main__':
  sys.exit(main())
