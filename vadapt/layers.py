"""Building blocks shared by the backbones and the adapters (the lowest floor of the package).

Models (vadapt.models) and adapters (vadapt.adapters) both import from here; this module imports
nothing from vadapt.
"""

from __future__ import annotations

from typing import Callable
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: jax.Array) -> jax.Array:
  """GELU's exact form as PyTorch computes it, x * (1 + erf(x / sqrt(2))) / 2.

  jax.nn.gelu(approximate=False) evaluates the same function through erfc, which XLA:CPU runs
  about 2.4x slower than erf (2.7 ms against 1.1 ms on ViT-Ti/4's [4160, 768] MLP activation,
  2-core AMD EPYC: benchmarks/results/gelu_forms_cpu_amd.md); the two agree to 1e-6 where the
  value is not negligible (below about x = -5 this form, as PyTorch's, returns 0 where erfc's
  keeps a tiny negative value).
  """
  return x * (jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)) + 1) * 0.5


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # vit_jax and big_vision train with the tanh approximation (flax's default).
    'gelu': lambda x: nn.gelu(x, approximate=True),
    # Hugging Face's "gelu" (and DINOv2's nn.GELU) is the exact erf form.
    'gelu_exact': gelu_exact,
    'quick_gelu': quick_gelu,
    'relu': nn.relu,
    # The gate of SwiGLU MLPs (DINOv2 ViT-g).
    'silu': nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


# flax's attention contracts q, k and v in their projection layout [..., T, H, D]. XLA:CPU runs
# those two batched products with the heads between the batch and the sequence axes far below its
# matmul rate (ViT-B/16's attention, batch 8, on a 2-core AMD EPYC: 65 ms a block, against 11 ms
# for the same products on [..., H, T, D] arrays: benchmarks/results/attention_ops_cpu_amd.md).
# head_major_einsum moves the heads next to the batch first; the products, the softmax and
# everything around them are flax's.
_QK, _WV = '...qhd,...khd->...hqk', '...hqk,...khd->...qhd'


