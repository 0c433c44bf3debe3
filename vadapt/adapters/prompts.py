"""Visual Prompt Tuning (VPT, Jia et al., 2022): learned prompt tokens in a frozen transformer.

VPT adds P learned tokens to the sequence a frozen ViT processes; only they (and the head) train.

  shallow  P prompts are inserted into the first block's input and travel through every block;
           they are removed from the encoder's output.
  deep     every block gets its own P prompts: inserted into its input and removed from its
           output, so the next block sees fresh prompts where the previous block's prompt outputs
           were (VPT-deep's replacement). Under nn.scan they are stacked (depth, P, D).

Both are 'wrap' adapters (vadapt.inject): they rewrite a block's token input (batch, tokens,
width) and its output; the backbone has no prompt code. Prompts go after the first
`prefix_tokens` tokens: the class token (VPT's "after the class token"), plus the register
tokens of DINOv2-style models, so the prefix stays where the model reads it. The blocks are
permutation-equivariant (no position information inside them), so where the prompts sit does not
change any other token's value; it only fixes what is stripped. Removing them before the
encoder's output means a 'token' classifier reads the class token and 'gap'/'map' pool over the
image tokens only, exactly as without prompts. Prompts get no position embedding.

VPT is not an identity at init: the prompts join attention from the first step. Parameters:
``<block>/adapter/prompts`` (P, D); shallow holds one set (at the first block), deep one per block.
Initialisation follows VPT: uniform(-v, v) with v = sqrt(6 / (3 * patch**2 + D)), the Xavier
range of the patch embedding the prompts live next to; prompt dropout acts on the prompts only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def init_range(width: int, patch_size: Optional[int]) -> float:
  """VPT's uniform init bound sqrt(6 / (3 p^2 + D)); without a patch size, sqrt(6 / 2D)."""
  fan_in = 3 * patch_size * patch_size if patch_size else width
  return math.sqrt(6.0 / float(fan_in + width))


def _check_tokens(x: Any, prefix_tokens: int, where: str) -> None:
  if not isinstance(x, jax.Array) or x.ndim != 3:
    found = f'shape {tuple(x.shape)}' if hasattr(x, 'shape') else type(x).__name__
    raise ValueError(f'VPT needs a token sequence (batch, tokens, width) {where}; found {found}. '
                     'Prompts go into transformer blocks (a ViT or CLIP image tower), not into '
                     'a backbone without tokens such as a ResNet.')
  if x.shape[1] < prefix_tokens:
    raise ValueError(f'VPT inserts prompts after {prefix_tokens} prefix tokens, but the sequence '
                     f'{where} has only {x.shape[1]} tokens.')


def strip_prompts(tree: Any, prefix_tokens: int, num_prompts: int) -> Any:
  """Removes tokens [prefix, prefix + P) on the token axis (-2) of every array in `tree`."""
  def strip(a):
    if a.ndim < 2 or a.shape[-2] < prefix_tokens + num_prompts:
      raise ValueError(f'Cannot remove {num_prompts} prompt tokens after {prefix_tokens} prefix '
                       f'tokens from an output of shape {tuple(a.shape)} (tokens on axis -2).')
    return jnp.concatenate([a[..., :prefix_tokens, :], a[..., prefix_tokens + num_prompts:, :]],
                           axis=-2)
  return jax.tree.map(strip, tree)


