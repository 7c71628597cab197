"""The paper's qualitative claims as measurements on runs this machine can make, each with a verdict.

Every check trains small SAEs on synthetic ground truth (or a small random-LM stream), measures one quantity,
and states whether the claim holds. Nothing is tuned until it agrees: the settings are fixed up front, and a
claim that does not hold is reported as not holding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import stats

from saejax.analysis import fits
from saejax.analysis.pairs import analyse_pair
from saejax.analysis.seeds import analyse_seeds
from saejax.config import TrainConfig
from saejax.train.trainer import train_in_memory


@dataclasses.dataclass
class Claim:
  claim: str
  measured: str
  holds: bool | None  # None: the run could not test the claim (e.g. sparsity not matched)
  details: dict[str, Any] = dataclasses.field(default_factory=dict)


def _saes(params) -> dict[str, dict[str, np.ndarray]]:
  return {f'seed{i}': {'W_enc': params['W_enc'][i], 'W_dec': params['W_dec'][i]}
          for i in range(params['W_dec'].shape[0])}


def shared_fraction(config: TrainConfig) -> tuple[float, dict]:
  """Trains two seeds and returns their shared fraction (paper rule) plus the pair result's summary."""
  params, history = train_in_memory(dataclasses.replace(config, init_seeds=(0, 1)))
  saes = _saes(params)
  pair = analyse_pair(saes['seed0'], saes['seed1'])
  summary = {**pair.summary, 'l0': float(np.mean(history[-1]['l0'])), 'fvu': float(np.mean(history[-1]['fvu']))}
  return pair.summary['shared_fraction'], summary


def _trend(name: str, field: str, values, base: TrainConfig, expect_sign: int) -> Claim:
  fractions = [shared_fraction(dataclasses.replace(base, **{field: v}))[0] for v in values]
  rho = stats.spearmanr(values, fractions).statistic if len(set(fractions)) > 1 else 0.0
  holds = bool(np.sign(rho) == expect_sign and abs(rho) >= 0.8)
  measured = ', '.join(f'{field}={v}: {f:.3f}' for v, f in zip(values, fractions))
  return Claim(name, f'{measured} (Spearman {rho:+.2f})', holds, {'values': list(values), 'shared': fractions})


def permuted_copy(base: TrainConfig) -> Claim:
  params, _ = train_in_memory(dataclasses.replace(base, init_seeds=(0,)))
  sae = {'W_enc': params['W_enc'][0], 'W_dec': params['W_dec'][0]}
  perm = np.random.default_rng(0).permutation(sae['W_dec'].shape[0])
  pair = analyse_pair(sae, {name: value[perm] for name, value in sae.items()})
  exact = bool(np.array_equal(perm[pair.enc_partner], np.arange(len(perm))))
  fraction = pair.summary['shared_fraction']
  return Claim('a permuted copy is 100% shared', f'shared {fraction:.3f}, inverse permutation recovered: {exact}',
               fraction == 1.0 and exact)


