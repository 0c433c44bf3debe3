"""Building blocks shared by the backbones and the adapters (the lowest floor of the package).

Models (vadapt.models) and adapters (vadapt.adapters) both import from here; this module imports
nothing from vadapt.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # vit_jax and big_vision train with the tanh approximation (flax's default).
    'gelu': lambda x: nn.gelu(x, approximate=True),
    # Hugging Face's "gelu" is the exact erf form.
    'gelu_exact': lambda x: nn.gelu(x, approximate=False),
    'quick_gelu': quick_gelu,
    'relu': nn.relu,
    # The gate of SwiGLU MLPs (DINOv2 ViT-g).
    'silu': nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]
