"""In-memory tables of labelled images: tfds, an image folder, MNIST-style idx files, sklearn digits.

Every source is turned into a ``Table`` that can be indexed: random access is what makes the train
stream a pure function of (seed, step), so a run can resume at any step in O(1). The pipeline
targets the small domain datasets that adaptation uses (thousands to tens of thousands of images);
encoded images stay compressed in memory and are decoded per example unless cached decoded.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
from typing import Optional, Sequence

from absl import logging
import numpy as np

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# Seed of the fixed shuffles that make local tables class-mixed (see ``load_imagefolder``).
_ORDER_SEED = 0
# Above this many examples, holding a tfds split in memory deserves a warning.
_LARGE_SPLIT = 300_000


class DatasetNotFoundError(ValueError):
  """A tfds name that no builder is registered under."""


class DatasetNotPreparedError(FileNotFoundError):
  """A known tfds dataset whose prepared files are not in data_dir."""


@dataclasses.dataclass(frozen=True)
class Table:
  """Labelled images held in memory.

  Attributes:
    images: for kind 'pixels' a uint8 array (N, H, W, 3); for kind 'encoded' an object array (N,) of
      jpg/png bytes; for kind 'files' an object array (N,) of image paths.
    labels: int32 array (N,).
    class_names: names indexed by label.
    kind: 'pixels' | 'encoded' | 'files'.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  kind: str

  def __post_init__(self):
    if self.kind not in ('pixels', 'encoded', 'files'):
      raise ValueError(f"Table kind must be 'pixels', 'encoded' or 'files', got {self.kind!r}.")
    if len(self.images) != len(self.labels):
      raise ValueError(f'{len(self.images)} images but {len(self.labels)} labels.')

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: Sequence[int]) -> 'Table':
    indices = np.asarray(indices, dtype=np.int64)
    return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


# ----------------------------------------------------------------------------------------- digits


def load_digits(split: str, seed: int = 0) -> Table:
  """scikit-learn's 1797 handwritten 8x8 digits, split 1437 train / 360 test, stratified and seeded.

  Ships inside scikit-learn, so it works offline. Pixels 0..16 are scaled to uint8 0..255 and the
  single channel is repeated to RGB; upsampling to the model's size happens in preprocessing.
  """
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  if split not in ('train', 'test'):
    raise ValueError(f"digits has splits 'train' and 'test', got {split!r}.")
  digits = sk_datasets.load_digits()
  pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  pixels = np.repeat(pixels[..., None], 3, axis=-1)
  index = np.arange(len(pixels))
  train_idx, test_idx = model_selection.train_test_split(
      index, test_size=360, stratify=digits.target, random_state=seed)
  idx = train_idx if split == 'train' else test_idx
  return Table(images=pixels[idx], labels=digits.target[idx].astype(np.int32),
               class_names=tuple(str(c) for c in range(10)), kind='pixels')


# ------------------------------------------------------------------------------------ ImageFolder


def _list_images(class_dir: str) -> list[str]:
  return sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))


# Leading bytes of each accepted format: a file without them is not an image, whatever its name.
_MAGIC = (b'\xff\xd8', b'\x89PNG', b'GIF8', b'BM')


def check_image_file(path: str) -> None:
  """Raises ValueError naming `path` unless it starts like a jpg/png/gif/bmp file."""
  with open(path, 'rb') as f:
    head = f.read(8)
  if not head.startswith(_MAGIC):
    what = 'is empty' if not head else 'is not a jpg, png, gif or bmp image'
    raise ValueError(f'Image file {path!r} {what}: remove or replace it.')


def _class_dirs(root: str) -> list[str]:
  return sorted(d for d in os.listdir(root)
                if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))


def _read_class_folders(root: str, class_names: Optional[Sequence[str]] = None) -> Table:
  """Reads ``root/<class>/<image>``; class ids follow ``class_names`` (default: sorted folders)."""
  folders = _class_dirs(root)
  if not folders:
    raise FileNotFoundError(
        f'Image folder {root!r} has no class subfolders: expected '
        f'{root}/<class_name>/<image>.jpg|png.')
  if class_names is None:
    class_names = folders
  unknown = sorted(set(folders) - set(class_names))
  if unknown:
    raise ValueError(f'Image folder {root!r} has classes {unknown} that the train split does not '
                     f'have; train classes: {list(class_names)}.')
  paths, labels = [], []
  for name in folders:
    files = _list_images(os.path.join(root, name))
    if not files:
      raise FileNotFoundError(f'Class folder {os.path.join(root, name)!r} holds no images '
                              f'(looked for {", ".join(IMAGE_EXTENSIONS)}).')
    for f in files:
      check_image_file(f)
    paths += files
    labels += [list(class_names).index(name)] * len(files)
  # A fixed shuffle mixes the classes, so "the first n examples" (VTAB-1k, split slicing) is a
  # sample of every class rather than the first classes in alphabetical order.
  order = np.random.default_rng(_ORDER_SEED).permutation(len(paths))
  return Table(images=np.array(paths, dtype=object)[order],
               labels=np.array(labels, dtype=np.int32)[order],
               class_names=tuple(class_names), kind='files')


