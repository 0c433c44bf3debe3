"""PyTorch-layout state dicts of CNNs: reading (.pth/.pt, .safetensors), writing, tensor layouts.

Shared by the EfficientNet and ResNet loaders. A state dict here is a flat {'name.weight': numpy
array} map in PyTorch's layouts: conv weights (O, I/groups, kH, kW), linear weights (out, in),
BatchNorm weight/bias/running_mean/running_var (num_batches_tracked is dropped on reading).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from vadapt import files
from vadapt.pretrained.common import CheckpointMismatchError
from vadapt.pretrained.common import require_file

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')


def read(path: str | os.PathLike, what: str = 'checkpoint') -> dict[str, np.ndarray]:
  """A state dict from a .pth/.pt/.bin file (torch.load, weights only) or a .safetensors file.

  A checkpoint that wraps the weights ({'state_dict': ...} or {'model': ...}) is unwrapped and a
  'module.' prefix (DataParallel) is removed.
  """
  path = require_file(path, what)
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    tensors = load_file(path)
  elif path.endswith(TORCH_SUFFIXES):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f'Reading the PyTorch file {path!r} needs torch (pip install torch); or '
                        'convert it to .safetensors where torch is installed '
                        '(vadapt.pretrained.state_dict.save).') from None
    obj = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):
      if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
        obj = obj[key]
    if not isinstance(obj, Mapping):
      raise CheckpointMismatchError(f'{path!r} holds a {type(obj).__name__}, not a state dict.')
    tensors = {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, 'numpy')}
  else:
    raise ValueError(f'Unknown checkpoint file type {path!r}: expected .safetensors or a PyTorch '
                     f'file ({", ".join(TORCH_SUFFIXES)}).')
  tensors = {k.removeprefix('module.'): v for k, v in tensors.items()
             if not k.endswith('num_batches_tracked')}
  if not tensors:
    raise CheckpointMismatchError(f'{path!r} holds no tensors.')
  return tensors


def save(path: str | os.PathLike, state_dict: Mapping[str, Any],
         metadata: Optional[Mapping[str, str]] = None) -> str:
  """Writes a state dict (numpy or torch tensors) as .safetensors; returns the path."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not path.endswith('.safetensors'):
    raise ValueError(f'save writes .safetensors files; got {path!r}.')
  flat = {k: np.ascontiguousarray(v.detach().cpu().numpy() if hasattr(v, 'detach') else v)
          for k, v in state_dict.items()}
  with files.atomic_path(path) as tmp:
    save_file(flat, tmp, metadata=dict(metadata or {}))
  return path


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """(O, I/groups, kH, kW) -> Flax (kH, kW, I/groups, O)."""
  return np.transpose(weight, (2, 3, 1, 0))


def conv_weight(kernel: np.ndarray) -> np.ndarray:
  return np.transpose(kernel, (3, 2, 0, 1))


# Flax module leaf <- PyTorch parameter suffix, per layer kind; BatchNorm statistics go to the
# 'batch_stats' collection.
BN_PARAMS = {'scale': 'weight', 'bias': 'bias'}
BN_STATS = {'mean': 'running_mean', 'var': 'running_var'}


def to_flax(mapping: Mapping[str, tuple[str, str]], state: Mapping[str, np.ndarray],
            source: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
  """Converts `state` through `mapping` {torch module: (flax module, kind)}.

  kind is 'conv', 'bn' or 'linear'. Returns (flat params, flat batch_stats, unused torch keys).
  """
  params, stats, used = {}, {}, set()

  def take(key):
    used.add(key)
    return np.asarray(state[key])

  for torch_name, (flax_name, kind) in mapping.items():
    if kind == 'conv':
      if f'{torch_name}.weight' in state:
        params[f'{flax_name}/kernel'] = conv_kernel(take(f'{torch_name}.weight'))
      if f'{torch_name}.bias' in state:
        params[f'{flax_name}/bias'] = take(f'{torch_name}.bias')
    elif kind == 'linear':
      if f'{torch_name}.weight' in state:
        params[f'{flax_name}/kernel'] = take(f'{torch_name}.weight').T
      if f'{torch_name}.bias' in state:
        params[f'{flax_name}/bias'] = take(f'{torch_name}.bias')
    elif kind == 'bn':
      for leaf, suffix in BN_PARAMS.items():
        if f'{torch_name}.{suffix}' in state:
          params[f'{flax_name}/{leaf}'] = take(f'{torch_name}.{suffix}')
      for leaf, suffix in BN_STATS.items():
        if f'{torch_name}.{suffix}' in state:
          stats[f'{flax_name}/{leaf}'] = take(f'{torch_name}.{suffix}')
    else:
      raise ValueError(f'Unknown layer kind {kind!r} for {torch_name!r} in {source}.')
  return params, stats, sorted(set(state) - used)


def to_torch(mapping: Mapping[str, tuple[str, str]], params: Mapping[str, Any],
             stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of to_flax for flat params and batch_stats."""
  out = {}
  for torch_name, (flax_name, kind) in mapping.items():
    if kind in ('conv', 'linear'):
      if f'{flax_name}/kernel' in params:
        kernel = np.asarray(params[f'{flax_name}/kernel'])
        out[f'{torch_name}.weight'] = conv_weight(kernel) if kind == 'conv' else kernel.T
      if f'{flax_name}/bias' in params:
        out[f'{torch_name}.bias'] = np.asarray(params[f'{flax_name}/bias'])
    else:
      for leaf, suffix in BN_PARAMS.items():
        if f'{flax_name}/{leaf}' in params:
          out[f'{torch_name}.{suffix}'] = np.asarray(params[f'{flax_name}/{leaf}'])
      for leaf, suffix in BN_STATS.items():
        if f'{flax_name}/{leaf}' in stats:
          out[f'{torch_name}.{suffix}'] = np.asarray(stats[f'{flax_name}/{leaf}'])
  return out


def fit_head(params: dict[str, Any], expected: Mapping[str, Any], num_classes: Optional[int],
             source: str, head: str = 'head') -> None:
  """Drops the head (num_classes None) or zero-initialises it for another class count, in place."""
  keys = [k for k in params if k.startswith(f'{head}/')]
  if num_classes is None:
    for k in keys:
      del params[k]
    return
  want = expected.get(f'{head}/kernel')
  if want is None:
    return
  found = params.get(f'{head}/kernel')
  if found is None or tuple(np.shape(found)) != tuple(want.shape):
    params[f'{head}/kernel'] = np.zeros(want.shape, want.dtype)
    bias = expected[f'{head}/bias']
    params[f'{head}/bias'] = np.zeros(bias.shape, bias.dtype)
    del source  # The new head is the expected outcome of a new class count; nothing to report.
