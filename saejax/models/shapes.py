"""The forward's parameter pytree as shapes alone, for models that are not on this machine.

`abstract_params(cfg, dtype)` is the pytree `checkpoint.load_params` and `gguf.load_params` build (same keys,
shapes and dtype), made of `jax.ShapeDtypeStruct`s: enough to export or compile the forward of an 8B model on a
laptop (saejax.train.export) without a byte of weights. `random_params` fills it with small random values, for
speed measurements where only the shapes matter (experiments/device_check.py). `PRESETS` holds the shapes of the
models those tools name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saejax.models.config import ModelConfig, RopeSpec

# fmt: off
PRESETS = {
  'pythia-160m': ModelConfig(
    family='gpt_neox', num_layers=12, d_model=768, vocab_size=50304, num_heads=12, num_kv_heads=12, head_dim=64,
    intermediate_size=3072, norm='layernorm', norm_eps=1e-5, activation='gelu', gated_mlp=False,
    parallel_residual=True, tie_word_embeddings=False, max_position_embeddings=2048, rope=RopeSpec(16, 10000.0),
  ),
  'smollm2-135m': ModelConfig(
    family='llama', num_layers=30, d_model=576, vocab_size=49152, num_heads=9, num_kv_heads=3, head_dim=64,
    intermediate_size=1536, norm='rmsnorm', norm_eps=1e-5, activation='silu', gated_mlp=True,
    parallel_residual=False, tie_word_embeddings=True, max_position_embeddings=8192, rope=RopeSpec(64, 100000.0),
  ),
  'llama3-8b': ModelConfig(
    family='llama', num_layers=32, d_model=4096, vocab_size=128256, num_heads=32, num_kv_heads=8, head_dim=128,
    intermediate_size=14336, norm='rmsnorm', norm_eps=1e-5, activation='silu', gated_mlp=True,
    parallel_residual=False, tie_word_embeddings=False, max_position_embeddings=8192, rope=RopeSpec(128, 500000.0),
  ),
}
# fmt: on


def _norm(cfg: ModelConfig, dtype) -> dict:
  vector = jax.ShapeDtypeStruct((cfg.d_model,), dtype)
  return {'scale': vector, 'bias': vector} if cfg.norm == 'layernorm' else {'scale': vector}


def _layer(cfg: ModelConfig, dtype) -> dict:
  d, f = cfg.d_model, cfg.intermediate_size
  q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

  def shape(*dims):
    return jax.ShapeDtypeStruct(dims, dtype)

  attn = {'wq': shape(d, q_out), 'wk': shape(d, kv_out), 'wv': shape(d, kv_out), 'wo': shape(q_out, d)}
  if cfg.family == 'llama':
    mlp = {'w_gate': shape(d, f), 'w_up': shape(d, f), 'w_down': shape(f, d)}
  else:  # gpt_neox and gpt2 carry biases on every projection
    attn.update({'bq': shape(q_out), 'bk': shape(kv_out), 'bv': shape(kv_out), 'bo': shape(d)})
    mlp = {'w_up': shape(d, f), 'b_up': shape(f), 'w_down': shape(f, d), 'b_down': shape(d)}
  return {'ln1': _norm(cfg, dtype), 'ln2': _norm(cfg, dtype), 'attn': attn, 'mlp': mlp}


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
  """The loaders' parameter pytree for `cfg`, as ShapeDtypeStructs."""
  params = {
    'embed': jax.ShapeDtypeStruct((cfg.vocab_size, cfg.d_model), dtype),
    'layers': [_layer(cfg, dtype) for _ in range(cfg.num_layers)],
    'final_norm': _norm(cfg, dtype),
  }
  if cfg.learned_positions:
    params['pos_embed'] = jax.ShapeDtypeStruct((cfg.max_position_embeddings, cfg.d_model), dtype)
  if not cfg.tie_word_embeddings:
    params['unembed'] = jax.ShapeDtypeStruct((cfg.vocab_size, cfg.d_model), dtype)
  return params


def random_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
  """Random weights of `cfg`'s shapes (normal, std 0.02; norm scales 1, biases 0), made on the default device."""
  abstract = abstract_params(cfg, dtype)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(key, len(leaves))

  def fill(path, leaf, leaf_key):
    name = jax.tree_util.keystr(path)
    if "'scale'" in name:
      return jnp.ones(leaf.shape, dtype)
    if "'bias'" in name or leaf.ndim == 1:
      return jnp.zeros(leaf.shape, dtype)
    return (0.02 * jax.random.normal(leaf_key, leaf.shape, jnp.float32)).astype(dtype)

  return jax.tree.unflatten(treedef, [fill(path, leaf, k) for (path, leaf), k in zip(leaves, keys)])