def head_major_einsum(subscripts: str, a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
  """jnp.einsum for flax's two attention products, computed on head-major operands.

  Pass as MultiHeadDotProductAttention(qk_attn_weights_einsum_cls=lambda: head_major_einsum,
  attn_weights_value_einsum_cls=lambda: head_major_einsum). Other subscripts go to jnp.einsum.
  """
  heads_first = lambda x: jnp.swapaxes(x, -3, -2)  # [..., T, H, D] -> [..., H, T, D]
  if subscripts == _QK:  # q [..., q, h, d], k [..., k, h, d] -> [..., h, q, k]
    return jnp.einsum('...hqd,...hkd->...hqk', heads_first(a), heads_first(b), **kwargs)
  if subscripts == _WV:  # weights [..., h, q, k], v [..., k, h, d] -> [..., q, h, d]
    return heads_first(jnp.einsum('...hqk,...hkd->...hqd', a, heads_first(b), **kwargs))
  return jnp.einsum(subscripts, a, b, **kwargs)


class DepthwiseConv(nn.Conv):
  """A depthwise 2-D convolution (one k x k filter per channel) as k*k shifted multiply-adds.

  The same module as `nn.Conv(C, (k, k), strides, feature_group_count=C)`: same attributes, the
  same `kernel` (k, k, 1, C) and optional `bias`, 'SAME'/'VALID'/explicit padding, so checkpoints,
  label rules and adapters that read a conv's attributes see no difference. XLA:CPU lowers a
  grouped convolution with one channel per group to a slow generic loop (EfficientNet-Lite0 at
  64 px runs 3.6-8.7x faster with this layer: benchmarks/results/depthwise_conv_cpu.md (Xeon),
  depthwise_conv_cpu_amd.md (AMD)); element-wise work on shifted views is what every backend runs
  fast. The sum runs over the kernel taps in a fixed order, so the result equals the convolution
  up to float rounding (not bit for bit). Its gradient is its own (a custom VJP: reverse mode
  only), the same shifted sum over the output gradient: LoRA on the preceding conv gets its
  gradient 2.9x faster than through autodiff's transpose (depthwise_conv_cpu_amd.md). With
  other settings (a clone with feature_group_count=1, dilation, circular padding) it is nn.Conv.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    channels = inputs.shape[-1]
    ks = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    strides = self.strides or 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    dilated = any(d not in (None, 1, (1, 1)) for d in (self.input_dilation, self.kernel_dilation))
    if (inputs.ndim != 4 or len(ks) != 2 or self.features != channels
        or self.feature_group_count != channels or dilated
        or (isinstance(self.padding, str) and self.padding not in ('SAME', 'VALID'))):
      # Anything else (a clone with other settings, e.g. LoRA's dense A): nn.Conv itself.
      return super().__call__(inputs)
    kernel = self.param('kernel', self.kernel_init, ks + (1, channels), self.param_dtype)
    bias = (self.param('bias', self.bias_init, (channels,), self.param_dtype)
            if self.use_bias else None)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    padding = self.padding
    if isinstance(padding, str):
      pads = jax.lax.padtype_to_pads(inputs.shape[1:3], ks, strides, padding)
    elif isinstance(padding, int):
      pads = [(padding, padding)] * 2
    else:
      pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    y = _depthwise(inputs, kernel, tuple(map(tuple, pads)), strides)
    if bias is not None:
      y = y + bias
    return y


Pads = tuple[tuple[int, int], tuple[int, int]]


def _tap(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]):
  """The (i, j)-shifted, strided out_hw view of the padded input xp."""
  return jax.lax.slice(xp, (0, i, j, 0),
                       (xp.shape[0], i + (out_hw[0] - 1) * strides[0] + 1,
                        j + (out_hw[1] - 1) * strides[1] + 1, xp.shape[3]),
                       (1, strides[0], strides[1], 1))


def _shifted_taps(x: jax.Array, kernel: jax.Array, pads: Pads, strides: tuple[int, int]):
  """sum_ij kernel[i, j] * (x padded, shifted by (i, j), strided): a depthwise convolution."""
  ks = kernel.shape[:2]
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  out_hw = tuple((xp.shape[1 + a] - ks[a]) // strides[a] + 1 for a in range(2))
  y = None
  for i in range(ks[0]):
    for j in range(ks[1]):
      tap = _tap(xp, i, j, out_hw, strides) * kernel[i, j, 0]
      y = tap if y is None else y + tap
  return y


# The gradient with respect to the input is itself a depthwise convolution: the output gradient,
# dilated by the stride and padded, correlated with the flipped kernel. Autodiff's transpose of
# the shifted sum instead pads every tap's gradient to the padded input's size and adds k*k such
# arrays; where that sum has several consumers (LoRA on the conv before it), XLA:CPU materialises
# all k*k of them (benchmarks/results/depthwise_conv_cpu_amd.md, "LoRA factors' gradient").
# Left to itself, XLA:CPU would still compute that sum once per consumer of dx (it fuses the adds
# into each; a reduction or an optimization barrier is simplified away before fusion): see
# _depthwise_bwd.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, kernel: jax.Array, pads: Pads, strides: tuple[int, int]):
  return _shifted_taps(x, kernel, pads, strides)


def _depthwise_fwd(x, kernel, pads, strides):
  return _shifted_taps(x, kernel, pads, strides), (x, kernel)


def _depthwise_bwd(pads, strides, residuals, g):
  grads = functools.partial(_depthwise_grads, pads, strides, residuals)
  if jax.default_backend() != 'cpu':
    return grads(g)
  # On XLA:CPU the gradients are computed inside a conditional whose two branches are this same
  # computation: XLA does not fuse across a conditional, so dx and dkernel are computed once and
  # stored instead of being recomputed inside each consumer (the conv before, LoRA's factors,
  # BatchNorm's backward). Whichever branch runs, the result is the same, bit for bit. On
  # EfficientNet-Lite0 (64 px, batch 32) LoRA's gradient runs 1.35x faster for it; full
  # fine-tuning's and the adapters' input gradient change within that run's noise
  # (benchmarks/results/depthwise_conv_cpu_amd.md). Elsewhere a conditional would wait for its
  # predicate on the host, so other backends call the gradients directly.
  return jax.lax.cond(jnp.isfinite(g[0, 0, 0, 0]), grads, grads, g)


def _depthwise_grads(pads, strides, residuals, g):
  """(dx, dkernel) of the shifted sum, given its output gradient g."""
  x, kernel = residuals
  ks = kernel.shape[:2]
  # dx[q] = sum_i g_dilated[q + lo - i] * kernel[i]: g dilated by the stride, padded by k-1 - lo
  # in front (negative pads crop) and to x's length + k-1 in all, then the stride-1 shifted sum
  # with the flipped kernel.
  dilated = [(g.shape[1 + a] - 1) * strides[a] + 1 for a in range(2)]
  gp = jax.lax.pad(g, jnp.zeros((), g.dtype),
                   ((0, 0, 0),
                    *((ks[a] - 1 - pads[a][0], pads[a][0] + x.shape[1 + a] - dilated[a],
                       strides[a] - 1) for a in range(2)),
                    (0, 0, 0)))
  dx = _shifted_taps(gp, kernel[::-1, ::-1], ((0, 0), (0, 0)), (1, 1))
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  dkernel = jnp.stack([
      jnp.stack([jnp.sum(_tap(xp, i, j, g.shape[1:3], strides) * g, axis=(0, 1, 2))
                 for j in range(ks[1])])
      for i in range(ks[0])])[:, :, None, :]
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)
