r"""Would fusing the frozen q/k/v kernels into one matmul speed up a ViT step on XLA:CPU?

  python benchmarks/qkv_fusion.py --out=benchmarks/results/qkv_fusion_cpu_amd.md

flax's attention projects q, k and v with three DenseGeneral einsums ([T, D] @ [D, H, D/H]). The
alternative: one [T, D] @ [D, 3D] matmul on a kernel concatenated once (the kernels are frozen, so
that could happen once per compile), split into q, k, v; and, for the adapters' backward pass
(frozen weights: input gradients only), one [T, 3D] @ [3D, D] product instead of three summed.
Each variant is jitted alone and timed (median of 30 calls) at the peer comparison's shapes
(ViT-Ti/4 at 32 px, batch 64; ViT-B/16 at 224 px, batch 8), in two interleaved rounds.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {'ViT-Ti/4, b64': (64 * 65, 192, 3), 'ViT-B/16, b8': (8 * 197, 768, 12)}


def _time(fn, *args, n: int = 30) -> float:
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def measure(tokens: int, width: int, heads: int) -> dict[str, float]:
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(keys[0], (tokens, width))
  kernels = [jax.random.normal(keys[i + 1], (width, heads, width // heads)) for i in range(3)]
  fused = jnp.concatenate([k.reshape(width, width) for k in kernels], 1)
  grads = jax.random.normal(keys[4], (3, tokens, heads, width // heads))
  three = jax.jit(lambda x, *ks: [jnp.einsum('td,dhk->thk', x, k) for k in ks])
  one = jax.jit(lambda x, w: jnp.split(x @ w, 3, axis=1))
  three_dx = jax.jit(lambda g, *ks: sum(jnp.einsum('thk,dhk->td', g[i], k)
                                        for i, k in enumerate(ks)))
  one_dx = jax.jit(lambda g, w: g.transpose(1, 0, 2, 3).reshape(tokens, 3 * width) @ w.T)
  return {'forward, three einsums': _time(three, x, *kernels),
          'forward, one fused matmul': _time(one, x, fused),
          'input gradient, three einsums': _time(three_dx, grads, *kernels),
          'input gradient, one fused matmul': _time(one_dx, grads, fused)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  from vadapt import metrics  # pylint: disable=g-import-not-at-top
  rows = {name: [] for name in SHAPES}
  for _ in range(args.rounds):
    for name, shape in SHAPES.items():
      rows[name].append(measure(*shape))
  m = metrics.machine()
  lines = [f'# Fused q/k/v projections on XLA:CPU\n\nMachine: {m["cpu"]}; {m["cores"]} cores; '
           f'SIMD flags: {", ".join(m["flags"])}; jax {jax.__version__}. Milliseconds, median of '
           f'30 calls, each round shown.\n', '| shapes | op | ' + ' | '.join(
               f'round {r + 1}' for r in range(args.rounds)) + ' |',
           '|---|---|' + '---:|' * args.rounds]
  for name, rounds in rows.items():
    for op in rounds[0]:
      lines.append(f'| {name} | {op} | ' + ' | '.join(f'{r[op]:.2f}' for r in rounds) + ' |')
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
