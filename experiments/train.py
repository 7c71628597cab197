"""Train S SAE seeds on one activation stream.

  python -m experiments.train --config=synthetic --workdir=runs/synthetic [--config.FIELD=VALUE ...]

`--config` names a preset from `experiments/presets.py`; `--config.k=64` overrides one typed field. Rerun
the same command on the same --workdir to resume from its last checkpoint. Exit codes: 0 done (or stopped by
SIGTERM after saving), 1 training failed (non-finite values), 2 bad input (flags, config, checkpoint).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import presets

_CONFIG = config_flags.DEFINE_config_dataclass(
  'config', presets.synthetic(), 'Preset name, then --config.FIELD=VALUE overrides.', parse_fn=presets.get
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (created; an existing run there is resumed).')

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but any flag problem is one line on stderr and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    fail(str(error).splitlines()[0])
  except (ValueError, KeyError, TypeError) as error:  # ml_collections: wrong type or unknown field
    message = str(error).strip('"\'').splitlines()[0]
    fail(f'bad config flag: {message}')
  return []


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; flags are --config=NAME --workdir=DIR --config.FIELD=VALUE')
  if not _WORKDIR.value:
    fail('--workdir is required: the run folder to create or resume')
  # Imported here so that flag errors come back in milliseconds, before JAX initialises.
  from saejax import data
  from saejax.train import checkpoint, trainer

  config = _CONFIG.value
  try:
    config.validate()
    result = trainer.train(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, checkpoint.CheckpointError, data.SourceUnavailableError) as error:
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
  except trainer.NonFiniteError as error:
    fail(str(error), EXIT_FAILED)
  if result.status == 'completed':
    logging.info('done: %d steps; SAEs exported under %s/saes/', result.step, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
