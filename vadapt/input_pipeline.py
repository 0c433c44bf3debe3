"""Input pipeline: tfds, image folders, Fashion-MNIST or digits -> deterministic per-process batches.

Usage::

  cfg = input_pipeline.default_config()          # digits, offline
  info = input_pipeline.get_info(cfg)
  it = input_pipeline.make_train_iterator(cfg, global_batch_size=64, image_size=224,
                                          preprocess='vit', seed=0, start_step=step)
  batch = next(it)  # {'image': f32 (64 // P, 224, 224, 3), 'label': i32 (64 // P,)}
  for batch in input_pipeline.make_eval_iterator(cfg, global_batch_size=64, image_size=224):
    ...             # plus 'mask': the padded tail of the last batch is False

The train stream is a pure function of (seed, step) (see ``vadapt.data.iterators``): resuming at
``start_step=k`` gives bit-identical batches to an uninterrupted run, in O(1).
Splits are read into memory once (encoded images stay compressed unless ``cache`` decodes them),
which suits the small domain datasets that adaptation trains on.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator, Optional

import jax
import ml_collections
from ml_collections import config_dict
import numpy as np

try:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
except ImportError as e:  # TensorFlow is left to the environment (see pyproject.toml's extras).
  raise ImportError("vadapt's input pipeline (tf.data) needs TensorFlow: install it, or "
                    "pip install 'vadapt[cpu]' for the CPU build.") from e

from vadapt.data import iterators
from vadapt.data import preprocess as preprocess_lib
from vadapt.data import sources
from vadapt.data import splits
from vadapt.data.device import prefetch_to_device
from vadapt.data.sources import DatasetNotFoundError, DatasetNotPreparedError, Table

__all__ = [
    'DatasetInfo', 'DatasetNotFoundError', 'DatasetNotPreparedError', 'default_config',
    'get_info', 'load_tables', 'make_eval_iterator', 'make_train_iterator', 'prefetch_to_device',
]

SOURCES = ('tfds', 'imagefolder', 'digits', 'fashion_mnist')

# tf.data runs on the host; keep TensorFlow off accelerators so it takes no memory from JAX.
try:
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
except (RuntimeError, ValueError):  # Devices were initialised already, or the kind is unknown.
  pass


def default_config() -> ml_collections.ConfigDict:
  """Every field the pipeline reads; None where unset. Safe to ``lock()``.

  Fields that default to None are typed placeholders, so the command line can set them
  (``--config.input.path=photos``): ml_collections cannot override an untyped None.
  """
  c = ml_collections.ConfigDict()
  c.source = 'digits'          # 'tfds' | 'imagefolder' | 'digits' | 'fashion_mnist'
  c.name = config_dict.placeholder(str)  # tfds name, e.g. 'cifar10' or 'oxford_iiit_pet:4.*.*'
  # tfds data_dir; None -> $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data_dir = config_dict.placeholder(str)
  c.train_split = 'train'      # split strings, slicing allowed: 'train[:800]', 'train[80%:]'
  c.eval_split = 'test'
  # ImageFolder root: {train,val|test}/<class>/* or <class>/*. Fashion-MNIST: a folder of idx
  # files; None -> tfds's fashion_mnist if prepared in data_dir, else the vadapt artifact cache.
  c.path = config_dict.placeholder(str)
  c.val_fraction = 0.2         # ImageFolder without split folders: held-out share per class
  c.image_key = 'image'        # tfds feature names
  c.label_key = 'label'
  c.classes = config_dict.placeholder(tuple)  # label ids to keep, relabelled 0..k-1 in this order
  c.few_shot = config_dict.placeholder(int)   # k train examples per class
  c.few_shot_seed = 0
  c.vtab_1k = False            # train on train[:800], evaluate on train[800:1000]
  # The train order is an exact per-epoch permutation, so no shuffle buffer is used; the field
  # is kept so configs written for buffer-based pipelines still load.
  c.shuffle_buffer = config_dict.placeholder(int)
  c.cache = True               # keep splits in memory across iterators, images decoded once
  # Random-resized-crop area range; None or () (on the command line: --config.input.crop_scale=())
  # for a plain resize.
  c.crop_scale = config_dict.FieldReference((0.08, 1.0), field_type=tuple)
  c.flip = config_dict.placeholder(bool)  # train-time horizontal flip; None: on, except digits
  # None: the family's default (0.875 vit/imagenet, 1.0 clip).
  c.eval_crop_fraction = config_dict.placeholder(float)
  return c


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about the data.

  Attributes:
    num_classes: number of labels after ``classes`` selection.
    num_train: train examples after few-shot / VTAB-1k selection.
    num_eval: eval examples (one pass, without padding).
    class_names: names indexed by label.
  """
  num_classes: int
  num_train: int
  num_eval: int
  class_names: tuple[str, ...]


def _get(cfg, key, default=None):
  return cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)


def _source_key(cfg) -> tuple[Any, ...]:
  classes = _get(cfg, 'classes')
  return tuple(_get(cfg, k) for k in (
      'source', 'name', 'data_dir', 'train_split', 'eval_split', 'path', 'val_fraction',
      'image_key', 'label_key', 'few_shot', 'few_shot_seed', 'vtab_1k')) + (
          None if classes is None else tuple(int(c) for c in classes),)


