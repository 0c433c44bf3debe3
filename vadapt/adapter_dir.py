"""Serving files: one directory per named adapter, and sets of adapters saved together.

  <dir>/adapter_config.json   name, targets (pattern, position, adapter config), head width and
                              class names, the backbone's fingerprint and weight digest
  <dir>/adapter.safetensors   the adapter's and its head's parameters, at name-free paths
                              ('Transformer/encoderblock_0/MlpBlock_0/*/down/kernel')

An AdapterFusion is saved the same way: a head-only adapter whose config names the fused members
('fusion': members, dropout, temperature) and whose weights add the fusion layers
('.../MlpBlock_0/*fusion/query/kernel'); loading it needs its members loaded first, and
`fuse_block` gives the composition block that calls it. An output average (AdapterHub's
Average) is saved alike: a head-only adapter whose config names the averaged members and their
weights ('average': members, weights); `block` gives the Average (or Fuse) that serves it.

the layout users know from peft (adapter_config.json + adapter_model.safetensors) and AdapterHub
(one directory per adapter, its head stored with it). A set is a directory holding one such
directory per adapter plus `adapters.json` with their order.

  adapter_dir.save('out/pets', model, params, 'pets')
  model, params = adapter_dir.load('out/pets', backbone, backbone_params)        # a new model
  model, params = adapter_dir.add(model, params, 'out/flowers')                  # one more
  adapter_dir.save_set('out/all', model, params)
  model, params = adapter_dir.load_set('out/all', backbone, backbone_params)
  adapter_dir.save('out/both', model, params, 'both', fusion=Fuse('pets', 'flowers',
                   name=adapter_dir.fusion_name('both')))
  model, params = adapter_dir.add(model, params, 'out/both')
  model.apply({'params': params}, images, adapter=adapter_dir.fuse_block('out/both'), head='both')

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
from vadapt import composition
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
_FUSION_WILDCARD = '*fusion'
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


def fusion_name(name: str) -> str:
  """The fusion layers' module name of the AdapterFusion adapter `name` (a head-only adapter)."""
  return f'fusion_{name}'


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


def _fusion_params(params: Mapping, fusion: composition.Fuse) -> dict[str, Any]:
  return {k: v for k, v in pretrained_common.flatten(params).items()
          if fusion.name in k.split('/')[:-1]}


