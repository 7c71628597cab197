"""The pilot that fixed the smollm2 suite's base batch and learning rate (RESULTS.md, "suite pilot").

  python -m experiments.pilot_smollm2 --cache=runs/smollm2_cache     # a layers.6.mlp cache of >= 1M tokens

One TopK seed (2,304 latents, k=32) on 1M cached tokens per (batch, lr) setting. It prints, per setting, the
training FVU (mean of the last 5% of steps) and the mean cosine of each decoder row with its own init; it
computes no sharing, so it cannot tune the suite to a verdict. The rule fixed beforehand: the lowest FVU wins.
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import app, flags

from experiments.cli import fail, parse_flags

_CACHE = flags.DEFINE_string('cache', None, 'An activation cache of layers.6.mlp (experiments.cache).')
SETTINGS = ((2048, 8e-4), (512, 8e-4), (512, 2e-3), (1024, 2e-3), (512, 4e-3))  # (batch tokens, lr)
WIDTH, TOKENS = 2304, 1_000_000


def main(argv: list[str]) -> None:
  if len(argv) > 1 or not _CACHE.value:
    fail('usage: python -m experiments.pilot_smollm2 --cache=DIR')
  import jax
  import numpy as np

  from experiments import presets
  from saejax.analysis.claims import tail_mean
  from saejax.sae.base import SaeSpec, init_linear, unit_rows
  from saejax.train.trainer import train_in_memory

  for batch, lr in SETTINGS:
    config = dataclasses.replace(
      presets.smollm2(),
      source='cache',
      dataset=_CACHE.value,
      num_latents=WIDTH,
      batch_size=batch,
      num_tokens=(TOKENS // batch) * batch,
      lr=lr,
      init_seeds=(0,),
      eval_tokens=0,
    )
    started = time.time()
    params, history = train_in_memory(config)
    init_FxD = np.asarray(unit_rows(init_linear(jax.random.PRNGKey(0), SaeSpec.from_config(config))['W_dec']))
    trained_FxD = np.asarray(unit_rows(params['W_dec'][0]))
    row = {
      'batch': batch,
      'lr': lr,
      'steps': config.num_steps,
      'seconds': round(time.time() - started, 1),
      'fvu': tail_mean(history, 'fvu'),
      'dec_init_cos': float((trained_FxD * init_FxD).sum(axis=1).mean()),
    }
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