def bimodality(base: TrainConfig) -> Claim:
  """Sarle's bimodality coefficient of the decoder matched cosines; > 5/9 suggests two modes."""
  params, _ = train_in_memory(dataclasses.replace(base, init_seeds=(0, 1)))
  saes = _saes(params)
  cos = analyse_pair(saes['seed0'], saes['seed1']).dec_cos.astype(np.float64)
  n = len(cos)
  skew, kurt = stats.skew(cos), stats.kurtosis(cos)
  coefficient = (skew**2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
  return Claim('the matched-cosine distribution is bimodal', f'bimodality coefficient {coefficient:.3f} (> 0.555)',
               bool(coefficient > 5 / 9), {'coefficient': float(coefficient)})


def seeds_and_frequency(base: TrainConfig, num_seeds: int, firing_tokens: int) -> tuple[Claim, Claim, Claim, dict]:
  """Frequency vs sharing, the unique-fraction fits, and ground-truth recovery split by shared / orphan."""
  from saejax import data
  from saejax import sae as sae_lib
  from saejax import sharding as shd
  from saejax.analysis import firing

  config = dataclasses.replace(base, init_seeds=tuple(range(num_seeds)))
  params, _ = train_in_memory(config)
  result = analyse_seeds(_saes(params), progress=False)
  source = data.make_source(config, shd.batch_sharding(shd.make_mesh()))
  counts, tokens = firing.count_firing(params, sae_lib.SaeSpec.from_config(config), source, firing_tokens,
                                       start_position=config.num_steps, progress=False)
  base_mask = result.masks['seed0']
  n_shared = np.array([bin(int(m)).count('1') for m in base_mask])
  rho = stats.spearmanr(counts[0], n_shared).statistic
  frequency = Claim('frequently firing latents are shared more often',
                    f'Spearman(firing count, seeds sharing) = {rho:+.2f} over {tokens} tokens', bool(rho > 0.2))
  k_values = sorted(result.unique_fraction_by_k)
  fitted = fits.fit_unique_fraction(k_values, [result.unique_fraction_by_k[k] for k in k_values])
  aics = {name: model['aic'] for name, model in fitted['models'].items() if model.get('error') is None}
  offset_better = 'power_offset' in aics and 'power' in aics and aics['power_offset'] < aics['power']
  curve = Claim('unique-vs-seeds fits a power law with offset better than without',
                ', '.join(f'AIC {name} {value:.1f}' for name, value in aics.items()), bool(offset_better),
                {'unique_fraction_by_k': {str(k): result.unique_fraction_by_k[k] for k in k_values}})
  recovery = _recovery_by_sharing(source, params, result)
  return frequency, curve, recovery, {'exactly_in_n': result.exactly_in_n}


def _recovery_by_sharing(source, params, result) -> Claim:
  """Best cosine of each learned decoder row to any true feature, for shared and for orphan latents."""
  truth = source.features_FxD / np.linalg.norm(source.features_FxD, axis=-1, keepdims=True)
  shared_cos, orphan_cos = [], []
  for index, name in enumerate(result.names):
    W_dec = params['W_dec'][index]
    best = (W_dec / np.linalg.norm(W_dec, axis=-1, keepdims=True) @ truth.T).max(axis=1)
    shared_anywhere = result.masks[name] > 0
    shared_cos.append(best[shared_anywhere].mean() if shared_anywhere.any() else np.nan)
    orphan_cos.append(best[~shared_anywhere].mean() if (~shared_anywhere).any() else np.nan)
  s, o = float(np.nanmean(shared_cos)), float(np.nanmean(orphan_cos))
  return Claim('shared latents match true features better than orphans (ground truth; not in the paper)',
               f'mean best cosine to a true feature: shared {s:.3f}, orphan {o:.3f}', bool(s > o),
               {'shared_per_seed': [float(x) for x in shared_cos], 'orphan_per_seed': [float(x) for x in orphan_cos]})


def l1_vs_topk(base: TrainConfig, l1_coefficients) -> Claim:
  """TopK against ReLU+L1 and Gated, each at the L1 coefficient whose L0 lands nearest TopK's (fixed grid)."""
  topk_fraction, topk = shared_fraction(base)
  rows = {'topk': (topk_fraction, topk['l0'])}
  for arch in ('relu', 'gated'):
    runs = [shared_fraction(dataclasses.replace(base, arch=arch, l1_coefficient=c)) for c in l1_coefficients]
    fraction, summary = min(runs, key=lambda r: abs(r[1]['l0'] - topk['l0']))
    rows[arch] = (fraction, summary['l0'])
  holds = rows['relu'][0] > rows['topk'][0] and rows['gated'][0] > rows['topk'][0]
  measured = ', '.join(f'{arch}: shared {f:.3f} at L0 {l0:.1f}' for arch, (f, l0) in rows.items())
  matched = all(abs(l0 - topk['l0']) <= 0.25 * topk['l0'] for _, l0 in rows.values())
  if not matched:
    measured += ' (L0 not matched within 25%: not a test of the claim)'
  return Claim('ReLU+L1 and Gated are more stable than TopK at matched L0', measured, bool(holds) if matched else None,
               {'rows': rows})
