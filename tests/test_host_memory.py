"""vadapt.host_memory: freed C-heap pages go back to the OS."""

import sys

import flax
import jax
import numpy as np
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


def test_to_device_moves_every_leaf_and_empties_the_host_tree():
  rng = np.random.default_rng(0)
  host = {'a': rng.normal(size=(3, 4)).astype(np.float32),
          'b': {'c': np.arange(5, dtype=np.int32), 'd': {'e': np.float32(2.0)}},
          'f': flax.core.freeze({'g': np.ones((2,), np.float16)})}
  want = jax.tree.map(np.array, jax.tree.map(np.asarray, {**host, 'f': dict(host['f'])}))
  inner = host['b']
  out = host_memory.to_device(host)
  assert not host and not inner  # The host copies were dropped as they moved.
  assert jax.tree.structure(out) == jax.tree.structure(want)
  for got, expected in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    assert isinstance(got, jax.Array) and got.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(got), expected)
