"""CLIP-Adapter (Gao et al., 2021): a residual bottleneck MLP on CLIP's output features.

  f' = ratio * A(f) + (1 - ratio) * f,    A = ReLU(ReLU(f @ W1) @ W2),  W1: (E, E/4), W2: (E/4, E)
  logits = exp(logit_scale) * normalize(f') @ classifier

as in the authors' code (two bias-free Linear layers, each followed by ReLU, reduction 4, residual
ratio 0.2 for images). The classifier is the frozen zero-shot text matrix (E, C) from
``vadapt.zeroshot.zero_shot_classifier``; the text-side adapter (``adapt_text``) blends the class
embeddings the same way and normalises them again. CLIP itself stays frozen: only the adapters'
params are trained, and they operate on precomputed or freshly computed CLIP features.
With ratio = 0 and no text adapter the logits equal zero-shot logits exactly; with the text
adapter at text_ratio = 0 they differ only by the rounding of normalising the classifier again.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt import zeroshot
from vadapt.models.clip import l2_normalize

Dtype = Any


class FeatureAdapter(nn.Module):
  """Bias-free bottleneck MLP with ReLUs: (..., E) -> (..., E).

  Attributes:
    reduction: hidden width = E // reduction.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  reduction: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    if width // self.reduction < 1:
      raise ValueError(f'Feature width {width} is smaller than the reduction {self.reduction}.')
    dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    x = nn.relu(dense(width // self.reduction, 'down')(x))
    return nn.relu(dense(width, 'up')(x))


def blend(features: jax.Array, adapted: jax.Array, ratio: float) -> jax.Array:
  """ratio * adapted + (1 - ratio) * features; ratio = 0 returns features bit for bit."""
  return ratio * adapted + (1.0 - ratio) * features


class CLIPAdapter(nn.Module):
  """Classifier on CLIP features with feature adapters; params live under image_adapter/ (and
  text_adapter/ when adapt_text).

  Attributes:
    ratio: residual ratio alpha for image features (the paper's default for few-shot: 0.2).
    reduction: bottleneck reduction.
    adapt_image: put an adapter on the image features.
    adapt_text: put an adapter on the class (text) embeddings too.
    text_ratio: residual ratio for the text adapter.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  ratio: float = 0.2
  reduction: int = 4
  adapt_image: bool = True
  adapt_text: bool = False
  text_ratio: float = 0.2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_features: jax.Array, classifier: jax.Array,
               logit_scale: jax.Array) -> jax.Array:
    """Image features (N, E), classifier (E, C), CLIP's logit_scale param -> logits (N, C)."""
    if image_features.ndim != 2 or classifier.ndim != 2 or (
        image_features.shape[1] != classifier.shape[0]):
      raise ValueError(f'Expected image features (N, E) and a classifier (E, C); found '
                       f'{tuple(image_features.shape)} and {tuple(classifier.shape)}.')
    adapter = lambda name: FeatureAdapter(self.reduction, dtype=self.dtype,
                                          param_dtype=self.param_dtype, name=name)
    if self.adapt_image:
      image_features = blend(image_features, adapter('image_adapter')(image_features), self.ratio)
    if self.adapt_text:
      text = classifier.T
      classifier = l2_normalize(blend(text, adapter('text_adapter')(text), self.text_ratio)).T
    return zeroshot.zero_shot_logits(image_features, classifier, logit_scale)
