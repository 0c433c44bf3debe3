"""vadapt.host_memory: freed C-heap pages go back to the OS."""

import sys

import pytest

from vadapt import host_memory


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc and /proc are Linux')
def test_release_returns_freed_heap_pages():
  if host_memory.resident_bytes() is None or not host_memory.release():
    pytest.skip('not glibc')
  # 192 MiB in 64 KiB blocks (below malloc's mmap threshold, so they come from the heap), one in
  # 16 kept alive: the heap's top cannot shrink on its own, only malloc_trim frees the holes.
  blocks = [bytearray(64 << 10) for _ in range(3072)]
  kept = blocks[::16]
  del blocks
  before = host_memory.resident_bytes()
  assert host_memory.release()
  after = host_memory.resident_bytes()
  assert before - after > 100 << 20, (before, after)
  assert all(len(b) == 64 << 10 and not any(b[:16]) for b in kept)  # Live blocks untouched.
