"""What every entry point shares: one `error:` line and an exit code for bad input, and a flag parser that keeps
absl's and ml_collections' complaints to that one line and library INFO logs behind `--verbosity`. Imports nothing
heavy, so flag errors come back at once.

Exit codes: 0 done, 1 a run failed (non-finite values), 2 bad input (flags, config, files).
"""

from __future__ import annotations

import sys

from absl import flags

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but any flag problem is one line on stderr and exit code 2.

  Library INFO logs (Orbax's checkpoint threads, JAX's backend probing, absl) stay hidden unless absl's
  `--verbosity` flag is given (`--verbosity=0` or `1` brings them back): the console is the run's own lines.
  """
  try:
    rest = flags.FLAGS(argv)
    if not flags.FLAGS['verbosity'].present:
      flags.FLAGS.verbosity = -1  # WARNING: absl applies it to Python's root logger too (JAX logs there)
    return rest
  except flags.Error as error:
    fail(str(error).splitlines()[0])
  except (ValueError, KeyError, TypeError) as error:  # ml_collections: wrong type or unknown field
    message = str(error).strip('"\'').splitlines()[0]
    fail(f'bad config flag: {message}')
  return []
