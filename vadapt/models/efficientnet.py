"""EfficientNet-Lite 0-4 (Tan & Le, 2019; the TF "lite" variants) in compact Flax linen.

Lite differs from EfficientNet-B*: no squeeze-and-excitation, ReLU6 instead of swish, and the
stem (32 channels), the head (1280 channels) and the repeats of the first and last stage are not
scaled. Convolutions pad like TensorFlow's 'SAME' (asymmetric for stride 2), BatchNorm uses
epsilon 1e-3 and momentum 0.99, inputs are (x - 127) / 128 for x in [0, 255].

Parameter names are those of the PyTorch checkpoints (lukemelas' EfficientNet-PyTorch layout
with its leading underscores dropped), so a state dict maps onto them one to one::

  conv_stem/kernel (3, 3, 3, 32)            _conv_stem.weight
  bn0/{scale,bias}, batch_stats bn0/{mean,var}
  blocks_{i}/                               _blocks.{i}. (MBConvBlock; i counts over all stages)
    expand_conv, bn0                        absent when the expansion ratio is 1 (block 0)
    depthwise_conv/kernel (k, k, 1, C)      _depthwise_conv.weight (C, 1, k, k)
    bn1, project_conv, bn2
  conv_head/kernel (1, 1, C, 1280), bn1
  head/{kernel,bias}                        _fc (num_classes is not None)

Blocks are compact and return their output after the skip connection, so conv adapters attach to
them by interception (``vadapt.api.adapt(model, 'conv', ...)``; placements.EFFICIENTNET_BLOCKS).
BatchNorm is frozen by default (`freeze_batch_norm`): statistics are used, never updated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt import layers

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage of B0/Lite0.
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# name: (width multiplier, depth multiplier, resolution, dropout before the classifier).
VARIANTS = {
    'lite0': (1.0, 1.0, 224, 0.2),
    'lite1': (1.0, 1.1, 240, 0.2),
    'lite2': (1.1, 1.2, 260, 0.3),
    'lite3': (1.2, 1.4, 280, 0.3),
    'lite4': (1.4, 1.8, 300, 0.3),
}

# The network downsamples by 32: smaller images leave no spatial extent for the last stage.
MIN_IMAGE_SIZE = 32


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """TF EfficientNet's channel rounding: nearest multiple of `divisor`, never 10% below."""
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One MBConv block's shape.

  Attributes:
    in_features: input channels.
    out_features: output channels.
    kernel_size: depthwise kernel side.
    stride: depthwise stride.
    expand_ratio: hidden channels = in_features * expand_ratio.
  """
  in_features: int
  out_features: int
  kernel_size: int
  stride: int
  expand_ratio: int


def block_specs(width: float, depth: float) -> tuple[BlockSpec, ...]:
  """Every block of EfficientNet-Lite at (width, depth), first stage and last stage unscaled."""
  specs = []
  for i, (repeats, k, s, e, cin, cout) in enumerate(BASE_STAGES):
    last = i == len(BASE_STAGES) - 1
    cin = 32 if i == 0 else round_filters(cin, width)  # Fixed stem.
    cout = round_filters(cout, width)
    n = repeats if i == 0 or last else round_repeats(repeats, depth)
    for j in range(n):
      specs.append(BlockSpec(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
  return tuple(specs)


class MBConvBlock(nn.Module):
  """Inverted residual block without squeeze-excitation; maps (B, H, W, C) to (B, H/s, W/s, O).

  Attributes:
    out_features: output channels O.
    kernel_size: depthwise kernel side.
    strides: depthwise stride.
    expand_ratio: hidden channels = C * expand_ratio (no expansion conv when 1).
    conv: convolution constructor (bias-free, 'SAME', dtype set by the model).
    depthwise: the depthwise convolution's constructor (the same settings;
      vadapt.layers.DepthwiseConv).
    norm: BatchNorm constructor (train/eval mode set by the model).
  """
  out_features: int
  kernel_size: int
  strides: int
  expand_ratio: int
  conv: ModuleDef
  depthwise: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inputs = x
    hidden = x.shape[-1] * self.expand_ratio
    if self.expand_ratio != 1:
      x = nn.relu6(self.norm(name='bn0')(self.conv(hidden, (1, 1), name='expand_conv')(x)))
    k = self.kernel_size
    x = self.depthwise(hidden, (k, k), (self.strides, self.strides), feature_group_count=hidden,
                       name='depthwise_conv')(x)
    x = nn.relu6(self.norm(name='bn1')(x))
    x = self.norm(name='bn2')(self.conv(self.out_features, (1, 1), name='project_conv')(x))
    if self.strides == 1 and inputs.shape[-1] == self.out_features:
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite classifier; maps images (B, H, W, 3) in [-1, 1] to logits.

  Attributes:
    width: channel multiplier (stem and head stay fixed).
    depth: repeat multiplier (first and last stage stay fixed).
    num_classes: head width; None returns the pooled 1280-d features.
    dropout_rate: dropout before the head (active with train=True).
    freeze_batch_norm: BatchNorm uses its running statistics even with train=True, so
      batch_stats never change (the usual choice for a frozen trunk). False: batch statistics in
      training, and the caller passes mutable=['batch_stats'].
    bn_momentum: BatchNorm running-average momentum.
    bn_epsilon: BatchNorm epsilon (1e-3 in the TF-trained checkpoints).
    depthwise: how the depthwise convolutions run: 'shifted' (vadapt.layers.DepthwiseConv, k*k
      shifted multiply-adds: 3.6-8.7x faster on XLA:CPU for Lite0 at 64 px), 'conv' (XLA's
      grouped convolution) or None, 'shifted' on CPU and 'conv' on accelerators. The same params
      and, up to float rounding, the same outputs.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  width: float = 1.0
  depth: float = 1.0
  num_classes: Optional[int] = 1000
  dropout_rate: float = 0.0
  freeze_batch_norm: bool = True
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  depthwise: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    check_images(x, 'EfficientNet-Lite')
    conv = functools.partial(nn.Conv, use_bias=False, padding='SAME', dtype=self.dtype,
                             param_dtype=self.param_dtype)
    impl = self.depthwise or ('shifted' if jax.default_backend() == 'cpu' else 'conv')
    if impl not in ('shifted', 'conv'):
      raise ValueError(f"depthwise={self.depthwise!r}: expected 'shifted', 'conv' or None.")
    depthwise = functools.partial(layers.DepthwiseConv if impl == 'shifted' else nn.Conv,
                                  use_bias=False, padding='SAME', dtype=self.dtype,
                                  param_dtype=self.param_dtype)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=self.freeze_batch_norm or not train,
        momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
        param_dtype=self.param_dtype)
    x = conv(32, (3, 3), (2, 2), name='conv_stem')(x.astype(self.dtype))
    x = nn.relu6(norm(name='bn0')(x))
    for i, spec in enumerate(block_specs(self.width, self.depth)):
      x = MBConvBlock(spec.out_features, spec.kernel_size, spec.stride, spec.expand_ratio,
                      conv=conv, depthwise=depthwise, norm=norm, name=f'blocks_{i}')(x)
    x = nn.relu6(norm(name='bn1')(conv(1280, (1, 1), name='conv_head')(x)))
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes is not None:
      x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='head')(x)
    return x


def check_images(x: jax.Array, what: str, min_size: int = MIN_IMAGE_SIZE) -> None:
  """Raises ValueError unless x is (B, H, W, 3) with H, W >= min_size."""
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'{what} expects RGB images of shape (batch, height, width, 3); found shape '
                     f'{tuple(x.shape)}.')
  if min(x.shape[1:3]) < min_size:
    raise ValueError(f'{what} downsamples by {min_size}: images must be at least '
                     f'{min_size}x{min_size}; found {x.shape[1]}x{x.shape[2]}.')


def from_variant(variant: str = 'lite0', num_classes: Optional[int] = 1000,
                 **overrides) -> EfficientNetLite:
  """EfficientNet-Lite by name ('lite0' ... 'lite4'), e.g. from_variant('lite0', num_classes=10)."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown EfficientNet-Lite variant {variant!r}; known: {sorted(VARIANTS)}.')
  known = {f.name for f in dataclasses.fields(EfficientNetLite)} - {'parent', 'name'}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise TypeError(f'Unknown EfficientNetLite options {unknown}; known: {sorted(known)}.')
  width, depth, _, dropout = VARIANTS[variant]
  kwargs = dict(width=width, depth=depth, dropout_rate=dropout)
  kwargs.update(overrides)
  return EfficientNetLite(num_classes=num_classes, **kwargs)


def default_image_size(variant: str) -> int:
  """The resolution the variant was trained at (224 for lite0 ... 300 for lite4)."""
  return VARIANTS[variant][2]
