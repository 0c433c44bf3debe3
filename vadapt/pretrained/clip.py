"""Loads CLIP checkpoints (Hugging Face or OpenAI naming) into ``vadapt.models.clip.CLIP``.

Formats read:
  * Hugging Face ``CLIPModel`` safetensors (``model.safetensors``, or a checkpoint directory holding
    it or its shards, with its ``config.json`` if present), read with ``safetensors.numpy``: no
    torch needed.
  * PyTorch files (``.pt``, ``.pth``, ``.bin``) with either naming, when torch is installed:
    plain state dicts through ``torch.load(weights_only=True)``, and OpenAI's released files, which
    are TorchScript archives, through ``torch.jit.load(...).state_dict()``.
  * ``.npz`` exports of a state dict with either naming.

OpenAI names are first renamed to Hugging Face names (splitting the fused ``in_proj`` into q, k, v),
then one converter maps Hugging Face names onto the Flax parameter layout.

The activation cannot be read from tensor shapes either: it is QuickGELU unless ``config.json``
says otherwise; open_clip models trained with exact GELU (e.g. LAION ViT-H/14) need
``load(path, activation='gelu_exact')``.

Attention heads cannot be read from tensor shapes. They come from the checkpoint directory's
``config.json`` when there is one, else from ``width // 64`` (OpenAI's rule for every released
model), else from the model passed in.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any, Mapping, Optional

import jax
import numpy as np

from vadapt.models import clip as clip_model
from vadapt.pretrained import common

# Buffers and metadata that some files carry next to the weights; they are not parameters.
_IGNORED = re.compile(
    r'(^|\.)(position_ids|attn_mask)$|^(input_resolution|context_length|vocab_size)$')

_BLOCK_NAMES = {
    'layer_norm1': 'LayerNorm_0',
    'layer_norm2': 'LayerNorm_1',
    'mlp.fc1': 'MlpBlock_0/Dense_0',
    'mlp.fc2': 'MlpBlock_0/Dense_1',
}


# ----------------------------------------------------------------------------- reading files


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a checkpoint into ({name: numpy array}, hf_config) with the file's own names.

  `path` is a file (.safetensors, .npz, .pt/.pth/.bin) or a Hugging Face checkpoint directory.
  hf_config is the directory's config.json (empty when there is none).
  """
  path = common.require_file(path, 'CLIP checkpoint')
  hf_config: dict[str, Any] = {}
  if os.path.isdir(path):
    config_path = os.path.join(path, 'config.json')
    if os.path.exists(config_path):
      with open(config_path) as f:
        hf_config = json.load(f)
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(index):
      return _read_sharded(path, index), hf_config
    for name in ('model.safetensors', 'pytorch_model.bin'):
      if os.path.exists(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
    else:
      raise FileNotFoundError(
          f'CLIP checkpoint directory {path!r} holds neither model.safetensors, a sharded '
          f'model.safetensors.index.json nor pytorch_model.bin; found '
          f'{sorted(os.listdir(path))}.')
  else:
    config_path = os.path.join(os.path.dirname(path), 'config.json')
    if path.endswith('.safetensors') and os.path.exists(config_path):
      with open(config_path) as f:
        hf_config = json.load(f)

  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return dict(load_file(path)), hf_config
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      return {k: common.recover_npz_dtype(k, data[k], path) for k in data.files}, hf_config
  return _read_torch(path), hf_config


def _read_sharded(directory: str, index_path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  with open(index_path) as f:
    shards = sorted(set(json.load(f)['weight_map'].values()))
  out: dict[str, np.ndarray] = {}
  for shard in shards:
    out.update(load_file(common.require_file(os.path.join(directory, shard), 'checkpoint shard')))
  return out


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith('/constants.pkl') or '/code/' in n for n in z.namelist())


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f'Reading the PyTorch file {path!r} needs torch; install it, or export the state dict '
        'to .npz or .safetensors.') from e
  if _is_torchscript(path):
    # OpenAI's released ViT-*.pt files are TorchScript archives, which torch.load refuses
    # with weights_only=True.
    obj = torch.jit.load(path, map_location='cpu')
  else:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  if hasattr(obj, 'state_dict') and not isinstance(obj, Mapping):
    obj = obj.state_dict()
  if isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
    obj = obj['state_dict']  # open_clip training checkpoints
  out = {}
  for k, v in obj.items():
    if not hasattr(v, 'detach'):
      continue
    k = k[len('module.'):] if k.startswith('module.') else k
    v = v.detach().cpu()
    if v.is_floating_point() and v.dtype not in (torch.float32, torch.float64, torch.float16):
      v = v.float()  # bfloat16 has no numpy dtype
    out[k] = v.numpy()
  return out


