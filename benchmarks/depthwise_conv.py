r"""EfficientNet-Lite's depthwise convolutions: shifted multiply-adds against XLA's grouped conv.

  python benchmarks/depthwise_conv.py --out=benchmarks/results/depthwise_conv_cpu.md
  python benchmarks/depthwise_conv.py --image_size=32 --rounds=2      # a smoke run

The same EfficientNet-Lite0 params run with `depthwise='shifted'` (vadapt.layers.DepthwiseConv,
the CPU default) and `depthwise='conv'` (XLA's convolution with feature_group_count = channels):
the forward pass, the gradient a conv adapter or LoRA needs (with respect to the input, frozen
weights) and full fine-tuning's gradient (every weight). Everything is jitted and compiled
first, then timed round-robin (one call of each per round, the median over rounds), so machine
load hits both implementations alike. The outputs' largest relative difference is reported too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='lite0')
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--out', default=None, help='Also write the table (markdown) here.')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vadapt import metrics  # pylint: disable=g-import-not-at-top
  from vadapt.models import efficientnet  # pylint: disable=g-import-not-at-top

  load_before = os.getloadavg()
  x = jax.random.normal(jax.random.key(0), (args.batch_size, args.image_size, args.image_size, 3))
  models = {impl: efficientnet.from_variant(args.variant, num_classes=10, depthwise=impl)
            for impl in ('shifted', 'conv')}
  params = jax.jit(models['conv'].init)(jax.random.key(1), x)
  fns = {}
  for impl, m in models.items():
    loss = lambda p, x, m=m: (m.apply(p, x) ** 2).sum()
    fns[('forward', impl)] = jax.jit(lambda p, x, m=m: m.apply(p, x))
    fns[('input gradient (adapters, LoRA)', impl)] = jax.jit(jax.grad(loss, argnums=1))
    fns[('weight gradient (full fine-tuning)', impl)] = jax.jit(jax.grad(loss))
  for fn in fns.values():
    jax.block_until_ready(fn(params, x))
  times = {k: [] for k in fns}
  for _ in range(args.rounds):
    for k, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(params, x))
      times[k].append(time.perf_counter() - start)
  out = {k: fns[('forward', k)](params, x) for k in models}
  diff = float(jnp.abs(out['shifted'] - out['conv']).max() / jnp.abs(out['conv']).max())

  lines = [f'EfficientNet-{args.variant.capitalize()}, {args.image_size}px, batch '
           f'{args.batch_size}, float32; median of {args.rounds} round-robin rounds.', '',
           '| pass | XLA grouped conv img/s | shifted multiply-adds img/s | speed-up |',
           '|---|---:|---:|---:|']
  for what in dict.fromkeys(k for k, _ in fns):
    conv = args.batch_size / statistics.median(times[(what, 'conv')])
    shifted = args.batch_size / statistics.median(times[(what, 'shifted')])
    lines.append(f'| {what} | {conv:.1f} | {shifted:.1f} | {shifted / conv:.2f}x |')
  lines += ['', f'Largest logit difference between the two, relative to the largest logit: '
            f'{diff:.1e}.']
  metrics.report_benchmark('Depthwise convolutions on XLA:CPU', '\n'.join(lines), load_before,
                           metrics.machine_line(), args.out)


if __name__ == '__main__':
  main()
