"""The GGUF container read in one pass: header, metadata values, tensor directory, memory-mapped tensor bytes.

gguf-py's `GGUFReader` builds a numpy view for every part of every metadata value. SmolLM2's 49,152-token
vocabulary and 48,900 merges make that about 440K views, 4.8 s per process on the 2-core Xeon, paid by every run
that opens the model or its tokenizer. The layout is simple (llama.cpp's `docs/gguf.md`: little-endian; strings
are a u64 length and UTF-8 bytes; an array is its element type, a u64 count and the elements; tensor infos hold
name, dims, type and an offset from the aligned start of the data), so this reads it with `struct` over a
memory map: 0.1 s. Dequantizing stays with gguf-py (`gguf.quants`), which takes the arrays this builds
(`GgufTensor.data`: gguf-py's layout, dims reversed, quantized rows as bytes).

A file without the magic bytes, and anything that does not parse (a cut file, a value type outside the spec, a
big-endian file), is one ValueError.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Any

import numpy as np

MAGIC = b'GGUF'
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
# value type -> (struct format, numpy dtype) of the fixed-size types; 8 (string) and 9 (array) are read apart.
_SCALARS = {
  0: ('<B', np.uint8),
  1: ('<b', np.int8),
  2: ('<H', np.uint16),
  3: ('<h', np.int16),
  4: ('<I', np.uint32),
  5: ('<i', np.int32),
  6: ('<f', np.float32),
  7: ('<?', np.bool_),
  10: ('<Q', np.uint64),
  11: ('<q', np.int64),
  12: ('<d', np.float64),
}
# ggml tensor types kept in their own dtype (as gguf-py does); every other type is rows of quantized blocks.
_NATIVE_TENSORS = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclasses.dataclass(frozen=True)
class GgufTensor:
  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
  n_bytes: int
  data_offset: int  # from the start of the file
  data: np.ndarray  # a read-only view of the file in gguf-py's layout


class GgufFile:
  """A parsed GGUF file: `fields` (key -> Python value, arrays as lists), `tensors`, `data` (the file's bytes).

  Raises ValueError (one line) for a file that is not GGUF or does not parse, and for a tensor that ends past the
  end of the file.
  """

  def __init__(self, path: str | os.PathLike):
    import gguf  # the tensor types' block sizes; the caller reports a missing package

    with open(path, 'rb') as f:
      self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b''
    self.path, self.size = os.fspath(path), len(self._map)
    self.data = np.frombuffer(self._map, np.uint8)
    if self._map[:4] != MAGIC:
      raise ValueError(
        f'{self.path} is not a GGUF file (it starts with {bytes(self._map[:4])!r}, not {MAGIC!r}); pass a llama.cpp '
        f'.gguf'
      )
    try:
      self.fields, infos, header_end = self._parse()
    except (struct.error, UnicodeDecodeError, IndexError, OverflowError, ValueError) as err:
      raise ValueError(
        f'{self.path} ({self.size} bytes) is not a readable GGUF file ({type(err).__name__}: {err}); it is probably '
        f'truncated or corrupt: download it again'
      ) from None
    alignment = int(self.fields.get('general.alignment', DEFAULT_ALIGNMENT))
    start = -(-header_end // alignment) * alignment
    self.tensors = [self._tensor(gguf, start, *info) for info in infos]

  def get(self, key: str, default=None):
    return self.fields.get(key, default)

  def _parse(self):
    _, version, num_tensors, num_fields = struct.unpack_from('<4sIQQ', self._map, 0)
    if version not in (2, 3):
      swapped = 'a big-endian file' if version > 0xFFFF else f'version {version}'
      raise ValueError(f'{swapped}; saejax reads little-endian GGUF versions 2 and 3')
    self._offset = 24
    fields = {}
    for _ in range(num_fields):
      key = self._string()
      fields[key] = self._value(self._unpack('<I'))
    infos = []
    for _ in range(num_tensors):
      name = self._string()
      dims = tuple(self._unpack('<Q') for _ in range(self._unpack('<I')))
      infos.append((name, dims, self._unpack('<I'), self._unpack('<Q')))
    return fields, infos, self._offset

  def _unpack(self, fmt: str):
    (value,) = struct.unpack_from(fmt, self._map, self._offset)
    self._offset += struct.calcsize(fmt)
    return value

  def _string(self) -> str:
    length = self._unpack('<Q')
    end = self._offset + length
    if end > self.size:
      raise ValueError(f'a string of {length} bytes at byte {self._offset} runs past the end')
    text = self._map[self._offset : end].decode('utf-8')
    self._offset = end
    return text

  def _value(self, kind: int):
    if kind in _SCALARS:
      return self._unpack(_SCALARS[kind][0])
    if kind == _STRING:
      return self._string()
    if kind != _ARRAY:
      raise ValueError(f'value type {kind} at byte {self._offset} is not in the GGUF spec')
    item, count = self._unpack('<I'), self._unpack('<Q')
    if item in _SCALARS:  # numbers in one read
      dtype = np.dtype(_SCALARS[item][1]).newbyteorder('<')
      values = np.frombuffer(self._map, dtype, count, self._offset)
      self._offset += values.nbytes
      return values.tolist()
    return [self._value(item) for _ in range(count)]

  def _tensor(self, gguf, start: int, name: str, dims: tuple[int, ...], raw_type: int, offset: int) -> GgufTensor:
    tensor_type = gguf.GGMLQuantizationType(raw_type)
    block, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
    n_elements = int(np.prod(dims, dtype=np.int64))
    n_bytes = n_elements * type_size // block
    begin, layout = start + offset, tuple(reversed(dims))
    if begin + n_bytes > self.size:
      raise ValueError(
        f'{self.path} is truncated: tensor {name!r} ends at byte {begin + n_bytes} but the file has {self.size} '
        f'bytes; download it again'
      )
    if raw_type in _NATIVE_TENSORS:
      data = np.frombuffer(self._map, _NATIVE_TENSORS[raw_type], n_elements, begin).reshape(layout)
    else:  # rows of blocks, as bytes: [..., row elements / block * type size]
      row_bytes = layout[-1] // block * type_size
      data = self.data[begin : begin + n_bytes].reshape(*layout[:-1], row_bytes)
    return GgufTensor(name, tensor_type, dims, n_bytes, begin, data)
