r"""Many adapters on one backbone: switch latency, traces, and Parallel + AdapterDrop speed-ups.

  python benchmarks/multi_adapter.py                          # ViT-Ti/16, 224px, batch 8, 4 tasks
  python benchmarks/multi_adapter.py --variant=mu/4 --image_size=32 --repeats=3   # quick run
  python benchmarks/multi_adapter.py --real \
      --out=benchmarks/results/multi_adapter_dinov2_cpu.md    # real DINOv2 + Fashion-MNIST
  python benchmarks/multi_adapter.py --real --config_arg=dinov2,test --repeats=1  # smoke

Synthetic (default): adapters and heads are random (trained ones cost the same to run), so no
accuracy is measured.

Real (--real): the DINOv2 ViT-S/14 ONNX weights and Fashion-MNIST (`python -m vadapt.artifacts`
fetches both) with the tasks of `configs/multi_task.py:dinov2` (even classes, odd classes, all
ten; Houlsby adapters), trained one after another as `--mode=train --config.task=T` does
(vadapt.multi_task.train: the earlier tasks loaded and frozen, every trained task evaluated after
each addition). Reports the continual-learning table (each earlier task's accuracy after every
addition, and whether its adapter file and accuracy stayed the same), the switch latency of the
trained adapters, and AdapterDrop at inference: for each drop_lowest=k the speed of Parallel
against the tasks one by one, and every task's accuracy on its own eval split (computed per task
with the adapter chosen by index: the same outputs Parallel gives each task, tests/test_multi.py).
Timings run at the training resolution.

Switching: a jitted forward pass that takes the adapter's index as data is traced and compiled
once; every later switch is an ordinary call. Selecting by name (a static argument) traces and
compiles once per adapter. Parallel: N tasks in one pass against N single-task passes; with
drop_lowest=k the lowest k blocks run without adapters, so under Parallel they run once for all
tasks (the batch is replicated at block k).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_time(fn, repeats: int) -> float:
  fn()  # Compiled (or cached) before timing.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def switch_rows(model, params, x, names, repeats: int) -> list[tuple[str, ...]]:
  """Switching adapters by index (data: one trace) and by name (static: one trace each)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  traces = []

  def by_index(p, x, i):
    traces.append(1)
    return model.apply({'params': p}, x, adapter=i, head=i)

  run_index = jax.jit(by_index)
  start = time.perf_counter()
  jax.block_until_ready(run_index(params, x, jnp.int32(0)))
  first_index = time.perf_counter() - start
  switch_times = []
  for k in range(repeats * len(names)):
    i = jnp.int32((k + 1) % len(names))
    start = time.perf_counter()
    jax.block_until_ready(run_index(params, x, i))
    switch_times.append(time.perf_counter() - start)
  name_compile, name_call, name_traces = [], [], []
  for n in names:
    fn = jax.jit(lambda p, x, n=n: (name_traces.append(1), model.apply(
        {'params': p}, x, adapter=n))[1])
    start = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    name_compile.append(time.perf_counter() - start)
    name_call.append(_median_time(lambda: jax.block_until_ready(fn(params, x)), repeats))
  return [('switch by index (data)', f'{len(traces)} trace(s) for {1 + len(switch_times)} '
           f'calls over {len(names)} adapters', f'first call {first_index:.2f} s',
           f'switching call {1e3 * statistics.median(switch_times):.1f} ms (median)'),
          ('switch by name (static)', f'{len(name_traces)} traces for {len(names)} adapters',
           f'first call per adapter {statistics.median(name_compile):.2f} s',
           f'cached call {1e3 * statistics.median(name_call):.1f} ms (median)')]


def parallel_times(model, params, x, names, k: int, repeats: int) -> tuple[float, float]:
  """Seconds of the tasks one by one and of Parallel(*names), both with drop_lowest=k."""
  import jax  # pylint: disable=g-import-not-at-top
  from vadapt.composition import Parallel  # pylint: disable=g-import-not-at-top
  singles = [jax.jit(lambda p, x, n=n: model.apply({'params': p}, x, adapter=n, drop_lowest=k))
             for n in names]
  one_by_one = _median_time(lambda: jax.block_until_ready([f(params, x) for f in singles]),
                            repeats)
  par = jax.jit(lambda p, x: model.apply({'params': p}, x, adapter=Parallel(*names),
                                         drop_lowest=k))
  return one_by_one, _median_time(lambda: jax.block_until_ready(par(params, x)), repeats)


