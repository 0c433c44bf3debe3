r"""Train-step throughput and peak memory: full fine-tuning vs adapters vs linear probe.

  python benchmarks/train_step.py                       # ViT-B/16, 224px, batch 8, f32
  python benchmarks/train_step.py --variant=mu/4 --image_size=32 --steps=2   # a quick smoke run
  python benchmarks/train_step.py --methods=full,houlsby,lora   # some methods

`--methods=forward`: the bare backbone's jitted forward pass alone (the peer comparison's
inference row). Inference latency of the weight-space methods merged and unmerged:
benchmarks/merge_latency.py.

Each method runs in its own fresh process (peak RSS from resource.getrusage is per process), using
the trainer's own pieces: vadapt.experiment.build_model / label_rules / make_optimizer /
make_train_step, jitted with the frozen tree as a non-donated input and gradients over the delta
only. Images are random (the input pipeline is not measured). Results print as a markdown table
with ratios against full fine-tuning; --out also writes them with a machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from typing import Optional

# 'name+remat' rematerialises every encoder block in the backward pass (backbone.remat=True);
# 'name+remat_dots' does so keeping the Dense outputs (backbone.remat_policy='dots');
# 'name+act' recomputes each MLP activation in the backward pass (backbone.recompute_activation);
# 'name+top4' puts the method on the top 4 blocks only (adapter.layers), 'name+top4_cached' also
# trains on the cached input of the lowest of them (config.cache_features: the step runs those
# blocks alone; the one-off pass over the blocks below is timed apart as the prefix).
# Every method of the family, one row each ('--methods=family'), then the remat variants.
FAMILY = ('full', 'linear', 'houlsby', 'pfeiffer', 'parallel', 'lora', 'dora', 'ssf', 'ia3',
          'bitfit', 'vpt_shallow', 'vpt_deep')
METHODS = FAMILY + ('full+remat', 'houlsby+remat', 'pfeiffer+remat', 'houlsby+remat_dots',
                    'pfeiffer+remat_dots')
# XLA:CPU's default concurrency-optimised scheduler orders the step for parallelism, not memory:
# it keeps about 0.5 GiB more of ViT-B/16's activations alive and cancels remat's saving
# entirely (same temporaries with and without remat). The benchmark turns it off for every
# method alike; --xla_cpu_scheduler=default measures XLA's default.
MEMORY_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def _rss_mib() -> float:
  """This process's peak resident set (VmHWM; ru_maxrss would start from the parent's at fork)."""
  try:
    with open('/proc/self/status') as f:
      return next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) / 1024.0
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _gflop(compiled) -> Optional[float]:
  """XLA's FLOP count of one call of a compiled function, in GFLOP (None where it has none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get('flops')
  return flops / 1e9 if flops else None


_LAYER_NORM = {'default': None, 'true': True, 'false': False}


def xla_step_mib(compiled) -> Optional[float]:
  """XLA's own plan for one call, in MiB: buffers live during it (activations, grads, updates)
  plus the arguments it reads, less what outputs alias; None where XLA has no memory analysis."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes) / 2 ** 20


def init_state(config, model, backbone, image_size: int, batch_size: int, num_classes: int):
  """(labels, delta, frozen, schedule, tx, opt_state, batch) as the trainer builds them, on a
  random init and a random batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vadapt import api, experiment, partition  # pylint: disable=g-import-not-at-top
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  rng = jax.random.PRNGKey(0)

  def init_params(rng):
    params = backbone.init(rng, images, train=False)['params']
    return params if model is backbone else api.init_with_pretrained(model, params, rng, images)

  # Shapes first, then one jitted init that returns the two halves: the full tree never exists
  # as a separate copy, and no second compile runs for the adapters' initialisation.
  labels = partition.label_tree(jax.eval_shape(init_params, rng), experiment.label_rules(config))
  delta, frozen = jax.jit(lambda r: partition.split(init_params(r), labels))(rng)
  schedule = experiment.make_schedule(config)
  tx = experiment.make_optimizer(config, partition.split(labels, labels)[0], schedule)
  opt_state = jax.jit(tx.init)(delta)
  data_rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(data_rng.normal(size=(batch_size, image_size, image_size, 3)),
                                jnp.float32),
           'label': jnp.asarray(data_rng.integers(0, num_classes, batch_size), jnp.int32)}
  return labels, delta, frozen, schedule, tx, opt_state, batch


