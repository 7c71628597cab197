"""Hyperparameter variants: several SAE settings trained beside the seeds, in the same step, on the same batches.

`TrainConfig.variants` lists them in one string. Two spellings:

    k=16,32,64                  one field, several values: three variants
    k=16,32;lr=1e-4,3e-4        fields joined by ';': every combination (four variants)
    arch=topk|arch=relu,l1_coefficient=3.0      '|' lists whole variants, each `field=value` joined by ','

A variant's name spells its settings the same way (`k=16`, `k=16,lr=1e-4`), and names its export folder
`saes/<hookpoint>/<variant>/seed<N>/`. Only fields that change the SAE and its optimiser may vary
(`VARIANT_FIELDS`); the data stream (batch size, tokens, source, hookpoints, seeds) is shared by construction.

Each variant is the base config with its overrides (`resolve`), and trains exactly as that config would alone:
saejax.train.trainer gives it its own compiled seed-group step, so on CPU a variant trained among others is bitwise
the same SAE as the same setting trained alone.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

# The fields a variant may set: the SAE, its sparsity and its optimiser. Width and architecture change shapes and
# train as separate groups; the others change values only.
VARIANT_FIELDS = (
  'k',
  'lr',
  'l1_coefficient',
  'num_latents',
  'arch',
  'auxk',
  'auxk_coefficient',
  'multi_topk',
  'jumprelu_threshold_init',
  'jumprelu_bandwidth',
  'warmup_steps',
  'grad_clip',
)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One setting: its folder name (`k=16,lr=1e-4`) and its typed overrides of the base config."""

  name: str
  overrides: tuple[tuple[str, Any], ...]


def _parse_value(config, field: str, text: str) -> Any:
  """`text` as the type of `config.field` (None allowed where the default is None, e.g. lr)."""
  if field not in VARIANT_FIELDS:
    raise ValueError(
      f'variants: {field!r} cannot vary within one run (it changes the data stream or is unknown); '
      f'vary one of {", ".join(VARIANT_FIELDS)}, or run a separate training run'
    )
  current = getattr(config, field)
  text = text.strip()
  try:
    if isinstance(current, bool):
      if text.lower() not in ('true', 'false'):
        raise ValueError(text)
      return text.lower() == 'true'
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float) or field == 'lr':
      return float(text)
  except ValueError:
    kind = 'true or false' if isinstance(current, bool) else type(current or 0.0).__name__
    raise ValueError(f'variants: {field}={text!r} is not a valid {kind}') from None
  return text


def _pair(config, item: str) -> tuple[str, Any, str]:
  field, sep, value = item.partition('=')
  if not sep or not field.strip() or not value.strip():
    raise ValueError(f'variants: {item!r} is not field=value (e.g. k=16,32,64 or lr=1e-4|lr=3e-4)')
  return field.strip(), _parse_value(config, field.strip(), value), value.strip()


def parse(config) -> list[Variant]:
  """The variants of `config.variants` in the order written; [] when it is empty."""
  text = config.variants.strip()
  if not text:
    return []
  if '|' in text:
    variants = [_explicit(config, part) for part in text.split('|')]
  else:
    axes = [_axis(config, part) for part in text.split(';')]
    fields = [axis[0][0] for axis in axes]
    if len(set(fields)) != len(fields):
      raise ValueError(f'variants: {text!r} names a field twice')
    variants = [
      Variant(','.join(f'{f}={s}' for f, _, s in combo), tuple((f, v) for f, v, _ in combo))
      for combo in itertools.product(*axes)
    ]
  names = [v.name for v in variants]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    raise ValueError(f'variants: {repeated} appear more than once in {text!r}')
  return variants


def _axis(config, part: str) -> list[tuple[str, Any, str]]:
  """`k=16,32,64` as [(field, value, spelling), ...]."""
  field, sep, values = part.partition('=')
  if not sep or not values.strip():
    raise ValueError(f'variants: {part!r} is not field=v1,v2,... (e.g. k=16,32,64)')
  return [_pair(config, f'{field}={value}') for value in values.split(',')]


def _explicit(config, part: str) -> Variant:
  """`arch=relu,l1_coefficient=3.0` as one Variant."""
  pairs = [_pair(config, item) for item in part.split(',')]
  fields = [f for f, _, _ in pairs]
  if len(set(fields)) != len(fields):
    raise ValueError(f'variants: {part!r} sets a field twice')
  return Variant(','.join(f'{f}={s}' for f, _, s in pairs), tuple((f, v) for f, v, _ in pairs))


def resolve(config) -> list[tuple[str, Any]]:
  """[(variant name, its own config)]: the base config with each variant's overrides and no variants of its own.

  A run without variants is one unnamed variant: [('', config)].
  """
  variants = parse(config)
  if not variants:
    return [('', config)]
  resolved = []
  for variant in variants:
    own = dataclasses.replace(config, variants='', **dict(variant.overrides))
    try:
      own.validate()
    except ValueError as error:
      raise ValueError(f'variant {variant.name}: {error}') from None
    resolved.append((variant.name, own))
  return resolved


def config_of(config, variant: str | None) -> Any:
  """The config of the variant named `variant` (the base config for a run without variants)."""
  resolved = dict(resolve(config))
  if variant in (None, '') and len(resolved) == 1:
    return next(iter(resolved.values()))
  if variant not in resolved:
    raise ValueError(f'the run has no variant {variant!r}; choose one of {", ".join(resolved)}')
  return resolved[variant]
