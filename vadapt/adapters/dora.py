"""DoRA (Liu et al., 2024): LoRA on the direction of a frozen kernel, a trained magnitude on top.

  W' = m * V / ||V||_c,   V = W + s A B,

with ||.||_c the L2 norm of each output feature's column (over the kernel's input axes) and m one
magnitude per output feature, initialised to ||W||_c. As in the paper (section 4.3) and peft, the
norm is treated as a constant in the backward pass. At position 'parallel' the adapter returns
what must be added to the frozen layer's output y = x W + b:

  (m / ||V|| - 1) * x W + (m / ||V||) * s B(A(x)),

so at init (B = 0, m = ||W||) the factor m / ||V|| is exactly 1 and the adapter adds exactly 0.
Params: ``a``, ``b`` as in vadapt.adapters.lora, ``magnitude`` (out_dims). ``merge`` writes W'
into the kernel; a merged kernel cannot be unmerged (its norms are gone).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt.adapters import frozen
from vadapt.adapters import lora


class DoRA(nn.Module):
  """The DoRA correction to the output of the frozen layer it is created under.

  Attributes:
    rank: r.
    scale: s (alpha / r).
    dropout_rate: dropout on the input (of both the low-rank and the rescaled frozen branch, as
      in peft).
    param_dtype: parameter dtype.
  """
  rank: int
  scale: float = 1.0
  dropout_rate: float = 0.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    layer = self.parent
    w = frozen.kernel(layer, 'DoRA')
    in_dims, out_dims = lora.split_kernel(layer, w, self.rank, 'DoRA')
    n_out = len(out_dims)
    a = self.param('a', frozen.fan_in_uniform(), in_dims + (self.rank,), self.param_dtype)
    b = self.param('b', nn.initializers.zeros, (self.rank,) + out_dims, self.param_dtype)
    m = self.param('magnitude',
                   lambda *_: frozen.column_norm(frozen.wide(w), 0, n_out).astype(
                       self.param_dtype), out_dims, self.param_dtype)
    v = frozen.wide(w) + lora.lora_delta(a, b, w.shape, self.scale)
    factor = frozen.wide(m) / jax.lax.stop_gradient(frozen.column_norm(v, 0, n_out))
    h = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    base = frozen.apply_with_kernel(layer, w, h, features_ndim=n_out)
    low = lora.low_rank(layer, a, b, h) * self.scale
    factor = factor.astype(base.dtype)
    return ((factor - 1) * base + factor * low).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class DoRAConfig:
  """Serialisable description of DoRA; one config serves every targeted layer.

  Attributes:
    rank: r of the directional LoRA update.
    alpha: the update is scaled by alpha / rank; None means alpha = rank.
    dropout: dropout rate on the layer input of the adapter.
  """
  rank: int = 8
  alpha: Optional[float] = None
  dropout: float = 0.0

  positions = ('parallel',)

  def __post_init__(self):
    lora.check_options(self)

  @property
  def scale(self) -> float:
    return lora.lora_scale(self.rank, self.alpha)

  def build(self, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...], name: str,
            parent: nn.Module) -> DoRA:
    del in_shape, out_shape  # Shapes come from the frozen layer's kernel.
    return DoRA(rank=self.rank, scale=self.scale, dropout_rate=self.dropout, name=name,
                parent=parent)

  def merge(self, layer: dict[str, Any], adapter: dict[str, Any], position: str) -> dict:
    """The layer's params with the kernel replaced by m * V / ||V||_c."""
    del position
    kernel, a, b, m = layer['kernel'], adapter['a'], adapter['b'], adapter['magnitude']
    v = frozen.wide(kernel) + lora.lora_delta(a, b, kernel.shape, self.scale)
    n_lead = a.ndim + b.ndim - 2 - kernel.ndim
    n_out = m.ndim - n_lead
    factor = frozen.wide(m) / frozen.column_norm(v, n_lead, n_out)
    return {**layer, 'kernel': (frozen.expand_out(factor, v.ndim, n_lead) * v).astype(
        kernel.dtype)}

  def unmerge(self, layer: dict[str, Any], adapter: dict[str, Any], position: str) -> dict:
    del layer, adapter, position
    raise ValueError('DoRA cannot be unmerged: the merged kernel m * V / ||V|| no longer holds '
                     'the column norms ||V|| it was normalised by. Keep the frozen backbone '
                     '(partition.split) to go back to the adapted model.')

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'dora', **dataclasses.asdict(self)}
