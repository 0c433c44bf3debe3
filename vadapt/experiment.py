"""An experiment built from a config: the model, its label rules, optimizer and sharded state.

Shared by every mode (training, evaluation, export, prediction): `setup(config)` loads the backbone,
adds the adapters, splits the params into the trainable `delta` and the `frozen` backbone by the
label rules, and places both on the device mesh. `restore_or_init` resumes the delta and optimizer
state from a workdir's checkpoints, refusing ones trained on another backbone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import optax

from vadapt import api
from vadapt import backbones
from vadapt import checkpoint as ckpt_lib
from vadapt import inject
from vadapt import metrics as metrics_lib
from vadapt import partition
from vadapt import sharding as sharding_lib
from vadapt.pretrained import common as pretrained_common

ADAPTER_METHODS = ('houlsby', 'pfeiffer', 'parallel', 'parallel_attn', 'conv', 'conv_parallel',
                   'vpt_shallow', 'vpt_deep') + api.WEIGHT_METHODS + ('bitfit',)
METHODS = ADAPTER_METHODS + ('full', 'linear', 'clip_adapter')
LOSSES = ('ce', 'contrastive')
# Backbones without convolutional blocks: no place for method='conv'.
TRANSFORMER_MODELS = ('vit', 'clip', 'dinov2')
# AdapterDrop: rate, schedule and ramp (0: over the whole run, total_steps).
_DROP_FIELDS = ('drop_rate', 'drop_schedule', 'drop_ramp_steps')
_ADAPTER_FIELDS = ('bottleneck', 'reduction_factor', 'layers', 'activation', 'scale',
                   'learnable_scale', 'layer_norm', 'dropout') + _DROP_FIELDS
# Methods whose options differ from the bottleneck adapters' (config.adapter.<field>).
_METHOD_FIELDS = {
    'vpt_shallow': ('prompts', 'layers', 'dropout', 'drop_rate'),
    'vpt_deep': ('prompts', 'layers', 'dropout', 'drop_rate'),
    'lora': ('rank', 'alpha', 'modules', 'layers', 'dropout') + _DROP_FIELDS,
    'dora': ('rank', 'alpha', 'modules', 'layers', 'dropout') + _DROP_FIELDS,
    'ssf': ('modules', 'layers') + _DROP_FIELDS,
    'ia3': ('modules', 'layers') + _DROP_FIELDS,
    'bitfit': (),
}



def adapter_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The adapter method and options, JSON-ready (stored in checkpoints and exported files)."""
  method = config.adapter.method
  if method not in METHODS:
    raise ValueError(f'Unknown adapter.method {method!r}; expected one of {METHODS}.')
  spec = {'method': method}
  conv_methods = ('conv', 'conv_parallel')
  if method in conv_methods and config.backbone.model in TRANSFORMER_MODELS:
    raise ValueError(
        f"adapter.method={method!r} puts adapters on convolutional (ResNet, EfficientNet-Lite) "
        f"blocks, and backbone.model={config.backbone.model!r} is a transformer: use one of "
        f"{', '.join(m for m in ADAPTER_METHODS if m not in conv_methods)}.")
  if (method in ADAPTER_METHODS and method not in api.ON_CNN
      and config.backbone.model in backbones.CNN_MODELS):
    raise ValueError(
        f'adapter.method={method!r} puts adapters in transformer blocks, and '
        f'backbone.model={config.backbone.model!r} is a CNN: use one of '
        f'{", ".join(api.ON_CNN + ("linear", "full"))}.')
  if (config.adapter.get('scope') and method in api.ON_CNN
      and config.backbone.model in backbones.CNN_MODELS):
    raise ValueError(f'adapter.scope={config.adapter.scope!r} selects a transformer encoder; '
                     f'backbone.model={config.backbone.model!r} is a CNN: select its residual '
                     'blocks with adapter.layers.')
  if method in ADAPTER_METHODS:
    for name in _METHOD_FIELDS.get(method, _ADAPTER_FIELDS):
      value = config.adapter.get(name)
      spec[name] = list(value) if isinstance(value, tuple) else value
    if 'drop_schedule' in spec:
      ramp = spec['drop_ramp_steps']
      if spec['drop_schedule'] != 'constant' and not ramp:
        ramp = config.total_steps  # What build_model resolves 0 to.
      inject.check_drop(spec['drop_rate'], spec['drop_schedule'], ramp)
    if spec.get('drop_schedule') == 'constant' and not spec.get('drop_ramp_steps'):
      # The default: checkpoints written before schedules existed have the same spec.
      del spec['drop_schedule'], spec['drop_ramp_steps']
    if spec.get('reduction_factor') is not None:  # Documented to replace bottleneck.
      spec['bottleneck'] = None
    if config.adapter.get('scope') and method != 'bitfit':
      spec['scope'] = config.adapter.scope
  schedule = config.adapter.get('drop_schedule', 'constant')
  if schedule != 'constant' and 'drop_schedule' not in spec:
    raise ValueError(f'adapter.drop_schedule={schedule!r} schedules AdapterDrop, which '
                     f'adapter.method={method!r} does not use; leave it at \'constant\'.')
  if method == 'clip_adapter':
    if config.backbone.model != 'clip':
      raise ValueError(f"adapter.method='clip_adapter' needs backbone.model='clip'; found "
                       f'{config.backbone.model!r}.')
    spec['ratio'] = config.clip.ratio
    spec['reduction'] = config.clip.reduction
  return spec


