"""AdapterFusion (Pfeiffer et al., 2021): attention over the outputs of several task adapters.

At each adapted module, with y the module's output (the query) and o_1..o_K the frozen task
adapters' outputs on y::

  scores_k = <Q y, K o_k> / T        p = softmax_k(scores)        delta = sum_k p_k V o_k

and the module returns y + delta. Q and K start as small random projections and V as the
identity, so fusion training starts from an attention-weighted mix of the task adapters
(AdapterHub's value-before-softmax layout; V without bias). Parameter names: query/{kernel,bias},
key/{kernel,bias}, value/kernel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _identity_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(shape[0], shape[1], dtype=dtype)


class AdapterFusion(nn.Module):
  """Maps (query (..., D), adapter outputs (K, ..., D)) to the fused delta (..., D).

  Attributes:
    dropout_rate: dropout on the attention scores.
    temperature: softmax temperature T.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  dropout_rate: float = 0.0
  temperature: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, outputs: jax.Array, *,
               deterministic: bool = True) -> jax.Array:
    d = query.shape[-1]
    if outputs.shape[1:] != query.shape:
      raise ValueError(f'AdapterFusion needs adapter outputs of shape (K, *{tuple(query.shape)}); '
                       f'found {tuple(outputs.shape)}.')
    dense = lambda name, **kw: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,
                                        name=name, **kw)
    small = nn.initializers.normal(stddev=0.02)
    q = dense('query', kernel_init=small)(query.astype(self.dtype))
    outputs = jnp.moveaxis(outputs.astype(self.dtype), 0, -2)           # (..., K, D)
    k = dense('key', kernel_init=small)(outputs)
    v = dense('value', use_bias=False, kernel_init=_identity_init)(outputs)
    scores = jnp.einsum('...d,...kd->...k', q, k)
    scores = nn.Dropout(rate=self.dropout_rate)(scores, deterministic=deterministic)
    probs = jax.nn.softmax(scores / self.temperature, axis=-1)
    return jnp.einsum('...k,...kd->...d', probs, v).astype(query.dtype)