_EVAL_FOLDERS = ('val', 'validation', 'test')


def load_imagefolder(root: str, split: str, val_fraction: float = 0.2) -> Table:
  """Images under ``root``: either ``root/{train,val|test}/<class>/*`` or ``root/<class>/*``.

  With split subfolders, ``split`` names one ('val', 'validation' and 'test' stand in for each
  other when only one of them exists). Without them, 'train' is a stratified (1 - val_fraction)
  share of every class and 'val'/'test' the rest, fixed by a seed. Class names are the sorted class
  subfolders of the train split; images of any size, jpg/png/bmp/gif.
  """
  if not root:
    raise ValueError("source='imagefolder' needs config.path, the folder that holds the images.")
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root!r} does not exist.')
  subdirs = _class_dirs(root)
  if 'train' in subdirs:
    train_dir = os.path.join(root, 'train')
    class_names = _class_dirs(train_dir)
    if split == 'train':
      return _read_class_folders(train_dir, class_names)
    candidates = [split] if split in subdirs else []
    if split in _EVAL_FOLDERS:
      candidates += [d for d in _EVAL_FOLDERS if d in subdirs]
    if not candidates:
      raise FileNotFoundError(f'Image folder {root!r} has no {split!r} subfolder; found {subdirs}.')
    return _read_class_folders(os.path.join(root, candidates[0]), class_names)

  if split not in ('train',) + _EVAL_FOLDERS:
    raise ValueError(f'Image folder {root!r} has no split subfolders, so it is split by fraction '
                     f"into 'train' and 'val'/'test'; got split {split!r}.")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f'val_fraction must lie in (0, 1), got {val_fraction}.')
  table = _read_class_folders(root)
  rng = np.random.default_rng(_ORDER_SEED)
  keep = []
  for label in range(len(table.class_names)):
    idx = np.flatnonzero(table.labels == label)
    idx = idx[rng.permutation(len(idx))]
    n_val = int(round(len(idx) * val_fraction))
    keep.append(idx[n_val:] if split == 'train' else idx[:n_val])
  return table.take(np.sort(np.concatenate(keep)))


# ------------------------------------------------------------------------------------------- tfds


def _tfds_help(name: str, data_dir: Optional[str]) -> str:
  where = f'--data_dir={data_dir}' if data_dir else '(default data_dir)'
  return (f'On a machine with internet run `tfds build {name} {where}` (or '
          f'`tfds.builder({name!r}, data_dir=...).download_and_prepare()`), then copy the prepared '
          f'folder here, or point config.data_dir at a folder that already holds it.')


def _tfds_builder(name: str, data_dir: Optional[str]):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    base = re.split(r'[:/]', name)[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=5)
    hint = f' Did you mean one of {close}?' if close else ''
    raise DatasetNotFoundError(
        f'tfds has no dataset named {name!r}.{hint} See `tfds.list_builders()` for every name.'
    ) from None  # tfds' own message lists all ~450 names.


