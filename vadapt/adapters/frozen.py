"""The frozen layer a weight-space adapter (LoRA, DoRA, SSF, (IA)³) attaches to.

These adapters are not free-standing functions of a tensor: they change a Dense, DenseGeneral,
Conv or LayerNorm's weights, so they need its kernel layout. A kernel is ``in_dims + out_dims``
(Dense (D_in, D_out); DenseGeneral q/k/v (D, H, D/H) and out (H, D/H, D); Conv
(kh, kw, C_in, C_out)); the layer's input contracts ``in_dims`` and its output ends in
``out_dims``. Under ``nn.scan`` stored kernels carry leading layer axes: the merge functions
take the number of such axes from the leaves' ranks.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KERNEL_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def out_ndim(layer: nn.Module) -> int:
  """Number of trailing output axes the layer's features occupy (DenseGeneral may have several)."""
  if isinstance(layer, nn.DenseGeneral):
    return len(_tuple(layer.features))
  return 1


def kernel(layer: nn.Module, adapter: str, *, grouped: bool = False) -> jax.Array:
  """The layer's kernel, or a clear error naming the layer when it has none (or is a grouped
  convolution and the adapter does not take `grouped` ones)."""
  path = '/'.join(str(p) for p in layer.path)
  if not isinstance(layer, KERNEL_LAYERS):
    raise TypeError(f'{adapter} needs a layer with a kernel (nn.Dense, nn.DenseGeneral or '
                    f'nn.Conv); {path!r} is a {type(layer).__name__}. Target the projections '
                    'inside it, e.g. ".../MultiHeadDotProductAttention_0/query".')
  if isinstance(layer, nn.DenseGeneral) and _tuple(layer.batch_dims):
    raise ValueError(f'{adapter} on {path!r}: DenseGeneral with batch_dims is not supported.')
  if isinstance(layer, nn.Conv) and layer.feature_group_count != 1 and not grouped:
    raise ValueError(f'{adapter} on {path!r}: grouped convolutions (feature_group_count='
                     f'{layer.feature_group_count}) are not supported.')
  if not layer.has_variable('params', 'kernel'):
    raise ValueError(f'{adapter} on {path!r}: the layer holds no params/kernel.')
  return layer.get_variable('params', 'kernel')


def groups(layer: nn.Module) -> int:
  """A convolution's feature_group_count; 1 for every other layer."""
  return layer.feature_group_count if isinstance(layer, nn.Conv) else 1


def apply_with_kernel(layer: nn.Module, kernel_value: jax.Array, x: jax.Array,
                      features_ndim: int = 1, *, dense: bool = False) -> jax.Array:
  """The layer's own op (same axes, strides, padding, precision) with another kernel, no bias;
  the kernel's last features_ndim axes are the output features. `dense`: a grouped convolution's
  op over all input channels (feature_group_count=1).

  LoRA's A is the frozen layer's op with r output features, so one code path serves Dense,
  DenseGeneral (q/k/v, out) and Conv.
  """
  features = kernel_value.shape[-features_ndim:]
  ungrouped = {'feature_group_count': 1} if dense and isinstance(layer, nn.Conv) else {}
  twin = layer.clone(parent=None, name=None, use_bias=False,
                     features=features if len(features) > 1 else features[0], **ungrouped)
  return twin.apply({'params': {'kernel': kernel_value}}, x)


def wide(x: jax.Array, *others: jax.Array) -> jax.Array:
  """x in the dtype the weight arithmetic runs in: its (and `others`') dtype, at least float32
  (bfloat16 -> float32; float64, as in an f64 reference computation, stays float64)."""
  return x.astype(jnp.promote_types(jnp.result_type(x, *others), jnp.float32))


def fan_in_uniform() -> nn.initializers.Initializer:
  """PyTorch's Linear/Conv default (kaiming_uniform with a=sqrt(5)), as peft inits LoRA's A:
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = every axis but the last."""
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def feature_shape(layer: nn.Module, t: jax.Array) -> tuple[int, ...]:
  """The feature axes of a layer's input or output t: a DenseGeneral's (H, D/H) when t ends in
  them, else the last axis (Dense, Conv, LayerNorm channels)."""
  if isinstance(layer, nn.DenseGeneral):
    features = _tuple(layer.features)
    if len(features) > 1 and tuple(t.shape[-len(features):]) == features:
      return features
  return tuple(t.shape[-1:])


def out_lead_ndim(kernel_shape: tuple[int, ...], vec_shape: tuple[int, ...], what: str) -> int:
  """Leading (scan) axes of a per-output-feature vector (lead + out) for a kernel
  (lead + in + out, in non-empty): the one split under which both shapes agree."""
  fits = [n for n in range(len(vec_shape))
          if len(kernel_shape) > len(vec_shape)
          and tuple(kernel_shape[:n]) == tuple(vec_shape[:n])
          and tuple(kernel_shape[len(kernel_shape) - len(vec_shape) + n:]) == tuple(vec_shape[n:])]
  if len(fits) != 1:
    raise ValueError(f'{what}: cannot tell the output axes of a kernel {tuple(kernel_shape)} '
                     f'for a vector {tuple(vec_shape)} ({"ambiguous" if fits else "no fit"}).')
  return fits[0]


def column_norm(v: jax.Array, n_lead: int, n_out: int) -> jax.Array:
  """L2 norm over the input axes of a kernel (lead + in + out) -> lead + out (DoRA's ||.||_c)."""
  axes = tuple(range(n_lead, v.ndim - n_out))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes))


def expand_out(vec: jax.Array, kernel_ndim: int, n_lead: int) -> jax.Array:
  """Reshapes lead + out_dims to broadcast against a kernel lead + in_dims + out_dims."""
  n_out = vec.ndim - n_lead
  n_in = kernel_ndim - n_lead - n_out
  return vec.reshape(vec.shape[:n_lead] + (1,) * n_in + vec.shape[n_lead:])