class PromptTokens(nn.Module):
  """Inserts P learned tokens after the prefix of a module's token input (a 'wrap' adapter).

  Attributes:
    num_prompts: P.
    prefix_tokens: tokens kept in front of the prompts (class token, registers).
    init_scale: the prompts start uniform in [-init_scale, init_scale].
    dropout_rate: dropout on the prompts (per example, as VPT).
    strip_output: remove the prompts from the module's output (deep VPT; shallow VPT leaves
      them in and strips them at the encoder's output).
    param_dtype: parameter dtype.
  """
  num_prompts: int
  prefix_tokens: int = 1
  init_scale: float = 0.02
  dropout_rate: float = 0.0
  strip_output: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, args: tuple, kwargs: dict, *,
               deterministic: bool = True) -> tuple[tuple, dict, Callable[[Any], Any]]:
    x = args[0] if args else None
    _check_tokens(x, self.prefix_tokens, "as the adapted module's first argument")
    n, _, d = x.shape
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -self.init_scale,
                                                        self.init_scale)
    prompts = self.param('prompts', init, (self.num_prompts, d), self.param_dtype)
    p = jnp.broadcast_to(prompts.astype(x.dtype), (n, self.num_prompts, d))
    p = nn.Dropout(rate=self.dropout_rate)(p, deterministic=deterministic)
    k = self.prefix_tokens
    x = jnp.concatenate([x[:, :k], p, x[:, k:]], axis=1)
    finish = ((lambda y: strip_prompts(y, k, self.num_prompts)) if self.strip_output
              else (lambda y: y))
    return (x, *args[1:]), kwargs, finish


class PromptStrip(nn.Module):
  """Removes P prompt tokens from a module's output (e.g. the encoder's, for shallow VPT).

  Attributes:
    num_prompts: P.
    prefix_tokens: tokens in front of the prompts.
  """
  num_prompts: int
  prefix_tokens: int = 1

  def __call__(self, args: tuple, kwargs: dict, *, deterministic: bool = True):
    del deterministic
    return args, kwargs, lambda y: strip_prompts(y, self.prefix_tokens, self.num_prompts)


def _check_count(num_prompts: Any, prefix_tokens: Any) -> None:
  if isinstance(num_prompts, bool) or int(num_prompts) != num_prompts or num_prompts < 1:
    raise ValueError(f'VPT needs a positive number of prompt tokens; found {num_prompts!r}.')
  if isinstance(prefix_tokens, bool) or int(prefix_tokens) != prefix_tokens or prefix_tokens < 0:
    raise ValueError(f'prefix_tokens must be a non-negative integer; found {prefix_tokens!r}.')


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Serialisable description of PromptTokens; its width comes from the tokens it sees.

  Attributes:
    num_prompts: prompt tokens per set, P.
    prefix_tokens: tokens before the prompts: 1 for a class token, + registers; 0 without.
    patch_size: the backbone's patch side, for VPT's init range (None: a Xavier range over D).
    dropout: dropout rate on the prompts.
    strip_output: remove the prompts from the adapted module's output (deep VPT).
  """
  num_prompts: int
  prefix_tokens: int = 1
  patch_size: Optional[int] = None
  dropout: float = 0.0
  strip_output: bool = True

  def __post_init__(self):
    _check_count(self.num_prompts, self.prefix_tokens)
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'dropout must be in [0, 1); found {self.dropout!r}.')

  def build(self, *, in_shape: tuple[int, ...], out_shape: Optional[tuple[int, ...]], name: str,
            parent: nn.Module) -> PromptTokens:
    del out_shape
    width = in_shape[-1] if in_shape else 1
    return PromptTokens(num_prompts=self.num_prompts, prefix_tokens=self.prefix_tokens,
                        init_scale=init_range(width, self.patch_size), dropout_rate=self.dropout,
                        strip_output=self.strip_output, name=name, parent=parent)

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'prompts', **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class PromptStripConfig:
  """Serialisable description of PromptStrip (no parameters).

  Attributes:
    num_prompts: P.
    prefix_tokens: tokens in front of the prompts.
  """
  num_prompts: int
  prefix_tokens: int = 1

  def __post_init__(self):
    _check_count(self.num_prompts, self.prefix_tokens)

  def build(self, *, in_shape: tuple[int, ...], out_shape: Optional[tuple[int, ...]], name: str,
            parent: nn.Module) -> PromptStrip:
    del in_shape, out_shape
    return PromptStrip(num_prompts=self.num_prompts, prefix_tokens=self.prefix_tokens,
                       name=name, parent=parent)

  def to_dict(self) -> dict[str, Any]:
    return {'kind': 'prompt_strip', **dataclasses.asdict(self)}
