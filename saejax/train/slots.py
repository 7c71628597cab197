"""What trains in one step: a slot per (hookpoint, variant), each with its own seeds, SAE spec and compiled step.

A run trains S seeds of every variant (saejax.variants) at every hookpoint on the same batches. Each variant keeps
the exact program it would run alone: its own SaeSpec, optimiser and `SeedGroupStep` (one compiled, donated step
per variant, shared by the hookpoints, which have the same shapes). A slot is therefore one independent set of
seed groups, and nothing about it depends on which other slots train beside it: on CPU a variant trained among
others is bitwise the variant trained alone. Width and architecture variants are separate programs by necessity;
value-only variants (k, lr, L1) are separate programs too, which RESULTS.md compares with one masked program.

State keys are `hookpoint<i>` for a run without variants (unchanged checkpoints) and `hookpoint<i>_variant<j>`
with them (checkpoint paths reserve the dots in hookpoint names).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from saejax import sae as sae_lib
from saejax import sharding as shd
from saejax import variants as variants_lib
from saejax.train import optimizer, seed_groups
from saejax.train import step as step_lib


@dataclasses.dataclass
class VariantPlan:
  """One variant's config and everything derived from it (the whole run's, for a run without variants)."""

  name: str  # '' for a run without variants
  config: Any  # TrainConfig with this variant's overrides
  arch: sae_lib.Architecture
  spec: sae_lib.SaeSpec
  tx: Any
  schedule: Any
  step: seed_groups.SeedGroupStep


@dataclasses.dataclass(frozen=True)
class Slot:
  key: str  # the state and checkpoint key
  hookpoint: str
  hookpoint_index: int
  variant: VariantPlan


def plans(config, mesh: jax.sharding.Mesh) -> list[VariantPlan]:
  """One plan per variant of `config` on `mesh`, in the order `config.variants` lists them."""
  platform = mesh.devices.flat[0].platform
  out = []
  for name, own in variants_lib.resolve(config):
    arch = sae_lib.get(own.arch)
    spec = sae_lib.SaeSpec.from_config(own, latent_shards=mesh.shape[shd.MODEL], platform=platform)
    tx, schedule = optimizer.make_optimizer(own)
    group_size = own.resolved_seed_group_size(platform)
    step = seed_groups.make(arch, spec, tx, own.dead_tokens, len(own.init_seeds), group_size, mesh)
    out.append(VariantPlan(name, own, arch, spec, tx, schedule, step))
  return out


def make(hookpoints: list[str], variant_plans: list[VariantPlan]) -> list[Slot]:
  """Slots hookpoint-major: every variant of the first hookpoint, then of the next."""
  named = len(variant_plans) > 1 or variant_plans[0].name != ''
  return [
    Slot(f'hookpoint{i}_variant{j}' if named else f'hookpoint{i}', hookpoint, i, plan)
    for i, hookpoint in enumerate(hookpoints)
    for j, plan in enumerate(variant_plans)
  ]


def label(slot: Slot, slots: list[Slot]) -> str:
  """How the console and in-memory results name a slot: its hookpoint, its variant, or `hookpoint/variant`."""
  hookpoints = {s.hookpoint for s in slots}
  parts = [slot.hookpoint] if len(hookpoints) > 1 else []
  parts += [slot.variant.name] if slot.variant.name else []
  return '/'.join(parts) or slot.hookpoint


def inputs(slots: list[Slot], batches: list[jax.Array]) -> dict[str, jax.Array]:
  """Each slot's batch (its hookpoint's) from one batch per hookpoint: variants share the same array."""
  return {slot.key: batches[slot.hookpoint_index] for slot in slots}


def split(slots: list[Slot], states: dict) -> dict:
  return {slot.key: slot.variant.step.split(states[slot.key]) for slot in slots}


def merge(slots: list[Slot], groups: dict) -> dict:
  return {slot.key: slot.variant.step.merge(groups[slot.key]) for slot in slots}


def step_all(slots: list[Slot], groups: dict, inputs_by_key: dict) -> tuple[dict, dict]:
  """One step of every slot's seeds: (groups, metrics), keyed by slot key. Dispatch is asynchronous, so the
  slots' programs queue back to back on the device while the host prepares the next batch."""
  outs = {slot.key: slot.variant.step(groups[slot.key], inputs_by_key[slot.key]) for slot in slots}
  return {key: out[0] for key, out in outs.items()}, {key: out[1] for key, out in outs.items()}


def fresh_state(slot: Slot, first_batch_BxD: jax.Array, mesh: jax.sharding.Mesh) -> step_lib.TrainState:
  """A slot's seed-stacked init on the mesh, with b_dec from its hookpoint's first batch."""
  plan = slot.variant
  state = step_lib.create_state(plan.arch, plan.spec, plan.tx, plan.config.init_seeds, mesh)
  return step_lib.set_b_dec(state, sae_lib.data_b_dec(first_batch_BxD, plan.config.b_dec_init))
