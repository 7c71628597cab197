"""Reproduction suites: the paper's claims, each measured with a verdict of holds, does not hold or not tested.

  python -m experiments.reproduce --suite=synthetic --out=runs/reproduce       # synthetic ground truth (default)
  python -m experiments.reproduce --suite=smollm2 --out=runs/reproduce_smollm2  # SmolLM2-135M, about 2 h here
  python -m experiments.reproduce --suite=smollm2 --quick --out=/tmp/repro     # a scaled-down plan, minutes
  python -m experiments.reproduce --suite=smollm2 --scale=full --out=...       # the paper's sizes (accelerators)

The suites and their fixed plans: `experiments/suite_synthetic.py`, `experiments/suite_smollm2.py`. The smollm2
suite is resumable: rerun the same command after a kill and it continues with the first unfinished run.
Exit codes: 0 done, 1 a run failed, 2 bad input (one line on stderr), 3 stopped by SIGTERM (rerun to continue).
"""

from __future__ import annotations

from absl import app, flags

from experiments.cli import fail, parse_flags

_SUITE = flags.DEFINE_enum('suite', 'synthetic', ['synthetic', 'smollm2'], 'Which suite to run.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (report.md, claims.json; the smollm2 runs and cache).')
_QUICK = flags.DEFINE_bool('quick', False, 'The scaled-down plan of the test suite.')
_SCALE = flags.DEFINE_enum('scale', 'cpu', ['cpu', 'full'], 'smollm2 plan: this CPU, or the paper sizes.')
_DATASET = flags.DEFINE_string('dataset', None, 'smollm2: training text (default: experiments.corpus train.jsonl).')
_EVAL_DATASET = flags.DEFINE_string('eval_dataset', None, 'smollm2: held-out text (default: heldout.jsonl).')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}')
  if _SUITE.value == 'synthetic':
    from experiments import suite_synthetic

    if _SCALE.value != 'cpu' or _DATASET.value or _EVAL_DATASET.value:
      fail('--scale, --dataset and --eval_dataset belong to --suite=smollm2')
    suite_synthetic.run_suite(_OUT.value or 'runs/reproduce', _QUICK.value)
    return
  from experiments import suite_smollm2

  if _QUICK.value and _SCALE.value == 'full':
    fail('give --quick or --scale=full, not both')
  plan = 'quick' if _QUICK.value else _SCALE.value
  suite_smollm2.main_suite(_OUT.value or 'runs/reproduce_smollm2', plan, _DATASET.value, _EVAL_DATASET.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
