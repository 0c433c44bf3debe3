r"""Where a train step's time goes: its phases timed side by side, and a per-op profile.

  python benchmarks/step_profile.py --method=houlsby               # ViT-Ti, patch 4, 32 px, b64
  python benchmarks/step_profile.py --method=full --trace=/tmp/tr  # + XLA per-op breakdown

Phases, each jitted on its own and timed in interleaved rounds in one process: the eval forward
pass, the forward pass + loss, the loss and its gradient with respect to the delta (what
value_and_grad in the trainer computes), the optimizer update alone (clipping, per-label AdamW
over the delta, apply_updates), and the trainer's whole step (vadapt.train.make_train_step, the
delta and optimizer state donated). Each phase's wall time and process CPU time (all threads) is
the median over the rounds; on a loaded machine the CPU time is the steadier figure. XLA's cost
analysis gives each phase's FLOPs: gradients of frozen leaves would show as the backward pass
costing about twice the forward pass's FLOPs on top of the input gradients.

--trace runs the gradient phase under jax.profiler and sums XLA:CPU's per-op events by the model
op they come from (the HLO metadata's op_name, block index removed), forward (jvp) and backward
(transpose) apart, matmul fusions apart from element-wise ones. XLA:CPU runs independent ops at
once (the q/k/v projections, say); time during which several ops ran is split evenly between them,
so each op's share is its part of the wall time, not its own event's length.

The workload is random images (no input pipeline), 100 classes, bottleneck 64, LoRA rank 8, f32
unless --dtype=bfloat16. Run it under the XLA flags you want to compare (XLA_FLAGS); like
train_step.py, it adds the memory scheduler flag unless XLA_FLAGS already names a scheduler.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

_SCHEDULER = '--xla_cpu_enable_concurrency_optimized_scheduler'
if _SCHEDULER not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_SCHEDULER}=false'.strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vadapt import experiment, losses, partition, train  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position  (benchmarks/)

NUM_CLASSES = 100


def _config(args) -> ml_collections.ConfigDict:
  return train_step.trainer_config(method=args.method, variant=args.variant,
                                   image_size=args.image_size, dtype=args.dtype,
                                   patch_size=args.patch_size)


def _phases(args):
  """{phase: (jitted fn, args)} built from the trainer's own pieces."""
  config = _config(args)
  model, backbone = experiment.build_model(config, NUM_CLASSES)
  _, delta, frozen, schedule, tx, opt_state, batch = train_step.init_state(
      config, model, backbone, args.image_size, args.batch_size, NUM_CLASSES)

  def logits(d, f, b, train_mode):
    return model.apply({'params': partition.merge(d, f)}, b['image'], train=train_mode,
                       rngs={'dropout': jax.random.PRNGKey(0)} if train_mode else None)

  def loss(d, f, b):
    return jnp.mean(losses.cross_entropy(logits(d, f, b, True), b['label'], NUM_CLASSES))

  grad = jax.jit(jax.value_and_grad(loss))
  grads = grad(delta, frozen, batch)[1]
  step = train.make_train_step(model, tx, schedule, num_classes=NUM_CLASSES, label_smoothing=0.0,
                               seed=0)
  return {
      'forward (eval)': (jax.jit(lambda d, f, b: logits(d, f, b, False)), (delta, frozen, batch)),
      'forward + loss': (jax.jit(loss), (delta, frozen, batch)),
      'loss + grad (delta)': (grad, (delta, frozen, batch)),
      'optimizer update': (jax.jit(lambda g, o, d: optax.apply_updates(d, tx.update(g, o, d)[0])),
                           (grads, opt_state, delta)),
      # Its own copies: the step donates them, and the other phases read the originals.
      'train step': (jax.jit(step, donate_argnums=(0, 1)),
                     (jax.tree.map(jnp.copy, delta), jax.tree.map(jnp.copy, opt_state), frozen,
                      batch, 0)),
  }


def _time(phases: dict, rounds: int) -> dict:
  compiled, state, flops = {}, {}, {}
  for name, (fn, fn_args) in phases.items():
    compiled[name] = fn.lower(*fn_args).compile()
    cost = compiled[name].cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops[name] = (cost or {}).get('flops', float('nan'))
    state[name] = list(fn_args)
    out = compiled[name](*state[name])
    if name == 'train step':  # The donated delta and optimizer state come back each call.
      state[name][:2] = out[:2]
    jax.block_until_ready(out)
  wall = collections.defaultdict(list)
  cpu = collections.defaultdict(list)
  names = list(phases)
  for i in range(rounds):
    for name in names if i % 2 == 0 else names[::-1]:
      start, start_cpu = time.perf_counter(), time.process_time()
      out = compiled[name](*state[name])
      jax.block_until_ready(out)
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
      if name == 'train step':
        state[name][:2] = out[:2]
  return {n: {'gflop': flops[n] / 1e9, 'wall_ms': 1e3 * float(np.median(wall[n])),
              'cpu_ms': 1e3 * float(np.median(cpu[n]))} for n in names}, compiled


