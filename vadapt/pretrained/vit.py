"""ViT checkpoints (vit_jax / big_vision ``.npz``, Hugging Face safetensors) onto our Linen layout.

Every reader maps its file onto one canonical layout, the per-layer (``scan=False``) parameter
names of ``vadapt.models.vit.VisionTransformer``; ``load`` then adapts that to a given model
(position-embedding grid, class-token slot, head, representation layer, scan stacking) and checks
the result against the model's own parameter shapes, so any remaining difference surfaces as one
``CheckpointMismatchError``.

Formats (``FORMATS``):

* ``vit_jax``: ``.npz`` from google-research/vision_transformer. Pre-Linen block names
  (``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``); the position embedding
  ``Transformer/posembed_input/pos_embedding`` has a class-token slot (1, 1 + N, D).
* ``big_vision``: ``.npz`` from google-research/big_vision. Linen names; top-level ``pos_embedding``
  (1, N, D) without a class-token slot; scan-trained files stack the blocks at
  ``Transformer/encoderblock/...`` with a leading depth axis. ``params/`` (and SigLIP's
  ``params/img/``) prefixes are stripped. bfloat16 arrays, which ``np.savez`` stores as 2-byte
  void (``|V2``), are read back as bfloat16 as big_vision's own loader does.
* ``hf``: Hugging Face ``ViTModel`` / ``ViTForImageClassification`` safetensors (a file, or a
  ``save_pretrained`` directory), read without torch. Both the on-disk names
  (``encoder.layer.{i}.attention.attention.query``) and transformers 5's in-memory names
  (``layers.{i}.attention.q_proj``) are understood; ``pooler.dense`` is the representation layer.

Nothing here unpickles: ``.npz`` files are opened with ``allow_pickle=False`` and PyTorch pickles
(``.bin``, ``.pt``) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zipfile
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import scipy.ndimage

from vadapt import files
from vadapt.models.vit import VisionTransformer
from vadapt.pretrained.common import (CheckpointMismatchError, check_matches, consume, flatten,
                                      read_safetensors, recover_npz_dtype, require_file,
                                      unflatten)

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    'vit_jax': '.npz from google-research/vision_transformer (pre-Linen names, 1+N position slots)',
    'big_vision': '.npz from google-research/big_vision (Linen names, top-level pos_embedding, '
                  'per-layer or scan-stacked blocks)',
    'hf': 'Hugging Face ViTModel/ViTForImageClassification .safetensors file or '
          'save_pretrained directory',
}

POSEMB = 'Transformer/posembed_input/pos_embedding'
_BLOCK = re.compile(r'^(.*)/encoderblock_(\d+)/(.*)$')
_STACKED = re.compile(r'^(.*)/encoderblock/(.*)$')
# Pre-Linen module names in vit_jax files count modules of all types together.
_PRE_LINEN = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
              'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
_LINEN_TO_PRE = {v: k for k, v in _PRE_LINEN.items()}
# Prefixes under which big_vision training checkpoints (and SigLIP's image tower) keep the params.
_NPZ_PREFIXES = ('params/img/', 'params/', 'opt/target/')
_TORCH_PICKLES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl', '.pickle')

Params = dict[str, Any]
ImageSize = Union[int, Sequence[int]]


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint read onto the canonical (per-layer) VisionTransformer layout.

  Attributes:
    params: flat {'a/b/c': np.ndarray} with per-layer blocks ``Transformer/encoderblock_{i}``.
    format: a key of FORMATS.
    posemb_has_cls: the position embedding holds a class-token slot in front of the patch grid.
    scan: the file stacked its blocks on a leading depth axis.
    path: where it was read from.
  """
  params: dict[str, np.ndarray]
  format: str
  posemb_has_cls: bool
  scan: bool
  path: str


class UnknownCheckpointFormatError(ValueError):
  """A file that none of the readers in FORMATS understands."""


def _unknown_format(path: str, why: str) -> UnknownCheckpointFormatError:
  known = ''.join(f'\n  {name}: {desc}' for name, desc in FORMATS.items())
  return UnknownCheckpointFormatError(
      f'Cannot read {path!r} as a ViT checkpoint: {why}. Known formats:{known}')


