"""Writing files so that a reader never finds a partial one.

A file vadapt writes (an exported adapter, the demo's pre-trained backbone, a JSON result) is first
written under a temporary name in the same directory, flushed to disk, then renamed over the final
name (`os.replace` is atomic within a file system). A run killed mid-write leaves the previous
file, or none, and at worst a `.<name>.tmp-*` file that no reader looks at.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path to write; on success it replaces `path`, on error it is removed.

  The temporary name keeps `path`'s extension, since some writers (np.savez) add theirs otherwise.
  """
  path = os.path.abspath(os.fspath(path))
  directory, name = os.path.split(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{name}.tmp-', suffix=os.path.splitext(name)[1],
                             dir=directory)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would differ from an ordinary open().
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any, **kwargs) -> None:
  """json.dump(obj) to `path`, atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, 'w') as f:
      json.dump(obj, f, **kwargs)
