"""Frozen features computed once: what trains runs on cached outputs of the frozen layers below it.

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

Adapters on the top blocks only (adapter.layers=(8, 9, 10, 11) on a 12-block ViT or DINOv2, any
method that honours adapter.layers) cache the token sequence that enters the lowest block with a
trainable parameter: every step runs that block and the ones above it, adapters and head included,
on the cached tokens, and the patch embedding and the frozen blocks below never run again. The
backward pass stops at that block whether or not the cache is on (JAX differentiates the trainable
tree only); the cache removes the frozen blocks' forward pass as well.

It refuses, in one line before any work, where the features would not be those an uncached step
computes: trainable parameters below the boundary (full fine-tuning, BitFit, VPT-shallow, adapters
on every block), train-time augmentation (input.crop_scale, input.flip), dropout in the backbone,
BatchNorm statistics that train, a contrastive loss, blocks under nn.scan. The cache is num_train
x (boundary's shape) floats on the host; above config.cache_features_max_mib it refuses.

The features are computed by another XLA program than the uncached train step's, so the last bits
of a feature may differ from those the fused step computes; tests/test_feature_cache.py states the
tolerance against an uncached run.
"""

from __future__ import annotations

import dataclasses
import re
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
# Methods that train something at or below the first block whatever adapter.layers says.
WHOLE_BACKBONE = ('full', 'bitfit', 'vpt_shallow')
DEFAULT_MAX_MIB = 2048
# A trainable param inside encoder block i (vadapt.models.vit naming; also DINOv2's blocks).
_BLOCK_PARAM = re.compile(r'(?P<block>(?P<scope>(?:.+/)?Transformer)/encoderblock_(?P<index>\d+))/')


class FeatureCacheError(ValueError):
  """config.cache_features is set where cached features would not be what the step computes."""


def _refuse(expected: str, found: str) -> FeatureCacheError:
  return FeatureCacheError(f'cache_features=True needs {expected}; found {found}. Set '
                           '--config.cache_features=False to train without the cache.')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses (FeatureCacheError) a config whose features the cache cannot hold; reads nothing."""
  method = config.adapter.method
  if method not in METHODS:
    frozen_below = ('a method that leaves the lowest blocks frozen (linear, clip_adapter, or a '
                    'block method with adapter.layers above block 0)')
    if method in WHOLE_BACKBONE:
      raise _refuse(frozen_below, f'adapter.method={method!r} (it trains the first block or '
                    'below)')
    layers = config.adapter.get('layers')
    if not layers or min(layers) == 0:
      raise _refuse(f'{frozen_below}; adapter.layers naming the top blocks only',
                    f'adapter.method={method!r} with adapter.layers={layers!r} '
                    f'({"every block" if not layers else "block 0 trains"})')
    if config.backbone.get('scan'):
      raise _refuse('blocks as separate modules for adapters on the top blocks (backbone.scan='
                    'False)', 'backbone.scan=True')
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


class BlockInputOnFeatures(nn.Module):
  """The model from one encoder block up, on cached inputs of that block.

  Called with the block's inputs (B, T, D) in place of images. The layers below the block run on
  a zero image whose result nothing reads, so XLA removes them from the program; the block and
  everything above it (adapters, final norm, head) are the model's own code at the model's own
  param paths.

  Attributes:
    model: the (adapted) model.
    boundary: the block's module path, e.g. ('Transformer', 'encoderblock_8').
    image_shape: (height, width, channels) of the model's images.
  """
  model: nn.Module
  boundary: tuple[str, ...]
  image_shape: tuple[int, ...]

  @property
  def drop_schedule(self) -> str:  # The trainer passes adapter_step when the model has one.
    return getattr(self.model, 'drop_schedule', 'constant')

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, features: jax.Array, *, train: bool = False, **kwargs) -> jax.Array:
    def cached(next_fun, args, kw, context):
      if context.method_name == '__call__' and _path(context.module) == self.boundary:
        return next_fun(features, *args[1:], **kw)
      return next_fun(*args, **kw)
    images = jnp.zeros((features.shape[0], *self.image_shape), jnp.float32)
    with nn.intercept_methods(cached):  # Outermost: adapters at the block see the cached input.
      return self.model(images, train=train, **kwargs)


def _path(module: nn.Module) -> tuple[str, ...]:
  return tuple(str(p) for p in module.path)


def _is_clip(model: nn.Module) -> bool:
  return hasattr(model, 'image_features') and hasattr(model, 'class_tokens')


def module_input(model: nn.Module, variables: Any, images: jax.Array, rng: jax.Array,
                 path: tuple[str, ...] = ('head',)):
  """(input of the module at `path`, an unbound copy of that module) on `images`.

  What the cache holds per example: path ('head',) for a probe, ('Transformer', 'encoderblock_8')
  for adapters from block 8 up. A training-mode call (the cache refuses dropout, so it is the
  inference computation); jit it, or eval_shape it for the shape alone.
  """
  found = []

  def grab(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and _path(context.module) == path and not found:
      found.append((args[0], context.module.clone(parent=None)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    model.apply(variables, images, train=True, rngs={'dropout': rng})
  if not found:
    raise FeatureCacheError(f'cache_features=True needs a model with a {"/".join(path)!r} module; '
                            f'found none in {type(model).__name__}.')
  return found[0]


def _trainable_prefix(model: nn.Module) -> str:
  return 'adapter/' if _is_clip(model) else 'head/'


def boundary(exp: Experiment) -> tuple[str, ...]:
  """The module path whose input is cached: ('head',), or the lowest encoder block that trains.

  Read from the delta (every trainable param must lie above the boundary); () for CLIP's image
  embedding. Raises FeatureCacheError where no frozen prefix exists.
  """
  prefix = _trainable_prefix(exp.model)
  inside = sorted(k for k in pretrained_common.flatten(exp.delta) if not k.startswith(prefix))
  if not inside:
    return () if _is_clip(exp.model) else ('head',)
  if _is_clip(exp.model) or exp.config.adapter.method in METHODS:
    raise _refuse(f'every trainable param under {prefix!r} (above the frozen features)',
                  f'{len(inside)} inside the backbone, e.g. {inside[0]!r}')
  blocks = {}
  for key in inside:
    m = _BLOCK_PARAM.match(key)
    if m:
      blocks.setdefault(int(m['index']), (m['scope'], m['block'], key))
  below = [k for k in inside if not _BLOCK_PARAM.match(k) and not re.match(
      r'(?:.+/)?Transformer/encoder_norm/', k)]
  if below or not blocks:
    raise _refuse('every trainable param in an encoder block, the final norm or the head',
                  f'{len(below)} elsewhere, e.g. {(below or inside)[0]!r}')
  scopes = {scope for scope, _, _ in blocks.values()}
  if len(scopes) > 1:
    raise _refuse('one encoder with trainable blocks', f'{sorted(scopes)}')
  lowest = min(blocks)
  if lowest == 0:
    raise _refuse('the lowest block frozen (adapter.layers above block 0)',
                  f'trainable params in block 0, e.g. {blocks[0][2]!r}')
  return tuple(blocks[lowest][1].split('/'))


def check(exp: Experiment) -> tuple[str, nn.Module]:
  """check_config, every trainable param above the boundary (read from the delta) and the size.

  Returns:
    (a description of the cache's size, the model that trains on it); nothing is computed
    (abstract traces).
  """
  check_config(exp.config)
  at = boundary(exp)
  shape, dtype, head_model = _width_and_model(exp, at)
  n = exp.info.num_train
  nbytes = n * int(np.prod(shape)) * jnp.dtype(dtype).itemsize
  limit = exp.config.get('cache_features_max_mib', DEFAULT_MAX_MIB)
  where = f'the input of {"/".join(at)}: ' if at and at != ('head',) else ''
  size = (f'{where}{n:,} train examples x {" x ".join(f"{d:,}" for d in shape)} '
          f'{jnp.dtype(dtype).name} = {nbytes / 2 ** 20:,.1f} MiB')
  if nbytes > limit * 2 ** 20:
    raise FeatureCacheError(
        f'cache_features=True: the features ({size}) exceed cache_features_max_mib={limit}; '
        'raise the limit or set cache_features=False.')
  return f'{size} on the host (limit {limit:,} MiB)', head_model


@dataclasses.dataclass
class FeatureCache:
  """Features of every train row and the part of the model that trains on them.

  Attributes:
    model: features (B, ...) -> logits (B, C), with the experiment's param paths (for the train
      step): the head, CLIP's classifier or the model from the boundary block up.
    features: (num_train, ...) host array, row i = the frozen prefix on train row i: (D,) at the
      head, (T, D) tokens at a block.
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


