"""The machine's matmul limit at ViT-B/16's MLP shape, through every library the interpreter has.

  python benchmarks/peers/matmul.py                         # jax and numpy (vadapt's venv)
  benchmarks/peers/.venv/bin/python benchmarks/peers/matmul.py   # torch and numpy (the peers')
  python benchmarks/peers/matmul.py --layouts --shape=ti4   # + the backward pass's two layouts

(1576 x 768) @ (768 x 3072) is one MLP up-projection of ViT-B/16 at batch 8 (8 x 197 tokens);
`--shape=ti4` is ViT-Ti/4's at batch 64 ((64 x 65) x 192 @ 192 x 768). Prints one line
`RESULT {json}` with GFLOP/s per library and dtype (median of the timed runs).

`--layouts` adds, in float32, the same Dense layer's two backward-pass products with the same
FLOPs: the input gradient dy @ W^T (`_dgrad`, what every method's backward pass runs through the
frozen backbone) and the weight gradient x^T @ dy (`_wgrad`, what full fine-tuning adds for each
trained weight), next to the forward x @ W (`_fwd`); for jax also under XLA:CPU's individual
YNNPACK dots (`jax_ynn_*`, what `config.xla_cpu_individual_dots` sets). They run in `--rounds`
interleaved rounds (each the median of 5 calls; the result the median over rounds), as this
machine's speed drifts between seconds. A layout far below the forward's rate is where a train
step loses against the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

SHAPES = {'b16': (1576, 768, 3072), 'ti4': (4160, 192, 768), 'tiny': (24, 8, 16)}
THREADS = int(os.environ.get('BENCH_THREADS', '2'))


def _gflops(fn, flops: float, repeats: int = 10) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return flops / statistics.median(times) / 1e9


def _layout_operands(m: int, k: int, n: int) -> dict:
  """{layout: (lhs, rhs)} for one Dense layer x[m,k] @ w[k,n], all three with 2mkn FLOPs."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((m, k), dtype=np.float32)
  w = rng.standard_normal((k, n), dtype=np.float32)
  dy = rng.standard_normal((m, n), dtype=np.float32)
  return {'fwd': (x, w), 'dgrad': (dy, w), 'wgrad': (x, dy)}


# dot_general dimension numbers per layout: contract x's features with w's rows (forward), dy's
# features with w's columns (input gradient), x's tokens with dy's tokens (weight gradient).
_CONTRACT = {'fwd': ((1,), (0,)), 'dgrad': ((1,), (1,)), 'wgrad': ((0,), (0,))}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--shape', choices=sorted(SHAPES), default='b16')
  parser.add_argument('--layouts', action='store_true',
                      help='also time the backward pass\'s input- and weight-gradient layouts')
  parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds of --layouts')
  args = parser.parse_args(argv)
  m, k, n = SHAPES[args.shape]
  flops = 2 * m * k * n

  rng = np.random.default_rng(0)
  a32 = rng.standard_normal((m, k), dtype=np.float32)
  b32 = rng.standard_normal((k, n), dtype=np.float32)
  out = {'shape': [m, k, n], 'numpy_float32': _gflops(lambda: a32 @ b32, flops)}
  layouts = _layout_operands(m, k, n) if args.layouts else {}
  timed = {}  # The layouts' products, timed in interleaved rounds below.
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(THREADS)
    ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
    out['torch_float32'] = _gflops(lambda: ta @ tb, flops)
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    out['torch_bfloat16'] = _gflops(lambda: ta16 @ tb16, flops)
    # Autograd's own forms: dy @ w.T and x.T @ dy on strided views (BLAS transpose flags, no copy).
    torch_forms = {'fwd': lambda a, b: a @ b, 'dgrad': lambda a, b: a @ b.T,
                   'wgrad': lambda a, b: a.T @ b}
    for layout, (lhs, rhs) in layouts.items():
      tl, tr = torch.from_numpy(lhs), torch.from_numpy(rhs)
      timed[f'torch_float32_{layout}'] = lambda f=torch_forms[layout], tl=tl, tr=tr: f(tl, tr)
  except ImportError:
    pass
  try:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    mm = jax.jit(jnp.matmul)
    ja, jb = jnp.asarray(a32), jnp.asarray(b32)
    out['jax_float32'] = _gflops(lambda: mm(ja, jb).block_until_ready(), flops)
    ja16, jb16 = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    out['jax_bfloat16'] = _gflops(lambda: mm(ja16, jb16).block_until_ready(), flops)
    if layouts:
      import ml_collections  # pylint: disable=g-import-not-at-top
      from vadapt import experiment  # pylint: disable=g-import-not-at-top
      individual_dots = experiment.compiler_options(
          ml_collections.ConfigDict({'xla_cpu_individual_dots': True}))
      for prefix, options in (('jax', None), ('jax_ynn', individual_dots)):
        for layout, (lhs, rhs) in layouts.items():
          dims = (_CONTRACT[layout], ((), ()))
          jl, jr = jnp.asarray(lhs), jnp.asarray(rhs)
          fn = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims),
                       compiler_options=options).lower(jl, jr).compile()
          timed[f'{prefix}_float32_{layout}'] = (
              lambda fn=fn, jl=jl, jr=jr: fn(jl, jr).block_until_ready())
  except ImportError:
    pass
  # Rounds over every product in turn, so that the machine's drift reaches them all alike; each
  # product's rate is its median over the rounds.
  rates = {name: [] for name in timed}
  for _ in range(args.rounds if timed else 0):
    for name, fn in timed.items():
      rates[name].append(_gflops(fn, flops, repeats=5))
  out.update({name: statistics.median(r) for name, r in rates.items()})
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
