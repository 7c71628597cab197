"""Language models as activation sources: torch-free JAX forwards of GPT-NeoX, GPT-2 and Llama checkpoints.

`load_pretrained(path_or_id, dtype, mesh)` reads `config.json` + `*.safetensors` from a local folder, the
Hugging Face cache or the Hub, or a llama.cpp `.gguf` file (a path, a folder holding one, or the registry name
`smollm2`; every quantization the `gguf` package dequantizes; `read_config` reads its config alone);
`model.activations(tokens_BxT, hookpoints)` returns {hookpoint: [B, T, d]} for hookpoints `layers.N` (residual
after block N), `layers.N.attn` and `layers.N.mlp` (block outputs before the residual add), and
`model.logits(tokens_BxT, replace)` splices replacements in for the downstream loss.
"""

from saejax.models.config import FAMILIES, ModelConfig, RopeSpec, from_hf_config, parse_hookpoint
from saejax.models.model import LanguageModel, load_pretrained, read_config
from saejax.models.tokenizer import load_tokenizer

__all__ = [
  'FAMILIES',
  'LanguageModel',
  'ModelConfig',
  'RopeSpec',
  'from_hf_config',
  'load_pretrained',
  'load_tokenizer',
  'parse_hookpoint',
  'read_config',
]
