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
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vadapt import files
from vadapt import partition
from vadapt.pretrained import common as pretrained_common

ITEMS = ('delta', 'opt_state', 'meta')
# Orbax writes this file into a step (and each item) once everything else of it is on disk.
COMMIT_MARKER = 'commit_success.txt'
_METADATA_KEY = 'vadapt'


class BackboneMismatchError(ValueError):
  """An adapter is being loaded onto a backbone other than the one it was trained on."""


class AdapterFileError(ValueError):
  """An adapter file cannot be read, or lacks what loading it needs."""


# Frozen leaves computed from the others when the backbone is built: CLIP's zero-shot classifier
# (vadapt.models.clip_classifier, from the text tower and the class names). Their layout counts in
# the fingerprint, their values do not: those follow the class names and the device's arithmetic.
DERIVED_LEAVES = re.compile(r'classifier/value')


def layout_fingerprint(frozen: Mapping[str, Any]) -> str:
  """sha256 over the sorted (path, shape, dtype) of every frozen leaf: the backbone's layout."""
  flat = pretrained_common.flatten(frozen)
  lines = [f'{path}\t{tuple(np.shape(leaf))}\t{jnp.dtype(leaf.dtype).name}'
           for path, leaf in sorted(flat.items())]
  return hashlib.sha256('\n'.join(lines).encode()).hexdigest()


def fingerprint(frozen: Mapping[str, Any]) -> str:
  """sha256 over the sorted path, shape, dtype and values of every frozen leaf.

  It identifies the backbone's weights, not only their layout: two files of the same architecture
  differ. It reads every byte once (about a second per GB), so it is computed once, when the
  backbone is loaded. DERIVED_LEAVES count by layout only.
  """
  flat = pretrained_common.flatten(frozen)
  digest = hashlib.sha256()
  for path, leaf in sorted(flat.items()):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise ValueError(f'fingerprint needs the weights\' values; leaf {path!r} is abstract.')
    digest.update(f'{path}\t{tuple(np.shape(leaf))}\t{jnp.dtype(leaf.dtype).name}\n'.encode())
    if not DERIVED_LEAVES.fullmatch(path):
      value = np.ascontiguousarray(jax.device_get(leaf))
      digest.update(hashlib.sha256(value.reshape(-1).view(np.uint8)).digest())
  return digest.hexdigest()


def describe_backbone(meta: Mapping[str, Any]) -> str:
  """'<file> (variant ..., fingerprint 0123abcd...)' for messages."""
  source = meta.get('backbone_checkpoint') or 'a random init (no backbone.checkpoint)'
  fp = meta.get('backbone_fingerprint') or 'none recorded'
  return f'{source} (variant {meta.get("variant")!r}, fingerprint {fp[:12]}...)'


def backbone_mismatch(stored: Mapping[str, Any], current: Mapping[str, Any],
                      what: str) -> Optional[str]:
  """Why `stored` (meta of a checkpoint or adapter file) was trained on another backbone than
  `current` (the meta of what is loaded now), or None when the fingerprints agree."""
  if stored.get('backbone_fingerprint') == current.get('backbone_fingerprint'):
    return None
  if not stored.get('backbone_fingerprint'):
    why = 'it records no backbone fingerprint, so its backbone cannot be checked'
  elif not stored.get('backbone_layout'):
    why = 'its fingerprint predates weight-value fingerprints, so the weights cannot be compared'
  elif stored['backbone_layout'] == current.get('backbone_layout'):
    why = 'same architecture, different weights'
  else:
    why = 'its parameter paths, shapes or dtypes differ'
  return (f'{what} was trained on another backbone than the one loaded now ({why}): trained on '
          f'{describe_backbone(stored)}; loaded now: {describe_backbone(current)}.')


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/0/kernel': shape} of every leaf with a shape (arrays, ShapeDtypeStructs, metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path):
          tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, 'shape')}


