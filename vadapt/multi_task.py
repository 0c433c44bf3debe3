"""Many tasks on one frozen backbone from a config: train one at a time, evaluate all, predict.

A multi-task config (configs/multi_task.py) names its tasks in `config.adapters`:

  config.adapters.<name>   one task: `method` and the adapter options of config.adapter
                           (bottleneck, layers, rank, ...), `input` (its data: the fields of
                           config.input), `dir` (a trained adapter directory to load as this task
                           instead of training it here) and, for method='fusion', `members` (the
                           task adapters an AdapterFusion attends over); method='average' derives
                           a task from trained ones instead (below)
  config.task              the task --mode=train trains and --mode=eval evaluates

The backbone, optimizer, steps and batch sizes are shared. In the workdir:

  adapters/<name>/         each task trained here as an adapter directory (vadapt.adapter_dir:
                           adapter_config.json + adapter.safetensors, head and class names, plus
                           the config and preprocessing under 'meta' for serving)
  adapters/adapters.json   the set's index: adapter_dir.load_set(WORKDIR/adapters, ...) loads all
  tasks/<name>/            the task's checkpoints and metrics (a killed run resumes)
  eval_tasks.json          the table of the last --mode=eval_tasks

Training a task loads every task trained so far (WORKDIR/adapters/<name>, or its `dir`) onto the
backbone, frozen: only the task's own adapter and head train (vadapt.multi.rules), so the others
stay bit-identical. A fusion task trains its fusion layers and head over its frozen members,
which are trained first. Evaluating all tasks runs the ordinary adapters through one compiled
program: the adapter is chosen by index, as data (vadapt.multi); with config.eval_mixed the tasks'
eval splits are interleaved into mixed batches (each example with its own adapter and head) and
give the same accuracies. `--mode=predict --manifest=FILE` serves 'IMAGE TASK' requests the same
way (MixedPredictor): mixed batches through one compiled program.

An average task (method='average', `members`, `weights`, `combine`) is derived, not trained:
--mode=train --config.task=NAME writes it as an adapter directory from its trained members, with
no training step, and it then evaluates, predicts and exports like any task.
  combine='weights'   the weighted sum of the members' parameters, heads included (AdapterHub's
                      average_adapter; a model soup, task arithmetic: vadapt.arithmetic
                      .weighted_sum): an ordinary adapter. The members must have one structure
                      (method, placement, widths).
  combine='outputs'   the weighted sum of the members' adapter outputs at every module at
                      inference (composition.Average), and of their head logits (stored as the
                      weighted sum of their heads: the same logits, heads being linear): a
                      head-only adapter served with an Average block, like a fusion.
The members are ordinary trained tasks (not fusions, not averages) sharing the average's label
space (the same class names); weights default to equal ones summing to 1 and may be negative (task
arithmetic's negation: weights=(1, -1) subtracts the second task's delta). The directory is a
snapshot of its members: after retraining one, write the average again
(--config.checkpoint.restart=True moves the old one aside; nothing is overwritten silently).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from typing import Any, Iterator, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vadapt import adapter_dir
from vadapt import arithmetic
from vadapt import backbones
from vadapt import checkpoint as ckpt_lib
from vadapt import composition
from vadapt import experiment
from vadapt import files
from vadapt import inject
from vadapt import metrics as metrics_lib
from vadapt import multi
from vadapt import partition
from vadapt import predict as predict_lib
from vadapt import sharding as sharding_lib
from vadapt import train as train_lib
from vadapt.pretrained import common as pretrained_common

FUSION = 'fusion'
AVERAGE = 'average'
COMBINES = ('weights', 'outputs')
# Adapters that add to a module's input or output, so a call can select them; prompts rewrite the
# call and BitFit adds no modules.
METHODS = tuple(m for m in experiment.ADAPTER_METHODS
                if m not in ('vpt_shallow', 'vpt_deep', 'bitfit')) + (FUSION, AVERAGE)
# A task's fields that are not adapter options.
TASK_FIELDS = ('input', 'dir', 'members', 'weights', 'combine')
ADAPTERS = 'adapters'
TASKS = 'tasks'
EVAL_TABLE = 'eval_tasks.json'
# Modes that understand a multi-task config.
MODES = ('train', 'eval', 'eval_tasks', 'export', 'predict')
# Adapter options that change training only, not what a trained adapter computes.
_TRAINING_ONLY = ('dropout', 'drop_rate', 'drop_schedule', 'drop_ramp_steps')
_FEATURE_MODELS = ('vit', 'dinov2') + backbones.CNN_MODELS


@dataclasses.dataclass(frozen=True)
class Task:
  """One entry of config.adapters, resolved.

  Attributes:
    name: the task's (and its adapter's) name.
    config: the experiment config of this task alone (`task_config`).
    method: its adapter method, 'fusion' or 'average'.
    members: for a fusion task, the adapters it fuses; for an average, those it averages.
    source: the adapter directory it loads from when trained (its `dir`, or the workdir's), else
      None.
    weights: for an average, one weight per member.
    combine: for an average, 'weights' or 'outputs'.
  """
  name: str
  config: ml_collections.ConfigDict
  method: str
  members: tuple[str, ...]
  source: Optional[str]
  weights: tuple[float, ...] = ()
  combine: Optional[str] = None

  @property
  def is_fusion(self) -> bool:
    return self.method == FUSION

  @property
  def is_average(self) -> bool:
    return self.method == AVERAGE

  @property
  def needs(self) -> tuple[str, ...]:
    """The tasks that must be loaded to serve this one: a fusion's or output average's members
    (a weight average is an ordinary adapter of its own)."""
    return self.members if self.is_fusion or self.combine == 'outputs' else ()

  @property
  def label(self) -> str:
    """The method as the task table shows it."""
    if self.is_average:
      return f'average {self.combine}({"+".join(self.members)})'
    return self.method + (f'({"+".join(self.members)})' if self.is_fusion else '')


def _override(shared: ml_collections.ConfigDict, own: ml_collections.ConfigDict,
              skip: Sequence[str] = ()) -> ml_collections.ConfigDict:
  out = copy.deepcopy(shared)
  with out.unlocked():
    for key in own.keys():
      if key not in skip and own[key] is not None:
        out[key] = own[key]
  return out


def task_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The experiment config of task `name` alone: config.adapter and config.input with the task's
  own fields (those set) on top, config.task = `name`, and no config.adapters (so the other
  tasks' settings do not enter this one's checkpoints)."""
  entry = config.adapters[name]
  c = copy.deepcopy(config)
  with c.unlocked():
    del c['adapters']
    c.adapter = _override(config.adapter, entry, TASK_FIELDS)
    c.input = _override(config.input, entry.input)
    c.task = name
  return c


def adapters_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), ADAPTERS)


def task_dir(workdir: str, name: str) -> str:
  return os.path.join(os.path.abspath(workdir), TASKS, name)


