"""CLIP (Radford et al., 2021) in compact Flax linen: a ViT image tower and a causal text tower.

Both towers are stacks of ``vadapt.models.vit.Encoder1DBlock`` (QuickGELU, LayerNorm eps 1e-5,
causal mask in the text tower), so adapters find the same module names as in a ViT.

Parameter layout (what OpenAI and Hugging Face checkpoints are mapped onto)::

  vision/embedding/kernel                          (p, p, C, W) patch conv, no bias
  vision/class_embedding                           (W,)
  vision/positional_embedding                      (1 + N, W)
  vision/ln_pre/{scale,bias}
  vision/Transformer/encoderblock_{i}/LayerNorm_0
  vision/Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}
  vision/Transformer/encoderblock_{i}/LayerNorm_1
  vision/Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}
  vision/ln_post/{scale,bias}                      applied to the class token only
  vision/proj                                      (W, E), used as x @ proj (OpenAI's layout)
  text/token_embedding/embedding                   (V, W')
  text/positional_embedding                        (context_length, W')
  text/Transformer/encoderblock_{i}/...            as above, with a causal mask
  text/ln_final/{scale,bias}
  text/proj                                        (W', E)
  logit_scale                                      () log of the softmax temperature's inverse

Text features are read at the end-of-text position. With ``eos_token_id=None`` (the default) that
position is the argmax of the token ids, as in OpenAI CLIP, where end-of-text has the largest id
(49407); Hugging Face does the same when its config says ``eos_token_id == 2`` (the value in the
released openai/clip-* configs). With an integer ``eos_token_id`` the first position holding that id
is used, which is what Hugging Face does for any other ``eos_token_id`` (e.g. today's
``CLIPTextConfig()`` default, 49407). For ids produced by the CLIP tokenizer both rules pick the
same position.

Images are (B, H, W, C), already resized and normalised with ``IMAGE_MEAN`` / ``IMAGE_STD``.
The module holds no adapter code: adapters are injected from outside by interception.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vadapt.models.vit import Encoder1DBlock

Dtype = Any

# OpenAI's preprocessing statistics (RGB, images scaled to [0, 1] first).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_images(images: jax.Array) -> jax.Array:
  """Maps RGB images in [0, 1], shape (..., 3), to CLIP's normalised input."""
  mean = jnp.asarray(IMAGE_MEAN, images.dtype)
  std = jnp.asarray(IMAGE_STD, images.dtype)
  return (images - mean) / std


class Transformer(nn.Module):
  """A stack of pre-LN Encoder1DBlocks named ``encoderblock_{i}`` (no final norm).

  Attributes:
    num_layers: depth.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    causal: causal self-attention (text tower).
    activation: MLP activation name.
    layer_norm_epsilon: LayerNorm epsilon.
    remat: rematerialise each block in the backward pass.
    recompute_activation: recompute each MLP activation in the backward pass.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  activation: str = 'quick_gelu'
  layer_norm_epsilon: float = 1e-5
  remat: bool = False
  recompute_activation: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
    for i in range(self.num_layers):
      x = block_cls(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, activation=self.activation,
          layer_norm_epsilon=self.layer_norm_epsilon, causal=self.causal,
          recompute_activation=self.recompute_activation, dtype=self.dtype,
          param_dtype=self.param_dtype, name=f'encoderblock_{i}')(x, not train)
    return x


class VisionTower(nn.Module):
  """CLIP's ViT image encoder: images (B, H, W, C) -> projected features (B, E).

  Attributes:
    embed_dim: joint embedding width E.
    image_size: square input side in pixels (the position embedding is built for it).
    patch_size: square patch side.
    width: token width W.
    num_layers: depth.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    channels: input channels.
    activation: MLP activation name.
    layer_norm_epsilon: LayerNorm epsilon.
    remat: rematerialise blocks.
    recompute_activation: recompute each MLP activation in the backward pass.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  embed_dim: int
  image_size: int
  patch_size: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  channels: int = 3
  activation: str = 'quick_gelu'
  layer_norm_epsilon: float = 1e-5
  remat: bool = False
  recompute_activation: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    expected = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f'CLIP image tower expects images of shape (batch, {self.image_size}, '
          f'{self.image_size}, {self.channels}); found shape {tuple(images.shape)}. Resize '
          'images to the size the model was built for (channels last).')
    scale = self.width ** -0.5
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding='VALID', use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name='embedding',
                )(images.astype(self.dtype))
    n, gh, gw, w = x.shape
    x = jnp.reshape(x, (n, gh * gw, w))
    cls = self.param('class_embedding', nn.initializers.normal(scale), (w,), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (n, 1, w))
    x = jnp.concatenate([cls, x], axis=1)
    pos = self.param('positional_embedding', nn.initializers.normal(scale),
                     (gh * gw + 1, w), self.param_dtype)
    x = x + pos.astype(x.dtype)
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    x = norm('ln_pre')(x)
    x = Transformer(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
        remat=self.remat, recompute_activation=self.recompute_activation,
        dtype=self.dtype, param_dtype=self.param_dtype, name='Transformer',
    )(x, train=train)
    x = norm('ln_post')(x[:, 0])
    proj = self.param('proj', nn.initializers.normal(scale), (w, self.embed_dim),
                      self.param_dtype)
    return x @ proj.astype(x.dtype)


