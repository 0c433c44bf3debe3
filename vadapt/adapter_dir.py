"""Serving files: one directory per named adapter, and sets of adapters saved together.

  <dir>/adapter_config.json   name, targets (pattern, position, adapter config), head width and
                              class names, the backbone's fingerprint and weight digest
  <dir>/adapter.safetensors   the adapter's and its head's parameters, at name-free paths
                              ('Transformer/encoderblock_0/MlpBlock_0/*/down/kernel')

the layout users know from peft (adapter_config.json + adapter_model.safetensors) and AdapterHub
(one directory per adapter, its head stored with it). A set is a directory holding one such
directory per adapter plus `adapters.json` with their order.

  adapter_dir.save('out/pets', model, params, 'pets')
  model, params = adapter_dir.load('out/pets', backbone, backbone_params)        # a new model
  model, params = adapter_dir.add(model, params, 'out/flowers')                  # one more
  adapter_dir.save_set('out/all', model, params)
  model, params = adapter_dir.load_set('out/all', backbone, backbone_params)

Loading checks that the backbone is the one the adapter was trained on: the same parameter
paths, shapes and dtypes (checkpoint.layout_fingerprint) and the same weights (a digest of a fixed
sample of every backbone tensor). Nothing already saved is overwritten unless overwrite=True.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from vadapt import checkpoint as ckpt_lib
from vadapt import multi
from vadapt.adapters.bottleneck import BottleneckConfig
from vadapt.adapters.conv import ConvAdapterConfig
from vadapt.inject import Target
from vadapt.pretrained import common as pretrained_common

CONFIG = 'adapter_config.json'
WEIGHTS = 'adapter.safetensors'
SET_INDEX = 'adapters.json'
FORMAT = 'vadapt.adapter_dir'
VERSION = 1
_WILDCARD = '*'
_DIGEST_SAMPLE = 64  # Values per tensor that enter the weight digest.


def config_kinds() -> dict[str, type]:
  """Adapter config classes by the 'kind' their to_dict() writes."""
  kinds = {'bottleneck': BottleneckConfig, 'conv': ConvAdapterConfig}
  try:  # Methods that live in their own modules register the same way.
    from vadapt.adapters import lora  # pylint: disable=g-import-not-at-top
    for value in vars(lora).values():
      if isinstance(value, type) and dataclasses.is_dataclass(value) and hasattr(value, 'to_dict'):
        try:
          kinds[value().to_dict()['kind']] = value
        except Exception:  # pylint: disable=broad-except
          pass
  except ImportError:
    pass
  return kinds


def adapter_config_from_dict(d: Mapping[str, Any]):
  d = dict(d)
  kind = d.pop('kind', None)
  kinds = config_kinds()
  if kind not in kinds:
    raise ValueError(f'Unknown adapter kind {kind!r} in {CONFIG}; known: {sorted(kinds)}.')
  fields = {f.name: f for f in dataclasses.fields(kinds[kind])}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(f'Adapter config of kind {kind!r} has unknown fields {unknown}.')
  return kinds[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def weights_digest(backbone_params: Mapping[str, Any]) -> str:
  """sha256 over the first values of every backbone tensor: tells same-shaped backbones apart
  (another pre-training) at the cost of reading a few numbers per tensor."""
  h = hashlib.sha256()
  for path, leaf in sorted(pretrained_common.flatten(backbone_params).items()):
    sample = np.asarray(jax.device_get(np.ravel(leaf)[:_DIGEST_SAMPLE]), np.float32)
    h.update(path.encode())
    h.update(sample.tobytes())
  return h.hexdigest()


def _rename(path: str, old: str, new: str) -> str:
  parts = path.split('/')
  return '/'.join(new + p[len(old):] if k < len(parts) - 1 and (p == old or p.startswith(old + '.'))
                  else p for k, p in enumerate(parts))


def _check_writable(directory: str, overwrite: bool) -> None:
  existing = [f for f in (CONFIG, WEIGHTS, SET_INDEX) if os.path.exists(os.path.join(directory, f))]
  if existing and not overwrite:
    raise FileExistsError(f'{directory!r} already holds {existing}; pass overwrite=True to '
                          'replace it.')


def _write_atomic(path: str, write) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _config(model: multi.MultiAdapted, params: Mapping, name: str) -> dict[str, Any]:
  spec = model.adapter(name)
  backbone = multi.backbone_params(model, params)
  return {
      'format': FORMAT, 'version': VERSION, 'name': name,
      'targets': [{'pattern': t.pattern, 'position': t.position, 'name': t.name,
                   'adapter': t.adapter.to_dict()} for t in spec.targets],
      'num_classes': spec.num_classes, 'class_names': list(spec.class_names),
      'backbone': {'fingerprint': ckpt_lib.layout_fingerprint(backbone),
                   'weights_digest': weights_digest(backbone)},
  }


def save(directory: str, model: multi.MultiAdapted, params: Mapping, name: str, *,
         overwrite: bool = False) -> str:
  """Writes adapter `name` (and its head) to `directory`; returns the directory."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  _check_writable(directory, overwrite)
  config = _config(model, params, name)
  flat = {_rename(k, name, _WILDCARD): np.ascontiguousarray(np.asarray(jax.device_get(v)))
          for k, v in multi.adapter_params(model, params, name).items()}
  os.makedirs(directory, exist_ok=True)
  _write_atomic(os.path.join(directory, WEIGHTS), lambda p: save_file(flat, p))
  _write_atomic(os.path.join(directory, CONFIG),
                lambda p: open(p, 'w').write(json.dumps(config, indent=2) + '\n'))
  return directory