def plan(config: ml_collections.ConfigDict, workdir: Optional[str]) -> dict[str, Task]:
  """Every task of config.adapters, checked (methods, fusion members, adapter options, the
  directories named by `dir`), ordinary tasks first; nothing heavy is loaded."""
  adapters = config.get('adapters')
  if not adapters or not list(adapters.keys()):
    raise ValueError('A multi-task mode needs config.adapters (name -> task), e.g. '
                     'configs/multi_task.py.')
  if config.backbone.model not in _FEATURE_MODELS:
    raise ValueError(f'config.adapters gives every task a head on the backbone\'s features; '
                     f'backbone.model={config.backbone.model!r} has none to offer: use one of '
                     f'{", ".join(_FEATURE_MODELS)}.')
  names = list(adapters.keys())
  tasks = {}
  for name in names:
    multi.check_name(name, 'Task')
    if name == multi.HEADS:
      raise ValueError(f'Task name {name!r} is reserved (the heads live under it).')
    entry = adapters[name]
    view = task_config(config, name)
    method = view.adapter.method
    if method not in METHODS:
      raise ValueError(f'adapters.{name}.method={method!r}: a named adapter is one of '
                       f'{", ".join(METHODS)} (prompts rewrite the call and BitFit adds no '
                       'modules, so neither can be selected per call).')
    members = tuple(entry.get('members') or ())
    weights = tuple(float(w) for w in (entry.get('weights') or ()))
    combine = entry.get('combine')
    if method == AVERAGE:
      combine = combine or 'weights'
      weights = _check_average(config, name, names, members, weights, combine)
    elif weights or combine:
      raise ValueError(f'adapters.{name}.weights and .combine are options of '
                       f'method=\'average\'; {name!r} is {method!r}.')
    if method == FUSION:
      unknown = [m for m in members if m not in names or m == name]
      if len(members) < 2 or unknown:
        raise ValueError(f'adapters.{name}.members={members}: a fusion task fuses two or more '
                         f'other tasks of config.adapters ({", ".join(names)}).')
      nested = [m for m in members if task_config(config, m).adapter.method == FUSION
                or (adapters[m].get('combine') or 'weights') == 'outputs'
                and task_config(config, m).adapter.method == AVERAGE]
      if nested:
        raise ValueError(f'adapters.{name}.members: {nested} are fusion or output-average tasks '
                         'themselves; fuse ordinary adapters.')
    elif members and method != AVERAGE:
      raise ValueError(f'adapters.{name}.members is an option of method=\'fusion\' or '
                       f'\'average\'; {name!r} is {method!r}.')
    try:
      inject.check_drop(**_drop(view))
    except ValueError as e:
      raise ValueError(f'adapters.{name}: {e}') from None
    if method not in (FUSION, AVERAGE):
      experiment.adapter_spec(view)  # The adapter options, checked.
    source = entry.get('dir') or None
    if source:
      adapter_dir.read_config(source)
      source = os.path.abspath(source)
    elif workdir is not None:
      own = os.path.join(adapters_dir(workdir), name)
      source = own if os.path.isfile(os.path.join(own, adapter_dir.CONFIG)) else None
    tasks[name] = Task(name=name, config=view, method=method, members=members, source=source,
                       weights=weights, combine=combine)
  return dict(sorted(tasks.items(), key=lambda kv: _load_rank(kv[1])))


def _load_rank(task: Task) -> int:
  """Loading order: ordinary adapters, weight averages (ordinary adapters a fusion may fuse),
  fusions, output averages (whose members are loaded before them)."""
  if task.is_average:
    return 1 if task.combine == 'weights' else 3
  return 2 if task.is_fusion else 0


def _check_average(config: ml_collections.ConfigDict, name: str, names: Sequence[str],
                   members: tuple[str, ...], weights: tuple[float, ...],
                   combine: str) -> tuple[float, ...]:
  """An average task's members, weights and combine, checked; its weights (default equal)."""
  where = f'adapters.{name}'
  if combine not in COMBINES:
    raise ValueError(f'{where}.combine={combine!r}: an average combines the members\' '
                     f'{" or ".join(repr(c) for c in COMBINES)}.')
  if not members:
    raise ValueError(f'{where}.members is empty: an average names the trained tasks it averages '
                     f'(of {", ".join(n for n in names if n != name)}).')
  unknown = [m for m in members if m not in names or m == name]
  if unknown:
    raise ValueError(f'{where}.members={members}: {unknown} are not other tasks of '
                     f'config.adapters ({", ".join(names)}).')
  if len(set(members)) != len(members):
    raise ValueError(f'{where}.members={members} names a task more than once.')
  derived = [m for m in members if task_config(config, m).adapter.method in (FUSION, AVERAGE)]
  if derived:
    raise ValueError(f'{where}.members: {derived} are fusion or average tasks; an average '
                     'averages ordinary trained tasks (for an average of averages, average their '
                     'members with the weights multiplied out).')
  if not weights:
    weights = (1.0 / len(members),) * len(members)
  if len(weights) != len(members):
    raise ValueError(f'{where}.weights={weights}: {len(weights)} weights for {len(members)} '
                     f'members {members}.')
  return weights


