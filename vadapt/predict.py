"""Classifying one's own images with an exported adapter: class names with probabilities.

The adapter file (``export`` / the end of training) stores the delta, the experiment config, the
class names and the preprocessing, so the file plus the backbone checkpoint it was trained on is
all that is needed::

  predictor = predict.Predictor('workdir/adapter.safetensors', backbone='ViT-B_16.npz')
  for p in predictor.predict(['cat.jpg', 'photos/']):
    print(p.path, p.top_k)          # [('cat', 0.93), ('dog', 0.05), ...]

or ``python -m vadapt.main --mode=predict --adapter=a.safetensors --images=cat.jpg,photos/``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from vadapt import checkpoint as ckpt_lib
from vadapt import host_memory
from vadapt import metrics as metrics_lib

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


def config_from_meta(meta: dict, backbone: Optional[str] = None) -> ml_collections.ConfigDict:
  """The experiment config an adapter was saved with, on `backbone` if given, else on the
  backbone file it was trained on (meta['backbone_checkpoint'], where recorded)."""
  config = ml_collections.ConfigDict(meta['config'])
  with config.unlocked():
    if backbone is not None:
      config.backbone.checkpoint = backbone
    elif meta.get('backbone_checkpoint'):
      config.backbone.checkpoint = meta['backbone_checkpoint']
  return config


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The classes of one image, most probable first.

  Attributes:
    path: the image file.
    top_k: (class name, probability) pairs, most probable first.
    task: the task that classified it, when one predictor serves several (a manifest).
  """
  path: str
  top_k: tuple[tuple[str, float], ...]
  task: Optional[str] = None


def image_paths(items: Sequence[str]) -> list[str]:
  """Image files from files and folders (a folder's images sorted, not recursive)."""
  paths = []
  for item in items:
    if os.path.isdir(item):
      found = sorted(os.path.join(item, f) for f in os.listdir(item)
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'))
      if not found:
        raise FileNotFoundError(f'Folder {item!r} holds no images '
                                f'({", ".join(IMAGE_EXTENSIONS)}).')
      paths += found
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise FileNotFoundError(f'Image {item!r} does not exist.')
  return paths


def _read_image(path: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert('RGB'))
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f'Image {path!r} cannot be read: {e}') from None


def preprocess(pixels: np.ndarray, size: int, family: str,
               crop: Optional[float] = None) -> np.ndarray:
  """uint8 (H, W, 3) -> the float (size, size, 3) image of eval preprocessing `family`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vadapt.data import preprocess as preprocess_lib  # pylint: disable=g-import-not-at-top
  return preprocess_lib.eval_preprocess(tf.constant(pixels), size,
                                        preprocess_lib.get_family(family), crop).numpy()


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 RGB (H, W, 3); an unreadable file is a one-line ValueError."""
  return _read_image(path)


