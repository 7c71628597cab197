"""Train S SAE seeds on one activation stream.

  python -m experiments.train --config=synthetic --workdir=runs/synthetic [--config.FIELD=VALUE ...]

`--config` names a preset from `experiments/presets.py`; `--config.k=64` overrides one typed field. Rerun
the same command on the same --workdir to resume from its last checkpoint. Exit codes: 0 done (or stopped by
SIGTERM after saving), 1 training failed (non-finite values), 2 bad input (flags, config, checkpoint).

Multi-host: every host runs the same command. On TPU VMs, Slurm and OpenMPI the processes find each other on their
own; elsewhere add `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the SAEJAX_COORDINATOR,
SAEJAX_NUM_PROCESSES, SAEJAX_PROCESS_ID, SAEJAX_BIND_ADDRESS variables). The --workdir must be shared by all hosts;
only process 0 writes config.json, metrics, exports and the summary, and only process 0 logs.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import presets
from experiments.cli import EXIT_FAILED, fail, parse_flags

_CONFIG = config_flags.DEFINE_config_dataclass(
  'config', presets.synthetic(), 'Preset name, then --config.FIELD=VALUE overrides.', parse_fn=presets.get
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (created; an existing run there is resumed).')
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address', None, 'Multi-host: HOST:PORT of process 0 (default: $SAEJAX_COORDINATOR, or detected).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: processes in the run.', lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
  'process_id', None, 'Multi-host: this process, 0 .. num_processes - 1.', lower_bound=0
)
_BIND_ADDRESS = flags.DEFINE_string(
  'coordinator_bind_address', None, 'Multi-host: where process 0 listens, HOST or HOST:PORT (default: all interfaces).'
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; flags are --config=NAME --workdir=DIR --config.FIELD=VALUE')
  if not _WORKDIR.value:
    fail('--workdir is required: the run folder to create or resume')
  # Imported here so that flag errors come back in milliseconds, before JAX initialises.
  from saejax import distributed

  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _BIND_ADDRESS.value)
  except (ValueError, RuntimeError) as error:
    fail(f'multi-host start-up failed: {str(error).strip().splitlines()[0] if str(error).strip() else error!r}')
  import jax

  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  from saejax import data
  from saejax.train import checkpoint, trainer

  config = _CONFIG.value
  try:
    config.validate()
    result = trainer.train(config, _WORKDIR.value)
  except (ValueError, OSError, checkpoint.CheckpointError, data.SourceUnavailableError) as error:
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
  except trainer.NonFiniteError as error:
    fail(str(error), EXIT_FAILED)
  if result.status == 'completed':
    from saejax import console
    from saejax.train import run_folder

    console.say(console.table(*run_folder.seed_table(result.summary)))
    workdir = _WORKDIR.value
    layout = '<hookpoint>/<variant>/seed<N>/' if config.variants else '<hookpoint>/seed<N>/'
    console.say(
      f'done: {result.step:,} steps. SAEs in {workdir}/saes/ (EleutherAI) and {workdir}/saelens/ as '
      f'{layout}; summary.json, metrics.jsonl'
    )


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
