"""Token streams: EOS-joined chunking, determinism, exact resume, memmap rows, per-host slices, errors."""

import json
import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from saejax.data.memmap import MemmapTokenStream  # noqa: E402
from saejax.data.text import TextTokenStream  # noqa: E402
from saejax.data.tokens import StreamExhaustedError, open_token_stream, token_mask  # noqa: E402
from tests.tiny_lm import WORDS  # noqa: E402

EOS = 0  # '<|endoftext|>' is the tokenizer's first special token


def _documents(count, seed):
  rng = np.random.default_rng(seed)
  docs = []
  for _ in range(count):
    words = rng.choice(WORDS, size=int(rng.integers(0, 30)))
    docs.append(' '.join(words) + ('.' if len(words) else ''))
  return docs


def _write_jsonl(path, docs, column='text'):
  with open(path, 'w') as f:
    for doc in docs:
      f.write(json.dumps({column: doc, 'meta': 1}) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  root = tmp_path_factory.mktemp('tokens')
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=['<|endoftext|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tokenizer.train_from_iterator(_documents(200, seed=1), trainer)
  model = root / 'model'
  model.mkdir()
  tokenizer.save(str(model / 'tokenizer.json'))
  docs = _documents(60, seed=2)
  return {
    'root': root,
    'model': str(model),
    'tokenizer': tokenizer,
    'docs': docs,
    'jsonl': _write_jsonl(root / 'corpus.jsonl', docs),
  }


def _expected_tokens(corpus, docs):
  ids = []
  for doc in docs:
    ids += corpus['tokenizer'].encode(doc, add_special_tokens=False).ids + [EOS]
  return np.asarray(ids, dtype=np.int32)


def _text_stream(corpus, rows=2, length=16, **kwargs):
  kwargs = {'read_batch': 7, 'process_index': 0, 'process_count': 1} | kwargs
  return TextTokenStream(corpus['jsonl'], corpus['model'], rows, length, **kwargs)


def test_text_chunks_are_eos_joined_documents_cut_into_sequences(corpus):
  expected = _expected_tokens(corpus, corpus['docs'])
  stream = _text_stream(corpus, rows=1, length=16)
  assert stream.eos_id == EOS
  batches = list(stream)
  assert all(b.shape == (1, 16) and b.dtype == np.int32 for b in batches)
  assert len(batches) == len(expected) // 16  # the last partial sequence is dropped
  np.testing.assert_array_equal(np.concatenate(batches), expected[: len(batches) * 16].reshape(-1, 16))
  with pytest.raises(StreamExhaustedError):
    stream.next_batch()


def test_text_stream_is_deterministic_and_batch_at_replays(corpus):
  first, second = _text_stream(corpus), _text_stream(corpus)
  batches = [first.next_batch() for _ in range(5)]
  for batch in batches:
    np.testing.assert_array_equal(batch, second.next_batch())
  np.testing.assert_array_equal(first.batch_at(1), batches[1])  # backwards: replays from the start
  np.testing.assert_array_equal(first.batch_at(4), batches[4])


def test_text_resume_equals_uninterrupted_continuation(corpus):
  stream = _text_stream(corpus, rows=3, length=7)
  for _ in range(4):
    stream.next_batch()
  state = json.loads(json.dumps(stream.state_dict()))
  assert state['position'] == 4 and state['offset'] > 0  # mid-document
  continuation = [stream.next_batch() for _ in range(5)]
  resumed = _text_stream(corpus, rows=3, length=7)
  resumed.load_state_dict(state)
  for batch in continuation:
    np.testing.assert_array_equal(resumed.next_batch(), batch)
  with pytest.raises(ValueError, match='context_length'):
    _text_stream(corpus, rows=3, length=8).load_state_dict(state)


def test_text_folder_is_read_in_file_order_and_shuffle_needs_a_seed(corpus, tmp_path):
  docs = corpus['docs']
  _write_jsonl(tmp_path / 'b.jsonl', docs[30:])
  _write_jsonl(tmp_path / 'a.jsonl', docs[:30])
  expected = _expected_tokens(corpus, docs)
  stream = TextTokenStream(str(tmp_path), corpus['model'], 2, 8, process_index=0, process_count=1)
  np.testing.assert_array_equal(np.concatenate(list(stream)).reshape(-1), expected[: stream.position * 16])
  shuffled = [
    TextTokenStream(
      str(tmp_path), corpus['model'], 2, 8, shuffle_seed=3, shuffle_buffer=16, process_index=0, process_count=1
    )
    for _ in range(2)
  ]
  first, second = (np.concatenate([s.next_batch() for _ in range(6)]) for s in shuffled)
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first.reshape(-1), expected[: first.size])


def test_json_lines_read_directly_equal_the_datasets_json_builder(corpus, tmp_path):
  # `.jsonl` is read without `datasets`; the same lines as `.json` still go through its json builder.
  docs = corpus['docs'][:20] + ['naïve “quotes” ✓', 'two\nlines', '']
  lines = [json.dumps({'text': doc, 'n': i}, ensure_ascii=i % 2 == 0) for i, doc in enumerate(docs)]
  text = '\n'.join(lines[:10]) + '\n\n' + '\n'.join(lines[10:]) + '\n'  # a blank line between rows
  (tmp_path / 'direct.jsonl').write_text(text, encoding='utf-8')
  (tmp_path / 'builder.json').write_text(text, encoding='utf-8')
  direct, builder = (
    TextTokenStream(str(tmp_path / name), corpus['model'], 1, 8, process_index=0, process_count=1)
    for name in ('direct.jsonl', 'builder.json')
  )
  np.testing.assert_array_equal(np.concatenate(list(direct)), np.concatenate(list(builder)))
  assert direct.position == builder.position > 0
  (tmp_path / 'bad.jsonl').write_text(lines[0] + '\n{"text": \n')
  with pytest.raises(ValueError, match="line 2 of .*bad.jsonl' is not JSON"):
    list(TextTokenStream(str(tmp_path / 'bad.jsonl'), corpus['model'], 1, 2, process_index=0, process_count=1))
  (tmp_path / 'other.jsonl').write_text('{"body": "no text here"}\n')
  with pytest.raises(ValueError, match="no column 'text' \\(columns: body\\); pass text_column="):
    TextTokenStream(str(tmp_path / 'other.jsonl'), corpus['model'], 1, 2, process_index=0, process_count=1)


def test_text_file_builder_reads_lines_as_documents(corpus, tmp_path):
  lines = [d for d in corpus['docs'] if d][:20]
  path = tmp_path / 'corpus.txt'
  path.write_text('\n'.join(lines) + '\n')
  stream = TextTokenStream(str(path), corpus['model'], 1, 10, eos_id=5, process_index=0, process_count=1)
  expected = np.concatenate([corpus['tokenizer'].encode(d).ids + [5] for d in lines]).astype(np.int32)
  batches = list(stream)
  np.testing.assert_array_equal(np.concatenate(batches).reshape(-1), expected[: len(batches) * 10])


def _write_bin(path, rows_NxL):
  np.asarray(rows_NxL, dtype=np.uint16).tofile(path)
  return str(path)


def test_memmap_rows_in_file_order_with_random_access(tmp_path):
  rows_NxL = np.random.default_rng(0).integers(0, 50_000, size=(11, 2049))
  path = _write_bin(tmp_path / 'pile.bin', rows_NxL)
  stream = MemmapTokenStream(path, 2, process_index=0, process_count=1)
  assert stream.random_access and stream.num_batches == 5 and stream.context_length == 2049
  batches = list(stream)
  assert len(batches) == 5 and batches[0].dtype == np.int32 and batches[0].shape == (2, 2049)
  np.testing.assert_array_equal(np.concatenate(batches), rows_NxL[:10])
  np.testing.assert_array_equal(stream.batch_at(3), rows_NxL[6:8])
  np.testing.assert_array_equal(stream.batch_at(0), rows_NxL[0:2])
  with pytest.raises(StreamExhaustedError):
    stream.batch_at(5)
  resumed = MemmapTokenStream(path, 2, process_index=0, process_count=1)
  stream.seek(2)
  resumed.load_state_dict(stream.state_dict())
  np.testing.assert_array_equal(resumed.next_batch(), rows_NxL[4:6])


def test_memmap_npy_files_in_sequence_and_truncated_rows(tmp_path):
  rows_NxL = np.arange(7 * 12, dtype=np.int32).reshape(7, 12)
  np.save(tmp_path / 'a.npy', rows_NxL[:3].astype(np.uint16))
  np.save(tmp_path / 'b.npy', rows_NxL[3:])
  stream = open_token_stream([str(tmp_path / 'a.npy'), str(tmp_path / 'b.npy')], 2, 5, process_index=0, process_count=1)
  assert isinstance(stream, MemmapTokenStream) and stream.num_batches == 3
  np.testing.assert_array_equal(stream.batch_at(1), rows_NxL[2:4, :5])  # spans the two files
  np.testing.assert_array_equal(np.concatenate(list(stream)), rows_NxL[:6, :5])


@pytest.mark.parametrize('hosts', [2, 4])
def test_host_slices_union_to_the_global_batch(corpus, tmp_path, hosts):
  rows_NxL = np.random.default_rng(1).integers(0, 50_000, size=(16, 9))
  path = _write_bin(tmp_path / 'rows.bin', rows_NxL)
  memmaps = [MemmapTokenStream(path, 8, row_length=9, process_index=h, process_count=hosts) for h in range(hosts)]
  texts = [_text_stream(corpus, rows=4, length=6, process_index=h, process_count=hosts) for h in range(hosts)]
  single_memmap = MemmapTokenStream(path, 8, row_length=9, process_index=0, process_count=1)
  single_text = _text_stream(corpus, rows=4, length=6)
  for position in range(2):
    host_batches = [s.next_batch() for s in memmaps]
    assert host_batches[0].shape == (8 // hosts, 9)
    np.testing.assert_array_equal(np.concatenate(host_batches), single_memmap.batch_at(position))
    host_batches = [s.next_batch() for s in texts]
    assert host_batches[0].shape == (4 // hosts, 6)
    np.testing.assert_array_equal(np.concatenate(host_batches), single_text.next_batch())


def test_token_mask_excludes_special_ids():
  tokens_BxT = np.array([[1, 0, 5, 7], [2, 2, 0, 1]], dtype=np.int32)
  mask_BxT = token_mask(tokens_BxT, [0, 1])
  np.testing.assert_array_equal(mask_BxT, [[False, False, True, True], [True, True, False, False]])
  assert token_mask(tokens_BxT, []).all()


def test_memmap_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='no token file'):
    MemmapTokenStream(str(tmp_path / 'missing.bin'), 2, process_index=0, process_count=1)
  bad = tmp_path / 'bad.bin'
  bad.write_bytes(b'\0' * (2049 * 2 + 2))
  with pytest.raises(ValueError, match='not a whole number of rows'):
    MemmapTokenStream(str(bad), 1, process_index=0, process_count=1)
  empty = tmp_path / 'empty.bin'
  empty.write_bytes(b'')
  with pytest.raises(ValueError, match='empty'):
    MemmapTokenStream(str(empty), 1, process_index=0, process_count=1)
  np.save(tmp_path / 'floats.npy', np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match='uint16 or int32'):
    MemmapTokenStream(str(tmp_path / 'floats.npy'), 1, process_index=0, process_count=1)
  path = _write_bin(tmp_path / 'ok.bin', np.zeros((3, 2049)))
  with pytest.raises(ValueError, match='fewer than one batch'):
    MemmapTokenStream(path, 4, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='does not split over 2 hosts'):
    MemmapTokenStream(path, 3, process_index=0, process_count=2)


def test_text_errors(corpus, tmp_path):
  with pytest.raises(FileNotFoundError, match='no data'):
    TextTokenStream(str(tmp_path / 'missing.jsonl'), corpus['model'], 1, 8, process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    TextTokenStream(corpus['jsonl'], str(tmp_path), 1, 8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='needs a tokenizer'):
    TextTokenStream(corpus['jsonl'], None, 1, 8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="no column 'body'"):
    TextTokenStream(corpus['jsonl'], corpus['model'], 1, 8, text_column='body', process_index=0, process_count=1)
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  with pytest.raises(ValueError, match='no documents'):
    TextTokenStream(str(empty), corpus['model'], 1, 8, process_index=0, process_count=1)
  tiny = _write_jsonl(tmp_path / 'tiny.jsonl', ['a b'])
  with pytest.raises(ValueError, match='fewer than one batch'):
    TextTokenStream(tiny, corpus['model'], 4, 64, process_index=0, process_count=1).next_batch()
  with pytest.raises(FileNotFoundError, match='cannot open dataset'):
    TextTokenStream('nobody/no-such-dataset', corpus['model'], 1, 8, process_index=0, process_count=1)
