"""The language-model activation source: token batches -> one LM forward -> hookpoint activations on the mesh.

One forward per batch feeds every seed (the trainer's step consumes the whole batch for all S SAEs), and the
model only runs up to the hookpoint's layer. Activations leave the model in its dtype (bf16 in the paper) and
reach the SAEs as float32 `[rows * context_length, d]`.

BOS/EOS exclusion keeps the batch shape fixed, as the jitted step needs: each excluded position takes the
activation of the nearest earlier kept position of the same sequence (or the first kept one), so the SAEs
never see special-token activations and every step still has `batch_size` rows.

With several processes each reads only its own rows of every global batch (the token stream's host slice) and
`LanguageModel.place_tokens` assembles the global batch on the mesh; the forward and the flattening keep it
split over `data`, so no host ever holds another host's activations.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from saejax import tuning
from saejax.data.base import ActivationSource

_OFFLINE_HINT = 'pass --config.dataset=/path/to/document.bin (Pythia token rows) or local json/jsonl/text/parquet files'


def _fill_excluded(acts_BxTxD: jax.Array, keep_BxT: jax.Array) -> jax.Array:
  """Replaces excluded positions by the nearest earlier kept position (the first kept one at the start)."""
  positions_BxT = jnp.arange(keep_BxT.shape[1])[None, :]
  last_kept_BxT = jax.lax.cummax(jnp.where(keep_BxT, positions_BxT, -1), axis=1)
  first_kept_B1 = jnp.argmax(keep_BxT, axis=1)[:, None]
  source_BxT = jnp.where(last_kept_BxT >= 0, last_kept_BxT, first_kept_B1)
  return jnp.take_along_axis(acts_BxTxD, source_BxT[..., None], axis=1)


@functools.partial(jax.jit, static_argnums=2)
def _without_special(acts_BxTxD: jax.Array, tokens_BxT: jax.Array, exclude_ids: tuple[int, ...]) -> jax.Array:
  """`_fill_excluded` at the positions holding `exclude_ids`, on the mesh (jitted: the batch may span hosts)."""
  keep_BxT = ~jnp.isin(tokens_BxT, jnp.asarray(exclude_ids, tokens_BxT.dtype))
  return _fill_excluded(acts_BxTxD, keep_BxT)


class LMActivationSource(ActivationSource):
  """Activations of `config.hookpoint` of `config.model` over `config.dataset`, `batch_size` tokens a batch."""

  def __init__(self, config, sharding: NamedSharding, model=None, token_stream=None):
    super().__init__(sharding)
    from saejax import models

    dtype = jnp.dtype(config.resolved_lm_dtype(tuning.platform_of(sharding.mesh)))
    self.model = model if model is not None else models.load_pretrained(config.model, dtype=dtype, mesh=sharding.mesh)
    for name in config.hookpoints:
      self.model.parse_hookpoint(name)
    if config.d_in != self.model.d_model:
      raise ValueError(
        f'd_in={config.d_in} but {config.model} has d_model={self.model.d_model}; '
        f'set --config.d_in={self.model.d_model}'
      )
    self._hookpoints = config.hookpoints
    self.hookpoint = self._hookpoints[0]
    self.d_in = self.model.d_model
    self.batch_size = config.batch_size
    rows = config.batch_size // config.context_length
    if token_stream is None:
      token_stream = _open_tokens(config, rows, self.model.path)
    self.tokens = token_stream
    special = {self.model.config.bos_token_id, *np.atleast_1d(self.model.config.eos_token_id or [])} - {None}
    self.exclude_ids = sorted(int(i) for i in special) if config.exclude_special_tokens else []
    self.eval_tokens = config.eval_tokens
    self.eval_dataset = config.eval_dataset
    self.config = config
    self._eval_tokens = None  # the eval_dataset stream, opened at the end

  def token_batch(self, position: int) -> np.ndarray:
    return self.tokens.batch_at(position)

  @property
  def hookpoints(self) -> list[str]:
    return list(self._hookpoints)

  def batches_at(self, position: int) -> tuple[jax.Array, ...]:
    """All hookpoints from one forward (up to the deepest one's layer)."""
    return self.activations_for(self.token_batch(position))

  def activations_for(self, tokens_RxT: np.ndarray, dtype=jnp.float32) -> tuple[jax.Array, ...]:
    """`[rows * T, d]` per hookpoint in `dtype`, on the mesh, for this host's token rows (one forward)."""
    # This host's rows -> the global batch on the mesh (every process's rows when there are several).
    tokens_BxT = self.model.place_tokens(tokens_RxT)
    acts = self.model.activations(tokens_BxT, self._hookpoints)
    if self.exclude_ids:
      acts = {name: _without_special(acts[name], tokens_BxT, tuple(self.exclude_ids)) for name in self._hookpoints}
    return tuple(self._flatten(acts[name], jnp.dtype(dtype)) for name in self._hookpoints)

  def batch_at(self, position: int) -> jax.Array:
    return self.batches_at(position)[0]

  @functools.cached_property
  def _flatten(self):
    return jax.jit(
      lambda a, dtype: a.reshape(-1, a.shape[-1]).astype(dtype), static_argnums=1, out_shardings=self.sharding
    )

  def state_dict(self) -> dict[str, Any]:
    """The batch position plus the token stream's own state, so a text stream resumes without re-reading."""
    self.tokens.seek(self.position)
    return {'position': self.position, 'tokens': self.tokens.state_dict()}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    super().load_state_dict(state)
    if 'tokens' in state:
      self.tokens.load_state_dict(state['tokens'])

  def final_report(self, params_S, spec, held_out_position: int, hookpoint: str | None = None) -> dict[str, Any]:
    """CE-loss increase, KL, FVU, L0 and dead fraction per seed on `eval_tokens` held-out tokens: the batches from
    `held_out_position` on, or the first ones of `eval_dataset` when it is set."""
    if self.eval_dataset:
      if self._eval_tokens is None:
        self._eval_tokens = open_tokens(self.eval_dataset, self.config, self.tokens.global_rows, self.model.path)
      batch_at, held_out_position = self._eval_tokens.batch_at, 0
    else:
      batch_at = self.token_batch
    return held_out_report(
      self.model,
      hookpoint or self.hookpoint,
      params_S,
      spec,
      batch_at,
      held_out_position,
      self.eval_tokens,
      self.batch_size,
    )


def held_out_report(
  model, hookpoint: str, params_S, spec, token_batch_at, start: int, eval_tokens: int, batch_size: int
) -> dict[str, Any]:
  """`{'lm_eval': ...}` of `lm_eval.evaluate_on_lm` over the token batches `token_batch_at(start), ...` that hold
  `eval_tokens` tokens (whole batches of `batch_size`, at least one); empty when `eval_tokens` is 0."""
  from saejax.analysis import lm_eval

  if eval_tokens <= 0:
    return {}
  num_batches = max(1, -(-eval_tokens // batch_size))
  batches = (token_batch_at(p) for p in range(start, start + num_batches))
  return {'lm_eval': lm_eval.evaluate_on_lm(model, hookpoint, params_S, spec, batches)}


def _open_tokens(config, rows: int, model_folder: str | None):
  return open_tokens(config.dataset, config, rows, model_folder)


def open_tokens(dataset: str, config, rows: int, model_folder: str | None, **kwargs):
  """Pythia token rows (.bin/.npy) read in file order, or text tokenized with the model's tokenizer; `config`
  gives the context length, text column and split, `kwargs` (process_index/process_count) go to the stream."""
  from saejax.data import memmap, text, tokens

  if dataset.endswith(tokens.MEMMAP_SUFFIXES):
    return memmap.MemmapTokenStream(dataset, rows, config.context_length, **kwargs)
  offline = os.environ.get('HF_HUB_OFFLINE') == '1' or os.environ.get('HF_DATASETS_OFFLINE') == '1'
  if offline and text.resolve_data_files(dataset) is None:
    raise FileNotFoundError(f'dataset {dataset!r} is not a local path and the Hub is offline; {_OFFLINE_HINT}')
  return text.TextTokenStream(
    dataset,
    model_folder,
    rows,
    config.context_length,
    text_column=config.text_column,
    split=config.dataset_split,
    **kwargs,
  )