def _load_split(cfg, split: str) -> Table:
  source = _get(cfg, 'source')
  if source == 'tfds':
    return sources.load_tfds(_get(cfg, 'name'), split, data_dir=_get(cfg, 'data_dir'),
                             image_key=_get(cfg, 'image_key', 'image'),
                             label_key=_get(cfg, 'label_key', 'label'))
  name, start, stop = splits.parse_split(split)
  if source == 'fashion_mnist':
    kind, where = sources.fashion_mnist_location(_get(cfg, 'path'), _get(cfg, 'data_dir'))
    if kind == 'tfds':
      return sources.load_tfds('fashion_mnist', split, data_dir=where)
    table = sources.load_idx(where, name, sources.FASHION_MNIST_CLASSES)
  elif source == 'digits':
    table = sources.load_digits(name)
  elif source == 'imagefolder':
    table = sources.load_imagefolder(_get(cfg, 'path'), name, _get(cfg, 'val_fraction', 0.2))
  else:
    raise ValueError(f'config.source must be one of {SOURCES}, got {source!r}.')
  return splits.slice_table(table, start, stop)


def _build_tables(cfg, decode: bool) -> tuple[Table, Table]:
  few_shot, vtab = _get(cfg, 'few_shot'), _get(cfg, 'vtab_1k')
  if few_shot and vtab:
    raise ValueError('few_shot and vtab_1k select the train set in different ways; set one.')
  classes = _get(cfg, 'classes')
  train = splits.select_classes(_load_split(cfg, _get(cfg, 'train_split')), classes)
  if vtab:
    train, eval_ = splits.vtab_1k(train)
  else:
    eval_ = splits.select_classes(_load_split(cfg, _get(cfg, 'eval_split')), classes)
  if few_shot:
    train = splits.few_shot(train, int(few_shot), int(_get(cfg, 'few_shot_seed', 0)))
  if decode:
    train, eval_ = iterators.decode_all(train), iterators.decode_all(eval_)
  return train, eval_


# Decoded splits by source key, most recent last; a few entries cover train + eval of a sweep.
_TABLES: 'collections.OrderedDict[tuple[Any, ...], tuple[Table, Table]]' = collections.OrderedDict()
_MAX_CACHED = 4


def load_tables(cfg) -> tuple[Table, Table]:
  """(train, eval) tables after slicing, class selection and few-shot / VTAB-1k.

  With ``cfg.cache`` the result is kept in memory (images decoded once) and shared by every
  iterator built from a config with the same data fields.
  """
  if not _get(cfg, 'cache', True):
    return _build_tables(cfg, decode=False)
  key = _source_key(cfg)
  if key not in _TABLES:
    _TABLES[key] = _build_tables(cfg, decode=True)
    while len(_TABLES) > _MAX_CACHED:
      _TABLES.popitem(last=False)
  _TABLES.move_to_end(key)
  return _TABLES[key]


def get_info(cfg) -> DatasetInfo:
  train, eval_ = load_tables(cfg)
  return DatasetInfo(num_classes=len(train.class_names), num_train=len(train),
                     num_eval=len(eval_), class_names=train.class_names)


def _processes(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def make_train_iterator(cfg, *, global_batch_size: int, image_size: int, preprocess: str = 'vit',
                        seed: int = 0, start_step: int = 0, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite train batches for this process: 'image' f32 (B/P, S, S, 3), 'label' i32 (B/P,)."""
  process_index, process_count = _processes(process_index, process_count)
  iterators.local_batch_size(global_batch_size, process_count)  # Fail before loading any data.
  family = preprocess_lib.get_family(preprocess)
  train, _ = load_tables(cfg)
  flip = _get(cfg, 'flip')
  if flip is None:
    flip = _get(cfg, 'source') != 'digits'  # Digits are not mirror-symmetric.
  crop_scale = _get(cfg, 'crop_scale', (0.08, 1.0))
  ds = iterators.train_dataset(
      train, global_batch_size=global_batch_size, image_size=image_size, family=family, seed=seed,
      start_step=start_step, process_index=process_index, process_count=process_count,
      crop_scale=tuple(crop_scale) if crop_scale else None, flip=bool(flip))
  return _naming_bad_images(ds, train)


def make_eval_iterator(cfg, *, global_batch_size: int, image_size: int, preprocess: str = 'vit',
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """One eval pass for this process: 'image', 'label' and bool 'mask' (False on padding)."""
  process_index, process_count = _processes(process_index, process_count)
  iterators.local_batch_size(global_batch_size, process_count)
  family = preprocess_lib.get_family(preprocess)
  _, eval_ = load_tables(cfg)
  ds = iterators.eval_dataset(
      eval_, global_batch_size=global_batch_size, image_size=image_size, family=family,
      process_index=process_index, process_count=process_count,
      crop_fraction=_get(cfg, 'eval_crop_fraction'))
  return _naming_bad_images(ds, eval_)


def _naming_bad_images(ds, table: Table) -> Iterator[dict[str, np.ndarray]]:
  """ds's numpy batches; an image that fails to decode is named in a one-line ValueError."""
  try:
    yield from ds.as_numpy_iterator()
  except tf.errors.OpError:
    raise iterators.undecodable_error(table) from None
