"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; AdaptFormer, Chen et al. 2022).

An adapter maps a tensor (..., D) to (..., D_out) through a small bottleneck::

  [LayerNorm] -> down (D -> r) -> activation -> dropout -> up (r -> D_out) -> * scale

The up-projection starts at zero, so an adapted model computes exactly what its backbone does
until the adapter is trained. Parameter names are fixed (``down/{kernel,bias}``,
``up/{kernel,bias}``, ``norm/{scale,bias}``, ``scale``) because exported adapters are matched
by path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt.layers import get_activation

Dtype = Any


def bottleneck_width(features: int, bottleneck: Optional[int],
                     reduction_factor: Optional[float]) -> int:
  """The hidden width r, from exactly one of an explicit width or features / reduction_factor."""
  if (bottleneck is None) == (reduction_factor is None):
    raise ValueError(
        'Give exactly one of bottleneck (a width, e.g. 64) and reduction_factor (e.g. 16); '
        f'found bottleneck={bottleneck!r}, reduction_factor={reduction_factor!r}.')
  if bottleneck is not None:
    if int(bottleneck) != bottleneck or bottleneck < 1:
      raise ValueError(f'bottleneck must be a positive integer; found {bottleneck!r}.')
    return int(bottleneck)
  if reduction_factor <= 0:
    raise ValueError(f'reduction_factor must be positive; found {reduction_factor!r}.')
  return max(1, int(features // reduction_factor))


def check_options(config: Any) -> None:
  """Validates an adapter config (width choice, activation, dropout) as soon as it is created.

  The input width is unknown until the adapter sees a tensor; a stand-in width divisible by the
  reduction factor checks the bottleneck/reduction_factor choice.
  """
  bottleneck_width(max(1, int(config.reduction_factor or 1)), config.bottleneck,
                   config.reduction_factor)
  get_activation(config.activation)
  if not 0.0 <= config.dropout < 1.0:
    raise ValueError(f'dropout must be in [0, 1); found {config.dropout!r}.')


class BottleneckAdapter(nn.Module):
  """Down-projection, activation, up-projection; maps (..., D) to (..., out_features or D).

  Attributes:
    bottleneck: hidden width r (give this or reduction_factor, not both).
    reduction_factor: r = D // reduction_factor.
    out_features: output width; defaults to the input width D.
    activation: a name known to vadapt.layers.get_activation ('relu', 'gelu', 'quick_gelu').
    layer_norm: LayerNorm on the input before the down-projection (Pfeiffer, AdaptFormer).
    dropout_rate: dropout after the activation.
    scale: multiplier on the output; the initial value when learnable_scale.
    learnable_scale: make the scale a trained scalar parameter named 'scale' (AdaptFormer).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  bottleneck: Optional[int] = None
  reduction_factor: Optional[float] = None
  out_features: Optional[int] = None
  activation: str = 'relu'
  layer_norm: bool = False
  dropout_rate: float = 0.0
  scale: float = 1.0
  learnable_scale: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    features = x.shape[-1]
    hidden = bottleneck_width(features, self.bottleneck, self.reduction_factor)
    out_features = features if self.out_features is None else self.out_features
    h = x.astype(self.dtype)
    if self.layer_norm:
      h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(h)
    h = nn.Dense(hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.initializers.lecun_normal(), name='down')(h)
    h = get_activation(self.activation)(h)
    h = nn.Dropout(rate=self.dropout_rate)(h, deterministic=deterministic)
    # Zero up-projection: the adapted model equals its backbone at init.
    h = nn.Dense(out_features, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.initializers.zeros, name='up')(h)
    if self.learnable_scale:
      s = self.param('scale', nn.initializers.constant(self.scale), (), self.param_dtype)
      h = h * s.astype(self.dtype)
    elif self.scale != 1.0:
      h = h * self.scale
    return h.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
  """Serialisable description of a BottleneckAdapter; inject builds one per adapted module.

  The adapter's input width comes from the tensor it sees, so one config serves every layer.

  Attributes:
    bottleneck: hidden width r (give this or reduction_factor, not both).
    reduction_factor: r = D // reduction_factor.
    activation: 'relu', 'gelu', 'quick_gelu' (any name get_activation knows).
    layer_norm: LayerNorm before the down-projection.
    dropout: dropout rate after the activation.
    scale: output multiplier (initial value when learnable_scale).
    learnable_scale: train the scale (AdaptFormer).
  """
  bottleneck: Optional[int] = None
  reduction_factor: Optional[float] = None
  activation: str = 'relu'
  layer_norm: bool = False
  dropout: float = 0.0
  scale: float = 1.0
  learnable_scale: bool = False

  def __post_init__(self):
    check_options(self)

  def build(self, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...], name: str,
            parent: nn.Module) -> BottleneckAdapter:
    """The adapter module mapping (..., in_shape[-1]) to (..., out_shape[-1]) under parent."""
    del in_shape  # The width is read from the tensor at call time.
    return BottleneckAdapter(
        bottleneck=self.bottleneck, reduction_factor=self.reduction_factor,
        out_features=out_shape[-1], activation=self.activation, layer_norm=self.layer_norm,
        dropout_rate=self.dropout, scale=self.scale, learnable_scale=self.learnable_scale,
        name=name, parent=parent)

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'bottleneck', **dataclasses.asdict(self)}
