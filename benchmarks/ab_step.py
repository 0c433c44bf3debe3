r"""A/B of train-step variants in one process, one step of each in turn: paired speed ratios that
hold on a machine whose speed drifts.

  python benchmarks/ab_step.py --suites=Ti4,S14 --methods=pfeiffer,full \
      --variants='xla=;individual_dots=xla_cpu_individual_dots=True' --rounds=20
  python benchmarks/ab_step.py --suites=B16 --methods=full \
      --variants='plain=;act=backbone.recompute_activation=True'

On a shared 2-core machine the speed itself drifts (the PyTorch peer's own ViT-B/16 full
fine-tuning step ran at 1.50 img/s in results/peers_cpu_amd_all_methods.md and at 1.15 in
results/peers_cpu_amd_full_act.md, same machine kind), so two configurations timed in separate
processes can differ by as much as the effects being measured. Here every
variant is compiled in the same process with the trainer's own pieces (vadapt.experiment and
vadapt.train, as benchmarks/train_step.py builds them), then the rounds run one step of each
variant back to back, rotating the order; each variant's time is set against the first variant's
in the same round and the ratio's median over rounds is reported with its quartiles. Compiler
options (config.compiler_options, config.xla_cpu_individual_dots) are per compile, so they A/B
here too; XLA_FLAGS are per process and cannot (compare processes with train_step.py for those).

A variant is `name=overrides`, overrides a comma-separated list of trainer-config assignments
(`backbone.recompute_activation=True`, `compiler_options.xla_cpu_enable_fast_math=False`),
values read as Python literals. Peak RSS is not per variant here (they share the process);
XLA's own step memory is. Each (suite, method) runs after the previous one's
variants are freed.
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

# Model, patch (0: the variant's), image size, batch: the peer comparison's suites, and DINOv2
# ViT-S/14's width (384) between them.
SUITES = {
    'B16': ('B/16', 0, 224, 8),
    'S14': ('S/14', 0, 224, 8),
    'Ti4': ('Ti/16', 4, 32, 64),
    'mu4': ('mu/4', 0, 32, 8),  # A smoke test's.
}


def parse_variants(spec: str) -> list[tuple[str, dict]]:
  """'a=;b=x.y=1,z=True' -> [('a', {}), ('b', {'x.y': 1, 'z': True})]."""
  variants = []
  for item in filter(None, (s.strip() for s in spec.split(';'))):
    name, sep, rest = item.partition('=')
    if not sep or not name:
      raise ValueError(f"A variant is 'name=overrides'; found {item!r}.")
    overrides = {}
    for assignment in filter(None, (s.strip() for s in rest.split(','))):
      key, sep, value = assignment.partition('=')
      if not sep:
        raise ValueError(f"An override is 'key=value'; found {assignment!r} in {item!r}.")
      try:
        overrides[key] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        overrides[key] = value  # A bare string.
    variants.append((name, overrides))
  if len({n for n, _ in variants}) != len(variants) or len(variants) < 2:
    raise ValueError(f'Give two or more variants with distinct names; found {spec!r}.')
  return variants


def _set(config, key: str, value) -> None:
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    if p not in node or node[p] is None:
      node[p] = {}
    node = node[p]
  node[leaf] = value


def build(args, suite: str, method: str, overrides: dict):
  """(compiled step, [delta, opt_state, frozen, batch], XLA step MiB, GFLOP) for one variant."""
  import jax
  import ml_collections
  from vadapt import experiment, train
  variant, patch, size, batch_size = SUITES[suite]
  method, _, option = method.partition('+')
  config = train_step.trainer_config(
      method=method, variant=variant, image_size=size, dtype='float32', patch_size=patch,
      option=option, bottleneck=args.bottleneck, rank=args.rank).to_dict()
  config = ml_collections.ConfigDict(config)
  for key, value in overrides.items():
    _set(config, key, value)
  num_classes = 100
  model, backbone = experiment.build_model(config, num_classes)
  _, delta, frozen, schedule, tx, opt_state, batch = train_step.init_state(
      config, model, backbone, size, batch_size, num_classes)
  step = jax.jit(train.make_train_step(model, tx, schedule, num_classes=num_classes,
                                       label_smoothing=0.0, seed=0),
                 donate_argnums=(0, 1), compiler_options=experiment.compiler_options(config))
  compiled = step.lower(delta, opt_state, frozen, batch, 0).compile()
  step_mib = train_step.xla_step_mib(compiled)
  return compiled, [delta, opt_state, frozen, batch], step_mib, train_step._gflop(compiled)  # pylint: disable=protected-access


def run(args, suite: str, method: str) -> str:
  """The markdown table of one (suite, method): every variant against the first."""
  import jax
  import numpy as np
  from vadapt import host_memory
  variants = parse_variants(args.variants)
  built = {}
  for name, overrides in variants:
    built[name] = build(args, suite, method, overrides)
    host_memory.release()
  batch_size = SUITES[suite][3]

  def one_step(name, step_index):
    compiled, state, _, _ = built[name]
    delta, opt_state, frozen, batch = state
    start = time.perf_counter()
    delta, opt_state, metrics = compiled(delta, opt_state, frozen, batch, step_index)
    jax.block_until_ready((delta, metrics))
    state[0], state[1] = delta, opt_state
    return time.perf_counter() - start

  names = [n for n, _ in variants]
  for i in range(args.warmup):
    for name in names:
      one_step(name, i)
  times = {n: [] for n in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      times[name].append(one_step(name, args.warmup + r))
  base = names[0]
  load = os.getloadavg()
  variant, patch, size, _ = SUITES[suite]
  lines = [
      f'## {suite}, {method}', '',
      f'ViT-{variant}, patch {patch or "native"}, {size} px, batch {batch_size}, float32; '
      f'{args.rounds} rounds of one step per variant after {args.warmup} warm-up steps each; '
      f'load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}.', '',
      f'| variant | overrides | median ms | img/s | speed vs {base} (median, quartiles) | '
      'XLA step MiB | GFLOP/step |',
      '|---|---|---:|---:|---|---:|---:|']
  for name, overrides in variants:
    ratios = [b / t for b, t in zip(times[base], times[name])]
    q = np.percentile(ratios, [25, 50, 75])
    med = statistics.median(times[name])
    _, _, step_mib, gflop = built[name]
    shown = ', '.join(f'{k}={v!r}' for k, v in overrides.items()) or '(none)'
    lines.append(f'| {name} | `{shown}` | {med * 1e3:.1f} | {batch_size / med:.2f} | '
                 f'{q[1]:.3f}x ({q[0]:.3f}-{q[2]:.3f}) | '
                 f'{"" if step_mib is None else f"{step_mib:.0f}"} | '
                 f'{"" if gflop is None else f"{gflop:.1f}"} |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--suites', default='Ti4', help=f'Comma-separated, of {sorted(SUITES)}.')
  parser.add_argument('--methods', default='pfeiffer',
                      help="Comma-separated train_step.py methods ('+act', '+remat' etc.).")
  parser.add_argument('--variants', required=True,
                      help="';'-separated 'name=overrides'; the first is the baseline.")
  parser.add_argument('--rounds', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--bottleneck', type=int, default=64)
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--out', default=None, help='Also write the tables (markdown) here.')
  args = parser.parse_args()
  parse_variants(args.variants)  # Bad input fails before any work.
  suites = args.suites.split(',')
  if set(suites) - set(SUITES):
    sys.exit(f'Unknown suites {sorted(set(suites) - set(SUITES))}; known: {sorted(SUITES)}.')
  if 'concurrency_optimized_scheduler' not in os.environ.get('XLA_FLAGS', ''):
    # What train_step.py and the CLI set (the memory-ordered scheduler), before jax starts.
    os.environ['XLA_FLAGS'] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f'{train_step.MEMORY_SCHEDULER_FLAG}').strip()
  import jax  # pylint: disable=g-import-not-at-top
  from vadapt import metrics  # pylint: disable=g-import-not-at-top
  load_before, start = os.getloadavg(), time.perf_counter()
  tables = []
  for suite in suites:
    for method in args.methods.split(','):
      tables.append(run(args, suite, method))
      print(tables[-1], '\n', flush=True)
      jax.clear_caches()
  metrics.report_benchmark(
      'Train-step variants A/B in one process', f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}.\n\n"
      + '\n\n'.join(tables), load_before, metrics.machine_line(), args.out,
      wall_seconds=time.perf_counter() - start)


if __name__ == '__main__':
  main()
