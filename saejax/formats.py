"""On-disk SAE formats: saejax's parameter dict to and from the EleutherAI (sparsify) and SAELens 6.x layouts.

This module owns the file names, tensor names, weight orientation and cfg.json fields of both layouts, the
validation of everything read or written, and atomic folder writes (local or object storage). One folder holds one SAE.

EleutherAI: `sae.safetensors` (`encoder.weight [F, D]`, `encoder.bias [F]`, `W_dec [F, D]`, `b_dec [D]`, plus
saejax extras under their own names) and a sparsify `SparseCoderConfig` cfg.json with `d_in`, `arch`.
SAELens: `sae_weights.safetensors` (`W_enc [D, F]`, `b_enc [F]` or gated `b_gate [F]`, `W_dec [F, D]`,
`b_dec [D]`, `r_mag`/`b_mag`/`threshold`) and a cfg.json with `architecture`, `d_in`, `d_sae`, `metadata`.
SAELens has no inference BatchTopK class (its own trainer saves BatchTopK as JumpReLU), so BatchTopK is
written as JumpReLU with the scalar threshold broadcast to every latent, which computes identical codes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so bf16 sparsify checkpoints can be read)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save_file

from saejax import storage

ARCHS = ('topk', 'batchtopk', 'matryoshka', 'relu', 'gated', 'jumprelu')
# One scalar inference threshold (a JumpReLU SAE with the same threshold for every latent, to SAELens).
_BATCH_THRESHOLD = ('batchtopk', 'matryoshka')
ELEUTHER_WEIGHTS = 'sae.safetensors'
SAELENS_WEIGHTS = 'sae_weights.safetensors'
CFG = 'cfg.json'

_FROM_SAELENS_ARCH = {'topk': 'topk', 'standard': 'relu', 'gated': 'gated', 'jumprelu': 'jumprelu'}
_TO_SAELENS_ARCH = {
  **{ours: theirs for theirs, ours in _FROM_SAELENS_ARCH.items()},
  **dict.fromkeys(_BATCH_THRESHOLD, 'jumprelu'),
}
# SAELens rewrites any cfg without a version >= 6.0.0 as a pre-6 config, so the file must claim the 6.x schema.
_SAELENS_SCHEMA_VERSION = '6.0.0'


def _param_shapes(arch: str, d_in: int, num_latents: int) -> dict[str, tuple[int, ...]]:
  """saejax parameter names and shapes (saejax orientation) for one SAE of `arch`."""
  F, D = num_latents, d_in
  shapes = {'W_enc': (F, D), 'b_enc': (F,), 'W_dec': (F, D), 'b_dec': (D,)}
  if arch == 'gated':
    shapes.update(r_mag=(F,), b_mag=(F,))
  elif arch == 'jumprelu':
    shapes['threshold'] = (F,)
  elif arch in _BATCH_THRESHOLD:
    shapes['threshold'] = ()
  return shapes


def _file_layout(fmt: str, arch: str, d_in: int, num_latents: int) -> dict[str, tuple[str, tuple[int, ...]]]:
  """saejax name -> (tensor name in the file, shape in the file)."""
  layout = {name: (name, shape) for name, shape in _param_shapes(arch, d_in, num_latents).items()}
  if fmt == 'eleuther':
    layout['W_enc'] = ('encoder.weight', (num_latents, d_in))
    layout['b_enc'] = ('encoder.bias', (num_latents,))
  else:
    layout['W_enc'] = ('W_enc', (d_in, num_latents))
    if arch == 'gated':
      layout['b_enc'] = ('b_gate', (num_latents,))
    if arch in _BATCH_THRESHOLD:
      layout['threshold'] = ('threshold', (num_latents,))
  return layout


def _validate(arrays: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], source: str) -> dict[str, np.ndarray]:
  """Checks names, shapes and finiteness; returns contiguous float32 copies. Every error names `source`."""
  missing = sorted(set(shapes) - set(arrays))
  if missing:
    raise ValueError(f'{source}: missing tensors {missing} (has {sorted(arrays)}); check arch or re-export the SAE')
  unexpected = sorted(set(arrays) - set(shapes))
  if unexpected:
    raise ValueError(f'{source}: unexpected tensors {unexpected}; saejax cannot represent this SAE as given')
  out = {}
  for name, shape in shapes.items():
    value = np.array(arrays[name], dtype=np.float32, order='C')  # ascontiguousarray would make 0-d arrays 1-d
    if value.shape != shape:
      raise ValueError(f'{source}: tensor {name!r} has shape {list(value.shape)}, expected {list(shape)}')
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
    if bad:
      raise ValueError(f'{source}: tensor {name!r} has {bad} non-finite values (NaN/inf); the SAE diverged')
    out[name] = value
  return out


def _check_dims(arch: str, k: int, d_in: int, num_latents: int) -> None:
  if arch not in ARCHS:
    raise ValueError(f'unknown SAE architecture {arch!r}; use one of {", ".join(ARCHS)}')
  if d_in < 1 or num_latents < 1:
    raise ValueError(f'd_in={d_in} and num_latents={num_latents} must both be positive')
  if arch in ('topk', *_BATCH_THRESHOLD) and not 1 <= k <= num_latents:
    raise ValueError(f'{arch} needs 1 <= k <= num_latents, got k={k} with num_latents={num_latents}')


def save_eleuther(folder, params, *, arch: str, k: int, d_in: int, num_latents: int, extra_cfg=None) -> str:
  """Writes `folder` in the EleutherAI sparsify layout, replacing any previous export there.

  sparsify's loader drops unknown cfg keys, so `arch` rides along. It loads only TopK: for other archs
  `activation` is the arch name, which sparsify's config rejects instead of misreading the SAE as TopK.
  """
  _check_dims(arch, k, d_in, num_latents)
  arrays = _validate(params, _param_shapes(arch, d_in, num_latents), 'params')
  layout = _file_layout('eleuther', arch, d_in, num_latents)
  tensors = {layout[name][0]: value for name, value in arrays.items()}
  cfg = {
    'activation': arch,
    'expansion_factor': num_latents // d_in,
    'normalize_decoder': True,
    'num_latents': num_latents,
    'k': k,
    'multi_topk': False,
    'skip_connection': False,
    'transcode': False,
    'd_in': d_in,
    'arch': arch,
  }
  return _write_atomic(os.fspath(folder), ELEUTHER_WEIGHTS, tensors, _merge_extra(cfg, extra_cfg))


def save_saelens(
  folder, params, *, arch: str, k: int, d_in: int, num_latents: int, hook_name: str = 'synthetic', extra_cfg=None
) -> str:
  """Writes `folder` in the SAELens 6.x layout (`SAE.load_from_disk`), replacing any previous export there.

  `extra_cfg` goes into `metadata`, which SAELens keeps across its own load/save; `saejax_arch` and `saejax_k`
  there let `load_sae` recover BatchTopK and k, which the SAELens JumpReLU layout has no field for.
  """
  _check_dims(arch, k, d_in, num_latents)
  arrays = _validate(params, _param_shapes(arch, d_in, num_latents), 'params')
  layout = _file_layout('saelens', arch, d_in, num_latents)
  tensors = {layout[name][0]: value for name, value in arrays.items()}
  tensors['W_enc'] = np.ascontiguousarray(arrays['W_enc'].T)
  if arch in _BATCH_THRESHOLD:
    tensors['threshold'] = np.full((num_latents,), arrays['threshold'], np.float32)
  metadata = {'sae_lens_version': _SAELENS_SCHEMA_VERSION, 'hook_name': hook_name, 'saejax_arch': arch, 'saejax_k': k}
  cfg = {
    'architecture': _TO_SAELENS_ARCH[arch],
    'd_in': d_in,
    'd_sae': num_latents,
    'dtype': 'float32',
    'device': 'cpu',
    'apply_b_dec_to_input': True,
    'normalize_activations': 'none',
    'reshape_activations': 'none',
    'metadata': _merge_extra(metadata, extra_cfg),
  }
  if arch == 'topk':
    cfg.update(k=k, rescale_acts_by_decoder_norm=False)
  return _write_atomic(os.fspath(folder), SAELENS_WEIGHTS, tensors, cfg)


def _merge_extra(cfg: dict, extra_cfg: Mapping | None) -> dict:
  clash = sorted(set(extra_cfg or {}) & set(cfg))
  if clash:
    raise ValueError(f'extra_cfg keys {clash} would overwrite fields the exporter sets; rename them')
  return {**cfg, **(extra_cfg or {})}


def _write_atomic(folder: str, weights_name: str, tensors: dict[str, np.ndarray], cfg: dict) -> str:
  """Builds the export in a staging folder and publishes it whole (storage.staged_dir), cfg.json last."""
  if storage.isfile(folder):
    raise ValueError(f'{folder} is a file; pass a folder path to export the SAE into')
  with storage.staged_dir(folder, complete_marker=CFG) as staging:
    save_file(tensors, os.path.join(staging, weights_name))
    with open(os.path.join(staging, CFG), 'w') as f:
      f.write(json.dumps(cfg, indent=2) + '\n')
  return storage.absolute(folder)


def _read_cfg(path: str) -> dict:
  if not storage.isfile(path):
    raise FileNotFoundError(f'{path} is missing; an SAE folder needs cfg.json next to its weights')
  try:
    cfg = storage.read_json(path)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'cannot parse {path}: {e}; re-export the SAE') from e
  if not isinstance(cfg, dict):  # a bad file, not a caller's type error, hence ValueError
    raise ValueError(f'{path} holds a JSON {type(cfg).__name__}, expected an object; re-export the SAE')  # noqa: TRY004
  return cfg


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  try:
    if storage.is_remote(path):
      return safetensors_load(storage.read_bytes(path))
    with safe_open(path, framework='np') as f:
      return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
  except Exception as e:  # safetensors raises its own error types, or TypeError for dtypes numpy lacks
    raise ValueError(f'cannot read {path} ({type(e).__name__}: {e}); the file is corrupt, re-export the SAE') from e


def _int_field(cfg: dict, key: str, path: str) -> int:
  if key not in cfg:
    raise ValueError(f'{path} has no {key!r} field; add it or re-export the SAE')
  return int(cfg[key])


def load_sae(folder) -> tuple[dict[str, np.ndarray], dict]:
  """Reads an EleutherAI or SAELens export; returns saejax-layout float32 params and a cfg dict.

  The cfg has `arch`, `k`, `d_in`, `num_latents`, `format` ('eleuther' or 'saelens') and `file_cfg`, the
  parsed cfg.json; cfg keys this reader does not need are ignored.
  """
  folder = os.fspath(folder)
  if not storage.isdir(folder):
    raise FileNotFoundError(f'no SAE folder at {folder}; pass the folder written by save_eleuther or save_saelens')
  found = [name for name in (ELEUTHER_WEIGHTS, SAELENS_WEIGHTS) if storage.isfile(storage.join(folder, name))]
  if not found:
    raise FileNotFoundError(f'{folder} holds neither {ELEUTHER_WEIGHTS} (EleutherAI) nor {SAELENS_WEIGHTS} (SAELens)')
  if len(found) == 2:
    raise ValueError(f'{folder} holds both {ELEUTHER_WEIGHTS} and {SAELENS_WEIGHTS}; keep one SAE per folder')
  fmt = 'eleuther' if found[0] == ELEUTHER_WEIGHTS else 'saelens'
  cfg_path, weights_path = storage.join(folder, CFG), storage.join(folder, found[0])
  file_cfg = _read_cfg(cfg_path)
  d_in = _int_field(file_cfg, 'd_in', cfg_path)
  if fmt == 'eleuther':
    arch = file_cfg.get('arch', file_cfg.get('activation', 'topk'))
    if file_cfg.get('skip_connection') or file_cfg.get('transcode'):
      raise ValueError(f'{cfg_path}: skip connections and transcoders have no saejax equivalent')
    # sparsify: num_latents 0 means d_in * expansion_factor (default 32).
    num_latents = int(file_cfg.get('num_latents') or d_in * int(file_cfg.get('expansion_factor', 32)))
    k = int(file_cfg.get('k', 0))
  else:
    metadata = file_cfg.get('metadata') or {}
    # Pre-6 SAELens files have no `architecture`; TopK ones say so through activation_fn.
    sl_arch = file_cfg.get('architecture') or ('topk' if file_cfg.get('activation_fn') == 'topk' else 'standard')
    arch = _FROM_SAELENS_ARCH.get(sl_arch, sl_arch)
    if arch == 'jumprelu' and metadata.get('saejax_arch') in _BATCH_THRESHOLD:
      arch = metadata['saejax_arch']
    num_latents = _int_field(file_cfg, 'd_sae', cfg_path)
    k = int(file_cfg.get('k') or (file_cfg.get('activation_fn_kwargs') or {}).get('k') or metadata.get('saejax_k') or 0)
    normalize = file_cfg.get('normalize_activations')
    if not file_cfg.get('apply_b_dec_to_input', True) or normalize not in (None, 'none', False):
      raise ValueError(f'{cfg_path}: saejax needs apply_b_dec_to_input=true and normalize_activations="none"')
    if file_cfg.get('rescale_acts_by_decoder_norm') or file_cfg.get('activation_fn', 'relu') not in ('relu', 'topk'):
      raise ValueError(f'{cfg_path}: rescale_acts_by_decoder_norm / non-ReLU activation_fn have no saejax equivalent')
  if arch not in ARCHS:
    raise ValueError(f'{cfg_path}: architecture {arch!r} is not one saejax supports ({", ".join(ARCHS)})')
  _check_dims(arch, k, d_in, num_latents)
  layout = _file_layout(fmt, arch, d_in, num_latents)
  file_arrays = _validate(_read_tensors(weights_path), dict(layout.values()), str(weights_path))
  params = {name: file_arrays[file_name] for name, (file_name, _) in layout.items()}
  if fmt == 'saelens':
    params['W_enc'] = np.ascontiguousarray(params['W_enc'].T)
    if arch in _BATCH_THRESHOLD:
      threshold_F = params['threshold']
      if np.all(threshold_F == threshold_F[0]):
        params['threshold'] = np.asarray(threshold_F[0], np.float32)
      else:
        # Per-latent thresholds (e.g. after SAELens's fold_W_dec_norm) are still exactly a JumpReLU SAE.
        arch = 'jumprelu'
  cfg = {'arch': arch, 'k': k, 'd_in': d_in, 'num_latents': num_latents, 'format': fmt, 'file_cfg': file_cfg}
  return params, cfg
