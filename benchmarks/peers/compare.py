r"""vadapt against the PyTorch tools a user would pick instead, side by side on this machine.

  bash benchmarks/peers/setup.sh          # once: benchmarks/peers/.venv (torch CPU, transformers,
                                          # AdapterHub adapters, peft)
  python benchmarks/peers/compare.py --out=benchmarks/results/peers_cpu
  python benchmarks/peers/compare.py --suites=Ti4 --modes=forward,houlsby --rounds=1   # quick

For every suite (model, resolution, batch) and mode, one vadapt process (benchmarks/train_step.py:
the trainer's own step, or the jitted forward) and one PyTorch process
(benchmarks/peers/peer_step.py: transformers ViT with adapters/peft) run one after the other,
alternating which goes first, for `--rounds` rounds. The figure per side is the median over
rounds of each process's median step time. Same model shapes, batch, bottleneck 64, 100 classes,
AdamW with global-norm clipping, 2 threads on both sides. The machine's matmul limit is measured
first in both environments (benchmarks/peers/matmul.py). Writes <out>.md, <out>.json and, where
matplotlib is installed, <out>.png.

Top-block modes (`--modes=pfeiffer+top4,pfeiffer+top4_cached,lora+top4,lora+top4_cached`): the
method on the top 4 of the 12 blocks on both sides (AdapterHub `leave_out`, peft
`layers_to_transform`); `_cached` trains vadapt on the cached input of the lowest adapted block
(config.cache_features), which the PyTorch tools do not offer: its step runs the top blocks only,
and the one-off pass over the frozen blocks below (once per training example, not per step) is
reported as its own column.

The forward rows load the same weights on both sides: a random Hugging Face ViT written once per
suite with save_pretrained (in a temporary directory), read by transformers' from_pretrained and by
vadapt's own checkpoint loader; the table gives the largest logit difference between the sides.

`--vadapt_flags=NAME:FLAGS` (repeatable) adds a vadapt side that runs with FLAGS appended to
XLA_FLAGS, interleaved with the others in every round: an A/B of XLA:CPU options on the same
machine and in the same run, e.g.
  --vadapt_flags=individual_dot:--xla_cpu_experimental_ynn_fusion_type=individual_dot
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PEER_PYTHON = os.path.join(HERE, '.venv', 'bin', 'python')

# name -> (variant, patch override, image size, batch)
SUITES = {
    'B16': ('B/16', 0, 224, 8),
    'Ti4': ('Ti/16', 4, 32, 64),
}
MODES = ('forward', 'full', 'pfeiffer', 'houlsby', 'parallel', 'lora')
TOP_MODES = ('pfeiffer+top4', 'pfeiffer+top4_cached', 'lora+top4', 'lora+top4_cached')
DEPTH = 12  # Blocks of every suite's variant (Ti/16, B/16).
# --gelu -> transformers' hidden_act.
HIDDEN_ACT = {'exact': 'gelu', 'tanh': 'gelu_pytorch_tanh'}
MEMORY_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def _result(cmd: list[str], env: dict) -> dict:
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return {'error': f'exit {proc.returncode}: {tail[:300]}'}
  return json.loads(lines[-1][len('RESULT '):])


def _weights(suite, args) -> str:
  """The forward rows' weights: one Hugging Face save_pretrained directory per suite."""
  return os.path.join(args.weights_dir, suite) if args.weights_dir else ''


def _vadapt_cmd(suite, mode, args):
  variant, patch, size, batch = SUITES[suite]
  weights = [f'--weights={_weights(suite, args)}'] if mode == 'forward' else []
  return [sys.executable, os.path.join(ROOT, 'benchmarks', 'train_step.py'), f'--method={mode}',
          *weights,
          f'--variant={variant}', f'--patch_size={patch}', f'--image_size={size}',
          f'--batch_size={batch}', f'--steps={args.steps}', f'--dtype={args.dtype}',
          # AdapterHub's par_bn has no LayerNorm inside the bottleneck; vadapt's parallel default
          # (AdaptFormer's) has one: the comparison runs the same architecture on both sides.
          '--adapter_layer_norm=false']


