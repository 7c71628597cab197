"""Token windows for interpreting latents: the top activating, random activating and random silent windows.

Every row of a token batch is cut into non-overlapping windows of `window` tokens (Paulo et al., 2024, use
32-token contexts); a window's activation for a latent is its largest per-token activation. Over `num_tokens`
held-out tokens (batches after the run's last training step) this module keeps, per chosen latent:

- `top`: the `top_k` windows with the largest activation (the explainer's examples), with per-token activations;
- `act`: `num_random` activating windows sampled uniformly (the detection scorer's positives);
- `non`: `num_random` windows where the latent never fires, sampled uniformly (the scorer's negatives).

Selection runs on the accelerator: each batch is encoded in chunks, and the running top-k plus the two uniform
samples (priority sampling: every window gets a random key from a deterministic stream, the smallest keys win)
are merged into device-resident arrays, so nothing [tokens, latents] ever reaches the host. The result is
stored as one `.npz` per seed (written atomically) and reused when a later call asks for the same settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from saejax import sae as sae_lib
from saejax import storage

SETS = ('top', 'act', 'non')
MAX_CHUNK_ELEMENTS = 1 << 27  # token x latent activations encoded at once (512 MiB of float32)


@dataclasses.dataclass(frozen=True)
class ContextSettings:
  """What a contexts file was collected with; a stored file is reused only when these match exactly."""

  num_tokens: int = 1_000_000
  window: int = 32
  top_k: int = 40
  num_random: int = 100
  seed: int = 0


@dataclasses.dataclass
class Contexts:
  """Windows of one SAE's chosen latents. Arrays are [L, n] or [L, n, W]; a missing entry has window id -1.

  `<set>_window` is a global window id (batch offset, row, block; see `window_origin`), `<set>_value` the
  window's activation, `<set>_tokens` its token ids and `<set>_acts` its per-token activations.
  """

  latents: np.ndarray
  arrays: dict[str, np.ndarray]
  meta: dict[str, Any]

  def examples(self, index: int, which: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids [W], activations [W]) of the valid windows of the latent at `index`, best first for `top`."""
    valid = self.arrays[f'{which}_window'][index] >= 0
    tokens, acts = self.arrays[f'{which}_tokens'][index][valid], self.arrays[f'{which}_acts'][index][valid]
    return list(zip(tokens, acts))

  def window_ids(self, index: int, which: str) -> np.ndarray:
    ids = self.arrays[f'{which}_window'][index]
    return ids[ids >= 0]

  def index_of(self, latent: int) -> int:
    return int(np.flatnonzero(self.latents == latent)[0])


def window_origin(window_id: int, meta: dict[str, Any]) -> tuple[int, int, int]:
  """(batch position, row, first token) of a global window id."""
  per_batch = meta['rows'] * meta['blocks']
  offset, rest = divmod(int(window_id), per_batch)
  row, block = divmod(rest, meta['blocks'])
  return meta['start_position'] + offset, row, block * meta['window']


def _merge(keys_LxN, payload, new_keys_LxM, new_payload, n: int):
  """Keeps the `n` largest keys per latent over the union of two candidate sets (payload arrays follow)."""
  keys = jnp.concatenate([keys_LxN, new_keys_LxM], axis=1)
  best_LxN, idx_LxN = jax.lax.top_k(keys, n)
  merged = []
  for old, new in zip(payload, new_payload):
    both = jnp.concatenate([old, new], axis=1)
    index = idx_LxN.reshape(idx_LxN.shape + (1,) * (both.ndim - 2))
    merged.append(jnp.take_along_axis(both, index, axis=1))
  return best_LxN, merged


def _gather_windows(z_NxWxL, tokens_NxW, idx_LxM):
  """Token ids and per-token activations [L, M, W] of windows `idx` (per latent)."""
  L = idx_LxM.shape[0]
  tokens = tokens_NxW[idx_LxM]  # [L, M, W]
  acts = z_NxWxL[idx_LxM, :, jnp.arange(L)[:, None]]  # [L, M, W]
  return tokens, acts


