"""Vision Transformer in compact Flax linen, with vit_jax / big_vision parameter names.

Parameter layout (what checkpoints are mapped onto)::

  embedding/{kernel,bias}                      conv patch embedding, kernel (p, p, C, D)
  cls                                          (1, 1, D) class token, classifier == 'token'
  Transformer/posembed_input/pos_embedding     (1, N[+1], D)
  Transformer/encoderblock_{i}/LayerNorm_0
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value}/kernel (D, H, D/H)
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/out/kernel               (H, D/H, D)
  Transformer/encoderblock_{i}/LayerNorm_1
  Transformer/encoderblock_{i}/MlpBlock_0/Dense_{0,1}
  Transformer/encoderblock_{i}/LayerScale_{0,1}/scale  (D,)  layer_scale_init is not None
  Transformer/encoder_norm
  registers                                    (1, R, D) register tokens, num_registers > 0
  MAPHead_0/...                                classifier == 'map'
  pre_logits/{kernel,bias}                     representation_size is not None
  head/{kernel,bias}                           num_classes is not None

With ``scan=True`` the blocks live at ``Transformer/encoderblock/...`` with a leading depth axis
(big_vision's scan layout).

DINOv2 (Oquab et al., 2024) is this ViT with options (``dinov2(variant)``, ``DINOV2_VARIANTS``):
LayerScale after each sub-layer, exact GELU (SwiGLU for ViT-g), patch 14, optional register
tokens (Darcet et al., 2024), and a position table of a fixed 37x37 grid that is resampled at call
time to the input's patch grid exactly as DINOv2 does (``interpolate_grid``), so one set of
parameters serves every resolution. The token sequence is [class, registers..., patches...].

The module holds no adapter code: adapters are added from outside by ``vadapt.inject``. Every
module that adapters may target (``MultiHeadDotProductAttention_0``, ``MlpBlock_0``, the blocks) is
written in compact style, which interception needs in order to create parameters.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vadapt.layers import get_activation
from vadapt.layers import head_major_einsum

Dtype = Any

# 'token_gap': [class token, mean of the patch tokens] (2D), DINOv2's linear-probe features.
CLASSIFIERS = ('token', 'gap', 'map', 'token_gap')

# What a rematerialised block keeps for the backward pass. 'nothing': only the block's input (least
# memory, one extra forward pass). 'dots': also the outputs of its Dense projections (q, k, v,
# out, MLP), so the backward pass recomputes only attention scores and element-wise work; with a
# frozen backbone this keeps most of remat's saving at a fraction of its compute.
REMAT_POLICIES = {
    'nothing': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# The attention products on head-major operands (vadapt.layers.head_major_einsum: the same
# arithmetic as flax's default, several times faster on XLA:CPU).
ATTENTION_EINSUM = lambda: head_major_einsum


# What a transformer block's MLP keeps for the backward pass under recompute_activation: the
# outputs of its matmuls (Dense_0's is the activation's input); the backward pass recomputes the
# element-wise work from them (the activation, bias adds, and the same inside any adapter there).
# A trained Dense_1 (full fine-tuning, a weight-space method on it) needs the activation's output
# for its weight gradient: recomputed too, instead of kept as a second hidden-sized array a block.
RECOMPUTE_MLP_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def get_remat_policy(name: str):
  if name not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {name!r}; known: {sorted(REMAT_POLICIES)}.')
  return REMAT_POLICIES[name]



def _narrow(dtype) -> bool:
  """Whether a compute dtype is narrower than float32 (bf16, f16): the attention softmax then
  runs in float32. float32 and float64 keep their own precision."""
  return dtype is not None and jnp.finfo(dtype).bits < 32

class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> activation -> dropout -> Dense -> dropout.

  Attributes:
    mlp_dim: hidden width.
    out_dim: output width (defaults to the input width).
    activation: a name in vadapt.layers.ACTIVATIONS.
    gated: a gated linear unit (SwiGLU with activation='silu', as in DINOv2 ViT-g): Dense_0 emits
      2 * mlp_dim features [gate, value] and the hidden is activation(gate) * value. Dense_0 stays
      one fused kernel because that is how DINOv2 files store it (w12 / weights_in).
    dropout_rate: dropout after each Dense.
    recompute_activation: recompute the MLP activation in the backward pass from its input
      instead of keeping its internals (tanh-GELU: one hidden-sized array a block less; the
      gradient's last bits may differ). Encoder1DBlock does more: see RECOMPUTE_MLP_POLICY.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  mlp_dim: int
  out_dim: Optional[int] = None
  activation: str = 'gelu'
  gated: bool = False
  dropout_rate: float = 0.0
  recompute_activation: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, *, deterministic: bool = True) -> jax.Array:
    out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    x = dense(self.mlp_dim * (2 if self.gated else 1), 'Dense_0')(inputs)
    activation = get_activation(self.activation)
    if self.recompute_activation:  # Only the input is kept for the backward pass.
      activation = jax.checkpoint(activation)
    if self.gated:
      gate, x = jnp.split(x, 2, axis=-1)
      x = activation(gate) * x
    else:
      x = activation(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, 'Dense_1')(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class LayerScale(nn.Module):
  """A learned per-channel gain on a residual branch (CaiT, Touvron et al., 2021; DINOv2).

  Kept as its own parameter (not folded into the preceding Dense) so the layout maps 1:1 onto
  DINOv2 files (``ls1.gamma``, ``layer_scale1.lambda1``).

  Attributes:
    init_value: initial gain of every channel.
    param_dtype: parameter dtype.
  """
  init_value: float = 1.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.constant(self.init_value), (x.shape[-1],),
                       self.param_dtype)
    return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block, shared by ViT, DINOv2 and both CLIP towers.

  With LayerScale the block is x + LayerScale_0(Attn(LN(x))), then + LayerScale_1(MLP(LN(.))).
  Adapters placed on a sub-layer's output (vadapt.placements: Houlsby, Pfeiffer, AdaptFormer)
  wrap ``MultiHeadDotProductAttention_0`` / ``MlpBlock_0`` themselves, so LayerScale applies after
  the adapter: the adapted sub-layer f + a(f) takes f's place inside the block, with the gain the
  pre-trained model learned for that branch. The adapter sees the sub-layer's output at its
  natural scale (DINOv2's gains range over orders of magnitude across channels and depth), and a
  zero-initialised adapter leaves the block exactly as it was.

  Attributes:
    mlp_dim: MLP hidden width.
    num_heads: attention heads.
    activation: MLP activation name ('gelu', 'gelu_exact', 'quick_gelu', 'silu').
    gated_mlp: gated MLP (SwiGLU with activation='silu'), see MlpBlock.
    layer_scale_init: None for no LayerScale; else LayerScale_{0,1} after the attention and the
      MLP, initialised to this gain.
    layer_norm_epsilon: 1e-6 for vit_jax/big_vision/DINOv2, 1e-5 for CLIP, 1e-12 for HF ViT.
    causal: apply a causal attention mask (CLIP's text tower).
    dropout_rate: dropout after attention and in the MLP.
    attention_dropout_rate: dropout on attention weights.
    recompute_activation: see MlpBlock.
    dtype: compute dtype (matmuls); the attention softmax runs in float32 when it is narrower.
    param_dtype: parameter dtype.
  """
  mlp_dim: int
  num_heads: int
  activation: str = 'gelu'
  gated_mlp: bool = False
  layer_scale_init: Optional[float] = None
  layer_norm_epsilon: float = 1e-6
  causal: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  recompute_activation: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool = True) -> jax.Array:
    norm = lambda name: nn.LayerNorm(
        epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    mask = nn.make_causal_mask(jnp.ones(inputs.shape[:2], jnp.int32)) if self.causal else None

    x = norm('LayerNorm_0')(inputs)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), broadcast_dropout=False,
        dropout_rate=self.attention_dropout_rate, force_fp32_for_softmax=_narrow(self.dtype),
        qk_attn_weights_einsum_cls=ATTENTION_EINSUM, attn_weights_value_einsum_cls=ATTENTION_EINSUM,
        name='MultiHeadDotProductAttention_0',
    )(x, x, mask=mask, deterministic=deterministic)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    if self.layer_scale_init is not None:
      x = LayerScale(self.layer_scale_init, self.param_dtype, name='LayerScale_0')(x)
    x = x + inputs

    y = norm('LayerNorm_1')(x)
    # recompute_activation: the remat around the whole MLP replaces MlpBlock's own.
    mlp_cls = (nn.remat(MlpBlock, policy=RECOMPUTE_MLP_POLICY) if self.recompute_activation
               else MlpBlock)
    y = mlp_cls(
        mlp_dim=self.mlp_dim, activation=self.activation, gated=self.gated_mlp,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype, name='MlpBlock_0',
    )(y, deterministic=deterministic)
    if self.layer_scale_init is not None:
      y = LayerScale(self.layer_scale_init, self.param_dtype, name='LayerScale_1')(y)
    return x + y