def _table(header: tuple[str, ...], rows) -> list[str]:
  return (['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
          + ['| ' + ' | '.join(r) + ' |' for r in rows])


def synthetic(args) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vadapt import api, multi  # pylint: disable=g-import-not-at-top
  from vadapt.models import vit  # pylint: disable=g-import-not-at-top
  from vadapt.pretrained.common import flatten, unflatten  # pylint: disable=g-import-not-at-top

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
  rows = switch_rows(model, params, x, names, args.repeats)
  for k in [int(d) for d in args.drops.split(',')]:
    one_by_one, parallel = parallel_times(model, params, x, names, k, args.repeats)
    rows.append((f'{args.tasks} tasks, drop_lowest={k}', f'one by one {1e3 * one_by_one:.1f} ms',
                 f'Parallel {1e3 * parallel:.1f} ms', f'speed-up {one_by_one / parallel:.2f}x'))
  header = (f'ViT-{args.variant} at {args.image_size}px, batch {args.batch_size}, {args.tasks} '
            f'Houlsby adapters (bottleneck {args.bottleneck}) with 10-class heads; '
            f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
            f'load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}, '
            f'backend {jax.default_backend()}')
  return '\n'.join([header, ''] + _table(('case', '', '', ''), rows))


# ----------------------------------------------------------------------------------- real


def _digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _eval_batches(task, batch_size: int):
  """A task's whole eval split as (images, labels, mask) batches of `batch_size`."""
  from vadapt import experiment, input_pipeline  # pylint: disable=g-import-not-at-top
  c = task.config
  return [(b['image'], b['label'], b['mask']) for b in input_pipeline.make_eval_iterator(
      c.input, global_batch_size=batch_size, image_size=c.backbone.image_size,
      preprocess=experiment.preprocess_name(c, 'eval'), process_index=0, process_count=1)]


def real(args) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import multi_task as multi_task_config  # pylint: disable=g-import-not-at-top
  from vadapt import metrics, multi_task  # pylint: disable=g-import-not-at-top
  from vadapt.pretrained.common import flatten  # pylint: disable=g-import-not-at-top

  load_start = os.getloadavg()
  wall_start = time.perf_counter()
  config = multi_task_config.get_config(args.config_arg)
  names = args.real_tasks.split(',')
  if not os.path.isfile(config.backbone.checkpoint):
    raise SystemExit(f'{config.backbone.checkpoint} is missing: fetch the artifacts first '
                     '(python -m vadapt.artifacts).')
  multi_task.get_task(multi_task.plan(config, None), names[0], '--real_tasks')
  bad = [n for n in names if n not in config.adapters or config.adapters[n].method == 'fusion']
  if bad:
    raise SystemExit(f'--real_tasks: {bad} are not ordinary tasks of configs/multi_task.py:'
                     f'{args.config_arg} ({", ".join(config.adapters.keys())}).')
  workdir = args.workdir or tempfile.mkdtemp(prefix='vadapt_multi_bench_')
  if os.path.exists(os.path.join(workdir, multi_task.ADAPTERS)):
    raise SystemExit(f'{workdir} holds trained tasks already: pass a new --workdir.')

  # Continual learning: tasks added one by one; after each, every trained task is evaluated.
  history, digests, seconds = [], {}, {}
  for name in names:
    with config.unlocked():
      config.task = name
    start = time.perf_counter()
    out = multi_task.train(config, workdir)
    seconds[name] = time.perf_counter() - start
    digests[name] = _digest(os.path.join(workdir, multi_task.ADAPTERS, name,
                                         'adapter.safetensors'))
    history.append((name, {n: r for n, r in out['tasks'].items() if r.get('trained')},
                    {n: _digest(os.path.join(workdir, multi_task.ADAPTERS, n,
                                             'adapter.safetensors')) for n in digests}))
  continual = []
  unchanged = True
  for added, table, files in history:
    cells = []
    for n in names:
      if n not in table:
        cells.append('-')
        continue
      first = next(t[n] for _, t, _ in history if n in t)
      same = (table[n]['eval/accuracy'] == first['eval/accuracy'] and files[n] == digests[n]
              and abs(table[n]['eval/loss'] - first['eval/loss']) <= 1e-6)
      unchanged &= same
      cells.append(f'{100 * table[n]["eval/accuracy"]:.1f}%' + ('' if same else ' (changed)'))
    continual.append((f'+ {added}', *cells, f'{seconds[added]:.0f} s'))

  # The trained tasks on one backbone.
  tasks = multi_task.plan(config, workdir)
  loaded = multi_task.load(config, tasks, skip=[n for n in tasks if n not in names])
  model, params = loaded.model, jax.device_put(loaded.params)
  evals = {n: _eval_batches(tasks[n], config.eval_batch_size) for n in names}
  x = np.concatenate([b[0] for b in evals[names[0]]])[:args.batch_size]
  depth = len({k.split('/')[1] for k in flatten(params) if 'encoderblock_' in k})
  drops = [int(d) for d in args.drops.split(',')] if args.drops else list(range(0, depth, 3))

  drop_rows = []
  for k in drops:
    run = jax.jit(lambda p, x, i, k=k: model.apply({'params': p}, x, adapter=i, head=i,
                                                   drop_lowest=k))
    accuracy = []
    for n in names:
      index = np.int32(model.index(n))
      correct = count = 0
      for images, labels, mask in evals[n]:
        predicted = np.argmax(np.asarray(run(params, images, index)), -1)
        correct += int(np.sum((predicted == labels) & mask))
        count += int(np.sum(mask))
      accuracy.append(f'{100 * correct / count:.1f}%')
    if args.skip_timing:
      drop_rows.append((str(k), '-', '-', '-', *accuracy))
      continue
    one_by_one, parallel = parallel_times(model, params, x, names, k, args.repeats)
    drop_rows.append((str(k), f'{1e3 * one_by_one:.1f}', f'{1e3 * parallel:.1f}',
                      f'{one_by_one / parallel:.2f}x', *accuracy))
  switch = [] if args.skip_timing else switch_rows(model, params, x, names, args.repeats)

  c = config
  machine = metrics.machine()
  load_end = os.getloadavg()
  lines = [
      f'# Many adapters on the real DINOv2 ViT-S/14 (Fashion-MNIST), {jax.default_backend()}',
      '',
      f'`python benchmarks/multi_adapter.py --real --config_arg={args.config_arg} '
      f'--real_tasks={args.real_tasks} --batch_size={args.batch_size} '
      f'--repeats={args.repeats}{" --drops=" + args.drops if args.drops else ""}'
      f'{" --skip_timing" if args.skip_timing else ""}`',
      '',
      f'Machine: {machine["cpu"]}, {machine["cores"]} cores ({", ".join(machine["flags"])}), '
      f'Python {machine["python"]}, jax {jax.__version__}. Load average (1 min) '
      f'{load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; whole run '
      f'{(time.perf_counter() - wall_start) / 60:.1f} min.',
      '',
      f'Backbone DINOv2 ViT-S/14 ({depth} blocks, frozen) at {c.backbone.image_size} px; each '
      f'task a Houlsby adapter (bottleneck {c.adapter.bottleneck}) and its own head, '
      f'{c.total_steps} steps of batch {c.batch_size} ({c.optimizer.name}, lr '
      f'{c.optimizer.learning_rate}) on its classes of {c.input.train_split}, evaluated on its '
      f'classes of {c.input.eval_split}. Tasks: '
      + '; '.join(f'{n} (classes {" ".join(map(str, tasks[n].config.input.classes))})'
                  if tasks[n].config.input.classes else f'{n} (all ten classes)' for n in names)
      + '.',
      '',
      '## Continual learning: tasks added one by one',
      '',
      'Each row trains one more task (the earlier ones loaded and frozen), then evaluates every '
      'trained task on its own eval split. "(changed)" would mark an earlier task whose accuracy, '
      'loss (1e-6) or adapter file differs from right after its own training: '
      + ('none did.' if unchanged else '**some did**.'),
      '',
  ]
  lines += _table(('after', *names, 'train + evaluate all'), continual)
  lines += ['', f'## AdapterDrop at inference with Parallel ({len(names)} tasks, batch '
            f'{args.batch_size}, {c.backbone.image_size} px)', '',
            'drop_lowest=k: the adapters of the lowest k blocks are skipped; under Parallel those '
            'blocks run once for all tasks. Times: the median of '
            f'{args.repeats} call(s) after compilation; accuracies on each task\'s own eval '
            'split.',
            '']
  lines += _table(('k', 'one by one (ms)', 'Parallel (ms)', 'speed-up',
                   *[f'{n} accuracy' for n in names]), drop_rows)
  if switch:
    lines += ['', f'## Switching between the trained adapters (batch {args.batch_size}, '
              f'{c.backbone.image_size} px)', '']
    lines += _table(('case', '', '', ''), switch)
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='Ti/16')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--tasks', type=int, default=4)
  parser.add_argument('--bottleneck', type=int, default=32)
  parser.add_argument('--drops', default=None,
                      help='drop_lowest values to measure (default 0,3,6; --real: every third '
                           'block from 0)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--real', action='store_true',
                      help='the real DINOv2 ViT-S/14 and Fashion-MNIST, tasks trained here')
  parser.add_argument('--config_arg', default='dinov2',
                      help='--real: the configs/multi_task.py argument (e.g. dinov2,size=112)')
  parser.add_argument('--real_tasks', default='even,odd,all',
                      help='--real: the tasks, in the order they are added')
  parser.add_argument('--workdir', default='',
                      help='--real: where the tasks are trained (default: a new temporary folder)')
  parser.add_argument('--skip_timing', action='store_true',
                      help='--real: accuracy only (training, continual table, accuracy per k)')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  sys.path.insert(0, _REPO)  # This checkout's vadapt and configs/.
  # As python -m vadapt.main does: XLA:CPU's concurrency-optimised scheduler off, unless set.
  flag = '--xla_cpu_enable_concurrency_optimized_scheduler'
  if flag not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {flag}=false'.strip()
  if args.real:
    text = real(args)
  else:
    args.drops = args.drops or '0,3,6'
    text = synthetic(args)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
