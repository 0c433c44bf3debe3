"""Deterministic, resumable train and padded eval pipelines over an in-memory ``Table``.

Train example ``g`` (its global position: step * global_batch + slot) is

  index = index_shuffle(g mod N, seed=(seed, g div N), N - 1)   # a fresh permutation each epoch
  image = augment(table[index], seed=fold_in((seed, AUG_STREAM), g))

so the stream is a pure function of (seed, step): starting at step k costs O(1) and yields exactly
the batches an uninterrupted run sees from step k on, and process p of P reads slots
[p * B/P, (p+1) * B/P) of every global batch, so the processes' batches together are the
single-process batch.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from vadapt.data import preprocess
from vadapt.data.sources import Table

# Separates the augmentation random stream from the epoch-permutation stream.
_AUG_STREAM = 0x5EED


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} does not divide by the '
                     f'process count {process_count}: every process needs an equal share.')
  return global_batch_size // process_count


def _decode(data: tf.Tensor) -> tf.Tensor:
  # expand_animations=False gives GIFs a 3-D shape; channels=3 turns grayscale/RGBA into RGB.
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def make_lookup(table: Table) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
  """index -> (uint8 image (H, W, 3), int32 label), for use inside tf.data."""
  labels = tf.constant(table.labels, dtype=tf.int32)
  if table.kind == 'pixels':
    pixels = tf.constant(table.images, dtype=tf.uint8)
    get = lambda i: tf.gather(pixels, i)
  elif table.kind == 'encoded':
    blobs = tf.constant(table.images.tolist(), dtype=tf.string)
    get = lambda i: _decode(tf.gather(blobs, i))
  else:
    paths = tf.constant([str(p) for p in table.images], dtype=tf.string)
    get = lambda i: _decode(tf.io.read_file(tf.gather(paths, i)))
  return lambda i: (get(i), tf.gather(labels, i))


def _check_process(process_index: int, process_count: int):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index must lie in [0, process_count), got {process_index} of '
                     f'{process_count}.')


def _global_position(counter: tf.Tensor, local: int, global_batch_size: int,
                     process_index: int) -> tf.Tensor:
  """This process's ``counter``-th train element -> its global position g."""
  step, slot = counter // local, counter % local
  return step * global_batch_size + process_index * local + slot


def example_index(g: tf.Tensor, n: int, seed: tf.Tensor) -> tf.Tensor:
  """The table row of train position ``g``: epoch ``g div n``'s permutation of the ``n`` rows."""
  return tf.random.experimental.index_shuffle(
      g % n, seed=tf.stack([tf.cast(seed, tf.int64), g // n]),
      max_index=tf.constant(n - 1, tf.int64))


def train_indices(n: int, *, global_batch_size: int, seed: int, start_step: int,
                  process_index: int, process_count: int) -> tf.data.Dataset:
  """The table rows of ``train_dataset``'s batches, (B/P,) int64 each, from ``start_step`` on.

  Without augmentation an example's pixels are a function of its row alone, so these rows and a
  per-row cache (vadapt.feature_cache) give what the image batches would.
  """
  _check_process(process_index, process_count)
  local = local_batch_size(global_batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if n == 0:
    raise ValueError('The train split is empty.')
  seed64 = tf.constant(seed, tf.int64)
  ds = tf.data.Dataset.counter(start=start_step * local, dtype=tf.int64)
  ds = ds.map(lambda c: example_index(
      _global_position(c, local, global_batch_size, process_index), n, seed64))
  return ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def train_dataset(table: Table, *, global_batch_size: int, image_size: int,
                  family: preprocess.Family, seed: int, start_step: int, process_index: int,
                  process_count: int, crop_scale: Optional[Sequence[float]],
                  flip: bool) -> tf.data.Dataset:
  """Infinite batches {'image': (B/P, S, S, 3) f32, 'label': (B/P,) i32} from ``start_step`` on."""
  _check_process(process_index, process_count)
  local = local_batch_size(global_batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  n = len(table)
  if n == 0:
    raise ValueError('The train split is empty.')
  lookup = make_lookup(table)
  seed64 = tf.constant(seed, tf.int64)

  def element(counter):
    g = _global_position(counter, local, global_batch_size, process_index)
    image, label = lookup(example_index(g, n, seed64))
    aug_seed = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _AUG_STREAM], tf.int64), g)
    image = preprocess.train_preprocess(image, aug_seed, image_size, family,
                                        crop_scale=crop_scale, flip=flip)
    return {'image': image, 'label': label}

  ds = tf.data.Dataset.counter(start=start_step * local, dtype=tf.int64)
  ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  return math.ceil(num_examples / global_batch_size)


def eval_dataset(table: Table, *, global_batch_size: int, image_size: int,
                 family: preprocess.Family, process_index: int, process_count: int,
                 crop_fraction: Optional[float]) -> tf.data.Dataset:
  """One pass of batches with 'mask': every example appears exactly once, unmasked, on one process.

  The last global batch is padded (copies of example 0, mask False), and every process yields the
  same number of batches, as collective eval steps need.
  """
  _check_process(process_index, process_count)
  local = local_batch_size(global_batch_size, process_count)
  n = len(table)
  if n == 0:
    raise ValueError('The eval split is empty.')
  lookup = make_lookup(table)

  def element(counter):
    step, slot = counter // local, counter % local
    g = step * global_batch_size + process_index * local + slot
    mask = g < n
    image, label = lookup(tf.where(mask, g, tf.constant(0, tf.int64)))
    image = preprocess.eval_preprocess(image, image_size, family, crop_fraction)
    return {'image': image, 'label': label, 'mask': mask}

  ds = tf.data.Dataset.range(num_eval_batches(n, global_batch_size) * local)
  ds = ds.map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def undecodable_error(table: Table) -> ValueError:
  """Finds the first image of `table` that does not decode: a ValueError naming it."""
  for i in range(len(table)):
    try:
      data = (tf.io.read_file(str(table.images[i])) if table.kind == 'files'
              else tf.constant(table.images[i]))
      _decode(data)
    except tf.errors.OpError as e:
      what = repr(str(table.images[i])) if table.kind == 'files' else f'example {i} of the split'
      reason = e.message.strip().splitlines()[0] if e.message else type(e).__name__
      return ValueError(f'Image {what} cannot be decoded ({reason}): remove or replace it.')
  return ValueError('An image of the split cannot be decoded.')


# Decoded tables above this size stay encoded: memory matters more than decode time then.
DECODE_LIMIT_BYTES = 2 ** 31


def decode_all(table: Table, limit_bytes: int = DECODE_LIMIT_BYTES) -> Table:
  """Decodes an encoded/file table once into uint8 pixels.

  Returns the table unchanged if its images differ in shape (they cannot be stacked) or would take
  more than ``limit_bytes`` decoded.
  """
  if table.kind == 'pixels':
    return table
  lookup = make_lookup(table)
  ds = tf.data.Dataset.range(len(table)).map(lambda i: lookup(i)[0],
                                             num_parallel_calls=tf.data.AUTOTUNE)
  images = []
  try:
    for image in ds.as_numpy_iterator():
      if (images and image.shape != images[0].shape) or image.nbytes * len(table) > limit_bytes:
        return table
      images.append(image)
  except tf.errors.OpError:
    raise undecodable_error(table) from None
  return Table(images=np.stack(images), labels=table.labels, class_names=table.class_names,
               kind='pixels')
