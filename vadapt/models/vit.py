"""Vision Transformer in compact Flax linen, with vit_jax / big_vision parameter names.

Parameter layout (what checkpoints are mapped onto)::

  embedding/{kernel,bias}                      conv patch embedding, kernel (p, p, C, D)
  cls                                          (1, 1, D) class token, classifier == 'token'
  Transformer/posembed_input/pos_embedding     (1, N[+1], D)
  Transformer/encoderblock_{i}/LayerNorm_0
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/kernel (D, H, D/H)
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/kernel               (H, D/H, D)
  Transformer/encoderblock_{i}/LayerNorm_1
  Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}
  Transformer/encoder_norm
  MAPHead_0/...                                classifier == 'map'
  pre_logits/{kernel,bias}                     representation_size is not None
  head/{kernel,bias}                           num_classes is not None

With ``scan=True`` the blocks live at ``Transformer/encoderblock/...`` with a leading depth axis
(big_vision's scan layout).

The module holds no adapter code: adapters are added from outside by ``vadapt.inject``. Every
module that adapters may target (``MultiHeadDotProductAttention_0``, ``MlpBlock_0``, the blocks) is
written in compact style, which interception needs in order to create parameters.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt.layers import get_activation

Dtype = Any

CLASSIFIERS = ('token', 'gap', 'map')

# What a rematerialised block keeps for the backward pass. 'nothing': only the block's input (least
# memory, one extra forward pass). 'dots': also the outputs of its Dense projections (q, k, v,
# out, MLP), so the backward pass recomputes only attention scores and element-wise work; with a
# frozen backbone this keeps most of remat's saving at a fraction of its compute.
REMAT_POLICIES = {
    'nothing': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def get_remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)}.')
  return REMAT_POLICIES[name]


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> activation -> dropout -> Dense -> dropout.

  Attributes:
    mlp_dim: hidden width.
    out_dim: output width (defaults to the input width).
    activation: a name in vadapt.layers.ACTIVATIONS.
    dropout_rate: dropout after each Dense.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  mlp_dim: int
  out_dim: Optional[int] = None
  activation: str = 'gelu'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool = True) -> jax.Array:
    out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    x = dense(self.mlp_dim, 'Dense_0')(inputs)
    x = get_activation(self.activation)(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, 'Dense_1')(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block, shared by ViT and both CLIP towers.

  Attributes:
    mlp_dim: MLP hidden width.
    num_heads: attention heads.
    activation: MLP activation name ('gelu', 'gelu_exact', 'quick_gelu').
    layer_norm_epsilon: 1e-6 for vit_jax/big_vision, 1e-5 for CLIP, 1e-12 for HF ViT defaults.
    causal: apply a causal attention mask (CLIP's text tower).
    dropout_rate: dropout after attention and in the MLP.
    attention_dropout_rate: dropout on attention weights.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  mlp_dim: int
  num_heads: int
  activation: str = 'gelu'
  layer_norm_epsilon: float = 1e-6
  causal: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool = True) -> jax.Array:
    norm = lambda name: nn.LayerNorm(
        epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    mask = nn.make_causal_mask(jnp.ones(inputs.shape[:2], jnp.int32)) if self.causal else None

    x = norm('LayerNorm_0')(inputs)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), broadcast_dropout=False,
        dropout_rate=self.attention_dropout_rate, name='MultiHeadDotProductAttention_0',
    )(x, x, mask=mask, deterministic=deterministic)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = x + inputs

    y = norm('LayerNorm_1')(x)
    y = MlpBlock(
        mlp_dim=self.mlp_dim, activation=self.activation, dropout_rate=self.dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype, name='MlpBlock_0',
    )(y, deterministic=deterministic)
    return x + y


class _ScanEncoder1DBlock(Encoder1DBlock):
  """The same block with nn.scan's (carry, xs) -> (carry, ys) signature; ys are block outputs."""

  def __call__(self, inputs, deterministic=True):  # pytype: disable=signature-mismatch
    x = super().__call__(inputs, deterministic)
    return x, x


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding of shape (1, tokens, width).

  Attributes:
    param_dtype: parameter dtype.
  """
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    shape = (1, inputs.shape[1], inputs.shape[2])
    if self.has_variable('params', 'pos_embedding'):
      stored = self.get_variable('params', 'pos_embedding').shape
      if tuple(stored) != shape:
        raise ValueError(
            f'The input gives {inputs.shape[1]} tokens but the position embedding holds '
            f'{stored[1]} (shape {tuple(stored)}): feed images of the size the model was built '
            'for, or load the checkpoint with vadapt.pretrained.vit.resize_posemb for the new size.')
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
    return inputs + pe.astype(inputs.dtype)


class Encoder(nn.Module):
  """Position embedding, a stack of Encoder1DBlocks and a final LayerNorm.

  Attributes:
    num_layers: depth.
    mlp_dim: MLP hidden width.
    num_heads: attention heads.
    activation: MLP activation name.
    layer_norm_epsilon: LayerNorm epsilon.
    posemb_includes_cls: vit_jax adds the position embedding after the class token is prepended
      (N + 1 positions); big_vision adds it to the patches only (N positions).
    dropout_rate: dropout rate.
    attention_dropout_rate: attention dropout rate.
    scan: run the blocks under nn.scan (params stacked on a leading depth axis).
    remat: rematerialise each block in the backward pass.
    remat_policy: what a rematerialised block saves, a name in REMAT_POLICIES.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  activation: str = 'gelu'
  layer_norm_epsilon: float = 1e-6
  posemb_includes_cls: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  scan: bool = False
  remat: bool = False
  remat_policy: str = 'nothing'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, cls_token: Optional[jax.Array] = None,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (encoded (B, T, D), per-block outputs (depth, B, T, D))."""
    if cls_token is not None and self.posemb_includes_cls:
      x = jnp.concatenate([cls_token, x], axis=1)
    x = AddPositionEmbs(param_dtype=self.param_dtype, name='posembed_input')(x)
    if cls_token is not None and not self.posemb_includes_cls:
      x = jnp.concatenate([cls_token, x], axis=1)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    block_kwargs = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, activation=self.activation,
        layer_norm_epsilon=self.layer_norm_epsilon, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype)
    if self.scan:
      block_cls = _ScanEncoder1DBlock
      if self.remat:
        block_cls = nn.remat(block_cls, prevent_cse=False, static_argnums=(2,),
                             policy=get_remat_policy(self.remat_policy))
      x, blocks = nn.scan(
          block_cls, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=nn.broadcast, length=self.num_layers,
      )(name='encoderblock', **block_kwargs)(x, not train)
    else:
      block_cls = (nn.remat(Encoder1DBlock, static_argnums=(2,),
                            policy=get_remat_policy(self.remat_policy))
                   if self.remat else Encoder1DBlock)
      outputs = []
      for i in range(self.num_layers):
        x = block_cls(name=f'encoderblock_{i}', **block_kwargs)(x, not train)
        outputs.append(x)
      blocks = jnp.stack(outputs)
    encoded = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='encoder_norm')(x)
    return encoded, blocks


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): one learned probe attends over the tokens.

  Attributes:
    num_heads: attention heads.
    mlp_dim: MLP hidden width (defaults to 4 x width).
    layer_norm_epsilon: LayerNorm epsilon.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  num_heads: int
  mlp_dim: Optional[int] = None
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe.astype(x.dtype), [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name='MultiHeadDotProductAttention_0',
    )(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim or 4 * d, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='MlpBlock_0')(y)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier (Dosovitskiy et al., 2021) with vit_jax / big_vision names.

  Attributes:
    num_classes: head width; None returns the pre-logits features instead of logits.
    patch_size: square patch side in pixels.
    hidden_size: token width D.
    num_layers: depth.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    classifier: 'token' (class token), 'gap' (mean over patches) or 'map' (attention pooling).
    representation_size: width of the tanh pre-logits layer; None for no such layer.
    posemb_includes_cls: True for vit_jax checkpoints (class token has a position), False for
      big_vision ones.
    activation: MLP activation ('gelu' = tanh approximation as trained by vit_jax/big_vision,
      'gelu_exact' as in Hugging Face, 'quick_gelu' as in CLIP).
    layer_norm_epsilon: LayerNorm epsilon.
    channels: input channels (checked at call time).
    dropout_rate: dropout rate.
    attention_dropout_rate: attention dropout rate.
    scan: nn.scan over blocks (stacked params).
    remat: rematerialise blocks.
    remat_policy: what rematerialised blocks save ('nothing' or 'dots', see REMAT_POLICIES).
    head_bias_init: initial head bias (vit_jax uses 0; big_vision sometimes -6.9 for sigmoid).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  num_classes: Optional[int]
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = 'token'
  representation_size: Optional[int] = None
  posemb_includes_cls: bool = True
  activation: str = 'gelu'
  layer_norm_epsilon: float = 1e-6
  channels: int = 3
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  scan: bool = False
  remat: bool = False
  remat_policy: str = 'nothing'
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_features: bool = False):
    """Maps images (B, H, W, C) to logits (B, num_classes).

    With return_features=True returns (output, features) where features holds 'patches'
    (B, N, D), 'blocks' (depth, B, T, D), 'encoded' (B, T, D) and 'pre_logits' (B, D').
    """
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; known: {CLASSIFIERS}.')
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f'Expected images of shape (batch, height, width, {self.channels}); '
                       f'found shape {tuple(images.shape)}.')
    h, w = images.shape[1:3]
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'Image size {h}x{w} is not divisible by the patch size {self.patch_size}.')

    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='embedding')(images.astype(self.dtype))
    n, gh, gw, d = x.shape
    patches = x = jnp.reshape(x, (n, gh * gw, d))

    cls_token = None
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), self.param_dtype)
      cls_token = jnp.tile(cls.astype(x.dtype), [n, 1, 1])

    encoded, blocks = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
        posemb_includes_cls=self.posemb_includes_cls, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, scan=self.scan, remat=self.remat,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        name='Transformer',
    )(x, cls_token=cls_token, train=train)

    if self.classifier == 'token':
      x = encoded[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(encoded, axis=1)
    else:
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  layer_norm_epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='MAPHead_0')(encoded)

    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='pre_logits')(x)
      x = jnp.tanh(x)
    pre_logits = x

    if self.num_classes is not None:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    if return_features:
      return x, {'patches': patches, 'blocks': blocks, 'encoded': encoded,
                 'pre_logits': pre_logits}
    return x


# Widths of the published ViT families: (hidden_size, num_layers, num_heads, mlp_dim).
WIDTHS: dict[str, tuple[int, int, int, int]] = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
    # A tiny family for tests and CPU smoke runs; not a published model.
    'mu': (32, 2, 2, 64),
}

# Width/patch pairs for which public checkpoints exist (vit_jax, AugReg, big_vision, CLIP, DINO).
VARIANTS: tuple[str, ...] = (
    'Ti/16', 'Ti/32',
    'S/8', 'S/14', 'S/16', 'S/32',
    'B/8', 'B/14', 'B/16', 'B/32',
    'L/14', 'L/16', 'L/32',
    'H/14',
    'mu/4', 'mu/8',
)


def variant_config(variant: str) -> dict[str, int]:
  """'B/16' -> dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=16)."""
  match = re.fullmatch(r'(\w+)/(\d+)', variant)
  if variant not in VARIANTS or not match:
    raise ValueError(f'Unknown ViT variant {variant!r}; known variants: {", ".join(VARIANTS)}.')
  width, patch = match.group(1), int(match.group(2))
  hidden_size, num_layers, num_heads, mlp_dim = WIDTHS[width]
  return dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
              mlp_dim=mlp_dim, patch_size=patch)


def from_variant(variant: str, num_classes: Optional[int] = 1000, **overrides) -> VisionTransformer:
  """Builds a VisionTransformer by variant name, e.g. from_variant('B/16', num_classes=10)."""
  kwargs = variant_config(variant)
  known = {f.name for f in dataclasses.fields(VisionTransformer)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise TypeError(f'Unknown VisionTransformer options {unknown}; known: {sorted(known)}.')
  kwargs.update(overrides)
  return VisionTransformer(num_classes=num_classes, **kwargs)