def _drop(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """A task's AdapterDrop settings; a linear ramp of unset length spans the whole run."""
  schedule = c.adapter.get('drop_schedule') or 'constant'
  ramp = c.adapter.get('drop_ramp_steps') or 0
  if schedule != 'constant' and not ramp:
    ramp = c.total_steps
  return dict(rate=c.adapter.get('drop_rate') or 0.0, schedule=schedule, ramp_steps=ramp)


def get_task(tasks: dict[str, Task], name: Optional[str], what: str = 'config.task') -> Task:
  if name not in tasks:
    raise ValueError(f'{what}={name!r} is not a task of config.adapters; tasks: '
                     f'{", ".join(tasks)}.')
  return tasks[name]


def _images(config: ml_collections.ConfigDict) -> jax.Array:
  return jnp.zeros(backbones.sample_images(config.backbone).shape, jnp.float32)


def _abstract_backbone(config: ml_collections.ConfigDict, backbone: nn.Module):
  return jax.eval_shape(lambda: partition.from_variables(
      backbone.init(jax.random.PRNGKey(0), _images(config), train=False)))


def _check_layouts(tasks: Sequence[Task], abstract) -> None:
  """Adapters trained on another backbone architecture are refused before weights load."""
  for t in tasks:
    if t.source is not None:
      adapter_dir.check_layout(t.source, adapter_dir.read_config(t.source), abstract)


@dataclasses.dataclass
class Loaded:
  """The backbone with every trained task's adapter.

  Attributes:
    backbone: the plain backbone (features).
    model: the multi-adapter model.
    params: its parameters (host arrays).
    selections: per loaded task, what `adapter=` serves it: its name, or a Fuse block.
  """
  backbone: nn.Module
  model: multi.MultiAdapted
  params: dict[str, Any]
  selections: dict[str, Union[str, composition.Fuse]]


def load(config: ml_collections.ConfigDict, tasks: dict[str, Task], *,
         skip: Sequence[str] = ()) -> Loaded:
  """The backbone (its weights loaded) with every trained task but `skip` added, in plan order.

  Adapter directories of another backbone are refused (layout before the weights load, weights
  after).
  """
  backbone = backbones.make_model(config.backbone, None)
  wanted = [t for t in tasks.values() if t.source is not None and t.name not in skip]
  _check_layouts(wanted, _abstract_backbone(config, backbone))
  for t in wanted:
    missing = [m for m in t.needs if tasks[m].source is None or m in skip]
    if missing:
      raise ValueError(f'Task {t.name!r} {"fuses" if t.is_fusion else "averages"} '
                       f'{list(t.members)}, but {missing} are not trained (no adapter '
                       'directory): train them first (--config.task=NAME).')
  params = backbones.load_params(config.backbone, backbone, rng=jax.random.fold_in(
      jax.random.PRNGKey(config.seed), 1))
  model = multi.adapt(backbone, [])
  selections = {}
  for t in wanted:
    model, params = adapter_dir.add(model, params, t.source, name=t.name)
    selections[t.name] = adapter_dir.block(t.source, t.name) or t.name
    stored = adapter_dir.read_config(t.source).get('meta', {}).get('adapter')
    if stored is not None and not t.is_fusion and not t.is_average:
      now = experiment.adapter_spec(t.config)
      changed = [f'{k} {stored.get(k)!r} -> {now.get(k)!r}' for k in sorted(set(stored) | set(now))
                 if k not in _TRAINING_ONLY and stored.get(k) != now.get(k)]
      if changed:
        metrics_lib.log(f'Note: task {t.name!r} is loaded from {t.source}, trained with other '
                        f'adapter options than config.adapters.{t.name} now holds '
                        f'({", ".join(changed)}); the directory is what runs.')
  return Loaded(backbone=backbone, model=model, params=params, selections=selections)


class TaskModel(nn.Module):
  """One task of a multi-adapter model as an ordinary classifier (the trainer's model): the
  model called with the task's adapter selection and head; parameters keep the model's paths.

  Attributes:
    model: the multi-adapter model.
    adapter: the task's adapter name, or its composition block (a Fuse).
    head: the task's head.
  """
  model: multi.MultiAdapted
  adapter: Any
  head: Optional[str]

  def setup(self):
    nn.share_scope(self, self.model)

  @property
  def drop_schedule(self) -> str:
    """The AdapterDrop schedule (the trainer passes adapter_step= unless 'constant')."""
    return self.model.drop_schedule

  def __call__(self, *args, **kwargs):
    return self.model(*args, adapter=self.adapter, head=self.head, **kwargs)


def _spec(task: Task) -> dict[str, Any]:
  if task.is_fusion:
    return {'method': FUSION, 'members': list(task.members)}
  if task.is_average:
    return {'method': AVERAGE, 'members': list(task.members), 'weights': list(task.weights),
            'combine': task.combine}
  return experiment.adapter_spec(task.config)


def _serving_meta(task: Task, step: int) -> dict[str, Any]:
  c = task.config
  return {
      'task': task.name, 'step': step, 'adapter': _spec(task),
      'image_size': c.backbone.image_size, 'preprocess': experiment.preprocess_name(c, 'eval'),
      'eval_crop_fraction': c.input.get('eval_crop_fraction'),
      'backbone_checkpoint': os.path.abspath(c.backbone.checkpoint) if c.backbone.checkpoint
                             else '',
      'config': json.loads(c.to_json_best_effort()),
  }


def _check_shared(config: ml_collections.ConfigDict, mesh) -> None:
  sharding_lib.batch_size_per_shard(mesh, config.batch_size, 'batch_size')
  sharding_lib.batch_size_per_shard(mesh, config.eval_batch_size, 'eval_batch_size')
  if config.total_steps < 1:
    raise ValueError(f'total_steps must be >= 1; found {config.total_steps}.')
  if config.backbone.checkpoint:
    pretrained_common.require_file(config.backbone.checkpoint, 'backbone.checkpoint')


def setup(config: ml_collections.ConfigDict, workdir: str,
          name: Optional[str] = None) -> tuple[experiment.Experiment, Loaded, Task]:
  """The Experiment that trains task `name` (default config.task) with every trained task loaded
  and frozen; also the loaded model (the task's adapter added) and the task."""
  tasks = plan(config, workdir)
  task = get_task(tasks, config.get('task') if name is None else name)
  c = task.config
  if task.is_average:
    raise ValueError(f'Task {task.name!r} is an average of {list(task.members)}: it is derived, '
                     'not trained (multi_task.train writes it).')
  if config.adapters[task.name].get('dir'):
    raise ValueError(f'adapters.{task.name}.dir is set: task {task.name!r} is loaded from '
                     f'{task.source}, not trained here; set --config.adapters.{task.name}.dir= '
                     'to train it in this workdir.')
  untrained = [m for m in task.members if tasks[m].source is None]
  if untrained:
    raise ValueError(f'Task {task.name!r} fuses {list(task.members)}; train {untrained} first '
                     f'(--config.task={untrained[0]}).')
  if task.is_fusion:
    _check_fusable(task, tasks)
  own = os.path.join(adapters_dir(workdir), task.name)
  checkpointer_dir = os.path.join(task_dir(workdir, task.name), 'checkpoints')
  if (os.path.exists(own) and not os.path.isdir(checkpointer_dir)
      and not c.checkpoint.restart):
    raise FileExistsError(f'{own} already holds an adapter that this workdir has no checkpoints '
                          f'of ({checkpointer_dir}): move it away, or pass '
                          '--config.checkpoint.restart=True (it is moved aside, not deleted).')
  mesh = experiment.make_mesh(c)
  _check_shared(c, mesh)
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  info = input_pipeline.get_info(c.input)
  experiment.check_data(c, info)
  # Fusions and averages over this task hold its old adapter: they are left out (and stale after).
  stale = _stale(task, tasks)
  loaded = load(config, tasks, skip=(task.name, *stale))
  images = _images(c)
  if task.is_fusion:
    own_adapter = multi.NamedAdapter(task.name, (), num_classes=info.num_classes,
                                     class_names=tuple(info.class_names))
    selection = composition.Fuse(*task.members, name=adapter_dir.fusion_name(task.name),
                                 dropout=c.adapter.get('dropout', 0.0))
  else:
    spec = experiment.adapter_spec(c)
    experiment.check_layers(spec, loaded.backbone, images)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items()
              if k != 'method' and k not in _TRAINING_ONLY[1:]}
    own_adapter = multi.named(loaded.backbone, task.name, spec['method'],
                              num_classes=info.num_classes, class_names=tuple(info.class_names),
                              **kwargs)
    selection = task.name
  # AdapterDrop while this task trains (the saved adapter and every evaluation run them all).
  drop = _drop(c)
  model = multi.adapt(loaded.backbone, loaded.model.adapters + (own_adapter,),
                      drop_rate=drop['rate'], drop_schedule=drop['schedule'],
                      drop_ramp_steps=drop['ramp_steps'])
  rng = jax.random.PRNGKey(c.seed)
  params = multi.init_missing(model, loaded.params, rng, images, adapter=selection,
                             head=task.name, train=False)
  rules = [(r'^batch_stats/', 'frozen')] + multi.rules(
      model, train=[task.name], heads=c.train_head,
      fusions=[selection.name] if task.is_fusion else [])
  labels = partition.label_tree(params, rules)
  delta, frozen = partition.split(params, labels)
  delta_labels, _ = partition.split(labels, labels)
  if not jax.tree.leaves(delta):
    raise ValueError(f'Nothing to train for task {task.name!r}: its label rules mark every '
                     'parameter frozen.')
  shardings = lambda tree: sharding_lib.tree_shardings(
      tree, mesh, c.param_sharding, min_size=c.mesh.get('fsdp_min_size', 2 ** 14))
  delta_sh, frozen_sh = shardings(delta), shardings(frozen)
  backbone_host = multi.backbone_params(model, params)
  schedule = experiment.make_schedule(c)
  meta = {
      'adapter': _spec(task), 'task': task.name,
      'variant': c.backbone.variant, 'image_size': c.backbone.image_size,
      'num_classes': info.num_classes, 'class_names': list(info.class_names),
      'preprocess': experiment.preprocess_name(c, 'eval'),
      'eval_crop_fraction': c.input.get('eval_crop_fraction'),
      'backbone_fingerprint': ckpt_lib.fingerprint(backbone_host),
      'backbone_layout': ckpt_lib.layout_fingerprint(backbone_host),
      'backbone_checkpoint': os.path.abspath(c.backbone.checkpoint) if c.backbone.checkpoint
                             else '',
      'config': json.loads(c.to_json_best_effort()),
  }
  exp = experiment.Experiment(
      config=c, info=info, mesh=mesh, model=TaskModel(model, selection, task.name),
      labels=labels, delta=jax.device_put(delta, delta_sh),
      frozen=jax.device_put(frozen, frozen_sh), delta_shardings=delta_sh,
      frozen_shardings=frozen_sh, tx=experiment.make_optimizer(c, delta_labels, schedule),
      schedule=schedule, meta=meta, param_table=partition.summary_table(params, labels),
      counts=partition.count(params, labels))
  loaded = Loaded(backbone=loaded.backbone, model=model, params=params,
                  selections={**loaded.selections, task.name: selection})
  return exp, loaded, task


