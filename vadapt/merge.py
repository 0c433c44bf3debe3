"""Folding weight-space adapters into the frozen weights, and taking them out again.

LoRA, DoRA, SSF and (IA)³ change only what a linear layer computes, so after training they can be
merged into its kernel (and bias): the result is a params tree for the bare backbone, run with
``model.backbone.apply`` at zero inference overhead.

  bare = merge.merge(model, params)                       # adapters folded in, adapter leaves gone
  logits = model.backbone.apply({'params': bare}, images)
  params = merge.unmerge(model, bare, merge.adapter_params(model, params))   # adapters back

Both are pure functions over param trees; ``model`` is the ``inject.Adapted`` the params belong to
(its targets say which adapter config sits where). Each adapter config implements
``merge(layer, adapter, position)`` and ``unmerge(...)`` on the layer's own params. Where several
adapters adapt one layer they are folded in the order the interceptor applies them ('input'
adapters first, then the others in target order) and taken out in reverse.

Precision. Called on concrete arrays (the usual case), both fold on the host in float64 and round
each changed leaf once to its own dtype: a merged f32 kernel is the correctly rounded value of the
exact W' (W + s A B, W * γ, ...), whatever the order of the terms, and several adapters on one
layer are folded before that single rounding. Traced (inside ``jax.jit``) there is no float64, so
the same arithmetic runs in the leaves' dtype (at least f32) on the device, a few roundings per
element instead of one. Either way the merged model differs from the adapted one only by f32
rounding: measured against a float64 evaluation of the adapted model, the merged f32 model is as
accurate as the adapted f32 model (tests/test_merge_exactness.py). Its logits are not bit-equal
to the adapted model's, since the two run different f32 computations (~1e-6 relative on a
12-block ViT).

Unmerging subtracts (or divides) again in float64, so it restores the kernel up to the rounding
of the merged value: bit for bit wherever the merge did not move a weight into a coarser binade,
else within half an ulp of each (tests/test_merge_exactness.py). Keep the frozen tree
(``partition.split``) when the exact original is needed everywhere. DoRA cannot be unmerged: its
merged kernel no longer holds the column norms it was normalised by.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vadapt.inject import Adapted
from vadapt.pretrained.common import flatten, unflatten


def _located(model: Adapted, flat: Mapping[str, Any]):
  """{(layer path, target index): {leaf path within the adapter: full path}}."""
  found: dict[tuple[str, int], dict[str, str]] = {}
  regexes = [re.compile(t.pattern) for t in model.targets]
  for path in flat:
    parts = path.split('/')
    for i, target in enumerate(model.targets):
      for j in range(len(parts) - 1):
        if parts[j] == target.name and regexes[i].fullmatch('/'.join(parts[:j])):
          found.setdefault(('/'.join(parts[:j]), i), {})['/'.join(parts[j + 1:])] = path
          break
  return found


def _check_mergeable(model: Adapted) -> None:
  if not isinstance(model, Adapted):
    raise TypeError(f'merge needs the inject.Adapted model the params belong to (from '
                    f'vadapt.adapt); found {type(model).__name__}.')
  bad = [t for t in model.targets if not callable(getattr(t.adapter, 'merge', None))]
  if bad:
    kinds = sorted({type(t.adapter).__name__ for t in bad})
    raise ValueError(f'Only weight-space adapters (LoRA, DoRA, SSF, (IA)³) can be merged; this '
                     f'model also has {kinds} at {[t.pattern for t in bad][:3]}, which add '
                     'non-linear modules of their own.')


def _by_layer(located, targets) -> list[tuple[str, list[int]]]:
  """[(layer, target indices)]: per layer, 'input' adapters first, then the rest in target order
  (how inject applies them)."""
  order = sorted(located, key=lambda k: (k[0], targets[k[1]].position != 'input', k[1]))
  return [(layer, [i for _, i in group])
          for layer, group in itertools.groupby(order, key=lambda k: k[0])]


def _layer_params(flat: Mapping[str, Any], layer: str) -> dict[str, Any]:
  prefix = f'{layer}/' if layer else ''
  return {k[len(prefix):]: v for k, v in flat.items()
          if k.startswith(prefix) and '/' not in k[len(prefix):]}


def _on_host(flat: Mapping[str, Any]) -> bool:
  """Whether every leaf is a concrete array this process can read (not a tracer under jit)."""
  return all(isinstance(v, np.ndarray) or (isinstance(v, jax.Array)
                                          and not isinstance(v, jax.core.Tracer)
                                          and v.is_fully_addressable)
             for v in flat.values())


@contextlib.contextmanager
def _precise(flat: dict[str, Any], layer: str, adapters: list[Mapping[str, str]]) -> Iterator[None]:
  """While open, the float leaves of `layer` and of its `adapters` (leaf -> full path) in `flat`
  are float64 on the host CPU, under x64; on exit each is rounded once to its own dtype and put
  back where it was (a leaf left alone comes back unchanged). Traced leaves (under jit) stay as
  they are: the arithmetic then runs in their dtype (at least f32) on the device."""
  keys = [f'{layer}/{k}' if layer else k for k in _layer_params(flat, layer)]
  keys += [full for leaves in adapters for full in leaves.values()]
  original = {k: flat[k] for k in keys if jnp.issubdtype(flat[k].dtype, jnp.floating)}
  if not _on_host(original):
    yield
    return
  with jax.enable_x64(True), jax.default_device(jax.devices('cpu')[0]):
    for k, v in original.items():
      flat[k] = np.asarray(jax.device_get(v)).astype(np.float64)
    yield
  for k, v in original.items():
    rounded = np.asarray(jax.device_get(flat[k])).astype(v.dtype)
    flat[k] = jax.device_put(rounded, v.sharding) if isinstance(v, jax.Array) else rounded


def adapter_params(model: Adapted, params: Mapping[str, Any]) -> dict[str, Any]:
  """The adapters' leaves of `params` (as nested dict), e.g. to unmerge later."""
  flat = flatten(params)
  located = _located(model, flat)
  return unflatten({full: flat[full] for leaves in located.values() for full in leaves.values()})


