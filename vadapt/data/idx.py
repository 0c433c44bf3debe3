"""The IDX file format of MNIST and its drop-in replacements (Fashion-MNIST, KMNIST), read checked.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values in C order, big-endian; the datasets ship
it gzip-compressed (``train-images-idx3-ubyte.gz``). tfds's MNIST builders parse these files too,
but only behind a download whose checksums are those of the original archives, and they skip the
header without checking it; here the header is checked against the data, so a truncated,
corrupt or mismatched file is an error that names it.
"""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional

import numpy as np

# Type codes of the IDX format -> big-endian numpy dtypes.
_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
_GZIP_MAGIC = b'\x1f\x8b'


class IdxFormatError(ValueError):
  """A file that is not a well-formed IDX file."""


def _read_bytes(path: str) -> bytes:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'IDX file {path!r} does not exist.')
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] != _GZIP_MAGIC:
    return data
  try:
    return gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation EOFError.
    raise IdxFormatError(f'{path} is not a readable gzip file ({e}); fetch it again.') from None


def read(path: str) -> np.ndarray:
  """The array in an IDX file (gzip-compressed or not), in native byte order.

  Raises:
    FileNotFoundError: no such file.
    IdxFormatError: a bad magic number, an unknown type code, or a data length that differs
      from the one the header declares.
  """
  data = _read_bytes(path)
  if len(data) < 4 or data[:2] != b'\x00\x00' or data[2] not in _DTYPES:
    raise IdxFormatError(
        f'{path} is not an IDX file: expected the magic bytes 00 00 <type> <ndim> with type one '
        f'of {", ".join(f"{t:#04x}" for t in _DTYPES)}, found {data[:4].hex(" ") or "nothing"}.')
  dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IdxFormatError(f'{path}: the header declares {ndim} dimensions but the file ends after '
                         f'{len(data)} bytes.')
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  found = len(data) - header
  if found != expected:
    raise IdxFormatError(
        f'{path}: the header declares shape {shape} of {dtype.name} ({expected:,} bytes of data) '
        f'but the file holds {found:,} bytes: {"truncated" if found < expected else "trailing data"}.')
  return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def write(path: str, array: np.ndarray, compress: Optional[bool] = None) -> None:
  """Writes ``array`` as an IDX file, gzip-compressed if ``compress`` (default: name ends .gz)."""
  array = np.asarray(array)
  codes = {np.dtype(v).newbyteorder('='): k for k, v in _DTYPES.items()}
  if array.dtype not in codes:
    raise ValueError(f'IDX holds {sorted(str(d) for d in codes)}, not {array.dtype}.')
  big = np.dtype(_DTYPES[codes[array.dtype]])
  data = (bytes([0, 0, codes[array.dtype], array.ndim]) +
          np.asarray(array.shape, '>u4').tobytes() + array.astype(big).tobytes())
  if path.endswith('.gz') if compress is None else compress:
    data = gzip.compress(data, mtime=0)
  with open(path, 'wb') as f:
    f.write(data)
