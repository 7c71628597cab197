"""`saejax.models.load_tokenizer` on GGUF files: equal to transformers' GGUF tokenizer on the real SmolLM2 file.

The real file's tokenizer is built once per module (both ours and transformers'); the flag, added-token and
error cases use tiny GGUF files written here with `gguf.GGUFWriter`, holding only tokenizer metadata.
"""

import json
import os

import numpy as np
import pytest

from saejax.data import text as text_lib
from saejax.models import load_tokenizer
from saejax.models import tokenizer as tokenizer_lib

TEXTS = {
  'shakespeare': (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    'The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles'
  ),
  'modern': "The startup's CEO said they'd ship v2.0 next week -- \"we're on track,\" she told reporters (again).",
  'python': (
    'def squares(x):\n    """Squares."""\n    if x > 0:\n\treturn [i ** 2 for i in range(x)]  # tab-indented\n'
    '    return {"a": 1, \'b\': [2, 3]}\n\n\nclass A(object):\n        pass\n'
  ),
  'numbers': '1234567 3.14159 -42 1e-5 2024-01-01 $1,000,000.00 0x1F 99% ²³ ½ ٣',
  'whitespace': 'a  1  b   c\n\n\n  d\t\t e \r\n  \n    x  2024\n\n  7    ',
  'unicode': 'Café déjà vu — naïve façade. ñ, ß, ø, Ω. 😀🎉👍🏽 日本語のテキスト 中文 한국어 Ελληνικά русский',
  'chat': '<|im_start|>user\nHi<|im_end|>',
  'endoftext': 'one document<|endoftext|>another one<|im_end|>\n',
  'edges': ' leading space, trailing ',
  'empty': '',
}
FOX = 'The quick brown fox jumps over the lazy dog.'
FOX_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]


@pytest.fixture(scope='module')
def real(smollm2_gguf):
  """(our tokenizer, transformers' GGUF tokenizer, the file) for the real SmolLM2 GGUF."""
  ours = load_tokenizer(smollm2_gguf)
  transformers = pytest.importorskip('transformers')
  reference = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
  return ours, reference, smollm2_gguf


def test_notes_example_and_special_ids(smollm2_gguf):
  tokenizer = load_tokenizer(smollm2_gguf)
  assert tokenizer.encode(FOX).ids == FOX_IDS
  assert tokenizer.encode(FOX, add_special_tokens=True).ids == FOX_IDS  # the file adds no BOS
  assert tokenizer.get_vocab_size() == 49152
  assert tokenizer_lib.gguf_special_ids(smollm2_gguf) == {'bos': 1, 'eos': 2, 'unk': 0, 'pad': 2}
  assert [tokenizer.id_to_token(i) for i in range(3)] == ['<|endoftext|>', '<|im_start|>', '<|im_end|>']


@pytest.mark.parametrize('name', list(TEXTS))
@pytest.mark.parametrize('add_special_tokens', [False, True])
def test_encode_decode_equal_transformers(real, name, add_special_tokens):
  ours, reference, _ = real
  text = TEXTS[name]
  ids = ours.encode(text, add_special_tokens=add_special_tokens).ids
  assert ids == reference.encode(text, add_special_tokens=add_special_tokens)
  for skip in (False, True):
    assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
  assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless


def test_special_tokens_stay_whole(real):
  ours, _, _ = real
  assert ours.encode(TEXTS['chat']).ids == [1, 4093, 198, 26843, 2]
  assert ours.encode('<|endoftext|>').ids == [0]
  assert ours.decode([1, 4093, 198, 26843, 2], skip_special_tokens=True) == 'user\nHi'
  assert ours.encode_batch([FOX, TEXTS['chat']])[0].ids == FOX_IDS


def test_same_tokenizer_as_transformers_builds(real):
  ours, reference, _ = real
  assert json.loads(ours.to_str()) == json.loads(reference.backend_tokenizer.to_str())


def test_llama_cpp_splits(real):
  """llama.cpp's `smollm` splits digits off first; transformers' conversion does not (whitespace before digits)."""
  ours, reference, path = real
  llama_cpp = load_tokenizer(path, reference='llama.cpp')
  assert ours.encode('a  1').ids == reference.encode('a  1') == [81, 216, 216, 33]
  assert llama_cpp.encode('a  1').ids == [81, 256, 33]  # 'a', 'ĠĠ', '1'
  for text in (FOX, TEXTS['shakespeare'], TEXTS['chat'], '1234567 3.14159'):
    assert llama_cpp.encode(text).ids == ours.encode(text).ids
  with pytest.raises(ValueError, match='reference='):
    load_tokenizer(path, reference='spm')


def test_sources_folder_registry_and_tokenizer_json(real, tmp_path):
  ours, _, path = real
  ids = ours.encode(TEXTS['modern']).ids
  folder = tmp_path / 'model'
  folder.mkdir()
  os.symlink(path, folder / path.name)
  assert load_tokenizer(folder).encode(TEXTS['modern']).ids == ids
  assert load_tokenizer('smollm2').encode(TEXTS['modern']).ids == ids
  ours.save(str(folder / 'tokenizer.json'))  # a folder with tokenizer.json prefers it
  assert tokenizer_lib.find_gguf(folder) is None
  assert load_tokenizer(folder).encode(TEXTS['modern']).ids == ids
  assert load_tokenizer(folder / 'tokenizer.json').encode(TEXTS['modern']).ids == ids
  os.symlink(path, folder / 'second.gguf')
  (folder / 'tokenizer.json').unlink()
  with pytest.raises(ValueError, match='2 .gguf files'):
    load_tokenizer(folder)
  with pytest.raises(FileNotFoundError, match='no tokenizer'):
    load_tokenizer(tmp_path / 'missing')


