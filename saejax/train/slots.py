"""What trains in one step: a slot per hookpoint and family of variants, each one compiled seed-group step.

A run trains S seeds of every variant (saejax.variants) at every hookpoint on the same batches. Variants that
differ only in values the step takes as inputs, the learning rate, the L1 coefficient and the warm-up
(saejax.train.step), form one family: one SaeSpec, one optimiser and one `SeedGroupStep` over all their seeds,
member m being seed m % S of the family's variant m // S, so on accelerators they fill the same vmapped seed
groups. Variants that change the
program (k, width, architecture, AuxK, clipping) are families of their own: separate programs in the same
step, sharing the batch, as hookpoints do. A k sweep could share one program through a top-k at the largest k,
masked per variant; that costs more than per-k programs whenever the groups are full (RESULTS.md, "Variants").

Nothing about a member depends on what else trains beside it: its program is its family's group step, which is the
one that setting runs alone, with its own values as inputs. So on CPU a variant trained among others is bitwise
the variant trained alone.

State keys are `hookpoint<i>` for a run without variants (unchanged checkpoints) and `hookpoint<i>_variant<j>`,
j counting families, with them (checkpoint paths reserve the dots in hookpoint names).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax

from saejax import sae as sae_lib
from saejax import sharding as shd
from saejax import variants as variants_lib
from saejax.train import optimizer, seed_groups
from saejax.train import step as step_lib


@dataclasses.dataclass
class VariantPlan:
  """One variant: its name ('' for a run without variants) and its own config."""

  name: str
  config: Any


@dataclasses.dataclass
class Family:
  """Variants that share one compiled step; `members(j)` are the stacked rows of variant j's seeds."""

  variants: list[VariantPlan]
  arch: sae_lib.Architecture
  spec: sae_lib.SaeSpec
  tx: Any
  step: seed_groups.SeedGroupStep
  num_seeds: int

  def members(self, index: int) -> slice:
    return slice(index * self.num_seeds, (index + 1) * self.num_seeds)

  @property
  def member_seeds(self) -> tuple[int, ...]:
    return tuple(self.variants[0].config.init_seeds) * len(self.variants)


@dataclasses.dataclass(frozen=True)
class Slot:
  key: str  # the state and checkpoint key
  hookpoint: str
  hookpoint_index: int
  family: Family


@dataclasses.dataclass(frozen=True)
class View:
  """One variant at one hookpoint: where its seeds sit in its slot's stacked state and metrics."""

  slot: Slot
  variant: VariantPlan
  members: slice


# The variant fields whose values the step takes as inputs (saejax.train.step.member_hparams), each with the value
# it is blanked to in a family's key: variants that differ only in them are one family.
_STEP_INPUT_FIELDS = {'lr': None, 'l1_coefficient': 0.0, 'warmup_steps': 0}


def _program(config) -> str:
  """What the compiled step depends on: the config without the values the step takes as inputs."""
  shared = dataclasses.replace(config, **_STEP_INPUT_FIELDS)
  return json.dumps(shared.to_json(), sort_keys=True)


def families(config, mesh: jax.sharding.Mesh) -> list[Family]:
  """The variants of `config` grouped into families, in the order `config.variants` first lists each."""
  platform = mesh.devices.flat[0].platform
  grouped: dict[str, list[VariantPlan]] = {}
  for name, own in variants_lib.resolve(config):
    grouped.setdefault(_program(own), []).append(VariantPlan(name, own))
  out = []
  for plans in grouped.values():
    own = plans[0].config
    arch = sae_lib.get(own.arch)
    spec = sae_lib.SaeSpec.from_config(own, latent_shards=mesh.shape[shd.MODEL], platform=platform)
    tx = optimizer.make_optimizer(own)
    hparams = step_lib.member_hparams([plan.config for plan in plans for _ in own.init_seeds])
    step = seed_groups.make(arch, spec, tx, hparams, own.resolved_seed_group_size(platform), mesh)
    out.append(Family(plans, arch, spec, tx, step, len(own.init_seeds)))
  return out


def make(hookpoints: list[str], run_families: list[Family]) -> list[Slot]:
  """Slots hookpoint-major: every family of the first hookpoint, then of the next."""
  named = len(run_families) > 1 or run_families[0].variants[0].name != ''
  return [
    Slot(f'hookpoint{i}_variant{j}' if named else f'hookpoint{i}', hookpoint, i, family)
    for i, hookpoint in enumerate(hookpoints)
    for j, family in enumerate(run_families)
  ]


def views(slots: list[Slot]) -> list[View]:
  """Every (hookpoint, variant), hookpoint-major, variants in their families' order."""
  return [
    View(slot, plan, slot.family.members(index)) for slot in slots for index, plan in enumerate(slot.family.variants)
  ]


def label(view: View, all_views: list[View]) -> str:
  """How the console and in-memory results name a view: its hookpoint, its variant, or `hookpoint/variant`."""
  hookpoints = {v.slot.hookpoint for v in all_views}
  parts = [view.slot.hookpoint] if len(hookpoints) > 1 else []
  parts += [view.variant.name] if view.variant.name else []
  return '/'.join(parts) or view.slot.hookpoint


def inputs(slots: list[Slot], batches: list[jax.Array]) -> dict[str, jax.Array]:
  """Each slot's batch (its hookpoint's) from one batch per hookpoint: variants share the same array."""
  return {slot.key: batches[slot.hookpoint_index] for slot in slots}


def split(slots: list[Slot], states: dict) -> dict:
  return {slot.key: slot.family.step.split(states[slot.key]) for slot in slots}


def merge(slots: list[Slot], groups: dict) -> dict:
  return {slot.key: slot.family.step.merge(groups[slot.key]) for slot in slots}


def step_all(slots: list[Slot], groups: dict, inputs_by_key: dict) -> tuple[dict, dict]:
  """One step of every slot's members: (groups, metrics), keyed by slot key. Dispatch is asynchronous, so the
  slots' programs queue back to back on the device while the host prepares the next batch."""
  outs = {slot.key: slot.family.step(groups[slot.key], inputs_by_key[slot.key]) for slot in slots}
  return {key: out[0] for key, out in outs.items()}, {key: out[1] for key, out in outs.items()}


def fresh_state(slot: Slot, first_batch_BxD: jax.Array, mesh: jax.sharding.Mesh) -> step_lib.TrainState:
  """A slot's member-stacked init on the mesh (each variant's seeds initialised as if alone), with b_dec from its
  hookpoint's first batch."""
  family = slot.family
  state = step_lib.create_state(family.arch, family.spec, family.tx, family.member_seeds, mesh)
  return step_lib.set_b_dec(state, sae_lib.data_b_dec(first_batch_BxD, family.variants[0].config.b_dec_init))
