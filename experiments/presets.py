"""Named presets, one per paper setup: `python -m experiments.train --config=NAME`.

Each preset is a function returning a fresh `TrainConfig`; its docstring gives the command that runs it.
"""

from __future__ import annotations

from collections.abc import Callable

from saejax.config import TrainConfig


def synthetic() -> TrainConfig:
  """Offline default: nine TopK seeds recover known power-law features in superposition, in minutes on a CPU.

  python -m experiments.train --config=synthetic --workdir=runs/synthetic
  """
  return TrainConfig(
    source='synthetic',
    hookpoint='synthetic',
    d_in=64,
    num_features=512,
    feature_max_firing_prob=0.08,
    feature_firing_exponent=0.5,
    num_latents=1024,
    k=8,
    batch_size=1024,
    num_tokens=1024 * 1500,
    lr=1e-3,
    warmup_steps=100,
    dead_tokens=200_000,
    log_every=50,
    checkpoint_every=250,
  )


def pythia160m() -> TrainConfig:
  """The paper: Pythia-160M layers.6.mlp, 32768 latents, k=32, 32 x 2049-token batches, 8B tokens, 9 seeds.

  python -m experiments.train --config=pythia160m --workdir=runs/pythia160m
  """
  return TrainConfig(
    source='lm',
    model='EleutherAI/pythia-160m',
    dataset='EleutherAI/the_pile_deduplicated',
    hookpoint='layers.6.mlp',
    d_in=768,
    num_latents=32768,
    k=32,
    batch_size=32 * 2049,
    context_length=2049,
    num_tokens=8_000_000_000,
    lr=None,
    checkpoint_every=2000,
    log_every=100,
  )


PRESETS: dict[str, Callable[[], TrainConfig]] = {'synthetic': synthetic, 'pythia160m': pythia160m}


def get(name) -> TrainConfig:
  """absl parse function: a preset name (or an existing TrainConfig) -> a fresh TrainConfig."""
  if isinstance(name, TrainConfig):
    return name
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; choose one of: {", ".join(PRESETS)}')
  return PRESETS[name]()