def test_text_stream_over_gguf(real, tmp_path):
  ours, reference, path = real
  documents = [TEXTS['shakespeare'], TEXTS['python'], TEXTS['unicode'], FOX]
  data = tmp_path / 'docs.jsonl'
  data.write_text(''.join(json.dumps({'text': d}) + '\n' for d in documents))
  expected = np.concatenate([reference.encode(d, add_special_tokens=False) + [2] for d in documents])
  stream = text_lib.TextTokenStream(str(data), str(path), 2, 16, process_index=0, process_count=1)
  assert stream.eos_id == 2
  got = np.concatenate([stream.batch_at(p).reshape(-1) for p in range(len(expected) // 32)])
  np.testing.assert_array_equal(got, expected[: len(got)])
  assert (got == 2).sum() >= 2  # the EOS between documents is in there


def _write_gguf(path, *, model='gpt2', pre='gpt-2', add_bos=None, add_eos=None, add_space_prefix=None):
  """A GGUF holding only tokenizer metadata: control <|endoftext|> <s> </s>, user-defined <think>, the bytes."""
  import gguf

  alphabet = list(tokenizer_lib._byte_alphabet().values())
  words = ['he', 'll', 'hell', 'hello', 'Ġw', 'or', 'Ġwor', 'ld', 'Ġworld']
  tokens = ['<|endoftext|>', '<s>', '</s>', '<think>', *alphabet, *words]
  types = [3, 3, 3, 4] + [1] * (len(alphabet) + len(words))
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_tokenizer_model(model)
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(['h e', 'l l', 'he ll', 'hell o', 'Ġ w', 'o r', 'Ġw or', 'l d', 'Ġwor ld'])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_unk_token_id(0)
  for flag, add in ((add_bos, writer.add_add_bos_token), (add_eos, writer.add_add_eos_token)):
    if flag is not None:
      add(flag)
  if add_space_prefix is not None:
    writer.add_add_space_prefix(add_space_prefix)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_tiny_gguf_flags_and_added_tokens(tmp_path):
  plain = load_tokenizer(_write_gguf(tmp_path / 'plain.gguf'))
  hello, world = plain.token_to_id('hello'), plain.token_to_id('Ġworld')
  assert plain.encode('hello world', add_special_tokens=True).ids == [hello, world]
  both = load_tokenizer(_write_gguf(tmp_path / 'both.gguf', add_bos=True, add_eos=True, add_space_prefix=False))
  assert both.encode('hello world', add_special_tokens=True).ids == [1, hello, world, 2]
  assert both.encode('hello world', add_special_tokens=False).ids == [hello, world]
  bos = load_tokenizer(_write_gguf(tmp_path / 'bos.gguf', add_bos=True, add_eos=False))
  assert bos.encode('hello', add_special_tokens=True).ids == [1, hello]
  ids = plain.encode('hello<think>world<s>').ids
  assert ids == [hello, 3, plain.token_to_id('w'), plain.token_to_id('or'), plain.token_to_id('ld'), 1]
  assert plain.decode(ids, skip_special_tokens=True) == 'hello<think>world'  # user-defined is not special
  assert plain.decode(ids, skip_special_tokens=False) == 'hello<think>world<s>'
  special = text_lib.load_tokenizer(str(tmp_path / 'plain.gguf'))
  assert special[1] == str(tmp_path / 'plain.gguf')
  assert text_lib.resolve_eos_id(special[0], special[1]) == 2


def test_tiny_gguf_matches_transformers_with_flags(tmp_path):
  transformers = pytest.importorskip('transformers')
  path = _write_gguf(tmp_path / 'flags.gguf', add_bos=True, add_eos=True)
  reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  ours = load_tokenizer(path)
  for text in ('hello world', 'hello<think> world</s>', ''):
    for add in (False, True):
      assert ours.encode(text, add_special_tokens=add).ids == reference.encode(text, add_special_tokens=add)


@pytest.mark.parametrize(
  ('kwargs', 'match'),
  [
    ({'pre': 'no-such-pre'}, "tokenizer.ggml.pre='no-such-pre'"),
    ({'pre': None}, 'tokenizer.ggml.pre=None'),
    ({'model': 'llama'}, "tokenizer.ggml.model='llama' \\(SentencePiece\\)"),
    ({'model': 'bert'}, "tokenizer.ggml.model='bert'"),
  ],
)
def test_bad_gguf_raises_one_line(tmp_path, kwargs, match):
  path = _write_gguf(tmp_path / 'bad.gguf', **kwargs)
  with pytest.raises(ValueError, match=match) as err:
    load_tokenizer(path)
  assert '\n' not in str(err.value)
  with pytest.raises(ValueError, match=match):  # the data pipeline's loader says the same
    text_lib.load_tokenizer(str(path))


def test_not_a_gguf_raises_one_line(tmp_path):
  path = tmp_path / 'fake.gguf'
  path.write_bytes(b'not a gguf file at all')
  with pytest.raises(ValueError, match='not a GGUF file') as err:
    load_tokenizer(path)
  assert '\n' not in str(err.value)
