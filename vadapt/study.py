r"""A transfer study: every method on one frozen backbone and one protocol, with tables and plots.

  python -m vadapt.main --config=configs/transfer_study.py --workdir=workdir/study --mode=study

The protocol is VTAB-1k's, on the config's data (`config.study`):
  1. select: each method at each learning rate of its grid (`study.learning_rates[method]`), seed
     `study.seeds[0]`, trained on the first `train_examples - val_examples` training examples and
     evaluated on the next `val_examples` (800 / 200). The best validation accuracy picks the rate
     (ties go to the earlier rate of the grid).
  2. final: each method at its rate, trained on the first `train_examples` with every seed and
     evaluated on `study.test_split` (all 10,000 Fashion-MNIST test images).
  3. sweep: `study.sweep_methods` on the first n of each of `study.sweep_sizes` examples, every
     seed, at the rate chosen in 1 (a size equal to `train_examples` reuses the final runs).

A study method is one of vadapt's methods or a variant (`study.variants[name]`): config overrides
by dotted path, e.g. {'adapter.method': 'full', 'optimizer.lr_mults': (('^head/', 1000.0),)}
(full fine-tuning with its head at 1000x the rate), studied like any other method: its own grid,
runs and row. A ConfigDict takes no dots in its keys, so the config holds each variant's overrides
as (path, value) pairs (`study.variant_pairs`).

Each run is a normal training run (vadapt.train) in its own workdir, WORKDIR/<phase>/<method>/...
(the rate in the path); a finished run's result.json is reused, so a stopped study continues where
it stopped, and a widened grid trains only the new rates and what they change. With
`study.isolate` each run trains in a fresh process, so that its peak memory is its own.

Written to WORKDIR: study.json (every run, the chosen rates and the aggregates), study.md (the
tables and the machine they ran on) and the plots accuracy_vs_params.png, accuracy_vs_time.png and
data_sweep.png.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import time
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from vadapt import metrics as metrics_lib

STUDY_FILE = 'study.json'
TABLE_FILE = 'study.md'
PLOT_FILES = ('accuracy_vs_params.png', 'accuracy_vs_time.png', 'data_sweep.png')
PHASES = ('select', 'final', 'sweep')


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the study.

  Attributes:
    phase: 'select' (validation, choosing the rate), 'final' or 'sweep' (test split).
    method: the adapter method.
    seed: config.seed of the run.
    train_examples: the first n training examples it trains on.
    learning_rate: its peak learning rate.
    workdir: where it trains (relative to the study's workdir).
  """
  phase: str
  method: str
  seed: int
  train_examples: int
  learning_rate: float
  workdir: str


def _lr_name(lr: float) -> str:
  return f'lr{lr:g}'


# What the study sets in each run; a variant may not override it.
_STUDY_FIELDS = ('optimizer.learning_rate', 'seed', 'input.train_split', 'input.eval_split',
                 'input.vtab_1k')


