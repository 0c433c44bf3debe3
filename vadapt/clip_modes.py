"""CLIP evaluated without a training loop: zero-shot classification and the training-free
Tip-Adapter, on the base CLIP or, when the workdir holds a checkpoint, with its trained adapters.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vadapt import backbones
from vadapt import checkpoint as ckpt_lib
from vadapt import experiment
from vadapt import files
from vadapt import metrics as metrics_lib
from vadapt import partition
from vadapt.pretrained import common as pretrained_common


def latest_checkpoint_step(workdir: Optional[str]) -> Optional[int]:
  """The newest checkpoint step in workdir/checkpoints, or None (creates nothing)."""
  if not workdir or not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return None
  checkpointer = ckpt_lib.Checkpointer(workdir)
  step = checkpointer.latest_step()
  checkpointer.close()
  return step


def trained_model(config: ml_collections.ConfigDict, workdir: Optional[str]):
  """(model, params, dataset info, what is evaluated) for CLIP modes.

  With a checkpoint in the workdir: the config's adapted model with the latest trained delta.
  Otherwise the base CLIP, and the description says so (it is printed with every result).
  """
  step = latest_checkpoint_step(workdir)
  if step is None:
    model, params, info = _clip_backbone(config)
    where = f'no checkpoint in {os.path.abspath(workdir)}' if workdir else 'no workdir'
    return model, params, info, f'the base CLIP, without adapters ({where})'
  exp = experiment.setup(config)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  delta, _, step = experiment.restore_or_init(exp, checkpointer,
                                              experiment.opt_state_shardings(exp), purpose='eval')
  checkpointer.close()
  params = partition.merge(delta, exp.frozen)
  return (exp.model, params, exp.info,
          f'CLIP with the trained {config.adapter.method!r} adapters of step {step} in '
          f'{os.path.abspath(workdir)}')


def model_fn(model, method: str) -> Callable:
  """jit(params, x) -> model.<method>(x), through the adapters of an adapted model."""
  return jax.jit(lambda p, x: train_apply(model, p, method, x, train=False))

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
  family = preprocess_lib.get_family(experiment.preprocess_name(config, 'eval'))
  ds = iterators.eval_dataset(
      table, global_batch_size=config.eval_batch_size, image_size=config.backbone.image_size,
      family=family, process_index=0, process_count=1,
      crop_fraction=config.input.get('eval_crop_fraction'))
  outputs, labels = [], []
  total = iterators.num_eval_batches(len(table), config.eval_batch_size)
  for batch in metrics_lib.progress_iter(ds.as_numpy_iterator(), total=total, desc='features'):
    mask = np.asarray(batch['mask'], bool)
    outputs.append(np.asarray(fn(params, batch['image']))[mask])
    labels.append(np.asarray(batch['label'])[mask])
  if not labels or not sum(len(y) for y in labels):
    raise ValueError('The split yielded no examples.')
  return np.concatenate(outputs), np.concatenate(labels)


def train_apply(model, params, method: str, *args, **kwargs):
  """model.<method>(*args, **kwargs) with params, through the adapters of an adapted model."""
  from vadapt import train  # pylint: disable=g-import-not-at-top
  return train.apply_method(model, params, method, *args, **kwargs)


def write_json(workdir: Optional[str], name: str, result: dict[str, Any]) -> None:
  if workdir and jax.process_index() == 0:
    files.write_json(os.path.join(workdir, name), result, indent=2)


def zero_shot(config: ml_collections.ConfigDict, workdir: Optional[str] = None
              ) -> dict[str, float]:
  """CLIP zero-shot top-1 on config.input's eval split (written to workdir/zeroshot.json).

  The logits are the same module call the trainer evaluates (CLIPClassifier without adapters).
  """
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  model, params, info, evaluated = trained_model(config, workdir)
  _, eval_table = input_pipeline.load_tables(config.input)
  logits, labels = _over_table(config, eval_table, model_fn(model, '__call__'), params)
  result = {'zeroshot/accuracy': float(np.mean(np.argmax(logits, -1) == labels)),
            'zeroshot/examples': int(len(labels)), 'num_classes': info.num_classes}
  metrics_lib.log(f'zero-shot top-1 accuracy {result["zeroshot/accuracy"]:.4f} on '
                  f'{len(labels)} examples of {config.input.get("eval_split")!r} '
                  f'({info.num_classes} classes, {len(config.clip.templates)} template(s)) with '
                  f'{evaluated}')
  write_json(workdir, 'zeroshot.json', result)
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
  model, params, info, evaluated = trained_model(config, workdir)
  train_table, eval_table = input_pipeline.load_tables(config.input)
  features_fn = model_fn(model, 'image_features')
  keys, key_labels = _over_table(config, train_table, features_fn, params)
  cache = tip.build_cache(keys, key_labels, num_classes=info.num_classes)
  # The classifier as the model computes it (from an adapted text tower, if it has adapters).
  classifier = jax.jit(lambda p: train_apply(model, p, 'classifier'))(params)
  logit_scale = params['logit_scale']
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
      f'{alpha:g}, beta {beta:g}' + (f' (searched on {search_split!r})' if search_split else '')
      + f'; with {evaluated}')
  write_json(workdir, 'tip_adapter.json', result)
  return result
