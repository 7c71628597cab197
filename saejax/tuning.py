"""Per-platform tuning, chosen here and nowhere else: which kernels and dtypes each backend gets by default.

Every choice was measured (RESULTS.md says where); callers pass the platform (`'cpu'`, `'gpu'`, `'tpu'`) of the
devices the work runs on, so an export for another platform can ask for that platform's choice explicitly.

- LM attention. `'chunked'` on CPU: causal attention in blocks of `CPU_ATTENTION_BLOCK` queries, each attending
  only to the keys at or before its block, so the upper triangle is never computed and each block's scores stay
  in cache (2.2-2.6x faster than the dense form at SmolLM2's shapes, B=4 and T=512, on the 2-core AMD EPYC).
  On a GPU, `'cudnn'`: `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's flash attention, which
  never writes the [B, H, T, T] scores (6.4 GB per layer in fp32 at the paper's 32 x 2049 tokens); it needs
  bf16/fp16 and a head dim <= 256, so an fp32 model there falls back to `'chunked'`. On TPU, `'chunked'` with
  `ACCELERATOR_ATTENTION_BLOCK`-query blocks (XLA's `jax.nn.dot_product_attention` writes the full scores).
- LM dtype for `lm_dtype='auto'`: bfloat16 on accelerators (the paper's); float32 on CPU, where XLA's bf16
  forward is no faster (SmolLM2 to layer 6: 0.75 s fp32 vs 0.78 s bf16 on the AMD EPYC, and slower on a Xeon).
- The SAE kernel plan (`TrainConfig.resolved_kernel_plan`, -1/'auto' fields):
  - TopK gathers and scatters: on CPU they loop over 32-token chunks whose [32, k, d] working set stays in cache.
    On accelerators a sequential loop of small chunks is thousands of tiny kernel launches (2,049 iterations per
    loop at the paper's 32 x 2,049-token batch), so they run over `ACCELERATOR_KERNEL_BLOCKS` large blocks: a trip
    count that does not grow with the batch, and a gathered [B/8, k, d] block instead of the whole [B, k, d]
    (58 GB in fp32 for nine seeds at the paper's size).
  - TopK formulation: 'sparse' (gathers and row scatters) on CPU and GPU; 'dense' (masked dense products, five
    encoder-sized matmuls) on TPU, whose scatters serialise while its matrix units are cheap. Not measured on a
    TPU; `experiments/device_check.py` measures both on a GPU.
  - TopK selection: on CPU, a top-k of the maxima of blocks of `CPU_TOPK_BLOCK` latents, then a top-k of the k
    best blocks' values (kernels.block_top_k; exactly lax.top_k's values and indices). XLA:CPU's top-k is a
    partial sort per row at about 5 ns per value, 5.5-6.6x the encoder matmul at the synthetic preset's shapes
    on the 2-core Xeon, and a block max is a vectorised pass: the preset's step is about 16% faster (RESULTS.md).
    Accelerators keep `lax.top_k`; the two-stage form is not measured there.
  - SAE matmul dtype: float32 on CPU (XLA:CPU has no faster bf16 path); bfloat16 operands with float32
    accumulation on accelerators, the paper's autocast (tests/test_sae_dtype.py checks it trains as well).
- Seed groups for `seed_group_size=-1`. Seeds train in groups of a fixed size, each group one call of the same
  compiled step (saejax.train.seed_groups), so a seed's SAE is bitwise the same whatever trains beside it. On CPU
  groups of one, so a seed's rows stay in cache (vmapping nine was 3.4x slower). On accelerators groups of
  `ACCELERATOR_SEED_GROUP` vmapped seeds (the last padded), or of one when their fp32 [g, B, F] pre-activations
  would pass `ACCELERATOR_PRE_ACTIVATION_BYTES` (at the paper's 65,568 x 32,768 they are 8.6 GB per seed). The size
  depends on the SAE's shapes, never on the number of seeds; 3 divides the paper's nine.
"""