def loss_name(config: ml_collections.ConfigDict) -> str:
  loss = config.get('loss', 'ce')
  if loss not in LOSSES:
    raise ValueError(f'Unknown loss {loss!r}; expected one of {LOSSES}.')
  if loss == 'contrastive' and config.backbone.model != 'clip':
    raise ValueError(f"loss='contrastive' needs backbone.model='clip' (image-text pairs); found "
                     f'{config.backbone.model!r}.')
  return loss


def adapts_text_tower(spec: dict[str, Any]) -> bool:
  """Whether the adapters reach CLIP's text tower (then the classifier is recomputed)."""
  if spec['method'] not in ADAPTER_METHODS:
    return False
  from vadapt import placements  # pylint: disable=g-import-not-at-top
  default = (placements.VPT_SCOPE if spec['method'] in api.PROMPT_METHODS
             else placements.DEFAULT_SCOPE)
  return re.fullmatch(spec.get('scope') or default, 'text/Transformer') is not None


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                class_names: Optional[tuple[str, ...]] = None) -> tuple[nn.Module, nn.Module]:
  """Returns (model to train, plain backbone); the same module for 'full' and 'linear'.

  CLIP backbones need the dataset's `class_names` (their classifier is built from them).
  """
  spec = adapter_spec(config)
  kwargs = {}
  if config.backbone.model == 'clip':
    kwargs = dict(class_names=class_names, templates=tuple(config.clip.templates),
                  recompute_text=adapts_text_tower(spec))
  backbone = backbones.make_model(config.backbone, num_classes, **kwargs)
  if spec['method'] == 'clip_adapter':
    model = backbones.make_model(config.backbone, num_classes, clip_adapter_ratio=spec['ratio'],
                                 clip_adapter_reduction=spec['reduction'], **kwargs)
    return model, backbone
  if spec['method'] not in ADAPTER_METHODS:
    return backbone, backbone
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != 'method'}
  if kwargs.get('drop_schedule', 'constant') != 'constant' and not kwargs.get('drop_ramp_steps'):
    kwargs['drop_ramp_steps'] = config.total_steps  # Ramp over the whole run.
  return api.adapt(backbone, method=spec['method'], **kwargs), backbone


def label_rules(config: ml_collections.ConfigDict):
  """Regex -> label rules. 'full' and 'linear' are rule sets, not separate code paths.

  BatchNorm statistics ('batch_stats/...') are never differentiated: frozen, or labelled
  'batch_stats' (in the delta, replaced by the running averages each step) with
  backbone.train_batch_norm.
  """
  method = adapter_spec(config)['method']
  state = [(r'^batch_stats/', 'batch_stats' if train_batch_norm(config) else 'frozen')]
  if method == 'full':
    return state + [(r'.*', 'full')]
  if method == 'linear':
    return state + [(r'^head/', 'head'), (r'.*', 'frozen')]
  if method == 'bitfit':
    return state + partition.bitfit_rules(train_head=config.train_head)
  return state + partition.default_rules(train_head=config.train_head)


