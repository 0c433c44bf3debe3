"""Frozen features computed once: a head trained on cached backbone outputs (config.cache_features).

A linear probe (adapter.method='linear') trains only the head, on features that the frozen
backbone maps each training image to. Without augmentation an image's pixels, and so its
features, are a function of its row in the train table alone; the cache runs the backbone once
per row and every training step after that costs only the head:

  features = backbone(row)          once per train example, in batches of config.batch_size
  logits   = head(features[rows])   every step, rows = the train pipeline's rows for that step

The rows are those of the image pipeline (vadapt.data.iterators.train_indices: the same
per-epoch permutation of the same seed), so the head sees the same examples in the same order and
a resumed run is bit-identical to an uninterrupted one. The boundary between the frozen prefix and
what trains is the input of the top-level `head` module (ViT, DINOv2, ResNet, EfficientNet-Lite),
or CLIP's image embedding for adapter.method='clip_adapter' (the adapter and the frozen zero-shot
classifier run on cached embeddings).

It refuses, in one line before any work, where the features would not be those an uncached step
computes: trainable parameters below the boundary, train-time augmentation (input.crop_scale,
input.flip), dropout in the backbone, BatchNorm statistics that train, a contrastive loss. The
cache is num_train x width floats on the host; above config.cache_features_max_mib it refuses.

The features are computed by another XLA program than the uncached train step's, so the last bits
of a feature may differ from those the fused step computes; tests/test_feature_cache.py states the
tolerance against an uncached run.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vadapt import experiment
from vadapt import metrics as metrics_lib
from vadapt import partition
from vadapt import sharding as sharding_lib
from vadapt.experiment import Experiment
from vadapt.pretrained import common as pretrained_common

# Methods whose every trainable parameter sits above the frozen features.
METHODS = ('linear', 'clip_adapter')
DEFAULT_MAX_MIB = 2048


class FeatureCacheError(ValueError):
  """config.cache_features is set where cached features would not be what the step computes."""


def _refuse(expected: str, found: str) -> FeatureCacheError:
  return FeatureCacheError(f'cache_features=True needs {expected}; found {found}. Set '
                           '--config.cache_features=False to train without the cache.')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses (FeatureCacheError) a config whose features the cache cannot hold; reads nothing."""
  method = config.adapter.method
  if method not in METHODS:
    raise _refuse(f'a method that trains nothing inside the backbone ({", ".join(METHODS)})',
                  f'adapter.method={method!r}')
  if config.get('loss', 'ce') != 'ce':
    raise _refuse("loss='ce'", f'loss={config.loss!r} (it reads the batch\'s images as pairs)')
  if config.backbone.get('train_batch_norm'):
    raise _refuse('frozen BatchNorm statistics', 'backbone.train_batch_norm=True')
  crop = config.input.get('crop_scale')
  if crop:
    raise _refuse('no train-time augmentation (input.crop_scale=None)',
                  f'input.crop_scale={tuple(crop)} (random resized crops)')
  flip = config.input.get('flip')
  if flip is None:
    flip = config.input.get('source') != 'digits'  # The pipeline's default (vadapt.input_pipeline).
  if flip:
    raise _refuse('no train-time augmentation (input.flip=False)',
                  f'input.flip={config.input.get("flip")!r} (random horizontal flips'
                  f'{", the default for this source" if config.input.get("flip") is None else ""})')
  rates = {'backbone.dropout_rate': config.backbone.get('dropout_rate', 0.0)}
  overrides = config.backbone.get('overrides')
  if overrides is not None and 'attention_dropout_rate' in overrides:
    rates['backbone.overrides.attention_dropout_rate'] = overrides.attention_dropout_rate
  active = {k: v for k, v in rates.items() if v}
  if active:
    raise _refuse('no dropout in the backbone',
                  ', '.join(f'{k}={v}' for k, v in active.items()))


def applies(config: ml_collections.ConfigDict) -> bool:
  """Whether check_config lets config.cache_features on (the trainer says so when it is off)."""
  try:
    check_config(config)
  except FeatureCacheError:
    return False
  return True


# ---------------------------------------------------------------------------------------------
# The boundary: what runs once (features) and what runs every step (the head).