class _ScanEncoder1DBlock(Encoder1DBlock):
  """The same block with nn.scan's (carry, xs) -> (carry, ys) signature; ys are block outputs.

  xs is the block's index (an int32 scalar, `layer`): the block ignores it; it tells code that
  intercepts the block (vadapt.multi's AdapterDrop at inference) which layer is running.
  """

  def __call__(self, inputs, layer, deterministic=True):  # pytype: disable=signature-mismatch
    del layer
    x = super().__call__(inputs, deterministic)
    return x, x


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel at distances t (any shape), coefficient a."""
  t = np.abs(t)
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((t - 5) * t + 8) * t * a - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def resample_matrix(in_size: int, out_size: int, *, offset: float = 0.0,
                    antialias: bool = False) -> np.ndarray:
  """(out_size, in_size) float64 weights of PyTorch's bicubic ``interpolate`` along one axis.

  ``align_corners=False`` (half-pixel centres). offset == 0: called with ``size=out_size``, so
  the step is in/out. offset > 0: called with ``scale_factor=(out + offset) / in`` as the official
  DINOv2 code does (its ``interpolate_offset=0.1``), so the step is in / (out + offset).
  antialias=False: Keys' kernel with a = -0.75, taps outside the input clamped to the edge
  (``upsample_bicubic2d``). antialias=True: PIL-style resampling with a = -0.5, the kernel
  widened by the step when shrinking, taps outside the input dropped and the rest renormalised
  (``_upsample_bicubic2d_aa``), as transformers' Dinov2WithRegisters and DINOv2's register
  models do.
  """
  step = in_size / (out_size + offset) if offset else in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  weights = np.zeros((out_size, in_size), np.float64)
  if not antialias:
    src = step * (dst + 0.5) - 0.5
    left = np.floor(src)
    taps = left[:, None] + np.arange(-1, 3)[None, :]               # (out, 4)
    w = _cubic_weights(src[:, None] - taps, -0.75)
    idx = np.clip(taps, 0, in_size - 1).astype(np.int64)
    np.add.at(weights, (np.repeat(np.arange(out_size), 4), idx.ravel()), w.ravel())
    return weights
  support = 2.0 * step if step >= 1.0 else 2.0
  inv = 1.0 / step if step >= 1.0 else 1.0
  for i, centre in enumerate(step * (dst + 0.5)):
    lo = max(int(centre - support + 0.5), 0)   # int() truncates towards zero, as in ATen.
    hi = min(int(centre + support + 0.5), in_size)
    w = _cubic_weights((np.arange(lo, hi) - centre + 0.5) * inv, -0.5)
    weights[i, lo:hi] = w / w.sum()
  return weights


def interpolate_grid(table: jax.Array, grid: tuple[int, int], out_grid: tuple[int, int], *,
                     offset: float = 0.0, antialias: bool = False) -> jax.Array:
  """Resamples a (1, gh*gw, D) grid of position embeddings to (1, oh*ow, D) as DINOv2 does.

  Bicubic in float32 (see resample_matrix for the conventions); the separable weights are
  computed once on the host for the static shapes, so this is two small matmuls under jit. An
  unchanged grid is returned as is, as the reference does.
  """
  (gh, gw), (oh, ow) = grid, out_grid
  if (gh, gw) == (oh, ow):
    return table
  if offset:  # The reference asserts this too: the scale factor must give back the wanted size.
    for n, o in ((gh, oh), (gw, ow)):
      if math.floor(n * ((o + offset) / n)) != o:
        raise ValueError(f'interpolate offset {offset} maps a {n}-wide grid to '
                         f'{math.floor(n * ((o + offset) / n))} positions, not {o}.')
  wh = jnp.asarray(resample_matrix(gh, oh, offset=offset, antialias=antialias), jnp.float32)
  ww = jnp.asarray(resample_matrix(gw, ow, offset=offset, antialias=antialias), jnp.float32)
  x = table.astype(jnp.float32).reshape(gh, gw, -1)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('bj,ijd->ibd', ww, x, precision=hi)
  x = jnp.einsum('ai,ibd->abd', wh, x, precision=hi)
  return x.reshape(1, oh * ow, -1).astype(table.dtype)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding.

  By default the table has one position per input token, shape (1, tokens, width). With
  ``grid`` set it holds a fixed square grid (1, [1 +] grid**2, width) (a leading class-token slot
  when ``has_cls``), resampled at call time to the input's patch grid (DINOv2).

  Attributes:
    grid: side of the stored position grid; None for a table that follows the input.
    has_cls: (with grid) the first input token and the first table row are the class token's.
    interpolation_offset: (with grid) see resample_matrix: 0.0 for transformers, 0.1 for the
      official DINOv2 code.
    interpolation_antialias: (with grid) see resample_matrix: True for register models.
    param_dtype: parameter dtype.
  """
  grid: Optional[int] = None
  has_cls: bool = True
  interpolation_offset: float = 0.0
  interpolation_antialias: bool = False
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array,
               patch_grid: Optional[tuple[int, int]] = None) -> jax.Array:
    if self.grid is not None:
      return inputs + self._interpolated(inputs, patch_grid).astype(inputs.dtype)
    shape = (1, inputs.shape[1], inputs.shape[2])
    if self.has_variable('params', 'pos_embedding'):
      stored = self.get_variable('params', 'pos_embedding').shape
      if tuple(stored) != shape:
        raise ValueError(
            f'The input gives {inputs.shape[1]} tokens but the position embedding holds '
            f'{stored[1]} (shape {tuple(stored)}): feed images of the size the model was built '
            'for, or load the checkpoint with vadapt.pretrained.vit.resize_posemb for the new size.')
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
    return inputs + pe.astype(inputs.dtype)

  def _interpolated(self, inputs: jax.Array, patch_grid: Optional[tuple[int, int]]) -> jax.Array:
    slot = 1 if self.has_cls else 0
    if patch_grid is None or inputs.shape[1] != slot + patch_grid[0] * patch_grid[1]:
      raise ValueError(f'A fixed {self.grid}x{self.grid} position grid needs the input patch grid '
                       f'and {slot} + gh*gw tokens; found {patch_grid} and {inputs.shape[1]}.')
    shape = (1, slot + self.grid * self.grid, inputs.shape[2])
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), shape, self.param_dtype)
    grid = interpolate_grid(pe[:, slot:], (self.grid, self.grid), tuple(patch_grid),
                            offset=self.interpolation_offset,
                            antialias=self.interpolation_antialias)
    return jnp.concatenate([pe[:, :slot], grid], axis=1)