def _stale(task: Task, tasks: dict[str, Task]) -> list[str]:
  """The trained fusions and averages over `task`, which retraining or rewriting it leaves
  stale (a note says so)."""
  stale = [t.name for t in tasks.values() if task.name in t.members and t.source is not None]
  if stale:
    metrics_lib.log(f'Note: {task.name!r} changes under the trained fusion or average task(s) '
                    f'{stale}, which hold its old version; write them again afterwards '
                    '(--config.checkpoint.restart=True).')
  return stale


def _check_fusable(task: Task, tasks: dict[str, Task]) -> None:
  """AdapterFusion attends over the members' outputs at each module: they must sit alike."""
  places = {}
  for m in task.members:
    saved = adapter_dir.read_config(tasks[m].source)
    places[m] = sorted((t['pattern'], t['position']) for t in saved['targets'])
  if len({json.dumps(p) for p in places.values()}) > 1:
    found = '; '.join(f'{m}: {len(p)} modules, e.g. {p[0][0]!r} ({p[0][1]})' if p else
                      f'{m}: none' for m, p in places.items())
    raise ValueError(f'Task {task.name!r} fuses {list(task.members)}, whose adapters sit at '
                     f'different modules or positions ({found}); AdapterFusion needs members '
                     'placed alike (the same method and layers).')


def _write_index(workdir: str, tasks: dict[str, Task]) -> None:
  """adapters/adapters.json: the tasks trained here, members before fusions (load_set's order)."""
  root = adapters_dir(workdir)
  names = [n for n in tasks if os.path.isfile(os.path.join(root, n, adapter_dir.CONFIG))]
  files.write_json(os.path.join(root, adapter_dir.SET_INDEX), {'adapters': names}, indent=2)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """--mode=train: trains config.task, saves WORKDIR/adapters/<task>, then evaluates every
  trained task (config.eval_all_tasks). Returns {'task', 'step', 'metrics', 'adapter_dir',
  'tasks' (the table, when evaluated)}."""
  experiment.initialize_distributed(config)
  workdir = os.path.abspath(workdir)
  if get_task(plan(config, workdir), config.get('task')).is_average:
    return write_average(config, workdir, config.task)
  exp, loaded, task = setup(config, workdir)
  own = os.path.join(adapters_dir(workdir), task.name)
  run_dir = task_dir(workdir, task.name)
  if exp.config.checkpoint.restart and jax.process_index() == 0:
    moved = ckpt_lib.move_run_aside(run_dir)
    if os.path.exists(own):
      moved = moved or _new_previous_run(run_dir)
      os.rename(own, os.path.join(moved, 'adapter_dir'))
    if moved:
      metrics_lib.log(f'Starting task {task.name!r} over, as checkpoint.restart=True asks: its '
                      f'previous run (checkpoints, metrics, adapter directory) moved to {moved}.')
  others = [n for n in loaded.selections if n != task.name]
  metrics_lib.log(f'=== Task {task.name!r} ({task.method}'
                  + (f' over {", ".join(task.members)}' if task.is_fusion else '')
                  + f') on one backbone with {len(others)} trained task(s) frozen'
                  + (f': {", ".join(others)}' if others else '') + ' ===')
  result = train_lib.train_experiment(exp, run_dir, export=False)
  params = partition.merge(result.delta, jax.tree.map(np.asarray, jax.device_get(result.frozen)))
  if jax.process_index() == 0:
    selection = loaded.selections[task.name]
    adapter_dir.save(own, loaded.model, params, task.name,
                     fusion=selection if task.is_fusion else None,
                     meta=_serving_meta(task, result.step), overwrite=True)
    _write_index(workdir, plan(config, workdir))
  metrics_lib.log(f'Saved task {task.name!r} as the adapter directory {own} '
                  f'({train_lib.human_bytes(train_lib.dir_bytes(own))}).')
  out = {'task': task.name, 'step': result.step, 'metrics': result.metrics, 'adapter_dir': own}
  if config.get('eval_all_tasks', True):
    out['tasks'] = evaluate_tasks(config, workdir)
  return out


def _targets(saved: dict[str, Any]) -> list[dict[str, Any]]:
  return sorted(saved['targets'], key=lambda t: (t['pattern'], t['position'], t['name']))


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
  """Where two saved adapters differ in structure, in a few words."""
  ta, tb = _targets(a), _targets(b)
  if len(ta) != len(tb):
    return f'{len(ta)} vs {len(tb)} adapted module patterns'
  for x, y in zip(ta, tb):
    if (x['pattern'], x['position']) != (y['pattern'], y['position']):
      return f'{x["pattern"]!r} ({x["position"]}) vs {y["pattern"]!r} ({y["position"]})'
    keys = sorted(k for k in set(x['adapter']) | set(y['adapter'])
                  if x['adapter'].get(k) != y['adapter'].get(k))
    if keys:
      return f'at {x["pattern"]!r}: ' + ', '.join(
          f'{k} {x["adapter"].get(k)!r} vs {y["adapter"].get(k)!r}' for k in keys[:3])
  return ''


