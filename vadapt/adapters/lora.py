"""LoRA (Hu et al., 2022): a trained low-rank update of a frozen kernel, y = x W + b + s x A B.

Placed at position 'parallel' on a Dense, DenseGeneral or Conv (inject computes y + adapter(x)).
``A`` has the kernel's input axes and rank r (``a``: in_dims + (r,), the frozen layer's own op
with r output features, so a Conv gets a conv A and DenseGeneral out (H, D/H, D) an (H, D/H, r)
A); ``B`` maps r to the output axes (``b``: (r,) + out_dims, e.g. (r, H, D/H) for a query).
A starts as PyTorch's/peft's kaiming-uniform, B at zero: the adapted model equals its backbone
at init, bit for bit. s = alpha / r. Dropout acts on x before A, as in peft.

A grouped convolution (``feature_group_count`` G > 1) takes LoRA as peft's Conv2d does when
r is a multiple of G: A is a dense conv over all C_in input channels (``a``: (kh, kw, C_in, r)),
B a grouped 1x1 conv, the rank's r/G channels of group g feeding that group's outputs (``b``:
(r/G, C_out), flax's grouped-kernel layout). Its update mixes every input channel into every
group, which no grouped kernel can hold: like peft, vadapt does not merge it.

``merge`` folds s A B into the kernel (vadapt.merge); ``unmerge`` subtracts it again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vadapt.adapters import frozen


def check_rank(rank: Any) -> None:
  if isinstance(rank, bool) or int(rank) != rank or rank < 1:
    raise ValueError(f'The rank must be a positive integer; found {rank!r}.')


def check_options(config: Any) -> None:
  """Validates rank, alpha and dropout of a LoRA or DoRA config as soon as it is created."""
  check_rank(config.rank)
  if config.alpha is not None and not config.alpha > 0:
    raise ValueError(f'{type(config).__name__} alpha must be positive; found {config.alpha!r}.')
  if not 0.0 <= config.dropout < 1.0:
    raise ValueError(f'dropout must be in [0, 1); found {config.dropout!r}.')


def lora_scale(rank: int, alpha: Optional[float]) -> float:
  """The update's multiplier alpha / r (1 when alpha is not given), as in Hu et al. and peft."""
  return (rank if alpha is None else alpha) / rank


def lora_delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], scale: float):
  """s * A B shaped like the kernel (lead + in + out), A: lead + in + (r,), B: lead + (r,) + out."""
  n_lead = a.ndim + b.ndim - 2 - len(kernel_shape)
  lead, r = a.shape[:n_lead], a.shape[-1]
  if n_lead < 0 or b.shape[n_lead] != r or b.shape[:n_lead] != lead:
    raise ValueError(f'LoRA factors {a.shape} and {b.shape} do not fit a kernel {kernel_shape}.')
  a2, b2 = frozen.wide(a.reshape(lead + (-1, r)), b), frozen.wide(b.reshape(lead + (r, -1)), a)
  delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)
  if math.prod(delta.shape) != math.prod(kernel_shape):
    raise ValueError(f'LoRA factors {a.shape} and {b.shape} do not fit a kernel {kernel_shape}.')
  return scale * delta.reshape(kernel_shape)


def split_kernel(layer: nn.Module, w: jax.Array, rank: int, what: str):
  """(in_dims, out_dims) of the layer's op, checking that rank fits the layer's width; a grouped
  conv's in_dims count all its input channels."""
  n_out = frozen.out_ndim(layer)
  in_dims, out_dims = tuple(w.shape[:-n_out]), tuple(w.shape[-n_out:])
  in_dims = in_dims[:-1] + (in_dims[-1] * frozen.groups(layer),)
  width = min(math.prod(in_dims), math.prod(out_dims))
  if rank > width:
    raise ValueError(
        f'{what} rank {rank} is larger than the layer\'s width: '
        f'{"/".join(str(p) for p in layer.path)!r} has a kernel {tuple(w.shape)} '
        f'({math.prod(in_dims)} in, {math.prod(out_dims)} out); use rank <= {width}.')
  return in_dims, out_dims


