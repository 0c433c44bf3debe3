"""ResNet v1.5 (or v1) in compact Flax linen, with the flax imagenet example's parameter names.

Padding is PyTorch's (k // 2 on each side, also for the stem's max-pool), so torchvision, timm and
Hugging Face checkpoints (vadapt.pretrained.resnet) give the same outputs as in PyTorch.

Parameter layout::

  conv_init/kernel (7, 7, C, F)            stem convolution (no bias), stride 2
  bn_init/{scale,bias}                     + batch_stats bn_init/{mean,var}
  ResNetBlock_{k}/...                      depth 18 and 34, k counts blocks over all stages
    Conv_0, BatchNorm_0, Conv_1, BatchNorm_1, [conv_proj, norm_proj]
  BottleneckResNetBlock_{k}/...            depth 50, 101 and 152
    Conv_0, BatchNorm_0, Conv_1 (3x3, strided: v1.5), BatchNorm_1, Conv_2, BatchNorm_2,
    [conv_proj, norm_proj]
  head/{kernel,bias}                       num_classes is not None

Blocks are compact and return their output after the residual add and ReLU, so conv adapters
attach to them by interception (``vadapt.api.adapt(resnet, 'conv', ...)``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ModuleDef = Callable[..., nn.Module]
_PAD3 = ((1, 1), (1, 1))  # PyTorch's padding=1 (not 'SAME', which pads (0, 1) at stride 2).


class ResNetBlock(nn.Module):
  """Basic block: two 3x3 convs (ResNet-18/34); maps (B, H, W, C) to (B, H/s, W/s, filters).

  Attributes:
    filters: output channels.
    conv: convolution constructor (bias-free, dtype set by the model).
    norm: BatchNorm constructor (train/eval mode set by the model).
    strides: stride of the first conv and the projection.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, padding=_PAD3, name='Conv_0')(x)
    y = nn.relu(self.norm(name='BatchNorm_0')(y))
    y = self.conv(self.filters, (3, 3), padding=_PAD3, name='Conv_1')(y)
    # Zero-init last BN scale: each block starts as identity (Goyal et al., 2017).
    y = self.norm(scale_init=nn.initializers.zeros, name='BatchNorm_1')(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class BottleneckResNetBlock(nn.Module):
  """Bottleneck block, stride on the 3x3 conv (v1.5); maps (B, H, W, C) to (..., 4 * filters).

  Attributes:
    filters: bottleneck channels (output has 4x as many).
    conv: convolution constructor.
    norm: BatchNorm constructor.
    strides: stride of the 3x3 conv (v1.5) or the first 1x1 conv (v1), and the projection.
    downsample_in_bottleneck: stride on the first 1x1 conv (ResNet v1, Hugging Face's
      `downsample_in_bottleneck=True`) instead of the 3x3 conv.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: tuple[int, int] = (1, 1)
  downsample_in_bottleneck: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    s1, s3 = ((self.strides, (1, 1)) if self.downsample_in_bottleneck
              else ((1, 1), self.strides))
    y = self.conv(self.filters, (1, 1), s1, name='Conv_0')(x)
    y = nn.relu(self.norm(name='BatchNorm_0')(y))
    y = self.conv(self.filters, (3, 3), s3, padding=_PAD3, name='Conv_1')(y)
    y = nn.relu(self.norm(name='BatchNorm_1')(y))
    y = self.conv(self.filters * 4, (1, 1), name='Conv_2')(y)
    y = self.norm(scale_init=nn.initializers.zeros, name='BatchNorm_2')(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


# Images smaller than the total stride leave no spatial extent for the last stage.
MIN_IMAGE_SIZE = 32

BasicBlock = ResNetBlock
BottleneckBlock = BottleneckResNetBlock


class ResNet(nn.Module):
  """ResNet v1.5 classifier (He et al., 2016); maps images (B, H, W, C) to logits.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    block_cls: ResNetBlock (basic) or BottleneckResNetBlock.
    num_classes: head width; None returns the pooled features.
    num_filters: channels of the stem and the first stage (64 in the published models).
    freeze_batch_norm: BatchNorm always uses its running statistics, even with train=True (the
      usual choice when the trunk is frozen: batch_stats then never change).
    bn_momentum: BatchNorm running-average momentum.
    bn_epsilon: BatchNorm epsilon.
    downsample_in_bottleneck: bottleneck blocks stride their first 1x1 conv (ResNet v1) instead
      of the 3x3 conv (v1.5, torchvision's and Hugging Face's default).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  stage_sizes: tuple[int, ...]
  block_cls: ModuleDef
  num_classes: Optional[int] = 1000
  num_filters: int = 64
  freeze_batch_norm: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  downsample_in_bottleneck: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """With train=True, call with mutable=['batch_stats'] (unless freeze_batch_norm)."""
    if x.ndim != 4:
      raise ValueError(f'Expected images of shape (batch, height, width, channels); found shape '
                       f'{tuple(x.shape)}.')
    if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(f'ResNet downsamples by {MIN_IMAGE_SIZE}: images must be at least '
                       f'{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}; found {x.shape[1]}x{x.shape[2]}.')
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=self.freeze_batch_norm or not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
        param_dtype=self.param_dtype)
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
             name='conv_init')(x.astype(self.dtype))
    x = nn.relu(norm(name='bn_init')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD3)
    k = 0
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        extra = ({'downsample_in_bottleneck': True} if self.downsample_in_bottleneck else {})
        x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm, strides=strides,
                           name=f'{self.block_cls.__name__}_{k}', **extra)(x)
        k += 1
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes is not None:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='head')(x)
    return x


DEPTHS: dict[int, tuple[tuple[int, ...], ModuleDef]] = {
    18: ((2, 2, 2, 2), ResNetBlock),
    34: ((3, 4, 6, 3), ResNetBlock),
    50: ((3, 4, 6, 3), BottleneckResNetBlock),
    101: ((3, 4, 23, 3), BottleneckResNetBlock),
    152: ((3, 8, 36, 3), BottleneckResNetBlock),
}


def from_depth(depth: int, num_classes: Optional[int] = 1000, **overrides) -> ResNet:
  """ResNet-`depth` (18, 34, 50, 101, 152), e.g. from_depth(18, num_classes=10, num_filters=8)."""
  if depth not in DEPTHS:
    raise ValueError(f'Unknown ResNet depth {depth!r}; known depths: {sorted(DEPTHS)}.')
  known = {f.name for f in dataclasses.fields(ResNet)} - {'stage_sizes', 'block_cls', 'parent',
                                                          'name'}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise TypeError(f'Unknown ResNet options {unknown}; known: {sorted(known)}.')
  stage_sizes, block_cls = DEPTHS[depth]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes,
                **overrides)
