"""The training loop: `train_and_evaluate(config, workdir)` (resumes from workdir/checkpoints).

Other modes live in their own modules: vadapt.evaluate (eval), vadapt.export (export),
vadapt.clip_modes (zero-shot, Tip-Adapter), vadapt.retrieval; the model, labels and optimizer
come from vadapt.experiment.

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
With config.cache_features (vadapt.feature_cache) a linear probe or CLIP-Adapter runs the frozen
backbone once per train example and the same step trains the head on those features; adapters on
the top blocks only train on the cached input of the lowest adapted block.

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
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from vadapt import checkpoint as ckpt_lib
from vadapt import evaluate as evaluate_lib
from vadapt import experiment
from vadapt import feature_cache
from vadapt import host_memory
from vadapt import inject
from vadapt import losses
from vadapt import metrics as metrics_lib
from vadapt import partition
from vadapt import sharding as sharding_lib
from vadapt.experiment import Experiment

# vadapt.input_pipeline is imported where data is read: it loads TensorFlow (about 0.5 GiB), which
# the step itself (and benchmarks/train_step.py, which measures its memory) does not need.


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
# Steps.


def apply_method(model: nn.Module, params: Any, method: str, *args, **kwargs):
  """model.<method>(*args, **kwargs) with `params`, through the adapters of an Adapted model."""
  if isinstance(model, inject.Adapted):
    return model.apply({'params': params}, method, *args, method='call_method', **kwargs)
  return model.apply({'params': params}, *args, method=method, **kwargs)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_classes: int, label_smoothing: float,
                    seed: int, nan_at_step: int = -1, loss: str = 'ce',
                    update_batch_stats: bool = False) -> Callable:
  """step(delta, opt_state, frozen, batch, step) -> (delta, opt_state, metrics).

  `step` counts completed steps; dropout keys are fold_in(seed, step), so a resumed run draws the
  same masks as an uninterrupted one. loss='contrastive' (CLIP) is the symmetric InfoNCE of the
  batch's images against their classes' prompts; its accuracy counts images whose best-matching
  prompt is of their own class.

  BatchNorm statistics ride in the params as 'batch_stats' (vadapt.partition.to_variables). With
  update_batch_stats they are in the delta and replaced by the running averages the forward pass
  computes (after the optimizer, which leaves them alone); otherwise they are frozen.
  """
  loss_kind = loss
  # A scheduled AdapterDrop rate is a function of the step, like the dropout keys.
  scheduled = getattr(model, 'drop_schedule', 'constant') != 'constant'

  def train_step(delta, opt_state, frozen, batch, step):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    extra = {'adapter_step': step} if scheduled else {}

    def loss_fn(delta):
      params = partition.merge(delta, frozen)
      new_stats = None
      if loss_kind == 'contrastive':
        from vadapt.models import clip_classifier  # pylint: disable=g-import-not-at-top
        pair_logits = apply_method(model, params, 'contrastive_logits', batch['image'],
                                   batch['label'], train=True, rngs={'dropout': rng}, **extra)
        # As class scores: the class of the prompt each image matches best.
        logits = jax.nn.one_hot(batch['label'], num_classes)[jnp.argmax(pair_logits, -1)]
        loss = clip_classifier.contrastive_loss(pair_logits)
      else:
        variables = partition.to_variables(params)
        if update_batch_stats:
          logits, state = model.apply(variables, batch['image'], train=True,
                                      rngs={'dropout': rng}, mutable=['batch_stats'], **extra)
          new_stats = state['batch_stats']
        else:
          logits = model.apply(variables, batch['image'], train=True, rngs={'dropout': rng},
                               **extra)
        loss = jnp.mean(losses.cross_entropy(logits, batch['label'], num_classes, label_smoothing))
      if nan_at_step >= 0:  # Test hook: the (1-based) step nan_at_step diverges.
        loss = jnp.where(step + 1 == nan_at_step, jnp.nan, loss)
      return loss, (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(delta)
    updates, opt_state = tx.update(grads, opt_state, delta)
    delta = optax.apply_updates(delta, updates)
    if update_batch_stats:
      delta = {**delta, 'batch_stats': new_stats}
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


# ---------------------------------------------------------------------------------------------
# Entry points.


def tree_bytes(tree: Any) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def human_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024
  return f'{n:.1f} GiB'


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
    c.checkpoint.restart = False  # The flag is meant for the adapter stage.
    c.adapter.method = 'full'
    if 'cache_features' in c:
      c.cache_features = False  # Meant for the adapter stage; full training trains the backbone.
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
                  f'as a vit_jax-format checkpoint: {out} ({human_bytes(os.path.getsize(out))}).')
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
  experiment.initialize_distributed(config)
  workdir = os.path.abspath(workdir)
  if config.get('cache_features'):
    feature_cache.check_config(config)  # Before any weights or data are read.
  if config.get('pretrain') and config.pretrain.enabled:
    npz = pretrain_backbone(config, workdir)
    config = copy.deepcopy(config)
    with config.unlocked():
      config.backbone.checkpoint = npz
    metrics_lib.log(f'=== Stage 2: loading {npz} as the pre-trained backbone, freezing it and '
                    f'adapting it to a new task: classes {tuple(config.input.get("classes") or ())}'
                    f' with method {config.adapter.method!r} ===')

  return train_experiment(experiment.setup(config), workdir, export=export)


def train_experiment(exp: Experiment, workdir: str, *, export: bool = True) -> TrainResult:
  """The training loop of train_and_evaluate on an experiment already set up (vadapt.experiment,
  or vadapt.multi_task for one task of a multi-adapter model)."""
  workdir = os.path.abspath(workdir)
  c = exp.config
  experiment.check_batch_size(c, exp.info)
  if c.get('cache_features'):
    feature_cache.check(exp)  # Before the workdir is touched.
  trainable = sum(v for k, v in exp.counts.items() if k != 'frozen')
  total = sum(exp.counts.values())
  metrics_lib.log(exp.param_table)
  metrics_lib.log(f'Trainable parameters: {trainable:,} of {total:,} '
                  f'({100.0 * trainable / max(total, 1):.3f}%), method {c.adapter.method!r}, '
                  f'mesh {dict(exp.mesh.shape)}, {jax.process_count()} process(es).')

  opt_sh = experiment.opt_state_shardings(exp)
  if c.get('checkpoint') and c.checkpoint.restart and jax.process_index() == 0:
    moved = ckpt_lib.move_run_aside(workdir)
    if moved:
      metrics_lib.log(f'Starting over, as checkpoint.restart=True asks: the previous run\'s '
                      f'checkpoints, metrics and adapter were moved to {moved}.')
  if c.get('checkpoint') and c.checkpoint.restart and jax.process_count() > 1:
    multihost_utils.sync_global_devices('vadapt_restart_moved')
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=c.max_to_keep)
  delta, opt_state, start_step = experiment.restore_or_init(exp, checkpointer, opt_sh)
  # config.cache_features: the frozen prefix runs once here; the step trains the head on its output.
  to_train = start_step < c.total_steps
  cache = feature_cache.build(exp, delta) if c.get('cache_features') and to_train else None
  if not c.get('cache_features') and to_train and feature_cache.applies(c):
    metrics_lib.log('Note: --config.cache_features=True would run the frozen backbone once per '
                    'train example instead of in every step (same head, same order).')
  writer = metrics_lib.MetricWriter(workdir)
  repl = sharding_lib.replicated(exp.mesh)
  batch_sh = sharding_lib.batch_sharding(exp.mesh)

  train_step = jax.jit(
      make_train_step(cache.model if cache else exp.model, exp.tx, exp.schedule,
                      num_classes=exp.info.num_classes, label_smoothing=c.label_smoothing,
                      seed=c.seed, nan_at_step=c.debug.nan_at_step, loss=experiment.loss_name(c),
                      update_batch_stats=experiment.train_batch_norm(c)),
      in_shardings=(exp.delta_shardings, opt_sh, exp.frozen_shardings, batch_sh, repl),
      out_shardings=(exp.delta_shardings, opt_sh, repl),
      donate_argnums=(0, 1), compiler_options=experiment.compiler_options(c))
  eval_step = evaluate_lib.jit_eval_step(exp)
  final_metrics: dict[str, float] = {}

  if start_step == 0 and c.eval_at_start:
    before = evaluate_lib.run_eval(exp, eval_step, delta)
    final_metrics['eval/accuracy_at_start'] = before['eval/accuracy']
    writer.write_scalars(0, before)
    metrics_lib.log(f'Before training: eval accuracy {before["eval/accuracy"]:.3f} '
                    f'(chance {1.0 / exp.info.num_classes:.3f}) on {int(before["eval/examples"])} '
                    'held-out examples.')

  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  if cache:  # The same rows in the same order, as features.
    host_iter = cache.batches(c, start_step=start_step, process_index=jax.process_index(),
                              process_count=jax.process_count())
    final_metrics['train/feature_cache_seconds'] = cache.seconds
  else:
    host_iter = input_pipeline.make_train_iterator(
        c.input, global_batch_size=c.batch_size, image_size=c.backbone.image_size,
        preprocess=experiment.preprocess_name(c, 'train'), seed=c.seed, start_step=start_step,
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
      if step == start_step + 1:
        # Compiled ahead of the first step, so the compiler's freed memory goes back to the OS
        # before the step's buffers are allocated (vadapt.host_memory): a lower peak RSS on CPU.
        train_step = train_step.lower(delta, opt_state, exp.frozen, batch, step - 1).compile()
        host_memory.release()
      delta, opt_state, m = train_step(delta, opt_state, exp.frozen, batch, step - 1)
      if step == start_step + 1:  # Compilation: timed apart, so no interval's rate includes it.
        jax.block_until_ready(m)
        metrics_lib.log(f'Compiled the train step and ran step {step} in '
                        f'{progress.compiled(step):.1f}s.')
      progress.update(step)
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
        rate = {'train/img_per_sec': timing['img_per_sec']} if timing else {}
        writer.write_scalars(step, {**{f'train/{k}': v for k, v in avg.items()}, **rate})
        metrics_lib.log(progress.line(step, avg, timing))
        final_metrics.update({f'train/{k}': v for k, v in avg.items()})
      if (c.checkpoint_every and step % c.checkpoint_every == 0) or is_last:
        checkpointer.save(step, delta, opt_state, {**exp.meta, 'step': step})
      if c.eval_every and step % c.eval_every == 0 and not is_last:
        ev = evaluate_lib.run_eval(exp, eval_step, delta)
        writer.write_scalars(step, ev)
        metrics_lib.log(f'step {step}: eval accuracy {ev["eval/accuracy"]:.4f}')
    # The whole run's training time and rate, compilation excluded (what a study tabulates).
    final_metrics.update({f'train/run_{k}': v for k, v in progress.totals(c.total_steps).items()})
  finally:
    progress.close()
    checkpointer.wait()
    writer.flush()

  step = max(last_good, start_step)
  ev = evaluate_lib.run_eval(exp, eval_step, delta)
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


def _log_summary(exp: Experiment, m: dict, ckpt_dir: str, step: int,
                 adapter_path: Optional[str]) -> None:
  trainable = sum(v for k, v in exp.counts.items() if k != 'frozen')
  total = sum(exp.counts.values())
  step_dir = os.path.join(ckpt_dir, str(step))
  delta_disk = dir_bytes(os.path.join(step_dir, 'delta')) if os.path.isdir(step_dir) else 0
  lines = ['=== Summary ===',
           f'method {exp.config.adapter.method!r}: {trainable:,} trainable of {total:,} params '
           f'({100.0 * trainable / max(total, 1):.3f}%)']
  if 'eval/accuracy_at_start' in m:
    lines.append(f'eval accuracy before training: {m["eval/accuracy_at_start"]:.3f} '
                 f'(chance {1.0 / exp.info.num_classes:.3f})')
  lines.append(f'eval accuracy after {step} steps: {m["eval/accuracy"]:.3f} '
               f'on {int(m["eval/examples"])} held-out examples')
  frozen_bytes = tree_bytes(exp.frozen)
  if frozen_bytes:
    ckpt = exp.config.backbone.checkpoint
    if ckpt and os.path.exists(ckpt):  # A file, or a directory (Hugging Face CLIP).
      size = os.path.getsize(ckpt) if os.path.isfile(ckpt) else dir_bytes(ckpt)
      source = f' it stays in {ckpt} ({human_bytes(size)})'
    else:
      source = (' no backbone.checkpoint was given, so it is a random initialisation '
                f'(seed {exp.config.seed})')
    lines.append(f'delta on disk: {human_bytes(delta_disk)} (step {step}); the frozen backbone '
                 f'({human_bytes(frozen_bytes)} of params) is not copied into the workdir:'
                 f'{source}')
  else:
    lines.append(f'delta on disk: {human_bytes(delta_disk)} (step {step}; every parameter trains)')
  lines.append(f'checkpoints: {ckpt_dir}')
  if adapter_path:
    lines.append(f'exported adapter: {adapter_path} '
                 f'({human_bytes(os.path.getsize(adapter_path))})' if os.path.exists(adapter_path)
                 else f'exported adapter: {adapter_path}')
  metrics_lib.log('\n'.join(lines))
