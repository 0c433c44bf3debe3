"""Training, evaluation and adapter export: the functions `main.py`, tests and notebooks call.

  result = train_and_evaluate(config, workdir)   # resumes from workdir/checkpoints when present
  metrics = evaluate(config, workdir)
  path = export_adapter(config, workdir, out_path)
  metrics = zero_shot(config, workdir)             # CLIP: zero-shot top-1, no training
  metrics = tip_adapter(config, workdir)           # CLIP: training-free Tip-Adapter

CLIP (backbone.model='clip') trains through the same step. The classifier is the zero-shot
text-embedding matrix of the class names x config.clip.templates (vadapt.models.clip_classifier).
With adapter.scope reaching the text tower ('text/Transformer', or None for both towers) it is
recomputed from the adapted text tower inside every step; otherwise it is computed once and held
as a frozen param. config.loss selects cross-entropy over those class logits ('ce') or FLYP's
symmetric image-text InfoNCE ('contrastive': each image against the prompt ensemble of its own
class, scaled by CLIP's logit_scale). adapter.method='clip_adapter' trains a CLIP-Adapter on the
frozen image features instead. Every CLIP leaf (both towers, logit_scale, the classifier) is
frozen by the label rules.

The params are split once into a trainable `delta` (adapters, head; every leaf for
method='full') and a `frozen` backbone by the label rules. The jitted step differentiates the
loss with respect to the delta only, updates it with a per-label optimizer, and donates the delta
and optimizer state; the frozen tree is an input that is never written (nor checkpointed).

Multi-host: set config.distributed.initialize=True (plus coordinator_address, num_processes and
process_id where JAX cannot detect the cluster) and start the same command on every host. Each
process reads its own rows of every batch; checkpoints go to one shared workdir.

Putting an exported adapter back onto a backbone for inference::

  model, backbone = build_model(config, num_classes)
  params = checkpoint.load_adapter('adapter.safetensors', model, backbone_params)
  logits = model.apply({'params': params}, images, train=False)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Iterator, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from vadapt import api
from vadapt import backbones
from vadapt import checkpoint as ckpt_lib
from vadapt import inject
from vadapt import metrics as metrics_lib
from vadapt import partition
from vadapt import sharding as sharding_lib
from vadapt.pretrained import common as pretrained_common

# vadapt.input_pipeline is imported where data is read: it loads TensorFlow (about 0.5 GiB), which
# the step itself (and benchmarks/train_step.py, which measures its memory) does not need.

ADAPTER_METHODS = ('houlsby', 'pfeiffer', 'parallel', 'parallel_attn', 'conv')
METHODS = ADAPTER_METHODS + ('full', 'linear', 'clip_adapter')
LOSSES = ('ce', 'contrastive')
_ADAPTER_FIELDS = ('bottleneck', 'reduction_factor', 'layers', 'activation', 'scale',
                   'learnable_scale', 'layer_norm', 'dropout')


class TrainingDivergedError(FloatingPointError):
  """The loss, the gradient or the updated params stopped being finite."""


@dataclasses.dataclass
class TrainResult:
  """What train_and_evaluate returns.

  Attributes:
    step: the last completed step.
    metrics: the final train and eval metrics (python floats).
    delta: the trained params (host numpy tree).
    frozen: the frozen backbone tree as used by the step (device arrays, never modified).
    checkpoint_dir: where the Orbax checkpoints are.
    adapter_path: the exported adapter file (None for method='full').
  """
  step: int
  metrics: dict[str, float]
  delta: Any
  frozen: Any
  checkpoint_dir: str
  adapter_path: Optional[str]


# ---------------------------------------------------------------------------------------------
# Model, labels, optimizer.


def adapter_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The adapter method and options, JSON-ready (stored in checkpoints and exported files)."""
  method = config.adapter.method
  if method not in METHODS:
    raise ValueError(f'Unknown adapter.method {method!r}; expected one of {METHODS}.')
  spec = {'method': method}
  if method in ADAPTER_METHODS:
    for name in _ADAPTER_FIELDS:
      value = config.adapter.get(name)
      spec[name] = list(value) if isinstance(value, tuple) else value
    if config.adapter.get('scope'):
      spec['scope'] = config.adapter.scope
  if method == 'clip_adapter':
    if config.backbone.model != 'clip':
      raise ValueError(f"adapter.method='clip_adapter' needs backbone.model='clip'; found "
                       f'{config.backbone.model!r}.')
    spec['ratio'] = config.clip.ratio
    spec['reduction'] = config.clip.reduction
  return spec


