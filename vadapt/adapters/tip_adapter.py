"""Tip-Adapter and Tip-Adapter-F (Zhang et al., 2022): a few-shot key-value cache next to CLIP.

With L2-normalised test features f (N, E), cache keys F (NK, E) (normalised few-shot image
features) and values L (NK, C) (one-hot labels):

  A = exp(-beta * (1 - f @ F.T))                      (N, NK) affinities
  logits = exp(logit_scale) * f @ W  +  alpha * A @ L

W is the zero-shot classifier (E, C). As in the authors' code, only CLIP's term is multiplied by
the logit scale (100 for OpenAI's models), the cache term is not. Tip-Adapter is training-free;
Tip-Adapter-F makes the keys F trainable (initialised from the cache) with values, classifier
and CLIP frozen. alpha = 0 gives zero-shot logits exactly.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vadapt import zeroshot
from vadapt.models.clip import l2_normalize

Dtype = Any


@flax.struct.dataclass
class Cache:
  """A few-shot cache.

  Attributes:
    keys: (NK, E) L2-normalised image features.
    values: (NK, C) one-hot labels.
  """
  keys: jax.Array
  values: jax.Array


def build_cache(features: np.ndarray, labels: np.ndarray, *, shots: Optional[int] = None,
                num_classes: Optional[int] = None, seed: int = 0) -> Cache:
  """Builds the cache from CLIP image features and integer labels.

  Args:
    features: (N, E), or (V, N, E) for V augmented views, averaged as in the paper.
    labels: (N,) integer labels.
    shots: keep this many examples per class, drawn without replacement with `seed`; None
      keeps all.
    num_classes: C (default: max label + 1).
    seed: sampling seed.
  Returns:
    A Cache with keys sorted by class.
  """
  features = np.asarray(features, np.float32)
  if features.ndim == 3:
    features = features.mean(axis=0)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(f'Expected features (N, E) or (V, N, E) and labels (N,); found '
                     f'{features.shape} and {labels.shape}.')
  if len(labels) == 0:
    raise ValueError('Cannot build a cache from zero examples.')
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f'Labels must lie in [0, {num_classes}); found [{labels.min()}, '
                     f'{labels.max()}].')
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if shots is not None:
      if len(idx) < shots:
        raise ValueError(f'Class {c} has {len(idx)} examples, fewer than shots={shots}.')
      idx = np.sort(rng.choice(idx, size=shots, replace=False))
    chosen.append(idx)
  chosen = np.concatenate(chosen)
  keys = l2_normalize(jnp.asarray(features[chosen]))
  values = jax.nn.one_hot(labels[chosen], num_classes, dtype=keys.dtype)
  return Cache(keys=keys, values=values)


def cache_logits(image_features: jax.Array, keys: jax.Array, values: jax.Array,
                 beta: float) -> jax.Array:
  """exp(-beta (1 - normalize(f) @ keys.T)) @ values -> (N, C)."""
  affinity = l2_normalize(image_features) @ keys.T.astype(image_features.dtype)
  return jnp.exp(-beta * (1.0 - affinity)) @ values.astype(image_features.dtype)


def tip_adapter_logits(image_features: jax.Array, classifier: jax.Array, logit_scale: jax.Array,
                       cache: Cache, *, alpha: float = 1.0, beta: float = 1.0) -> jax.Array:
  """Training-free Tip-Adapter logits (N, C) for features (N, E) and classifier (E, C)."""
  clip_logits = zeroshot.zero_shot_logits(image_features, classifier, logit_scale)
  return clip_logits + alpha * cache_logits(image_features, cache.keys, cache.values, beta)


def search_hyperparameters(image_features: jax.Array, labels: np.ndarray, classifier: jax.Array,
                           logit_scale: jax.Array, cache: Cache, *,
                           alphas: Sequence[float] = tuple(np.linspace(0.0, 5.0, 11)),
                           betas: Sequence[float] = tuple(np.linspace(0.5, 10.0, 20)),
                           ) -> tuple[float, float, float]:
  """Grid search of (alpha, beta) by accuracy on held-out features, as the paper does on a
  validation split. Returns (best_alpha, best_beta, best_accuracy); ties go to the first pair
  in grid order (smallest alpha, then smallest beta)."""
  labels = np.asarray(labels)
  clip_logits = zeroshot.zero_shot_logits(image_features, classifier, logit_scale)
  best = (0.0, float(betas[0]), -1.0)
  for beta in betas:
    cached = cache_logits(image_features, cache.keys, cache.values, float(beta))
    for alpha in alphas:
      acc = float(np.mean(np.argmax(clip_logits + alpha * cached, axis=1) == labels))
      if acc > best[2] or (acc == best[2] and (alpha, beta) < best[:2]):
        best = (float(alpha), float(beta), acc)
  return best


class TipAdapterF(nn.Module):
  """Tip-Adapter-F: the cache keys are a trainable parameter ``cache_keys`` (NK, E).

  ``init`` copies the given cache's keys into the parameter, so the module starts as the
  training-free Tip-Adapter; ``apply`` uses the parameter and the cache's (frozen) values.

  Attributes:
    alpha: weight of the cache logits.
    beta: sharpness of the affinities.
    param_dtype: dtype of the keys parameter.
  """
  alpha: float = 1.0
  beta: float = 1.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_features: jax.Array, classifier: jax.Array, logit_scale: jax.Array,
               cache: Cache) -> jax.Array:
    keys = self.param('cache_keys', lambda _: jnp.asarray(cache.keys, self.param_dtype))
    if keys.shape != cache.keys.shape:
      raise ValueError(f'Trained keys have shape {tuple(keys.shape)} but the cache holds '
                       f'{tuple(cache.keys.shape)}: use the cache the keys were trained from.')
    clip_logits = zeroshot.zero_shot_logits(image_features, classifier, logit_scale)
    return clip_logits + self.alpha * cache_logits(image_features, keys, cache.values, self.beta)
