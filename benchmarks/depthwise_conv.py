r"""EfficientNet-Lite's depthwise convolutions: shifted multiply-adds against XLA's grouped conv.

  python benchmarks/depthwise_conv.py --out=benchmarks/results/depthwise_conv_cpu_amd.md
  python benchmarks/depthwise_conv.py --image_size=32 --rounds=2      # a smoke run

The same EfficientNet-Lite0 params run with `depthwise='shifted'` (vadapt.layers.DepthwiseConv,
the CPU default) and `depthwise='conv'` (XLA's convolution with feature_group_count = channels):
the forward pass, the gradient a conv adapter needs (with respect to the input, frozen weights),
full fine-tuning's gradient (every weight) and LoRA's (rank 8 on every block's expand and project
conv, the gradient of its factors). A third column runs the shifted sum with autodiff's
gradient instead of DepthwiseConv's own VJP, a fourth the own VJP without the conditional that
keeps XLA:CPU from fusing the gradients into each of their consumers. Everything is jitted and
compiled first, then timed round-robin (one call of each per round, the median over rounds), so
machine load hits every implementation alike. The outputs' largest relative difference is
reported too.
"""

from __future__ import annotations

import argparse
import contextlib
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
  impls = {'conv': 'conv', 'autodiff': 'shifted', 'fused': 'shifted', 'shifted': 'shifted'}
  models = {impl: efficientnet.from_variant(args.variant, num_classes=10, depthwise=depthwise)
            for impl, depthwise in impls.items()}
  params = jax.jit(models['conv'].init)(jax.random.key(1), x)
  lora = _lora_gradient(args, x)
  fns = {}
  for impl, m in models.items():
    loss = lambda p, x, m=m: (m.apply(p, x) ** 2).sum()
    passes = {'forward': (jax.jit(lambda p, x, m=m: m.apply(p, x)), (params, x)),
              'input gradient (adapters)': (jax.jit(jax.grad(loss, argnums=1)), (params, x)),
              'weight gradient (full fine-tuning)': (jax.jit(jax.grad(loss)), (params, x)),
              'LoRA factors\' gradient': lora(impls[impl])}
    # Traced (and compiled) here, under the choice.
    with _autodiff_vjp(impl == 'autodiff'), _unconditional_vjp(impl == 'fused'):
      for what, (fn, fn_args) in passes.items():
        fns[(what, impl)] = (fn.lower(*fn_args).compile(), fn_args)
  for fn, fn_args in fns.values():
    jax.block_until_ready(fn(*fn_args))
  times = {k: [] for k in fns}
  for _ in range(args.rounds):
    for k, (fn, fn_args) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*fn_args))
      times[k].append(time.perf_counter() - start)
  out = {k: fns[('forward', k)][0](params, x) for k in ('shifted', 'conv')}
  diff = float(jnp.abs(out['shifted'] - out['conv']).max() / jnp.abs(out['conv']).max())
  grads = {k: fns[("LoRA factors' gradient", k)] for k in ('shifted', 'autodiff', 'fused')}
  grads = {k: jax.tree.leaves(fn(*fn_args)) for k, (fn, fn_args) in grads.items()}
  identical = all(bool((a == b).all()) for a, b in zip(grads['shifted'], grads['fused']))
  grad_diff = (max(float(jnp.abs(a - b).max()) for a, b in zip(grads['shifted'], grads['autodiff']))
               / max(float(jnp.abs(b).max()) for b in grads['autodiff']))

  lines = [f'EfficientNet-{args.variant.capitalize()}, {args.image_size}px, batch '
           f'{args.batch_size}, float32; median of {args.rounds} round-robin rounds.', '',
           '| pass | XLA grouped conv img/s | shifted, autodiff\'s VJP img/s | own VJP, no '
           'conditional img/s | shifted (DepthwiseConv) img/s | speed-up over the grouped conv | '
           'over autodiff\'s VJP | over no conditional |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for what in dict.fromkeys(k for k, _ in fns):
    ips = {impl: args.batch_size / statistics.median(times[(what, impl)]) for impl in impls}
    lines.append(f'| {what} | {ips["conv"]:.1f} | {ips["autodiff"]:.1f} | {ips["fused"]:.1f} | '
                 f'{ips["shifted"]:.1f} | {ips["shifted"] / ips["conv"]:.2f}x | '
                 f'{ips["shifted"] / ips["autodiff"]:.2f}x | '
                 f'{ips["shifted"] / ips["fused"]:.2f}x |')
  lines += ['', f'Largest logit difference between the two, relative to the largest logit: '
            f'{diff:.1e}; largest difference between the two VJPs\' LoRA gradients, relative to '
            f'their largest entry: {grad_diff:.1e}. With and without the conditional the LoRA '
            f'gradients are {"bit for bit the same" if identical else "NOT bit-identical"}.']
  metrics.report_benchmark('Depthwise convolutions on XLA:CPU', '\n'.join(lines), load_before,
                           metrics.machine_line(), args.out)


@contextlib.contextmanager
def _autodiff_vjp(enabled: bool):
  """Traces DepthwiseConv with autodiff's gradient of the shifted sum instead of its own VJP."""
  from vadapt import layers  # pylint: disable=g-import-not-at-top
  own = layers._depthwise  # pylint: disable=protected-access
  if enabled:
    layers._depthwise = layers._shifted_taps  # pylint: disable=protected-access
  try:
    yield
  finally:
    layers._depthwise = own  # pylint: disable=protected-access


@contextlib.contextmanager
def _unconditional_vjp(enabled: bool):
  """Traces DepthwiseConv with its own gradients called directly, not behind the conditional."""
  from vadapt import layers  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  if not enabled:
    yield
    return
  layers._depthwise.defvjp(layers._depthwise_fwd, layers._depthwise_grads)
  try:
    yield
  finally:
    layers._depthwise.defvjp(layers._depthwise_fwd, layers._depthwise_bwd)
  # pylint: enable=protected-access


def _lora_gradient(args, x):
  """depthwise -> (jitted gradient of LoRA's factors on the frozen Lite0, its arguments)."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import cnn_adapter  # pylint: disable=g-import-not-at-top
  from vadapt import experiment, partition  # pylint: disable=g-import-not-at-top

  def make(depthwise):
    c = cnn_adapter.get_config(f'method=lora,variant={args.variant},'
                               f'image_size={args.image_size}')
    c.backbone.checkpoint = ''
    c.backbone.overrides = {'depthwise': depthwise}
    model, backbone = experiment.build_model(c, 10)
    sample = x[:1]

    def init(rng):
      backbone_params = partition.from_variables(backbone.init(rng, sample, train=False))
      return experiment.init_adapted(model, backbone_params, rng, sample)

    rng = jax.random.key(1)
    labels = partition.label_tree(jax.eval_shape(init, rng), experiment.label_rules(c))
    delta, frozen = jax.jit(lambda r: partition.split(init(r), labels))(rng)

    def loss(delta, frozen, x):
      variables = partition.to_variables(partition.merge(delta, frozen))
      return (model.apply(variables, x, train=False) ** 2).sum()

    return jax.jit(jax.grad(loss)), (delta, frozen, x)

  return make


if __name__ == '__main__':
  main()