# ----------------------------------------------------------------------------- naming


def is_openai_naming(state_dict: Mapping[str, Any]) -> bool:
  return any(k.startswith('visual.') for k in state_dict)


def openai_to_hf(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an OpenAI CLIP state dict to Hugging Face CLIPModel names.

  The fused attention ``in_proj_weight`` (3W, W) is split into q, k, v in that order; ``proj`` and
  ``text_projection`` (used as x @ proj) become Linear weights (transposed). Names that have no
  counterpart are kept unchanged so that the mismatch check reports them.
  """
  out: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    value = np.asarray(value)
    m = re.fullmatch(r'(visual\.)?transformer\.resblocks\.(\d+)\.(.+)', key)
    if m:
      tower = 'vision_model' if m.group(1) else 'text_model'
      prefix = f'{tower}.encoder.layers.{m.group(2)}.'
      rest = m.group(3)
      fused = re.fullmatch(r'attn\.in_proj_(weight|bias)', rest)
      if fused and value.shape[0] % 3 == 0:
        for name, part in zip('qkv', np.split(value, 3, axis=0)):
          out[f'{prefix}self_attn.{name}_proj.{fused.group(1)}'] = part
        continue
      renames = {'attn.out_proj.': 'self_attn.out_proj.', 'ln_1.': 'layer_norm1.',
                 'ln_2.': 'layer_norm2.', 'mlp.c_fc.': 'mlp.fc1.', 'mlp.c_proj.': 'mlp.fc2.'}
      for old, new in renames.items():
        if rest.startswith(old):
          out[prefix + new + rest[len(old):]] = value
          break
      else:
        out[key] = value
      continue
    simple = {
        'visual.conv1.weight': 'vision_model.embeddings.patch_embedding.weight',
        'visual.class_embedding': 'vision_model.embeddings.class_embedding',
        'visual.positional_embedding': 'vision_model.embeddings.position_embedding.weight',
        'token_embedding.weight': 'text_model.embeddings.token_embedding.weight',
        'positional_embedding': 'text_model.embeddings.position_embedding.weight',
        'logit_scale': 'logit_scale',
    }
    prefixes = {'visual.ln_pre.': 'vision_model.pre_layrnorm.',
                'visual.ln_post.': 'vision_model.post_layernorm.',
                'ln_final.': 'text_model.final_layer_norm.'}
    if key in simple:
      out[simple[key]] = value
    elif key in ('visual.proj', 'text_projection') and value.ndim == 2:
      out['visual_projection.weight' if key == 'visual.proj' else 'text_projection.weight'] = (
          value.T)
    else:
      for old, new in prefixes.items():
        if key.startswith(old):
          out[new + key[len(old):]] = value
          break
      else:
        out[key] = value
  return out


def _linear_to_heads(weight: np.ndarray, num_heads: int, *, out: bool) -> np.ndarray:
  """Torch Linear weight (out, in) -> Flax attention kernel (in, H, hd), or (H, hd, out) if out.

  Leaves the kernel unsplit when the width does not divide by the heads, so that the mismatch
  check reports the shape instead of a reshape error.
  """
  kernel = weight.T
  if out:
    if kernel.shape[0] % num_heads:
      return kernel
    return kernel.reshape(num_heads, kernel.shape[0] // num_heads, kernel.shape[1])
  if kernel.shape[1] % num_heads:
    return kernel
  return kernel.reshape(kernel.shape[0], num_heads, kernel.shape[1] // num_heads)


def hf_to_flax(state_dict: Mapping[str, np.ndarray], *, vision_heads: int,
               text_heads: int) -> dict[str, np.ndarray]:
  """Maps Hugging Face CLIPModel names onto the flat Flax layout ('vision/ln_pre/scale', ...).

  Keys with no counterpart are returned under their own name, so check_matches lists them as
  unexpected.
  """
  flat: dict[str, np.ndarray] = {}
  towers = {'vision_model': ('vision', vision_heads), 'text_model': ('text', text_heads)}
  for key, value in state_dict.items():
    value = np.asarray(value)
    if _IGNORED.search(key):
      continue
    m = re.fullmatch(r'(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)',
                     key)
    if m:
      tower, heads = towers[m.group(1)]
      block = f'{tower}/Transformer/encoderblock_{m.group(2)}'
      module, kind = m.group(3), m.group(4)
      attn = re.fullmatch(r'self_attn\.(q|k|v|out)_proj', module)
      if attn:
        name = {'q': 'query', 'k': 'key', 'v': 'value', 'out': 'out'}[attn.group(1)]
        dest = f'{block}/MultiHeadDotProductAttention_0/{name}'
        is_out = name == 'out'
        if kind == 'weight':
          flat[f'{dest}/kernel'] = _linear_to_heads(value, heads, out=is_out)
        elif is_out or value.shape[0] % heads:
          flat[f'{dest}/bias'] = value
        else:
          flat[f'{dest}/bias'] = value.reshape(heads, -1)
        continue
      if module in _BLOCK_NAMES:
        norm = module.startswith('layer_norm')
        leaf = ('scale' if norm else 'kernel') if kind == 'weight' else 'bias'
        flat[f'{block}/{_BLOCK_NAMES[module]}/{leaf}'] = value.T if leaf == 'kernel' else value
        continue
      flat[key] = value
      continue

    norms = {'vision_model.pre_layrnorm': 'vision/ln_pre',
             'vision_model.post_layernorm': 'vision/ln_post',
             'text_model.final_layer_norm': 'text/ln_final'}
    base, _, kind = key.rpartition('.')
    if base in norms and kind in ('weight', 'bias'):
      flat[f'{norms[base]}/{"scale" if kind == "weight" else "bias"}'] = value
    elif key == 'vision_model.embeddings.patch_embedding.weight' and value.ndim == 4:
      flat['vision/embedding/kernel'] = value.transpose(2, 3, 1, 0)  # (O,I,H,W) -> (H,W,I,O)
    elif key == 'vision_model.embeddings.class_embedding':
      flat['vision/class_embedding'] = value
    elif key == 'vision_model.embeddings.position_embedding.weight':
      flat['vision/positional_embedding'] = value
    elif key == 'text_model.embeddings.token_embedding.weight':
      flat['text/token_embedding/embedding'] = value
    elif key == 'text_model.embeddings.position_embedding.weight':
      flat['text/positional_embedding'] = value
    elif key == 'visual_projection.weight':
      flat['vision/proj'] = value.T
    elif key == 'text_projection.weight':
      flat['text/proj'] = value.T
    elif key == 'logit_scale':
      flat['logit_scale'] = value.reshape(())
    else:
      flat[key] = value
  return flat


# ----------------------------------------------------------------------------- configs


def _hf_activation(name: Optional[str]) -> str:
  return {'quick_gelu': 'quick_gelu', 'gelu': 'gelu_exact', 'gelu_new': 'gelu',
          'gelu_pytorch_tanh': 'gelu'}.get(name or 'quick_gelu', name or 'quick_gelu')


def config_from_checkpoint(state_dict: Mapping[str, np.ndarray],
                           hf_config: Optional[Mapping[str, Any]] = None,
                           **overrides) -> dict[str, Any]:
  """Infers ``CLIP(**kwargs)`` from tensor shapes (either naming); overrides win.

  Heads come from hf_config when given, else width // 64 (OpenAI's rule). The text pooling
  rule follows Hugging Face: eos_token_id == 2 in hf_config (legacy) or no config -> argmax of
  ids; any other eos_token_id -> first position of that id.
  """
  sd = openai_to_hf(state_dict) if is_openai_naming(state_dict) else dict(state_dict)
  if any(k.startswith('visual.layer') for k in state_dict):
    raise ValueError('This is an OpenAI ResNet CLIP checkpoint; only ViT CLIP models are '
                     'supported.')
  required = ['vision_model.embeddings.patch_embedding.weight',
              'vision_model.embeddings.position_embedding.weight',
              'text_model.embeddings.token_embedding.weight',
              'text_model.embeddings.position_embedding.weight',
              'visual_projection.weight']
  missing = [k for k in required if k not in sd]
  if missing:
    raise common.CheckpointMismatchError(
        f'Cannot infer a CLIP config: the checkpoint lacks {missing}. Found keys such as '
        f'{sorted(sd)[:8]}.')

  def depth(prefix):
    ids = {int(m.group(1)) for k in sd
           for m in [re.match(re.escape(prefix) + r'\.encoder\.layers\.(\d+)\.', k)] if m}
    return max(ids) + 1 if ids else 0

  patch = sd['vision_model.embeddings.patch_embedding.weight']
  vision_width, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
  num_pos = sd['vision_model.embeddings.position_embedding.weight'].shape[0]
  grid = int(round((num_pos - 1) ** 0.5))
  vocab_size, text_width = sd['text_model.embeddings.token_embedding.weight'].shape
  fc1 = lambda tower: sd.get(f'{tower}.encoder.layers.0.mlp.fc1.weight')
  vision_fc1, text_fc1 = fc1('vision_model'), fc1('text_model')
  config: dict[str, Any] = dict(
      embed_dim=int(sd['visual_projection.weight'].shape[0]),
      image_size=int(grid * patch_size), patch_size=int(patch_size),
      vision_width=int(vision_width), vision_layers=depth('vision_model'),
      vision_heads=max(1, int(vision_width) // 64),
      context_length=int(sd['text_model.embeddings.position_embedding.weight'].shape[0]),
      vocab_size=int(vocab_size), text_width=int(text_width),
      text_layers=depth('text_model'), text_heads=max(1, int(text_width) // 64),
      vision_mlp_dim=None if vision_fc1 is None else int(vision_fc1.shape[0]),
      text_mlp_dim=None if text_fc1 is None else int(text_fc1.shape[0]),
      channels=int(channels))
  if hf_config:
    vc, tc = hf_config.get('vision_config', {}), hf_config.get('text_config', {})
    if 'num_attention_heads' in vc:
      config['vision_heads'] = int(vc['num_attention_heads'])
    if 'num_attention_heads' in tc:
      config['text_heads'] = int(tc['num_attention_heads'])
    eos = tc.get('eos_token_id')
    config['eos_token_id'] = None if eos in (None, 2) else int(eos)
    act_v, act_t = vc.get('hidden_act'), tc.get('hidden_act')
    if act_v and act_t and act_v != act_t:
      raise ValueError(f'Towers with different activations ({act_v}, {act_t}) are not '
                       'supported.')
    config['activation'] = _hf_activation(act_v or act_t)
    if 'layer_norm_eps' in vc:
      config['layer_norm_epsilon'] = float(vc['layer_norm_eps'])
  config.update(overrides)
  return config


# ----------------------------------------------------------------------------- loading


def _expected_params(model: clip_model.CLIP) -> dict[str, jax.ShapeDtypeStruct]:
  images, tokens = clip_model.dummy_inputs(model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
  return common.flatten(shapes['params'])


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], model: clip_model.CLIP, *,
                           source: str = 'CLIP checkpoint') -> dict[str, Any]:
  """Converts a state dict (either naming) into `model`'s params, checking every key and shape."""
  sd = openai_to_hf(state_dict) if is_openai_naming(state_dict) else dict(state_dict)
  flat = hf_to_flax(sd, vision_heads=model.vision_heads, text_heads=model.text_heads)
  expected = _expected_params(model)
  common.check_matches(expected, flat, source=source)
  return common.unflatten(
      {k: np.asarray(v, dtype=expected[k].dtype) for k, v in flat.items()})


def load(path: str | os.PathLike, model: Optional[clip_model.CLIP] = None,
         **overrides) -> tuple[clip_model.CLIP, dict[str, Any]]:
  """Loads a CLIP checkpoint -> (model, params).

  Without `model`, the model is built from config_from_checkpoint (overrides such as
  dtype=jnp.bfloat16 or vision_heads=... are passed through). With `model`, the checkpoint must
  match it exactly, or one CheckpointMismatchError lists every difference.
  """
  state_dict, hf_config = read_state_dict(path)
  if model is None:
    model = clip_model.CLIP(**config_from_checkpoint(state_dict, hf_config, **overrides))
  elif overrides:
    raise TypeError(f'Pass either a model or config overrides, not both (got {sorted(overrides)}).')
  source = f'CLIP checkpoint {os.fspath(path)!r}'
  return model, params_from_state_dict(state_dict, model, source=source)
