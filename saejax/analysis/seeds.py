"""Many seeds: all S(S-1)/2 pair matchings, per-latent sharing bitmasks, the donut, Fig. 2 and the universality table.

This module owns how pair results become per-seed sharing (both directions of every pair), the bitmask
encoding, the exact enumeration behind Fig. 2, the "exactly in n SAEs" counts (the donut chart) and the
universality CSV.

Both directions of a pair come from one pair of matchings. Side 'a' of the pair (the smaller SAE, see
pairs.py) has its labels directly. The other side's labels come from inverting the encoder matching, which is a
bijection for equal sizes (an injection into the larger SAE otherwise): shared_b[j] = shared_a[i] where
enc_partner[i] == j, and latents of b matched by nobody are orphans. Under the paper rule a shared latent has the
same partner in both matchings, so the encoder matching is no choice there; under the notebook rule it is.

Bitmasks: masks[base][i] has bit t set iff latent i of `base` is shared with seed t, where t is the seed's
position in `names` (the base's own bit is never set). At most 63 seeds.

Fig. 2 (paper section 4): for every base and every non-empty subset T of the other seeds, the fraction of the
base's latents that are orphans in every pairing with T (mask & T == 0). For subset size k - 1 the mean over
all C(S-1, k-1) subsets and over all S bases is unique_fraction_by_k[k], the same average as the paper's
k * C(S, k) experiments. The subsets are enumerated exactly via a histogram of the masks and a
sum-over-subsets transform: O(F + S * 2^(S-1)) per base instead of O(F * 2^(S-1)).

Per-latent stability (not in the paper): the fraction of the other S - 1 seeds in which a latent has a shared
partner, popcount(mask) / (S - 1); the `stability` column of the universality CSV, and its distribution over
every latent of every seed in summary.json (`seeds.stability`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from math import comb
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from saejax import storage
from saejax.analysis.pairs import PairResult, analyse_pair

MAX_SEEDS = 63  # uint64 masks
MAX_ENUMERATED_OTHERS = 26  # 2^26 subsets per base is the most the exact enumeration will take on


@dataclass
class SeedsResult:
  names: list[str]
  threshold: float
  rule: str  # 'paper' | 'notebook'
  pairs: dict[tuple[str, str], PairResult]  # keyed by (names[i], names[j]), i < j, as passed to analyse_pair
  shared: dict[str, dict[str, np.ndarray]]  # shared[base][other]: [F_base] bool
  partners: dict[str, dict[str, np.ndarray]]  # partners[base][other]: [F_base] int64, -1 where not shared
  masks: dict[str, np.ndarray]  # [F_base] uint64 sharing bitmasks (module docstring)
  exactly_in_n: dict[str, list[int]]
  unique_fraction_by_k: dict[int, float]
  unique_fraction_by_k_per_base: dict[str, dict[int, float]] = field(default_factory=dict)
  subsets_by_k: dict[int, int] = field(default_factory=dict)  # subsets of the others per base, by k
  n_subsets_per_base: int = 0  # 2^(S-1) - 1
  n_experiments: int = 0  # S * (2^(S-1) - 1) = sum_k k * C(S, k)

  def write_universality_csv(self, path: str) -> None:
    write_universality_csv(self, path)


def analyse_seeds(
  saes: Mapping[str, Mapping],
  threshold: float = 0.7,
  method: str = 'auto',
  workers: int | None = None,
  progress: bool = True,
  rule: str = 'paper',
  matcher: Callable | None = None,
  max_cos_fn: Callable | None = None,
) -> SeedsResult:
  """Matches every pair of SAEs (in parallel threads) and derives the multi-seed statistics.

  saes: {name: {'W_enc': [F, D], 'W_dec': [F, D]}}; the order of the names fixes the mask bits.
  workers: threads (default os.cpu_count()); each holds its pair's cosine work, so memory grows with it.
  rule: 'paper' (same partner, both >= threshold) or 'notebook' (both >= threshold) for the seed statistics.
  """
  if rule not in ('paper', 'notebook'):
    raise ValueError(f"rule must be 'paper' or 'notebook', got {rule!r}")
  names = list(saes)
  if not 2 <= len(names) <= MAX_SEEDS:
    raise ValueError(f'need 2 to {MAX_SEEDS} SAEs, got {len(names)}')
  pair_names = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
  workers = max(1, min(workers or os.cpu_count() or 1, len(pair_names)))
  pairs: dict[tuple[str, str], PairResult] = {}
  kwargs = dict(threshold=threshold, method=method, matcher=matcher, max_cos_fn=max_cos_fn)
  with (
    ThreadPoolExecutor(max_workers=workers) as pool,
    tqdm(total=len(pair_names), desc='matching pairs', disable=None if progress else True) as bar,
  ):
    futures = {pool.submit(analyse_pair, saes[a], saes[b], **kwargs): (a, b) for a, b in pair_names}
    for future in as_completed(futures):
      pairs[futures[future]] = future.result()
      bar.update(1)
  pairs = {key: pairs[key] for key in pair_names}
  sizes = {name: int(np.shape(saes[name]['W_enc'])[0]) for name in names}
  shared, partners = directed_sharing(pairs, sizes, rule)
  masks = sharing_masks(shared, names)
  curve = unique_fraction_curve(masks, names)
  return SeedsResult(
    names=names,
    threshold=float(threshold),
    rule=rule,
    pairs=pairs,
    shared=shared,
    partners=partners,
    masks=masks,
    exactly_in_n=exactly_in_n_counts(masks, names),
    **curve,
  )


def directed_sharing(
  pairs: Mapping[tuple[str, str], PairResult], sizes: Mapping[str, int], rule: str = 'paper'
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
  """(shared[base][other] [F_base] bool, partners[base][other] [F_base] int64, -1 if not shared), both ways."""
  shared: dict[str, dict[str, np.ndarray]] = {name: {} for name in sizes}
  partners: dict[str, dict[str, np.ndarray]] = {name: {} for name in sizes}
  for (first, second), result in pairs.items():
    side_a, side_b = (second, first) if result.swapped else (first, second)
    mask_A = result.shared if rule == 'paper' else result.shared_notebook
    partner_A = np.where(mask_A, result.enc_partner, -1).astype(np.int64)
    # Reverse direction: invert the encoder matching (module docstring).
    mask_B = np.zeros(sizes[side_b], dtype=bool)
    partner_B = np.full(sizes[side_b], -1, dtype=np.int64)
    mask_B[result.enc_partner[mask_A]] = True
    partner_B[result.enc_partner[mask_A]] = np.flatnonzero(mask_A)
    shared[side_a][side_b], partners[side_a][side_b] = mask_A, partner_A
    shared[side_b][side_a], partners[side_b][side_a] = mask_B, partner_B
  return shared, partners


def sharing_masks(shared: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str]) -> dict[str, np.ndarray]:
  """Per-latent uint64 bitmasks: bit t of masks[base][i] set iff latent i of base is shared with names[t]."""
  bit = {name: np.uint64(1) << np.uint64(t) for t, name in enumerate(names)}
  masks = {}
  for base in names:
    others = shared[base]
    size = len(next(iter(others.values()))) if others else 0
    mask_F = np.zeros(size, dtype=np.uint64)
    for other, shared_F in others.items():
      if other == base:
        raise ValueError(f'{base} cannot share latents with itself')
      mask_F |= np.where(np.asarray(shared_F, dtype=bool), bit[other], np.uint64(0))
    masks[base] = mask_F
  return masks


def popcount(mask_F: np.ndarray) -> np.ndarray:
  """Number of set bits of each uint64 (numpy >= 2 has a ufunc; the loop keeps numpy 1.26 working)."""
  mask_F = np.asarray(mask_F, dtype=np.uint64)
  if hasattr(np, 'bitwise_count'):
    return np.bitwise_count(mask_F).astype(np.int64)
  count_F = np.zeros(mask_F.shape, dtype=np.int64)
  for t in range(64):
    count_F += ((mask_F >> np.uint64(t)) & np.uint64(1)).astype(np.int64)
  return count_F


def exactly_in_n_counts(masks: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, list[int]]:
  """{base: counts}, counts[n - 1] = latents of base found in exactly n SAEs, the base included (n = 1: only there)."""
  counts = {}
  for base in names:
    n_F = 1 + popcount(masks[base])
    counts[base] = [int(c) for c in np.bincount(n_F - 1, minlength=len(names))[: len(names)]]
  return counts


def unique_fraction_curve(masks: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, Any]:
  """Fig. 2 by exact enumeration of every non-empty subset of the other seeds, for every base.

  Returns unique_fraction_by_k {k: mean over bases and subsets}, unique_fraction_by_k_per_base, subsets_by_k
  {k: C(S-1, k-1)}, n_subsets_per_base (2^(S-1) - 1) and n_experiments (S times that).
  """
  n_seeds = len(names)
  n_others = n_seeds - 1
  if n_others > MAX_ENUMERATED_OTHERS:
    raise ValueError(f'{n_seeds} seeds make 2^{n_others} subsets per base, too many to enumerate')
  n_subsets = 1 << n_others
  size_T = popcount(np.arange(n_subsets, dtype=np.uint64))  # popcount of every subset T of the others
  full = n_subsets - 1
  per_base: dict[str, dict[int, float]] = {}
  for t, base in enumerate(names):
    mask_F = np.asarray(masks[base], dtype=np.uint64)
    if mask_F.size and np.any(mask_F & (np.uint64(1) << np.uint64(t))):
      raise ValueError(f'masks[{base!r}] has its own bit set')
    # Re-index the bits to the others only: bit j <-> j-th other seed in `names` order.
    compact_F = np.zeros(mask_F.shape, dtype=np.int64)
    for j, s in enumerate(s for s in range(n_seeds) if s != t):
      compact_F |= (((mask_F >> np.uint64(s)) & np.uint64(1)).astype(np.int64)) << j
    subset_sums_U = _sum_over_subsets(np.bincount(compact_F, minlength=n_subsets).astype(np.int64), n_others)
    # Latents orphan in every pairing with T: masks inside the complement of T.
    unique_T = subset_sums_U[full ^ np.arange(n_subsets)]
    by_size = np.bincount(size_T[1:], weights=unique_T[1:], minlength=n_seeds)
    per_base[base] = {
      k: float(by_size[k - 1] / comb(n_others, k - 1) / max(mask_F.size, 1)) for k in range(2, n_seeds + 1)
    }
  curve = {k: float(np.mean([per_base[base][k] for base in names])) for k in range(2, n_seeds + 1)}
  return {
    'unique_fraction_by_k': curve,
    'unique_fraction_by_k_per_base': per_base,
    'subsets_by_k': {k: comb(n_others, k - 1) for k in range(2, n_seeds + 1)},
    'n_subsets_per_base': n_subsets - 1,
    'n_experiments': n_seeds * (n_subsets - 1),
  }


def _sum_over_subsets(h_U: np.ndarray, n_bits: int) -> np.ndarray:
  """g[U] = sum of h[x] over every x that is a subset of U (the zeta transform), vectorised per bit."""
  g_U = h_U.copy()
  for b in range(n_bits):
    view = g_U.reshape(-1, 2, 1 << b)  # axis 1 is bit b
    view[:, 1, :] += view[:, 0, :]
  return g_U


def stability(mask_F: np.ndarray, num_seeds: int) -> np.ndarray:
  """[F] float64: the fraction of the other seeds in which each latent has a shared partner."""
  return popcount(mask_F) / max(num_seeds - 1, 1)


def stability_distribution(masks: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, Any]:
  """The stability of every latent of every seed: its S possible values, the fraction of latents at each, the mean."""
  n_F = np.concatenate([popcount(masks[name]) for name in names]) if names else np.zeros(0, np.int64)
  counts = np.bincount(n_F, minlength=len(names))[: len(names)]
  total = max(int(counts.sum()), 1)
  return {
    'values': [n / max(len(names) - 1, 1) for n in range(len(names))],
    'fraction_of_latents': [float(c / total) for c in counts],
    'mean': float(n_F.mean() / max(len(names) - 1, 1)) if n_F.size else float('nan'),
    'median': float(np.median(n_F) / max(len(names) - 1, 1)) if n_F.size else float('nan'),
  }


def iter_universality_rows(result: SeedsResult) -> Iterator[dict[str, Any]]:
  """One row per latent per seed: seed, latent, n_shared, stability, and partner_<other> (-1 where not shared)."""
  for base in result.names:
    others = [name for name in result.names if name != base]
    n_shared_F = popcount(result.masks[base])
    stability_F = stability(result.masks[base], len(result.names))
    columns = [result.partners[base][other] for other in others]
    for i in range(n_shared_F.shape[0]):
      row: dict[str, Any] = {
        'seed': base,
        'latent': i,
        'n_shared': int(n_shared_F[i]),
        'stability': round(float(stability_F[i]), 6),
      }
      for other, partner_F in zip(others, columns):
        row[f'partner_{other}'] = int(partner_F[i])
      yield row


def universality_table(result: SeedsResult) -> list[dict[str, Any]]:
  """The universality rows as a list (the seed's own partner column is absent from its rows)."""
  return list(iter_universality_rows(result))


def universality_fields(names: Sequence[str]) -> list[str]:
  return ['seed', 'latent', 'n_shared', 'stability'] + [f'partner_{name}' for name in names]


def write_universality_csv(result: SeedsResult, path: str) -> None:
  """Writes the universality table as CSV atomically; a row's own-seed partner column is left empty."""
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=universality_fields(result.names), restval='')
  writer.writeheader()
  writer.writerows(iter_universality_rows(result))
  storage.write_text(path, text.getvalue())