@functools.partial(jax.jit, static_argnames=('arch', 'spec', 'window', 'top_k', 'num_random'), donate_argnums=0)
def _update(state, params, x_CxD, tokens_RxT, latents_L, first_id, key, *, arch, spec, window, top_k, num_random):
  """Encodes one chunk of rows and merges its windows into the running selections."""
  rows, T = tokens_RxT.shape
  blocks = T // window
  z_CxL = sae_lib.get(arch).encode(params, x_CxD, spec)[:, latents_L]
  z_NxWxL = z_CxL.reshape(rows, T, -1)[:, : blocks * window].reshape(rows * blocks, window, -1)
  tokens_NxW = tokens_RxT[:, : blocks * window].reshape(rows * blocks, window)
  value_LxN = jnp.max(z_NxWxL, axis=1).T
  ids_N = first_id + jnp.arange(rows * blocks, dtype=jnp.int32)
  active_LxN = value_LxN > 0
  new = {}
  m = min(top_k, value_LxN.shape[1])
  top_value, top_idx = jax.lax.top_k(jnp.where(active_LxN, value_LxN, -jnp.inf), m)
  new['top'] = (top_value, top_idx)
  priority_LxN = -jax.random.uniform(key, value_LxN.shape)  # larger key = smaller priority = kept
  m = min(num_random, value_LxN.shape[1])
  new['act'] = jax.lax.top_k(jnp.where(active_LxN, priority_LxN, -jnp.inf), m)
  new['non'] = jax.lax.top_k(jnp.where(active_LxN, -jnp.inf, priority_LxN), m)
  out = {}
  for name, (keys_LxM, idx_LxM) in new.items():
    tokens, acts = _gather_windows(z_NxWxL, tokens_NxW, idx_LxM)
    ids = jnp.where(jnp.isfinite(keys_LxM), ids_N[idx_LxM], -1)
    value = jnp.take_along_axis(value_LxN, idx_LxM, axis=1)
    old = state[name]
    n = old['key'].shape[1]
    best, (window_ids, values, toks, per_token) = _merge(
      old['key'], (old['window'], old['value'], old['tokens'], old['acts']), keys_LxM, (ids, value, tokens, acts), n
    )
    out[name] = {'key': best, 'window': window_ids, 'value': values, 'tokens': toks, 'acts': per_token}
  out['fired_windows'] = state['fired_windows'] + jnp.sum(active_LxN, axis=1)
  return out


def _empty_state(num_latents: int, window: int, settings: ContextSettings):
  state = {}
  for name, n in (('top', settings.top_k), ('act', settings.num_random), ('non', settings.num_random)):
    state[name] = {
      'key': jnp.full((num_latents, n), -jnp.inf, jnp.float32),
      'window': jnp.full((num_latents, n), -1, jnp.int32),
      'value': jnp.zeros((num_latents, n), jnp.float32),
      'tokens': jnp.zeros((num_latents, n, window), jnp.int32),
      'acts': jnp.zeros((num_latents, n, window), jnp.float32),
    }
  state['fired_windows'] = jnp.zeros((num_latents,), jnp.int32)
  return state


