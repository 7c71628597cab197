"""The paper's ablations as run matrices: each run is a preset plus config overrides.

`experiments.sweep` prints or runs them; `experiments.figures` reads their alignments back. A sweep whose runs
differ only in settings that may vary within one run (saejax.variants: k, lr, L1, width, architecture) also runs
as one run, `ROOT/<sweep>/one_step`, with each of its runs a variant (`one_step_run`); the figures read either.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from saejax.variants import VARIANT_FIELDS

ONE_STEP = 'one_step'


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  preset: str
  overrides: tuple[tuple[str, str], ...]
  varied: str  # the config field this sweep varies, read back by experiments.figures
  variants: tuple[str, ...] = ()  # a one-step run: the variants it trains (each one of the sweep's runs)

  def workdir(self, root: str, sweep: str) -> str:
    return f'{root.rstrip("/")}/{sweep}/{self.name}'

  def train_command(self, root: str, sweep: str, extra: list[str]) -> list[str]:
    fields = [f'--config.{name}={value}' for name, value in self.overrides]
    fields += [f'--config.{item}' for item in extra]
    return [
      sys.executable,
      '-m',
      'experiments.train',
      f'--config={self.preset}',
      f'--workdir={self.workdir(root, sweep)}',
      *fields,
    ]

  def align_command(self, root: str, sweep: str, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, '-m', 'experiments.align', f'--workdir={self.workdir(root, sweep)}', *extra]

  def alignment_summaries(self, root: str, sweep: str) -> list[str]:
    """The alignment summary.json files this run writes: one, or one per variant of a one-step run."""
    alignment = f'{self.workdir(root, sweep)}/alignment'
    return [f'{alignment}/{v}/summary.json' for v in self.variants] or [f'{alignment}/summary.json']


def variant_names(runs: Sequence[Run]) -> list[str]:
  """Each run as a variant name: its overrides that are not common to every run, `field=value` joined by ','."""
  common = set.intersection(*(set(run.overrides) for run in runs))
  return [','.join(f'{f}={v}' for f, v in run.overrides if (f, v) not in common) for run in runs]


def one_step_run(sweep: str) -> Run:
  """The sweep as one run that trains each of its runs as a variant in the same step (ValueError if it cannot)."""
  runs = sweep_runs(sweep)
  if len(runs) < 2:
    raise ValueError(f'sweep {sweep!r} has one run; there is nothing to train beside it')
  presets = sorted({run.preset for run in runs})
  if len(presets) > 1:
    raise ValueError(f'sweep {sweep!r} mixes presets ({", ".join(presets)}); only runs of one preset share a step')
  common = set.intersection(*(set(run.overrides) for run in runs))
  fixed = sorted({f for run in runs for f, v in run.overrides if (f, v) not in common and f not in VARIANT_FIELDS})
  if fixed:
    raise ValueError(
      f'sweep {sweep!r} varies {", ".join(fixed)}, which changes the data stream; it runs only as separate runs '
      f'(drop --one-step). One step can vary {", ".join(VARIANT_FIELDS)}'
    )
  names = variant_names(runs)
  overrides = tuple(o for o in runs[0].overrides if o in common) + (('variants', '|'.join(names)),)
  return Run(ONE_STEP, presets[0], overrides, runs[0].varied, tuple(names))


def _runs(preset: str, field: str, values, name: str = '{}', **fixed) -> list[Run]:
  return [
    Run(name.format(v), preset, ((field, str(v)), *((k, str(x)) for k, x in fixed.items())), field) for v in values
  ]


SWEEPS: dict[str, list[Run]] = {
  # Fig. 4 (Pythia-160M layers.6.mlp unless varied).
  'fig4_latents': _runs('pythia160m', 'num_latents', (32, 768, 4096, 16384, 32768, 65536, 131072), 'latents{}'),
  'fig4_k': _runs('pythia160m', 'k', (16, 32, 64, 128, 256), 'k{}'),
  'fig4_tokens': _runs(
    'pythia160m',
    'num_tokens',
    (800_000_000, 2_000_000_000, 4_000_000_000, 8_000_000_000, 16_000_000_000, 80_000_000_000),
    'tokens{}',
  ),
  # Fig. 5 left: every layer of Pythia-160M at two sizes.
  'fig5_layers': [
    run
    for size in (4096, 32768)
    for run in _runs(
      'pythia160m', 'hookpoint', [f'layers.{i}.mlp' for i in range(12)], f'latents{size}_' + '{}', num_latents=size
    )
  ],
  # Fig. 5 middle: models and positions at expansion factor 36.
  'fig5_models': [
    Run('pythia_mlp', 'pythia160m', (('hookpoint', 'layers.6.mlp'), ('num_latents', '27648')), 'hookpoint'),
    Run('pythia_resid', 'pythia160m', (('hookpoint', 'layers.6'), ('num_latents', '27648')), 'hookpoint'),
    Run('gpt2_mlp', 'gpt2', (), 'hookpoint'),
    Run('gpt2_resid', 'gpt2_residual', (), 'hookpoint'),
    Run('smollm_mlp', 'smollm', (), 'hookpoint'),
    Run('smollm_resid', 'smollm', (('hookpoint', 'layers.15'),), 'hookpoint'),
  ],
  # Fig. 5 right: architectures on GPT-2 (ReLU+L1 and Gated with the authors' L1 coefficient 3, lr 2e-4).
  'fig5_arch': [
    Run('topk', 'gpt2', (('arch', 'topk'),), 'arch'),
    Run('gated', 'gpt2', (('arch', 'gated'), ('l1_coefficient', '3.0'), ('lr', '2e-4')), 'arch'),
    Run('relu', 'gpt2', (('arch', 'relu'), ('l1_coefficient', '3.0'), ('lr', '2e-4')), 'arch'),
  ],
  'llama3_8b': [Run('llama3_8b', 'llama3_8b', (), 'num_latents')],
}


def sweep_runs(name: str) -> list[Run]:
  if name not in SWEEPS:
    raise ValueError(f'unknown sweep {name!r}; choose one of: {", ".join(SWEEPS)}')
  return SWEEPS[name]
