"""ResNet checkpoints users hold, onto vadapt.models.resnet (BatchNorm statistics included).

Formats (read from .pth/.pt/.bin with torch, or from .safetensors without it):

* ``torchvision``: torchvision / timm state dicts: ``conv1``, ``bn1``,
  ``layer{1-4}.{i}.conv{1,2,3}``, ``bn{1,2,3}``, ``downsample.{0,1}``, ``fc``.
* ``hf``: Hugging Face ``ResNetModel`` / ``ResNetForImageClassification`` safetensors (a file, or
  a ``save_pretrained`` directory whose config.json is read): ``embedder.embedder``,
  ``encoder.stages.{s}.layers.{i}.layer.{j}``, ``...shortcut``, ``classifier.1``.

The architecture (block type, blocks per stage, stem width, class count) is read from the file
(`inspect`, `model_from_checkpoint`); loading onto a model of another depth or width is one
CheckpointMismatchError naming both. v1 and v1.5 bottlenecks have the same tensors: a Hugging Face
config.json with ``downsample_in_bottleneck: true`` selects v1 (stride on the first 1x1 conv);
torchvision and timm models are v1.5.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vadapt.models import resnet
from vadapt.pretrained import state_dict as sd_lib
from vadapt.pretrained.common import CheckpointMismatchError
from vadapt.pretrained.common import check_matches
from vadapt.pretrained.common import flatten
from vadapt.pretrained.common import require_file
from vadapt.pretrained.common import unflatten

FORMATS = ('torchvision', 'hf')


def _blocks(stage_sizes, bottleneck: bool):
  """(stage, index in stage, flax block name) for every block."""
  cls = 'BottleneckResNetBlock' if bottleneck else 'ResNetBlock'
  k = 0
  for s, n in enumerate(stage_sizes):
    for i in range(n):
      yield s, i, f'{cls}_{k}'
      k += 1


def layer_map(fmt: str, stage_sizes, bottleneck: bool, projections: set[tuple[int, int]],
              prefix: str = '') -> dict[str, tuple[str, str]]:
  """{torch module: (flax module, kind)} for one layout; `projections` lists (stage, i) blocks
  with a projection shortcut."""
  convs = 3 if bottleneck else 2
  if fmt == 'torchvision':
    m = {'conv1': ('conv_init', 'conv'), 'bn1': ('bn_init', 'bn'), 'fc': ('head', 'linear')}
    for s, i, name in _blocks(stage_sizes, bottleneck):
      t = f'layer{s + 1}.{i}.'
      for j in range(convs):
        m[f'{t}conv{j + 1}'] = (f'{name}/Conv_{j}', 'conv')
        m[f'{t}bn{j + 1}'] = (f'{name}/BatchNorm_{j}', 'bn')
      if (s, i) in projections:
        m[f'{t}downsample.0'] = (f'{name}/conv_proj', 'conv')
        m[f'{t}downsample.1'] = (f'{name}/norm_proj', 'bn')
    return m
  m = {f'{prefix}embedder.embedder.convolution': ('conv_init', 'conv'),
       f'{prefix}embedder.embedder.normalization': ('bn_init', 'bn'),
       'classifier.1': ('head', 'linear')}
  for s, i, name in _blocks(stage_sizes, bottleneck):
    t = f'{prefix}encoder.stages.{s}.layers.{i}.'
    for j in range(convs):
      m[f'{t}layer.{j}.convolution'] = (f'{name}/Conv_{j}', 'conv')
      m[f'{t}layer.{j}.normalization'] = (f'{name}/BatchNorm_{j}', 'bn')
    if (s, i) in projections:
      m[f'{t}shortcut.convolution'] = (f'{name}/conv_proj', 'conv')
      m[f'{t}shortcut.normalization'] = (f'{name}/norm_proj', 'bn')
  return m


def _hf_files(path: str) -> tuple[str, Optional[str]]:
  """(weights file, config.json or None) for a file or a save_pretrained directory."""
  if os.path.isdir(path):
    weights = os.path.join(path, 'model.safetensors')
    if not os.path.exists(weights):
      raise FileNotFoundError(f'{path!r} is a directory without model.safetensors (found '
                              f'{sorted(os.listdir(path))[:8]}).')
    config = os.path.join(path, 'config.json')
    return weights, config if os.path.exists(config) else None
  config = os.path.join(os.path.dirname(path), 'config.json')
  return path, config if os.path.exists(config) else None


def _hf_config(config_path: Optional[str]) -> dict[str, Any]:
  if not config_path:
    return {}
  with open(config_path) as f:
    c = json.load(f)
  if c.get('model_type', 'resnet') != 'resnet':
    raise CheckpointMismatchError(f'{config_path} is a {c.get("model_type")!r} config; expected '
                                  'a Hugging Face ResNet (model_type "resnet").')
  if c.get('hidden_act', 'relu') != 'relu':
    raise CheckpointMismatchError(f'{config_path}: hidden_act {c["hidden_act"]!r} is not '
                                  "supported; vadapt's ResNet uses relu.")
  if c.get('downsample_in_first_stage', False):
    raise CheckpointMismatchError(f'{config_path}: downsample_in_first_stage=true is not '
                                  "supported; vadapt's ResNet does not stride its first stage.")
  return c


def read(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, info) where info = inspect(state dict) plus what config.json adds."""
  path = require_file(path, 'ResNet checkpoint')
  config = {}
  if os.path.isdir(path) or path.endswith('.safetensors'):
    path, config_path = _hf_files(path)
    state = sd_lib.read(path, 'ResNet checkpoint')
    if any('embedder.embedder' in k for k in state):
      config = _hf_config(config_path)
  else:
    state = sd_lib.read(path, 'ResNet checkpoint')
  info = inspect(state)
  info['downsample_in_bottleneck'] = bool(config.get('downsample_in_bottleneck', False))
  return state, info