def save(directory: str, model: multi.MultiAdapted, params: Mapping, name: str, *,
         fusion: Optional[composition.Fuse] = None,
         average: Optional[composition.Average] = None,
         meta: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> str:
  """Writes adapter `name` (and its head) to `directory`; returns the directory.

  Args:
    directory: where adapter_config.json and adapter.safetensors go.
    model: the model holding the adapter.
    params: its parameters.
    name: the adapter to save.
    fusion: for an AdapterFusion adapter (head-only, served with adapter=fusion), the block:
      its fusion layers are saved with the head, and its members named in the config.
    average: for an output average (head-only, served with adapter=average), the Average block:
      its members and weights are named in the config.
    meta: JSON-ready extra information stored as the config's 'meta' (e.g. the experiment config
      and preprocessing, for serving).
    overwrite: replace what `directory` already holds.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  _check_writable(directory, overwrite)
  config = _config(model, params, name)
  leaves = {_rename(k, name, _WILDCARD): v
            for k, v in multi.adapter_params(model, params, name).items()}
  if fusion is not None:
    missing = [m for m in fusion.members if m not in model.names()]
    if missing or name in fusion.members:
      raise ValueError(f'Fusion adapter {name!r}: its members {list(fusion.members)} must be '
                       f'other adapters of the model ({list(model.names())}).')
    layers = _fusion_params(params, fusion)
    if not layers:
      raise ValueError(f'params hold no fusion layers named {fusion.name!r}: initialise them '
                       '(multi.init_missing with adapter=Fuse(...)) or train them first.')
    leaves.update({_rename(k, fusion.name, _FUSION_WILDCARD): v for k, v in layers.items()})
    config['fusion'] = {'members': list(fusion.members), 'dropout': fusion.dropout,
                        'temperature': fusion.temperature}
  if average is not None:
    missing = [m for m in average.members if m not in model.names()]
    if missing or name in average.members or fusion is not None:
      raise ValueError(f'Average adapter {name!r}: its members {list(average.members)} must be '
                       f'other adapters of the model ({list(model.names())}).')
    config['average'] = {'members': list(average.members), 'weights': list(average.weights)}
  if meta is not None:
    config['meta'] = json.loads(json.dumps(dict(meta)))
  flat = {k: np.ascontiguousarray(np.asarray(jax.device_get(v))) for k, v in leaves.items()}
  os.makedirs(directory, exist_ok=True)
  _write_atomic(os.path.join(directory, WEIGHTS), lambda p: save_file(flat, p))
  _write_atomic(os.path.join(directory, CONFIG),
                lambda p: open(p, 'w').write(json.dumps(config, indent=2) + '\n'))
  return directory


def read_config(directory: str) -> dict[str, Any]:
  """The adapter_config.json of a saved adapter (checked to be one)."""
  pretrained_common.require_file(os.path.join(directory, CONFIG), 'adapter config')
  with open(os.path.join(directory, CONFIG)) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{os.path.join(directory, CONFIG)!r} is not valid JSON ({e}).') from None
  if not isinstance(config, dict) or config.get('format') != FORMAT:
    raise ValueError(f'{directory!r} is not a vadapt adapter directory ({CONFIG} has format '
                     f'{config.get("format") if isinstance(config, dict) else None!r}, expected '
                     f'{FORMAT!r}).')
  return config


def read(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config, {name-free path: array}) of a saved adapter."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config = read_config(directory)
  pretrained_common.require_file(os.path.join(directory, WEIGHTS), 'adapter weights')
  return config, load_file(os.path.join(directory, WEIGHTS))


def fuse_block(directory_or_config: Any, name: Optional[str] = None
               ) -> Optional[composition.Fuse]:
  """The Fuse block that serves a saved AdapterFusion adapter (loaded as `name`, default its
  saved name), or None for an ordinary adapter."""
  config = directory_or_config
  if isinstance(config, (str, os.PathLike)):
    config = read_config(os.fspath(config))
  fusion = config.get('fusion')
  if not fusion:
    return None
  return composition.Fuse(*fusion['members'], name=fusion_name(name or config['name']),
                          dropout=fusion['dropout'], temperature=fusion['temperature'])


def block(directory_or_config: Any, name: Optional[str] = None
          ) -> Optional[Any]:
  """The composition block that serves a saved adapter: a Fuse (AdapterFusion) or an Average
  (an output average), or None for an ordinary adapter (served by its name)."""
  config = directory_or_config
  if isinstance(config, (str, os.PathLike)):
    config = read_config(os.fspath(config))
  average = config.get('average')
  if average:
    return composition.Average(*average['members'], weights=average['weights'])
  return fuse_block(config, name)


def named_adapter(config: Mapping[str, Any], name: Optional[str] = None) -> multi.NamedAdapter:
  """The NamedAdapter a saved config describes (optionally under another name)."""
  return multi.NamedAdapter(
      name=name or config['name'],
      targets=tuple(Target(pattern=t['pattern'], adapter=adapter_config_from_dict(t['adapter']),
                           position=t['position'], name=t['name']) for t in config['targets']),
      num_classes=config.get('num_classes'), class_names=tuple(config.get('class_names') or ()))


def check_layout(directory: str, config: Mapping[str, Any], backbone_params: Mapping) -> None:
  """Raises BackboneMismatchError unless the adapter was trained on a backbone of this layout
  (parameter paths, shapes, dtypes; `backbone_params` may be abstract)."""
  _check_backbone(directory, config, backbone_params, check_weights=False)


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
  fusion = fuse_block(config, spec.name)
  served = block(config, spec.name)
  if served is not None:
    missing = [m for m in served.members if m not in model.names()]
    if missing:
      kind = 'an AdapterFusion' if fusion is not None else 'an output average'
      raise ValueError(f'Adapter {spec.name!r} in {directory!r} is {kind} of '
                       f'{list(served.members)}; the model holds {list(model.names())}: add '
                       f'{missing} first.')
  bigger = model.with_adapter(spec)
  merged = pretrained_common.flatten(params)
  rename = lambda k: _rename(_rename(k, _FUSION_WILDCARD, fusion.name) if fusion else k,
                             _WILDCARD, spec.name)
  merged.update({rename(k): jax.numpy.asarray(v) for k, v in flat.items()})
  return bigger, pretrained_common.unflatten(merged)


def load(directory: str, backbone, backbone_params: Mapping, *, name: Optional[str] = None,
         check_weights: bool = True) -> tuple[multi.MultiAdapted, dict]:
  """A model holding the adapter saved in `directory` on `backbone`, and its params."""
  return add(multi.adapt(backbone, []), dict(backbone_params), directory, name=name,
             check_weights=check_weights)


def save_set(directory: str, model: multi.MultiAdapted, params: Mapping,
             names: Optional[Sequence[str]] = None, *,
             fusions: Optional[Mapping[str, composition.Fuse]] = None,
             overwrite: bool = False) -> str:
  """Writes several adapters (default: all with targets or heads) under `directory`
  (`fusions`: the Fuse block of each AdapterFusion adapter among them)."""
  names = list(model.names() if names is None else names)
  for n in names:
    model.index(n)
  targets = [directory] + [os.path.join(directory, n) for n in names]
  for d in targets:  # Nothing is written unless everything may be.
    _check_writable(d, overwrite)
  for n in names:
    save(os.path.join(directory, n), model, params, n, fusion=(fusions or {}).get(n),
         overwrite=overwrite)
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
