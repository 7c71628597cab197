"""saejax.models.gguf_file against llama.cpp's own reader (gguf-py's GGUFReader): every metadata value type,
native and quantized tensors, and cut files as one ValueError. (The real SmolLM2 file is read through this
module by tests/test_gguf.py and tests/test_gguf_tokenizer.py, against transformers, which reads it with gguf-py.)"""

import gguf
import numpy as np
import pytest

from saejax.models.gguf_file import GgufFile

Q = gguf.GGMLQuantizationType


def _reference(path):
  reader = gguf.GGUFReader(path)
  return {key: field.contents() for key, field in reader.fields.items() if not key.startswith('GGUF.')}, reader


def _assert_same(path):
  fields, reader = _reference(path)
  ours = GgufFile(path)
  assert ours.fields.keys() == fields.keys()
  for key, value in fields.items():
    assert ours.fields[key] == value and type(ours.fields[key]) is type(value), key
  assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
  for mine, theirs in zip(ours.tensors, reader.tensors):
    assert mine.tensor_type == theirs.tensor_type and mine.shape == tuple(theirs.shape.tolist()), mine.name
    assert (mine.data_offset, mine.n_bytes) == (int(theirs.data_offset), int(theirs.n_bytes)), mine.name
    assert mine.data.dtype == theirs.data.dtype and mine.data.shape == theirs.data.shape, mine.name
    np.testing.assert_array_equal(mine.data, theirs.data, err_msg=mine.name)
    if mine.tensor_type != Q.I32:  # gguf.quants has no integer dequantization
      np.testing.assert_array_equal(
        gguf.quants.dequantize(mine.data, mine.tensor_type), gguf.quants.dequantize(theirs.data, theirs.tensor_type)
      )
  return ours


@pytest.fixture(scope='module')
def every_type(tmp_path_factory):
  path = tmp_path_factory.mktemp('gguf_file') / 'every_type.gguf'
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_uint8('t.u8', 250)
  writer.add_int8('t.i8', -7)
  writer.add_uint16('t.u16', 65000)
  writer.add_int16('t.i16', -32000)
  writer.add_uint32('t.u32', 4_000_000_000)
  writer.add_int32('t.i32', -2_000_000_000)
  writer.add_float32('t.f32', 1e-5)
  writer.add_uint64('t.u64', 2**63 + 5)
  writer.add_int64('t.i64', -(2**62))
  writer.add_float64('t.f64', 0.1)
  writer.add_bool('t.bool', True)
  writer.add_string('t.str', 'Ġhello — wörld ✓')
  writer.add_array('t.ints', [3, -1, 4])
  writer.add_array('t.floats', [0.5, -2.25])
  writer.add_array('t.strs', ['a', '', 'ĊĊ', 'ü'])
  writer.add_array('t.bools', [True, False])
  writer.add_array('t.empty', [])
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(6, 64)).astype(np.float32)
  writer.add_tensor('f32', weights)
  writer.add_tensor('f16', weights.astype(np.float16))
  writer.add_tensor('i32', rng.integers(-9, 9, size=(3, 5), dtype=np.int32))
  for qtype in (Q.Q8_0, Q.Q4_1, Q.BF16):
    data = gguf.quants.quantize(rng.normal(size=(4, 64)).astype(np.float32), qtype)
    writer.add_tensor(f'q_{qtype.name}', data, raw_shape=data.shape, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_every_value_and_tensor_type_reads_as_gguf_py_reads_it(every_type):
  ours = _assert_same(every_type)
  assert ours.fields['t.str'] == 'Ġhello — wörld ✓' and ours.fields['t.u64'] == 2**63 + 5
  assert [t.tensor_type for t in ours.tensors][-3:] == [Q.Q8_0, Q.Q4_1, Q.BF16]


def test_cut_and_foreign_files_are_one_value_error(every_type, tmp_path):
  data = every_type.read_bytes()
  last = GgufFile(every_type).tensors[-1]
  for cut in (0, 3, 30, 200, last.data_offset + last.n_bytes - 1):
    path = tmp_path / f'cut{cut}.gguf'
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match='truncated|not a readable GGUF|not a GGUF file') as err:
      GgufFile(path)
    assert str(path) in str(err.value) and '\n' not in str(err.value)
  swapped = tmp_path / 'big_endian.gguf'
  swapped.write_bytes(data[:4] + (3).to_bytes(4, 'big') + data[8:])
  with pytest.raises(ValueError, match='big-endian'):
    GgufFile(swapped)