def load_tfds(name: str, split: str, data_dir: Optional[str] = None, image_key: str = 'image',
              label_key: str = 'label') -> Table:
  """Reads a prepared tfds split into memory, images still encoded.

  Never downloads: offline, a missing dataset raises ``DatasetNotPreparedError`` at once instead of
  tfds retrying the network for minutes.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not name:
    raise ValueError("source='tfds' needs config.name, a tfds dataset name such as 'cifar10'.")
  builder = _tfds_builder(name, data_dir)
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError):  # Not prepared (reported below) or an unusual split string.
    num_examples = 0
  if num_examples > _LARGE_SPLIT:
    logging.warning('Reading %d examples of %s %s into memory (encoded); this pipeline is built '
                    'for small domain datasets.', num_examples, name, split)
  features = builder.info.features
  for key in (image_key, label_key):
    if key not in features:
      raise KeyError(f'tfds dataset {name!r} has no feature {key!r}; features: {sorted(features)}.')
  label_feature = features[label_key]
  if not isinstance(label_feature, tfds.features.ClassLabel):
    raise TypeError(f'Feature {label_key!r} of {name!r} is a {type(label_feature).__name__}, '
                    'expected a ClassLabel.')
  encoded = isinstance(features[image_key], tfds.features.Image)
  decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=False, decoders=decoders)
  except AssertionError as e:
    # tfds signals "not prepared" with an AssertionError ("could not find data in ...").
    resolved = data_dir or os.environ.get('TFDS_DATA_DIR') or tfds.core.constants.DATA_DIR
    raise DatasetNotPreparedError(
        f'tfds dataset {name!r} is not prepared in data_dir {resolved!r}, and this pipeline never '
        f'downloads. {_tfds_help(name, data_dir)}') from e

  images, labels = [], []
  for batch in tfds.as_numpy(ds.map(lambda ex: (ex[image_key], ex[label_key])).batch(1024)):
    images.extend(batch[0])
    labels.append(batch[1])
  if not labels:
    raise ValueError(f'tfds split {split!r} of {name!r} is empty.')
  if encoded:
    array = np.empty(len(images), dtype=object)
    array[:] = images
  else:
    array = np.stack(images).astype(np.uint8)
    if array.ndim == 3 or array.shape[-1] == 1:
      array = np.repeat(array.reshape(array.shape[:3] + (1,)), 3, axis=-1)
  return Table(images=array, labels=np.concatenate(labels).astype(np.int32),
               class_names=tuple(label_feature.names),
               kind='encoded' if encoded else 'pixels')


# --------------------------------------------------------------------------------- Fashion-MNIST

# tfds's fashion_mnist ClassLabel names (and Zalando's), indexed by label.
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                         'Sneaker', 'Bag', 'Ankle boot')
# Split name -> file prefix of the MNIST-family idx files.
IDX_SPLITS = {'train': 'train', 'test': 't10k'}


def idx_files(folder: str, split: str) -> tuple[str, str]:
  """(images, labels) paths of `split` in an MNIST-style folder, gzip-compressed or not."""
  if split not in IDX_SPLITS:
    raise ValueError(f'MNIST-style idx folders have splits {sorted(IDX_SPLITS)}, got {split!r}.')
  paths = []
  for kind in ('images-idx3', 'labels-idx1'):
    base = os.path.join(folder, f'{IDX_SPLITS[split]}-{kind}-ubyte')
    found = [p for p in (base + '.gz', base) if os.path.isfile(p)]
    if not found:
      raise FileNotFoundError(f'Folder {folder!r} has no {os.path.basename(base)}.gz (nor the '
                              f'uncompressed file): expected the idx files of split {split!r}.')
    paths.append(found[0])
  return paths[0], paths[1]


def load_idx(folder: str, split: str, class_names: Sequence[str]) -> Table:
  """An MNIST-format split (28x28 grey uint8 + uint8 labels) in file order, grey -> RGB."""
  from vadapt.data import idx  # pylint: disable=g-import-not-at-top
  images_path, labels_path = idx_files(folder, split)
  images, labels = idx.read(images_path), idx.read(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise idx.IdxFormatError(f'{images_path}: expected uint8 images (N, H, W), found '
                             f'{images.dtype} {images.shape}.')
  if labels.ndim != 1 or labels.dtype != np.uint8:
    raise idx.IdxFormatError(f'{labels_path}: expected uint8 labels (N,), found {labels.dtype} '
                             f'{labels.shape}.')
  if len(images) != len(labels):
    raise idx.IdxFormatError(f'The idx files of split {split!r} disagree: {images_path} holds '
                             f'{len(images):,} images but {labels_path} holds {len(labels):,} '
                             'labels.')
  if len(labels) and labels.max() >= len(class_names):
    raise idx.IdxFormatError(f'{labels_path}: labels must lie in [0, {len(class_names)}), found '
                             f'{int(labels.max())}.')
  # The files are stored class-mixed (Fashion-MNIST, MNIST), so file order serves "the first n".
  return Table(images=np.repeat(images[..., None], 3, axis=-1), labels=labels.astype(np.int32),
               class_names=tuple(class_names), kind='pixels')


def _tfds_default_dir() -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.core.constants.DATA_DIR


def fashion_mnist_location(path: Optional[str],
                           data_dir: Optional[str]) -> tuple[str, Optional[str]]:
  """Where Fashion-MNIST is read from: ('idx', folder) or ('tfds', data_dir).

  In order: the idx files in `path` when it is set; tfds's `fashion_mnist` when it is prepared in
  `data_dir`; the idx files that `python -m vadapt.artifacts` fetched into the vadapt cache.
  tfds cannot prepare its builder from those files offline (the Debian package's archives are
  recompressed, so tfds's registered checksums reject them), hence the direct idx reader.
  """
  if path:
    if not os.path.isdir(path):
      raise FileNotFoundError(f'Fashion-MNIST folder {path!r} (config.path) does not exist.')
    return 'idx', path
  roots = [data_dir] if data_dir else [os.environ.get('TFDS_DATA_DIR'), _tfds_default_dir()]
  roots = [os.path.expanduser(r) for r in roots if r]
  # A prepared tfds version folder holds dataset_info.json (asking tfds.builder would also work,
  # but it warns about every unprepared folder it looks at).
  if any(glob.glob(os.path.join(r, 'fashion_mnist', '*', 'dataset_info.json')) for r in roots):
    return 'tfds', data_dir
  from vadapt import artifacts  # pylint: disable=g-import-not-at-top
  cached = artifacts.cached('fashion_mnist')
  if cached:
    return 'idx', cached
  raise DatasetNotPreparedError(
      f'Fashion-MNIST was not found: config.path is unset, tfds fashion_mnist is not prepared in '
      f'{" or ".join(map(repr, roots))} and the vadapt cache holds no idx '
      'files. Run `python -m vadapt.artifacts` (fetches the Debian package dataset-fashion-mnist), '
      'or set config.path to a folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] '
      '(e.g. /usr/share/datasets/fashion-mnist), or config.data_dir to a tfds data_dir that holds '
      'fashion_mnist.')