def _peer_cmd(suite, mode, args):
  variant, patch, size, batch = SUITES[suite]
  mode, _, option = mode.partition('+')
  top = re.fullmatch(r'top(\d+)(?:_cached)?', option)
  layers = ','.join(str(i) for i in range(DEPTH - int(top[1]), DEPTH)) if top else ''
  weights = [f'--weights={_weights(suite, args)}'] if mode == 'forward' else []
  return [PEER_PYTHON, os.path.join(HERE, 'peer_step.py'), f'--mode={mode}', f'--layers={layers}',
          *weights, f'--hidden_act={HIDDEN_ACT[args.gelu]}', f'--model={variant}',
          f'--patch_size={patch}', f'--image_size={size}', f'--batch_size={batch}',
          f'--steps={args.steps}', f'--dtype={args.dtype}', '--threads=2']


def cpu_description() -> str:
  from vadapt import metrics  # pylint: disable=g-import-not-at-top
  m = metrics.machine()
  return f'{m["cpu"]}; {m["cores"]} cores; SIMD flags: {", ".join(m["flags"]) or "none listed"}'


def _mode_order(mode: str) -> tuple[int, str]:
  """Known modes in their order; 'base+option' right after its base mode."""
  known = MODES + TOP_MODES
  if mode in known:
    return known.index(mode), ''
  base, _, option = mode.partition('+')
  return (known.index(base) if base in known else 99), option


def summarise(results: list[dict], extra_sides: tuple[str, ...] = ()) -> list[dict]:
  """One row per (suite, mode): medians over rounds of each side's img/s and peak RSS."""
  rows = []
  keys = sorted({(r['suite'], r['mode']) for r in results},
                key=lambda k: (list(SUITES).index(k[0]) if k[0] in SUITES else 99,
                               _mode_order(k[1])))
  for suite, mode in keys:
    row = {'suite': suite, 'mode': mode}
    for side in ('vadapt', 'peer'):
      ok = [r for r in results if (r['suite'], r['mode'], r['side']) == (suite, mode, side)
            and 'error' not in r]
      if ok:
        row[f'{side}_img_per_sec'] = statistics.median(r['img_per_sec'] for r in ok)
        row[f'{side}_rss_mib'] = statistics.median(r['peak_rss_mib'] for r in ok)
        row[f'{side}_trainable'] = ok[0].get('trainable')
        if ok[0].get('step_gflop'):  # XLA's count of the vadapt step (the same math as the peer's).
          row['step_gflop'] = ok[0]['step_gflop']
        prefix = [r['prefix_sec_per_batch'] for r in ok if r.get('prefix_sec_per_batch')]
        if prefix:  # The one-off pass over the frozen blocks below (cached modes).
          row['prefix_img_per_sec'] = SUITES[suite][3] / statistics.median(prefix)
      else:
        errors = [r['error'] for r in results
                  if (r['suite'], r['mode'], r['side']) == (suite, mode, side)]
        row[f'{side}_error'] = errors[0] if errors else 'not run'
    logits = {side: [r['logits0'] for r in results if (r['suite'], r['mode'], r['side']) ==
                     (suite, mode, side) and r.get('logits0')] for side in ('vadapt', 'peer')}
    if logits['vadapt'] and logits['peer']:  # Both loaded the same file: the same function.
      row['max_logit_diff'] = max(abs(a - b) for v in logits['vadapt'] for p in logits['peer']
                                  for a, b in zip(v, p))
    if 'vadapt_img_per_sec' in row and 'peer_img_per_sec' in row:
      row['speed_ratio'] = row['vadapt_img_per_sec'] / row['peer_img_per_sec']
      row['rss_ratio'] = row['vadapt_rss_mib'] / row['peer_rss_mib']
    for side in extra_sides:
      ok = [r['img_per_sec'] for r in results
            if (r['suite'], r['mode'], r['side']) == (suite, mode, side) and 'error' not in r]
      if ok and 'vadapt_img_per_sec' in row:
        row[f'{side}_img_per_sec'] = statistics.median(ok)
        row[f'{side}_vs_vadapt'] = row[f'{side}_img_per_sec'] / row['vadapt_img_per_sec']
    rows.append(row)
  return rows


