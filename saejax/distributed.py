"""Multi-host start-up: one `jax.distributed.initialize` per process, before any JAX computation.

Three cases, decided from arguments, then `SAEJAX_*` environment variables, then the cluster environment:

- a coordinator is given (`coordinator_address` or `SAEJAX_COORDINATOR`, with `num_processes` / `process_id` or
  `SAEJAX_NUM_PROCESSES` / `SAEJAX_PROCESS_ID`): explicit initialisation. `bind_address` (`SAEJAX_BIND_ADDRESS`)
  is where process 0 listens; JAX's default is every interface, tests pass `127.0.0.1:PORT`.
- a TPU VM, a Slurm job step or an OpenMPI launch with more than one process: `jax.distributed.initialize()`
  with no arguments, which reads the coordinator, process count and id from that environment.
- otherwise (one process): nothing, and JAX stays single-process.

Multi-process CPU runs need cross-process collectives: gloo is JAX 0.10's default
(`jax_cpu_collectives_implementation`); a setting of 'none' is switched to gloo here, an explicit 'mpi' is kept.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import jax

ENV_COORDINATOR = 'SAEJAX_COORDINATOR'
ENV_NUM_PROCESSES = 'SAEJAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'SAEJAX_PROCESS_ID'
ENV_BIND_ADDRESS = 'SAEJAX_BIND_ADDRESS'

# The variables JAX's own cluster detection looks for (jax/_src/clusters).
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
_OPENMPI_URI = 'OMPI_MCA_orte_hnp_uri'


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError as error:
    raise ValueError(f'{name}={value!r} is not an integer') from error


def detect_cluster() -> str | None:
  """'tpu', 'slurm' or 'openmpi' when this process was started by one with more than one process, else None."""
  if all(name in os.environ for name in _SLURM_VARS) and os.environ['SLURM_NTASKS'] != '1':
    return 'slurm'
  if _OPENMPI_URI in os.environ and os.environ.get('OMPI_COMM_WORLD_SIZE', '') != '1':
    return 'openmpi'
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms and 'tpu' not in platforms:  # e.g. JAX_PLATFORMS=cpu on a TPU VM: one CPU process
    return None
  on_tpu_vm = importlib.util.find_spec('libtpu') is not None and bool(
    glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')
  )
  if on_tpu_vm or 'TPU_WORKER_HOSTNAMES' in os.environ:
    return 'tpu'  # JAX asks the TPU metadata server how many hosts the slice has (one is fine)
  return None


def _bind_address(bind_address: str | None, coordinator_address: str | None) -> str | None:
  """`host` or `host:port`; a bare host takes the coordinator's port."""
  if not bind_address or ':' in bind_address or not coordinator_address:
    return bind_address or None
  return f'{bind_address}:{coordinator_address.rsplit(":", 1)[1]}'


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  bind_address: str | None = None,
) -> bool:
  """Starts `jax.distributed` when this is one process of several; returns whether it is initialised.

  Arguments left as None fall back to the `SAEJAX_*` environment variables. Call it once, after flag parsing
  and before anything touches a JAX device; a second call is a no-op.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  num_processes = _env_int(ENV_NUM_PROCESSES) if num_processes is None else num_processes
  process_id = _env_int(ENV_PROCESS_ID) if process_id is None else process_id
  bind_address = _bind_address(bind_address or os.environ.get(ENV_BIND_ADDRESS), coordinator_address)
  if jax.distributed.is_initialized():
    return True
  cluster = detect_cluster()
  if coordinator_address is None and cluster is None:
    if num_processes not in (None, 1):
      raise ValueError(
        f'num_processes={num_processes} needs a coordinator: pass --coordinator_address=HOST:PORT '
        f'(or set {ENV_COORDINATOR})'
      )
    return False
  if num_processes == 1:
    return False
  if coordinator_address is not None and cluster is None and (num_processes is None or process_id is None):
    raise ValueError(
      f'--coordinator_address={coordinator_address} needs --num_processes and --process_id '
      f'(or {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})'
    )
  if getattr(jax.config, 'jax_cpu_collectives_implementation', 'gloo') in (None, 'none'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id, coordinator_bind_address=bind_address)
  # Every process says it joined (one line each): the line to look for when a pod hangs at start-up.
  print(
    f'jax.distributed: process {jax.process_index()} of {jax.process_count()} ({cluster or coordinator_address}), '
    f'{jax.local_device_count()} local / {jax.device_count()} global devices',
    file=sys.stderr,
    flush=True,
  )
  return True