class TextTower(nn.Module):
  """CLIP's causal text encoder: token ids (B, L) -> projected features (B, E).

  Attributes:
    embed_dim: joint embedding width E.
    vocab_size: vocabulary size.
    context_length: the longest sequence (position embedding rows).
    width: token width.
    num_layers: depth.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    eos_token_id: None reads features at argmax(token_ids) (OpenAI); an id reads them at the
      first occurrence of that id (Hugging Face with eos_token_id != 2).
    activation: MLP activation name.
    layer_norm_epsilon: LayerNorm epsilon.
    remat: rematerialise blocks.
    recompute_activation: recompute each MLP activation in the backward pass.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  embed_dim: int
  vocab_size: int
  context_length: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  eos_token_id: Optional[int] = None
  activation: str = 'quick_gelu'
  layer_norm_epsilon: float = 1e-5
  remat: bool = False
  recompute_activation: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, token_ids: jax.Array, *, train: bool = False) -> jax.Array:
    if token_ids.ndim != 2:
      raise ValueError(f'CLIP text tower expects token ids of shape (batch, length); found '
                       f'shape {tuple(token_ids.shape)}.')
    length = token_ids.shape[1]
    if length > self.context_length:
      raise ValueError(
          f'Token sequences of length {length} exceed the context length '
          f'{self.context_length}: tokenize with vadapt.tokenizer (which truncates to the '
          'context) or shorten the text.')
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 dtype=self.dtype, param_dtype=self.param_dtype, name='token_embedding',
                 )(token_ids)
    pos = self.param('positional_embedding', nn.initializers.normal(0.01),
                     (self.context_length, self.width), self.param_dtype)
    # Shorter sequences use the leading positions, as Hugging Face's position_ids do.
    x = x + pos[:length].astype(x.dtype)
    x = Transformer(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        causal=True, activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
        remat=self.remat, recompute_activation=self.recompute_activation,
        dtype=self.dtype, param_dtype=self.param_dtype, name='Transformer',
    )(x, train=train)
    x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='ln_final')(x)
    if self.eos_token_id is None:
      eot = jnp.argmax(token_ids, axis=-1)
    else:
      eot = jnp.argmax(token_ids == self.eos_token_id, axis=-1)
    x = x[jnp.arange(x.shape[0]), eot]
    proj = self.param('proj', nn.initializers.normal(self.width ** -0.5),
                      (self.width, self.embed_dim), self.param_dtype)
    return x @ proj.astype(x.dtype)


class CLIP(nn.Module):
  """CLIP with both towers; see the module docstring for the parameter layout.

  Attributes:
    embed_dim: joint embedding width.
    image_size: input image side.
    patch_size: vision patch side.
    vision_width: vision token width.
    vision_layers: vision depth.
    vision_heads: vision attention heads.
    context_length: text context (77 for OpenAI CLIP).
    vocab_size: text vocabulary size.
    text_width: text token width.
    text_layers: text depth.
    text_heads: text attention heads.
    vision_mlp_dim: vision MLP width (None: 4 x vision_width).
    text_mlp_dim: text MLP width (None: 4 x text_width).
    eos_token_id: text pooling rule, see the module docstring (None = argmax of ids).
    channels: image channels.
    activation: MLP activation ('quick_gelu' for OpenAI CLIP; 'gelu_exact' for checkpoints whose
      Hugging Face config says hidden_act='gelu').
    layer_norm_epsilon: LayerNorm epsilon.
    logit_scale_init: initial logit_scale (log(1 / 0.07)).
    remat: rematerialise blocks.
    recompute_activation: recompute each MLP activation in the backward pass.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  context_length: int
  vocab_size: int
  text_width: int
  text_layers: int
  text_heads: int
  vision_mlp_dim: Optional[int] = None
  text_mlp_dim: Optional[int] = None
  eos_token_id: Optional[int] = None
  channels: int = 3
  activation: str = 'quick_gelu'
  layer_norm_epsilon: float = 1e-5
  logit_scale_init: float = math.log(1 / 0.07)
  remat: bool = False
  recompute_activation: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    common = dict(activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
                  remat=self.remat, recompute_activation=self.recompute_activation,
                  dtype=self.dtype, param_dtype=self.param_dtype)
    self.vision = VisionTower(
        embed_dim=self.embed_dim, image_size=self.image_size, patch_size=self.patch_size,
        width=self.vision_width, num_layers=self.vision_layers, num_heads=self.vision_heads,
        mlp_dim=self.vision_mlp_dim or 4 * self.vision_width, channels=self.channels, **common)
    self.text = TextTower(
        embed_dim=self.embed_dim, vocab_size=self.vocab_size,
        context_length=self.context_length, width=self.text_width,
        num_layers=self.text_layers, num_heads=self.text_heads,
        mlp_dim=self.text_mlp_dim or 4 * self.text_width, eos_token_id=self.eos_token_id,
        **common)
    self.logit_scale = self.param('logit_scale', nn.initializers.constant(self.logit_scale_init),
                                  (), self.param_dtype)

  def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Images (B, H, W, C) -> unnormalised image embeddings (B, E)."""
    return self.vision(images, train=train)

  def encode_text(self, token_ids: jax.Array, *, train: bool = False) -> jax.Array:
    """Token ids (B, L), L <= context_length -> unnormalised text embeddings (B, E)."""
    return self.text(token_ids, train=train)

  def __call__(self, images: jax.Array, token_ids: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img))."""
    image = l2_normalize(self.encode_image(images, train=train))
    text = l2_normalize(self.encode_text(token_ids, train=train))
    logits_per_image = jnp.exp(self.logit_scale).astype(image.dtype) * image @ text.T
    return logits_per_image, logits_per_image.T


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x|| along `axis` (CLIP's feature normalisation)."""
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


_OPENAI_TEXT = dict(context_length=77, vocab_size=49408)

# OpenAI's released ViT models. Heads are width // 64 throughout, as in OpenAI's build_model.
CONFIGS: dict[str, dict[str, Any]] = {
    'ViT-B/32': dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768,
                     vision_layers=12, vision_heads=12, text_width=512, text_layers=12,
                     text_heads=8, **_OPENAI_TEXT),
    'ViT-B/16': dict(embed_dim=512, image_size=224, patch_size=16, vision_width=768,
                     vision_layers=12, vision_heads=12, text_width=512, text_layers=12,
                     text_heads=8, **_OPENAI_TEXT),
    'ViT-L/14': dict(embed_dim=768, image_size=224, patch_size=14, vision_width=1024,
                     vision_layers=24, vision_heads=16, text_width=768, text_layers=12,
                     text_heads=12, **_OPENAI_TEXT),
    'ViT-L/14@336px': dict(embed_dim=768, image_size=336, patch_size=14, vision_width=1024,
                           vision_layers=24, vision_heads=16, text_width=768, text_layers=12,
                           text_heads=12, **_OPENAI_TEXT),
    # A tiny model for tests and CPU smoke runs (real vocabulary and context, so the
    # tokenizer's output fits); not a published model.
    'tiny': dict(embed_dim=32, image_size=32, patch_size=8, vision_width=32, vision_layers=2,
                 vision_heads=2, text_width=32, text_layers=2, text_heads=2, **_OPENAI_TEXT),
}
CONFIGS['ViT-L/14@336'] = CONFIGS['ViT-L/14@336px']


def from_config(name: str, **overrides) -> CLIP:
  """Builds a CLIP by config name, e.g. from_config('ViT-B/32', dtype=jnp.bfloat16)."""
  if name not in CONFIGS:
    raise ValueError(f'Unknown CLIP config {name!r}; known: {", ".join(CONFIGS)}.')
  known = {f.name for f in dataclasses.fields(CLIP)} - {'parent', 'name'}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise TypeError(f'Unknown CLIP options {unknown}; known: {sorted(known)}.')
  return CLIP(**{**CONFIGS[name], **overrides})


def dummy_inputs(model: CLIP, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Zero images and token ids of the shapes `model` expects (for init / eval_shape)."""
  images = np.zeros((batch, model.image_size, model.image_size, model.channels), np.float32)
  return images, np.zeros((batch, model.context_length), np.int32)