def merge(model: Adapted, params: Mapping[str, Any]) -> dict[str, Any]:
  """Folds every adapter of `model` into the layer it adapts; returns bare-backbone params.

  Raises:
    ValueError: a target is not mergeable (a bottleneck adapter), or the params hold no
      adapter leaves (already merged, or params of another model).
  """
  _check_mergeable(model)
  flat = flatten(params)
  located = _located(model, flat)
  if not located:
    names = sorted({t.name for t in model.targets})
    raise ValueError(
        'Nothing to merge: the params hold no adapter parameters of this model (expected leaves '
        f'under {names} at {[t.pattern for t in model.targets][:3]}). Were they merged already?')
  missing = [t.pattern for i, t in enumerate(model.targets) if not any(k[1] == i for k in located)]
  if missing:
    raise ValueError(f'The params hold no adapter for targets {missing}: merge needs the params '
                     'of the whole adapted model (some adapters seem merged or removed already).')
  adapter_keys = {full for leaves in located.values() for full in leaves.values()}
  for layer, targets in _by_layer(located, model.targets):
    with _precise(flat, layer, [located[(layer, i)] for i in targets]):
      for i in targets:
        target = model.targets[i]
        adapter = unflatten({k: flat[full] for k, full in located[(layer, i)].items()})
        new = target.adapter.merge(_layer_params(flat, layer), adapter, target.position)
        for k, v in new.items():
          flat[f'{layer}/{k}'] = v
  return unflatten({k: v for k, v in flat.items() if k not in adapter_keys})


def unmerge(model: Adapted, merged: Mapping[str, Any],
            adapters: Mapping[str, Any]) -> dict[str, Any]:
  """Takes the adapters out of merged params; returns params for `model` (adapters included).

  Args:
    model: the adapted model.
    merged: bare-backbone params from `merge`.
    adapters: a tree holding the adapters' leaves (from `adapter_params`, or the trained delta;
      other leaves in it are ignored).

  Raises:
    ValueError: `merged` still holds adapter leaves (it was never merged), `adapters` holds none,
      or an adapter cannot be unmerged (DoRA).
  """
  _check_mergeable(model)
  flat = flatten(merged)
  if _located(model, flat):
    raise ValueError('These params still hold adapter parameters: they were never merged (or the '
                     'adapters were added back already), so there is nothing to unmerge.')
  flat_adapters = flatten(adapters)
  located = _located(model, flat_adapters)
  if not located:
    raise ValueError('`adapters` holds no adapter parameters of this model; pass '
                     'merge.adapter_params(model, params) or the trained delta.')
  adapter_keys = {full for leaves in located.values() for full in leaves.values()}
  flat.update({full: flat_adapters[full] for full in adapter_keys})
  for layer, targets in _by_layer(located, model.targets):
    for i in targets:
      if getattr(model.targets[i].adapter, 'unmerge', None) is None:
        raise ValueError(f'{type(model.targets[i].adapter).__name__} at {layer!r} cannot be '
                         'unmerged.')
    with _precise(flat, layer, [located[(layer, i)] for i in targets]):
      for i in reversed(targets):
        target = model.targets[i]
        adapter = unflatten({k: flat[full] for k, full in located[(layer, i)].items()})
        restored = target.adapter.unmerge(_layer_params(flat, layer), adapter, target.position)
        for k, v in restored.items():
          flat[f'{layer}/{k}'] = v
  flat.update({full: flat_adapters[full] for full in adapter_keys})  # Exactly as given.
  return unflatten(flat)