def _worker(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  assert 'tensorflow' not in sys.modules

  from vadapt import experiment, feature_cache, host_memory, partition, train
  rss_imports = _rss_mib()
  method, _, option = args.method.partition('+')
  if method == 'forward':
    return _forward_worker(args, rss_imports)
  top = re.fullmatch(r'top(\d+)(_cached)?', option)
  if option not in ('', 'remat', 'remat_dots', 'act') and not top:
    raise ValueError(f"Unknown method option {option!r} in {args.method!r}; expected 'remat', "
                     "'remat_dots', 'act', 'top<k>' or 'top<k>_cached'.")
  remat_option = '' if top else option
  num_classes = 100
  images = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
  rng = jax.random.PRNGKey(0)
  layers = None
  if top:
    plain = experiment.build_model(trainer_config(
        method='full', variant=args.variant, image_size=args.image_size, dtype=args.dtype,
        patch_size=args.patch_size), num_classes)[1]
    shapes = jax.eval_shape(lambda r: plain.init(r, images, train=False), rng)['params']
    depth = len([k for k in shapes['Transformer'] if k.startswith('encoderblock_')])
    layers = tuple(range(depth - int(top[1]), depth))

  config = trainer_config(
      method=method, variant=args.variant, image_size=args.image_size, dtype=args.dtype,
      patch_size=args.patch_size, option=remat_option, bottleneck=args.bottleneck,
      prompts=args.prompts, rank=args.rank, layer_norm=_LAYER_NORM[args.adapter_layer_norm],
      layers=layers)

  model, backbone = experiment.build_model(config, num_classes)
  labels, delta, frozen, schedule, tx, opt_state, batch = init_state(
      config, model, backbone, args.image_size, args.batch_size, num_classes)
  step_model, prefix_s = model, None
  if top and top[2]:
    # What the trainer does with cache_features: the prefix runs once per example (timed here on
    # one batch), every step runs the top blocks on its output.
    boundary = ('Transformer', f'encoderblock_{layers[0]}')
    prefix = jax.jit(lambda d, f, x: feature_cache.module_input(
        model, partition.to_variables(partition.merge(d, f)), x, rng, boundary)[0])
    tokens = jax.block_until_ready(prefix(delta, frozen, batch['image']))  # Compiles.
    jax.block_until_ready(prefix(delta, frozen, batch['image']))  # Warms the allocator.
    prefix_times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      jax.block_until_ready(prefix(delta, frozen, batch['image']))
      prefix_times.append(time.perf_counter() - start)
    prefix_s = float(np.median(prefix_times))
    step_model = feature_cache.BlockInputOnFeatures(
        model=model, boundary=boundary, image_shape=(args.image_size, args.image_size, 3))
    batch = {'image': tokens, 'label': batch['label']}
  step_fn = jax.jit(train.make_train_step(step_model, tx, schedule, num_classes=num_classes,
                                          label_smoothing=0.0, seed=0),
                    donate_argnums=(0, 1))

  rss_before_step = _rss_mib()
  start = time.perf_counter()
  compiled = step_fn.lower(delta, opt_state, frozen, batch, 0).compile()
  compile_s = time.perf_counter() - start
  rss_after_compile = _rss_mib()  # The compiler's own peak lands here, before any step runs.
  host_memory.release()  # As the trainer does between compiling and the first step.
  # XLA's own plan for one step: buffers live during the step (activations, grads, updates)
  # plus the arguments it reads (frozen backbone, delta, optimizer state).
  step_mib = xla_step_mib(compiled)
  delta, opt_state, m = compiled(delta, opt_state, frozen, batch, 0)
  jax.block_until_ready(m)
  times = []
  for step in range(1, args.steps + 1):
    start = time.perf_counter()
    delta, opt_state, m = compiled(delta, opt_state, frozen, batch, step)
    jax.block_until_ready((delta, m))
    times.append(time.perf_counter() - start)
  sec = float(np.median(times))
  counts = partition.count(jax.eval_shape(lambda: partition.merge(delta, frozen)), labels)
  total = sum(counts.values())
  return {
      'method': args.method,
      'remat': option == 'remat',  # Full remat rows are compared with full+remat.
      'trainable': total - counts.get('frozen', 0),
      'total': total,
      'sec_per_step': sec,
      'step_times': times,
      'img_per_sec': args.batch_size / sec,
      'compile_s': compile_s,
      'step_gflop': _gflop(compiled),
      'xla_step_mib': step_mib,
      'rss_imports_mib': rss_imports,
      'rss_before_step_mib': rss_before_step,
      'rss_after_compile_mib': rss_after_compile,
      'peak_rss_mib': _rss_mib(),
      'loss': float(m['loss']),
      'tensorflow_loaded': 'tensorflow' in sys.modules,
      # With the cache: seconds of the one-off prefix pass per batch (None without).
      'prefix_sec_per_batch': prefix_s,
  }


def _forward_worker(args, rss_imports: float) -> dict:
  """'forward': the bare backbone's jitted forward pass (what serving costs; the peer comparison's
  inference row). Adapters served merged or unmerged: benchmarks/merge_latency.py.

  The forward pass is compiled from the params' shapes before any weights exist, and the
  compiler's freed heap is handed back (vadapt.host_memory) before they are loaded, so the
  compiler's peak and the weights are never resident together. With --weights (a Hugging Face
  save_pretrained directory, as the peer comparison writes for both sides) the weights come from
  that file through vadapt's own loader, with the GELU form and LayerNorm epsilon its config.json
  gives (as a user loading that checkpoint gets); without, from a random init.
  """
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from vadapt import backbones, host_memory  # pylint: disable=g-import-not-at-top
  cfg = _backbone_config(args)
  if args.weights:
    cfg.update(checkpoint=args.weights, checkpoint_format='auto')
    from vadapt.pretrained import vit as vit_loader  # pylint: disable=g-import-not-at-top
    # What its config.json implies (HF ViT: LayerNorm epsilon 1e-12, GELU exact or tanh).
    implied = vit_loader.model_kwargs_from_checkpoint(args.weights)
    cfg['overrides'] = {**cfg['overrides'], 'activation': implied['activation'],
                        'layer_norm_epsilon': implied['layer_norm_epsilon']}
  cfg = ml_collections.ConfigDict(cfg)
  model = backbones.make_model(cfg, 100)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(args.batch_size, args.image_size, args.image_size, 3)), jnp.float32)
  shapes = jax.eval_shape(lambda r: model.init(r, images[:1], train=False)['params'],
                          jax.random.PRNGKey(0))
  fwd = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  start = time.perf_counter()
  compiled = fwd.lower(shapes, images).compile()
  compile_s = time.perf_counter() - start
  host_memory.release()
  rss_after_compile = _rss_mib()
  params = host_memory.to_device(backbones.load_params(cfg, model))  # Leaf by leaf.
  host_memory.release()
  rss_before_step = _rss_mib()
  logits = jax.block_until_ready(compiled(params, images))  # The untimed first call.
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, images))
    times.append(time.perf_counter() - start)
  sec = float(np.median(times))
  total = sum(x.size for x in jax.tree.leaves(params))
  return {'method': args.method, 'remat': False, 'trainable': 0, 'total': total,
          'sec_per_step': sec, 'img_per_sec': args.batch_size / sec, 'compile_s': compile_s,
          'step_gflop': _gflop(compiled), 'xla_step_mib': None, 'rss_imports_mib': rss_imports,
          'rss_after_compile_mib': rss_after_compile, 'rss_before_step_mib': rss_before_step,
          'peak_rss_mib': _rss_mib(), 'loss': float('nan'),
          'tensorflow_loaded': 'tensorflow' in sys.modules, 'weights': args.weights or None,
          'logits0': np.asarray(logits[0], np.float32).tolist()}


