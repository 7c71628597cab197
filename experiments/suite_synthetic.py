"""The synthetic suite: the paper's qualitative claims on synthetic ground truth and a small random-weight LM.

  python -m experiments.reproduce --suite=synthetic --out=runs/reproduce     # about 10 minutes on 2 cores
  python -m experiments.reproduce --suite=synthetic --quick --out=/tmp/repro  # the test-suite variant, a minute

Writes `report.md` (claim, measured value, holds or not) and `claims.json`. Settings are fixed below and never
adjusted to make a claim pass; a claim that does not hold here is reported as not holding.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np

from saejax import storage
from saejax.analysis import claims, report
from saejax.config import TrainConfig

VERDICTS = {True: 'yes', False: '**no**', None: 'not tested'}
REPORT_VERDICTS = {True: 'HOLDS', False: 'DOES NOT HOLD', None: 'NOT TESTED'}


def synthetic_base(quick: bool) -> TrainConfig:
  # The full base equals the `synthetic` preset's fields on purpose, but is spelled out: the suite's settings are
  # fixed in advance, so editing the preset must not silently change the claims' verdicts.
  if quick:
    return TrainConfig(
      d_in=16,
      num_features=64,
      feature_max_firing_prob=0.2,
      feature_firing_exponent=0.5,
      num_latents=64,
      k=4,
      batch_size=256,
      num_tokens=256 * 120,
      lr=3e-3,
      warmup_steps=10,
      dead_tokens=20_000,
      kernel_chunk_tokens=16,
    )
  return TrainConfig(
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
  )


def lm_base(quick: bool, folder: str) -> TrainConfig:
  """A small random GPT-NeoX over random token rows: real LM plumbing, no external data."""
  from saejax.models.random_checkpoint import write_random_neox

  d_model, context, rows = (32, 32, 8) if quick else (128, 128, 16)
  model = write_random_neox(
    os.path.join(folder, 'neox'),
    dtype=np.float32,
    hidden_size=d_model,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=4 * d_model,
    vocab_size=512,
    max_position_embeddings=context,
  )
  steps = 60 if quick else 400
  tokens = np.random.default_rng(0).integers(0, 512, (rows * (steps + 20), context), dtype=np.uint16)
  np.save(os.path.join(folder, 'tokens.npy'), tokens)
  return TrainConfig(
    source='lm',
    model=model,
    dataset=os.path.join(folder, 'tokens.npy'),
    hookpoint='layers.1.mlp',
    lm_dtype='float32',
    d_in=d_model,
    num_latents=4 * d_model,
    k=8,
    context_length=context,
    batch_size=rows * context,
    num_tokens=rows * context * steps,
    lr=2e-3,
    warmup_steps=10,
    eval_tokens=0,
  )


def run_claims(quick: bool, folder: str) -> list[claims.Claim]:
  base = synthetic_base(quick)
  scale = (lambda v: v) if not quick else (lambda v: max(1, v // 8))
  results = [
    claims.permuted_copy(base),
    claims.bimodality(base),
    claims._trend('more latents -> less sharing', 'num_latents', [scale(256), scale(1024), scale(4096)], base, -1),
    claims._trend('larger k -> less sharing', 'k', [4, 8, 16] if not quick else [2, 4, 8], base, -1),
    claims._trend(
      'longer training -> more sharing',
      'num_tokens',
      [base.num_tokens // 4, base.num_tokens, base.num_tokens * 4],
      base,
      +1,
    ),
    claims.l1_vs_topk(base),
  ]
  frequency, curve, recovery, _ = claims.seeds_and_frequency(base, num_seeds=6, firing_tokens=base.batch_size * 50)
  results += [frequency, curve, recovery]
  lm = lm_base(quick, folder)
  for claim in (
    claims.permuted_copy(lm),
    claims._trend('more latents -> less sharing', 'num_latents', [2 * lm.d_in, 4 * lm.d_in, 8 * lm.d_in], lm, -1),
  ):
    claim.claim = f'[random LM] {claim.claim}'
    results.append(claim)
  return results


def write_report(out: str, results: list[claims.Claim], seconds: float, quick: bool) -> None:
  lines = [
    "# Reproduction of the paper's qualitative claims",
    '',
    f'{"Quick" if quick else "Full"} suite, {seconds:.0f} s. Synthetic ground truth unless marked [random LM].',
    '',
    '| claim | measured | holds |',
    '|---|---|---|',
    *[f'| {c.claim} | {c.measured} | {VERDICTS[c.holds]} |' for c in results],
    '',
  ]
  for claim in results:
    if 'recovery' in claim.details:
      lines += report.ground_truth_section(claim.details['recovery'])
  storage.write_text(storage.join(out, 'report.md'), '\n'.join(lines).rstrip() + '\n')
  storage.write_json(storage.join(out, 'claims.json'), [dataclasses.asdict(c) for c in results], default=float)


def run_suite(out: str, quick: bool) -> list[claims.Claim]:
  started = time.time()
  with tempfile.TemporaryDirectory() as folder:
    results = run_claims(quick, folder)
  write_report(out, results, time.time() - started, quick)
  for claim in results:
    print(f'{REPORT_VERDICTS[claim.holds]}: {claim.claim}: {claim.measured}')
  return results
