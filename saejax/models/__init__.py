"""Language models as activation sources: torch-free JAX forwards of GPT-NeoX, GPT-2 and Llama checkpoints.

`load_pretrained(path_or_id, dtype, mesh)` reads `config.json` + `*.safetensors` from a local folder, the
Hugging Face cache or the Hub; `model.activations(tokens_BxT, hookpoints)` returns {hookpoint: [B, T, d]}
for hookpoints `layers.N` (residual after block N), `layers.N.attn` and `layers.N.mlp` (block outputs before
the residual add), and `model.logits(tokens_BxT, replace)` splices replacements in for the downstream loss.
"""

from saejax.models.config import FAMILIES, ModelConfig, RopeSpec, from_hf_config, parse_hookpoint
from saejax.models.model import LanguageModel, load_pretrained, read_config

__all__ = [
  'FAMILIES',
  'LanguageModel',
  'ModelConfig',
  'RopeSpec',
  'from_hf_config',
  'load_pretrained',
  'parse_hookpoint',
  'read_config',
]
