r"""DINOv2 ViT-S/14 + Fashion-MNIST with and without config.cache_features.

  python -m vadapt.artifacts          # once: the ONNX backbone and the idx files
  python benchmarks/feature_cache.py --out=benchmarks/results/feature_cache_cpu.md
  python benchmarks/feature_cache.py --method=pfeiffer --layers=8,9,10,11 \
      --out=benchmarks/results/feature_cache_top_blocks_cpu.md   # adapters on the top 4 blocks
  python benchmarks/feature_cache.py --sizes=28 --train=64 --steps=4   # a smoke run

A linear probe caches the head's input; adapters on the top blocks only (--layers) cache the
tokens entering the lowest adapted block. Each (image size, cache on/off) pair trains
configs/dinov2_fashion_mnist.py:method=<method> with
input.flip=False (the cache refuses augmentation; the uncached run gets the same input) in a fresh
process, through the trainer itself (vadapt.train.train_and_evaluate). Reported per run:
train/run_seconds (the loop after the first, compiling step), the one-off seconds of computing the
cached features, the wall time of train_and_evaluate (setup, loop, final eval), the final eval
accuracy, and the largest difference between the two runs' trained params. A measurement,
not a test: the machine is shared, so compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `python -m vadapt.main` sets (vadapt/main.py); the worker calls the trainer directly.
SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def _worker(args) -> dict:
  sys.path.insert(0, ROOT)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import dinov2_fashion_mnist  # pylint: disable=g-import-not-at-top
  from vadapt import train  # pylint: disable=g-import-not-at-top
  from vadapt.pretrained.common import flatten  # pylint: disable=g-import-not-at-top
  c = dinov2_fashion_mnist.get_config(
      f'method={args.method},size={args.size},train={args.train},steps={args.steps}')
  if args.layers:
    c.adapter.layers = tuple(int(i) for i in args.layers.split(','))
  c.input.flip = False
  c.batch_size = args.batch_size
  c.cache_features = args.cache
  c.mesh.num_devices = 1
  workdir = tempfile.mkdtemp(prefix='vadapt-feature-cache-')
  start = time.perf_counter()
  result = train.train_and_evaluate(c, workdir, export=False)
  wall = time.perf_counter() - start
  np.savez(args.delta_out, **{k.replace('/', '.'): np.asarray(v)
                              for k, v in flatten(result.delta).items()})
  m = result.metrics
  return {'size': args.size, 'cache': args.cache, 'run_seconds': m['train/run_seconds'],
          'compile_seconds': m.get('train/run_compile_seconds', float('nan')),
          'feature_seconds': m.get('train/feature_cache_seconds', 0.0), 'wall_seconds': wall,
          'accuracy': m['eval/accuracy'], 'train_loss': m['train/loss']}


def _run(args, size: int, cache: bool, delta_out: str) -> dict:
  env = dict(os.environ)
  if SCHEDULER_FLAG.split('=')[0] not in env.get('XLA_FLAGS', ''):
    env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {SCHEDULER_FLAG}'.strip()
  cmd = [sys.executable, os.path.abspath(__file__), '--worker', f'--size={size}',
         f'--cache={cache}', f'--train={args.train}', f'--steps={args.steps}',
         f'--batch_size={args.batch_size}', f'--delta_out={delta_out}',
         f'--method={args.method}', f'--layers={args.layers}']
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
  if out.returncode:
    sys.stderr.write(out.stdout[-4000:] + out.stderr[-4000:])
    raise SystemExit(f'worker failed: {" ".join(cmd)}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--sizes', default='28,56')
  p.add_argument('--train', type=int, default=1000)
  p.add_argument('--steps', type=int, default=100)
  p.add_argument('--batch_size', type=int, default=32)
  p.add_argument('--method', default='linear')
  p.add_argument('--layers', default='', help='adapted blocks, e.g. 8,9,10,11 (default: all)')
  p.add_argument('--out', default='')
  p.add_argument('--worker', action='store_true')
  p.add_argument('--size', type=int, default=28)
  p.add_argument('--cache', type=lambda s: s == 'True', default=False)
  p.add_argument('--delta_out', default='')
  args = p.parse_args(argv)
  if args.worker:
    print(json.dumps(_worker(args)))
    return

  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from vadapt import metrics  # pylint: disable=g-import-not-at-top
  load_before = os.getloadavg()
  what = ('linear probe' if args.method == 'linear' else
          f'{args.method} on blocks {args.layers or "(all)"} of 12')
  rows = []
  tmp = tempfile.mkdtemp(prefix='vadapt-feature-cache-bench-')
  for size in [int(s) for s in args.sizes.split(',')]:
    pair = {}
    for cache in (False, True):
      path = os.path.join(tmp, f'{size}_{cache}.npz')
      pair[cache] = (_run(args, size, cache, path), np.load(path))
      print(json.dumps(pair[cache][0]), flush=True)
    (off, d_off), (on, d_on) = pair[False], pair[True]
    diff = max(float(np.max(np.abs(d_off[k] - d_on[k]))) for k in d_off.files)
    rows.append((size, off, on, diff))
  load_after = os.getloadavg()

  lines = [
      f'# Feature cache: {what}, DINOv2 ViT-S/14 + Fashion-MNIST, CPU',
      '',
      f'`python benchmarks/feature_cache.py --sizes={args.sizes} --train={args.train} '
      f'--steps={args.steps} --batch_size={args.batch_size} --method={args.method}'
      f'{f" --layers={args.layers}" if args.layers else ""}`: '
      f'`configs/dinov2_fashion_mnist.py:method={args.method}`'
      f'{f" with adapter.layers=({args.layers})" if args.layers else ""}, the first '
      f'{args.train:,} train images, {args.steps} steps of batch {args.batch_size}, '
      'input.flip=False in both runs, one process per run, f32.',
      '',
      f'Machine: `{json.dumps(metrics.machine())}`. Load average (1, 5, 15 min) before '
      f'{tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)} '
      '(a shared machine: other jobs ran beside this one, so the ratios matter, not the seconds).',
      '',
      '| size | cache | train/run_seconds | features (once) s | run + features s | '
      'train_and_evaluate wall s | eval accuracy | final train loss |',
      '|---:|---|---:|---:|---:|---:|---:|---:|',
  ]
  for size, off, on, _ in rows:
    for r in (off, on):
      lines.append(f'| {size} | {"on" if r["cache"] else "off"} | {r["run_seconds"]:.2f} | '
                   f'{r["feature_seconds"]:.2f} | {r["run_seconds"] + r["feature_seconds"]:.2f} | '
                   f'{r["wall_seconds"]:.1f} | {r["accuracy"]:.4f} | {r["train_loss"]:.6f} |')
  lines += ['', '| size | loop speed-up (run_seconds off / on) | with the one-off features | '
            'max abs trained-param difference |', '|---:|---:|---:|---:|']
  for size, off, on, diff in rows:
    lines.append(f'| {size} | {off["run_seconds"] / on["run_seconds"]:.1f}x | '
                 f'{off["run_seconds"] / (on["run_seconds"] + on["feature_seconds"]):.1f}x | '
                 f'{diff:.3g} |')
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
