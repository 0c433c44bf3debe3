"""SSF (Lian et al., 2022): scale and shift the features a frozen layer outputs, y' = y * γ + β.

Placed at position 'output' after a Dense, DenseGeneral (per (head, channel) for q/k/v), Conv or
LayerNorm, where inject computes y + adapter(y); the adapter returns y * (γ - 1) + β, which is
exactly 0 at init (γ = 1, β = 0), so the adapted model equals its backbone bit for bit.
Params: ``scale`` (γ) and ``shift`` (β), one per output feature.

After training ``merge`` re-parameterises them into the layer (kernel * γ, bias * γ + β; for a
LayerNorm scale * γ, bias * γ + β), leaving the bare backbone; ``unmerge`` divides again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt.adapters import frozen


class SSF(nn.Module):
  """y * (γ - 1) + β over the feature axes of the frozen layer's output y.

  Attributes:
    param_dtype: parameter dtype.
  """
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, *, deterministic: bool = True) -> jax.Array:
    del deterministic
    features = frozen.feature_shape(self.parent, y)
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    shift = self.param('shift', nn.initializers.zeros, features, self.param_dtype)
    return (y * (scale - 1).astype(y.dtype) + shift.astype(y.dtype)).astype(y.dtype)


def _layer_vectors(layer: dict[str, Any], what: str) -> tuple[str, str]:
  """Names of the layer's (multiplicative, additive) params: (kernel | scale, bias)."""
  mult = 'kernel' if 'kernel' in layer else 'scale' if 'scale' in layer else None
  if mult is None or 'bias' not in layer:
    raise ValueError(f'{what} can only be merged into a layer with a kernel (or a LayerNorm scale) '
                     f'and a bias; this layer holds {sorted(layer)}.')
  return mult, 'bias'


@dataclasses.dataclass(frozen=True)
class SSFConfig:
  """Serialisable description of SSF (no options: γ and β per output feature)."""

  positions = ('output',)

  def build(self, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...], name: str,
            parent: nn.Module) -> SSF:
    del in_shape, out_shape
    return SSF(name=name, parent=parent)

  def _vectors(self, layer, adapter):
    mult, add = _layer_vectors(layer, 'SSF')
    scale, shift = frozen.wide(adapter['scale']), frozen.wide(adapter['shift'])
    w = layer[mult]
    if mult == 'kernel':
      n_lead = frozen.out_lead_ndim(w.shape, scale.shape, 'SSF')
      scale_w = frozen.expand_out(scale, w.ndim, n_lead)
    else:
      scale_w = scale
    return mult, add, scale, shift, scale_w

  def merge(self, layer: dict[str, Any], adapter: dict[str, Any], position: str) -> dict:
    """(y W + b) γ + β = y (W γ) + (b γ + β), per output feature."""
    del position
    mult, add, scale, shift, scale_w = self._vectors(layer, adapter)
    w, b = layer[mult], layer[add]
    return {**layer, mult: (frozen.wide(w) * scale_w).astype(w.dtype),
            add: (frozen.wide(b) * scale + shift).astype(b.dtype)}

  def unmerge(self, layer: dict[str, Any], adapter: dict[str, Any], position: str) -> dict:
    del position
    # A scale trained to exactly 0 erased its feature: dividing gives inf/nan there.
    mult, add, scale, shift, scale_w = self._vectors(layer, adapter)
    w, b = layer[mult], layer[add]
    return {**layer, mult: (frozen.wide(w) / scale_w).astype(w.dtype),
            add: ((frozen.wide(b) - shift) / scale).astype(b.dtype)}

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'ssf'}
