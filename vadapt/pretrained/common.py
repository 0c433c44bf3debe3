"""Shared checks for checkpoint loaders: one error that lists every difference."""

from __future__ import annotations

import os
from typing import Any, Mapping

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