def _free_name(path: str) -> str:
  """`path`, or `path.1`, `path.2`, ... whichever does not exist yet."""
  candidate, n = path, 0
  while os.path.exists(candidate):
    n += 1
    candidate = f'{path}.{n}'
  return candidate


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
        # Handlers up front, so that item metadata can be read before any save or restore.
        item_handlers={'delta': ocp.StandardCheckpointHandler(),
                       'opt_state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    """The newest numbered step directory, intact or not (see `step_problem`)."""
    return self._manager.latest_step()

  def step_problem(self, step: int) -> Optional[str]:
    """Why step `step` cannot be restored, from its files alone; None when it looks complete.

    Orbax writes its commit marker last, so a step without one is a save that never finished.
    Data files that are truncated or missing show only when read (`restore` raises).
    """
    path = os.path.join(self.directory, str(step))
    if not os.path.isdir(path) or not os.listdir(path):
      return 'its directory is empty'
    if not os.path.exists(os.path.join(path, COMMIT_MARKER)):
      return f'it has no commit marker ({COMMIT_MARKER}): its save never finished'
    for item in ITEMS:
      if not os.path.exists(os.path.join(path, item, COMMIT_MARKER)):
        return f'its {item!r} item is missing or incomplete'
    return None

  def stored_shapes(self, step: int, item: str) -> dict[str, tuple[int, ...]]:
    """{'a/b/kernel': shape} of a step's array item from its metadata, reading no arrays."""
    tree = getattr(self._manager.item_metadata(step), item).tree
    return tree_shapes(tree)

  def set_aside(self, step: int, destination: str) -> str:
    """Moves step `step`'s directory to `destination` (never deletes it); returns the new path."""
    target = _free_name(destination)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(os.path.join(self.directory, str(step)), target)
    return target

  def reload(self) -> None:
    """Re-reads the step directories (after some were moved)."""
    self._manager.reload()

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


# What a training run writes into its workdir (besides stage-1 outputs of a two-stage config).
RUN_OUTPUTS = ('checkpoints', 'metrics.jsonl', 'adapter.safetensors')


def move_run_aside(workdir: str) -> Optional[str]:
  """Moves a workdir's checkpoints, metrics, TensorBoard events and adapter into
  `workdir/previous_runs/<n>/` (nothing is deleted); returns that directory, or None if empty."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    return None
  names = sorted(n for n in os.listdir(workdir)
                 if n in RUN_OUTPUTS or n.startswith('events.out.tfevents'))
  if not names:
    return None
  parent = os.path.join(workdir, 'previous_runs')
  os.makedirs(parent, exist_ok=True)
  target = _free_name(os.path.join(parent, str(len(os.listdir(parent)) + 1)))
  os.makedirs(target)
  for name in names:
    os.rename(os.path.join(workdir, name), os.path.join(target, name))
  return target


def save_adapter(path: str, delta: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
  """Writes the delta and its JSON spec to one .safetensors file; returns the path."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if not path.endswith('.safetensors'):
    raise ValueError(f'Adapter files are .safetensors; got {path!r}.')
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in
          pretrained_common.flatten(jax.device_get(delta)).items()}
  with files.atomic_path(path) as tmp:
    save_file(flat, tmp, metadata={_METADATA_KEY: json.dumps(dict(meta))})
  return path


def read_adapter(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """Returns ({'a/b/kernel': array}, meta) from an exported adapter file."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  pretrained_common.require_file(path, 'adapter file')
  try:
    with safe_open(path, framework='numpy') as f:
      metadata = f.metadata() or {}
      flat = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors' SafetensorError names neither the file nor the cause.
    raise AdapterFileError(
        f'Cannot read adapter file {path!r} ({os.path.getsize(path):,} bytes): {e}. It is '
        'truncated or not a .safetensors file; export it again (--mode=export).') from e
  if _METADATA_KEY not in metadata:
    raise ValueError(f'{path!r} is not a vadapt adapter file: its metadata has no '
                     f'{_METADATA_KEY!r} entry (found keys {sorted(metadata)}).')
  return flat, json.loads(metadata[_METADATA_KEY])


def load_adapter(path: str, model: nn.Module, backbone_params: Mapping[str, Any], *,
                 image_size: Optional[int] = None,
                 allow_other_backbone: bool = False) -> dict[str, Any]:
  """Puts an exported adapter onto a backbone; returns the full params for `model.apply`.

  For a CNN, `backbone_params` and the result also hold the BatchNorm statistics under
  'batch_stats' (as backbones.load_params gives them): apply with partition.to_variables(params).

  Args:
    path: the .safetensors file from `save_adapter` / `export.export_adapter`.
    model: the adapted model (e.g. `api.adapt(backbone, **meta['adapter'])`).
    backbone_params: the pre-trained backbone's params (as loaded from its checkpoint).
    image_size: input side used to trace the model (default: the one stored in the file).
    allow_other_backbone: load it even onto weights other than those it was trained on (a
      deliberate choice: the adapter's accuracy there is unknown).

  Raises:
    BackboneMismatchError: the backbone's weights differ from the training backbone's.
    AdapterFileError: the file is unreadable or records no backbone fingerprint.
    CheckpointMismatchError: the adapter's tensors do not fit the model.
  """
  flat_delta, meta = read_adapter(path)
  backbone_flat = pretrained_common.flatten(backbone_params)
  # The frozen tree of training = every backbone leaf the delta does not replace.
  frozen = pretrained_common.unflatten(
      {k: v for k, v in backbone_flat.items() if k not in flat_delta})
  if not meta.get('backbone_fingerprint') and not allow_other_backbone:
    raise AdapterFileError(
        f'Adapter {path!r} records no backbone fingerprint (its metadata has keys '
        f'{sorted(meta)}), so vadapt cannot check that this backbone is the one it was trained '
        'on. Save adapters with the meta of their run (export.export_adapter does), or pass '
        'allow_other_backbone=True to load it unchecked.')
  current = {'backbone_fingerprint': fingerprint(frozen),
             'backbone_layout': layout_fingerprint(frozen), 'variant': meta.get('variant'),
             'backbone_checkpoint': 'the backbone_params given to load_adapter'}
  problem = backbone_mismatch(meta, current, f'Adapter {path!r}')
  if problem and not allow_other_backbone:
    raise BackboneMismatchError(f'{problem} Load the backbone it was trained on, or pass '
                                'allow_other_backbone=True if you mean to.')
  size = image_size or meta.get('image_size')
  if not size:
    raise AdapterFileError(f'Adapter {path!r} stores no image_size, which is needed to trace the '
                           'model: pass image_size=.')
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  # CNNs' BatchNorm statistics ride with the params under 'batch_stats', as in training.
  expected = pretrained_common.flatten({**shapes['params'], **{
      c: shapes[c] for c in partition.STATE_COLLECTIONS if c in shapes}})
  merged = {**pretrained_common.flatten(frozen), **flat_delta}
  pretrained_common.check_matches(expected, merged, source=f'adapter {path!r} + backbone')
  return pretrained_common.unflatten(merged)
