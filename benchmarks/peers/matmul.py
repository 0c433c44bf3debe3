"""The machine's matmul limit at ViT-B/16's MLP shape, through every library the interpreter has.

  python benchmarks/peers/matmul.py                         # jax and numpy (vadapt's venv)
  benchmarks/peers/.venv/bin/python benchmarks/peers/matmul.py   # torch and numpy (the peers')

(1576 x 768) @ (768 x 3072) is one MLP up-projection of ViT-B/16 at batch 8 (8 x 197 tokens).
Prints one line `RESULT {json}` with GFLOP/s per library and dtype (median of the timed runs).
"""

from __future__ import annotations

import json
import os
import statistics
import time

M, K, N = 1576, 768, 3072
THREADS = int(os.environ.get('BENCH_THREADS', '2'))


def _gflops(fn, repeats: int = 10) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 2 * M * K * N / statistics.median(times) / 1e9


def main() -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a32 = rng.standard_normal((M, K), dtype=np.float32)
  b32 = rng.standard_normal((K, N), dtype=np.float32)
  out = {'shape': [M, K, N], 'numpy_float32': _gflops(lambda: a32 @ b32)}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(THREADS)
    ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
    out['torch_float32'] = _gflops(lambda: ta @ tb)
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    out['torch_bfloat16'] = _gflops(lambda: ta16 @ tb16)
  except ImportError:
    pass
  try:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    mm = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a32), jnp.asarray(b32)
    out['jax_float32'] = _gflops(lambda: mm(ja, jb).block_until_ready())
    ja16, jb16 = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    out['jax_bfloat16'] = _gflops(lambda: mm(ja16, jb16).block_until_ready())
  except ImportError:
    pass
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