def _trace(compiled, fn_args, directory: str, top: int) -> str:
  """Per-op time of one compiled function, summed by the model op each HLO op comes from."""
  jax.block_until_ready(compiled(*fn_args))
  jax.profiler.start_trace(directory)
  runs = 2
  for _ in range(runs):
    jax.block_until_ready(compiled(*fn_args))
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(directory, '**', '*.trace.json.gz'), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  comps, cur, inst = {}, None, {}
  for line in compiled.as_text().splitlines():
    m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if m:
      cur = comps.setdefault(m.group(1), [])
      continue
    if cur is not None:
      cur.append(line.strip())
      m = re.match(r'(?:ROOT )?%?([\w.\-]+) = ', line.strip())
      if m:
        inst[m.group(1)] = line.strip()

  def origin(name):
    line = inst.get(name, '')
    called = re.search(r'calls=%?([\w.\-]+)', line)
    lines = [line] + (comps.get(called.group(1), [])[::-1] if called else [])
    is_dot = any(' dot(' in l or ' convolution(' in l for l in lines)
    for l in lines:
      m = re.search(r'op_name="([^"]*)"', l)
      if m:
        return m.group(1), is_dot
    return '?', is_dot

  per_op, overlapped = attributed_time(
      [(e['name'], e['ts'], e['ts'] + e['dur']) for e in events
       if e.get('ph') == 'X' and e['name'] in inst])
  groups = collections.Counter()
  for name, us in per_op.items():
    op, is_dot = origin(name)
    side = 'backward' if 'transpose(' in op else 'forward'
    op = re.sub(r'^jit\([^)]*\)/', '', op)
    op = re.sub(r'transpose\(jvp\((\w+)\)\)|jvp\((\w+)\)', '', op)
    op = re.sub(r'encoderblock_\d+', 'encoderblock_*', op).replace('Adapted.call_method/', '')
    groups[(side, 'matmul' if is_dot else 'element-wise', op)] += us / runs
  total = sum(groups.values())
  sides = collections.Counter()
  for (side, kind, _), us in groups.items():
    sides[(side, kind)] += us
  lines = ['| part | kind | op (summed over blocks) | ms | share |', '|---|---|---|---:|---:|']
  for (side, kind), us in sorted(sides.items()):
    lines.append(f'| {side} | {kind} | (all) | {us / 1e3:.1f} | {100 * us / total:.1f}% |')
  for (side, kind, op), us in groups.most_common(top):
    lines.append(f'| {side} | {kind} | `{op}` | {us / 1e3:.1f} | {100 * us / total:.1f}% |')
  return ('Per-op time of the loss + grad phase under jax.profiler (summed op events, the time '
          'two ops ran at once split between them; the tracer inflates absolute times, read the '
          f'shares). Ops ran concurrently for {100 * overlapped:.1f}% of the summed op time:\n\n'
          + '\n'.join(lines) + '\n')


def attributed_time(intervals) -> tuple[collections.Counter, float]:
  """({name: time}, overlapped share) for (name, start, end) intervals on any threads.

  XLA:CPU runs independent ops at once (the three q/k/v projections, say), each then with part of
  the cores, so an op's own event duration overstates its cost; each stretch of time is split
  evenly among the ops running in it. The share is the summed durations' part that overlapped.
  """
  intervals = [iv for iv in intervals if iv[2] > iv[1]]  # An empty event costs nothing.
  bounds = sorted({t for _, start, end in intervals for t in (start, end)})
  starts = collections.defaultdict(list)
  ends = collections.defaultdict(list)
  for i, (_, start, end) in enumerate(intervals):
    starts[start].append(i)
    ends[end].append(i)
  active: set[int] = set()
  time_of = collections.Counter()
  raw = sum(end - start for _, start, end in intervals)
  overlapped = 0.0
  for t, t_next in zip(bounds, bounds[1:]):  # Nothing runs after the last bound.
    active.difference_update(ends[t])
    active.update(starts[t])
    if active:
      for i in active:
        time_of[intervals[i][0]] += (t_next - t) / len(active)
      if len(active) > 1:
        overlapped += (t_next - t) * len(active)
  return time_of, (overlapped / raw if raw else 0.0)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--method', default='houlsby')
  parser.add_argument('--variant', default='Ti/16')
  parser.add_argument('--patch_size', type=int, default=4)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--trace', default=None, help='A directory for the profiler trace.')
  parser.add_argument('--top', type=int, default=25, help='Ops listed from the trace.')
  args = parser.parse_args()

  phases = _phases(args)
  results, compiled = _time(phases, args.rounds)
  step = results['train step']
  print(f'ViT-{args.variant} patch {args.patch_size or "(variant)"}, {args.image_size} px, batch '
        f'{args.batch_size}, {args.dtype}, method {args.method}; medians of {args.rounds} '
        f'interleaved rounds; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average '
        f'{", ".join(f"{x:.2f}" for x in os.getloadavg())}.\n')
  print('| phase | GFLOP | wall ms | CPU ms | CPU vs step | CPU vs forward + loss |')
  print('|---|---:|---:|---:|---:|---:|')
  fwd = results['forward + loss']['cpu_ms']
  for name, r in results.items():
    print(f'| {name} | {r["gflop"]:.1f} | {r["wall_ms"]:.1f} | {r["cpu_ms"]:.1f} | '
          f'{r["cpu_ms"] / step["cpu_ms"]:.2f} | {r["cpu_ms"] / fwd:.2f} |')
  if args.trace:
    print()
    print(_trace(compiled['loss + grad (delta)'], phases['loss + grad (delta)'][1], args.trace,
                 args.top))


if __name__ == '__main__':
  main()
