"""The one typed configuration of a training run.

`TrainConfig` is a plain (non-frozen) dataclass so absl's `config_flags` can override any field from the
command line (`--config.k=64`). Named presets, one per paper setup, live in `experiments/presets.py`.
Derived quantities (learning rate from the recipe, number of steps) are methods, never stored twice.
"""

import dataclasses
import math
from typing import Any

from saejax import tuning, variants

ARCHITECTURES = ('topk', 'batchtopk', 'matryoshka', 'relu', 'gated', 'jumprelu')
SOURCES = ('synthetic', 'lm', 'cache')
LM_SOURCES = ('lm', 'cache')  # token sequences of a language model: whole sequences, several hookpoints
B_DEC_INITS = ('mean', 'geometric_median')
LM_DTYPES = ('auto', 'bfloat16', 'float32')
SAE_DTYPES = ('auto', 'float32', 'bfloat16')
TOPK_KERNELS = ('auto', 'sparse', 'dense')
TRACKERS = ('none', 'tensorboard', 'wandb')


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a run. Defaults follow recipe.md section 1 (the paper's TopK recipe)."""

  # --- SAE ---
  arch: str = 'topk'
  init_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8)
  num_latents: int = 32768
  k: int = 32
  # ReLU+L1 and Gated sparsity coefficient; JumpReLU L0 coefficient.
  l1_coefficient: float = 3.0
  jumprelu_threshold_init: float = 0.001
  jumprelu_bandwidth: float = 0.001
  # Paper-era default is off for both (recipe.md section 1).
  auxk: bool = False
  auxk_coefficient: float = 1.0 / 32.0
  multi_topk: bool = False
  # Matryoshka BatchTopK (arch='matryoshka'): the nested prefix widths, strictly increasing and ending at
  # num_latents, each of which must reconstruct the input on its own; () means num_latents / 16, / 4 and all.
  matryoshka_widths: tuple[int, ...] = ()
  # Hyperparameter variants trained beside the seeds in the same step (saejax.variants): 'k=16,32,64',
  # 'k=16,32;lr=1e-4,3e-4' (every combination) or 'arch=topk|arch=relu,l1_coefficient=3.0'. '' trains the one
  # setting above; otherwise each variant is this config with its overrides.
  variants: str = ''
  # 'mean' (code from late 2024 on) or 'geometric_median' (mid-2024 code that trained the paper's seed 1).
  b_dec_init: str = 'mean'

  # --- optimiser ---
  # None means the recipe's 2e-4 / sqrt(num_latents / 2**14).
  lr: float | None = None
  warmup_steps: int = 1000
  grad_clip: float = 1.0

  # --- data ---
  source: str = 'synthetic'
  hookpoint: str = 'synthetic'
  batch_size: int = 4096  # tokens per step
  num_tokens: int = 8_000_000_000
  d_in: int = 768
  data_seed: int = 0
  # Synthetic ground truth: F unit-norm directions in d_in dims, power-law firing probabilities.
  num_features: int = 4096
  feature_firing_exponent: float = 1.0
  feature_max_firing_prob: float = 0.05
  feature_noise_std: float = 0.0
  feature_group_size: int = 1  # >1: features fire in correlated groups of this size
  feature_group_coactivation: float = 0.5
  # Language-model source: a local folder, an HF-cache entry or a Hub id (online) for both. With source='cache',
  # `dataset` is an activation cache folder written by `python -m experiments.cache` (saejax/data/cache.py).
  model: str = 'EleutherAI/pythia-160m'
  dataset: str = 'EleutherAI/the_pile_deduplicated'
  dataset_split: str = 'train'
  text_column: str = 'text'
  context_length: int = 2049
  # The paper ran the LM in bf16; 'auto' is saejax.tuning's per-platform choice. The SAEs: `sae_dtype` below.
  lm_dtype: str = 'bfloat16'
  exclude_special_tokens: bool = False  # drop BOS/EOS positions from the activation stream
  eval_tokens: int = 1_000_000  # held-out tokens for CE-loss/KL/FVU evaluation at the end (0: skip)
  # Text (or token rows) for that evaluation; '' means the training dataset after the trained batches (for a
  # cache: the dataset it was written from, after the tokens it holds).
  eval_dataset: str = ''
  cache_epochs: int = 1  # source='cache': passes over the cache training may make (reshuffled each pass)

  # --- bookkeeping ---
  # Experiment tracker beside metrics.jsonl: 'none', 'tensorboard' (saejax[tensorboard]) or 'wandb' (saejax[wandb]).
  tracker: str = 'none'
  tracker_project: str = ''  # wandb project ('' -> 'saejax')
  dead_tokens: int = 10_000_000
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 2
  # Mesh over all local devices: data x model. -1 means "all devices left over".
  mesh_data: int = -1
  mesh_model: int = 1
  # The SAE kernel plan; -1 / 'auto' pick per platform (saejax.tuning, where each choice is explained).
  # Tokens per chunk of the sparse TopK gathers and scatters: n > 0 loops over strided chunks of n tokens (a
  # cache-sized working set on CPU: 32); 0 means no token chunks.
  kernel_chunk_tokens: int = -1
  # Without token chunks, the gathers and scatters run over about n equal blocks (accelerators: 8, a trip count
  # that does not grow with the batch); 0 runs the whole batch in one pass.
  kernel_blocks: int = -1
  topk_kernel: str = 'auto'  # 'sparse' (gathers + row scatters) or 'dense' (masked dense products)
  # The top-k over latents as a top-k of block maxima, then of the best blocks' values, in blocks of n latents
  # (CPU: 8); exactly lax.top_k's result, so only the speed changes. 0 is one lax.top_k over the row.
  topk_block: int = -1
  # SAE matmul operands: 'float32' or 'bfloat16' (float32 accumulation, master weights, Adam and renormalisation).
  sae_dtype: str = 'auto'
  # Seeds train in groups of g (one call of the same compiled step each; the last group padded), so a seed's SAE
  # does not depend on the seed count. -1 picks per platform (saejax.tuning): 1 on CPU, 3 (or 1 for very wide
  # SAEs) on accelerators. 0 puts all seeds in one group: fewer calls, but then the program depends on S.
  seed_group_size: int = -1

  def validate(self) -> None:
    """Raises ValueError with one line that says what to change."""
    checks = [
      (self.arch in ARCHITECTURES, f'arch={self.arch!r} is unknown; use one of {", ".join(ARCHITECTURES)}'),
      (self.source in SOURCES, f'source={self.source!r} is unknown; use one of {", ".join(SOURCES)}'),
      (self.b_dec_init in B_DEC_INITS, f'b_dec_init={self.b_dec_init!r}; use one of {", ".join(B_DEC_INITS)}'),
      (len(self.init_seeds) >= 1, 'init_seeds is empty; give at least one seed, e.g. --config.init_seeds=0,1'),
      (len(set(self.init_seeds)) == len(self.init_seeds), f'init_seeds={self.init_seeds} has repeats'),
      (self.num_latents > 0 and self.d_in > 0, 'num_latents and d_in must be positive'),
      (0 < self.k <= self.num_latents, f'k={self.k} must be in [1, num_latents={self.num_latents}]'),
      (
        self._matryoshka_widths_ok(),
        f'matryoshka_widths={self.matryoshka_widths} must rise strictly from above 0 '
        f'to num_latents={self.num_latents}, e.g. {self.num_latents // 4},{self.num_latents}',
      ),
      (self.batch_size > 0, 'batch_size (tokens per step) must be positive'),
      (self.num_tokens >= self.batch_size, f'num_tokens={self.num_tokens} is less than one batch ({self.batch_size})'),
      (self.checkpoint_every > 0 and self.log_every > 0, 'checkpoint_every and log_every must be positive'),
      (self.lr is None or self.lr > 0, f'lr={self.lr} must be positive (or None for the recipe value)'),
      (self.num_features > 0, 'num_features must be positive'),
      (not self.feature_noise_std < 0, 'feature_noise_std must be >= 0'),
      (0 < self.feature_max_firing_prob <= 1, 'feature_max_firing_prob must be in (0, 1]'),
      (self.kernel_chunk_tokens >= -1, 'kernel_chunk_tokens must be -1 (per platform), 0 (no chunks) or positive'),
      (self.kernel_blocks >= -1, 'kernel_blocks must be -1 (per platform), 0 (whole batch) or positive'),
      (self.topk_block >= -1, 'topk_block must be -1 (per platform), 0 (one lax.top_k) or positive'),
      (self.topk_kernel in TOPK_KERNELS, f'topk_kernel={self.topk_kernel!r}; use one of {", ".join(TOPK_KERNELS)}'),
      (self.tracker in TRACKERS, f'tracker={self.tracker!r}; use one of {", ".join(TRACKERS)}'),
      (self.sae_dtype in SAE_DTYPES, f'sae_dtype={self.sae_dtype!r}; use one of {", ".join(SAE_DTYPES)}'),
      (self.seed_group_size >= -1, 'seed_group_size must be -1 (per platform), 0 (one group of all seeds) or positive'),
      (len(self.hookpoints) >= 1, 'hookpoint is empty; name one, e.g. layers.6.mlp'),
      (len(set(self.hookpoints)) == len(self.hookpoints), f'hookpoint={self.hookpoint!r} repeats a name'),
      (self.source in LM_SOURCES or len(self.hookpoints) == 1, 'several hookpoints need the lm or cache source'),
      (self.cache_epochs >= 1, f'cache_epochs={self.cache_epochs} must be at least 1'),
      (self.lm_dtype in LM_DTYPES, f'lm_dtype={self.lm_dtype!r}; use one of {", ".join(LM_DTYPES)}'),
      (
        self.source not in LM_SOURCES or self.batch_size % self.context_length == 0,
        f'batch_size={self.batch_size} must be a multiple of context_length={self.context_length} (whole sequences)',
      ),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)
    variants.resolve(self)  # each variant's own config is valid (one line naming the variant otherwise)

  def _matryoshka_widths_ok(self) -> bool:
    widths = tuple(self.matryoshka_widths)
    if not widths:
      return True
    rising = all(a < b for a, b in zip(widths, widths[1:]))
    return rising and widths[0] > 0 and widths[-1] == self.num_latents

  def resolved_kernel_plan(self, platform: str) -> dict[str, Any]:
    """The SaeSpec kernel fields for `platform` ('cpu', 'gpu', 'tpu'), with -1 / 'auto' resolved."""

    def pick(value, default):
      return default if value in (-1, 'auto') else value

    return {
      'chunk_tokens': pick(self.kernel_chunk_tokens, tuning.kernel_chunk_tokens(platform)),
      'kernel_blocks': pick(self.kernel_blocks, tuning.kernel_blocks(platform)),
      'topk_kernel': pick(self.topk_kernel, tuning.topk_kernel(platform)),
      'topk_block': pick(self.topk_block, tuning.topk_block(platform)),
      'sae_dtype': pick(self.sae_dtype, tuning.sae_dtype(platform)),
    }

  def resolved_seed_group_size(self, platform: str) -> int:
    if self.seed_group_size >= 0:
      return self.seed_group_size
    return tuning.seed_group_size(platform, self.batch_size, self.num_latents)

  def resolved_lm_dtype(self, platform: str | None = None) -> str:
    """'float32' or 'bfloat16': `lm_dtype`, with 'auto' resolved for `platform` (the default backend if None)."""
    if self.lm_dtype != 'auto':
      return self.lm_dtype
    if platform is None:
      import jax

      platform = jax.default_backend()
    return tuning.lm_dtype(platform)

  @property
  def hookpoints(self) -> list[str]:
    """`hookpoint` may list several (comma-separated): one LM forward feeds S seeds at each."""
    return [name.strip() for name in self.hookpoint.split(',') if name.strip()]

  @property
  def num_steps(self) -> int:
    return self.num_tokens // self.batch_size

  @property
  def resolved_warmup_steps(self) -> int:
    """`warmup_steps`, or a tenth of the run when the run is not longer than that (the trainer warns)."""
    return self.warmup_steps if self.warmup_steps < self.num_steps else max(1, self.num_steps // 10)

  @property
  def learning_rate(self) -> float:
    """The recipe's width-scaled rate unless `lr` is given."""
    if self.lr is not None:
      return self.lr
    return 2e-4 / math.sqrt(self.num_latents / 2**14)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> 'TrainConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f'config has unknown fields {unknown}; was it written by a newer saejax?')
    data = dict(data)
    for name in ('init_seeds', 'matryoshka_widths'):
      if name in data:
        data[name] = tuple(data[name])
    return cls(**data)
