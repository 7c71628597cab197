"""S seeds as calls of one compiled group step: a seed's arithmetic does not depend on what trains beside it.

A train step over all S seeds in one XLA program is a different program for every S: XLA fuses, hoists and
simplifies it differently (a one-trip seed loop is inlined, for one), and top-k turns the last-bit differences
into different SAEs within a few hundred steps. So the seeds run in groups of a fixed size g (saejax.tuning: 1
on CPU; on accelerators a size that depends on the SAE's shapes, never on S), each group one call of the same
compiled, donated step, with the last group padded by copies of its last seed (their results are dropped). The
program a seed runs in is then the same for S = 1, 4 or 9, and its SAE is bitwise identical at any length.

Between steps the trainer keeps the state as its groups (`split`); checkpoints, exports and callers see the
seed-stacked layout (`merge`), so nothing outside this module knows about groups.

The stacked axis holds members: the seeds of one setting, or, for variants that differ only in the learning rate,
L1 coefficient or warm-up (saejax.train.slots), every seed of each of them; each member brings its own values of
those and of the step's other inputs (`hparams`, saejax.train.step.member_hparams), which the groups take along.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from saejax import sae as sae_lib
from saejax import sharding as shd
from saejax.train import optimizer
from saejax.train import step as step_lib

Groups = list[step_lib.TrainState]


def _seed_axis(tree, fn):
  """Applies `fn` to every per-seed leaf (all but the scalar step counter)."""
  return {key: (value if key == 'step' else jax.tree.map(fn, value)) for key, value in tree.items()}


@dataclasses.dataclass
class SeedGroupStep:
  """`(groups, x_BxD) -> (groups, metrics [S])` for one hookpoint's S seeds (members), in ceil(S / g) calls."""

  group_step: Callable  # the pure step of g vmapped seeds: (state [g, ...], x_BxD, hparams [g]) -> (state, metrics)
  num_seeds: int
  group_size: int
  mesh: Mesh
  num_latents: int
  create_state: Callable  # init_seeds -> the seed-stacked fresh state on the mesh
  hparams: dict[str, np.ndarray]  # [S] per member: its rate, L1 coefficient, schedule and dead-latent window

  def __post_init__(self):
    self.num_groups = -(-self.num_seeds // self.group_size)
    self._jitted = self._merge = None  # compiled on first use, then reused (merge runs at every checkpoint)
    self._group_hparams = None

  def _indices(self, group: int) -> jax.Array:
    start = group * self.group_size
    return jnp.minimum(jnp.arange(start, start + self.group_size), self.num_seeds - 1)  # pads with the last seed

  def split(self, state: step_lib.TrainState) -> Groups:
    """The seed-stacked state as its groups, each placed like the stacked state (one compiled gather)."""
    take = jax.jit(lambda s, seeds: _seed_axis(s, lambda a: a[seeds]), out_shardings=self._shardings(state))
    return [take(state, self._indices(group)) for group in range(self.num_groups)]

  def merge(self, groups: Groups) -> step_lib.TrainState:
    """The groups as the seed-stacked state (padding dropped)."""
    if self._merge is None:
      shardings = shd.state_shardings(self.mesh, self._stacked_shape(groups[0]), self.num_latents)
      self._merge = jax.jit(self._concat, out_shardings=shardings)
    return self._merge(groups)

  def _concat(self, groups):
    def concat(*leaves):
      return jnp.concatenate(leaves)[: self.num_seeds]

    first = groups[0]
    return {key: first[key] if key == 'step' else jax.tree.map(concat, *[g[key] for g in groups]) for key in first}

  def _stacked_shape(self, group):
    def grow(leaf):
      return jax.ShapeDtypeStruct((self.num_seeds, *leaf.shape[1:]), leaf.dtype)

    return _seed_axis(jax.eval_shape(lambda g: g, group), grow)

  def _shardings(self, state):
    def shrink(leaf):
      return jax.ShapeDtypeStruct((self.group_size, *leaf.shape[1:]), leaf.dtype)

    return shd.state_shardings(self.mesh, _seed_axis(jax.eval_shape(lambda s: s, state), shrink), self.num_latents)

  def compiled(self, group: step_lib.TrainState):
    """The one jitted, donated group step (the same program for every group and every S)."""
    if self._jitted is None:
      shardings = shd.state_shardings(self.mesh, group, self.num_latents)
      self._jitted = jax.jit(
        self.group_step,
        in_shardings=(shardings, shd.batch_sharding(self.mesh), shd.replicated(self.mesh)),
        out_shardings=(shardings, shd.replicated(self.mesh)),
        donate_argnums=0,
      )
      place = jax.jit(lambda values: values, out_shardings=shd.replicated(self.mesh))
      self._group_hparams = [
        place({name: values[np.asarray(self._indices(group))] for name, values in self.hparams.items()})
        for group in range(self.num_groups)
      ]
      self._merge_metrics = jax.jit(
        lambda parts: jax.tree.map(lambda *m: jnp.concatenate(m)[: self.num_seeds], *parts),
        out_shardings=shd.replicated(self.mesh),
      )
    return self._jitted

  def group_hparams(self, group: int) -> dict[str, jax.Array]:
    """Group `group`'s [g] values of each hparam on the mesh (available once compiled)."""
    return self._group_hparams[group]

  def __call__(self, groups: Groups, x_BxD: jax.Array) -> tuple[Groups, dict]:
    step = self.compiled(groups[0])
    outs = [step(group, x_BxD, self.group_hparams(index)) for index, group in enumerate(groups)]
    metrics = self._merge_metrics([m for _, m in outs])
    return [g for g, _ in outs], metrics


def from_config(config, mesh: Mesh) -> SeedGroupStep:
  """The grouped step of `config`'s seeds on `mesh`, with the kernel plan and group size of the mesh's platform."""
  platform = mesh.devices.flat[0].platform
  spec = sae_lib.SaeSpec.from_config(config, latent_shards=mesh.shape[shd.MODEL], platform=platform)
  tx = optimizer.make_optimizer(config)
  group_size = config.resolved_seed_group_size(platform)
  hparams = step_lib.member_hparams([config] * len(config.init_seeds))
  return make(sae_lib.get(config.arch), spec, tx, hparams, group_size, mesh)


def make(arch, spec, tx, hparams: dict[str, np.ndarray], group_size: int, mesh: Mesh):
  """The grouped step of the members whose `hparams` are given ([S] each); `group_size` 0 means one group of all."""
  num_seeds = len(hparams['lr'])
  group_size = num_seeds if group_size <= 0 else group_size
  group_step = step_lib.make_group_step(arch, spec, tx)
  create = functools.partial(step_lib.create_state, arch, spec, tx, mesh=mesh)
  return SeedGroupStep(group_step, num_seeds, group_size, mesh, spec.num_latents, create, hparams)