class HeadOnFeatures(nn.Module):
  """The model's own `head` module on cached features: params {'head': ...} as in the model.

  Attributes:
    head: an unbound copy of the model's head (same class, width, dtypes).
  """
  head: nn.Module

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # The head has no dropout; the backbone's was refused.
    return self.head(features)


class CLIPOnFeatures(nn.Module):
  """A CLIPClassifier whose image tower is replaced by cached image embeddings.

  Called with embeddings (B, E) in place of images; everything after the tower (CLIP-Adapter,
  frozen classifier, logit scale) is the model's own code at the model's own param paths.

  Attributes:
    model: the CLIPClassifier.
  """
  model: nn.Module

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, features: jax.Array, *, train: bool = False) -> jax.Array:
    def cached(next_fun, args, kwargs, context):
      if context.module is self.model and context.method_name == 'image_features':
        return args[0]
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(cached):
      return self.model(features, train=train)


def _is_clip(model: nn.Module) -> bool:
  return hasattr(model, 'image_features') and hasattr(model, 'class_tokens')


def _head_input(model: nn.Module, variables: Any, images: jax.Array, rng: jax.Array):
  """(input of the top-level `head` module, an unbound copy of that module) on `images`."""
  found = []

  def grab(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and tuple(context.module.path) == ('head',) and not found:
      found.append((args[0], context.module.clone(parent=None)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    model.apply(variables, images, train=True, rngs={'dropout': rng})
  if not found:
    raise FeatureCacheError(f'cache_features=True needs a model with a top-level `head` module; '
                            f'found none in {type(model).__name__}.')
  return found[0]


def _trainable_prefix(model: nn.Module) -> str:
  return 'adapter/' if _is_clip(model) else 'head/'


def check(exp: Experiment) -> tuple[str, nn.Module]:
  """check_config, every trainable param above the boundary (read from the delta) and the size.

  Returns:
    (a description of the cache's size, the head model); nothing is computed (abstract traces).
  """
  check_config(exp.config)
  prefix = _trainable_prefix(exp.model)
  inside = sorted(k for k in pretrained_common.flatten(exp.delta) if not k.startswith(prefix))
  if inside:
    raise _refuse(f'every trainable param under {prefix!r} (above the frozen features)',
                  f'{len(inside)} inside the backbone, e.g. {inside[0]!r}')
  shape, dtype, head_model = _width_and_model(exp)
  n = exp.info.num_train
  nbytes = n * int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  limit = exp.config.get('cache_features_max_mib', DEFAULT_MAX_MIB)
  size = (f'{n:,} train examples x {int(np.prod(shape)):,} {jnp.dtype(dtype).name} = '
          f'{nbytes / 2 ** 20:,.1f} MiB')
  if nbytes > limit * 2 ** 20:
    raise FeatureCacheError(
        f'cache_features=True: the features ({size}) exceed cache_features_max_mib={limit}; '
        'raise the limit or set cache_features=False.')
  return f'{size} on the host (limit {limit:,} MiB)', head_model


@dataclasses.dataclass
class FeatureCache:
  """Features of every train row and the head that trains on them.

  Attributes:
    model: features (B, D) -> logits (B, C), with the experiment's param paths (for the train step).
    features: (num_train, D) host array, row i = the frozen prefix on train row i.
    labels: (num_train,) int32.
    seconds: wall time of computing the features (compilation included).
  """
  model: nn.Module
  features: np.ndarray
  labels: np.ndarray
  seconds: float

  def batches(self, config: ml_collections.ConfigDict, *, start_step: int, process_index: int,
              process_count: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every batch from `start_step` on: {'image': features, 'label'}."""
    from vadapt.data import iterators  # pylint: disable=g-import-not-at-top
    rows = iterators.train_indices(len(self.labels), global_batch_size=config.batch_size,
                                   seed=config.seed, start_step=start_step,
                                   process_index=process_index, process_count=process_count)
    for r in rows.as_numpy_iterator():
      yield {'image': self.features[r], 'label': self.labels[r]}


def _width_and_model(exp: Experiment):
  """(feature shape (D,), dtype, head model) from an abstract trace: nothing is computed."""
  images = jax.ShapeDtypeStruct((1, exp.config.backbone.image_size,
                                 exp.config.backbone.image_size, 3), jnp.float32)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        partition.merge(exp.delta, exp.frozen))
  rng = jax.random.PRNGKey(0)
  if _is_clip(exp.model):
    out = jax.eval_shape(lambda p, x: exp.model.apply({'params': p}, x, train=True,
                                                      method='image_features'), params, images)
    return out.shape[1:], out.dtype, CLIPOnFeatures(model=exp.model)
  holder = []

  def trace(p, x):
    feats, head = _head_input(exp.model, partition.to_variables(p), x, rng)
    holder.append(head)
    return feats
  out = jax.eval_shape(trace, params, images)
  return out.shape[1:], out.dtype, HeadOnFeatures(head=holder[0])


def build(exp: Experiment, delta: Any) -> FeatureCache:
  """Checks, then runs the frozen prefix once over the train split (batches of batch_size).

  `delta` is the trainable tree as the run starts (only the frozen prefix is read from it).
  """
  size, head_model = check(exp)
  metrics_lib.log(f'Caching the frozen features: {size}; the backbone runs once per train '
                  'example.')
  start = time.perf_counter()
  features, labels = _compute(exp, delta)
  seconds = time.perf_counter() - start
  n = len(labels)
  metrics_lib.log(f'Computed the features of {n:,} examples in {seconds:.1f}s '
                  f'({n / max(seconds, 1e-9):.1f} img/s, compilation included).')
  return FeatureCache(model=head_model, features=features, labels=labels, seconds=seconds)


def _compute(exp: Experiment, delta: Any) -> tuple[np.ndarray, np.ndarray]:
  """Features of train rows 0..n-1: global batches of batch_size, each process its own slots."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  from vadapt.data import iterators  # pylint: disable=g-import-not-at-top
  from vadapt.data import preprocess  # pylint: disable=g-import-not-at-top
  c = exp.config
  table, _ = input_pipeline.load_tables(c.input)
  n = len(table)
  family = preprocess.get_family(experiment.preprocess_name(c, 'train'))
  pid, count = jax.process_index(), jax.process_count()
  local = iterators.local_batch_size(c.batch_size, count)
  num_batches = -(-n // c.batch_size)
  lookup = iterators.make_lookup(table)
  size = c.backbone.image_size

  def element(counter):
    step, slot = counter // local, counter % local
    g = step * c.batch_size + pid * local + slot
    image, _ = lookup(tf.minimum(g, n - 1))  # The padded tail repeats the last row.
    # No crop, no flip (check_config): the train preprocessing, whose seed then does nothing.
    return preprocess.train_preprocess(image, tf.constant([0, 0], tf.int64), size, family,
                                       crop_scale=None, flip=False)

  ds = tf.data.Dataset.range(num_batches * local).map(
      element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  repl = sharding_lib.replicated(exp.mesh)
  batch_sh = sharding_lib.batch_sharding(exp.mesh)
  rng = jax.random.PRNGKey(c.seed)
  if _is_clip(exp.model):
    def forward(delta, frozen, images):
      return exp.model.apply({'params': partition.merge(delta, frozen)}, images, train=True,
                             method='image_features')
  else:
    def forward(delta, frozen, images):
      variables = partition.to_variables(partition.merge(delta, frozen))
      return _head_input(exp.model, variables, images, rng)[0]
  forward = jax.jit(forward, in_shardings=(exp.delta_shardings, exp.frozen_shardings, batch_sh),
                    out_shardings=repl)
  batches = input_pipeline.prefetch_to_device(ds.as_numpy_iterator(), max(c.prefetch, 1),
                                              batch_sh)
  out, pending = [], None
  for images in batches:  # One batch in flight while the previous one is copied to the host.
    running = forward(delta, exp.frozen, images)
    if pending is not None:
      out.append(np.asarray(jax.device_get(pending)))
    pending = running
  out.append(np.asarray(jax.device_get(pending)))
  return np.concatenate(out)[:n], np.asarray(table.labels, np.int32)
