"""Activation sources behind one interface (`ActivationSource`)."""

from jax.sharding import NamedSharding

from saejax.data.base import ActivationSource, place_host_batch
from saejax.data.synthetic import SyntheticSource


class SourceUnavailableError(RuntimeError):
  """The configured source cannot run here; the message says what to supply."""


def make_source(config, sharding: NamedSharding) -> ActivationSource:
  if config.source == 'synthetic':
    return SyntheticSource(config, sharding)
  if config.source == 'lm':
    from saejax.data.lm import LMActivationSource

    return LMActivationSource(config, sharding)
  if config.source == 'cache':
    from saejax.data.cache_source import CacheActivationSource

    return CacheActivationSource(config, sharding)
  raise ValueError(f'unknown source {config.source!r}; use synthetic, lm or cache')


__all__ = ['ActivationSource', 'SourceUnavailableError', 'SyntheticSource', 'make_source', 'place_host_batch']
