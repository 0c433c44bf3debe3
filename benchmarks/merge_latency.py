r"""Inference latency of weight-space adapters, unmerged and merged, against the bare backbone.

  python benchmarks/merge_latency.py                    # ViT-B/16, 224px, batch 8, f32
  python benchmarks/merge_latency.py --variant=mu/4 --image_size=32 --rounds=2   # a smoke run

For each method (LoRA and DoRA on query/value at rank 8, SSF, (IA)³, their default placements)
two models serve the same images: the adapted model (the adapters run next to, or after, their
layers: the overhead of serving unmerged) and the bare backbone on vadapt.merge.merge's params
(the adapters folded into the kernels: no extra modules, so it should cost what the bare backbone
costs). All forwards are jitted and compiled first, then timed round-robin (one call of each per
round, the median over rounds), so a change in machine load hits every row alike. Adapters get
trained-looking random values; the table also gives the merged model's largest relative logit
difference from the unmerged one, and how long merging took (host float64, see vadapt.merge).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

METHODS = ('lora', 'dora', 'ssf', 'ia3')


def _perturbed(params, method, seed=0):
  """Every leaf of `method`'s adapters moved off its initial value (B = 0 would fold to W)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vadapt.pretrained.common import flatten, unflatten  # pylint: disable=g-import-not-at-top
  flat = flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  return unflatten({k: v + 0.01 * jax.random.normal(key, v.shape) if f'/{method}/' in k else v
                    for key, (k, v) in zip(keys, flat.items())})


def run(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from vadapt import api, merge  # pylint: disable=g-import-not-at-top
  from vadapt.models import vit  # pylint: disable=g-import-not-at-top

  backbone = vit.from_variant(args.variant, num_classes=1000)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(args.batch_size, args.image_size, args.image_size, 3)), jnp.float32)
  bare = jax.jit(lambda r: backbone.init(r, images[:1])['params'])(jax.random.PRNGKey(0))
  head = bare['head']['kernel']  # A random head (it starts at zero), so the logits compare.
  bare['head']['kernel'] = 0.02 * jax.random.normal(jax.random.PRNGKey(2), head.shape, head.dtype)
  rows = [{'name': 'bare backbone', 'model': backbone, 'params': bare, 'merge_s': None}]
  for method in args.methods.split(','):
    if method not in METHODS:
      sys.exit(f'Unknown method {method!r}; expected some of {",".join(METHODS)}.')
    adapted = api.adapt(backbone, method, **(
        {'rank': args.rank} if method in ('lora', 'dora') else {}))
    params = _perturbed(api.init_with_pretrained(adapted, bare, jax.random.PRNGKey(1),
                                                 images[:1]), method)
    start = time.perf_counter()
    merged = jax.block_until_ready(merge.merge(adapted, params))
    merge_s = time.perf_counter() - start
    if jax.tree.map(jnp.shape, merged) != jax.tree.map(jnp.shape, bare):
      sys.exit(f'{method}: merged params are not the bare backbone\'s tree.')
    rows.append({'name': f'{method} unmerged', 'model': adapted, 'params': params,
                 'merge_s': None, 'method': method})
    rows.append({'name': f'{method} merged', 'model': backbone, 'params': merged,
                 'merge_s': merge_s, 'method': method})

  for row in rows:
    model = row['model']
    fwd = jax.jit(lambda p, x, model=model: model.apply({'params': p}, x))
    start = time.perf_counter()
    row['compiled'] = fwd.lower(row['params'], images).compile()
    row['compile_s'] = time.perf_counter() - start
    row['logits'] = np.asarray(row['compiled'](row['params'], images))  # Warm-up call.
    row['params_count'] = sum(x.size for x in jax.tree.leaves(row['params']))
    row['times'] = []
  for _ in range(args.rounds):
    for row in rows:
      start = time.perf_counter()
      jax.block_until_ready(row['compiled'](row['params'], images))
      row['times'].append(time.perf_counter() - start)
  unmerged = {r['method']: r for r in rows if r['name'].endswith('unmerged')}
  for row in rows:
    row['sec'] = float(np.median(row['times']))
    if row['name'].endswith(' merged'):
      ref = unmerged[row['method']]['logits']
      row['rel_diff'] = float(np.abs(row['logits'] - ref).max() / np.abs(ref).max())
  return rows


def table(rows: list[dict], args) -> str:
  base = rows[0]['sec']
  lines = [f'ViT-{args.variant} at {args.image_size}px, batch {args.batch_size}, float32; '
           f'median of {args.rounds} round-robin rounds after a warm-up call; LoRA/DoRA rank '
           f'{args.rank} on query and value, SSF and (IA)³ at their default placements.', '',
           '| model | params | ms / batch | img/s | vs bare | compile (s) | merge (s) | '
           'merged vs unmerged logits |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    merge_s = f'{r["merge_s"]:.2f}' if r['merge_s'] is not None else ''
    diff = f'{r["rel_diff"]:.1e}' if 'rel_diff' in r else ''
    lines.append(f'| {r["name"]} | {r["params_count"]:,} | {1e3 * r["sec"]:.1f} | '
                 f'{args.batch_size / r["sec"]:.2f} | {r["sec"] / base:.3f}x | '
                 f'{r["compile_s"]:.1f} | {merge_s} | {diff} |')
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='B/16')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--rank', type=int, default=8, help='LoRA/DoRA rank (query and value).')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--out', default=None, help='Also write the table (markdown) here.')
  args = parser.parse_args()
  load_before = os.getloadavg()
  start = time.perf_counter()
  rows = run(args)
  wall = time.perf_counter() - start
  from vadapt import metrics  # pylint: disable=g-import-not-at-top
  metrics.report_benchmark('Inference latency: weight-space adapters unmerged and merged',
                           table(rows, args), load_before, metrics.machine_line(), args.out,
                           wall_seconds=wall)


if __name__ == '__main__':
  main()