def _check_average_inputs(config: ml_collections.ConfigDict, workdir: str, task: Task,
                          tasks: dict[str, Task]) -> None:
  """What writing the average task needs, checked from the members' saved configs."""
  name, members = task.name, list(task.members)
  if config.adapters[name].get('dir'):
    raise ValueError(f'adapters.{name}.dir is set: task {name!r} is loaded from {task.source}, '
                     f'not written here; set --config.adapters.{name}.dir= to write it in this '
                     'workdir.')
  untrained = [m for m in members if tasks[m].source is None]
  if untrained:
    raise ValueError(f'Task {name!r} averages {members}; train {untrained} first '
                     f'(--config.task={untrained[0]}).')
  saved = {m: adapter_dir.read_config(tasks[m].source) for m in members}
  spaces = {m: (s.get('num_classes'), tuple(s.get('class_names') or ())) for m, s in saved.items()}
  if len(set(spaces.values())) > 1 or not spaces[members[0]][0]:
    found = '; '.join(f'{m}: {n} classes {list(c[:3])}{"..." if len(c) > 3 else ""}'
                      for m, (n, c) in spaces.items())
    raise ValueError(f'Task {name!r} averages {members}, whose heads have different label spaces '
                     f'({found}); an average combines their heads, so its members must share '
                     'one set of class names.')
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  info = input_pipeline.get_info(task.config.input)
  if (info.num_classes, tuple(info.class_names)) != spaces[members[0]]:
    raise ValueError(f'Task {name!r}: its data (config.adapters.{name}.input) has '
                     f'{info.num_classes} classes, its members {members} were trained on '
                     f'{spaces[members[0]][0]} others; give it their label space.')
  if task.combine == 'weights':
    for m in members[1:]:
      diff = _first_difference(saved[members[0]], saved[m])
      if diff:
        raise ValueError(f'Task {name!r} averages the weights of {members}, but {members[0]!r} '
                         f'and {m!r} differ in structure ({diff}); a weight average needs one '
                         "method, placement and width (combine='outputs' averages any).")
  own = os.path.join(adapters_dir(workdir), name)
  if os.path.exists(own) and not task.config.checkpoint.restart:
    raise FileExistsError(f'{own} already holds task {name!r}; pass '
                          '--config.checkpoint.restart=True to write it again (the old one is '
                          'moved aside, not deleted).')


def write_average(config: ml_collections.ConfigDict, workdir: str,
                  name: str) -> dict[str, Any]:
  """--mode=train for an average task: writes WORKDIR/adapters/<name> from its trained members
  (no training step), then evaluates every trained task (config.eval_all_tasks). Returns
  {'task', 'step' (0), 'metrics' ({}), 'adapter_dir', 'tasks' (the table, when evaluated)}."""
  workdir = os.path.abspath(workdir)
  tasks = plan(config, workdir)
  task = get_task(tasks, name)
  _check_average_inputs(config, workdir, task, tasks)
  own = os.path.join(adapters_dir(workdir), name)
  _stale(task, tasks)
  if os.path.exists(own) and jax.process_index() == 0:
    moved = _new_previous_run(task_dir(workdir, name))
    os.rename(own, os.path.join(moved, 'adapter_dir'))
    metrics_lib.log(f'Writing task {name!r} again, as checkpoint.restart=True asks: the previous '
                    f'one moved to {moved}.')
  loaded = load(config, tasks, skip=[n for n in tasks if n not in task.members])
  model, params = loaded.model, loaded.params
  deltas = [adapter_dir.read(tasks[m].source)[1] for m in task.members]
  average = None
  try:
    if task.combine == 'weights':
      summed = arithmetic.weighted_sum(deltas, task.weights)
      model, params = arithmetic.add_adapter(model, params, name, summed, like=task.members[0])
    else:
      head = f'{multi.HEADS}/{arithmetic.WILDCARD}/'
      summed = arithmetic.weighted_sum(
          [{k: v for k, v in d.items() if k.startswith(head)} for d in deltas], task.weights)
      like = model.adapter(task.members[0])
      model = model.with_adapter(multi.NamedAdapter(name, (), num_classes=like.num_classes,
                                                    class_names=like.class_names))
      flat = pretrained_common.flatten(params)
      flat.update({f'{multi.HEADS}/{name}/{k[len(head):]}': v for k, v in summed.items()})
      params = pretrained_common.unflatten(flat)
      average = composition.Average(*task.members, weights=task.weights)
      # The members' adapters must sit at positions an Average can combine: one trace tells.
      jax.eval_shape(lambda p: model.apply({'params': p}, _images(task.config), adapter=average,
                                           head=name, train=False), params)
  except ValueError as e:
    raise ValueError(f'Task {name!r}: {e}') from None
  if jax.process_index() == 0:
    adapter_dir.save(own, model, params, name, average=average, meta=_serving_meta(task, 0))
    _write_index(workdir, plan(config, workdir))
  weights = ', '.join(f'{w:g} {m}' for w, m in zip(task.weights, task.members))
  metrics_lib.log(f'Wrote task {name!r}, the {task.combine} average ({weights}), as the adapter '
                  f'directory {own} ({train_lib.human_bytes(train_lib.dir_bytes(own))}); nothing '
                  'was trained.')
  out = {'task': name, 'step': 0, 'metrics': {}, 'adapter_dir': own}
  if config.get('eval_all_tasks', True):
    out['tasks'] = evaluate_tasks(config, workdir)
  return out


def _new_previous_run(run_dir: str) -> str:
  parent = os.path.join(run_dir, 'previous_runs')
  os.makedirs(parent, exist_ok=True)
  n = len(os.listdir(parent)) + 1
  while os.path.exists(os.path.join(parent, str(n))):
    n += 1
  os.makedirs(os.path.join(parent, str(n)))
  return os.path.join(parent, str(n))


# --------------------------------------------------------------------------------- evaluation


