"""(IA)³ (Liu et al., 2022): learned vectors that rescale a frozen layer's inputs or outputs.

At position 'output' (keys and values) the layer computes y * l; at position 'input' (the MLP
hidden, i.e. the input of the second MLP layer) it runs on x * l. inject adds the adapter's
output, so the adapter returns t * (l - 1), exactly 0 at init (l = 1): the adapted model equals
its backbone bit for bit. Param: ``scale`` (l), one per feature.

``merge`` folds l into the layer: output, kernel * l and bias * l per output feature; input,
each input row of the kernel * l. ``unmerge`` divides again.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt.adapters import frozen


class IA3(nn.Module):
  """t * (l - 1) over the feature axes of the frozen layer's input or output t.

  Attributes:
    param_dtype: parameter dtype.
  """
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array, *, deterministic: bool = True) -> jax.Array:
    del deterministic
    features = frozen.feature_shape(self.parent, t)
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    return (t * (scale - 1).astype(t.dtype)).astype(t.dtype)


@dataclasses.dataclass(frozen=True)
class IA3Config:
  """Serialisable description of (IA)³ (no options: one vector per adapted input or output)."""

  positions = ('output', 'input')

  def build(self, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...], name: str,
            parent: nn.Module) -> IA3:
    del in_shape, out_shape
    return IA3(name=name, parent=parent)

  def _scaled(self, layer, adapter, position, invert):
    if 'kernel' not in layer:
      raise ValueError(f'(IA)³ can only be merged into a layer with a kernel; this layer holds '
                       f'{sorted(layer)}.')
    w = layer['kernel']
    scale = frozen.wide(adapter['scale'])
    op = jnp.divide if invert else jnp.multiply
    out = dict(layer)
    if position == 'input':
      if tuple(w.shape[:scale.ndim]) != tuple(scale.shape):
        raise ValueError(f'(IA)³ input scale {scale.shape} does not match the input axes of '
                         f'the kernel {w.shape}.')
      out['kernel'] = op(frozen.wide(w),
                         scale.reshape(scale.shape + (1,) * (w.ndim - scale.ndim))).astype(w.dtype)
      return out
    n_lead = frozen.out_lead_ndim(w.shape, scale.shape, '(IA)³')
    out['kernel'] = op(frozen.wide(w),
                       frozen.expand_out(scale, w.ndim, n_lead)).astype(w.dtype)
    if 'bias' in layer:
      out['bias'] = op(frozen.wide(layer['bias']), scale).astype(layer['bias'].dtype)
    return out

  def merge(self, layer: dict[str, Any], adapter: dict[str, Any], position: str) -> dict:
    """Output: (x W + b) l = x (W l) + b l. Input: (x l) W = x (l W)."""
    return self._scaled(layer, adapter, position, invert=False)

  def unmerge(self, layer: dict[str, Any], adapter: dict[str, Any], position: str) -> dict:
    # A scale trained to exactly 0 erased its feature: dividing gives inf/nan there.
    return self._scaled(layer, adapter, position, invert=True)

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'ia3'}
