"""Benchmarks that print JSON lines naming the machine. Not tests: speed is measured here, never asserted.

  python -m experiments.benchmark train --d_in=768 --num_latents=8192 --k=32 --batch=2048 --seeds=1,9
  python -m experiments.benchmark align [--ns=4096,8192,16384,32768,131072]
  python -m experiments.benchmark lm --rows=2 --seeds=1,9 --num_latents=32768
  python -m experiments.benchmark smollm2   # SmolLM2 GGUF vs transformers+torch, cache write/read, train from cache
  python -m experiments.benchmark compile   # XLA compile time: the paper-size step, a 32-layer Llama 3 8B forward
  python -m experiments.benchmark variants  # Fig. 4's k and width sweeps: one run of three variants vs three runs

`train` times the full jitted step (all seeds) next to the unavoidable encoder product [B,d] x [d,M] for one
seed, measured in the same process with the same dtype, and EleutherAI sparsify's own step at the same shapes
(`--sparsify=false` to skip). Timings are the minimum over interleaved repeats, since this machine is shared.
`align` matches planted SAE pairs (encoder + decoder) per n with saejax and with dense SciPy as the paper did,
each in its own process, reporting seconds and peak RSS.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import bench_smollm2 as bench_smollm2_lib
from experiments import bench_variants as bench_variants_lib
from experiments.cli import parse_flags
from saejax import sharding as shd
from saejax.config import TrainConfig
from saejax.train import trainer as trainer_lib
from saejax.train.trainer import Trainer

_D_IN = flags.DEFINE_integer('d_in', 768, 'Activation width d.')
_NUM_LATENTS = flags.DEFINE_integer('num_latents', 8192, 'Latents M per SAE.')
_K = flags.DEFINE_integer('k', 32, 'Active latents per token.')
_BATCH = flags.DEFINE_integer('batch', 2048, 'Tokens per step.')
_SEEDS = flags.DEFINE_list('seeds', ['1', '9'], 'Seed counts S to time, one JSON line each.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats (minimum reported).')
_ARCH = flags.DEFINE_string('arch', 'topk', 'SAE architecture.')
_SEED_GROUP = flags.DEFINE_integer('seed_group_size', -1, 'TrainConfig.seed_group_size (0: vmap all; -1: auto).')
_CHUNK = flags.DEFINE_integer('chunk_tokens', -1, 'TrainConfig.kernel_chunk_tokens (-1: per platform).')
_TOPK_BLOCK = flags.DEFINE_integer('topk_block', -1, 'TrainConfig.topk_block (-1: per platform; 0: one lax.top_k).')
_SAE_DTYPE = flags.DEFINE_enum('sae_dtype', 'auto', ['auto', 'float32', 'bfloat16'], 'TrainConfig.sae_dtype.')
_ALIGN_NS = flags.DEFINE_list('ns', ['4096', '8192', '16384', '32768', '131072'], 'align: latent counts n.')
_N = flags.DEFINE_integer('n', 4096, 'align_one: latent count.')
_IMPL = flags.DEFINE_enum('impl', 'saejax', ['saejax', 'scipy'], 'align_one: implementation.')
_METHOD = flags.DEFINE_enum('method', 'auto', ['auto', 'dense', 'sparse'], 'align: saejax method.')
_SCIPY_MAX_BYTES = flags.DEFINE_integer('scipy_max_bytes', 16 * 2**30, 'align: skip SciPy above this estimate.')
_ROWS = flags.DEFINE_integer('rows', 2, 'lm: sequences of 2049 tokens per batch.')
_LM_DTYPE = flags.DEFINE_enum('lm_dtype', 'float32', ['float32', 'bfloat16'], 'lm: model compute dtype.')
_SPARSIFY = flags.DEFINE_bool('sparsify', True, "Also time EleutherAI sparsify's step at the same shapes.")


def cpu_model() -> tuple[str, list[str]]:
  """The CPU's model name and the vector extensions that decide matmul speed (bf16 needs avx512_bf16 or AMX)."""
  name, flags = platform.processor() or platform.machine(), set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          name = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
          break
  except OSError:
    pass
  return name, sorted(flags & {'avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile'})