def collect_contexts(
  params: dict[str, np.ndarray],
  spec: sae_lib.SaeSpec,
  source,
  latents: Sequence[int],
  settings: ContextSettings,
  start_position: int,
  hookpoint_index: int = 0,
  progress: bool = True,
) -> Contexts:
  """Streams `settings.num_tokens` tokens of `source` from `start_position` and selects windows per latent.

  `source` needs `token_batch(position) -> [rows, T]` and `batches_at(position)` (activations of the same
  tokens, [rows * T, d] per hookpoint). The data running out ends the stream early (logged).
  """
  latents_L = jnp.asarray(np.asarray(latents, np.int32))
  params = {name: jnp.asarray(value) for name, value in params.items()}
  state, meta = None, None
  num_batches = max(1, -(-settings.num_tokens // source.batch_size))
  base_key = jax.random.PRNGKey(settings.seed)
  tokens_seen = 0
  for offset in tqdm(range(num_batches), desc='contexts', disable=None if progress else True):
    position = start_position + offset
    try:
      tokens_RxT = np.asarray(source.token_batch(position), np.int32)
      x_BxD = source.batches_at(position)[hookpoint_index]
    except IndexError:  # StreamExhaustedError: the data ran out
      logging.warning('contexts: data ran out after %d of %d batches', offset, num_batches)
      break
    rows, T = tokens_RxT.shape
    window = min(settings.window, T)
    if state is None:
      state = _empty_state(len(latents), window, settings)
      meta = {
        'rows': rows,
        'context_length': T,
        'window': window,
        'blocks': T // window,
        'start_position': int(start_position),
      }
    chunk_rows = max(1, min(rows, MAX_CHUNK_ELEMENTS // max(1, T * spec.num_latents)))
    for r0 in range(0, rows, chunk_rows):
      r1 = min(rows, r0 + chunk_rows)
      first_id = (offset * rows + r0) * meta['blocks']
      key = jax.random.fold_in(jax.random.fold_in(base_key, position), r0)
      state = _update(
        state,
        params,
        x_BxD[r0 * T : r1 * T],
        jnp.asarray(tokens_RxT[r0:r1]),
        latents_L,
        jnp.int32(first_id),
        key,
        arch=spec.arch,
        spec=spec,
        window=window,
        top_k=settings.top_k,
        num_random=settings.num_random,
      )
    tokens_seen += rows * T
  if state is None:
    raise ValueError(f'no tokens left after position {start_position} to collect contexts from; pass more data')
  arrays = {}
  for name in SETS:
    host = {key: np.asarray(value) for key, value in state[name].items()}
    arrays[f'{name}_window'] = host['window'].astype(np.int64)
    arrays[f'{name}_value'] = host['value']
    arrays[f'{name}_tokens'] = host['tokens']
    arrays[f'{name}_acts'] = host['acts']
  arrays['fired_windows'] = np.asarray(state['fired_windows']).astype(np.int64)
  meta.update(tokens=tokens_seen, settings=dataclasses.asdict(settings))
  return Contexts(np.asarray(latents, np.int64), arrays, meta)


def save_contexts(path: str, contexts: Contexts) -> str:
  """Writes an `.npz` atomically (through saejax.storage, so the run may be on gs://)."""
  return storage.write_npz(
    path, {'latents': contexts.latents, 'meta': np.asarray(json.dumps(contexts.meta)), **contexts.arrays}
  )


def load_contexts(path: str) -> Contexts:
  arrays = storage.read_npz(path)
  return Contexts(arrays.pop('latents'), arrays, json.loads(str(arrays.pop('meta'))))


def matches(contexts: Contexts, latents: Sequence[int], settings: ContextSettings, hookpoint: str) -> bool:
  """Whether a stored file was collected for exactly these latents, settings and hookpoint."""
  return (
    contexts.meta.get('settings') == dataclasses.asdict(settings)
    and contexts.meta.get('hookpoint') == hookpoint
    and np.array_equal(contexts.latents, np.asarray(latents, np.int64))
  )


def contexts_path(run: str, seed: str) -> str:
  return storage.join(run, 'interpret', f'contexts_{seed}.npz')


class TokenText:
  """Decodes token ids one at a time (cached), so a window can be shown token by token."""

  def __init__(self, tokenizer_file: str):
    from tokenizers import Tokenizer

    self._tokenizer = Tokenizer.from_file(tokenizer_file)
    self._cache: dict[int, str] = {}

  def __call__(self, token_id: int) -> str:
    token_id = int(token_id)
    if token_id not in self._cache:
      self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
    return self._cache[token_id]

  def pieces(self, tokens: Sequence[int]) -> list[str]:
    return [self(t) for t in tokens]