# ----------------------------------------------------------------------------- layer stacking


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``.../encoderblock/x`` (depth, ...) -> ``.../encoderblock_{i}/x`` (...); other keys kept."""
  out, depth = {}, None
  for key, value in flat.items():
    match = _STACKED.match(key)
    if not match:
      out[key] = value
      continue
    value = np.asarray(value)
    if depth is not None and value.shape[0] != depth:
      raise CheckpointMismatchError(
          f'Stacked blocks disagree on depth: {key} has {value.shape[0]} layers, others {depth}.')
    depth = value.shape[0]
    for i in range(depth):
      out[f'{match.group(1)}/encoderblock_{i}/{match.group(2)}'] = value[i]
  return out


def stack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``.../encoderblock_{i}/x`` -> ``.../encoderblock/x`` stacked on a new leading depth axis.

  Layers must be numbered 0..depth-1 and all hold the same parameters; anything else raises
  CheckpointMismatchError naming the offending layer.
  """
  groups: dict[str, dict[int, dict[str, Any]]] = {}
  out = {}
  for key, value in flat.items():
    match = _BLOCK.match(key)
    if match:
      groups.setdefault(match.group(1), {}).setdefault(int(match.group(2)), {})[
          match.group(3)] = value
    else:
      out[key] = value
  for prefix, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise CheckpointMismatchError(
          f'Cannot stack {prefix}/encoderblock_*: layers {sorted(layers)} are not '
          f'0..{len(layers) - 1}.')
    names = set(layers[0])
    for i, layer in layers.items():
      if set(layer) != names:
        raise CheckpointMismatchError(
            f'Cannot stack {prefix}/encoderblock_*: layer {i} holds '
            f'{sorted(set(layer) ^ names)} unlike layer 0.')
    for name in sorted(names):
      shapes = {np.shape(layers[i][name]) for i in layers}
      if len(shapes) > 1:
        raise CheckpointMismatchError(
            f'Cannot stack {prefix}/encoderblock_*/{name}: shapes differ across layers {shapes}.')
      out[f'{prefix}/encoderblock/{name}'] = np.stack(
          [np.asarray(layers[i][name]) for i in range(len(layers))])
  return out


# ----------------------------------------------------------------------------- position embedding


def _pair(size: ImageSize) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise ValueError(f'Expected an int or (height, width); found {size}.')
  return size


def resize_posemb(posemb: Any, new_grid: ImageSize, has_cls: bool) -> np.ndarray:
  """Resamples a square grid of position embeddings, as vit_jax does when fine-tuning larger.

  (1, [1 +] g*g, D) -> (1, [1 +] gh*gw, D). The class-token slot (``has_cls``) is kept as is; the
  grid is interpolated bilinearly with ``scipy.ndimage.zoom(order=1)`` (grid corners map onto
  grid corners, i.e. ``align_corners=True`` in PyTorch terms).
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'Expected a position embedding of shape (1, tokens, width); '
                     f'found {posemb.shape}.')
  gh, gw = _pair(new_grid)
  token, grid = (posemb[:, :1], posemb[0, 1:]) if has_cls else (posemb[:, :0], posemb[0])
  side = math.isqrt(len(grid))
  if side * side != len(grid):
    raise ValueError(
        f'The position embedding holds {len(grid)} grid positions'
        f'{" after the class-token slot" if has_cls else ""}, not a square number: cannot infer '
        'its grid to resize it.')
  if (gh, gw) == (side, side):
    return posemb
  logger.info('Resizing the position embedding grid from %dx%d to %dx%d.', side, side, gh, gw)
  grid = grid.reshape(side, side, -1)
  if grid.dtype not in (np.float32, np.float64):  # scipy has no bfloat16.
    grid = grid.astype(np.float32)
  grid = scipy.ndimage.zoom(grid, (gh / side, gw / side, 1), order=1)
  if grid.shape[:2] != (gh, gw):  # zoom rounds the output size.
    raise AssertionError(f'zoom gave a {grid.shape[:2]} grid, wanted {(gh, gw)}.')
  return np.concatenate([token, grid.reshape(1, gh * gw, -1)], axis=1).astype(posemb.dtype)


def _infer_posemb_slot(flat: Mapping[str, Any], posemb_includes_cls: Optional[bool]) -> bool:
  """Whether our params' position embedding holds a class-token slot, from shapes if not given."""
  if posemb_includes_cls is not None or 'cls' not in flat or POSEMB not in flat:
    return bool(posemb_includes_cls) and 'cls' in flat
  tokens = np.shape(flat[POSEMB])[1]
  square = lambda n: n > 0 and math.isqrt(n) ** 2 == n
  if square(tokens - 1) and not square(tokens):
    return True
  if square(tokens) and not square(tokens - 1):
    return False
  raise ValueError(f'Cannot tell from {tokens} positions whether the position embedding has a '
                   'class-token slot (non-square grid): pass posemb_includes_cls.')


# ----------------------------------------------------------------------------- .npz readers


def _open_npz(path: str) -> dict[str, np.ndarray]:
  if not zipfile.is_zipfile(path):  # np.load would otherwise try to unpickle it.
    raise _unknown_format(path, 'it is not an .npz (zip) archive')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: recover_npz_dtype(k, f[k], path) for k in f.files}
  except ValueError as e:  # object arrays need pickle, which we never allow.
    raise ValueError(f'Cannot read {path!r} without unpickling ({e}); re-save it with plain '
                     'numeric arrays.') from e