def _backbone_config(args, option: str = '') -> dict:
  return _backbone(args.variant, args.image_size, args.dtype, args.patch_size, option)


def _backbone(variant, image_size, dtype, patch_size, option: str = '') -> dict:
  return {'model': 'vit', 'variant': variant, 'image_size': image_size,
          'dtype': dtype, 'dropout_rate': 0.0, 'remat': option in ('remat', 'remat_dots'),
          'remat_policy': 'dots' if option == 'remat_dots' else 'nothing',
          'recompute_activation': option == 'act',
          'overrides': {'patch_size': patch_size} if patch_size else {}}


def trainer_config(*, method: str, variant: str, image_size: int, dtype: str, patch_size: int,
                   option: str = '', bottleneck: int = 64, prompts: int = 50, rank: int = 8,
                   layer_norm=None, layers=None):
  """The trainer's config for one benchmark worker (also benchmarks/step_profile.py's). Built
  here rather than from configs/common.py, whose input pipeline pulls in TensorFlow: its ~0.5 GiB
  would count in every method's peak RSS."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({
      'backbone': _backbone(variant, image_size, dtype, patch_size, option),
      'adapter': {'method': method, 'bottleneck': bottleneck, 'reduction_factor': None,
                  'layers': layers, 'activation': 'relu', 'scale': None, 'learnable_scale': False,
                  'layer_norm': layer_norm, 'dropout': 0.0, 'prompts': prompts, 'drop_rate': 0.0,
                  'drop_schedule': 'constant', 'drop_ramp_steps': 0, 'rank': rank,
                  'alpha': None, 'modules': None},
      'train_head': True,
      'optimizer': {'name': 'adamw', 'learning_rate': 1e-3, 'weight_decay': 1e-4, 'b1': 0.9,
                    'b2': 0.999, 'momentum': 0.9},
      'schedule': {'warmup_steps': 10, 'decay': 'cosine', 'end_factor': 0.0},
      'grad_clip_norm': 1.0,
      'total_steps': 1000,
  })


def _machine() -> str:
  from vadapt import metrics  # pylint: disable=g-import-not-at-top
  cpu = metrics.machine()['cpu']
  try:
    mem_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
  except (ValueError, OSError):
    mem_gib = float('nan')
  import jax  # pylint: disable=g-import-not-at-top
  return (f'{cpu}; {os.cpu_count()} cores visible; {mem_gib:.1f} GiB RAM; '
          f'jax {jax.__version__} ({jax.default_backend()}); Python {platform.python_version()}')


def _ratio(a, b) -> str:
  return f'{a / b:.2f}x' if a and b else 'n/a'


def _table(results: list[dict], args) -> str:
  base = next((r for r in results if r['method'] == 'full'), results[0])
  header = (f'ViT-{args.variant} at {args.image_size}px, batch {args.batch_size}, {args.dtype}, '
            f'median of '
            f'{args.steps} steps after one compile step; bottleneck {args.bottleneck}, LoRA/DoRA '
            f'rank {args.rank}; XLA:CPU '
            f'scheduler: {args.xla_cpu_scheduler}. Ratios are against `{base["method"]}` from '
            'the same run.\n\n')
  lines = ['| method | trainable params | img/s | vs full | peak RSS (MiB) | vs full | '
           'XLA step memory (MiB) | vs full | compile (s) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in results:
    xla = f'{r["xla_step_mib"]:.0f}' if r['xla_step_mib'] else 'n/a'
    lines.append(
        f'| {r["method"]} | {r["trainable"]:,} ({100 * r["trainable"] / r["total"]:.2f}%) | '
        f'{r["img_per_sec"]:.2f} | {_ratio(r["img_per_sec"], base["img_per_sec"])} | '
        f'{r["peak_rss_mib"]:.0f} | {_ratio(r["peak_rss_mib"], base["peak_rss_mib"])} | '
        f'{xla} | {_ratio(r["xla_step_mib"], base["xla_step_mib"])} | {r["compile_s"]:.1f} |')
  lines.append('')
  imports = sorted(r['rss_imports_mib'] for r in results)
  lines.append('Peak RSS is the whole process (Python + JAX + compiler + params + step); the '
               f'process after its imports alone holds {imports[0]:.0f}-{imports[-1]:.0f} MiB '
               "of it. XLA step memory is the compiled step's arguments + temporaries + outputs "
               '(donated buffers counted once).')
  remat_base = next((r for r in results if r['method'] == 'full+remat'), None)
  if remat_base:
    lines += ['', 'The remat rows against full fine-tuning with remat (both sides recompute):', '',
              '| method | img/s vs full+remat | peak RSS vs full+remat | XLA step memory vs '
              'full+remat |', '|---|---:|---:|---:|']
    for r in results:
      if r['remat'] and r is not remat_base:
        lines.append(f'| {r["method"]} | {_ratio(r["img_per_sec"], remat_base["img_per_sec"])} | '
                     f'{_ratio(r["peak_rss_mib"], remat_base["peak_rss_mib"])} | '
                     f'{_ratio(r["xla_step_mib"], remat_base["xla_step_mib"])} |')
  return header + '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--variant', default='B/16')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--patch_size', type=int, default=0, help='Overrides the variant patch.')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='Compute dtype (params and optimizer state stay float32).')
  parser.add_argument('--bottleneck', type=int, default=64)
  parser.add_argument('--prompts', type=int, default=50, help='VPT prompt tokens per set.')
  parser.add_argument('--rank', type=int, default=8, help='LoRA/DoRA rank (query and value).')
  parser.add_argument('--adapter_layer_norm', choices=('default', 'true', 'false'),
                      default='default', help="The bottleneck's inner LayerNorm: the method's "
                      "default (on for 'parallel', AdaptFormer's; off otherwise), or forced.")
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--methods', default=','.join(METHODS),
                      help="Comma-separated, or 'family' for every method without remat "
                           f"({','.join(FAMILY)}); append '+remat' (backbone.remat=True) or "
                           "'+remat_dots' (remat keeping Dense outputs).")
  parser.add_argument('--xla_cpu_scheduler', choices=('memory', 'default'), default='memory',
                      help=f"'memory' sets {MEMORY_SCHEDULER_FLAG} in every worker.")
  parser.add_argument('--out', default=None, help='Also write the table (markdown) here.')
  parser.add_argument('--weights', default='',
                      help="forward: load the backbone from this Hugging Face ViT directory "
                           "(save_pretrained), with the GELU and LayerNorm epsilon it implies.")
  parser.add_argument('--method', default=None, help=argparse.SUPPRESS)  # Worker mode.
  args = parser.parse_args()

  if args.method:
    print('RESULT ' + json.dumps(_worker(args)), flush=True)
    return

  env = dict(os.environ)
  if args.xla_cpu_scheduler == 'memory':
    env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {MEMORY_SCHEDULER_FLAG}'.strip()
  load_before = os.getloadavg()
  results = []
  methods = FAMILY if args.methods == 'family' else args.methods.split(',')
  for method in methods:
    cmd = [sys.executable, os.path.abspath(__file__), f'--method={method}',
           f'--variant={args.variant}', f'--image_size={args.image_size}',
           f'--batch_size={args.batch_size}', f'--bottleneck={args.bottleneck}',
           f'--prompts={args.prompts}',
           f'--rank={args.rank}', f'--adapter_layer_norm={args.adapter_layer_norm}',
           f'--patch_size={args.patch_size}', f'--dtype={args.dtype}',
           f'--steps={args.steps}']
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      sys.exit(f'{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    results.append(json.loads(lines[-1][len('RESULT '):]))
    print(f'{method}: {results[-1]["img_per_sec"]:.2f} img/s, '
          f'peak RSS {results[-1]["peak_rss_mib"]:.0f} MiB', file=sys.stderr, flush=True)
  from vadapt import metrics  # pylint: disable=g-import-not-at-top
  metrics.report_benchmark('Train step: full fine-tuning vs adapters vs linear probe',
                           _table(results, args), load_before, _machine(), args.out)


if __name__ == '__main__':
  main()