def machine() -> dict:
  device = jax.devices()[0]
  name, vector_flags = cpu_model()
  return {
    'platform': device.platform,
    'device': device.device_kind,
    'num_devices': jax.device_count(),
    'cpu': name,
    'cpu_flags': vector_flags,
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'jax': jax.__version__,
  }


def _time(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def encoder_matmul_seconds(batch: int, d_in: int, num_latents: int, repeats: int) -> float:
  x_BxD = jax.random.normal(jax.random.PRNGKey(0), (batch, d_in), jnp.float32)
  W_DxF = jax.random.normal(jax.random.PRNGKey(1), (d_in, num_latents), jnp.float32)
  matmul = jax.jit(lambda x, w: x @ w)
  jax.block_until_ready(matmul(x_BxD, W_DxF))
  return min(_time(lambda: matmul(x_BxD, W_DxF), repeats))


def train_step_seconds(num_seeds: int, repeats: int) -> tuple[float, float]:
  """Min step time for all seeds, and the min encoder matmul time measured between the step repeats."""
  config = TrainConfig(
    arch=_ARCH.value,
    d_in=_D_IN.value,
    num_latents=_NUM_LATENTS.value,
    k=_K.value,
    batch_size=_BATCH.value,
    num_tokens=_BATCH.value * 100_000,
    init_seeds=tuple(range(num_seeds)),
    seed_group_size=_SEED_GROUP.value,
    kernel_chunk_tokens=_CHUNK.value,
    topk_block=_TOPK_BLOCK.value,
    sae_dtype=_SAE_DTYPE.value,
    source='synthetic',
    num_features=2 * _D_IN.value,
  )
  trainer = Trainer(config, workdir='', mesh=shd.make_mesh(-1, 1))
  step = trainer_lib.stepper(trainer)
  state = step.fresh()
  x_BxD = trainer.inputs_at(0)
  state, _ = step(state, x_BxD)  # compile
  jax.block_until_ready(state)
  step_times, matmul_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, x_BxD)
    jax.block_until_ready((state, metrics))
    step_times.append(time.perf_counter() - start)
    matmul_times.append(encoder_matmul_seconds(_BATCH.value, _D_IN.value, _NUM_LATENTS.value, 2))
  return min(step_times), min(matmul_times)


def bench_train() -> None:
  sparsify = None
  if _SPARSIFY.value:
    try:
      from experiments.sparsify_baseline import sparsify_step_seconds

      sparsify = sparsify_step_seconds(_D_IN.value, _NUM_LATENTS.value, _K.value, _BATCH.value, repeats=_REPEATS.value)
    except ImportError as error:
      sparsify = {'error': f'sparsify unavailable: {error}'}
  for num_seeds in (int(s) for s in _SEEDS.value):
    step_s, matmul_s = train_step_seconds(num_seeds, _REPEATS.value)
    record = {
      'bench': 'train',
      'seeds': num_seeds,
      'arch': _ARCH.value,
      'd_in': _D_IN.value,
      'num_latents': _NUM_LATENTS.value,
      'k': _K.value,
      'batch': _BATCH.value,
      'step_s': round(step_s, 5),
      'tokens_per_s': round(_BATCH.value / step_s, 1),
      'encoder_matmul_s': round(matmul_s, 5),
      'step_over_S_matmul': round(step_s / (num_seeds * matmul_s), 3),
      'seed_group_size': _SEED_GROUP.value,
      'chunk_tokens': _CHUNK.value,
      'topk_block': _TOPK_BLOCK.value,
      'sae_dtype': _SAE_DTYPE.value,
      'machine': machine(),
    }
    if sparsify and 'step_s' in sparsify:
      record['sparsify_step_s'] = round(sparsify['step_s'], 5)
      record['per_seed_s_over_sparsify'] = round(step_s / num_seeds / sparsify['step_s'], 3)
      record['sparsify'] = {key: sparsify.get(key) for key in ('torch', 'sparsify', 'threads', 'optimizer')}
    elif sparsify:
      record['sparsify'] = sparsify
    print(json.dumps(record), flush=True)