def _strip_npz_prefix(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  for prefix in _NPZ_PREFIXES:
    if f'{prefix}embedding/kernel' in flat:
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, prefix
  return flat, ''


def _npz_flavour(flat: Mapping[str, Any], prefix: str) -> Optional[str]:
  if 'pos_embedding' in flat or any(_STACKED.match(k) for k in flat) or prefix.startswith('params'):
    return 'big_vision'
  if POSEMB in flat:
    return 'vit_jax'
  return None


def _read_vit_jax(flat: dict[str, np.ndarray], path: str) -> Checkpoint:
  if any('/MultiHeadDotProductAttention_1/' in k for k in flat):
    flat = _rename_block_modules(flat, _PRE_LINEN)
  return Checkpoint(flat, 'vit_jax', posemb_has_cls='cls' in flat, scan=False, path=path)


def _rename_block_modules(flat: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
  """Renames the modules directly inside each encoderblock_{i} (e.g. LayerNorm_2 -> LayerNorm_1)."""
  out = {}
  for key, value in flat.items():
    if match := _BLOCK.match(key):
      module, _, rest = match.group(3).partition('/')
      key = f'{match.group(1)}/encoderblock_{match.group(2)}/{names.get(module, module)}/{rest}'
    out[key] = value
  return out


def _read_big_vision(flat: dict[str, np.ndarray], path: str) -> Checkpoint:
  scan = any(_STACKED.match(k) for k in flat)
  flat = unstack_layers(flat)
  if 'pos_embedding' in flat:
    flat[POSEMB] = flat.pop('pos_embedding')
  return Checkpoint(flat, 'big_vision', posemb_has_cls=False, scan=scan, path=path)


# ----------------------------------------------------------------------------- Hugging Face

_HF_QKV = {'query': 'query', 'key': 'key', 'value': 'value', 'q': 'query', 'k': 'key', 'v': 'value'}
_MHA = 'MultiHeadDotProductAttention_0'
# (regex over the module path, our module path, conversion kind); both the on-disk names and
# transformers 5's in-memory names.
_LAYER = r'Transformer/encoderblock_\1'
_HF_MODULES: tuple[tuple[re.Pattern, str, str], ...] = tuple(
    (re.compile(pattern), target, kind) for pattern, target, kind in (
        (r'embeddings\.patch_embeddings\.projection', 'embedding', 'conv'),
        (r'encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)', f'{_LAYER}/{_MHA}/q',
         'qkv'),
        (r'layers\.(\d+)\.attention\.(q|k|v)_proj', f'{_LAYER}/{_MHA}/q', 'qkv'),
        (r'encoder\.layer\.(\d+)\.attention\.output\.dense', f'{_LAYER}/{_MHA}/out', 'out'),
        (r'layers\.(\d+)\.attention\.o_proj', f'{_LAYER}/{_MHA}/out', 'out'),
        (r'(?:encoder\.layer|layers)\.(\d+)\.layernorm_before', f'{_LAYER}/LayerNorm_0', 'norm'),
        (r'(?:encoder\.layer|layers)\.(\d+)\.layernorm_after', f'{_LAYER}/LayerNorm_1', 'norm'),
        (r'encoder\.layer\.(\d+)\.intermediate\.dense', f'{_LAYER}/MlpBlock_0/Dense_0', 'linear'),
        (r'layers\.(\d+)\.mlp\.fc1', f'{_LAYER}/MlpBlock_0/Dense_0', 'linear'),
        (r'encoder\.layer\.(\d+)\.output\.dense', f'{_LAYER}/MlpBlock_0/Dense_1', 'linear'),
        (r'layers\.(\d+)\.mlp\.fc2', f'{_LAYER}/MlpBlock_0/Dense_1', 'linear'),
        (r'layernorm', 'Transformer/encoder_norm', 'norm'),
        (r'pooler\.dense', 'pre_logits', 'linear'),
        (r'classifier', 'head', 'linear'),
    ))


def _hf_files(path: str) -> list[str]:
  """The safetensors file(s) of a file path or a save_pretrained directory."""
  if not os.path.isdir(path):
    return [path]
  single = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [require_file(os.path.join(path, s), 'safetensors shard') for s in shards]
  raise _unknown_format(path, f'the directory holds neither model.safetensors nor '
                              f'model.safetensors.index.json (found {sorted(os.listdir(path))})')


def _hf_config_path(path: str) -> Optional[str]:
  config = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), 'config.json')
  return config if os.path.exists(config) else None


def _read_safetensors(files: Sequence[str]) -> dict[str, np.ndarray]:
  tensors = {}
  for file in files:
    try:
      tensors.update(read_safetensors(file))
    except ValueError as e:
      raise _unknown_format(file, f'safetensors cannot read it ({e})') from e
  return tensors


def _is_hf_vit(tensors: Mapping[str, Any]) -> bool:
  return any(k.endswith('embeddings.patch_embeddings.projection.weight') for k in tensors)