def variant_pairs(overrides: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
  """A variant's {dotted path: value} as the (path, value) pairs config.study.variants holds."""
  return tuple((str(k), v) for k, v in overrides.items())


def variant(config: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
  """{dotted path: value} of study method `method` ({} for one of vadapt's own methods)."""
  pairs = (config.study.get('variants') or {}).get(method)
  return {} if pairs is None else dict(pairs)


def _set(c: ml_collections.ConfigDict, path: str, value: Any) -> None:
  """c.<path> = value, for a dotted path that exists in c."""
  *parents, leaf = path.split('.')
  node = c
  for name in parents:
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise KeyError(path)
  node[leaf] = value


def _check_variant(config: ml_collections.ConfigDict, name: str, pairs: Any) -> None:
  from vadapt import experiment  # pylint: disable=g-import-not-at-top
  where = f'config.study.variants[{name!r}]'
  try:
    overrides = dict(pairs)
  except (TypeError, ValueError):
    raise ValueError(f'{where} must be (dotted path, value) pairs, e.g. '
                     f"(('adapter.method', 'full'),); found {pairs!r}.") from None
  base = overrides.get('adapter.method')
  if base not in experiment.METHODS:
    raise ValueError(f'{where} has adapter.method {base!r}: a variant names the method it varies, '
                     f'one of {experiment.METHODS}.')
  probe = copy.deepcopy(config)
  for path, value in overrides.items():
    if path in _STUDY_FIELDS or path.startswith('study.'):
      raise ValueError(f'{where} overrides {path}, which the study sets in every run.')
    try:
      _set(probe, path, value)
    except (KeyError, AttributeError):
      raise ValueError(f'{where} overrides {path!r}, which is not a field of the config.') from None
    except TypeError as e:
      raise ValueError(f'{where} sets {path} to {value!r}: {e}'.replace('\n', ' ')) from None


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses a study config that cannot run, before any work, in one line."""
  from vadapt import experiment  # pylint: disable=g-import-not-at-top
  s = config.get('study')
  if not s:
    raise ValueError('--mode=study needs config.study (see configs/transfer_study.py).')
  if not s.methods:
    raise ValueError('config.study.methods is empty: nothing to study.')
  variants = s.get('variants') or {}
  for name, pairs in variants.items():
    _check_variant(config, name, pairs)
  for m in s.methods:
    if m not in experiment.METHODS and m not in variants:
      raise ValueError(f'config.study has method {m!r}, neither a known method '
                       f'{experiment.METHODS} nor one of study.variants {tuple(variants)}.')
    if not tuple((s.learning_rates or {}).get(m) or ()):
      raise ValueError(f'config.study.learning_rates has no grid for method {m!r} (a tuple of '
                       'peak learning rates).')
  missing = [m for m in s.sweep_methods or () if m not in s.methods]
  if missing:
    raise ValueError(f'config.study.sweep_methods {missing} are not in study.methods: their '
                     'rate is chosen in the selection phase.')
  if not s.seeds:
    raise ValueError('config.study.seeds is empty: give at least one seed.')
  if not 0 < s.val_examples < s.train_examples:
    raise ValueError(f'config.study needs 0 < val_examples < train_examples; found '
                     f'{s.val_examples} and {s.train_examples}.')
  if any(n <= 0 for n in s.sweep_sizes or ()):
    raise ValueError(f'config.study.sweep_sizes must be positive; found {tuple(s.sweep_sizes)}.')


def selection_runs(config: ml_collections.ConfigDict) -> list[Run]:
  s = config.study
  n = s.train_examples - s.val_examples
  return [Run('select', m, s.seeds[0], n, float(lr), os.path.join('select', m, _lr_name(lr)))
          for m in s.methods for lr in s.learning_rates[m]]


def choose_rates(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """method -> the learning rate of its best validation accuracy (ties: the earlier run)."""
  best: dict[str, tuple[float, float]] = {}
  for r in records:
    if r['phase'] != 'select':
      continue
    if r['method'] not in best or r['accuracy'] > best[r['method']][0]:
      best[r['method']] = (r['accuracy'], r['learning_rate'])
  return {m: lr for m, (_, lr) in best.items()}


def test_runs(config: ml_collections.ConfigDict, rates: Mapping[str, float]) -> list[Run]:
  """The final runs, then the sweep's (a sweep size equal to train_examples is a final run)."""
  s = config.study
  runs = [Run('final', m, seed, s.train_examples, rates[m],
              os.path.join('final', m, _lr_name(rates[m]), f'seed{seed}'))
          for m in s.methods for seed in s.seeds]
  for m in s.sweep_methods or ():
    for n in s.sweep_sizes:
      if n != s.train_examples:
        runs += [Run('sweep', m, seed, n, rates[m],
                     os.path.join('sweep', m, f'n{n}', _lr_name(rates[m]), f'seed{seed}'))
                 for seed in s.seeds]
  return runs


def run_config(config: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The training config of one run: the study's config with its method, rate, seed and data."""
  s = config.study
  overrides = variant(config, run.method)
  c = copy.deepcopy(config)
  with c.unlocked():
    c.adapter.method = run.method
    for path, value in overrides.items():
      _set(c, path, value)
    c.optimizer.learning_rate = run.learning_rate
    c.seed = run.seed
    c.input.vtab_1k = False
    if run.phase == 'select':
      n = s.train_examples - s.val_examples
      c.input.train_split = f'{s.train_split}[:{n}]'
      c.input.eval_split = f'{s.train_split}[{n}:{s.train_examples}]'
    else:
      c.input.train_split = f'{s.train_split}[:{run.train_examples}]'
      c.input.eval_split = s.test_split
    del c['study']
    if 'compare' in c:
      del c['compare']
  c.lock()
  return c


def _train_one(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains one run and returns its row (called in the worker process with `isolate`)."""
  from vadapt import demo  # pylint: disable=g-import-not-at-top
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  size = demo.backbone_bytes(config, input_pipeline.get_info(config.input).num_classes)
  return dataclasses.asdict(demo.run_method(config, workdir, size))


def _execute(config: ml_collections.ConfigDict, runs: Sequence[Run], workdir: str,
             isolate: bool) -> list[dict[str, Any]]:
  """Runs each run (or reuses its result) and returns their records in order."""
  from vadapt import demo  # pylint: disable=g-import-not-at-top
  records = []
  for i, run in enumerate(runs):
    c = run_config(config, run)
    path = os.path.join(workdir, run.workdir)
    metrics_lib.log(f'=== study run {i + 1}/{len(runs)}: {run.phase} {run.method} seed {run.seed} '
                    f'on {run.train_examples:,} examples at lr {run.learning_rate:g} '
                    f'({run.workdir}) ===')
    done = demo.finished_row(c, path)  # Reused without starting a process.
    if done is not None:
      row = dataclasses.asdict(done)
    elif isolate:  # A fresh process per run: its peak memory is its own, and nothing leaks across.
      with concurrent.futures.ProcessPoolExecutor(
          max_workers=1, mp_context=multiprocessing.get_context('spawn')) as pool:
        row = pool.submit(_train_one, c, path).result()
    else:
      row = _train_one(c, path)
    # The run's fields win: a variant's row names its base method ('full'), the record the variant.
    records.append({**row, **dataclasses.asdict(run)})
  return records


def _std(xs: Sequence[float]) -> float:
  """Sample standard deviation (0 for a single value)."""
  if len(xs) < 2:
    return 0.0
  mean = sum(xs) / len(xs)
  return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The study's aggregates from its run records.

  Returns:
    {'rates': method -> chosen rate, 'selection': method -> [[rate, val accuracy]], 'methods':
    one row per method of the final phase (accuracy mean/std over seeds, parameters and cost),
    'sweep': method -> [[n, mean, std, seeds]] over the final and sweep runs}; lists, not
    tuples, so that it equals what study.json holds.
  """
  rates = choose_rates(records)
  selection: dict[str, list] = {}
  for r in records:
    if r['phase'] == 'select':
      selection.setdefault(r['method'], []).append([r['learning_rate'], r['accuracy']])
  methods = []
  finals: dict[str, list] = {}
  for r in records:
    if r['phase'] == 'final':
      finals.setdefault(r['method'], []).append(r)
  for m, rs in finals.items():
    acc = [r['accuracy'] for r in rs]
    methods.append({
        'method': m, 'seeds': len(rs), 'accuracy': sum(acc) / len(acc), 'accuracy_std': _std(acc),
        'learning_rate': rs[0]['learning_rate'], 'trainable': rs[0]['trainable'],
        'total': rs[0]['total'], 'share': rs[0]['trainable'] / max(rs[0]['total'], 1),
        'train_seconds': sum(r.get('train_seconds', 0.0) for r in rs) / len(rs),
        'seconds': sum(r['seconds'] for r in rs) / len(rs),
        'img_per_sec': sum(r.get('img_per_sec', 0.0) for r in rs) / len(rs),
        'peak_bytes': max(r.get('peak_bytes', 0) for r in rs),
        'peak_kind': rs[0].get('peak_kind', ''),
        'delta_bytes': rs[0]['delta_bytes'], 'backbone_bytes': rs[0]['backbone_bytes'],
        'eval_examples': rs[0]['eval_examples']})
  groups: dict[tuple[str, int], list] = {}
  sweep_methods = {r['method'] for r in records if r['phase'] == 'sweep'}
  for r in records:
    if r['phase'] == 'sweep' or (r['phase'] == 'final' and r['method'] in sweep_methods):
      groups.setdefault((r['method'], r['train_examples']), []).append(r['accuracy'])
  sweep: dict[str, list] = {}
  for (m, n), acc in sorted(groups.items()):
    sweep.setdefault(m, []).append([n, sum(acc) / len(acc), _std(acc), len(acc)])
  return {'rates': rates, 'selection': selection, 'methods': methods, 'sweep': sweep}


def _mib(n: float) -> str:
  return f'{n / 2**20:,.1f} MiB'


def format_markdown(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
  """study.md: the protocol, the headline table, the selection and the data-size sweep."""
  lines = [f'# Transfer study: {meta["title"]}', '', meta['protocol'], '',
           f'Machine: {meta["machine"]["cpu"]} ({", ".join(meta["machine"]["flags"]) or "-"}), '
           f'{meta["machine"]["cores"]} cores; device {meta.get("device", "?")}. '
           f'{meta.get("runs", 0)} runs, {meta.get("run_seconds", 0) / 60:.1f} min of run time '
           '(loading, compiling, training and evaluating each).', '',
           '| method | accuracy (%) | trainable params | share | lr | train s | img/s | '
           'peak memory | delta on disk |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in sorted(summary['methods'], key=lambda r: r['share']):
    lines.append(
        f'| {r["method"]} | {100 * r["accuracy"]:.1f} ± {100 * r["accuracy_std"]:.1f} | '
        f'{r["trainable"]:,} | {100 * r["share"]:.3f}% | {r["learning_rate"]:g} | '
        f'{r["train_seconds"]:.1f} | {r["img_per_sec"]:.0f} | {_mib(r["peak_bytes"])} | '
        f'{_mib(r["delta_bytes"])} |')
  if summary['methods']:
    r = summary['methods'][0]
    lines += ['', f'Accuracy: mean ± sample std over {r["seeds"]} seed(s) on '
              f'{r["eval_examples"]:,} test examples. Share: trainable of all parameters (head '
              f'included). Train s and img/s: the training steps alone (no compilation, loading '
              f'or evaluation). Peak memory: {r["peak_kind"]}.']
  if summary['selection']:
    lines += ['', '## Learning-rate selection (validation accuracy, %; ← chosen)', '',
              '| method | rate: accuracy | |', '|---|---|---|']
    edges = []
    for m, pairs in summary['selection'].items():
      cells = ', '.join(f'{lr:g}: {100 * acc:.1f}' + (' ←' if lr == summary['rates'][m] else '')
                        for lr, acc in pairs)
      grid = sorted(lr for lr, _ in pairs)
      edge = len(grid) > 1 and summary['rates'][m] in (grid[0], grid[-1])
      edges += [m] if edge else []
      lines.append(f'| {m} | {cells} | {"edge of the grid" if edge else ""} |')
    if edges:
      lines += ['', f'{len(edges)} of {len(summary["selection"])} methods chose a rate at an edge '
                'of their grid: a rate beyond it may do better (widen the grid to know).']
  if summary['sweep']:
    sizes = sorted({n for rows in summary['sweep'].values() for n, *_ in rows})
    lines += ['', '## Data-size sweep (test accuracy, %)', '',
              '| method | ' + ' | '.join(f'{n:,} examples' for n in sizes) + ' |',
              '|---|' + '---:|' * len(sizes)]
    for m, rows in summary['sweep'].items():
      by_n = {n: (mean, std) for n, mean, std, _ in rows}
      lines.append(f'| {m} | ' + ' | '.join(
          f'{100 * by_n[n][0]:.1f} ± {100 * by_n[n][1]:.1f}' if n in by_n else '-'
          for n in sizes) + ' |')
  return '\n'.join(lines) + '\n'


def plot(summary: Mapping[str, Any], out_dir: str, title: str) -> list[str]:
  """The three PNGs: accuracy against parameter share and training time; the data-size sweep."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = summary['methods']
  paths = []
  for name, key, xlabel in ((PLOT_FILES[0], 'share', 'trainable parameters (% of all, log)'),
                            (PLOT_FILES[1], 'train_seconds', 'training time (s, log)')):
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
      x = 100 * r[key] if key == 'share' else max(r[key], 1e-3)
      ax.errorbar(x, 100 * r['accuracy'], yerr=100 * r['accuracy_std'], fmt='o', capsize=3)
      ax.annotate(r['method'], (x, 100 * r['accuracy']), textcoords='offset points',
                  xytext=(5, 4), fontsize=8)
    ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, name))
    fig.savefig(paths[-1])
    plt.close(fig)
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for m, pts in summary['sweep'].items():
    ax.errorbar([n for n, *_ in pts], [100 * a for _, a, _, _ in pts],
                yerr=[100 * s for _, _, s, _ in pts], marker='o', capsize=3, label=m)
  ax.set_xscale('log')
  ax.set_xlabel('training examples (log)')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  if summary['sweep']:
    ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(out_dir, PLOT_FILES[2]))
  fig.savefig(paths[-1])
  plt.close(fig)
  return paths


def describe(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(title, protocol paragraph) of a study config."""
  c, s = config, config.study
  title = (f'{c.backbone.model} {c.backbone.variant} on {c.input.get("source") or c.input.name}, '
           f'{c.backbone.image_size} px')
  protocol = (
      f'Protocol: each method\'s learning rate chosen from its grid on '
      f'{s.train_examples - s.val_examples:,} training / {s.val_examples:,} validation examples '
      f'(seed {s.seeds[0]}), then trained on the first {s.train_examples:,} training examples '
      f'with seeds {", ".join(map(str, s.seeds))} and evaluated on `{s.test_split}`; every run '
      f'{c.total_steps} steps of batch {c.batch_size} ({c.optimizer.name}, {c.schedule.decay} '
      f'decay, {c.schedule.warmup_steps} warm-up steps), the backbone frozen except for '
      f'method full.')
  for name in s.methods:
    overrides = variant(config, name)
    if overrides:
      protocol += f' {name}: ' + ', '.join(f'{k}={v!r}' for k, v in overrides.items()) + '.'
  return title, protocol


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or continues) the study in `workdir`; writes study.json, study.md and the plots."""
  check_config(config)
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError("The study's plots need matplotlib: pip install 'vadapt[study]'.") from e
  from vadapt import artifacts  # pylint: disable=g-import-not-at-top
  for name in config.study.get('artifacts') or ():
    artifacts.fetch(name)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  isolate = bool(config.study.isolate)
  runs = selection_runs(config)
  records = _execute(config, runs, workdir, isolate)
  rates = choose_rates(records)
  metrics_lib.log('=== chosen learning rates: ' +
                  ', '.join(f'{m} {lr:g}' for m, lr in rates.items()) + ' ===')
  later = test_runs(config, rates)
  records += _execute(config, later, workdir, isolate)
  summary = summarize(records)
  title, protocol = describe(config)
  meta = {'title': title, 'protocol': protocol, 'machine': metrics_lib.machine(),
          'device': next((r['device'] for r in records if r.get('device')), 'not recorded'),
          'runs': len(records),
          'run_seconds': round(sum(r['seconds'] for r in records), 1),
          'wall_seconds_this_invocation': round(time.perf_counter() - start, 1)}
  table = format_markdown(summary, meta)
  paths = plot(summary, workdir, title)
  with open(os.path.join(workdir, STUDY_FILE + '.tmp'), 'w') as f:
    json.dump({'meta': meta, 'config': json.loads(config.to_json_best_effort()),
               'summary': summary, 'runs': records}, f, indent=1)
  os.replace(os.path.join(workdir, STUDY_FILE + '.tmp'), os.path.join(workdir, STUDY_FILE))
  with open(os.path.join(workdir, TABLE_FILE), 'w') as f:
    f.write(table)
  metrics_lib.log(f'\n{table}\nWrote {STUDY_FILE}, {TABLE_FILE} and '
                  f'{", ".join(os.path.basename(p) for p in paths)} to {workdir}.')
  return {'summary': summary, 'meta': meta, 'runs': records}
