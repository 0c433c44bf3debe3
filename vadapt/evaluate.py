"""Evaluation: the eval step, one pass over the eval split, and `--mode=eval` on a workdir."""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vadapt import checkpoint as ckpt_lib
from vadapt import experiment
from vadapt import losses
from vadapt import metrics as metrics_lib
from vadapt import partition
from vadapt import sharding as sharding_lib
from vadapt.experiment import Experiment


def make_eval_step(model: nn.Module, num_classes: int) -> Callable:
  """step(delta, frozen, batch) -> {'correct', 'count', 'loss_sum'} summed over valid examples."""
  def eval_step(delta, frozen, batch):
    params = partition.merge(delta, frozen)
    logits = model.apply(partition.to_variables(params), batch['image'], train=False)
    mask = batch['mask'].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    loss = losses.cross_entropy(logits, batch['label'], num_classes)
    return {'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask),
            'loss_sum': jnp.sum(loss * mask)}
  return eval_step


def eval_iterator(exp: Experiment) -> Iterator[dict]:
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  c = exp.config
  return input_pipeline.make_eval_iterator(
      c.input, global_batch_size=c.eval_batch_size, image_size=c.backbone.image_size,
      preprocess=experiment.preprocess_name(c, 'eval'), process_index=jax.process_index(),
      process_count=jax.process_count())


def run_eval(exp: Experiment, eval_step: Callable, delta: Any) -> dict[str, float]:
  batch_sh = sharding_lib.batch_sharding(exp.mesh)
  totals = {'correct': 0.0, 'count': 0.0, 'loss_sum': 0.0}
  from vadapt.data import iterators  # pylint: disable=g-import-not-at-top
  batches = metrics_lib.progress_iter(
      eval_iterator(exp), desc='eval',
      total=iterators.num_eval_batches(exp.info.num_eval, exp.config.eval_batch_size))
  for batch in batches:
    out = jax.device_get(eval_step(delta, exp.frozen, sharding_lib.put_global_batch(
        {k: batch[k] for k in ('image', 'label', 'mask')}, batch_sh)))
    for k in totals:
      totals[k] += float(out[k])
  if not totals['count']:
    raise ValueError(f'The eval split {exp.config.input.get("eval_split")!r} yielded no examples.')
  return {'eval/accuracy': totals['correct'] / totals['count'],
          'eval/loss': totals['loss_sum'] / totals['count'],
          'eval/examples': totals['count']}


def jit_eval_step(exp: Experiment) -> Callable:
  return jax.jit(make_eval_step(exp.model, exp.info.num_classes),
                 in_shardings=(exp.delta_shardings, exp.frozen_shardings,
                               sharding_lib.batch_sharding(exp.mesh)),
                 compiler_options=experiment.compiler_options(exp.config))


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint in workdir on config.input's eval split."""
  experiment.initialize_distributed(config)
  if config.get('pretrain') and config.pretrain.enabled:
    config = copy.deepcopy(config)
    with config.unlocked():
      config.backbone.checkpoint = os.path.join(os.path.abspath(workdir), config.pretrain.output)
  checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.max_to_keep)
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(f'No checkpoint in {checkpointer.directory}: train first.')
  exp = experiment.setup(config)
  opt_sh = experiment.opt_state_shardings(exp)
  delta, _, step = experiment.restore_or_init(exp, checkpointer, opt_sh, purpose='eval')
  result = run_eval(exp, jit_eval_step(exp), delta)
  checkpointer.close()
  metrics_lib.log(f'step {step}: eval accuracy {result["eval/accuracy"]:.4f} '
                  f'on {int(result["eval/examples"])} examples')
  return {'step': step, **result}