from __future__ import annotations

import functools

ATTENTION_KINDS = ('dense', 'chunked', 'fused', 'cudnn')
CPU_ATTENTION_BLOCK = 64  # queries per block; 32, 64 and 128 are within noise at T=512 on the 2-core AMD EPYC
ACCELERATOR_ATTENTION_BLOCK = 512  # 5 blocks at T=2049: few, large kernels, and at most [B, H, 512, T] scores


def lm_attention(platform: str, dtype='float32', head_dim: int = 64, cudnn: bool | None = None) -> str:
  """The attention kernel for a `dtype` model on `platform`; `cudnn` overrides the probe of this machine's GPU."""
  if platform == 'gpu' and (cudnn_attention_usable(str(dtype), head_dim) if cudnn is None else cudnn):
    return 'cudnn'
  return 'chunked'


def attention_block(platform: str) -> int:
  """Queries per block of `'chunked'` attention."""
  return CPU_ATTENTION_BLOCK if platform == 'cpu' else ACCELERATOR_ATTENTION_BLOCK


@functools.cache
def cudnn_attention_usable(dtype: str, head_dim: int) -> bool:
  """Whether cuDNN flash attention takes this dtype and head dim on this machine's GPU (False without one)."""
  import jax
  import jax.numpy as jnp

  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return False
  probe = jax.ShapeDtypeStruct((1, 128, 2, head_dim), dtype)
  try:
    jax.eval_shape(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation='cudnn'), probe)
  except Exception:  # noqa: BLE001 - any refusal (no GPU, no cuDNN, unsupported shape) means "use the fallback"
    return False
  return True


def lm_dtype(platform: str) -> str:
  """The LM compute dtype that `lm_dtype='auto'` resolves to."""
  return 'float32' if platform == 'cpu' else 'bfloat16'


CPU_KERNEL_CHUNK_TOKENS = 32
ACCELERATOR_KERNEL_BLOCKS = 8
ACCELERATOR_PRE_ACTIVATION_BYTES = 16 * 2**30
ACCELERATOR_SEED_GROUP = 3
CPU_TOPK_BLOCK = 8


def kernel_chunk_tokens(platform: str) -> int:
  """Tokens per chunk of the sparse TopK kernels; 0 means no token chunks (see `kernel_blocks`)."""
  return CPU_KERNEL_CHUNK_TOKENS if platform == 'cpu' else 0


def kernel_blocks(platform: str) -> int:
  """Blocks the batch splits into when there are no token chunks; 0 means the whole batch in one pass."""
  return 0 if platform == 'cpu' else ACCELERATOR_KERNEL_BLOCKS


def topk_kernel(platform: str) -> str:
  return 'dense' if platform == 'tpu' else 'sparse'


def topk_block(platform: str) -> int:
  """Latents per block of the two-stage exact top-k (saejax.sae.kernels.block_top_k); 0: one lax.top_k."""
  return CPU_TOPK_BLOCK if platform == 'cpu' else 0


def sae_dtype(platform: str) -> str:
  return 'float32' if platform == 'cpu' else 'bfloat16'


def seed_group_size(platform: str, batch_size: int = 1, num_latents: int = 1) -> int:
  """Seeds per group; a function of the platform and the SAE's shapes only (never of the seed count)."""
  if platform == 'cpu':
    return 1
  fits = ACCELERATOR_SEED_GROUP * batch_size * num_latents * 4 <= ACCELERATOR_PRE_ACTIVATION_BYTES
  return ACCELERATOR_SEED_GROUP if fits else 1


def platform_of(mesh_or_array) -> str:
  """The platform of a mesh's (or an array's) first device; the default backend for None."""
  import jax

  if mesh_or_array is None:
    return jax.default_backend()
  devices = getattr(mesh_or_array, 'devices', None)
  if devices is not None and hasattr(devices, 'flat'):
    return devices.flat[0].platform
  return next(iter(mesh_or_array.devices())).platform
