"""Match the latents of every pair of SAEs and write the paper's seed analyses.

  python -m experiments.align --workdir=RUN                      # all seeds under RUN/saes/<hookpoint>/
  python -m experiments.align --workdir=RUN --variant=k=16       # one variant's: RUN/saes/<hookpoint>/k=16/
  python -m experiments.align --saes DIR_A DIR_B [DIR ...] --out=OUT   # any folders (EleutherAI or SAELens)

Flags: --out (default RUN/alignment), --threshold 0.7, --method auto|dense|sparse, --hookpoint (when a run
has several), --firing_tokens N (firing frequencies for Fig. 3, from the run's own activation source),
--nofigures (summary, report and CSV without the PNGs: about 2 s less per alignment on a CPU).
A run with variants aligns each variant's seeds into RUN/alignment/<variant>/ (all of them, unless --variant names
one).
A synthetic run's ground truth (RUN/ground_truth.npz) adds each seed's recovery of the true features, split into
shared and orphan latents.
Exit codes: 0 done, 2 bad input (one line on stderr; nothing is left half-written).
"""

from __future__ import annotations

import zipfile

import numpy as np
from absl import app, flags, logging

from experiments.cli import fail, parse_flags
from saejax import console, storage
from saejax.train import run_folder

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training run folder; aligns all seeds of one hookpoint.')
_SAES = flags.DEFINE_multi_string('saes', None, 'SAE folders to align (recipe.md section 4 or SAELens layout).')
_OUT = flags.DEFINE_string('out', None, 'Output folder (default RUN/alignment).')
_THRESHOLD = flags.DEFINE_float('threshold', 0.7, 'Cosine a shared latent must reach in both matchings.')
_METHOD = flags.DEFINE_enum('method', 'auto', ['auto', 'dense', 'sparse'], 'Assignment solver.')
_HOOKPOINT = flags.DEFINE_string('hookpoint', None, 'Which hookpoint of the run (default: the only one).')
_VARIANT = flags.DEFINE_string('variant', None, 'A run with variants: align only this one (e.g. k=16).')
_WORKERS = flags.DEFINE_integer('workers', None, 'Pairs matched in parallel (default: CPU count).')
_FIRING_TOKENS = flags.DEFINE_integer('firing_tokens', 1_000_000, 'Tokens for firing frequencies (0: skip).')
_FIGURES = flags.DEFINE_bool(
  'figures', True, "Draw the paper's figures as PNG (--nofigures: the numbers only, faster)."
)


def read_true_features(workdir: str) -> np.ndarray | None:
  """The true dictionary of a synthetic run, or None for a run without one (a language model's)."""
  from saejax.data.synthetic import GROUND_TRUTH_FILE

  path = storage.join(workdir, GROUND_TRUTH_FILE)
  if not storage.exists(path):
    return None
  try:
    return storage.read_npz(path)['features']
  except (KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
    raise ValueError(f'{path} is unreadable ({error}); delete it to align without ground-truth recovery') from None


def main(argv: list[str]) -> None:
  # `--saes A B C`: absl takes A as the flag value and leaves B, C as positional arguments.
  extra = argv[1:]
  if extra and not _SAES.value:
    fail(f'unexpected arguments {extra}; pass SAE folders after --saes')
  if bool(_WORKDIR.value) == bool(_SAES.value):
    fail('give exactly one of --workdir=RUN or --saes DIR [DIR ...]')
  if _VARIANT.value and not _WORKDIR.value:
    fail('--variant picks a variant of a --workdir run; with --saes, name the folders themselves')
  try:
    if _WORKDIR.value:
      outs = [_align_run_variant(variant) for variant in _run_variants()]
    else:
      folders = list(_SAES.value) + extra
      if not _OUT.value:
        fail('--out is required with --saes')
      names = [storage.basename(path) for path in folders]
      if len(set(names)) != len(names):
        fail(f'SAE folder names must differ (they name the pairs): {names}')
      _align(dict(zip(names, folders)), _OUT.value)
      outs = [_OUT.value]
  except (ValueError, OSError) as error:
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
  written = 'report.md, summary.json, universality.csv' + (', figures' if _FIGURES.value else '')
  for out in outs:
    console.say(f'alignment: {out}/ ({written})')


def _run_variants() -> list[str | None]:
  """The variants to align: the one named, each of the run's, or [None] for a run without variants."""
  if _VARIANT.value:
    return [_VARIANT.value]
  hookpoint = run_folder.exported_hookpoint(_WORKDIR.value, _HOOKPOINT.value)
  return run_folder.exported_variants(_WORKDIR.value, hookpoint) or [None]


def _align_run_variant(variant: str | None) -> str:
  """Aligns one variant (or the run's only setting) of the --workdir run; returns its output folder."""
  from saejax.analysis import firing
  from saejax.train import tracking

  workdir = _WORKDIR.value
  hookpoint, sae_dirs = run_folder.exported_sae_dirs(workdir, _HOOKPOINT.value, variant)
  out = _OUT.value or storage.join(workdir, 'alignment')
  if variant and not (_VARIANT.value and _OUT.value):
    out = storage.join(out, variant)
  firing_counts = None
  if _FIRING_TOKENS.value > 0:
    try:
      firing_counts = firing.counts_for_run(workdir, hookpoint, sae_dirs, _FIRING_TOKENS.value, variant=variant)
    except RuntimeError as error:  # e.g. the run's activation source is unavailable here
      logging.warning('skipping firing frequencies (Fig. 3): %s', error)
  summary = _align(
    sae_dirs,
    out,
    firing=firing_counts,
    true_features=read_true_features(workdir),
    seed_stats=run_folder.read_seed_stats(workdir, hookpoint, variant),
  )
  tracking.log_alignment(workdir, out, summary, f'alignment/{variant}' if variant else 'alignment')
  return out


def _align(sae_dirs: dict[str, str], out: str, **inputs) -> dict:
  from saejax.analysis import alignment_run

  return alignment_run.run_alignment(
    sae_dirs,
    out,
    threshold=_THRESHOLD.value,
    method=_METHOD.value,
    workers=_WORKERS.value,
    figures=_FIGURES.value,
    **inputs,
  )


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
