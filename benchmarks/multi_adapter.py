r"""Many adapters on one backbone: switch latency, traces, and Parallel + AdapterDrop speed-ups.

  python benchmarks/multi_adapter.py                          # ViT-Ti/16, 224px, batch 8, 4 tasks
  python benchmarks/multi_adapter.py --variant=mu/4 --image_size=32 --repeats=3   # quick run

Adapters and heads are random (trained ones cost the same to run), so no accuracy is measured.

Switching: a jitted forward pass that takes the adapter's index as data is traced and compiled
once; every later switch is an ordinary call. Selecting by name (a static argument) traces and
compiles once per adapter. Parallel: N tasks in one pass against N single-task passes; with
drop_lowest=k the lowest k blocks run without adapters, so under Parallel they run once for all
tasks (the batch is replicated at block k).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def _median_time(fn, repeats: int) -> float:
  fn()  # Compiled (or cached) before timing.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='Ti/16')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--tasks', type=int, default=4)
  parser.add_argument('--bottleneck', type=int, default=32)
  parser.add_argument('--drops', default='0,3,6', help='drop_lowest values to measure')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from vadapt import api, multi
  from vadapt.composition import Parallel
  from vadapt.models import vit
  from vadapt.pretrained.common import flatten, unflatten

  backbone = vit.from_variant(args.variant, num_classes=None)
  x = jax.random.normal(jax.random.key(0), (args.batch_size, args.image_size, args.image_size, 3))
  bb_params = jax.jit(backbone.init)(jax.random.key(1), x[:1])['params']
  names = [f'task{i}' for i in range(args.tasks)]
  model = multi.adapt(backbone, [multi.named(backbone, n, 'houlsby', bottleneck=args.bottleneck,
                                             num_classes=10) for n in names])
  params = api.init_with_pretrained(model, bb_params, jax.random.key(2), x[:1])
  rng = np.random.default_rng(0)
  params = unflatten({k: np.asarray(v) + 0.05 * rng.normal(size=v.shape).astype(np.float32)
                      if multi.owner(k, names) else v for k, v in flatten(params).items()})
  params = jax.device_put(params)
  rows = []

  # Switching by index (data) vs by name (static).
  traces = []

  def by_index(p, x, i):
    traces.append(1)
    return model.apply({'params': p}, x, adapter=i)

  run_index = jax.jit(by_index)
  start = time.perf_counter()
  jax.block_until_ready(run_index(params, x, jnp.int32(0)))
  first_index = time.perf_counter() - start
  switch_times = []
  for k in range(args.repeats * args.tasks):
    i = jnp.int32((k + 1) % args.tasks)
    start = time.perf_counter()
    jax.block_until_ready(run_index(params, x, i))
    switch_times.append(time.perf_counter() - start)
  name_compile, name_call = [], []
  name_traces = []
  for n in names:
    fn = jax.jit(lambda p, x, n=n: (name_traces.append(1), model.apply(
        {'params': p}, x, adapter=n))[1])
    start = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    name_compile.append(time.perf_counter() - start)
    name_call.append(_median_time(lambda: jax.block_until_ready(fn(params, x)), args.repeats))
  rows.append(('switch by index (data)', f'{len(traces)} trace(s) for {1 + len(switch_times)} '
               f'calls over {args.tasks} adapters', f'first call {first_index:.2f} s',
               f'switching call {1e3 * statistics.median(switch_times):.1f} ms (median)'))
  rows.append(('switch by name (static)', f'{len(name_traces)} traces for {args.tasks} adapters',
               f'first call per adapter {statistics.median(name_compile):.2f} s',
               f'cached call {1e3 * statistics.median(name_call):.1f} ms (median)'))

  # Parallel + AdapterDrop vs one task at a time.
  for k in [int(d) for d in args.drops.split(',')]:
    singles = [jax.jit(lambda p, x, n=n: model.apply({'params': p}, x, adapter=n, drop_lowest=k))
               for n in names]
    one_by_one = _median_time(lambda: jax.block_until_ready([f(params, x) for f in singles]),
                              args.repeats)
    par = jax.jit(lambda p, x: model.apply({'params': p}, x, adapter=Parallel(*names),
                                           drop_lowest=k))
    parallel = _median_time(lambda: jax.block_until_ready(par(params, x)), args.repeats)
    rows.append((f'{args.tasks} tasks, drop_lowest={k}', f'one by one {1e3 * one_by_one:.1f} ms',
                 f'Parallel {1e3 * parallel:.1f} ms', f'speed-up {one_by_one / parallel:.2f}x'))

  header = (f'ViT-{args.variant} at {args.image_size}px, batch {args.batch_size}, {args.tasks} '
            f'Houlsby adapters (bottleneck {args.bottleneck}) with 10-class heads; '
            f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
            f'load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}, '
            f'backend {jax.default_backend()}')
  lines = [header, '', '| case | | | |', '|---|---|---|---|']
  lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
  text = '\n'.join(lines)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
