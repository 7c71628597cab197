"""Match the latents of every pair of SAEs and write the paper's seed analyses.

  python -m experiments.align --workdir=RUN                      # all seeds under RUN/saes/<hookpoint>/
  python -m experiments.align --saes DIR_A DIR_B [DIR ...] --out=OUT   # any folders (EleutherAI or SAELens)

Flags: --out (default RUN/alignment), --threshold 0.7, --method auto|dense|sparse, --hookpoint (when a run
has several), --firing_tokens N (firing frequencies for Fig. 3, from the run's own activation source).
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
_WORKERS = flags.DEFINE_integer('workers', None, 'Pairs matched in parallel (default: CPU count).')
_FIRING_TOKENS = flags.DEFINE_integer('firing_tokens', 1_000_000, 'Tokens for firing frequencies (0: skip).')


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
  from saejax.analysis import alignment_run, firing

  try:
    firing_counts = true_features = seed_stats = None
    if _WORKDIR.value:
      hookpoint, sae_dirs = run_folder.exported_sae_dirs(_WORKDIR.value, _HOOKPOINT.value)
      out = _OUT.value or storage.join(_WORKDIR.value, 'alignment')
      true_features = read_true_features(_WORKDIR.value)
      seed_stats = run_folder.read_seed_stats(_WORKDIR.value, hookpoint)
      if _FIRING_TOKENS.value > 0:
        try:
          firing_counts = firing.counts_for_run(_WORKDIR.value, hookpoint, sae_dirs, _FIRING_TOKENS.value)
        except RuntimeError as error:  # e.g. the run's activation source is unavailable here
          logging.warning('skipping firing frequencies (Fig. 3): %s', error)
    else:
      folders = list(_SAES.value) + extra
      if not _OUT.value:
        fail('--out is required with --saes')
      names = [storage.basename(path) for path in folders]
      if len(set(names)) != len(names):
        fail(f'SAE folder names must differ (they name the pairs): {names}')
      sae_dirs, out = dict(zip(names, folders)), _OUT.value
    summary = alignment_run.run_alignment(
      sae_dirs,
      out,
      threshold=_THRESHOLD.value,
      method=_METHOD.value,
      workers=_WORKERS.value,
      firing=firing_counts,
      true_features=true_features,
      seed_stats=seed_stats,
    )
    if _WORKDIR.value:
      from saejax.train import tracking

      tracking.log_alignment(_WORKDIR.value, out, summary)
  except (ValueError, OSError) as error:
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
  console.say(f'alignment: {out}/ (report.md, summary.json, universality.csv, figures)')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