def _loss_name(config: ml_collections.ConfigDict) -> str:
  loss = config.get('loss', 'ce')
  if loss not in LOSSES:
    raise ValueError(f'Unknown loss {loss!r}; expected one of {LOSSES}.')
  if loss == 'contrastive' and config.backbone.model != 'clip':
    raise ValueError(f"loss='contrastive' needs backbone.model='clip' (image-text pairs); found "
                     f'{config.backbone.model!r}.')
  return loss


def _adapts_text_tower(spec: dict[str, Any]) -> bool:
  """Whether the adapters reach CLIP's text tower (then the classifier is recomputed)."""
  if spec['method'] not in ADAPTER_METHODS:
    return False
  from vadapt import placements  # pylint: disable=g-import-not-at-top
  return re.fullmatch(spec.get('scope') or placements.DEFAULT_SCOPE, 'text/Transformer') is not None


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                class_names: Optional[tuple[str, ...]] = None) -> tuple[nn.Module, nn.Module]:
  """Returns (model to train, plain backbone); the same module for 'full' and 'linear'.

  CLIP backbones need the dataset's `class_names` (their classifier is built from them).
  """
  spec = adapter_spec(config)
  kwargs = {}
  if config.backbone.model == 'clip':
    kwargs = dict(class_names=class_names, templates=tuple(config.clip.templates),
                  recompute_text=_adapts_text_tower(spec))
  backbone = backbones.make_model(config.backbone, num_classes, **kwargs)
  if spec['method'] == 'clip_adapter':
    model = backbones.make_model(config.backbone, num_classes, clip_adapter_ratio=spec['ratio'],
                                 clip_adapter_reduction=spec['reduction'], **kwargs)
    return model, backbone
  if spec['method'] not in ADAPTER_METHODS:
    return backbone, backbone
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k != 'method'}
  return api.adapt(backbone, method=spec['method'], **kwargs), backbone


def label_rules(config: ml_collections.ConfigDict):
  """Regex -> label rules. 'full' and 'linear' are rule sets, not separate code paths."""
  method = adapter_spec(config)['method']
  if method == 'full':
    return [(r'.*', 'full')]
  if method == 'linear':
    return [(r'^head/', 'head'), (r'.*', 'frozen')]
  return partition.default_rules(train_head=config.train_head)


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
  trainable = sorted(set(jax.tree.leaves(delta_labels)) - {'frozen'})
  tx = partition.make_optimizer(delta_labels, {label: base() for label in trainable})
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy (B,) with label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


# ---------------------------------------------------------------------------------------------
# Steps.


def apply_method(model: nn.Module, params: Any, method: str, *args, **kwargs):
  """model.<method>(*args, **kwargs) with `params`, through the adapters of an Adapted model."""
  if isinstance(model, inject.Adapted):
    return model.apply({'params': params}, method, *args, method='call_method', **kwargs)
  return model.apply({'params': params}, *args, method=method, **kwargs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_classes: int, label_smoothing: float,
                    seed: int, nan_at_step: int = -1, loss: str = 'ce') -> Callable:
  """step(delta, opt_state, frozen, batch, step) -> (delta, opt_state, metrics).

  `step` counts completed steps; dropout keys are fold_in(seed, step), so a resumed run draws the
  same masks as an uninterrupted one. loss='contrastive' (CLIP) is the symmetric InfoNCE of the
  batch's images against their classes' prompts; its accuracy counts images whose best-matching
  prompt is of their own class.
  """
  loss_kind = loss

  def train_step(delta, opt_state, frozen, batch, step):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)

    def loss_fn(delta):
      params = partition.merge(delta, frozen)
      if loss_kind == 'contrastive':
        from vadapt.models import clip_classifier  # pylint: disable=g-import-not-at-top
        pair_logits = apply_method(model, params, 'contrastive_logits', batch['image'],
                                   batch['label'], train=True, rngs={'dropout': rng})
        # As class scores: the class of the prompt each image matches best.
        logits = jax.nn.one_hot(batch['label'], num_classes)[jnp.argmax(pair_logits, -1)]
        loss = clip_classifier.contrastive_loss(pair_logits)
      else:
        logits = model.apply({'params': params}, batch['image'], train=True,
                             rngs={'dropout': rng})
        loss = jnp.mean(cross_entropy(logits, batch['label'], num_classes, label_smoothing))
      if nan_at_step >= 0:  # Test hook: the (1-based) step nan_at_step diverges.
        loss = jnp.where(step + 1 == nan_at_step, jnp.nan, loss)
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(delta)
    updates, opt_state = tx.update(grads, opt_state, delta)
    delta = optax.apply_updates(delta, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(delta)]))
    metrics = {
        'loss': loss,
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
        'learning_rate': schedule(step),
        'grad_norm': grad_norm,
        'finite': finite,
    }
    return delta, opt_state, metrics

  return train_step


