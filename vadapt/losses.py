"""Loss functions shared by the train and eval steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy (B,) with label smoothing."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
