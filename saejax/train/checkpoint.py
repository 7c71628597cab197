"""Orbax checkpoints of a run: the train state (params, Adam state, dead-latent counters, step) and the data position.

A checkpoint that cannot be restored is an error that names the step and what to do; the trainer never
falls back to a fresh start over it, so nothing a user had is overwritten.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp

from saejax import storage


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used; the message says what to do."""


class Checkpointer:
  """`DIR/checkpoints/<step>/{state,data}` through one Orbax CheckpointManager."""

  def __init__(self, workdir: str, keep: int = 2):
    # Orbax writes gs:// itself (TensorStore for arrays), so a pod's hosts can share a bucket.
    self.directory = storage.join(storage.absolute(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, save_interval_steps=1)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the same step once a preemption notice arrived (multi-host runs)."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    self._manager.save(step, args=args, force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs), so a checkpoint
    written on one mesh restores onto another."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    where = storage.join(self.directory, str(step))
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as error:  # noqa: BLE001 - Orbax raises many types; all mean the same to the user
      first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      raise CheckpointError(
        f'checkpoint {where} cannot be restored ({type(error).__name__}: {first_line[:300]}); '
        f'move it aside to resume from an earlier checkpoint, or use a new --workdir'
      ) from error
    state, data_state = restored['state'], restored['data']
    _check_shapes(abstract_state, state, where)
    return state, data_state

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def _check_shapes(expected: Any, restored: Any, where: str) -> None:
  expected_shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), expected)
  restored_shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), restored)
  if expected_shapes != restored_shapes:
    raise CheckpointError(
      f'checkpoint {where} does not match this config (array shapes differ); '
      f'rerun with the flags that created it, or use a new --workdir'
    )
