"""Per-family image preprocessing in TensorFlow: normalisation, train augmentation, eval resizing.

All randomness is stateless and seeded by the caller, so an example's augmentation is a function of
(seed, global position) alone; that is what lets the train stream resume bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Family:
  """How a backbone family expects its pixels.

  Attributes:
    mean: per-channel mean of [0, 1] pixels.
    std: per-channel std of [0, 1] pixels.
    resize_method: tf.image.resize method.
    eval_crop_fraction: eval resizes the short side to size / fraction, then center-crops size.
  """
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resize_method: str
  eval_crop_fraction: float


FAMILIES: dict[str, Family] = {
    # vit_jax / big_vision: pixels in [-1, 1].
    'vit': Family((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 'bilinear', 0.875),
    # OpenAI CLIP: bicubic resize of the short side to the model size, then a center crop.
    'clip': Family((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                   'bicubic', 1.0),
    # torchvision-style ResNets.
    'imagenet': Family((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 'bilinear', 0.875),
    # TF EfficientNet-Lite: (x - 127) / 128 on uint8 pixels.
    'efficientnet_lite': Family((127 / 255,) * 3, (128 / 255,) * 3, 'bilinear', 0.875),
}


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f'Unknown preprocess family {name!r}; known: {sorted(FAMILIES)}.')
  return FAMILIES[name]


def normalize(image: tf.Tensor, family: Family) -> tf.Tensor:
  """uint8-range pixels (any float) -> float32 normalised for ``family``."""
  # Resizing (bicubic in particular) overshoots the pixel range; clip before normalising.
  image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0) / 255.0
  return (image - tf.constant(family.mean)) / tf.constant(family.std)


def train_preprocess(image: tf.Tensor, seed: tf.Tensor, size: int, family: Family,
                     crop_scale: Optional[Sequence[float]] = (0.08, 1.0),
                     flip: bool = True) -> tf.Tensor:
  """Random resized crop + optional horizontal flip, seeded. (H, W, 3) uint8 -> (size, size, 3) f32.

  ``crop_scale=None`` skips the crop (plain resize), e.g. for 8x8 digits.
  """
  if crop_scale is not None and not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
    raise ValueError(f'crop_scale must be (min, max) area fractions with 0 < min <= max <= 1, '
                     f'got {tuple(crop_scale)}.')
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if crop_scale is not None:
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=crop_seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=tuple(crop_scale), max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, crop_size)
  image = tf.image.resize(image, (size, size), method=family.resize_method, antialias=True)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return normalize(image, family)


def eval_preprocess(image: tf.Tensor, size: int, family: Family,
                    crop_fraction: Optional[float] = None) -> tf.Tensor:
  """Resize the short side to size / crop_fraction and center-crop; images smaller than ``size``
  (CIFAR, digits) are resized whole, since cropping them would throw away real content."""
  crop_fraction = family.eval_crop_fraction if crop_fraction is None else crop_fraction
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f'eval crop fraction must lie in (0, 1], got {crop_fraction}.')
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  short = tf.minimum(h, w)

  def plain():
    return tf.image.resize(image, (size, size), method=family.resize_method, antialias=True)

  def resize_and_crop():
    scale = tf.math.ceil(size / crop_fraction) / short
    new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), size)
    new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), size)
    resized = tf.image.resize(image, (new_h, new_w), method=family.resize_method, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return tf.image.crop_to_bounding_box(resized, top, left, size, size)

  image = tf.cond(short < size, plain, resize_and_crop)
  return normalize(tf.ensure_shape(image, (size, size, 3)), family)
