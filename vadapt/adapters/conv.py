"""Convolutional residual adapters for CNN feature maps (Rebuffi et al., 2017/2018).

A 1x1-conv bottleneck on NHWC maps::

  [LayerNorm] -> down 1x1 conv (C -> r, stride s) -> activation -> up 1x1 conv (r -> C_out) * scale

used in series after a block (y + f(y)) or in parallel with it (block(x) + f(x)). In parallel
the block may change the width and stride, so the adapter takes the block's output width and a
stride derived from the input and output map sizes. The up-projection starts at zero: identity
at init.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt.adapters.bottleneck import bottleneck_width
from vadapt.adapters.bottleneck import check_options
from vadapt.layers import get_activation

Dtype = Any


class ConvAdapter(nn.Module):
  """1x1-conv bottleneck; maps (B, H, W, C) to (B, H/s, W/s, out_features or C).

  Attributes:
    bottleneck: hidden channels r (give this or reduction_factor, not both).
    reduction_factor: r = C // reduction_factor.
    out_features: output channels; defaults to C.
    strides: spatial stride of the down-projection (parallel to a downsampling block).
    activation: activation name ('relu', 'gelu', ...).
    layer_norm: LayerNorm over channels before the down-projection.
    dropout_rate: dropout after the activation.
    scale: output multiplier.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  bottleneck: Optional[int] = None
  reduction_factor: Optional[float] = None
  out_features: Optional[int] = None
  strides: tuple[int, int] = (1, 1)
  activation: str = 'relu'
  layer_norm: bool = False
  dropout_rate: float = 0.0
  scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f'ConvAdapter expects NHWC feature maps (B, H, W, C); found shape '
                       f'{tuple(x.shape)}.')
    features = x.shape[-1]
    hidden = bottleneck_width(features, self.bottleneck, self.reduction_factor)
    out_features = features if self.out_features is None else self.out_features
    h = x.astype(self.dtype)
    if self.layer_norm:
      h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(h)
    h = nn.Conv(hidden, (1, 1), strides=self.strides, dtype=self.dtype,
                param_dtype=self.param_dtype, kernel_init=nn.initializers.lecun_normal(),
                name='down')(h)
    h = get_activation(self.activation)(h)
    h = nn.Dropout(rate=self.dropout_rate)(h, deterministic=deterministic)
    h = nn.Conv(out_features, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                kernel_init=nn.initializers.zeros, name='up')(h)
    if self.scale != 1.0:
      h = h * self.scale
    return h.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class ConvAdapterConfig:
  """Serialisable description of a ConvAdapter.

  Attributes:
    bottleneck: hidden channels r (give this or reduction_factor, not both).
    reduction_factor: r = C // reduction_factor.
    activation: activation name.
    layer_norm: LayerNorm before the down-projection.
    dropout: dropout rate after the activation.
    scale: output multiplier.
  """
  bottleneck: Optional[int] = None
  reduction_factor: Optional[float] = None
  activation: str = 'relu'
  layer_norm: bool = False
  dropout: float = 0.0
  scale: float = 1.0

  def __post_init__(self):
    check_options(self)

  def build(self, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...], name: str,
            parent: nn.Module) -> ConvAdapter:
    """The adapter from maps of in_shape (B, H, W, C) to out_shape, bound under parent."""
    if len(in_shape) != 4 or len(out_shape) != 4:
      raise ValueError('ConvAdapter needs NHWC feature maps on both sides; found input shape '
                       f'{tuple(in_shape)} and output shape {tuple(out_shape)}.')
    strides = []
    for i, o in zip(in_shape[1:3], out_shape[1:3]):
      # An exact downsampling, or a stride-2 block on an odd map (ceil(i / 2) pixels, as padded
      # stride-2 convs give; so does the adapter's 'SAME' 1x1 conv).
      s = i // o if o >= 1 and i % o == 0 else 2
      if o < 1 or -(-i // s) != o:
        raise ValueError(f'Cannot map a {in_shape[1]}x{in_shape[2]} map onto '
                         f'{out_shape[1]}x{out_shape[2]} with a strided 1x1 conv.')
      strides.append(s)
    return ConvAdapter(
        bottleneck=self.bottleneck, reduction_factor=self.reduction_factor,
        out_features=out_shape[-1], strides=tuple(strides), activation=self.activation,
        layer_norm=self.layer_norm, dropout_rate=self.dropout, scale=self.scale,
        name=name, parent=parent)

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'conv', **dataclasses.asdict(self)}