def _sums(logits: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Correct, count and summed cross-entropy over the valid rows; logits padded with -inf (the
  heads of index-selected adapters are padded to the widest) are fine."""
  logits = logits.astype(jnp.float32)
  mask = batch['mask'].astype(jnp.float32)
  label = batch['label']
  picked = jnp.take_along_axis(logits, label[:, None], axis=-1)[:, 0]
  loss = jax.nn.logsumexp(logits, axis=-1) - picked
  correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
  return {'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask),
          'loss_sum': jnp.sum(jnp.where(mask > 0, loss, 0.0))}


def _run_eval(task: Task, info, mesh, step, params, selection) -> dict[str, float]:
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  from vadapt.data import iterators  # pylint: disable=g-import-not-at-top
  c = task.config
  batch_sh = sharding_lib.batch_sharding(mesh)
  totals = {'correct': 0.0, 'count': 0.0, 'loss_sum': 0.0}
  batches = metrics_lib.progress_iter(
      input_pipeline.make_eval_iterator(
          c.input, global_batch_size=c.eval_batch_size, image_size=c.backbone.image_size,
          preprocess=experiment.preprocess_name(c, 'eval'), process_index=jax.process_index(),
          process_count=jax.process_count()),
      desc=f'eval {task.name}', total=iterators.num_eval_batches(info.num_eval,
                                                                c.eval_batch_size))
  for batch in batches:
    out = jax.device_get(step(params, sharding_lib.put_global_batch(
        {k: batch[k] for k in ('image', 'label', 'mask')}, batch_sh), selection))
    for k in totals:
      totals[k] += float(out[k])
  if not totals['count']:
    raise ValueError(f'The eval split {c.input.get("eval_split")!r} of task {task.name!r} '
                     'yielded no examples.')
  return {'eval/accuracy': totals['correct'] / totals['count'],
          'eval/loss': totals['loss_sum'] / totals['count'], 'eval/examples': totals['count']}


def evaluate_tasks(config: ml_collections.ConfigDict, workdir: str,
                   names: Optional[Sequence[str]] = None) -> dict[str, dict[str, Any]]:
  """--mode=eval_tasks: every trained task (or `names`) on its own task's eval split; prints one
  table and writes WORKDIR/eval_tasks.json. Untrained tasks are listed as such.

  The ordinary adapters share one compiled eval program (the adapter and head are chosen by an
  index, as data); each fusion task compiles its own.
  """
  experiment.initialize_distributed(config)
  tasks = plan(config, workdir)
  wanted = list(tasks) if names is None else [get_task(tasks, n).name for n in names]
  trained = [n for n in wanted if tasks[n].source is not None]
  if not trained:
    raise FileNotFoundError(
        f'No task of {wanted} is trained in {adapters_dir(workdir)}: train one first '
        f'(--mode=train --config.task={wanted[0]}).')
  mesh = experiment.make_mesh(config)
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  infos = {n: input_pipeline.get_info(tasks[n].config.input) for n in trained}
  needed = set(trained) | {m for n in trained for m in tasks[n].needs}
  loaded = load(config, tasks, skip=[n for n in tasks if n not in needed])
  model = loaded.model
  for n in trained:
    width = model.adapter(n).num_classes
    if width != infos[n].num_classes:
      raise ValueError(f'Task {n!r}: its adapter in {tasks[n].source} has a head of {width} '
                       f'classes, its data (config.adapters.{n}.input) has '
                       f'{infos[n].num_classes}.')
  params = jax.device_put(loaded.params, sharding_lib.replicated(mesh))
  traces = []

  def by_index(p, batch, index):
    traces.append(1)
    return _sums(model.apply({'params': p}, batch['image'], adapter=index, train=False), batch)

  def by_block(p, batch, block):
    head = block[1]
    return _sums(model.apply({'params': p}, batch['image'], adapter=block[0], head=head,
                             train=False), batch)

  every_head = all(a.num_classes for a in model.adapters)
  index_step = jax.jit(by_index)
  block_step = jax.jit(by_block, static_argnums=2)
  results = {}
  mixed = {}
  if config.get('eval_mixed', False) and every_head:
    served = [n for n in trained if isinstance(loaded.selections[n], str)]
    if served:
      mixed = _run_mixed_eval([tasks[n] for n in served], [infos[n] for n in served], mesh,
                              model, params, traces)
  for n in wanted:
    if n not in trained:
      results[n] = {'trained': False}
      continue
    selection = loaded.selections[n]
    if n in mixed:
      metrics = mixed[n]
    elif isinstance(selection, str) and every_head:
      metrics = _run_eval(tasks[n], infos[n], mesh, index_step, params,
                          jnp.int32(model.index(n)))
    else:
      metrics = _run_eval(tasks[n], infos[n], mesh, block_step, params, (selection, n))
    results[n] = {'trained': True, 'method': tasks[n].method, 'adapter_dir': tasks[n].source,
                  'num_classes': infos[n].num_classes, **metrics}
  _log_table(results, tasks)
  shared = sum(1 for n in trained if isinstance(loaded.selections[n], str)) if every_head else 0
  if mixed:
    metrics_lib.log(f'{len(mixed)} tasks ran interleaved in mixed batches (each example with its '
                    f'own adapter and head) through one compiled eval program ({len(traces)} '
                    'trace).')
  elif shared > 1:
    metrics_lib.log(f'{shared} tasks ran through one compiled eval program ({len(traces)} '
                    'trace): the adapter was chosen by index, as data.')
  if jax.process_index() == 0:
    files.write_json(os.path.join(os.path.abspath(workdir), EVAL_TABLE), results, indent=2)
  return results


def interleave(streams: Sequence[Iterator[dict[str, np.ndarray]]], adapters: Sequence[int],
               batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Mixed batches from per-task batch streams: rows taken one task after another (task 0's
  first row, task 1's first row, ...), each row's adapter index under 'adapter' and its place
  under 'row' (stream, row number in that stream). Every row of every stream is kept, padding
  (mask False) included, so every process yields as many batches; a short last batch is padded
  with mask False, adapter -1 and row (-1, -1)."""
  streams = [iter(s) for s in streams]
  active = list(range(len(streams)))
  counts = [0] * len(streams)
  pending: list[dict[str, np.ndarray]] = []
  size = 0

  def take(n):
    nonlocal pending, size
    out = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
    rest = {k: v[n:] for k, v in out.items()}
    pending, size = ([rest] if len(rest['mask']) else []), len(rest['mask'])
    return {k: v[:n] for k, v in out.items()}

  while active:
    batches = []
    for s in list(active):
      batch = next(streams[s], None)
      if batch is None:
        active.remove(s)
        continue
      rows = len(batch['mask'])
      batches.append({'image': batch['image'], 'label': batch['label'], 'mask': batch['mask'],
                      'adapter': np.full(rows, adapters[s], np.int32),
                      'row': np.stack([np.full(rows, s), counts[s] + np.arange(rows)], -1)})
      counts[s] += rows
    if not batches:
      break
    longest = max(len(b['mask']) for b in batches)
    for r in range(longest):  # Row-major across the tasks of this round.
      for b in batches:
        if r < len(b['mask']):
          pending.append({k: v[r:r + 1] for k, v in b.items()})
          size += 1
    while size >= batch_size:
      yield take(batch_size)
  if size:
    last = take(size)
    pad = batch_size - size
    widths = lambda v: ((0, pad),) + ((0, 0),) * (v.ndim - 1)
    last = {k: np.pad(v, widths(v), constant_values=-1 if k in ('adapter', 'row') else 0)
            for k, v in last.items()}
    yield last


def _run_mixed_eval(tasks: Sequence[Task], infos, mesh, model: multi.MultiAdapted, params,
                    traces: list[int]) -> dict[str, dict[str, float]]:
  """Every task's eval split, interleaved into mixed batches: each example runs with its own
  task's adapter and head, chosen per example as data, through one compiled program."""
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  from vadapt.data import iterators  # pylint: disable=g-import-not-at-top
  config = tasks[0].config
  sizes = {t.name: (t.config.backbone.image_size, t.config.eval_batch_size) for t in tasks}
  if len(set(sizes.values())) > 1:
    raise ValueError(f'Mixed evaluation puts every task in one batch; the tasks differ in '
                     f'(image_size, eval_batch_size): {sizes}.')
  indices = [model.index(t.name) for t in tasks]
  streams = [input_pipeline.make_eval_iterator(
      t.config.input, global_batch_size=t.config.eval_batch_size,
      image_size=t.config.backbone.image_size,
      preprocess=experiment.preprocess_name(t.config, 'eval'),
      process_index=jax.process_index(), process_count=jax.process_count()) for t in tasks]
  local = config.eval_batch_size // jax.process_count()
  n = len(model.adapters)

  def step(p, batch):
    traces.append(1)
    index = batch['adapter']
    logits = model.apply({'params': p}, batch['image'], adapter=index, head=index,
                         train=False).astype(jnp.float32)
    mask = batch['mask'].astype(jnp.float32)
    label = batch['label']
    picked = jnp.take_along_axis(logits, label[:, None], axis=-1)[:, 0]
    loss = jnp.where(mask > 0, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32) * mask
    segment = lambda v: jax.ops.segment_sum(v, jnp.maximum(index, 0), num_segments=n)
    return {'correct': segment(correct), 'count': segment(mask), 'loss_sum': segment(loss)}

  mixed_step = jax.jit(step)
  batch_sh = sharding_lib.batch_sharding(mesh)
  totals = {k: np.zeros(n) for k in ('correct', 'count', 'loss_sum')}
  for batch in metrics_lib.progress_iter(interleave(streams, indices, local),
                                         desc=f'eval {"+".join(t.name for t in tasks)} (mixed)',
                                         total=sum(iterators.num_eval_batches(
                                             i.num_eval, config.eval_batch_size) for i in infos)):
    out = jax.device_get(mixed_step(params, sharding_lib.put_global_batch(
        {k: batch[k] for k in ('image', 'label', 'mask', 'adapter')}, batch_sh)))
    for k in totals:
      totals[k] += np.asarray(out[k], np.float64)
  results = {}
  for t, i in zip(tasks, indices):
    if not totals['count'][i]:
      raise ValueError(f'The eval split {t.config.input.get("eval_split")!r} of task {t.name!r} '
                       'yielded no examples.')
    results[t.name] = {'eval/accuracy': totals['correct'][i] / totals['count'][i],
                       'eval/loss': totals['loss_sum'][i] / totals['count'][i],
                       'eval/examples': totals['count'][i]}
  return results


def _log_table(results: dict[str, dict[str, Any]], tasks: dict[str, Task]) -> None:
  rows = [('task', 'method', 'classes', 'eval accuracy', 'examples', 'adapter')]
  for n, r in results.items():
    method = tasks[n].label
    if r['trained']:
      rows.append((n, method, str(r['num_classes']), f'{r["eval/accuracy"]:.4f}',
                   str(int(r['eval/examples'])), r['adapter_dir']))
    else:
      rows.append((n, method, '-', '-', '-', 'not trained'))
  widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
  lines = ['  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
  metrics_lib.log('=== Tasks ===\n' + '\n'.join(lines))


# ----------------------------------------------------------------------------- export, predict


def export(config: ml_collections.ConfigDict, workdir: str, out: Optional[str]) -> str:
  """--mode=export: copies the trained tasks' adapter directories (a set) to `out`."""
  tasks = plan(config, workdir)
  if not any(t.source for t in tasks.values()):
    raise FileNotFoundError(f'No task is trained in {adapters_dir(workdir)}: train one first.')
  source = adapters_dir(workdir)
  if out is None:
    metrics_lib.log(f'The trained tasks are adapter directories already: {source} (a set: '
                    'vadapt.adapter_dir.load_set); pass --out=DIR for a copy.')
    return source
  if os.path.exists(out):
    raise FileExistsError(f'{out!r} exists; export writes a new directory (nothing is '
                          'overwritten).')
  shutil.copytree(source, out)
  metrics_lib.log(f'Exported the adapter set {source} to {out}.')
  return out


class TaskPredictor(predict_lib.Predictor):
  """A task's adapter (by name, or from an adapter directory) on its backbone, ready to classify
  images: `predict(items, top_k=)` as vadapt.predict.Predictor."""

  def __init__(self, loaded: Loaded, name: str, config: ml_collections.ConfigDict,
               meta: dict[str, Any]):  # pylint: disable=super-init-not-called
    model = loaded.model
    selection = loaded.selections[name]
    spec = model.adapter(name)
    if not spec.num_classes:
      raise ValueError(f'Adapter {name!r} has no head of its own: nothing to classify with.')
    self.meta = meta
    self.config = config
    self.class_names = tuple(spec.class_names) or tuple(str(i) for i in range(spec.num_classes))
    self._params = jax.device_put(loaded.params)
    self._logits = jax.jit(lambda p, x: model.apply({'params': p}, x, adapter=selection,
                                                    head=name, train=False))
    self._size = int(meta.get('image_size') or config.backbone.image_size)
    self._family = meta.get('preprocess') or experiment.preprocess_name(config, 'eval')
    self._crop = meta.get('eval_crop_fraction', config.input.get('eval_crop_fraction'))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str,
                  name: str) -> 'TaskPredictor':
    """Task `name` of a multi-task config, with the workdir's trained tasks."""
    tasks = plan(config, workdir)
    task = get_task(tasks, name, '--adapter')
    if task.source is None:
      raise FileNotFoundError(f'Task {name!r} is not trained (no {adapter_dir.CONFIG} in '
                              f'{os.path.join(adapters_dir(workdir), name)}): train it first '
                              f'(--mode=train --config.task={name}).')
    keep = {name, *task.needs}
    loaded = load(config, tasks, skip=[n for n in tasks if n not in keep])
    meta = adapter_dir.read_config(task.source).get('meta') or _serving_meta(task, -1)
    return cls(loaded, name, task.config, meta)

  @classmethod
  def from_directory(cls, directory: str, backbone: Optional[str] = None) -> 'TaskPredictor':
    """The adapter saved in `directory` (a fusion's members from its sibling directories), on
    the backbone stored with it (or `backbone`)."""
    saved = adapter_dir.read_config(directory)
    meta = saved.get('meta') or {}
    if 'config' not in meta:
      raise ValueError(f'Adapter directory {directory!r} stores no experiment config (meta): it '
                       'was not written by a multi-task run; load it in Python with '
                       'vadapt.adapter_dir.load.')
    config = predict_lib.config_from_meta(meta, backbone)
    served = adapter_dir.block(saved)
    members = list(served.members) if served is not None else []
    parent = os.path.dirname(os.path.abspath(directory))
    sources = [os.path.join(parent, m) for m in members] + [os.path.abspath(directory)]
    missing = [s for s in sources if not os.path.isfile(os.path.join(s, adapter_dir.CONFIG))]
    if missing:
      kind = 'an AdapterFusion' if saved.get('fusion') else 'an output average'
      raise FileNotFoundError(f'Adapter {saved["name"]!r} in {directory!r} is {kind} of '
                              f'{members}; their directories are missing: {missing}.')
    net = backbones.make_model(config.backbone, None)
    for s in sources:
      adapter_dir.check_layout(s, adapter_dir.read_config(s), _abstract_backbone(config, net))
    params = backbones.load_params(config.backbone, net, rng=jax.random.fold_in(
        jax.random.PRNGKey(config.get('seed', 0)), 1))
    model = multi.adapt(net, [])
    for s in sources:
      model, params = adapter_dir.add(model, params, s)
    name = saved['name']
    selection = served or name
    loaded = Loaded(backbone=net, model=model, params=params, selections={name: selection})
    return cls(loaded, name, config, meta)


class MixedPredictor:
  """Several tasks on one backbone serving mixed batches: each image names its task. The
  ordinary tasks run through one compiled program (each example's adapter and head chosen by
  index, as data); a fusion task (a composition block, static) runs through its own.

  Attributes:
    tasks: the tasks served, in index order.
    class_names: per task, its class names.
    traces: how many times the mixed program was traced (1 after any number of batches).
  """

  def __init__(self, loaded: Loaded, tasks: Sequence[Task], batch_size: int = 32):
    model = loaded.model
    self.tasks = tuple(t.name for t in tasks)
    self.class_names = {}
    self._preprocess = {}
    for t in tasks:
      spec = model.adapter(t.name)
      if not spec.num_classes:
        raise ValueError(f'Adapter {t.name!r} has no head of its own: nothing to classify with.')
      self.class_names[t.name] = (tuple(spec.class_names)
                                  or tuple(str(i) for i in range(spec.num_classes)))
      meta = adapter_dir.read_config(t.source).get('meta') or _serving_meta(t, -1)
      self._preprocess[t.name] = (
          int(meta.get('image_size') or t.config.backbone.image_size),
          meta.get('preprocess') or experiment.preprocess_name(t.config, 'eval'),
          meta.get('eval_crop_fraction', t.config.input.get('eval_crop_fraction')))
    sizes = {n: p[0] for n, p in self._preprocess.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f'A mixed batch holds one image size; the tasks were trained at {sizes}: '
                       'serve them separately (--adapter=TASK).')
    self._batch_size = batch_size
    self._index = {n: model.index(n) for n in self.tasks}
    self._fusion = {n: s for n, s in loaded.selections.items()
                    if n in self._index and not isinstance(s, str)}
    self._params = jax.device_put(loaded.params)
    self.traces = 0

    def mixed(p, x, index):
      self.traces += 1
      return model.apply({'params': p}, x, adapter=index, head=index, train=False)

    self._mixed = jax.jit(mixed)
    self._fused = {n: jax.jit(lambda p, x, s=s, n=n: model.apply(
        {'params': p}, x, adapter=s, head=n, train=False)) for n, s in self._fusion.items()}

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str,
                  names: Sequence[str], batch_size: int = 32) -> 'MixedPredictor':
    """Tasks `names` of a multi-task config, with the workdir's trained tasks."""
    tasks = plan(config, workdir)
    check_requested(tasks, names)
    wanted = [t for t in tasks.values() if t.name in set(names)]
    keep = {n for t in wanted for n in (t.name, *t.needs)}
    loaded = load(config, tasks, skip=[n for n in tasks if n not in keep])
    return cls(loaded, wanted, batch_size)

  def _run(self, task: Optional[str], images: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Probabilities of a padded batch: the mixed program (task None) or a fusion's."""
    pad = self._batch_size - len(images)
    images = np.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
    if task is None:
      logits = self._mixed(self._params, images, np.pad(index, (0, pad), constant_values=-1))
    else:
      logits = self._fused[task](self._params, images)
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1))[:len(index)]

  def probabilities(self, requests: Sequence[tuple[str, str]]) -> list[np.ndarray]:
    """Each request's (image file, task) class probabilities over its task's classes."""
    check_requested({n: None for n in self.tasks}, [t for _, t in requests], 'served')
    groups: dict[Optional[str], list[int]] = {}
    for k, (_, task) in enumerate(requests):
      groups.setdefault(task if task in self._fusion else None, []).append(k)
    out: list[Any] = [None] * len(requests)
    for group, members in groups.items():
      for start in range(0, len(members), self._batch_size):
        chunk = members[start:start + self._batch_size]
        images = np.stack([predict_lib.preprocess(predict_lib.read_image(requests[k][0]),
                                                  *self._preprocess[requests[k][1]])
                           for k in chunk])
        index = np.asarray([self._index[requests[k][1]] for k in chunk], np.int32)
        for k, p in zip(chunk, self._run(group, images, index)):
          out[k] = p[:len(self.class_names[requests[k][1]])]
    return out

  def predict(self, requests: Sequence[tuple[str, str]], *,
              top_k: int = 5) -> list[predict_lib.Prediction]:
    """The top_k classes of each (image file, task) request, in request order."""
    if top_k < 1:
      raise ValueError(f'top_k must be >= 1; found {top_k}.')
    out = []
    for (path, task), p in zip(requests, self.probabilities(requests)):
      names = self.class_names[task]
      order = np.argsort(-p, kind='stable')[:min(top_k, len(names))]
      out.append(predict_lib.Prediction(path=path, task=task,
                                        top_k=tuple((names[i], float(p[i])) for i in order)))
    return out


