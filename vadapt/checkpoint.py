"""Checkpoints of what training changes (the delta), and standalone adapter files.

A training checkpoint in `workdir/checkpoints/<step>/` holds three Orbax items:

  delta      the trainable params (adapters, head, ...): a pruned tree, never the frozen backbone
  opt_state  the optimizer state of the delta
  meta       JSON: step, config, adapter spec, backbone fingerprint and the checkpoint it came from

An exported adapter is one `.safetensors` file: the delta under '/'-joined paths, plus the same
JSON in the file's metadata. `load_adapter` puts it back onto a freshly loaded backbone and refuses
a backbone whose fingerprint differs from the one it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vadapt.pretrained import common as pretrained_common

ITEMS = ('delta', 'opt_state', 'meta')
_METADATA_KEY = 'vadapt'


class BackboneMismatchError(ValueError):
  """An adapter is being loaded onto a backbone other than the one it was trained on."""


def fingerprint(frozen: Mapping[str, Any]) -> str:
  """sha256 over the sorted (path, shape, dtype) of every frozen leaf.

  It identifies the backbone's architecture and layout (not its values, which would cost a pass
  over every weight); `meta['backbone_checkpoint']` records which weights were used.
  """
  flat = pretrained_common.flatten(frozen)
  lines = [f'{path}\t{tuple(np.shape(leaf))}\t{jnp.dtype(leaf.dtype).name}'
           for path, leaf in sorted(flat.items())]
  return hashlib.sha256('\n'.join(lines).encode()).hexdigest()


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) that Orbax restores into."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), tree)


class Checkpointer:
  """Orbax CheckpointManager for {delta, opt_state, meta} in `workdir/checkpoints`.

  Saves are asynchronous; `wait()` (or `close()`) blocks until every save is committed.

  Attributes:
    directory: where the numbered step directories live.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 2):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, delta: Any, opt_state: Any, meta: Mapping[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        delta=ocp.args.StandardSave(delta),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(dict(meta))))

  def restore(self, step: int, delta_like: Any, opt_state_like: Any) -> tuple[Any, Any, dict]:
    """Restores step `step` into the structure, shapes and shardings of the `*_like` trees."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        delta=ocp.args.StandardRestore(abstract(delta_like)),
        opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
        meta=ocp.args.JsonRestore()))
    return restored.delta, restored.opt_state, restored.meta

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_delta(self, step: int) -> dict:
    """The delta as host numpy arrays (no target structure needed)."""
    delta = self._manager.restore(
        step, args=ocp.args.Composite(delta=ocp.args.StandardRestore())).delta
    return jax.tree.map(np.asarray, delta)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_adapter(path: str, delta: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
  """Writes the delta and its JSON spec to one .safetensors file; returns the path."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if not path.endswith('.safetensors'):
    raise ValueError(f'Adapter files are .safetensors; got {path!r}.')
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in
          pretrained_common.flatten(jax.device_get(delta)).items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(flat, path, metadata={_METADATA_KEY: json.dumps(dict(meta))})
  return path


def read_adapter(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """Returns ({'a/b/kernel': array}, meta) from an exported adapter file."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  pretrained_common.require_file(path, 'adapter file')
  with safe_open(path, framework='numpy') as f:
    metadata = f.metadata() or {}
    flat = {k: f.get_tensor(k) for k in f.keys()}
  if _METADATA_KEY not in metadata:
    raise ValueError(f'{path!r} is not a vadapt adapter file: its metadata has no '
                     f'{_METADATA_KEY!r} entry (found keys {sorted(metadata)}).')
  return flat, json.loads(metadata[_METADATA_KEY])


def load_adapter(path: str, model: nn.Module, backbone_params: Mapping[str, Any], *,
                 image_size: Optional[int] = None) -> dict[str, Any]:
  """Puts an exported adapter onto a backbone; returns the full params for `model.apply`.

  Args:
    path: the .safetensors file from `save_adapter` / `export.export_adapter`.
    model: the adapted model (e.g. `api.adapt(backbone, **meta['adapter'])`).
    backbone_params: the pre-trained backbone's params (as loaded from its checkpoint).
    image_size: input side used to trace the model (default: the one stored in the file).

  Raises:
    BackboneMismatchError: the backbone's fingerprint differs from the training backbone's.
    CheckpointMismatchError: the adapter's tensors do not fit the model.
  """
  flat_delta, meta = read_adapter(path)
  backbone_flat = pretrained_common.flatten(backbone_params)
  # The frozen tree of training = every backbone leaf the delta does not replace.
  frozen = {k: v for k, v in backbone_flat.items() if k not in flat_delta}
  found_fp = fingerprint(pretrained_common.unflatten(frozen))
  if found_fp != meta['backbone_fingerprint']:
    raise BackboneMismatchError(
        f'Adapter {path!r} was trained on a backbone with fingerprint '
        f'{meta["backbone_fingerprint"][:16]}... (variant {meta.get("variant")!r}, from '
        f'{meta.get("backbone_checkpoint") or "a random init"!r}); the given backbone has '
        f'fingerprint {found_fp[:16]}...: its parameter paths, shapes or dtypes differ. Load '
        'the backbone it was trained on.')
  size = image_size or meta.get('image_size')
  if not size:
    raise ValueError('image_size is needed to trace the model; the adapter file stores none.')
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  expected = pretrained_common.flatten(jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, train=False)['params']))
  merged = {**frozen, **flat_delta}
  pretrained_common.check_matches(expected, merged, source=f'adapter {path!r} + backbone')
  return pretrained_common.unflatten(merged)
