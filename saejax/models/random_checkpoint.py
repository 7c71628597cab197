"""Random-weight GPT-NeoX checkpoints in the Hugging Face layout, written without torch.

For benchmarks (a Pythia-160M-shaped model when the real weights are not on the machine) and for offline
end-to-end runs: the folder holds `config.json` and `model.safetensors` with the Hub's key names, so it loads
through exactly the same path as a downloaded Pythia checkpoint.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

PYTHIA_160M = dict(
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
  vocab_size=50304,
  rotary_pct=0.25,
  max_position_embeddings=2048,
)


def neox_config(
  hidden_size: int,
  num_hidden_layers: int,
  num_attention_heads: int,
  intermediate_size: int,
  vocab_size: int,
  rotary_pct: float = 0.25,
  max_position_embeddings: int = 2048,
  eos_token_id: int = 0,
) -> dict:
  return {
    'architectures': ['GPTNeoXForCausalLM'],
    'model_type': 'gpt_neox',
    'hidden_size': hidden_size,
    'num_hidden_layers': num_hidden_layers,
    'num_attention_heads': num_attention_heads,
    'intermediate_size': intermediate_size,
    'vocab_size': vocab_size,
    'rotary_pct': rotary_pct,
    'rotary_emb_base': 10000,
    'max_position_embeddings': max_position_embeddings,
    'layer_norm_eps': 1e-5,
    'hidden_act': 'gelu',
    'use_parallel_residual': True,
    'tie_word_embeddings': False,
    'bos_token_id': eos_token_id,
    'eos_token_id': eos_token_id,
    'torch_dtype': 'float16',
  }


def write_random_neox(folder: str, seed: int = 0, dtype=np.float16, **sizes) -> str:
  """Writes a random GPT-NeoX checkpoint (Pythia-160M-shaped unless `sizes` say otherwise); returns `folder`."""
  config = neox_config(**{**PYTHIA_160M, **sizes})
  d, inner, vocab = config['hidden_size'], config['intermediate_size'], config['vocab_size']
  rng = np.random.default_rng(seed)
  save_dtype = ml_dtypes.bfloat16 if dtype == 'bfloat16' else dtype

  def normal(*shape, std=0.02):
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(save_dtype)

  def ones(n):
    return np.ones(n, save_dtype)

  def zeros(n):
    return np.zeros(n, save_dtype)

  tensors = {
    'gpt_neox.embed_in.weight': normal(vocab, d),
    'embed_out.weight': normal(vocab, d),
    'gpt_neox.final_layer_norm.weight': ones(d),
    'gpt_neox.final_layer_norm.bias': zeros(d),
  }
  for layer in range(config['num_hidden_layers']):
    prefix = f'gpt_neox.layers.{layer}.'
    tensors.update(
      {
        prefix + 'input_layernorm.weight': ones(d),
        prefix + 'input_layernorm.bias': zeros(d),
        prefix + 'post_attention_layernorm.weight': ones(d),
        prefix + 'post_attention_layernorm.bias': zeros(d),
        prefix + 'attention.query_key_value.weight': normal(3 * d, d),
        prefix + 'attention.query_key_value.bias': zeros(3 * d),
        prefix + 'attention.dense.weight': normal(d, d),
        prefix + 'attention.dense.bias': zeros(d),
        prefix + 'mlp.dense_h_to_4h.weight': normal(inner, d),
        prefix + 'mlp.dense_h_to_4h.bias': zeros(inner),
        prefix + 'mlp.dense_4h_to_h.weight': normal(d, inner),
        prefix + 'mlp.dense_4h_to_h.bias': zeros(d),
      }
    )
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, 'model.safetensors'))
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=1)
  return folder
