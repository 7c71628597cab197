"""Run the LM once and write an activation cache that training reads many times.

  python -m experiments.cache --config=pythia160m --out=DIR --tokens=N [--dtype=bfloat16|float32]
      [--shard_tokens=T] [--config.FIELD=VALUE ...]

The config names the model, dataset, hookpoint(s) (`--config.hookpoint=layers.3.mlp,layers.9.mlp`: all from one
forward), context length, batch size, LM dtype and special-token handling, as for training; the layout is in
`saejax/data/cache.py`. Rerun the same command after a kill to continue at the first missing shard; on a
complete cache it says so and does nothing. Then train from it:

  python -m experiments.train --config=pythia160m --workdir=RUN --config.source=cache --config.dataset=DIR

Exit codes: 0 written (or already complete), 2 bad input (flags, config, a folder holding another cache).
"""

from __future__ import annotations

from absl import app, flags

from experiments.cli import fail, parse_flags
from experiments.train import _CONFIG

_OUT = flags.DEFINE_string('out', None, 'Cache folder (created; a half-written cache there is continued).')
_TOKENS = flags.DEFINE_integer('tokens', None, 'Tokens to cache (rounded down to whole batches).', lower_bound=1)
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['bfloat16', 'float32'], 'Storage dtype of the activations.')
_SHARD_TOKENS = flags.DEFINE_integer(
  'shard_tokens', None, 'Tokens per shard (rounded up to whole batches; default about 512 MiB a shard).', lower_bound=1
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; flags are --config=NAME --out=DIR --tokens=N --config.FIELD=VALUE')
  if not _OUT.value:
    fail('--out is required: the cache folder to create or finish')
  if not _TOKENS.value:
    fail('--tokens is required: how many tokens to cache, e.g. --tokens=100_000_000')
  from saejax.data import SourceUnavailableError, cache_writer

  config = _CONFIG.value
  try:
    config.validate()
    summary = cache_writer.write_cache(
      config, _OUT.value, _TOKENS.value, _DTYPE.value, shard_tokens=_SHARD_TOKENS.value
    )
  except (ValueError, OSError, SourceUnavailableError) as error:
    fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
  if summary['status'] == 'complete':
    print(f'{_OUT.value} is already a complete cache of {summary["tokens"]} tokens; nothing to do')
    return
  print(
    f'{summary["status"]} {_OUT.value}: {summary["tokens_written"]} of {summary["tokens"]} tokens x '
    f'{len(config.hookpoints)} hookpoint(s) in {summary["seconds"]:.1f} s ({summary["tokens_per_s"]:,.0f} tokens/s), '
    f'{summary["shards"]} shards, {summary["bytes"] / 2**30:.2f} GiB'
  )


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