def make_eval_step(model: nn.Module, num_classes: int) -> Callable:
  """step(delta, frozen, batch) -> {'correct', 'count', 'loss_sum'} summed over valid examples."""
  def eval_step(delta, frozen, batch):
    params = partition.merge(delta, frozen)
    logits = model.apply({'params': params}, batch['image'], train=False)
    mask = batch['mask'].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    loss = cross_entropy(logits, batch['label'], num_classes)
    return {'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask),
            'loss_sum': jnp.sum(loss * mask)}
  return eval_step


# ---------------------------------------------------------------------------------------------
# Setup.


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
class _Experiment:
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


def _check_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Everything that can be checked before loading weights or compiling."""
  adapter_spec(config)
  _loss_name(config)
  sharding_lib.batch_size_per_shard(mesh, config.batch_size, 'batch_size')
  sharding_lib.batch_size_per_shard(mesh, config.eval_batch_size, 'eval_batch_size')
  if config.total_steps < 1:
    raise ValueError(f'total_steps must be >= 1; found {config.total_steps}.')
  if config.backbone.checkpoint:  # Before any data is read.
    pretrained_common.require_file(config.backbone.checkpoint, 'backbone.checkpoint')


def _setup(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> _Experiment:
  devices = jax.devices()
  n = config.mesh.get('num_devices', -1)
  if n != -1:
    if not 1 <= n <= len(devices):
      raise ValueError(f'mesh.num_devices={n} but {len(devices)} devices are available.')
    devices = devices[:n]
  mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  _check_config(config, mesh)
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  info = input_pipeline.get_info(config.input)
  model, backbone = build_model(config, info.num_classes, info.class_names)
  images = jnp.zeros(backbones.sample_images(config.backbone).shape, jnp.float32)
  rng = jax.random.PRNGKey(config.seed)

  if not config.backbone.checkpoint and config.adapter.method != 'full':
    logging.warning('backbone.checkpoint is empty: adapting a randomly initialised backbone '
                    '(fine for tests; set it to a pre-trained .npz or .safetensors for real use).')
  if load_weights:
    backbone_params = backbones.load_params(config.backbone, backbone,
                                            rng=jax.random.fold_in(rng, 1))
  else:
    backbone_params = jax.eval_shape(
        lambda: backbone.init(rng, images, train=False)['params'])

  if model is backbone:
    init_fn = lambda rng, bb: bb
  elif isinstance(model, inject.Adapted):
    init_fn = lambda rng, bb: api.init_with_pretrained(model, bb, rng, images)
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

  schedule = make_schedule(config)
  tx = make_optimizer(config, delta_labels, schedule)
  counts = partition.count(abstract_params, labels)
  table = partition.summary_table(abstract_params, labels)
  meta = {
      'adapter': adapter_spec(config),
      'variant': config.backbone.variant,
      'image_size': config.backbone.image_size,
      'num_classes': info.num_classes,
      'backbone_fingerprint': ckpt_lib.fingerprint(frozen_abs),
      'backbone_checkpoint': os.path.abspath(config.backbone.checkpoint)
                             if config.backbone.checkpoint else '',
      'config': json.loads(config.to_json_best_effort()),
  }
  return _Experiment(config=config, info=info, mesh=mesh, model=model, labels=labels,
                     delta=delta, frozen=frozen, delta_shardings=delta_sh,
                     frozen_shardings=frozen_sh, tx=tx, schedule=schedule, meta=meta,
                     param_table=table, counts=counts)


def _opt_state_shardings(exp: _Experiment):
  abstract = jax.eval_shape(exp.tx.init, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), exp.delta))
  return sharding_lib.tree_shardings(abstract, exp.mesh, exp.config.param_sharding,
                                     min_size=exp.config.mesh.get('fsdp_min_size', 2 ** 14))


def _preprocess(config: ml_collections.ConfigDict, split: str) -> str:
  del split  # Train and eval share the normalisation; augmentation lives in config.input.
  return config.get('preprocess', 'vit')


def _eval_iterator(exp: _Experiment) -> Iterator[dict]:
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  c = exp.config
  return input_pipeline.make_eval_iterator(
      c.input, global_batch_size=c.eval_batch_size, image_size=c.backbone.image_size,
      preprocess=_preprocess(c, 'eval'), process_index=jax.process_index(),
      process_count=jax.process_count())


def _run_eval(exp: _Experiment, eval_step: Callable, delta: Any) -> dict[str, float]:
  batch_sh = sharding_lib.batch_sharding(exp.mesh)
  totals = {'correct': 0.0, 'count': 0.0, 'loss_sum': 0.0}
  for batch in _eval_iterator(exp):
    out = jax.device_get(eval_step(delta, exp.frozen, sharding_lib.put_global_batch(
        {k: batch[k] for k in ('image', 'label', 'mask')}, batch_sh)))
    for k in totals:
      totals[k] += float(out[k])
  if not totals['count']:
    raise ValueError(f'The eval split {exp.config.input.get("eval_split")!r} yielded no examples.')
  return {'eval/accuracy': totals['correct'] / totals['count'],
          'eval/loss': totals['loss_sum'] / totals['count'],
          'eval/examples': totals['count']}


def _jit_eval_step(exp: _Experiment) -> Callable:
  return jax.jit(make_eval_step(exp.model, exp.info.num_classes),
                 in_shardings=(exp.delta_shardings, exp.frozen_shardings,
                               sharding_lib.batch_sharding(exp.mesh)))


def _tree_bytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def _human_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024
  return f'{n:.1f} GiB'


def _restore_or_init(exp: _Experiment, checkpointer: ckpt_lib.Checkpointer, opt_sh):
  """(delta, opt_state, start_step): the latest checkpoint in the workdir, else a fresh state."""
  opt_state = jax.jit(exp.tx.init, out_shardings=opt_sh)(exp.delta)
  step = checkpointer.latest_step()
  if step is None:
    return exp.delta, opt_state, 0
  meta = checkpointer.restore_meta(step)
  if meta.get('backbone_fingerprint') != exp.meta['backbone_fingerprint']:
    raise ckpt_lib.BackboneMismatchError(
        f'The checkpoint at step {step} in {checkpointer.directory} was trained on another '
        f'backbone (fingerprint {meta.get("backbone_fingerprint", "")[:16]}..., variant '
        f'{meta.get("variant")!r}) than this config builds ({exp.meta["backbone_fingerprint"][:16]}'
        f'..., variant {exp.meta["variant"]!r}): use a fresh workdir or the original config.')
  delta, opt_state, _ = checkpointer.restore(step, exp.delta, opt_state)
  metrics_lib.log(f'Resumed from the checkpoint at step {step} in {checkpointer.directory}.')
  return delta, opt_state, step


# ---------------------------------------------------------------------------------------------
# Public entry points.


def pretrain_backbone(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Stage 1 of a two-stage run: fully trains the backbone on config.pretrain's source task.

  Saves it as a vit_jax-format .npz (the format of published ViT checkpoints) and returns the
  path; does nothing when that file already exists.
  """
  from vadapt.pretrained import vit as vit_loader  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, config.pretrain.output)
  if os.path.exists(out):
    metrics_lib.log(f'Stage 1 skipped: pre-trained backbone found at {out}.')
    return out
  c = copy.deepcopy(config)
  with c.unlocked():
    c.pretrain.enabled = False
    c.adapter.method = 'full'
    c.backbone.checkpoint = ''
    c.backbone.reset_head = False
    if config.pretrain.classes:
      c.input.classes = tuple(config.pretrain.classes)
    c.total_steps = config.pretrain.total_steps
    c.optimizer.learning_rate = config.pretrain.learning_rate
    c.eval_at_start = False
  metrics_lib.log(
      f'=== Stage 1: pre-training the backbone (full training, every parameter) on classes '
      f'{tuple(c.input.get("classes") or ())} of {c.input.name!r}, {c.total_steps} steps ===\n'
      'Published pre-trained weights cannot be downloaded offline, so this run makes its own: a '
      'backbone trained on a different (source) task, saved in the vit_jax .npz format.')
  result = train_and_evaluate(c, os.path.join(workdir, 'pretrain'), export=False)
  params = jax.device_get(partition.merge(result.delta, result.frozen))
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    vit_loader.save_vit_jax_npz(params, out)
  if jax.process_count() > 1:  # Every process loads the file next.
    multihost_utils.sync_global_devices('vadapt_pretrained_backbone_written')
  metrics_lib.log(f'Stage 1 done: source-task eval accuracy '
                  f'{result.metrics.get("eval/accuracy", float("nan")):.3f}; saved the backbone '
                  f'as a vit_jax-format checkpoint: {out} ({_human_bytes(os.path.getsize(out))}).')
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       export: bool = True) -> TrainResult:
  """Trains config.total_steps steps (resuming from workdir/checkpoints), evaluates, exports.

  Args:
    config: an experiment config (configs/*.py).
    workdir: checkpoints, TensorBoard events, metrics.jsonl and the exported adapter go here.
    export: write workdir/adapter.safetensors at the end (adapter and linear methods).

  Raises:
    TrainingDivergedError: the loss became NaN/inf; the last good checkpoint is kept.
  """
  initialize_distributed(config)
  workdir = os.path.abspath(workdir)
  if config.get('pretrain') and config.pretrain.enabled:
    npz = pretrain_backbone(config, workdir)
    config = copy.deepcopy(config)
    with config.unlocked():
      config.backbone.checkpoint = npz
    metrics_lib.log(f'=== Stage 2: loading {npz} as the pre-trained backbone, freezing it and '
                    f'adapting it to a new task: classes {tuple(config.input.get("classes") or ())}'
                    f' with method {config.adapter.method!r} ===')

  exp = _setup(config)
  c = exp.config
  trainable = sum(v for k, v in exp.counts.items() if k != 'frozen')
  total = sum(exp.counts.values())
  metrics_lib.log(exp.param_table)
  metrics_lib.log(f'Trainable parameters: {trainable:,} of {total:,} '
                  f'({100.0 * trainable / max(total, 1):.3f}%), method {c.adapter.method!r}, '
                  f'mesh {dict(exp.mesh.shape)}, {jax.process_count()} process(es).')

  opt_sh = _opt_state_shardings(exp)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=c.max_to_keep)
  delta, opt_state, start_step = _restore_or_init(exp, checkpointer, opt_sh)
  writer = metrics_lib.MetricWriter(workdir)
  repl = sharding_lib.replicated(exp.mesh)
  batch_sh = sharding_lib.batch_sharding(exp.mesh)

  train_step = jax.jit(
      make_train_step(exp.model, exp.tx, exp.schedule, num_classes=exp.info.num_classes,
                      label_smoothing=c.label_smoothing, seed=c.seed,
                      nan_at_step=c.debug.nan_at_step, loss=_loss_name(c)),
      in_shardings=(exp.delta_shardings, opt_sh, exp.frozen_shardings, batch_sh, repl),
      out_shardings=(exp.delta_shardings, opt_sh, repl),
      donate_argnums=(0, 1))
  eval_step = _jit_eval_step(exp)
  final_metrics: dict[str, float] = {}

  if start_step == 0 and c.eval_at_start:
    before = _run_eval(exp, eval_step, delta)
    final_metrics['eval/accuracy_at_start'] = before['eval/accuracy']
    writer.write_scalars(0, before)
    metrics_lib.log(f'Before training: eval accuracy {before["eval/accuracy"]:.3f} '
                    f'(chance {1.0 / exp.info.num_classes:.3f}) on {int(before["eval/examples"])} '
                    'held-out examples.')

  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  host_iter = input_pipeline.make_train_iterator(
      c.input, global_batch_size=c.batch_size, image_size=c.backbone.image_size,
      preprocess=_preprocess(c, 'train'), seed=c.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  # Each process holds its own rows; prefetch assembles global arrays a few steps ahead.
  train_iter = input_pipeline.prefetch_to_device(
      ({'image': b['image'], 'label': b['label']} for b in host_iter), c.prefetch, batch_sh)
  progress = metrics_lib.Progress(c.total_steps, c.batch_size, start_step)
  history: list[dict[str, float]] = []
  last_good = start_step
  pending = None  # (step, device metrics) of the previous step, checked one step late.

  def check(step, m):
    host = {k: float(v) for k, v in jax.device_get(m).items()}
    if not host.pop('finite'):
      checkpointer.wait()
      kept = checkpointer.latest_step()
      where = (f'the last good checkpoint (step {kept}) is kept in {checkpointer.directory}'
               if kept is not None else 'no checkpoint had been written yet')
      raise TrainingDivergedError(
          f'Training diverged at step {step}: loss {host["loss"]}, grad norm '
          f'{host["grad_norm"]} (non-finite loss, gradient or params); {where}. Lower '
          'optimizer.learning_rate or set grad_clip_norm.')
    history.append(host)
    return host

  try:
    for step in range(start_step + 1, c.total_steps + 1):
      batch = next(train_iter)
      delta, opt_state, m = train_step(delta, opt_state, exp.frozen, batch, step - 1)
      if pending is not None:
        check(*pending)
      pending = (step, m)

      is_last = step == c.total_steps
      if step % c.log_every == 0 or is_last or (c.checkpoint_every and
                                                step % c.checkpoint_every == 0):
        check(*pending)
        pending = None
        last_good = step
      if step % c.log_every == 0 or is_last:
        timing = progress.tick(step)
        avg = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        history.clear()
        writer.write_scalars(step, {**{f'train/{k}': v for k, v in avg.items()},
                                    'train/img_per_sec': timing['img_per_sec']})
        metrics_lib.log(progress.line(step, avg, timing))
        final_metrics.update({f'train/{k}': v for k, v in avg.items()})
      if (c.checkpoint_every and step % c.checkpoint_every == 0) or is_last:
        checkpointer.save(step, delta, opt_state, {**exp.meta, 'step': step})
      if c.eval_every and step % c.eval_every == 0 and not is_last:
        ev = _run_eval(exp, eval_step, delta)
        writer.write_scalars(step, ev)
        metrics_lib.log(f'step {step}: eval accuracy {ev["eval/accuracy"]:.4f}')
  finally:
    checkpointer.wait()
    writer.flush()

  step = max(last_good, start_step)
  ev = _run_eval(exp, eval_step, delta)
  writer.write_scalars(step, ev)
  final_metrics.update(ev)
  writer.close()
  checkpointer.close()

  host_delta = jax.tree.map(np.asarray, jax.device_get(delta))
  adapter_path = None
  if export and c.adapter.method != 'full':
    adapter_path = os.path.join(workdir, 'adapter.safetensors')
    if jax.process_index() == 0:
      ckpt_lib.save_adapter(adapter_path, host_delta, {**exp.meta, 'step': step})
  _log_summary(exp, final_metrics, checkpointer.directory, step, adapter_path)
  return TrainResult(step=step, metrics=final_metrics, delta=host_delta, frozen=exp.frozen,
                     checkpoint_dir=checkpointer.directory, adapter_path=adapter_path)


def _log_summary(exp: _Experiment, m: dict, ckpt_dir: str, step: int,
                 adapter_path: Optional[str]) -> None:
  trainable = sum(v for k, v in exp.counts.items() if k != 'frozen')
  total = sum(exp.counts.values())
  step_dir = os.path.join(ckpt_dir, str(step))
  delta_disk = _dir_bytes(os.path.join(step_dir, 'delta')) if os.path.isdir(step_dir) else 0
  lines = ['=== Summary ===',
           f'method {exp.config.adapter.method!r}: {trainable:,} trainable of {total:,} params '
           f'({100.0 * trainable / max(total, 1):.3f}%)']
  if 'eval/accuracy_at_start' in m:
    lines.append(f'eval accuracy before training: {m["eval/accuracy_at_start"]:.3f} '
                 f'(chance {1.0 / exp.info.num_classes:.3f})')
  lines.append(f'eval accuracy after {step} steps: {m["eval/accuracy"]:.3f} '
               f'on {int(m["eval/examples"])} held-out examples')
  frozen_bytes = _tree_bytes(exp.frozen)
  if frozen_bytes:
    ckpt = exp.config.backbone.checkpoint
    source = (f' it stays in {ckpt} ({_human_bytes(os.path.getsize(ckpt))})'
              if ckpt and os.path.isfile(ckpt) else ' it is rebuilt from the config')
    lines.append(f'delta on disk: {_human_bytes(delta_disk)} (step {step}); the frozen backbone '
                 f'({_human_bytes(frozen_bytes)} of params) is not copied into the workdir:'
                 f'{source}')
  else:
    lines.append(f'delta on disk: {_human_bytes(delta_disk)} (step {step}; every parameter trains)')
  lines.append(f'checkpoints: {ckpt_dir}')
  if adapter_path:
    lines.append(f'exported adapter: {adapter_path} '
                 f'({_human_bytes(os.path.getsize(adapter_path))})' if os.path.exists(adapter_path)
                 else f'exported adapter: {adapter_path}')
  metrics_lib.log('\n'.join(lines))


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint in workdir on config.input's eval split."""
  initialize_distributed(config)
  if config.get('pretrain') and config.pretrain.enabled:
    config = copy.deepcopy(config)
    with config.unlocked():
      config.backbone.checkpoint = os.path.join(os.path.abspath(workdir), config.pretrain.output)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {checkpointer.directory}: train first.')
  exp = _setup(config)
  opt_sh = _opt_state_shardings(exp)
  delta, _, _ = _restore_or_init(exp, checkpointer, opt_sh)
  result = _run_eval(exp, _jit_eval_step(exp), delta)
  checkpointer.close()
  metrics_lib.log(f'step {step}: eval accuracy {result["eval/accuracy"]:.4f} '
                  f'on {int(result["eval/examples"])} examples')
  return {'step': step, **result}


def export_adapter(config: ml_collections.ConfigDict, workdir: str,
                   out_path: Optional[str] = None) -> str:
  """Writes the latest checkpoint's delta + adapter spec as one .safetensors file.

  Needs no backbone weights: the delta's structure comes from tracing the model.
  """
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {checkpointer.directory}: train first.')
  exp = _setup(config, load_weights=False)
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      exp.delta, exp.delta_shardings)
  opt_like = jax.eval_shape(exp.tx.init, exp.delta)
  opt_like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          opt_like, _opt_state_shardings(exp))
  delta, _, meta = checkpointer.restore(step, like, opt_like)
  checkpointer.close()
  out_path = out_path or os.path.join(os.path.abspath(workdir), 'adapter.safetensors')
  if jax.process_index() == 0:
    ckpt_lib.save_adapter(out_path, jax.device_get(delta), meta)
  metrics_lib.log(f'Exported the adapter of step {step} to {out_path}.')
  return out_path