def planted_pair(n: int, d_in: int, seed: int, planted: float = 0.5, noise: float = 0.45):
  """Two [n, d] row sets: `planted` of B's rows are noisy permuted copies of A's (cos ~0.9), the rest random."""
  rng = np.random.default_rng(seed)
  A_NxD = rng.standard_normal((n, d_in), dtype=np.float32)
  A_NxD /= np.linalg.norm(A_NxD, axis=1, keepdims=True)
  B_NxD = rng.standard_normal((n, d_in), dtype=np.float32)
  copies = rng.random(n) < planted
  B_NxD[copies] = A_NxD[copies] + noise * B_NxD[copies] / np.sqrt(d_in)
  return A_NxD, B_NxD[rng.permutation(n)]


def bench_align_one() -> dict:
  """One (n, implementation) measurement in this process: an encoder and a decoder matching, as for one pair."""
  import resource

  n, impl = _N.value, _IMPL.value
  timings, certified, totals = [], [], []
  for matching in range(2):
    A_NxD, B_NxD = planted_pair(n, _D_IN.value, seed=matching)
    start = time.perf_counter()
    if impl == 'scipy':
      from scipy.optimize import linear_sum_assignment

      cos_NxN = A_NxD @ B_NxD.T  # the paper's dense float32 matrix, then SciPy on the CPU
      rows, cols = linear_sum_assignment(cos_NxN, maximize=True)
      totals.append(float(cos_NxN[rows, cols].astype(np.float64).sum()))
      certified.append(True)
      del cos_NxN
    else:
      from saejax.align.match import match_latents

      result = match_latents(A_NxD, B_NxD, method=_METHOD.value)
      totals.append(result.total)
      certified.append(bool(result.certified_optimal))
      impl = f'saejax-{result.method}'
    timings.append(time.perf_counter() - start)
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {
    'bench': 'align',
    'n': n,
    'd_in': _D_IN.value,
    'impl': impl,
    'pair_s': round(sum(timings), 3),
    'matching_s': [round(t, 3) for t in timings],
    'peak_rss_gb': round(peak_kib / 2**20, 3),
    'certified_optimal': all(certified),
    'totals': totals,
    'machine': machine(),
  }


def bench_align() -> None:
  """Runs each (n, implementation) in a fresh process so peak RSS belongs to that measurement alone."""
  import subprocess
  import sys

  for n in (int(v) for v in _ALIGN_NS.value):
    impls = ['saejax'] + (['scipy'] if 20 * n * n <= _SCIPY_MAX_BYTES.value else [])
    for impl in impls:
      command = [
        sys.executable,
        '-m',
        'experiments.benchmark',
        'align_one',
        f'--n={n}',
        f'--impl={impl}',
        f'--d_in={_D_IN.value}',
        f'--method={_METHOD.value}',
      ]
      done = subprocess.run(command, capture_output=True, text=True)
      lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
      print(
        lines[-1]
        if lines
        else json.dumps({'bench': 'align', 'n': n, 'impl': impl, 'error': done.stderr.strip().splitlines()[-1:]}),
        flush=True,
      )
    if 'scipy' not in impls:
      print(
        json.dumps(
          {
            'bench': 'align',
            'n': n,
            'impl': 'scipy',
            'skipped': 'dense float32 matrix + float64 '
            f'copies need ~{20 * n * n / 2**30:.0f} GiB, over --scipy_max_bytes',
          }
        ),
        flush=True,
      )


