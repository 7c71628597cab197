"""Per-platform tuning, chosen here and nowhere else: which kernels and dtypes each backend gets by default.

Every choice was measured (RESULTS.md says where); callers pass the platform (`'cpu'`, `'gpu'`, `'tpu'`) of the
devices the work runs on, so an export for another platform can ask for that platform's choice explicitly.

- LM attention. `'chunked'` on CPU: causal attention in blocks of `CPU_ATTENTION_BLOCK` queries, each attending
  only to the keys at or before its block, so the upper triangle is never computed and each block's scores stay
  in cache (2.2-2.6x faster than the dense form at SmolLM2's shapes, B=4 and T=512, on the 2-core AMD EPYC).
  `'fused'` elsewhere: `jax.nn.dot_product_attention` (cuDNN flash attention where the GPU supports it).
- LM dtype for `lm_dtype='auto'`: bfloat16 on accelerators (the paper's); float32 on CPU, where XLA's bf16
  forward is no faster (SmolLM2 to layer 6: 0.75 s fp32 vs 0.78 s bf16 on the AMD EPYC, and slower on a Xeon).
- TopK kernel chunks for `kernel_chunk_tokens=-1`: on CPU the gathers and scatters of the sparse decode and
  backward loop over 32-token chunks whose [32, k, d] working set stays in cache; on accelerators they run over
  the whole batch at once (0), since a sequential loop of small chunks is thousands of tiny kernel launches
  there (2,049 iterations per loop at the paper's 32 x 2,049-token batch).
- Seed groups for `seed_group_size=-1`: on CPU one seed at a time, so a seed's rows stay in cache (vmapping
  nine was 3.4x slower); on accelerators all seeds in one vmapped step.
"""

from __future__ import annotations

ATTENTION_KINDS = ('dense', 'chunked', 'fused')
CPU_ATTENTION_BLOCK = 64  # queries per block; 32, 64 and 128 are within noise at T=512 on the 2-core AMD EPYC


def lm_attention(platform: str) -> str:
  return 'chunked' if platform == 'cpu' else 'fused'


def lm_dtype(platform: str) -> str:
  """The LM compute dtype that `lm_dtype='auto'` resolves to."""
  return 'float32' if platform == 'cpu' else 'bfloat16'


CPU_KERNEL_CHUNK_TOKENS = 32


def kernel_chunk_tokens(platform: str) -> int:
  """Tokens per chunk of the sparse TopK kernels; 0 means the whole batch in one pass (no loop)."""
  return CPU_KERNEL_CHUNK_TOKENS if platform == 'cpu' else 0


def seed_group_size(platform: str) -> int:
  return 1 if platform == 'cpu' else 0


def platform_of(mesh_or_array) -> str:
  """The platform of a mesh's (or an array's) first device; the default backend for None."""
  import jax

  if mesh_or_array is None:
    return jax.default_backend()
  devices = getattr(mesh_or_array, 'devices', None)
  if devices is not None and hasattr(devices, 'flat'):
    return devices.flat[0].platform
  return next(iter(mesh_or_array.devices())).platform