# ---------------------------------------------------------------------------------------------
# CLIP without training: zero-shot and Tip-Adapter.


def _clip_backbone(config: ml_collections.ConfigDict):
  """(CLIPClassifier, params with the frozen classifier, dataset info) for config."""
  if config.backbone.model != 'clip':
    raise ValueError(f"Zero-shot and Tip-Adapter evaluation need backbone.model='clip'; found "
                     f'{config.backbone.model!r}.')
  if config.backbone.checkpoint:
    pretrained_common.require_file(config.backbone.checkpoint, 'backbone.checkpoint')
  else:
    logging.warning('backbone.checkpoint is empty: evaluating a randomly initialised CLIP.')
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  info = input_pipeline.get_info(config.input)
  model = backbones.make_model(config.backbone, info.num_classes, class_names=info.class_names,
                               templates=tuple(config.clip.templates))
  params = backbones.load_params(config.backbone, model,
                                 rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
  return model, jax.device_put(params), info


def _over_table(config: ml_collections.ConfigDict, table, fn: Callable, params: Any):
  """fn(params, images) over one un-augmented pass of `table` -> (outputs (N, ...), labels (N,))."""
  from vadapt.data import iterators  # pylint: disable=g-import-not-at-top
  from vadapt.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  ds = iterators.eval_dataset(
      table, global_batch_size=config.eval_batch_size, image_size=config.backbone.image_size,
      family=preprocess_lib.get_family(_preprocess(config, 'eval')), process_index=0,
      process_count=1, crop_fraction=config.input.get('eval_crop_fraction'))
  outputs, labels = [], []
  for batch in ds.as_numpy_iterator():
    mask = np.asarray(batch['mask'], bool)
    outputs.append(np.asarray(fn(params, batch['image']))[mask])
    labels.append(np.asarray(batch['label'])[mask])
  if not labels or not sum(len(y) for y in labels):
    raise ValueError('The split yielded no examples.')
  return np.concatenate(outputs), np.concatenate(labels)


def _write_json(workdir: Optional[str], name: str, result: dict[str, Any]) -> None:
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, name), 'w') as f:
      json.dump(result, f, indent=2)


