"""Builds the backbone module and its pre-trained parameters from `config.backbone`."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vadapt.models import vit
from vadapt.pretrained import common as pretrained_common

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
MODELS = ('vit',)


def compute_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; expected one of {sorted(_DTYPES)}.')
  return _DTYPES[name]


def make_model(cfg: ml_collections.ConfigDict, num_classes: Optional[int]) -> nn.Module:
  """The plain backbone (no adapters) with a `num_classes` head."""
  if cfg.model not in MODELS:
    raise ValueError(f'Unknown backbone model {cfg.model!r}; known: {MODELS}.')
  overrides = dict(cfg.overrides.to_dict()) if cfg.get('overrides') else {}
  return vit.from_variant(cfg.variant, num_classes=num_classes, dtype=compute_dtype(cfg.dtype),
                          dropout_rate=cfg.get('dropout_rate', 0.0),
                          remat=cfg.get('remat', False), **overrides)


def sample_images(cfg: ml_collections.ConfigDict, batch: int = 1) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)


def load_params(cfg: ml_collections.ConfigDict, model: nn.Module, *,
                rng: Optional[jax.Array] = None) -> dict[str, Any]:
  """Pre-trained backbone params (host numpy) from cfg.checkpoint, or a random init without one.

  The head is whatever the loader returns for `model` (replaced and zero-initialised when the
  checkpoint's class count differs).
  """
  if cfg.checkpoint:
    pretrained_common.require_file(cfg.checkpoint, 'backbone.checkpoint')
    from vadapt.pretrained import vit as vit_loader  # pylint: disable=g-import-not-at-top
    params = vit_loader.load(cfg.checkpoint, model, image_size=cfg.image_size,
                             format=cfg.checkpoint_format)
    params = jax.tree.map(np.asarray, params)
    if cfg.get('reset_head') and 'head' in params:
      params = {**params, 'head': jax.tree.map(np.zeros_like, params['head'])}
    return params
  rng = jax.random.PRNGKey(0) if rng is None else rng
  images = jnp.zeros(sample_images(cfg).shape, jnp.float32)
  params = jax.jit(lambda r: model.init(r, images, train=False)['params'])(rng)
  return jax.tree.map(np.asarray, params)