def _read_hf(path: str, num_heads: Optional[int]) -> Checkpoint:
  tensors = _read_safetensors(_hf_files(path))
  dinov2 = [k for k in tensors if k.endswith(('layer_scale1.lambda1', '.norm1.weight'))]
  if dinov2:
    raise _unknown_format(path, f'it holds DINOv2 (found {dinov2[0]}), expected a plain ViT: load '
                                'it with vadapt.pretrained.dinov2.load')
  if not _is_hf_vit(tensors):
    raise _unknown_format(path, 'its safetensors keys are not those of a Hugging Face ViT '
                                f'(e.g. {sorted(tensors)[:3]})')
  out = {}
  for key, value in consume(tensors):
    name = key[len('vit.'):] if key.startswith('vit.') else key
    if name == 'embeddings.cls_token':
      out['cls'] = value
      continue
    if name == 'embeddings.position_embeddings':
      out[POSEMB] = value
      continue
    if name == 'embeddings.mask_token':  # only used for masked-image pre-training.
      continue
    module, _, leaf = name.rpartition('.')
    for pattern, target, kind in _HF_MODULES:
      match = pattern.fullmatch(module)
      if match and leaf in ('weight', 'bias'):
        target = match.expand(target)
        if kind == 'qkv':
          target = target.rsplit('/', 1)[0] + '/' + _HF_QKV[match.group(2)]
        out.update(_from_torch(target, kind, leaf, value, num_heads))
        break
    else:
      out[key] = value  # reported as unexpected when matched against a model.
  return Checkpoint(out, 'hf', posemb_has_cls=True, scan=False, path=path)


