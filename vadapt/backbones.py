"""Builds the backbone module and its pre-trained parameters from `config.backbone`.

Model families (`backbone.model`):
  'vit'   vadapt.models.vit with a `num_classes` head; checkpoint: vit_jax / big_vision .npz or
          Hugging Face .safetensors.
  'dinov2' vadapt.models.vit built by vit.dinov2 (`backbone.variant` 'S/14', 'B/14', 'L/14',
          'g/14', each also '-reg' with register tokens) with a `num_classes` head on the class
          token (`backbone.overrides.classifier='token_gap'` adds the mean patch token);
          checkpoint: Hugging Face Dinov2Model safetensors, an official .pth state dict or an
          ONNX export, the format detected from the file (vadapt.pretrained.dinov2). One set of
          weights serves any `image_size` that is a multiple of 14.
  'clip'  vadapt.models.clip_classifier.CLIPClassifier: CLIP (`backbone.variant` a CLIP config
          name such as 'ViT-B/16' or 'tiny') whose classifier is the zero-shot text-embedding
          matrix of the dataset's class names x prompt templates; checkpoint: Hugging Face
          safetensors (file or directory) or an OpenAI .pt file.
  'efficientnet_lite'  vadapt.models.efficientnet (`variant` 'lite0' ... 'lite4'); checkpoint: a
          PyTorch .pth or .safetensors in the lukemelas layout (vadapt.pretrained.efficientnet).
  'resnet'  vadapt.models.resnet (`variant` the depth: '18', '34', '50', '101', '152');
          checkpoint: torchvision/timm state dicts or Hugging Face ResNet safetensors
          (vadapt.pretrained.resnet).

CNN parameters come with their BatchNorm statistics under a top-level 'batch_stats' entry (see
vadapt.partition.to_variables). BatchNorm is frozen unless `train_batch_norm` is set.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vadapt.models import vit
from vadapt.pretrained import common as pretrained_common

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
MODELS = ('vit', 'dinov2', 'clip', 'efficientnet_lite', 'resnet')
CNN_MODELS = ('efficientnet_lite', 'resnet')


def compute_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; expected one of {sorted(_DTYPES)}.')
  return _DTYPES[name]


def architecture_overrides(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """cfg.overrides without its unset (None) fields: the values that replace the variant's."""
  given = cfg.get('overrides')
  return {k: v for k, v in given.to_dict().items() if v is not None} if given else {}


def make_model(cfg: ml_collections.ConfigDict, num_classes: Optional[int], *,
               class_names: Optional[Sequence[str]] = None,
               templates: Sequence[str] = ('a photo of a {}.',), recompute_text: bool = False,
               clip_adapter_ratio: Optional[float] = None,
               clip_adapter_reduction: int = 4) -> nn.Module:
  """The plain backbone (no adapters) with a `num_classes` head.

  For model='clip' the "head" is the zero-shot classifier built from `class_names` x `templates`;
  `recompute_text` recomputes it from the text tower in every call (adapters in the text tower),
  and `clip_adapter_ratio` adds a CLIP-Adapter on the image features.
  """
  if cfg.model not in MODELS:
    raise ValueError(f'Unknown backbone model {cfg.model!r}; known: {MODELS}.')
  if cfg.model == 'clip':
    return _make_clip(cfg, num_classes, class_names, templates, recompute_text,
                      clip_adapter_ratio, clip_adapter_reduction)
  if cfg.model in CNN_MODELS:
    return _make_cnn(cfg, num_classes)
  overrides = architecture_overrides(cfg)
  if cfg.model == 'dinov2':
    return _make_dinov2(cfg, num_classes, overrides)
  return vit.from_variant(cfg.variant, num_classes=num_classes, dtype=compute_dtype(cfg.dtype),
                          dropout_rate=cfg.get('dropout_rate', 0.0),
                          remat=cfg.get('remat', False),
                          remat_policy=cfg.get('remat_policy', 'nothing'),
                          recompute_activation=cfg.get('recompute_activation', False),
                          **overrides)