def inspect(state: Mapping[str, Any]) -> dict[str, Any]:
  """{'format', 'prefix', 'stage_sizes', 'bottleneck', 'num_filters', 'num_classes', 'depth'}."""
  if 'conv1.weight' in state:
    fmt, prefix = 'torchvision', ''
    stem = state['conv1.weight']
    pattern = re.compile(r'layer(\d)\.(\d+)\.')
    bottleneck = any(re.match(r'layer\d\.\d+\.conv3\.weight$', k) for k in state)
    fc = state.get('fc.weight')
  else:
    stems = [k for k in state if k.endswith('embedder.embedder.convolution.weight')]
    if not stems:
      raise CheckpointMismatchError(
          'Not a ResNet checkpoint in a known layout: expected torchvision/timm names '
          "('conv1.weight', 'layer1.0.conv1.weight', ...) or Hugging Face ResNetModel names "
          f"('embedder.embedder.convolution.weight', ...); found keys {sorted(state)[:6]}...")
    fmt, prefix = 'hf', stems[0][:-len('embedder.embedder.convolution.weight')]
    stem = state[stems[0]]
    pattern = re.compile(re.escape(prefix) + r'encoder\.stages\.(\d+)\.layers\.(\d+)\.')
    bottleneck = any(k.endswith('layer.2.convolution.weight') for k in state)
    fc = state.get('classifier.1.weight')
  counts: dict[int, int] = {}
  for k in state:
    if match := pattern.match(k):
      s, i = int(match.group(1)), int(match.group(2))
      counts[s] = max(counts.get(s, 0), i + 1)
  first = min(counts) if counts else 0  # torchvision counts stages from 1.
  stage_sizes = tuple(counts.get(s, 0) for s in range(first, first + len(counts)))
  blocks = sum(stage_sizes)
  return {'format': fmt, 'prefix': prefix, 'stage_sizes': stage_sizes, 'bottleneck': bottleneck,
          'num_filters': int(stem.shape[0]),
          'num_classes': int(fc.shape[0]) if fc is not None else None,
          'depth': 2 + blocks * (3 if bottleneck else 2)}


def describe(stage_sizes, bottleneck: bool, num_filters: int) -> str:
  depth = 2 + sum(stage_sizes) * (3 if bottleneck else 2)
  return (f'ResNet-{depth} ({"bottleneck" if bottleneck else "basic"} blocks, stages '
          f'{tuple(stage_sizes)}, stem width {num_filters})')


def model_kwargs_from_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
  """vadapt.models.resnet.ResNet kwargs for the network `path` holds (head included)."""
  _, info = read(path)
  return _kwargs(info)


def _kwargs(info):
  return dict(stage_sizes=info['stage_sizes'],
              block_cls=resnet.BottleneckResNetBlock if info['bottleneck'] else resnet.ResNetBlock,
              num_filters=info['num_filters'], num_classes=info['num_classes'],
              downsample_in_bottleneck=info['downsample_in_bottleneck'])