def _from_torch(target: str, kind: str, leaf: str, value: np.ndarray,
                num_heads: Optional[int]) -> dict[str, np.ndarray]:
  if kind == 'norm':
    return {f'{target}/{"scale" if leaf == "weight" else "bias"}': value}
  if leaf == 'weight':
    if kind == 'conv':  # (O, I, H, W) -> (H, W, I, O)
      return {f'{target}/kernel': np.transpose(value, (2, 3, 1, 0))}
    kernel = value.T  # torch Linear (out, in) -> (in, out)
    if kind in ('qkv', 'out'):
      if not num_heads:
        raise ValueError('Reading Hugging Face attention weights needs num_heads (the q/k/v '
                         'matrices do not show the head split): pass it or keep config.json '
                         'beside the weights.')
      d_in, d_out = kernel.shape
      kernel = (kernel.reshape(d_in, num_heads, d_out // num_heads) if kind == 'qkv'
                else kernel.reshape(num_heads, d_in // num_heads, d_out))
    return {f'{target}/kernel': np.ascontiguousarray(kernel)}
  if kind == 'qkv':
    return {f'{target}/bias': value.reshape(num_heads, -1) if num_heads else value}
  return {f'{target}/bias': value}


def _to_torch(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our per-layer flat params -> Hugging Face on-disk names (without the 'vit.' prefix)."""
  out = {}
  for key, value in flat.items():
    value = np.asarray(value)
    if key == 'cls':
      out['embeddings.cls_token'] = value
    elif key == POSEMB:
      out['embeddings.position_embeddings'] = value
    elif key == 'embedding/kernel':
      out['embeddings.patch_embeddings.projection.weight'] = np.transpose(value, (3, 2, 0, 1))
    elif key == 'embedding/bias':
      out['embeddings.patch_embeddings.projection.bias'] = value
    elif key.startswith(('Transformer/encoder_norm/', 'pre_logits/', 'head/')):
      module = {'Transformer': 'layernorm', 'pre_logits': 'pooler.dense', 'head': 'classifier'}[
          key.split('/')[0]]
      out.update(_torch_leaf(module, key.rsplit('/', 1)[1], value))
    elif match := _BLOCK.match(key):
      i, (module, *sub, leaf) = match.group(2), match.group(3).split('/')
      layer = f'encoder.layer.{i}.'
      if module == _MHA:
        name = (f'{layer}attention.output.dense' if sub[0] == 'out'
                else f'{layer}attention.attention.{sub[0]}')
        if leaf == 'kernel':
          value = value.reshape(-1, value.shape[-1]) if sub[0] == 'out' else value.reshape(
              value.shape[0], -1)
        else:
          value = value.reshape(-1)
      elif module in ('LayerNorm_0', 'LayerNorm_1'):
        name = layer + ('layernorm_before' if module == 'LayerNorm_0' else 'layernorm_after')
      elif module == 'MlpBlock_0':
        name = layer + ('intermediate.dense' if sub[0] == 'Dense_0' else 'output.dense')
      else:
        raise ValueError(f'{key} has no Hugging Face ViT counterpart.')
      out.update(_torch_leaf(name, leaf, value))
    else:
      raise ValueError(f'{key} has no Hugging Face ViT counterpart.')
  return out


def _torch_leaf(module: str, leaf: str, value: np.ndarray) -> dict[str, np.ndarray]:
  torch_leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]
  if leaf == 'kernel':
    value = value.T
  return {f'{module}.{torch_leaf}': np.ascontiguousarray(value)}


# ----------------------------------------------------------------------------- reading


def detect_format(path: str | os.PathLike) -> str:
  """Returns the key of FORMATS that the file (or save_pretrained directory) at `path` is in."""
  path = require_file(path)
  return _detect(path)[0]


def _is_hf_path(path: str) -> bool:
  return os.path.isdir(path) or path.lower().endswith('.safetensors')


def _detect(path: str) -> tuple[str, Any]:
  """(format, contents already read or None)."""
  if _is_hf_path(path):
    return 'hf', None
  lower = path.lower()
  if lower.endswith(_TORCH_PICKLES):
    raise _unknown_format(path, 'PyTorch pickles are not read (unpickling runs arbitrary code); '
                                'convert it to .safetensors (DINOv2 .pth state dicts load with '
                                'vadapt.pretrained.dinov2.load)')
  if lower.endswith('.onnx'):
    raise _unknown_format(path, 'ONNX graphs are read for DINOv2 only: load it with '
                                'vadapt.pretrained.dinov2.load')
  if lower.endswith('.npz'):
    flat, prefix = _strip_npz_prefix(_open_npz(path))
    flavour = _npz_flavour(flat, prefix)
    if flavour is None:
      raise _unknown_format(path, 'its keys hold neither Transformer/posembed_input/pos_embedding '
                                  f'(vit_jax) nor pos_embedding (big_vision): {sorted(flat)[:5]}')
    return flavour, (flat, prefix)
  raise _unknown_format(path, f'unrecognised extension {os.path.splitext(path)[1]!r}')


def read(path: str | os.PathLike, *, format: str = 'auto',  # pylint: disable=redefined-builtin
         num_heads: Optional[int] = None) -> Checkpoint:
  """Reads a checkpoint onto the canonical per-layer layout, with no model to adapt to.

  `num_heads` is needed for Hugging Face files only (taken from config.json beside the weights
  when not given).
  """
  path = require_file(path)
  if format == 'auto':
    fmt, contents = _detect(path)
  elif format == 'hf':
    fmt, contents = 'hf', None
  elif format in FORMATS:
    fmt, contents = format, _strip_npz_prefix(_open_npz(path))
  else:
    raise ValueError(f'Unknown checkpoint format {format!r}; known: auto, {", ".join(FORMATS)}.')
  if fmt == 'hf':
    if num_heads is None and (config := _hf_config_path(path)):
      num_heads = _load_hf_config(config).get('num_attention_heads')
    return _read_hf(path, num_heads)
  flat, _ = contents
  return _read_vit_jax(flat, path) if fmt == 'vit_jax' else _read_big_vision(flat, path)


def inspect(path: str | os.PathLike, *,
            format: str = 'auto') -> dict[str, Any]:  # pylint: disable=redefined-builtin
  """Infers a checkpoint's architecture from its tensor shapes.

  Returns a dict with format, hidden_size, num_layers, num_heads (None for a Hugging Face file
  without config.json), mlp_dim, patch_size, channels, classifier, num_classes,
  representation_size, posemb_includes_cls, scan (the file's layout), image_size (the grid it was
  trained at, times the patch size), activation and layer_norm_epsilon (the format's conventions).
  """
  path = require_file(path)
  config = None
  hf = format == 'hf' or (format == 'auto' and _is_hf_path(path))
  if hf and (config_path := _hf_config_path(path)):
    config = _load_hf_config(config_path)
  # One head is enough to read shapes; the real head count comes from the kernels or config.json.
  config_heads = config.get('num_attention_heads') if config else None
  ckpt = read(path, format=format, num_heads=config_heads or 1)
  fmt = ckpt.format
  p = ckpt.params

  def shape(key):
    if key not in p:
      raise CheckpointMismatchError(f'{path!r} has no {key}: not a ViT checkpoint we can inspect.')
    return np.shape(p[key])

  patch_h, patch_w, channels, hidden = shape('embedding/kernel')
  depth = len({m.group(2) for m in map(_BLOCK.match, p) if m and m.group(1) == 'Transformer'})
  query = shape(f'Transformer/encoderblock_0/{_MHA}/query/kernel')
  classifier = ('token' if 'cls' in p else
                'map' if any(k.startswith('MAPHead_0/') for k in p) else 'gap')
  tokens = shape(POSEMB)[1] - (1 if ckpt.posemb_has_cls else 0)
  side = math.isqrt(tokens)
  info = dict(
      format=ckpt.format,
      hidden_size=hidden,
      num_layers=depth,
      num_heads=config_heads if fmt == 'hf' else query[1],
      mlp_dim=shape('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel')[1],
      patch_size=patch_h if patch_h == patch_w else (patch_h, patch_w),
      channels=channels,
      classifier=classifier,
      num_classes=shape('head/kernel')[1] if 'head/kernel' in p else None,
      representation_size=shape('pre_logits/kernel')[1] if 'pre_logits/kernel' in p else None,
      posemb_includes_cls=ckpt.format != 'big_vision',
      scan=ckpt.scan,
      image_size=side * patch_h if side * side == tokens and patch_h == patch_w else None,
      activation='gelu',
      layer_norm_epsilon=1e-6,
  )
  if fmt == 'hf':
    hf = model_kwargs_from_hf_config(config) if config else {}
    info.update(activation=hf.get('activation', 'gelu_exact'),
                layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-12))
  return info


_MODEL_KEYS = ('num_classes', 'patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim',
               'classifier', 'representation_size', 'posemb_includes_cls', 'activation',
               'layer_norm_epsilon', 'channels', 'scan')


def model_kwargs_from_checkpoint(path: str | os.PathLike, *,
                                 format: str = 'auto') -> dict[str, Any]:  # pylint: disable=redefined-builtin
  """VisionTransformer(**kwargs) that the checkpoint at `path` loads into unchanged."""
  info = inspect(path, format=format)
  if info['num_heads'] is None:
    raise ValueError(f'{path!r} does not show its number of attention heads: keep the Hugging '
                     'Face config.json beside it, or use model_kwargs_from_hf_config.')
  if not isinstance(info['patch_size'], int):
    raise ValueError(f'{path!r} has non-square patches {info["patch_size"]}, which '
                     'VisionTransformer does not support.')
  return {k: info[k] for k in _MODEL_KEYS}


# ----------------------------------------------------------------------------- HF config

# Hugging Face activation names -> ours. HF's "gelu" is the exact erf form.
_HF_ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu',
                   'gelu_fast': 'gelu', 'quick_gelu': 'quick_gelu', 'relu': 'relu'}


def _load_hf_config(config: Any) -> dict[str, Any]:
  if isinstance(config, Mapping):
    return dict(config)
  if hasattr(config, 'to_dict'):  # a transformers PretrainedConfig.
    return config.to_dict()
  path = os.fspath(config)
  if os.path.isdir(path):
    path = os.path.join(path, 'config.json')
  with open(require_file(path, 'Hugging Face config'), encoding='utf-8') as f:
    return json.load(f)


def model_kwargs_from_hf_config(config: Any) -> dict[str, Any]:
  """VisionTransformer kwargs for a Hugging Face ViT config (a config.json path, its directory,
  a dict or a ViTConfig).

  num_classes is the label count for a ViTForImageClassification config and None otherwise. The
  pooler of a ViTModel is not enabled here: pass representation_size=pooler_output_size to use it.
  """
  c = _load_hf_config(config)
  if c.get('model_type', 'vit') != 'vit':
    raise ValueError(f'Expected a Hugging Face ViT config (model_type "vit"); found '
                     f'model_type {c.get("model_type")!r}.')
  if not c.get('qkv_bias', True):
    raise ValueError('The config has qkv_bias=False; VisionTransformer always has q/k/v biases.')
  act = c.get('hidden_act', 'gelu')
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f'Unsupported hidden_act {act!r}; supported: {sorted(_HF_ACTIVATIONS)}.')
  patch = c.get('patch_size', 16)
  if not isinstance(patch, int):
    patch = tuple(patch)
    if patch[0] != patch[1]:
      raise ValueError(f'Non-square patches {patch} are not supported.')
    patch = patch[0]
  architectures = c.get('architectures') or []
  classifies = any(a.endswith('ForImageClassification') for a in architectures)
  num_labels = c.get('num_labels') or len(c.get('id2label') or {}) or None
  return dict(
      num_classes=num_labels if classifies else None,
      patch_size=patch,
      hidden_size=c.get('hidden_size', 768),
      num_layers=c.get('num_hidden_layers', 12),
      num_heads=c.get('num_attention_heads', 12),
      mlp_dim=c.get('intermediate_size', 3072),
      classifier='token',
      posemb_includes_cls=True,
      activation=_HF_ACTIVATIONS[act],
      layer_norm_epsilon=c.get('layer_norm_eps', 1e-12),
      channels=c.get('num_channels', 3),
  )


# ----------------------------------------------------------------------------- loading into a model


def _model_posemb(model: VisionTransformer, ckpt: Checkpoint, flat: dict[str, Any],
                  expected: Mapping[str, Any], grid: tuple[int, int]) -> None:
  """Moves the class-token slot to where `model` wants it and resizes the grid, in place."""
  if POSEMB not in flat or POSEMB not in expected:
    return
  posemb = np.asarray(flat[POSEMB])
  slot, grid_pe = (posemb[:, :1], posemb[:, 1:]) if ckpt.posemb_has_cls else (None, posemb)
  if model.classifier == 'token' and 'cls' in flat:
    if slot is not None and not model.posemb_includes_cls:
      # cls + pe[0] is what the first token carries either way: fold the slot into the token.
      flat['cls'] = np.asarray(flat['cls']) + slot
      slot = None
    elif slot is None and model.posemb_includes_cls:
      slot = np.zeros_like(grid_pe[:, :1])
  want = int(np.prod(grid))
  if grid_pe.shape[1] != want:
    grid_pe = resize_posemb(grid_pe, grid, has_cls=False)
  flat[POSEMB] = grid_pe if slot is None else np.concatenate([slot, grid_pe], axis=1)


def _model_head(model: VisionTransformer, flat: dict[str, Any], expected: Mapping[str, Any],
                source: str) -> None:
  """Keeps, drops or re-initialises the representation layer and the head, in place."""
  has_pre = any(k.startswith('pre_logits/') for k in flat)
  stale_head = False
  if model.representation_size is None and has_pre:
    logger.info('%s: dropping the representation layer (pre_logits); the model has none.', source)
    for k in [k for k in flat if k.startswith('pre_logits/')]:
      del flat[k]
    stale_head = True  # the checkpoint's head read the dropped layer's output.
  elif model.representation_size is not None and not has_pre:
    raise CheckpointMismatchError(
        f'The model has a representation layer (representation_size='
        f'{model.representation_size}) but {source} has none (no pre_logits): build the model '
        'with representation_size=None.')

  if model.num_classes is None:
    for k in [k for k in flat if k.startswith('head/')]:
      del flat[k]
    return
  want = expected.get('head/kernel')
  found = flat.get('head/kernel')
  if want is None:
    return
  if found is None or np.shape(found) != tuple(want.shape) or stale_head:
    why = ('the checkpoint has none' if found is None else
           'its input was the dropped representation layer' if stale_head else
           f'{np.shape(found)} != {tuple(want.shape)}')
    logger.info('%s: new zero head for %d classes (%s).', source, model.num_classes, why)
    flat['head/kernel'] = np.zeros(want.shape, want.dtype)
    flat['head/bias'] = np.full(expected['head/bias'].shape, model.head_bias_init,
                                expected['head/bias'].dtype)


def _check_hf_config(path: str, model: VisionTransformer) -> None:
  config_path = _hf_config_path(path)
  if not config_path:
    return
  hf = model_kwargs_from_hf_config(config_path)
  if hf['num_heads'] != model.num_heads:
    raise CheckpointMismatchError(
        f'{config_path} has num_attention_heads={hf["num_heads"]} but the model has '
        f'num_heads={model.num_heads}; the weights would load with the wrong head split.')
  pooler_act = _load_hf_config(config_path).get('pooler_act', 'tanh')
  if model.representation_size is not None and pooler_act != 'tanh':
    raise CheckpointMismatchError(
        f'{config_path} has pooler_act={pooler_act!r}; the representation layer (pre_logits) '
        'applies tanh.')
  for key in ('activation', 'layer_norm_epsilon'):
    if hf[key] != getattr(model, key):
      logger.warning('%s has %s=%r but the model uses %r: outputs will differ from Hugging Face.',
                     config_path, key, hf[key], getattr(model, key))


def abstract_params(model: VisionTransformer, image_size: ImageSize) -> dict[str, Any]:
  """The model's flat {'path': ShapeDtypeStruct} at `image_size`, without allocating."""
  h, w = _pair(image_size)
  images = jax.ShapeDtypeStruct((1, h, w, model.channels), jnp.float32)
  return flatten(jax.eval_shape(model.init, jax.random.key(0), images)['params'])


def load(path: str | os.PathLike, model: VisionTransformer, *, image_size: ImageSize,
         format: str = 'auto') -> Params:  # pylint: disable=redefined-builtin
  """Reads a ViT checkpoint and adapts it to `model` at `image_size`; returns the 'params' tree.

  Adaptations: the position-embedding grid is resized to the model's grid (``resize_posemb``);
  the class-token slot is added or folded into the class token to suit
  ``model.posemb_includes_cls`` (an exact rewrite); the representation layer is kept when the
  model has one and dropped otherwise; the head is dropped for ``num_classes=None`` and replaced
  by a zero head (bias ``head_bias_init``) when its shape differs or its input layer was dropped;
  blocks are stacked or unstacked to match ``model.scan``. Whatever still differs from the
  model's parameters is reported in one CheckpointMismatchError.
  """
  if not isinstance(model, VisionTransformer):
    raise TypeError('Expected a vadapt.models.vit.VisionTransformer; found '
                    f'{type(model).__name__}.')
  path = require_file(path)
  ckpt = read(path, format=format, num_heads=model.num_heads)
  if ckpt.format == 'hf':
    _check_hf_config(path, model)
  source = f'{ckpt.format} checkpoint {path!r}'
  h, w = _pair(image_size)
  expected = abstract_params(model, (h, w))
  flat = dict(ckpt.params)

  _model_posemb(model, ckpt, flat, expected, (h // model.patch_size, w // model.patch_size))
  _model_head(model, flat, expected, source)
  if model.scan:
    flat = stack_layers(flat)
  check_matches(expected, flat, source=source)
  return unflatten({k: np.asarray(v).astype(expected[k].dtype, copy=False)
                    for k, v in flat.items()})


# ----------------------------------------------------------------------------- writing

_NARROW_FLOATS = tuple(np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
                                             ml_dtypes.float8_e5m2))


def _per_layer(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  flat = flatten(params)
  if 'params' in params and not any(k.startswith('Transformer/') for k in flat):
    flat = flatten(params['params'])  # accept the whole variables dict too.
  flat = {k: np.asarray(v) for k, v in unstack_layers(flat).items()}
  # .npz and safetensors.numpy have no bfloat16/float8: widen those to float32, losslessly.
  return {k: v.astype(np.float32) if v.dtype in _NARROW_FLOATS else v
          for k, v in flat.items()}


def _savez(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """np.savez, atomically (a killed writer never leaves a truncated file under `path`)."""
  path = os.fspath(path)
  if not path.endswith('.npz'):
    path += '.npz'  # As np.savez does with a name.
  with files.atomic_path(path) as tmp, open(tmp, 'wb') as f:
    np.savez(f, **arrays)


def save_vit_jax_npz(params: Mapping[str, Any], path: str | os.PathLike, *,
                     posemb_includes_cls: Optional[bool] = None) -> None:
  """Writes VisionTransformer params (per-layer or scan) as a vit_jax ``.npz``.

  A position embedding without a class-token slot gets a zero slot, which leaves the function
  unchanged. `posemb_includes_cls` is inferred from the shapes unless given.
  """
  flat = _per_layer(params)
  if 'cls' in flat and not _infer_posemb_slot(flat, posemb_includes_cls):
    flat[POSEMB] = np.concatenate([np.zeros_like(flat[POSEMB][:, :1]), flat[POSEMB]], axis=1)
  _savez(path, _rename_block_modules(flat, _LINEN_TO_PRE))


def save_big_vision_npz(params: Mapping[str, Any], path: str | os.PathLike, *, scan: bool,
                        posemb_includes_cls: Optional[bool] = None) -> None:
  """Writes VisionTransformer params as a big_vision ``.npz`` (blocks stacked when `scan`).

  big_vision's position embedding has no class-token slot: a slot in `params` is folded into the
  class token (``cls + pe[0]``), which leaves the function unchanged.
  """
  flat = _per_layer(params)
  if POSEMB in flat:
    posemb = flat.pop(POSEMB)
    if 'cls' in flat and _infer_posemb_slot({**flat, POSEMB: posemb}, posemb_includes_cls):
      flat['cls'] = flat['cls'] + posemb[:, :1]
      posemb = posemb[:, 1:]
    flat['pos_embedding'] = posemb
  if scan:
    flat = stack_layers(flat)
  _savez(path, flat)


def save_hf_safetensors(params: Mapping[str, Any], path: str | os.PathLike,
                        num_heads: Optional[int] = None, *,
                        posemb_includes_cls: Optional[bool] = None) -> None:
  """Writes VisionTransformer params as Hugging Face ViT safetensors (on-disk names).

  With a head the keys carry ViTForImageClassification's 'vit.' prefix, without one they are
  ViTModel's. Only 'token' classifiers exist in Hugging Face ViT. `num_heads`, if given, is checked
  against the attention kernels.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = _per_layer(params)
  if 'cls' not in flat or any(k.startswith('MAPHead_0/') for k in flat):
    raise ValueError('Hugging Face ViT has a class-token classifier only; these params are a '
                     "'gap' or 'map' model.")
  if 'pre_logits/kernel' in flat and 'head/kernel' in flat:
    raise ValueError("Hugging Face's ViTForImageClassification has no representation layer "
                     '(its classifier reads the class token); drop pre_logits or the head.')
  if num_heads is not None:
    found = flat[f'Transformer/encoderblock_0/{_MHA}/query/kernel'].shape[1]
    if found != num_heads:
      raise ValueError(f'num_heads={num_heads} but the attention kernels hold {found} heads.')
  if not _infer_posemb_slot(flat, posemb_includes_cls):
    flat[POSEMB] = np.concatenate([np.zeros_like(flat[POSEMB][:, :1]), flat[POSEMB]], axis=1)
  prefix = 'vit.' if 'head/kernel' in flat else ''
  # safetensors writes the raw buffer: transposed views must be made contiguous first.
  tensors = {(k if k.startswith('classifier.') else prefix + k): np.ascontiguousarray(v)
             for k, v in _to_torch(flat).items()}
  with files.atomic_path(path) as tmp:
    save_file(tensors, tmp, metadata={'format': 'pt'})