def _make_dinov2(cfg, num_classes, overrides):
  if cfg.image_size % vit.DINOV2_PATCH:
    raise ValueError(f'backbone.image_size={cfg.image_size} is not divisible by the DINOv2 patch '
                     f'size {vit.DINOV2_PATCH}: expected a multiple of {vit.DINOV2_PATCH}, e.g. '
                     f'{max(1, round(cfg.image_size / vit.DINOV2_PATCH)) * vit.DINOV2_PATCH}.')
  kwargs = vit.dinov2_config(cfg.variant)
  if cfg.checkpoint:  # How the file's own code resamples the position grid (from its format).
    from vadapt.pretrained import dinov2 as dinov2_loader  # pylint: disable=g-import-not-at-top
    fmt = (dinov2_loader.detect_format(cfg.checkpoint) if cfg.checkpoint_format == 'auto'
           else cfg.checkpoint_format)
    kwargs.update(dinov2_loader.interpolation(fmt, kwargs['num_registers'] > 0))
  kwargs.update(dtype=compute_dtype(cfg.dtype), dropout_rate=cfg.get('dropout_rate', 0.0),
                remat=cfg.get('remat', False), remat_policy=cfg.get('remat_policy', 'nothing'),
                recompute_activation=cfg.get('recompute_activation', False))
  return vit.dinov2(cfg.variant, num_classes=num_classes, **{**kwargs, **overrides})


def _make_cnn(cfg, num_classes):
  if cfg.get('recompute_activation'):
    raise ValueError('backbone.recompute_activation recomputes transformer MLP activations (vit, '
                     f'dinov2, clip); found backbone.model={cfg.model!r}. Set it to False.')
  overrides = architecture_overrides(cfg)
  common = dict(num_classes=num_classes, dtype=compute_dtype(cfg.dtype),
                freeze_batch_norm=not cfg.get('train_batch_norm', False))
  if cfg.model == 'efficientnet_lite':
    from vadapt.models import efficientnet  # pylint: disable=g-import-not-at-top
    model = efficientnet.from_variant(cfg.variant, **common, **overrides)
    if cfg.get('dropout_rate'):
      model = model.clone(dropout_rate=cfg.dropout_rate)
    return model
  from vadapt.models import resnet  # pylint: disable=g-import-not-at-top
  try:
    depth = int(cfg.variant)
  except ValueError:
    raise ValueError(f"backbone.variant for model='resnet' is the depth "
                     f'({", ".join(map(str, sorted(resnet.DEPTHS)))}); found {cfg.variant!r}.'
                     ) from None
  return resnet.from_depth(depth, **common, **overrides)


def _make_clip(cfg, num_classes, class_names, templates, recompute_text, ratio, reduction):
  from vadapt import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from vadapt.models import clip  # pylint: disable=g-import-not-at-top
  from vadapt.models import clip_classifier  # pylint: disable=g-import-not-at-top
  if class_names is None:
    raise ValueError("backbone.model='clip' needs the dataset's class names to build its "
                     'zero-shot classifier; found none.')
  if num_classes is not None and len(class_names) != num_classes:
    raise ValueError(f'{num_classes} classes but {len(class_names)} class names.')
  overrides = architecture_overrides(cfg)
  if cfg.variant in clip.CONFIGS and cfg.image_size != clip.CONFIGS[cfg.variant]['image_size']:
    overrides.setdefault('image_size', cfg.image_size)
  model = clip.from_config(cfg.variant, dtype=compute_dtype(cfg.dtype),
                           remat=cfg.get('remat', False),
                           recompute_activation=cfg.get('recompute_activation', False),
                           **overrides)
  tokens = clip_classifier.prompt_tokens(tokenizer_lib.default_tokenizer(), class_names,
                                         templates)
  return clip_classifier.CLIPClassifier(
      clip=model, class_tokens=tokens, recompute_text=recompute_text,
      clip_adapter_ratio=ratio, clip_adapter_reduction=reduction)