def low_rank(layer: nn.Module, a: jax.Array, b: jax.Array, x: jax.Array) -> jax.Array:
  """B(A(x)): A through the layer's own op (r outputs, over all input channels), then B over
  the rank axis (per group for a grouped conv)."""
  h = frozen.apply_with_kernel(layer, a, x, dense=True)
  g = frozen.groups(layer)
  if g == 1:
    return jnp.tensordot(h, b.astype(h.dtype), axes=1)
  per_rank, out = b.shape
  y = jnp.einsum('...gi,igo->...go', h.reshape(h.shape[:-1] + (g, per_rank)),
                 b.astype(h.dtype).reshape(per_rank, g, out // g))
  return y.reshape(h.shape[:-1] + (out,))


def check_groups(layer: nn.Module, rank: int) -> None:
  """peft's rule for LoRA on a grouped convolution: the rank divides into the groups."""
  g = frozen.groups(layer)
  if rank % g:
    raise ValueError(
        f'LoRA on {"/".join(str(p) for p in layer.path)!r}: a grouped convolution '
        f'(feature_group_count={g}) takes a rank divisible by its {g} groups (as in peft); '
        f'found rank {rank}.')


def _check_not_grouped(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...]) -> None:
  n_lead = a.ndim + b.ndim - 2 - len(kernel_shape)
  if n_lead >= 0 and b.shape[n_lead] != a.shape[-1]:
    raise ValueError(
        f'LoRA on a grouped convolution (kernel {tuple(kernel_shape)}, B {tuple(b.shape)}) cannot '
        'be merged: its A mixes all input channels into every group, which a grouped kernel '
        'cannot hold (peft does not merge it either); serve the adapted model unmerged.')


class LoRA(nn.Module):
  """The low-rank branch s * B(A(dropout(x))) of the frozen layer it is created under.

  Attributes:
    rank: r.
    scale: s (alpha / r).
    dropout_rate: dropout on the input of A.
    param_dtype: parameter dtype.
  """
  rank: int
  scale: float = 1.0
  dropout_rate: float = 0.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    layer = self.parent
    w = frozen.kernel(layer, 'LoRA', grouped=True)
    check_groups(layer, self.rank)
    in_dims, out_dims = split_kernel(layer, w, self.rank, 'LoRA')
    a = self.param('a', frozen.fan_in_uniform(), in_dims + (self.rank,), self.param_dtype)
    b = self.param('b', nn.initializers.zeros,
                   (self.rank // frozen.groups(layer),) + out_dims, self.param_dtype)
    h = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    y = low_rank(layer, a, b, h)
    return (y * self.scale).astype(x.dtype) if self.scale != 1.0 else y.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Serialisable description of LoRA; one config serves every targeted layer.

  Attributes:
    rank: r, a positive integer no larger than any targeted layer's width.
    alpha: the update is scaled by alpha / rank; None means alpha = rank (scale 1, peft's
      default r=8, alpha=8).
    dropout: dropout rate on the layer input of the low-rank branch.
  """
  rank: int = 8
  alpha: Optional[float] = None
  dropout: float = 0.0

  positions = ('parallel',)

  def __post_init__(self):
    check_options(self)

  @property
  def scale(self) -> float:
    return lora_scale(self.rank, self.alpha)

  def build(self, *, in_shape: tuple[int, ...], out_shape: tuple[int, ...], name: str,
            parent: nn.Module) -> LoRA:
    del in_shape, out_shape  # Shapes come from the frozen layer's kernel.
    return LoRA(rank=self.rank, scale=self.scale, dropout_rate=self.dropout, name=name,
                parent=parent)

  def merge(self, layer: dict[str, Any], adapter: dict[str, Any], position: str) -> dict:
    """The layer's params with s A B added to its kernel."""
    del position
    kernel = layer['kernel']
    _check_not_grouped(adapter['a'], adapter['b'], kernel.shape)
    delta = lora_delta(adapter['a'], adapter['b'], kernel.shape, self.scale)
    return {**layer, 'kernel': (frozen.wide(kernel) + delta).astype(kernel.dtype)}

  def unmerge(self, layer: dict[str, Any], adapter: dict[str, Any], position: str) -> dict:
    """The inverse of merge up to rounding: the kernel minus s A B."""
    del position
    kernel = layer['kernel']
    _check_not_grouped(adapter['a'], adapter['b'], kernel.shape)
    delta = lora_delta(adapter['a'], adapter['b'], kernel.shape, self.scale)
    return {**layer, 'kernel': (frozen.wide(kernel) - delta).astype(kernel.dtype)}

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'lora', **dataclasses.asdict(self)}
