r"""GELU's forms on XLA:CPU: vadapt's exact form (PyTorch's erf formula), jax.nn.gelu's exact form
(through erfc) and the tanh approximation, at ViT-Ti/4's MLP activation ([64 * 65, 768], f32).

  python benchmarks/gelu_forms.py --out=benchmarks/results/gelu_forms_cpu_amd.md

Each form jitted alone, median of 50 calls, two interleaved rounds; the largest difference of each
from jax.nn.gelu(approximate=False) on the same inputs.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vadapt import layers, metrics

FORMS = {'vadapt gelu_exact (erf)': layers.gelu_exact,
         'jax.nn.gelu exact (erfc)': lambda x: jax.nn.gelu(x, approximate=False),
         'tanh approximation': lambda x: jax.nn.gelu(x, approximate=True)}


def _time(fn, x, n: int = 50) -> float:
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  x = 3 * jax.random.normal(jax.random.PRNGKey(0), (64 * 65, 768), jnp.float32)
  fns = {name: jax.jit(fn) for name, fn in FORMS.items()}
  ref = np.asarray(fns['jax.nn.gelu exact (erfc)'](x))
  times = {name: [] for name in fns}
  for _ in range(args.rounds):
    for name, fn in fns.items():
      times[name].append(_time(fn, x))
  m = metrics.machine()
  lines = [f'# GELU forms on XLA:CPU\n\nMachine: {m["cpu"]}; {m["cores"]} cores; SIMD flags: '
           f'{", ".join(m["flags"])}; jax {jax.__version__}. [4160, 768] f32, ms (median of 50).\n',
           '| form | ' + ' | '.join(f'round {r + 1}' for r in range(args.rounds))
           + ' | max abs difference from jax.nn.gelu exact |',
           '|---|' + '---:|' * (args.rounds + 1)]
  for name, fn in fns.items():
    diff = float(np.abs(np.asarray(fn(x)) - ref).max())
    lines.append(f'| {name} | ' + ' | '.join(f'{t:.2f}' for t in times[name]) + f' | {diff:.1e} |')
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