def _width_and_model(exp: Experiment, at: tuple[str, ...]):
  """(feature shape, dtype, the model on features) from an abstract trace: nothing is computed."""
  image_shape = (exp.config.backbone.image_size, exp.config.backbone.image_size, 3)
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        partition.merge(exp.delta, exp.frozen))
  rng = jax.random.PRNGKey(0)
  if _is_clip(exp.model):
    out = jax.eval_shape(lambda p, x: exp.model.apply({'params': p}, x, train=True,
                                                      method='image_features'), params, images)
    return out.shape[1:], out.dtype, CLIPOnFeatures(model=exp.model)
  holder = []

  def trace(p, x):
    feats, module = module_input(exp.model, partition.to_variables(p), x, rng, at)
    holder.append(module)
    return feats
  out = jax.eval_shape(trace, params, images)
  if at == ('head',):
    return out.shape[1:], out.dtype, HeadOnFeatures(head=holder[0])
  return out.shape[1:], out.dtype, BlockInputOnFeatures(model=exp.model, boundary=at,
                                                        image_shape=image_shape)


def build(exp: Experiment, delta: Any) -> FeatureCache:
  """Checks, then runs the frozen prefix once over the train split (batches of batch_size).

  `delta` is the trainable tree as the run starts (only the frozen prefix is read from it).
  """
  size, head_model = check(exp)
  metrics_lib.log(f'Caching the frozen features: {size}; the frozen layers below run once per '
                  'train example.')
  start = time.perf_counter()
  features, labels = _compute(exp, delta, boundary(exp))
  seconds = time.perf_counter() - start
  n = len(labels)
  metrics_lib.log(f'Computed the features of {n:,} examples in {seconds:.1f}s '
                  f'({n / max(seconds, 1e-9):.1f} img/s, compilation included).')
  return FeatureCache(model=head_model, features=features, labels=labels, seconds=seconds)


def _compute(exp: Experiment, delta: Any,
             at: tuple[str, ...] = ('head',)) -> tuple[np.ndarray, np.ndarray]:
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
      return module_input(exp.model, variables, images, rng, at)[0]
  forward = jax.jit(forward, in_shardings=(exp.delta_shardings, exp.frozen_shardings, batch_sh),
                    out_shardings=repl, compiler_options=experiment.compiler_options(c))
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