def zero_shot(config: ml_collections.ConfigDict, workdir: Optional[str] = None
              ) -> dict[str, float]:
  """CLIP zero-shot top-1 on config.input's eval split (written to workdir/zeroshot.json).

  The logits are the same module call the trainer evaluates (CLIPClassifier without adapters).
  """
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  model, params, info = _clip_backbone(config)
  _, eval_table = input_pipeline.load_tables(config.input)
  logits_fn = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  logits, labels = _over_table(config, eval_table, logits_fn, params)
  result = {'zeroshot/accuracy': float(np.mean(np.argmax(logits, -1) == labels)),
            'zeroshot/examples': int(len(labels)), 'num_classes': info.num_classes}
  metrics_lib.log(f'zero-shot top-1 accuracy {result["zeroshot/accuracy"]:.4f} on '
                  f'{len(labels)} examples of {config.input.get("eval_split")!r} '
                  f'({info.num_classes} classes, {len(config.clip.templates)} template(s))')
  _write_json(workdir, 'zeroshot.json', result)
  return result


def tip_adapter(config: ml_collections.ConfigDict, workdir: Optional[str] = None
                ) -> dict[str, float]:
  """Training-free Tip-Adapter on config.input's eval split (written to workdir/tip_adapter.json).

  The cache holds every example of the train split after input.few_shot selection. alpha and
  beta are config.clip.tip_alpha / tip_beta, or searched on config.clip.tip_search_split (a split
  of the same source, disjoint from the eval split) when that is set.
  """
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  from vadapt import zeroshot as zeroshot_lib  # pylint: disable=g-import-not-at-top
  from vadapt.adapters import tip_adapter as tip  # pylint: disable=g-import-not-at-top
  model, params, info = _clip_backbone(config)
  train_table, eval_table = input_pipeline.load_tables(config.input)
  features_fn = jax.jit(lambda p, x: model.apply({'params': p}, x, method='image_features'))
  keys, key_labels = _over_table(config, train_table, features_fn, params)
  cache = tip.build_cache(keys, key_labels, num_classes=info.num_classes)
  classifier, logit_scale = params['classifier']['value'], params['logit_scale']
  alpha, beta = float(config.clip.tip_alpha), float(config.clip.tip_beta)
  result: dict[str, Any] = {'tip/cache_size': int(len(key_labels))}
  search_split = config.clip.get('tip_search_split')
  if search_split:
    search_input = copy.deepcopy(config.input)
    with search_input.unlocked():
      search_input.eval_split = search_split
    _, search_table = input_pipeline.load_tables(search_input)
    f, y = _over_table(config, search_table, features_fn, params)
    alpha, beta, search_acc = tip.search_hyperparameters(jnp.asarray(f), y, classifier,
                                                         logit_scale, cache)
    result['tip/search_accuracy'] = search_acc
  features, labels = _over_table(config, eval_table, features_fn, params)
  features = jnp.asarray(features)
  zs = zeroshot_lib.zero_shot_logits(features, classifier, logit_scale)
  logits = tip.tip_adapter_logits(features, classifier, logit_scale, cache, alpha=alpha,
                                  beta=beta)
  result.update({'tip/accuracy': zeroshot_lib.accuracy(logits, labels),
                 'zeroshot/accuracy': zeroshot_lib.accuracy(zs, labels),
                 'tip/alpha': alpha, 'tip/beta': beta, 'tip/examples': int(len(labels))})
  metrics_lib.log(
      f'Tip-Adapter top-1 accuracy {result["tip/accuracy"]:.4f} (zero-shot '
      f'{result["zeroshot/accuracy"]:.4f}) on {len(labels)} examples; cache of '
      f'{len(key_labels)} images ({config.input.get("few_shot") or "all"} per class), alpha '
      f'{alpha:g}, beta {beta:g}' + (f' (searched on {search_split!r})' if search_split else ''))
  _write_json(workdir, 'tip_adapter.json', result)
  return result