def markdown(rows: list[dict], matmul: dict, header: str,
             extra_sides: tuple[str, ...] = ()) -> str:
  lines = [header, '',
           '| suite | mode | PyTorch peer img/s | vadapt img/s | speed ratio | peer RSS MiB | '
           'vadapt RSS MiB | RSS ratio | trainable (vadapt / peer) |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|']
  fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else 'n/a'
  times = lambda v: f'{v:.2f}x' if isinstance(v, (int, float)) else 'n/a'
  for r in rows:
    lines.append(
        f'| {r["suite"]} | {r["mode"]} | {fmt(r.get("peer_img_per_sec"), ".2f")} | '
        f'{fmt(r.get("vadapt_img_per_sec"), ".2f")} | {times(r.get("speed_ratio"))} | '
        f'{fmt(r.get("peer_rss_mib"), ".0f")} | {fmt(r.get("vadapt_rss_mib"), ".0f")} | '
        f'{times(r.get("rss_ratio"))} | {fmt(r.get("vadapt_trainable"), ",")} / '
        f'{fmt(r.get("peer_trainable"), ",")} |')
  errors = [(r['suite'], r['mode'], side, r[f'{side}_error']) for r in rows
            for side in ('vadapt', 'peer') if f'{side}_error' in r]
  if errors:
    lines += ['', 'Not measured:', '']
    lines += [f'- {s} {m} ({side}): {e}' for s, m, side, e in errors]
  same = [r for r in rows if 'max_logit_diff' in r]
  if same:
    lines += ['', 'Forward rows load one Hugging Face `save_pretrained` file per suite on both '
              "sides (vadapt through its own loader, with the GELU form and LayerNorm epsilon "
              "1e-12 the file's config.json gives), compiled before the weights load; largest "
              "|logit difference| "
              'between the sides on the same images: ' + ', '.join(
                  f'{r["suite"]} {r["max_logit_diff"]:.1e}' for r in same) + '.']
  counted = [r for r in rows if 'step_gflop' in r]
  if counted:
    # The header starts with the run's dtype (main); float32 where it does not.
    dtype = 'bfloat16' if header.startswith('bfloat16') else 'float32'
    limits = {side: matmul.get(f'{lib}_{dtype}') for side, lib in (('vadapt', 'jax'),
                                                                    ('peer', 'torch'))}
    lines += ['', "Work rate: XLA's FLOP count of the vadapt step (forward: the forward pass), "
              'the same arithmetic on both sides, per second, and its share of each side\'s own '
              f'matmul limit below (jax {dtype} for vadapt, torch {dtype} for the peer):', '',
              '| suite | mode | GFLOP per step | vadapt GFLOP/s | % of jax limit | '
              'peer GFLOP/s | % of torch limit |', '|---|---|---:|---:|---:|---:|---:|']
    for r in counted:
      batch = SUITES[r['suite']][3] if r['suite'] in SUITES else None
      rate = {side: r['step_gflop'] * r[f'{side}_img_per_sec'] / batch
              for side in ('vadapt', 'peer') if batch and f'{side}_img_per_sec' in r}
      share = lambda side: (f'{100 * rate[side] / limits[side]:.0f}%'
                            if side in rate and limits.get(side) else 'n/a')
      lines.append(f'| {r["suite"]} | {r["mode"]} | {r["step_gflop"]:.1f} | '
                   f'{fmt(rate.get("vadapt"), ".0f")} | {share("vadapt")} | '
                   f'{fmt(rate.get("peer"), ".0f")} | {share("peer")} |')
  cached = [r for r in rows if 'prefix_img_per_sec' in r]
  if cached:
    lines += ['', 'Cached rows: the step runs the adapted top blocks on cached inputs; the frozen '
              'blocks below run once per training example (not per step), at this rate:', '',
              '| suite | mode | one-off prefix pass img/s | vadapt img/s over E epochs, E = 1 / 3 '
              '/ 10 | vs peer, E = 1 / 3 / 10 |', '|---|---|---:|---:|---:|']
    for r in cached:
      # Per example and epoch: one step's share, plus the prefix pass once over all epochs.
      over = [1.0 / (1.0 / r['vadapt_img_per_sec'] + 1.0 / (e * r['prefix_img_per_sec']))
              for e in (1, 3, 10)]
      vs = [o / r['peer_img_per_sec'] for o in over] if 'peer_img_per_sec' in r else []
      lines.append(f'| {r["suite"]} | {r["mode"]} | {r["prefix_img_per_sec"]:.2f} | '
                   + ' / '.join(f'{o:.2f}' for o in over) + ' | '
                   + (' / '.join(f'{v:.2f}x' for v in vs) or 'n/a') + ' |')
  if extra_sides:
    lines += ['', 'vadapt with extra XLA flags, same rounds (img/s, and the ratio to vadapt '
              'as above):', '', '| suite | mode | ' + ' | '.join(
                  f'{s} img/s | {s} / vadapt' for s in extra_sides) + ' |',
              '|---|---|' + '---:|---:|' * len(extra_sides)]
    for r in rows:
      lines.append(f'| {r["suite"]} | {r["mode"]} | ' + ' | '.join(
          f'{fmt(r.get(f"{s}_img_per_sec"), ".2f")} | {times(r.get(f"{s}_vs_vadapt"))}'
          for s in extra_sides) + ' |')
  if matmul:
    lines += ['', f'Matmul limit at {matmul.get("shape")} (GFLOP/s, 2 threads): ' + ', '.join(
        f'{k} {v:.0f}' for k, v in matmul.items() if isinstance(v, float)) + '.']
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], path: str, extra_sides: tuple[str, ...] = ()) -> bool:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  rows = [r for r in rows if 'speed_ratio' in r]
  if not rows:
    return False
  fig, ax = plt.subplots(figsize=(8, 4))
  labels = [f'{r["suite"]}\n{r["mode"]}' for r in rows]
  sides = ('vadapt', *extra_sides)
  width = 0.8 / len(sides)
  for i, side in enumerate(sides):
    ratios = [r['speed_ratio'] * r.get(f'{side}_vs_vadapt', float('nan') if i else 1.0)
              for r in rows]
    ax.bar([x + (i - (len(sides) - 1) / 2) * width for x in range(len(rows))], ratios, width,
           label=side)
  ax.axhline(1.0, color='black', lw=0.8)
  ax.set_xticks(range(len(rows)), labels, fontsize=7)
  ax.set_ylabel('vadapt img/s / PyTorch peer img/s')
  ax.set_title('vadapt vs PyTorch (transformers + adapters / peft), same CPU')
  if extra_sides:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--suites', default=','.join(SUITES))
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--gelu', choices=tuple(HIDDEN_ACT), default='exact',
                      help="The peer's GELU (transformers' default: exact). The forward rows' "
                           'file carries it, so both sides compute it there; in the training '
                           'rows vadapt keeps its ViT default, the tanh form.')
  parser.add_argument('--out', default=None, help='Writes <out>.md, <out>.json, <out>.png.')
  parser.add_argument('--vadapt_flags', action='append', default=[], metavar='NAME:FLAGS',
                      help='An extra vadapt side run with FLAGS added to XLA_FLAGS.')
  args = parser.parse_args()
  if not os.path.exists(PEER_PYTHON):
    sys.exit(f'error: {PEER_PYTHON} not found: run bash benchmarks/peers/setup.sh first.')
  args.weights_dir = ''
  tmp = None
  if 'forward' in args.modes.split(','):
    tmp = tempfile.TemporaryDirectory(prefix='vadapt_peer_weights_')
    args.weights_dir = tmp.name
    for suite in args.suites.split(','):
      variant, patch, size, _ = SUITES[suite]
      saved = _result([PEER_PYTHON, os.path.join(HERE, 'peer_step.py'), '--mode=forward',
                       f'--hidden_act={HIDDEN_ACT[args.gelu]}',
                       f'--model={variant}', f'--patch_size={patch}', f'--image_size={size}',
                       f'--save={_weights(suite, args)}'], dict(os.environ))
      if 'error' in saved:
        sys.exit(f'error: writing the {suite} weights failed: {saved["error"]}')
  extra = {}
  for item in args.vadapt_flags:
    name, sep, flags = item.partition(':')
    if not sep or not name or not flags.strip() or name in ('vadapt', 'peer', *extra):
      sys.exit(f'error: --vadapt_flags expects NAME:FLAGS with a new NAME, got {item!r}.')
    extra[name] = flags.strip()
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {MEMORY_SCHEDULER_FLAG}'.strip()
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  load_before = os.getloadavg()
  matmul = {**_result([PEER_PYTHON, os.path.join(HERE, 'matmul.py')], env),
            **_result([sys.executable, os.path.join(HERE, 'matmul.py')], env)}
  results = []
  for rnd in range(args.rounds):
    for suite in args.suites.split(','):
      for mode in args.modes.split(','):
        sides = [('vadapt', _vadapt_cmd, env), ('peer', _peer_cmd, env)]
        sides += [(name, _vadapt_cmd, {**env, 'XLA_FLAGS': f'{env["XLA_FLAGS"]} {flags}'})
                  for name, flags in extra.items()]
        if rnd % 2:
          sides.reverse()
        for side, make_cmd, side_env in sides:
          r = _result(make_cmd(suite, mode, args), side_env)
          r.update(side=side, suite=suite, mode=mode, round=rnd)
          results.append(r)
          print(f'round {rnd} {suite} {mode} {side}: '
                + (r['error'] if 'error' in r else
                   f'{r["img_per_sec"]:.2f} img/s, peak RSS {r["peak_rss_mib"]:.0f} MiB'),
                file=sys.stderr, flush=True)
  load_after = os.getloadavg()
  rows = summarise(results, tuple(extra))
  header = (f'{args.dtype}, median over {args.rounds} round(s) of each process\'s median of '
            f'{args.steps} steps; bottleneck 64, 100 classes, 2 threads; the peer\'s GELU: '
            f'{args.gelu}, vadapt\'s: tanh (forward rows: the file\'s, {args.gelu}).\n\n'
            f'Machine: {cpu_description()}.\n\nLoad average before: '
            f'{", ".join(f"{x:.2f}" for x in load_before)}; after: '
            f'{", ".join(f"{x:.2f}" for x in load_after)}.')
  if extra:
    header += '\n\nExtra vadapt sides: ' + '; '.join(f'{n}: `{f}`' for n, f in extra.items()) + '.'
  table = markdown(rows, matmul, header, tuple(extra))
  print(table)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + '.md', 'w') as f:
      f.write('# vadapt vs PyTorch peers (transformers + AdapterHub adapters / peft)\n\n'
              f'Command: `python benchmarks/peers/compare.py {" ".join(sys.argv[1:])}`\n\n' + table)
    with open(args.out + '.json', 'w') as f:
      json.dump({'matmul': matmul, 'results': results, 'rows': rows, 'extra_sides': extra}, f,
                indent=1)
    plot(rows, args.out + '.png', tuple(extra))
  if tmp:
    tmp.cleanup()


if __name__ == '__main__':
  main()