def check_requested(tasks: dict[str, Any], requested: Sequence[str], what: str = 'known') -> None:
  """Every requested task name is one of `tasks`; else one line naming the unknown ones."""
  unknown = sorted(set(requested) - set(tasks), key=list(requested).index)
  if unknown:
    one = len(unknown) == 1
    where = ((' a task' if one else ' tasks') + ' of config.adapters' if what == 'known'
             else ' served by this predictor')
    raise ValueError(f'{", ".join(repr(u) for u in unknown)} {"is" if one else "are"} not'
                     f'{where}; tasks: {", ".join(tasks)}.')


def predict_manifest_cli(config: Optional[ml_collections.ConfigDict], workdir: Optional[str],
                         manifest: str, *, backbone: Optional[str] = None,
                         top_k: int = 5) -> list[predict_lib.Prediction]:
  """--mode=predict --manifest=FILE with a multi-task config: each line 'IMAGE TASK' is
  classified by its task; requests are served in mixed batches through one compiled program.
  Prints one line per request, 'path [task]: class p, class p, ...'."""
  if config is None or 'adapters' not in config:
    raise ValueError('--manifest names tasks of a multi-task config: pass its --config (with '
                     'config.adapters) and --workdir.')
  if workdir is None:
    raise ValueError('--workdir is required to predict with --manifest (the trained adapters '
                     'are there).')
  requests = predict_lib.read_manifest(manifest)
  tasks = plan(config, workdir)
  names = list(dict.fromkeys(t for _, t in requests))
  try:
    check_requested(tasks, names)
  except ValueError as e:
    raise ValueError(f'{manifest}: {e}') from None
  untrained = [n for n in names if tasks[n].source is None]
  if untrained:
    raise FileNotFoundError(f'{manifest}: tasks {untrained} are not trained in '
                            f'{adapters_dir(workdir)}: train them first '
                            f'(--mode=train --config.task={untrained[0]}).')
  predictor = MixedPredictor.from_config(_with_backbone(config, backbone), workdir, names)
  return _log_predictions(predictor.predict(requests, top_k=top_k))