class Predictor:
  """An exported adapter on its backbone, ready to classify images.

  Attributes:
    meta: the adapter file's metadata (config, class names, preprocessing, ...).
    class_names: names indexed by label.
    config: the experiment config the adapter was trained with.
  """

  def __init__(self, adapter_path: str, backbone: Optional[str] = None):
    """Loads the adapter file and the backbone.

    Args:
      adapter_path: an exported adapter (.safetensors).
      backbone: the backbone checkpoint it was trained on; default: the path stored in the file
        (empty for a randomly initialised backbone, as in tests).
    """
    from vadapt import backbones  # pylint: disable=g-import-not-at-top
    from vadapt import experiment  # pylint: disable=g-import-not-at-top
    _, meta = ckpt_lib.read_adapter(adapter_path)
    missing = [k for k in ('config', 'class_names') if k not in meta]
    if missing:
      raise ValueError(f'Adapter {adapter_path!r} stores no {missing}: it was exported by an older '
                       'vadapt; export it again (--mode=export) to predict with it.')
    self.meta = meta
    self.class_names = tuple(meta['class_names'])
    config = config_from_meta(meta, backbone)
    self.config = config
    model, plain = experiment.build_model(config, len(self.class_names), self.class_names)
    params = backbones.load_params(config.backbone, plain,
                                   rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    params = ckpt_lib.load_adapter(adapter_path, model, params)
    self._params = host_memory.to_device(params)  # Never both whole copies at once.
    self._logits = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False),
                           compiler_options=experiment.compiler_options(config))
    self._size = int(meta.get('image_size') or config.backbone.image_size)
    self._family = meta.get('preprocess') or config.get('preprocess', 'vit')
    self._crop = meta.get('eval_crop_fraction')

  def preprocess(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> the float image the model was evaluated on (resize, crop, normalise)."""
    return preprocess(pixels, self._size, self._family, self._crop)

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Preprocessed images (N, S, S, 3) -> class probabilities (N, C)."""
    return np.asarray(jax.nn.softmax(self._logits(self._params, images).astype(np.float32), -1))

  def predict(self, items: Sequence[str] | str, *, top_k: int = 5,
              batch_size: int = 32) -> list[Prediction]:
    """The top_k classes of every image in `items` (files and folders)."""
    if top_k < 1:
      raise ValueError(f'top_k must be >= 1; found {top_k}.')
    paths = image_paths([items] if isinstance(items, str) else list(items))
    k = min(top_k, len(self.class_names))
    out = []
    for start in range(0, len(paths), batch_size):
      chunk = paths[start:start + batch_size]
      images = np.stack([self.preprocess(_read_image(p)) for p in chunk])
      probs = self.probabilities(images)
      for path, p in zip(chunk, probs):
        order = np.argsort(-p, kind='stable')[:k]
        out.append(Prediction(path=path, top_k=tuple((self.class_names[i], float(p[i]))
                                                      for i in order)))
    return out


def predict(items: Sequence[str] | str, adapter_path: str, *, backbone: Optional[str] = None,
            top_k: int = 5) -> list[Prediction]:
  """Predictor(adapter_path, backbone).predict(items, top_k=top_k)."""
  return Predictor(adapter_path, backbone).predict(items, top_k=top_k)


def format_prediction(p: Prediction) -> str:
  where = p.path if p.task is None else f'{p.path} [{p.task}]'
  return f'{where}: ' + ', '.join(f'{name} {prob:.3f}' for name, prob in p.top_k)


def read_manifest(path: str) -> list[tuple[str, str]]:
  """(image file, task name) per request of a manifest: one 'IMAGE TASK' line each (the task is
  the last whitespace-separated field, so image paths may hold spaces); blank lines and lines
  starting with '#' are skipped; relative image paths are relative to the manifest's folder.
  Missing images and malformed lines are one-line errors naming the line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Manifest {path!r} does not exist.')
  root = os.path.dirname(os.path.abspath(path))
  requests = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      fields = line.rsplit(None, 1)
      if len(fields) != 2:
        raise ValueError(f'{path}:{number}: expected \'IMAGE TASK\'; found {line!r}.')
      image = os.path.join(root, fields[0])
      if not os.path.isfile(image):
        raise FileNotFoundError(f'{path}:{number}: image {fields[0]!r} does not exist.')
      requests.append((image, fields[1]))
  if not requests:
    raise ValueError(f'Manifest {path!r} holds no requests (lines \'IMAGE TASK\').')
  return requests


def predict_cli(config: Optional[ml_collections.ConfigDict], workdir: Optional[str],
                items: Sequence[str], *, adapter_path: Optional[str] = None,
                backbone: Optional[str] = None, top_k: int = 5) -> list[Prediction]:
  """--mode=predict: prints one line per image, 'path: class p, class p, ...'.

  The adapter is --adapter or WORKDIR/adapter.safetensors; the backbone is --backbone, else the
  config's backbone.checkpoint, else the path stored in the adapter file.
  """
  if adapter_path is None:
    adapter_path = os.path.join(workdir, 'adapter.safetensors')
    if not os.path.isfile(adapter_path):
      raise FileNotFoundError(f'No exported adapter at {adapter_path}: train first, or export '
                              'one (--mode=export), or pass --adapter=FILE.')
  if backbone is None and config is not None and config.backbone.checkpoint:
    backbone = config.backbone.checkpoint
  predictions = Predictor(adapter_path, backbone).predict(items, top_k=top_k)
  for p in predictions:
    metrics_lib.log(format_prediction(p))
  return predictions