def read(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config, {name-free path: array}) of a saved adapter."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  pretrained_common.require_file(os.path.join(directory, CONFIG), 'adapter config')
  with open(os.path.join(directory, CONFIG)) as f:
    config = json.load(f)
  if config.get('format') != FORMAT:
    raise ValueError(f'{directory!r} is not a vadapt adapter directory ({CONFIG} has format '
                     f'{config.get("format")!r}, expected {FORMAT!r}).')
  pretrained_common.require_file(os.path.join(directory, WEIGHTS), 'adapter weights')
  return config, load_file(os.path.join(directory, WEIGHTS))


def named_adapter(config: Mapping[str, Any], name: Optional[str] = None) -> multi.NamedAdapter:
  """The NamedAdapter a saved config describes (optionally under another name)."""
  return multi.NamedAdapter(
      name=name or config['name'],
      targets=tuple(Target(pattern=t['pattern'], adapter=adapter_config_from_dict(t['adapter']),
                           position=t['position'], name=t['name']) for t in config['targets']),
      num_classes=config.get('num_classes'), class_names=tuple(config.get('class_names') or ()))


def _check_backbone(directory: str, config, backbone_params, check_weights: bool) -> None:
  found = ckpt_lib.layout_fingerprint(backbone_params)
  stored = config['backbone']
  if found != stored['fingerprint']:
    raise ckpt_lib.BackboneMismatchError(
        f'Adapter {config["name"]!r} in {directory!r} was trained on a backbone with fingerprint '
        f'{stored["fingerprint"][:16]}...; this backbone has {found[:16]}... (other parameter '
        'paths, shapes or dtypes). Load it onto the backbone it was trained on.')
  if check_weights and weights_digest(backbone_params) != stored['weights_digest']:
    raise ckpt_lib.BackboneMismatchError(
        f'Adapter {config["name"]!r} in {directory!r} was trained on a backbone of this '
        'architecture but other weights (the weight digests differ): load the pre-trained '
        'weights it was trained on, or pass check_weights=False.')


def add(model: multi.MultiAdapted, params: Mapping, directory: str, *, name: Optional[str] = None,
        check_weights: bool = True) -> tuple[multi.MultiAdapted, dict]:
  """`model` and `params` plus the adapter saved in `directory` (optionally renamed)."""
  config, flat = read(directory)
  spec = named_adapter(config, name)
  backbone = multi.backbone_params(model, params)
  _check_backbone(directory, config, backbone, check_weights)
  modules = {k.rpartition('/')[0] for k in pretrained_common.flatten(backbone)}
  prefixes = {k.split('/' + _WILDCARD)[0] for k in flat if not k.startswith(multi.HEADS + '/')}
  missing = sorted(p for p in prefixes if not any(m == p or m.startswith(p + '/') for m in modules))
  if missing:
    raise ValueError(f'Adapter {spec.name!r} in {directory!r} adapts modules the backbone does not '
                     f'have: {missing[:3]}.')
  bigger = model.with_adapter(spec)
  merged = pretrained_common.flatten(params)
  merged.update({_rename(k, _WILDCARD, spec.name): jax.numpy.asarray(v) for k, v in flat.items()})
  return bigger, pretrained_common.unflatten(merged)


def load(directory: str, backbone, backbone_params: Mapping, *, name: Optional[str] = None,
         check_weights: bool = True) -> tuple[multi.MultiAdapted, dict]:
  """A model holding the adapter saved in `directory` on `backbone`, and its params."""
  return add(multi.adapt(backbone, []), dict(backbone_params), directory, name=name,
             check_weights=check_weights)


def save_set(directory: str, model: multi.MultiAdapted, params: Mapping,
             names: Optional[Sequence[str]] = None, *, overwrite: bool = False) -> str:
  """Writes several adapters (default: all with targets or heads) under `directory`."""
  names = list(model.names() if names is None else names)
  for n in names:
    model.index(n)
  targets = [directory] + [os.path.join(directory, n) for n in names]
  for d in targets:  # Nothing is written unless everything may be.
    _check_writable(d, overwrite)
  for n in names:
    save(os.path.join(directory, n), model, params, n, overwrite=overwrite)
  _write_atomic(os.path.join(directory, SET_INDEX),
                lambda p: open(p, 'w').write(json.dumps({'adapters': names}, indent=2) + '\n'))
  return directory


def load_set(directory: str, backbone, backbone_params: Mapping, *,
             check_weights: bool = True) -> tuple[multi.MultiAdapted, dict]:
  """A model holding every adapter of a set, in the saved order."""
  pretrained_common.require_file(os.path.join(directory, SET_INDEX), 'adapter set index')
  with open(os.path.join(directory, SET_INDEX)) as f:
    names = json.load(f)['adapters']
  model, params = multi.adapt(backbone, []), dict(backbone_params)
  for n in names:
    model, params = add(model, params, os.path.join(directory, n), check_weights=check_weights)
  return model, params