def train_batch_norm(config: ml_collections.ConfigDict) -> bool:
  """Whether training updates BatchNorm statistics (CNN backbones only; off by default)."""
  on = bool(config.backbone.get('train_batch_norm', False))
  if on and config.backbone.model not in backbones.CNN_MODELS:
    raise ValueError(f'backbone.train_batch_norm needs a BatchNorm backbone '
                     f'({", ".join(backbones.CNN_MODELS)}); found {config.backbone.model!r}.')
  return on


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  peak = config.optimizer.learning_rate
  warmup = min(config.schedule.warmup_steps, config.total_steps)
  if config.schedule.decay == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=warmup, decay_steps=max(config.total_steps, warmup + 1),
        end_value=peak * config.schedule.end_factor)
  if config.schedule.decay == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])
  raise ValueError(f"Unknown schedule.decay {config.schedule.decay!r}; expected 'cosine' or "
                   "'constant'.")


def make_optimizer(config: ml_collections.ConfigDict, delta_labels: Any,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """Clipping over the whole delta, then one optimizer per trainable label."""
  opt = config.optimizer
  if opt.name == 'adamw':
    base = lambda: optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
  elif opt.name == 'sgd':
    base = lambda: optax.sgd(schedule, momentum=opt.momentum or None)
  else:
    raise ValueError(f"Unknown optimizer.name {opt.name!r}; expected 'adamw' or 'sgd'.")
  trainable = sorted(set(jax.tree.leaves(delta_labels)) - {'frozen', 'batch_stats'})
  # BatchNorm statistics are set by the train step, never by the optimizer.
  tx = partition.make_optimizer(delta_labels, {'batch_stats': optax.set_to_zero(),
                                               **{label: base() for label in trainable}})
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if opt.get('lr_mults'):  # Only then, so runs without it keep their optimizer state's layout.
    tx = optax.chain(tx, partition.scale_by_path(tuple(opt.lr_mults), delta_labels))
  return tx


_distributed_initialized = False


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize from config.distributed (once; before any computation)."""
  global _distributed_initialized
  dist = config.get('distributed')
  if not dist or not dist.initialize or _distributed_initialized:
    return
  kwargs = {}
  if dist.coordinator_address:  # Empty: let JAX detect the cluster (TPU pods, SLURM, ...).
    kwargs = dict(coordinator_address=dist.coordinator_address,
                  num_processes=dist.num_processes, process_id=dist.process_id)
  jax.distributed.initialize(**kwargs)
  _distributed_initialized = True


@dataclasses.dataclass
class Experiment:
  """Everything a mode needs: config, data info, mesh, model, labels, placed delta/frozen."""
  config: ml_collections.ConfigDict
  info: Any
  mesh: Any
  model: nn.Module
  labels: Any
  delta: Any
  frozen: Any
  delta_shardings: Any
  frozen_shardings: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  meta: dict[str, Any]
  param_table: str
  counts: dict[str, int]


# XLA:CPU's option that runs every matmul as its own YNNPACK call instead of inside XLA's dot
# fusions (which also hold the element-wise work around the dot, e.g. LayerNorm's backward sums).
_CPU_INDIVIDUAL_DOTS = ('xla_cpu_experimental_ynn_fusion_type',
                        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT')


def compiler_options(config: ml_collections.ConfigDict) -> Optional[dict[str, Any]]:
  """XLA options for compiling the train, eval and feature-cache steps (jax.jit's
  compiler_options): config.compiler_options as given, plus XLA:CPU's individual YNNPACK dots
  where config.xla_cpu_individual_dots is set and the backend is the CPU (ignored elsewhere, so
  one config serves CPU and accelerators). None when there are none."""
  options = dict(config.get('compiler_options') or {})
  if config.get('xla_cpu_individual_dots') and jax.default_backend() == 'cpu':
    options.setdefault(*_CPU_INDIVIDUAL_DOTS)
  return options or None


def _check_compiler_options(config: ml_collections.ConfigDict) -> None:
  options = compiler_options(config)
  if not options:
    return
  bad = {k: v for k, v in options.items() if not isinstance(v, (str, bool, int, float))}
  if bad:
    raise ValueError(f'compiler_options values must be strings, numbers or booleans; found '
                     f'{bad}.')
  try:  # XLA checks names and values when it compiles: a trivial program, before any work.
    jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.float32(0)).compile()
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'XLA refused compiler_options {options}: {first}') from None


def check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Everything that can be checked before loading weights or compiling."""
  adapter_spec(config)
  loss_name(config)
  label_rules(config)
  _check_compiler_options(config)
  sharding_lib.batch_size_per_shard(mesh, config.batch_size, 'batch_size')
  sharding_lib.batch_size_per_shard(mesh, config.eval_batch_size, 'eval_batch_size')
  if config.total_steps < 1:
    raise ValueError(f'total_steps must be >= 1; found {config.total_steps}.')
  if config.backbone.checkpoint:  # Before any data is read.
    pretrained_common.require_file(config.backbone.checkpoint, 'backbone.checkpoint')


def check_data(config: ml_collections.ConfigDict, info: Any) -> None:
  """The dataset can train this config: at least two classes."""
  if info.num_classes < 2:
    raise ValueError(
        f'The dataset {config.input.get("path") or config.input.get("name")!r} has '
        f'{info.num_classes} class {list(info.class_names)}: a classifier needs at least 2 (an '
        'ImageFolder needs one subfolder per class).')


def check_batch_size(config: ml_collections.ConfigDict, info: Any) -> None:
  """Warns when one training batch is larger than the whole training set."""
  if config.batch_size > info.num_train:
    logging.warning(
        'batch_size=%d is larger than the whole training set (%d examples): every batch holds '
        'each example about %.1f times (differently augmented). Lower batch_size to at most %d '
        'for batches of distinct examples.', config.batch_size, info.num_train,
        config.batch_size / max(info.num_train, 1), info.num_train)


def check_layers(spec: dict[str, Any], backbone: nn.Module, images: jax.Array) -> None:
  """adapter.layers names only blocks the backbone has (a partial match would adapt fewer)."""
  layers = spec.get('layers')
  if not layers or spec['method'] not in ADAPTER_METHODS:
    return
  shapes = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), images, train=False))
  paths = ['/'.join(str(getattr(k, 'key', k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
  present = {int(m.group(1)) for p in paths for m in [re.search(r'encoderblock_(\d+)(?:/|$)', p)]
             if m}
  if not present:
    return  # No numbered blocks (a scanned or convolutional backbone): vadapt.api decides.
  missing = sorted(set(int(i) for i in layers) - present)
  if missing:
    raise ValueError(
        f'adapter.layers={tuple(layers)} names block(s) {missing} that the backbone does not '
        f'have: it has {len(present)} blocks, indices 0-{max(present)}.')


def make_mesh(config: ml_collections.ConfigDict):
  """The device Mesh of config.mesh (the first mesh.num_devices devices; -1: all)."""
  devices = jax.devices()
  n = config.mesh.get('num_devices', -1)
  if n != -1:
    if not 1 <= n <= len(devices):
      raise ValueError(f'mesh.num_devices={n} but {len(devices)} devices are available.')
    devices = devices[:n]
  return sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp, devices)


def setup(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> Experiment:
  mesh = make_mesh(config)
  check_config(config, mesh)
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  info = input_pipeline.get_info(config.input)
  check_data(config, info)
  model, backbone = build_model(config, info.num_classes, info.class_names)
  images = jnp.zeros(backbones.sample_images(config.backbone).shape, jnp.float32)
  check_layers(adapter_spec(config), backbone, images)
  rng = jax.random.PRNGKey(config.seed)

  if not config.backbone.checkpoint and config.adapter.method != 'full':
    logging.warning('backbone.checkpoint is empty: adapting a randomly initialised backbone '
                    '(fine for tests; set it to a pre-trained .npz or .safetensors for real use).')
  if load_weights:
    backbone_params = backbones.load_params(config.backbone, backbone,
                                            rng=jax.random.fold_in(rng, 1))
  else:
    backbone_params = jax.eval_shape(
        lambda: partition.from_variables(backbone.init(rng, images, train=False)))

  if model is backbone:
    init_fn = lambda rng, bb: bb
  elif isinstance(model, inject.Adapted):
    init_fn = lambda rng, bb: init_adapted(model, bb, rng, images)
  else:  # The backbone plus new modules of its own (CLIP-Adapter): create only what is missing.
    init_fn = lambda rng, bb: model.apply({'params': bb}, images, train=False, rngs={'params': rng},
                                          mutable=['params'])[1]['params']
  abstract_params = jax.eval_shape(init_fn, rng, backbone_params)
  labels = partition.label_tree(abstract_params, label_rules(config))
  delta_abs, frozen_abs = partition.split(abstract_params, labels)
  delta_labels, _ = partition.split(labels, labels)
  if not jax.tree.leaves(delta_abs):
    raise ValueError(f'Nothing to train: the label rules of method {config.adapter.method!r} '
                     'mark every parameter frozen.')
  shardings = functools.partial(sharding_lib.tree_shardings, mesh=mesh,
                                rule=config.param_sharding,
                                min_size=config.mesh.get('fsdp_min_size', 2 ** 14))
  delta_sh, frozen_sh = shardings(delta_abs), shardings(frozen_abs)
  bb_sh = shardings(backbone_params)

  if load_weights:
    # big_vision-style: shapes first, then one jitted init that lands every leaf where it belongs.
    init = jax.jit(lambda rng, bb: partition.split(init_fn(rng, bb), labels),
                   in_shardings=(sharding_lib.replicated(mesh), bb_sh),
                   out_shardings=(delta_sh, frozen_sh))
    delta, frozen = init(rng, backbone_params)
  else:
    delta, frozen = delta_abs, frozen_abs

  layout = ckpt_lib.layout_fingerprint(frozen_abs)
  fingerprint = None
  if load_weights:
    # Once, from the host copy just loaded: the frozen leaves' values, as they were read.
    host = pretrained_common.flatten(backbone_params)
    fingerprint = ckpt_lib.fingerprint(pretrained_common.unflatten(
        {k: host.get(k, v) for k, v in pretrained_common.flatten(frozen).items()}))

  schedule = make_schedule(config)
  tx = make_optimizer(config, delta_labels, schedule)
  counts = partition.count(abstract_params, labels)
  table = partition.summary_table(abstract_params, labels)
  meta = {
      'adapter': adapter_spec(config),
      'variant': config.backbone.variant,
      'image_size': config.backbone.image_size,
      'num_classes': info.num_classes,
      # What prediction on new images needs (vadapt.predict): names and preprocessing.
      'class_names': list(info.class_names),
      'preprocess': preprocess_name(config, 'eval'),
      'eval_crop_fraction': config.input.get('eval_crop_fraction'),
      'backbone_fingerprint': fingerprint,  # None without weights (load_weights=False).
      'backbone_layout': layout,
      'backbone_checkpoint': os.path.abspath(config.backbone.checkpoint)
                             if config.backbone.checkpoint else '',
      'config': json.loads(config.to_json_best_effort()),
  }
  return Experiment(config=config, info=info, mesh=mesh, model=model, labels=labels,
                     delta=delta, frozen=frozen, delta_shardings=delta_sh,
                     frozen_shardings=frozen_sh, tx=tx, schedule=schedule, meta=meta,
                     param_table=table, counts=counts)


def init_adapted(model: inject.Adapted, backbone_params, rng, images):
  """New adapters on the pre-trained backbone; BatchNorm statistics (if any) pass through."""
  variables = partition.to_variables(backbone_params)
  state = {c: v for c, v in variables.items() if c != 'params'}
  out = api.init_with_pretrained(model, variables['params'], rng, images,
                                 backbone_state=state or None)
  return partition.from_variables(out) if state else out


def opt_state_shardings(exp: Experiment):
  abstract = jax.eval_shape(exp.tx.init, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.delta))
  return sharding_lib.tree_shardings(abstract, exp.mesh, exp.config.param_sharding,
                                     min_size=exp.config.mesh.get('fsdp_min_size', 2 ** 14))


def preprocess_name(config: ml_collections.ConfigDict, split: str) -> str:
  del split  # Train and eval share the normalisation; augmentation lives in config.input.
  return config.get('preprocess', 'vit')


# Config fields that a resumed run may change without a word: they do not change what is trained.
_QUIET_FIELDS = ('mode', 'log_every', 'eval_every', 'eval_at_start', 'checkpoint_every',
                 'max_to_keep', 'prefetch', 'eval_batch_size', 'mesh', 'param_sharding',
                 'distributed', 'debug', 'checkpoint', 'pretrain', 'backbone.checkpoint',
                 'cache_features')


class CheckpointConfigMismatchError(ValueError):
  """A workdir's checkpoint was trained with another adapter or model than the config builds."""


def _flat_json(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat_json(v, f'{prefix}{k}.'))
  return out


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  return [f'{k} {old.get(k, "unset")!r} -> {new.get(k, "unset")!r}'
          for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _what_differs(exp: Experiment, meta: dict[str, Any], stored: dict[str, tuple[int, ...]],
                  stored_opt: list[tuple[int, ...]], opt_like: Any) -> list[str]:
  """The settings in which the checkpoint's run differs from this config in what it trains."""
  old_spec, new_spec = meta.get('adapter', {}), exp.meta['adapter']
  # Options a checkpoint predates (added to vadapt since) are judged by the stored trees below.
  keys = ['method'] + sorted((set(old_spec) & set(new_spec)) - {'method'})
  changes = [f'adapter.{k} {old_spec.get(k)!r} -> {new_spec.get(k)!r}' for k in keys
             if old_spec.get(k) != new_spec.get(k)]
  for key, name in (('variant', 'backbone.variant'), ('image_size', 'backbone.image_size'),
                    ('num_classes', 'number of classes')):
    if meta.get(key) != exp.meta[key]:
      changes.append(f'{name} {meta.get(key)!r} -> {exp.meta[key]!r}')
  if changes:
    return changes
  # The spec agrees; the stored trees still might not (train_head, optimizer, label rules, ...).
  wanted = ckpt_lib.tree_shapes(exp.delta)
  wanted_opt = sorted(ckpt_lib.tree_shapes(opt_like).values())
  if stored == wanted and stored_opt == wanted_opt:
    return []
  old_cfg = {k: v for k, v in _flat_json(meta.get('config', {})).items()
             if not k.startswith(_QUIET_FIELDS)}
  new_cfg = {k: v for k, v in _flat_json(exp.meta['config']).items()
             if not k.startswith(_QUIET_FIELDS)}
  changes = _changes(old_cfg, new_cfg)
  diff = sorted(set(stored) ^ set(wanted)) or sorted(
      k for k in stored if stored[k] != wanted.get(k))
  return changes + [f'trained parameters differ ({", ".join(diff[:3]) or "optimizer state"})']


def _refusal(exp: Experiment, meta: dict[str, Any], where: str, stored: Any, stored_opt: Any,
             opt_like: Any, step: int, purpose: str) -> Optional[Exception]:
  """The error that forbids using this step for `purpose`, or None (and notices on resume)."""
  allow = exp.config.get('checkpoint', {}).get('allow_other_backbone', False)
  changes = _what_differs(exp, meta, stored, stored_opt, opt_like)
  if changes:
    fix = ('Use a new --workdir for the new settings, go back to the checkpoint\'s, or pass '
           '--config.checkpoint.restart=True to start over here (the old run is moved to '
           'previous_runs/, not deleted).' if purpose == 'resume' else
           'Run with the settings it was trained with (they are in its meta) or point --workdir '
           'at the run you mean.')
    return CheckpointConfigMismatchError(
        f'{where} was trained with other settings than this config: {"; ".join(changes)}. {fix}')
  if exp.meta['backbone_fingerprint'] is not None:
    problem = ckpt_lib.backbone_mismatch(meta, exp.meta, where)
    if problem and not allow:
      return ckpt_lib.BackboneMismatchError(problem + (
          ' Use the backbone it was trained on, a new --workdir, or '
          '--config.checkpoint.allow_other_backbone=True to continue on this one.'
          if purpose == 'resume' else ' Use the backbone it was trained on, or '
          '--config.checkpoint.allow_other_backbone=True to use this one anyway.'))
    if problem:
      metrics_lib.log(f'Note: {problem} Going on, as checkpoint.allow_other_backbone=True asks.')
  if purpose == 'resume':
    old_cfg = _flat_json(meta.get('config', {}))
    new_cfg = _flat_json(exp.meta['config'])
    changed = [c for c in _changes(old_cfg, new_cfg) if not c.startswith(_QUIET_FIELDS)]
    if changed:
      metrics_lib.log(f'Note: resuming step {step} with changed settings: {", ".join(changed)} '
                      '(the optimizer state and step count carry over; the schedule follows the '
                      'new values).')
  return None


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200] if text else ""}'


def restore_latest(exp: Experiment, checkpointer: ckpt_lib.Checkpointer, delta_like: Any,
                   opt_like: Any, *, purpose: str) -> Optional[tuple[int, Any, Any, dict]]:
  """(step, delta, opt_state, meta) of the newest intact checkpoint, or None when there is none.

  Steps that are incomplete (no commit marker, empty, unreadable data) are skipped with a message
  naming each and why; for purpose='resume' they are then moved to `<workdir>/damaged_checkpoints/`
  (so that new saves do not collide with them), never deleted. A checkpoint trained with other
  settings or on another backbone raises before anything in the workdir is touched.
  """
  skipped = []
  found = None
  for step in sorted(checkpointer.all_steps(), reverse=True):
    problem = checkpointer.step_problem(step)
    if problem is None:
      try:  # Metadata only: what was stored and with which settings.
        meta = checkpointer.restore_meta(step)
        stored = checkpointer.stored_shapes(step, 'delta')
        stored_opt = sorted(checkpointer.stored_shapes(step, 'opt_state').values())
      except Exception as e:  # pylint: disable=broad-except
        problem = f'its files cannot be read ({_first_line(e)})'
    if problem is None:
      where = f'The checkpoint at step {step} in {checkpointer.directory}'
      error = _refusal(exp, meta, where, stored, stored_opt, opt_like, step, purpose)
      if error is not None:
        raise error
      try:
        delta, opt_state, meta = checkpointer.restore(step, delta_like, opt_like)
        found = (step, delta, opt_state, meta)
        break
      except Exception as e:  # pylint: disable=broad-except
        problem = f'its files cannot be read ({_first_line(e)})'
    skipped.append((step, problem))
  for step, problem in skipped:
    message = f'Skipped the checkpoint at step {step} in {checkpointer.directory}: {problem}.'
    if purpose == 'resume' and jax.process_index() == 0:
      # Out of the way of the saves to come, which would collide with it; kept, not deleted.
      moved = checkpointer.set_aside(step, os.path.join(
          os.path.dirname(checkpointer.directory), 'damaged_checkpoints', str(step)))
      message += f' Moved it to {moved} (kept for inspection).'
    metrics_lib.log(message)
  if skipped and purpose == 'resume':
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('vadapt_damaged_checkpoints_moved')
    checkpointer.reload()
  return found


def restore_or_init(exp: Experiment, checkpointer: ckpt_lib.Checkpointer, opt_sh, *,
                    purpose: str = 'resume'):
  """(delta, opt_state, start_step): the newest intact checkpoint in the workdir, else a fresh
  state (for purpose='eval' no checkpoint is an error). See `restore_latest`."""
  opt_state = jax.jit(exp.tx.init, out_shardings=opt_sh)(exp.delta)
  restored = restore_latest(exp, checkpointer, exp.delta, opt_state, purpose=purpose)
  if restored is None:
    if purpose != 'resume':
      raise FileNotFoundError(f'No intact checkpoint in {checkpointer.directory}: train first.')
    return exp.delta, opt_state, 0
  step, delta, opt_state, _ = restored
  if purpose == 'resume':
    metrics_lib.log(f'Resumed from the checkpoint at step {step} in {checkpointer.directory}.')
  return delta, opt_state, step