def bench_lm() -> None:
  """LM forward (Pythia-160M shape, random weights, up to layers.6.mlp) and the full step: LM + S SAEs."""
  import tempfile

  from saejax.models.random_checkpoint import write_random_neox

  rows, context = _ROWS.value, 2049
  with tempfile.TemporaryDirectory() as tmp:
    folder = write_random_neox(os.path.join(tmp, 'pythia-160m-random'))
    tokens_path = os.path.join(tmp, 'tokens.npy')
    np.save(tokens_path, np.random.default_rng(0).integers(0, 50304, (rows * 4, context), dtype=np.uint16))
    for num_seeds in (int(s) for s in _SEEDS.value):
      config = TrainConfig(
        source='lm',
        model=folder,
        dataset=tokens_path,
        hookpoint='layers.6.mlp',
        d_in=768,
        lm_dtype=_LM_DTYPE.value,
        num_latents=_NUM_LATENTS.value,
        k=_K.value,
        batch_size=rows * context,
        context_length=context,
        num_tokens=rows * context * 1000,
        init_seeds=tuple(range(num_seeds)),
        eval_tokens=0,
      )
      trainer = Trainer(config, workdir='', mesh=shd.make_mesh(-1, 1))
      source = trainer.source
      jax.block_until_ready(source.batch_at(0))
      forward_s = min(_time(functools.partial(source.batch_at, 1), _REPEATS.value))
      step = trainer_lib.stepper(trainer)
      state = step.fresh()
      state, _ = step(state, trainer.inputs_at(0))
      jax.block_until_ready(state)
      full_times = []
      for position in range(_REPEATS.value):
        start = time.perf_counter()
        state, metrics = step(state, trainer.inputs_at(position))
        jax.block_until_ready((state, metrics))
        full_times.append(time.perf_counter() - start)
      full_s = min(full_times)
      print(
        json.dumps(
          {
            'bench': 'lm',
            'model': 'pythia-160m-shaped (random)',
            'hookpoint': 'layers.6.mlp',
            'lm_dtype': _LM_DTYPE.value,
            'tokens': rows * context,
            'seeds': num_seeds,
            'num_latents': _NUM_LATENTS.value,
            'k': _K.value,
            'lm_forward_s': round(forward_s, 4),
            'lm_tokens_per_s': round(rows * context / forward_s, 1),
            'full_step_s': round(full_s, 4),
            'full_tokens_per_s': round(rows * context / full_s, 1),
            'lm_share_of_step': round(forward_s / full_s, 3),
            'machine': machine(),
          }
        ),
        flush=True,
      )


def bench_align_one_main() -> None:
  print(json.dumps(bench_align_one()), flush=True)


def bench_smollm2() -> None:
  bench_smollm2_lib.run(machine(), _REPEATS.value)


def bench_compile() -> None:
  """Lower + compile from shapes alone (nothing runs): the paper's 9-seed step, and Llama 3 8B's 32 blocks."""
  from saejax.models import shapes
  from saejax.train import export

  batch = 32 * 2049
  step_config = TrainConfig(
    source='synthetic', d_in=768, num_latents=32768, k=32, batch_size=batch, num_tokens=batch * 4000,
    init_seeds=tuple(range(9)),
  )  # fmt: skip
  step_fn, init_fn, x_struct, hparams = export.train_step_parts(step_config, jax.default_backend())
  cases = [('paper step (S=9, M=32768, k=32, 32x2049 tokens)', step_fn, (jax.eval_shape(init_fn), x_struct, hparams))]
  llama = shapes.PRESETS['llama3-8b']
  forward = export.lm_forward_fn(llama, jax.default_backend(), 'bfloat16', stop_layer=None)
  tokens = jax.ShapeDtypeStruct((1, 2049), jnp.int32)
  cases.append(('llama3-8b forward (32 blocks + logits, 1x2049 tokens, bf16)', forward,
                (shapes.abstract_params(llama, jnp.bfloat16), tokens)))  # fmt: skip
  for what, fn, args in cases:
    seconds = export.compile_seconds(fn, args)
    record = {'bench': 'compile', 'what': what, 'compile_s': round(seconds, 2), 'machine': machine()}
    print(json.dumps(record), flush=True)


BENCHES = {
  'train': bench_train,
  'align': bench_align,
  'align_one': bench_align_one_main,
  'lm': bench_lm,
  'smollm2': bench_smollm2,
  'compile': bench_compile,
  'variants': lambda: bench_variants_lib.run(machine()),
}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in BENCHES:
    raise app.UsageError(f'usage: python -m experiments.benchmark {{{",".join(BENCHES)}}} [--flags]')
  np.set_printoptions(precision=4)
  BENCHES[argv[1]]()


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