def _with_backbone(config: ml_collections.ConfigDict,
                   backbone: Optional[str]) -> ml_collections.ConfigDict:
  """config with --backbone's checkpoint in place of its own (unchanged without one)."""
  if backbone is None:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.backbone.checkpoint = backbone
  return config


def _log_predictions(predictions: list[predict_lib.Prediction]) -> list[predict_lib.Prediction]:
  for p in predictions:
    metrics_lib.log(predict_lib.format_prediction(p))
  return predictions


def predict_cli(config: Optional[ml_collections.ConfigDict], workdir: Optional[str],
                items: Sequence[str], *, adapter: Optional[str] = None,
                backbone: Optional[str] = None, top_k: int = 5) -> list[predict_lib.Prediction]:
  """--mode=predict with a multi-task config (--adapter=TASK, default config.task) or an adapter
  directory (--adapter=DIR): one line per image, 'path: class p, class p, ...'."""
  if adapter and os.path.isdir(adapter):
    predictor = TaskPredictor.from_directory(adapter, backbone)
  else:
    if config is None or 'adapters' not in config:
      raise ValueError(f'--adapter={adapter!r} is neither an adapter file nor an adapter '
                       'directory; a task name needs its multi-task --config and --workdir.')
    if workdir is None:
      raise ValueError(f'--workdir is required to predict with task {adapter!r} (its trained '
                       'adapters are there).')
    name = adapter or config.get('task')
    get_task(plan(config, workdir), name, '--adapter')
    predictor = TaskPredictor.from_config(_with_backbone(config, backbone), workdir, name)
  return _log_predictions(predictor.predict(items, top_k=top_k))
