"""Shared checks for checkpoint loaders: one error that lists every difference."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np
from flax import traverse_util


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors do not line up with the model's parameters."""


def require_file(path: str | os.PathLike, what: str = 'checkpoint') -> str:
  """Returns the path as a string, or raises FileNotFoundError naming it."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{what} not found: {path!r} does not exist.')
  return path


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


# safetensors dtype names -> numpy dtypes, including those numpy lacks (ml_dtypes ships with JAX).
SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def read_safetensors(file: str) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file (writable numpy arrays), read one tensor at a time.

  The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
  data_offsets) and the raw little-endian data. safetensors.numpy.load_file reads the whole file
  into one buffer and copies each tensor out of it, and safe_open maps the file, so either way the
  process holds the weights twice at its peak (the mapped pages count in its resident set); here
  each tensor is read straight into its own array. numpy-less dtypes (bfloat16, float8) come back
  as ml_dtypes arrays. A malformed file raises ValueError naming what is wrong.
  """
  size = os.path.getsize(file)
  with open(file, 'rb') as f:
    length = int.from_bytes(f.read(8), 'little')
    if size < 8 or length > size - 8:
      raise ValueError(f'header length {length} does not fit in a {size}-byte file')
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'its header is not JSON: {e}') from None
    if not isinstance(header, dict):
      raise ValueError(f'its header is a JSON {type(header).__name__}, expected an object')
    base = 8 + length
    out = {}
    for name, info in header.items():
      if name == '__metadata__':
        continue
      try:
        dtype = np.dtype(SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
        shape = tuple(int(d) for d in info['shape'])
        start, end = (int(o) for o in info['data_offsets'])
      except KeyError as e:
        raise ValueError(f'tensor {name}: unsupported dtype or missing field {e}') from None
      except (TypeError, ValueError) as e:
        raise ValueError(f'tensor {name} has a malformed entry {info!r}') from e
      if end - start != math.prod(shape) * dtype.itemsize or start < 0 or base + end > size:
        raise ValueError(f'tensor {name} ({info["dtype"]} {list(shape)}) has data_offsets '
                         f'[{start}, {end}] that do not match its size or the file')
      buffer = bytearray(end - start)
      f.seek(base + start)
      f.readinto(buffer)
      out[name] = np.frombuffer(buffer, dtype=dtype).reshape(shape)
  return out


def consume(tensors: dict[str, Any]) -> Iterator[tuple[str, Any]]:
  """Yields (name, array) in order, removing each from `tensors` first.

  For the loops that convert a file's tensors: once converted (transposed, reshaped), a tensor's
  file copy is dropped instead of living on until the whole loop ends, so reading a checkpoint
  holds about one copy of the weights at a time rather than two.
  """
  for key in list(tensors):
    yield key, tensors.pop(key)


def check_matches(expected: Mapping[str, Any], found: Mapping[str, Any], *,
                  source: str = 'checkpoint', max_listed: int = 20) -> None:
  """Raises CheckpointMismatchError unless `found` has exactly the keys and shapes of `expected`.

  Both arguments are flat {'path': array-or-ShapeDtypeStruct} maps. The message lists missing
  keys, unexpected keys and shape mismatches together, so one run shows everything to fix.
  """
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  mismatched = sorted(
      (k, tuple(np.shape(expected[k])), tuple(np.shape(found[k])))
      for k in set(expected) & set(found)
      if tuple(np.shape(expected[k])) != tuple(np.shape(found[k])))
  if not (missing or unexpected or mismatched):
    return

  def listed(items):
    items = list(items)
    more = f'\n    ... and {len(items) - max_listed} more' if len(items) > max_listed else ''
    return ''.join(f'\n    {item}' for item in items[:max_listed]) + more

  parts = [f'{source} does not match the model:']
  if missing:
    parts.append(f'  missing keys ({len(missing)}):{listed(missing)}')
  if unexpected:
    parts.append(f'  unexpected keys ({len(unexpected)}):{listed(unexpected)}')
  if mismatched:
    parts.append(f'  shape mismatches ({len(mismatched)}, key: expected vs found):' + listed(
        f'{k}: {e} vs {f}' for k, e, f in mismatched))
  raise CheckpointMismatchError('\n'.join(parts))


def recover_npz_dtype(name: str, value: np.ndarray, path: str) -> np.ndarray:
  """An array read from an .npz with its real dtype: bfloat16 comes back from `np.savez` as void.

  numpy has no bfloat16, so `np.savez` records ml_dtypes' bfloat16 as 2-byte void ('|V2'); the
  bytes are intact, and big_vision's own loader views them as bfloat16 again, as this does.
  """
  if value.dtype.kind != 'V' or value.dtype.fields is not None:
    return value
  if value.dtype.itemsize != 2:
    raise ValueError(f'{path!r}: array {name!r} has the untyped dtype {value.dtype.str!r}; only '
                     "2-byte ones (bfloat16 as written by np.savez, '|V2') can be read.")
  return value.view(ml_dtypes.bfloat16)