@functools.lru_cache(maxsize=1)
def _read_dinov2(path: str, size: int, mtime_ns: int, fmt: str):
  """The file read and converted once per process (the ONNX graph takes seconds): runs that
  share a backbone, such as the methods of --mode=compare, reuse it. Size and mtime key it."""
  del size, mtime_ns
  from vadapt.pretrained import dinov2 as dinov2_loader  # pylint: disable=g-import-not-at-top
  return dinov2_loader.read(path, format=fmt)


def sample_images(cfg: ml_collections.ConfigDict, batch: int = 1) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)


def load_params(cfg: ml_collections.ConfigDict, model: nn.Module, *,
                rng: Optional[jax.Array] = None) -> dict[str, Any]:
  """Pre-trained backbone params (host numpy) from cfg.checkpoint, or a random init without one.

  The head is whatever the loader returns for `model` (replaced and zero-initialised when the
  checkpoint's class count differs).
  """
  if cfg.checkpoint and cfg.model == 'clip':
    pretrained_common.require_file(cfg.checkpoint, 'backbone.checkpoint')
    from vadapt.pretrained import clip as clip_loader  # pylint: disable=g-import-not-at-top
    _, clip_params = clip_loader.load(cfg.checkpoint, model.clip)
    # Adds the frozen 'classifier' (computed from the loaded text tower) where the model holds one.
    images = jnp.zeros(sample_images(cfg).shape, jnp.float32)
    _, variables = jax.jit(lambda p: model.apply({'params': p}, images, mutable=['params']))(
        clip_params)
    return jax.tree.map(np.asarray, dict(variables['params']))
  if cfg.model in CNN_MODELS:
    return _load_cnn(cfg, model, rng)
  if cfg.checkpoint and cfg.model == 'dinov2':
    pretrained_common.require_file(cfg.checkpoint, 'backbone.checkpoint')
    from vadapt.pretrained import dinov2 as dinov2_loader  # pylint: disable=g-import-not-at-top
    stat = os.stat(cfg.checkpoint)
    ckpt = _read_dinov2(os.path.abspath(cfg.checkpoint), stat.st_size, stat.st_mtime_ns,
                        cfg.checkpoint_format)
    params = jax.tree.map(np.asarray, dinov2_loader.load(ckpt, model))
    if cfg.get('reset_head') and 'head' in params:
      params = {**params, 'head': jax.tree.map(np.zeros_like, params['head'])}
    return params
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


def _load_cnn(cfg, model, rng):
  """Params with BatchNorm statistics under 'batch_stats' (vadapt.partition.from_variables)."""
  from vadapt import partition  # pylint: disable=g-import-not-at-top
  if cfg.checkpoint:
    pretrained_common.require_file(cfg.checkpoint, 'backbone.checkpoint')
    if cfg.model == 'efficientnet_lite':
      from vadapt.pretrained import efficientnet as loader  # pylint: disable=g-import-not-at-top
    else:
      from vadapt.pretrained import resnet as loader  # pylint: disable=g-import-not-at-top
    variables = loader.load(cfg.checkpoint, model, image_size=cfg.image_size)
    if cfg.get('reset_head') and 'head' in variables['params']:
      variables['params']['head'] = jax.tree.map(np.zeros_like, variables['params']['head'])
  else:
    variables = _host_init(model, cfg, rng)
  return jax.tree.map(np.asarray, partition.from_variables(variables))


def _host_init(model, cfg, rng):
  """A random CNN drawn on the host: LeCun-normal kernels, zero biases and means, unit scales and
  variances. (Compiling a deep CNN's init, one random initialiser per layer, costs tens of seconds
  on a CPU; a random backbone only serves tests and smoke runs.)"""
  images = jnp.zeros(sample_images(cfg).shape, jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  seed = 0 if rng is None else int(jax.random.randint(rng, (), 0, 2**31 - 1))
  gen = np.random.default_rng(seed)

  def draw(path, s):
    leaf = str(path[-1].key)
    if leaf == 'kernel':
      return (gen.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
    return (np.ones if leaf in ('scale', 'var') else np.zeros)(s.shape, s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)