def model_from_checkpoint(path: str | os.PathLike, num_classes: Optional[int] = -1,
                          **overrides) -> resnet.ResNet:
  """The ResNet that `path` holds; num_classes=-1 keeps the checkpoint's (None: features)."""
  kwargs = model_kwargs_from_checkpoint(path)
  if num_classes != -1:
    kwargs['num_classes'] = num_classes
  return resnet.ResNet(**{**kwargs, **overrides})


def load(path: str | os.PathLike, model: resnet.ResNet, *,
         image_size: int = resnet.MIN_IMAGE_SIZE) -> dict[str, Any]:
  """Reads `path` onto `model`; returns {'params', 'batch_stats'}.

  The head is kept when its class count matches model.num_classes, replaced by a zero head
  otherwise, and dropped for num_classes=None.

  Raises:
    CheckpointMismatchError: the file holds another depth, block type or width (naming both), a
      v1/v1.5 mismatch with config.json, or tensors that do not fit (listing every one).
  """
  state, info = read(path)
  source = repr(os.fspath(path))
  bottleneck = model.block_cls is resnet.BottleneckResNetBlock
  found = (tuple(info['stage_sizes']), info['bottleneck'], info['num_filters'])
  want = (tuple(model.stage_sizes), bottleneck, model.num_filters)
  if found != want:
    raise CheckpointMismatchError(
        f'{source} holds {describe(*found)} but the model is {describe(*want)}: build the model '
        'for the checkpoint (vadapt.pretrained.resnet.model_from_checkpoint).')
  if bottleneck and info['downsample_in_bottleneck'] != model.downsample_in_bottleneck:
    raise CheckpointMismatchError(
        f'{source}: its config.json has downsample_in_bottleneck='
        f'{info["downsample_in_bottleneck"]} but the model has downsample_in_bottleneck='
        f'{model.downsample_in_bottleneck} (v1 strides the first 1x1 conv, v1.5 the 3x3 conv).')
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images))
  exp_params = flatten(expected['params'])
  projections = {(s, i) for s, i, name in _blocks(model.stage_sizes, bottleneck)
                 if f'{name}/conv_proj/kernel' in exp_params}
  mapping = layer_map(info['format'], model.stage_sizes, bottleneck, projections, info['prefix'])
  params, stats, unused = sd_lib.to_flax(mapping, state, source)
  for k in unused:  # Reported by check_matches next to the model's names.
    params[f'unmapped:{k}'] = state[k]
  sd_lib.fit_head(params, exp_params, model.num_classes, source)
  out = {}
  for c, flat in (('params', params), ('batch_stats', stats)):
    exp = flatten(expected[c])
    check_matches(exp, flat, source=f'{source} ({c})')
    out[c] = unflatten({k: np.asarray(v, exp[k].dtype) for k, v in flat.items()})
  return out


def to_state_dict(variables: Mapping[str, Any], model: resnet.ResNet,
                  fmt: str = 'torchvision') -> dict[str, np.ndarray]:
  """vadapt variables -> a torchvision- or Hugging Face-layout state dict."""
  if fmt not in FORMATS:
    raise ValueError(f'Unknown ResNet format {fmt!r}; expected one of {FORMATS}.')
  params = flatten(jax.device_get(variables['params']))
  stats = flatten(jax.device_get(variables.get('batch_stats', {})))
  bottleneck = model.block_cls is resnet.BottleneckResNetBlock
  projections = {(s, i) for s, i, name in _blocks(model.stage_sizes, bottleneck)
                 if f'{name}/conv_proj/kernel' in params}
  # Hugging Face nests the trunk under 'resnet.' in ResNetForImageClassification.
  prefix = 'resnet.' if fmt == 'hf' and 'head/kernel' in params else ''
  return sd_lib.to_torch(layer_map(fmt, model.stage_sizes, bottleneck, projections, prefix),
                         params, stats)


def save(path: str | os.PathLike, variables: Mapping[str, Any], model: resnet.ResNet,
         fmt: str = 'torchvision') -> str:
  """Writes variables as a torchvision- (or Hugging Face-) layout .safetensors file."""
  return sd_lib.save(path, to_state_dict(variables, model, fmt),
                     metadata={'format': 'pt', 'architecture': 'resnet'})