class Encoder(nn.Module):
  """Position embedding, a stack of Encoder1DBlocks and a final LayerNorm.

  Attributes:
    num_layers: depth.
    mlp_dim: MLP hidden width.
    num_heads: attention heads.
    activation: MLP activation name.
    layer_norm_epsilon: LayerNorm epsilon.
    posemb_includes_cls: vit_jax adds the position embedding after the class token is prepended
      (N + 1 positions); big_vision adds it to the patches only (N positions).
    posemb_grid: None: one position per token at the input resolution; an int: a fixed
      posemb_grid x posemb_grid table resampled to the input (DINOv2, see AddPositionEmbs).
    posemb_interpolation_offset: see resample_matrix.
    posemb_interpolation_antialias: see resample_matrix.
    gated_mlp: gated (SwiGLU) MLPs.
    layer_scale_init: None, or LayerScale in every block with this initial gain.
    dropout_rate: dropout rate.
    attention_dropout_rate: attention dropout rate.
    scan: run the blocks under nn.scan (params stacked on a leading depth axis).
    remat: rematerialise each block in the backward pass.
    remat_policy: what a rematerialised block saves, a name in REMAT_POLICIES.
    recompute_activation: see MlpBlock.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  activation: str = 'gelu'
  layer_norm_epsilon: float = 1e-6
  posemb_includes_cls: bool = True
  posemb_grid: Optional[int] = None
  posemb_interpolation_offset: float = 0.0
  posemb_interpolation_antialias: bool = False
  gated_mlp: bool = False
  layer_scale_init: Optional[float] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  scan: bool = False
  remat: bool = False
  remat_policy: str = 'nothing'
  recompute_activation: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, cls_token: Optional[jax.Array] = None,
               registers: Optional[jax.Array] = None,
               patch_grid: Optional[tuple[int, int]] = None,
               train: bool = False, keep_blocks: bool = True) -> tuple[jax.Array, jax.Array]:
    """Returns (encoded (B, T, D), per-block outputs (depth, B, T, D), or None unless
    keep_blocks: a batch replicated partway up the stack, as multi-task inference does, has
    blocks of different batch sizes).

    Tokens are [cls_token, registers..., x...]; registers get no position embedding (as in
    DINOv2). patch_grid (gh, gw) is x's patch grid, needed with posemb_grid.
    """
    with_cls = cls_token is not None and self.posemb_includes_cls
    if with_cls:
      x = jnp.concatenate([cls_token, x], axis=1)
    x = AddPositionEmbs(
        grid=self.posemb_grid, has_cls=with_cls,
        interpolation_offset=self.posemb_interpolation_offset,
        interpolation_antialias=self.posemb_interpolation_antialias,
        param_dtype=self.param_dtype, name='posembed_input')(x, patch_grid)
    if cls_token is not None and not self.posemb_includes_cls:
      x = jnp.concatenate([cls_token, x], axis=1)
    if registers is not None:
      prefix = 0 if cls_token is None else 1
      x = jnp.concatenate([x[:, :prefix], registers, x[:, prefix:]], axis=1)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)

    block_kwargs = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, activation=self.activation,
        gated_mlp=self.gated_mlp, layer_scale_init=self.layer_scale_init,
        layer_norm_epsilon=self.layer_norm_epsilon, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        recompute_activation=self.recompute_activation, dtype=self.dtype,
        param_dtype=self.param_dtype)
    if self.scan:
      block_cls = _ScanEncoder1DBlock
      if self.remat:
        block_cls = nn.remat(block_cls, prevent_cse=False, static_argnums=(3,),
                             policy=get_remat_policy(self.remat_policy))
      x, blocks = nn.scan(
          block_cls, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=(0, nn.broadcast), length=self.num_layers,
      )(name='encoderblock', **block_kwargs)(x, jnp.arange(self.num_layers, dtype=jnp.int32),
                                             not train)
    else:
      block_cls = (nn.remat(Encoder1DBlock, static_argnums=(2,),
                            policy=get_remat_policy(self.remat_policy))
                   if self.remat else Encoder1DBlock)
      outputs = []
      for i in range(self.num_layers):
        x = block_cls(name=f'encoderblock_{i}', **block_kwargs)(x, not train)
        outputs.append(x)
      blocks = jnp.stack(outputs) if keep_blocks else None
    encoded = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                           param_dtype=self.param_dtype, name='encoder_norm')(x)
    return encoded, blocks


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): one learned probe attends over the tokens.

  Attributes:
    num_heads: attention heads.
    mlp_dim: MLP hidden width (defaults to 4 x width).
    layer_norm_epsilon: LayerNorm epsilon.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  num_heads: int
  mlp_dim: Optional[int] = None
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe.astype(x.dtype), [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), force_fp32_for_softmax=_narrow(self.dtype),
        name='MultiHeadDotProductAttention_0',
    )(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim or 4 * d, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='MlpBlock_0')(y)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier (Dosovitskiy et al., 2021) with vit_jax / big_vision names.

  Attributes:
    num_classes: head width; None returns the pre-logits features instead of logits.
    patch_size: square patch side in pixels.
    hidden_size: token width D.
    num_layers: depth.
    num_heads: attention heads.
    mlp_dim: MLP hidden width.
    classifier: 'token' (class token), 'gap' (mean over patches), 'map' (attention pooling) or
      'token_gap' (class token and mean patch token concatenated, as DINOv2's linear probes and
      transformers' Dinov2ForImageClassification).
    representation_size: width of the tanh pre-logits layer; None for no such layer.
    posemb_includes_cls: True for vit_jax checkpoints (class token has a position), False for
      big_vision ones.
    posemb_grid: None: the position table follows the input resolution (resized by the loaders);
      an int: a fixed grid resampled at call time to any resolution (DINOv2: 37).
    posemb_interpolation_offset: (posemb_grid) 0.0 as transformers, 0.1 as the official DINOv2
      code; see resample_matrix.
    posemb_interpolation_antialias: (posemb_grid) antialiased bicubic, as DINOv2 register models.
    num_registers: register tokens after the class token (DINOv2 with registers: 4).
    layer_scale_init: None for no LayerScale; else LayerScale in every block with this gain.
    gated_mlp: SwiGLU MLPs (DINOv2 ViT-g; mlp_dim is the gated hidden width).
    activation: MLP activation ('gelu' = tanh approximation as trained by vit_jax/big_vision,
      'gelu_exact' as in Hugging Face and DINOv2, 'quick_gelu' as in CLIP, 'silu' for SwiGLU).
    layer_norm_epsilon: LayerNorm epsilon.
    channels: input channels (checked at call time).
    dropout_rate: dropout rate.
    attention_dropout_rate: attention dropout rate.
    scan: nn.scan over blocks (stacked params).
    remat: rematerialise blocks.
    remat_policy: what rematerialised blocks save ('nothing' or 'dots', see REMAT_POLICIES).
    recompute_activation: recompute each MLP activation in the backward pass (see MlpBlock).
    head_bias_init: initial head bias (vit_jax uses 0; big_vision sometimes -6.9 for sigmoid).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  num_classes: Optional[int]
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = 'token'
  representation_size: Optional[int] = None
  posemb_includes_cls: bool = True
  posemb_grid: Optional[int] = None
  posemb_interpolation_offset: float = 0.0
  posemb_interpolation_antialias: bool = False
  num_registers: int = 0
  layer_scale_init: Optional[float] = None
  gated_mlp: bool = False
  activation: str = 'gelu'
  layer_norm_epsilon: float = 1e-6
  channels: int = 3
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  scan: bool = False
  remat: bool = False
  remat_policy: str = 'nothing'
  recompute_activation: bool = False
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               return_features: bool = False):
    """Maps images (B, H, W, C) to logits (B, num_classes).

    With return_features=True returns (output, features) where features holds 'patches'
    (B, N, D), 'blocks' (depth, B, T, D), 'encoded' (B, T, D) and 'pre_logits' (B, D'). The T
    tokens are [class token, registers..., patches...].
    """
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'Unknown classifier {self.classifier!r}; known: {CLASSIFIERS}.')
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f'Expected images of shape (batch, height, width, {self.channels}); '
                       f'found shape {tuple(images.shape)}.')
    h, w = images.shape[1:3]
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'Image size {h}x{w} is not divisible by the patch size {self.patch_size}: '
                       f'expected a height and width that are multiples of {self.patch_size}.')

    x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                strides=(self.patch_size, self.patch_size), padding='VALID', dtype=self.dtype,
                param_dtype=self.param_dtype, name='embedding')(images.astype(self.dtype))
    n, gh, gw, d = x.shape
    patches = x = jnp.reshape(x, (n, gh * gw, d))

    cls_token = registers = None
    if self.classifier in ('token', 'token_gap'):
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d), self.param_dtype)
      cls_token = jnp.tile(cls.astype(x.dtype), [n, 1, 1])
    if self.num_registers:
      reg = self.param('registers', nn.initializers.normal(stddev=1e-6),
                       (1, self.num_registers, d), self.param_dtype)
      registers = jnp.tile(reg.astype(x.dtype), [n, 1, 1])

    encoded, blocks = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
        posemb_includes_cls=self.posemb_includes_cls, posemb_grid=self.posemb_grid,
        posemb_interpolation_offset=self.posemb_interpolation_offset,
        posemb_interpolation_antialias=self.posemb_interpolation_antialias,
        gated_mlp=self.gated_mlp, layer_scale_init=self.layer_scale_init,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, scan=self.scan, remat=self.remat,
        remat_policy=self.remat_policy, recompute_activation=self.recompute_activation,
        dtype=self.dtype, param_dtype=self.param_dtype, name='Transformer',
    )(x, cls_token=cls_token, registers=registers, patch_grid=(gh, gw), train=train,
      keep_blocks=return_features)

    prefix = (cls_token is not None) + self.num_registers  # tokens before the patches
    if self.classifier == 'token':
      x = encoded[:, 0]
    elif self.classifier == 'token_gap':
      x = jnp.concatenate([encoded[:, 0], jnp.mean(encoded[:, prefix:], axis=1)], axis=-1)
    elif self.classifier == 'gap':
      x = jnp.mean(encoded[:, prefix:], axis=1)
    else:
      x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                  layer_norm_epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='MAPHead_0')(encoded)

    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='pre_logits')(x)
      x = jnp.tanh(x)
    pre_logits = x

    if self.num_classes is not None:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    if return_features:
      return x, {'patches': patches, 'blocks': blocks, 'encoded': encoded,
                 'pre_logits': pre_logits}
    return x


# Widths of the published ViT families: (hidden_size, num_layers, num_heads, mlp_dim).
WIDTHS: dict[str, tuple[int, int, int, int]] = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
    # A tiny family for tests and CPU smoke runs; not a published model.
    'mu': (32, 2, 2, 64),
}

# Width/patch pairs for which public checkpoints exist (vit_jax, AugReg, big_vision, CLIP, DINO).
VARIANTS: tuple[str, ...] = (
    'Ti/16', 'Ti/32',
    'S/8', 'S/14', 'S/16', 'S/32',
    'B/8', 'B/14', 'B/16', 'B/32',
    'L/14', 'L/16', 'L/32',
    'H/14',
    'mu/4', 'mu/8',
)


def variant_config(variant: str) -> dict[str, int]:
  """'B/16' -> dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=16)."""
  match = re.fullmatch(r'(\w+)/(\d+)', variant)
  if variant not in VARIANTS or not match:
    raise ValueError(f'Unknown ViT variant {variant!r}; known variants: {", ".join(VARIANTS)}.')
  width, patch = match.group(1), int(match.group(2))
  hidden_size, num_layers, num_heads, mlp_dim = WIDTHS[width]
  return dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
              mlp_dim=mlp_dim, patch_size=patch)


def from_variant(variant: str, num_classes: Optional[int] = 1000, **overrides) -> VisionTransformer:
  """Builds a VisionTransformer by variant name, e.g. from_variant('B/16', num_classes=10)."""
  kwargs = variant_config(variant)
  known = {f.name for f in dataclasses.fields(VisionTransformer)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise TypeError(f'Unknown VisionTransformer options {unknown}; known: {sorted(known)}.')
  kwargs.update(overrides)
  return VisionTransformer(num_classes=num_classes, **kwargs)


# DINOv2 widths: (hidden_size, num_layers, num_heads, mlp_dim, gated MLP). ViT-g's SwiGLU keeps
# two thirds of 4 x 1536, rounded up to a multiple of 8: 4096.
DINOV2_WIDTHS: dict[str, tuple[int, int, int, int, bool]] = {
    'S': (384, 12, 6, 1536, False),
    'B': (768, 12, 12, 3072, False),
    'L': (1024, 24, 16, 4096, False),
    'g': (1536, 40, 24, 4096, True),
    # A tiny family for tests and CPU smoke runs; not a published model.
    'mu': (32, 2, 2, 64, False),
}
# '-reg': with 4 register tokens (Darcet et al., 2024; dinov2_vit*14_reg, Dinov2WithRegisters).
DINOV2_VARIANTS: tuple[str, ...] = tuple(
    f'{w}/14{reg}' for reg in ('', '-reg') for w in DINOV2_WIDTHS)
DINOV2_PATCH = 14
# Pre-trained at 518 px: a 37 x 37 position grid plus the class-token slot.
DINOV2_GRID = 37
DINOV2_REGISTERS = 4


def dinov2_config(variant: str) -> dict[str, Any]:
  """VisionTransformer kwargs of a DINOv2 variant, e.g. 'S/14' or 'B/14-reg'.

  The position-grid resampling follows transformers (Dinov2Model: bicubic; Dinov2WithRegisters:
  antialiased bicubic); LayerScale starts at transformers' default gain, 1.0.
  """
  match = re.fullmatch(r'(\w+)/14(-reg)?', variant)
  if variant not in DINOV2_VARIANTS or not match:
    raise ValueError(f'Unknown DINOv2 variant {variant!r}; known variants: '
                     f'{", ".join(DINOV2_VARIANTS)}.')
  hidden_size, num_layers, num_heads, mlp_dim, gated = DINOV2_WIDTHS[match.group(1)]
  registers = bool(match.group(2))
  return dict(
      hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim,
      patch_size=DINOV2_PATCH, classifier='token', posemb_includes_cls=True,
      posemb_grid=DINOV2_GRID, posemb_interpolation_offset=0.0,
      posemb_interpolation_antialias=registers,
      num_registers=DINOV2_REGISTERS if registers else 0, layer_scale_init=1.0,
      gated_mlp=gated, activation='silu' if gated else 'gelu_exact', layer_norm_epsilon=1e-6)


def dinov2(variant: str, num_classes: Optional[int] = None, **overrides) -> VisionTransformer:
  """Builds a DINOv2 VisionTransformer by variant name, e.g. dinov2('S/14', num_classes=10).

  num_classes=None returns the class token after the final LayerNorm (transformers'
  pooler_output); classifier='token_gap' reads the class token and the mean patch token.
  """
  kwargs = dinov2_config(variant)
  known = {f.name for f in dataclasses.fields(VisionTransformer)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise TypeError(f'Unknown VisionTransformer options {unknown}; known: {sorted(known)}.')
  kwargs.update(overrides)
  return VisionTransformer(num_classes=num_classes, **kwargs)
