"""Adapter arithmetic: new adapters from the parameters of trained ones (task arithmetic).

  d_a = arithmetic.delta(model, params, 'pets')             # {'.../MlpBlock_0/*/up/kernel': ...}
  d_b = arithmetic.delta(model, params, 'flowers')
  mixed = arithmetic.weighted_sum([d_a, d_b], [0.5, 0.5])   # or interpolate, negate, ties, dare
  model, params = arithmetic.add_adapter(model, params, 'mixed', mixed, like='pets')

A delta is a flat dict from parameter paths, with the adapter's own name replaced by '*', to
arrays; it holds the adapter's parameters (and its head's, unless heads=False). Arithmetic acts
on parameters leaf by leaf, as AdapterHub's `average_adapter` and peft's `add_weighted_adapter`
do: for a bottleneck adapter, whose output is not linear in its parameters, a weighted sum of
parameters is not the weighted sum of outputs (use composition.Average for that). The merge
modes follow peft's merge_utils: TIES (trim to the largest `density` fraction, elect a sign per
entry by the sign of the sum, average the entries that agree) and DARE (drop entries at random
with probability 1 - density, rescale the rest by 1 / density; optionally TIES' sign election).
The result is an ordinary adapter: it is served, exported and loaded like any other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vadapt import multi
from vadapt.adapters.lora import LoRAConfig
from vadapt.pretrained.common import flatten, unflatten

Delta = dict[str, jax.Array]
# The adapter's name in a delta's paths ('heads/*/kernel').
WILDCARD = '*'


def _rename(path: str, old: str, new: str) -> str:
  parts = path.split('/')
  out = []
  for k, p in enumerate(parts):
    if k < len(parts) - 1 and (p == old or p.startswith(old + '.')):
      p = new + p[len(old):]
    out.append(p)
  return '/'.join(out)


def delta(model: multi.MultiAdapted, params: Mapping, name: str, *, heads: bool = True) -> Delta:
  """Adapter `name`'s parameters under name-free paths (the name replaced by '*')."""
  flat = multi.adapter_params(model, params, name)
  return {_rename(k, name, WILDCARD): v for k, v in flat.items()
          if heads or not k.startswith(multi.HEADS + '/')}


def check_same_structure(deltas: Sequence[Mapping[str, jax.Array]]) -> None:
  """Raises ValueError naming the first difference in paths or shapes between deltas."""
  if not deltas:
    raise ValueError('Adapter arithmetic needs at least one delta.')
  first = {k: tuple(np.shape(v)) for k, v in deltas[0].items()}
  for i, d in enumerate(deltas[1:], 1):
    other = {k: tuple(np.shape(v)) for k, v in d.items()}
    if other == first:
      continue
    only0, only_i = sorted(set(first) - set(other)), sorted(set(other) - set(first))
    shapes = sorted(f'{k}: {first[k]} vs {other[k]}' for k in set(first) & set(other)
                    if first[k] != other[k])
    raise ValueError(
        f'Adapter arithmetic needs deltas of one structure; delta 0 and delta {i} differ: '
        + '; '.join(s for s in (f'only in delta 0: {only0[:3]}' if only0 else '',
                                f'only in delta {i}: {only_i[:3]}' if only_i else '',
                                f'shapes {shapes[:3]}' if shapes else '') if s)
        + '. Combine adapters of the same method, width and placement (heads=False leaves out '
        'heads of different widths).')


def _weights(deltas, weights) -> list[float]:
  weights = [1.0 / len(deltas)] * len(deltas) if weights is None else [float(w) for w in weights]
  if len(weights) != len(deltas):
    raise ValueError(f'{len(weights)} weights for {len(deltas)} deltas.')
  return weights


def _leafwise(deltas, fn) -> Delta:
  check_same_structure(deltas)
  # One compiled program for all leaves: op by op, every leaf shape would compile its own.
  return jax.jit(lambda ds: {k: fn([d[k] for d in ds]) for k in ds[0]})(
      [{k: jnp.asarray(v) for k, v in d.items()} for d in deltas])


def weighted_sum(deltas: Sequence[Delta], weights: Optional[Sequence[float]] = None) -> Delta:
  """sum_i w_i * delta_i (weights default to 1/n: the average). Task arithmetic: negative
  weights subtract a skill."""
  w = _weights(deltas, weights)
  return _leafwise(deltas, lambda xs: sum(wi * x for wi, x in zip(w, xs)))


def interpolate(a: Delta, b: Delta, t: float) -> Delta:
  """(1 - t) * a + t * b."""
  return weighted_sum([a, b], [1.0 - t, t])


def negate(d: Delta) -> Delta:
  return _leafwise([d], lambda xs: -xs[0])


def _check_density(density: float) -> None:
  if not 0.0 < density <= 1.0:
    raise ValueError(f'density must be in (0, 1]; found {density!r}.')


def _magnitude_prune(x: jax.Array, density: float) -> jax.Array:
  k = int(density * x.size)
  if k >= x.size:
    return x
  flat = jnp.abs(x).reshape(-1)
  keep = jnp.zeros(x.size, bool).at[jax.lax.top_k(flat, k)[1]].set(True)
  return jnp.where(keep.reshape(x.shape), x, 0)


def _disjoint_merge(stacked: jax.Array, weights: Sequence[float], majority: str) -> jax.Array:
  if majority == 'total':
    elected = jnp.where(stacked.sum(0) >= 0, 1.0, -1.0)
  elif majority == 'frequency':
    elected = jnp.where(jnp.sign(stacked).sum(0) >= 0, 1.0, -1.0)
  else:
    raise ValueError(f"majority must be 'total' or 'frequency'; found {majority!r}.")
  agree = jnp.sign(stacked) == elected
  w = jnp.asarray(weights, stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
  return (stacked * w * agree).sum(0) / jnp.maximum(agree.sum(0), 1)


def ties(deltas: Sequence[Delta], weights: Sequence[float], density: float, *,
         majority: str = 'total') -> Delta:
  """TIES-merging (Yadav et al., 2023) leaf by leaf, as peft's `ties`."""
  _check_density(density)
  w = _weights(deltas, weights)
  return _leafwise(deltas, lambda xs: _disjoint_merge(
      jnp.stack([_magnitude_prune(x, density) for x in xs]), w, majority))


def dare(deltas: Sequence[Delta], weights: Sequence[float], density: float, rng: jax.Array, *,
         elect_sign: bool = False, majority: str = 'total') -> Delta:
  """DARE (Yu et al., 2024): drop each entry with probability 1 - density, rescale by 1/density,
  then a weighted sum (peft's dare_linear) or TIES' sign election (elect_sign: dare_ties)."""
  _check_density(density)
  w = _weights(deltas, weights)
  check_same_structure(deltas)

  @jax.jit
  def merge(deltas, rng):
    keys = dict(zip(sorted(deltas[0]), jax.random.split(rng, len(deltas[0]))))
    out = {}
    for path in deltas[0]:
      xs = [d[path] for d in deltas]
      masks = jax.random.bernoulli(keys[path], density, (len(xs),) + xs[0].shape)
      stacked = jnp.stack(xs) * masks / density
      if elect_sign:
        out[path] = _disjoint_merge(stacked, w, majority)
      else:
        out[path] = sum(wi * s for wi, s in zip(w, stacked))
    return out

  return merge([{k: jnp.asarray(v) for k, v in d.items()} for d in deltas], rng)


# LoRA (vadapt.adapters.lora): the update of a layer is s * A B, linear in each factor, so the
# merges act on the factors the way peft's add_weighted_adapter does.


def _lora_pairs(d: Delta) -> dict[str, tuple[jax.Array, jax.Array]]:
  prefixes = sorted({k[:-2] for k in d if k.endswith('/a') or k.endswith('/b')})
  missing = [p for p in prefixes if p + '/a' not in d or p + '/b' not in d]
  if not prefixes or missing:
    raise ValueError(f'LoRA merges need deltas of LoRA adapters (leaves .../a and .../b); '
                     f'found {sorted(d)[:4]}.')
  return {p: (jnp.asarray(d[p + '/a']), jnp.asarray(d[p + '/b'])) for p in prefixes}


def lora_scales(model: multi.MultiAdapted, names: Sequence[str]) -> list[float]:
  """Each LoRA adapter's s = alpha / r (one LoRA config per adapter)."""
  scales = []
  for n in names:
    found = {t.adapter.scale for t in model.adapter(n).targets
             if isinstance(t.adapter, LoRAConfig)}
    if len(found) != 1:
      raise ValueError(f'Adapter {n!r} needs exactly one LoRA scale for a LoRA merge; found '
                       f'{sorted(found)}.')
    scales.append(found.pop())
  return scales


def _others(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
  """The leaves that are not LoRA factors (heads): their weighted sum."""
  rest = [{k: v for k, v in d.items() if not (k.endswith('/a') or k.endswith('/b'))}
          for d in deltas]
  return weighted_sum(rest, weights) if rest[0] else {}


def lora_linear(deltas: Sequence[Delta], weights: Sequence[float],
                scales: Sequence[float]) -> Delta:
  """peft's 'linear' for LoRA adapters of one rank: A = sum sqrt(w_i) s_i A_i,
  B = sum sqrt(w_i) B_i (weights must be >= 0); the result has scale 1."""
  check_same_structure(deltas)
  w = _weights(deltas, weights)
  if min(w) < 0:
    raise ValueError(f"LoRA 'linear' takes square roots of the weights; found {w}. Use "
                     'lora_cat or lora_svd for negative weights.')
  pairs = [_lora_pairs(d) for d in deltas]
  out = {}
  for p in pairs[0]:
    out[p + '/a'] = sum(np.sqrt(wi) * si * ps[p][0] for wi, si, ps in zip(w, scales, pairs))
    out[p + '/b'] = sum(np.sqrt(wi) * ps[p][1] for wi, ps in zip(w, pairs))
  return {**out, **_others(deltas, w)}


def lora_cat(deltas: Sequence[Delta], weights: Sequence[float],
             scales: Sequence[float]) -> Delta:
  """peft's 'cat': factors concatenated along the rank, so that the update is exactly
  sum_i w_i s_i A_i B_i; the result has rank sum r_i and scale 1."""
  w = _weights(deltas, weights)
  pairs = [_lora_pairs(d) for d in deltas]
  if any(ps.keys() != pairs[0].keys() for ps in pairs):
    raise ValueError('LoRA cat needs adapters on the same layers.')
  out = {}
  for p in pairs[0]:
    out[p + '/a'] = jnp.concatenate([wi * si * ps[p][0] for wi, si, ps in zip(w, scales, pairs)],
                                    axis=-1)
    out[p + '/b'] = jnp.concatenate([ps[p][1] for ps in pairs], axis=0)
  return {**out, **_others(deltas, w)}


def lora_svd(deltas: Sequence[Delta], weights: Sequence[float], scales: Sequence[float],
             rank: int) -> Delta:
  """peft's 'svd': the update sum_i w_i s_i A_i B_i re-factorised by a truncated SVD to
  `rank` (the best rank-`rank` approximation); the result has scale 1."""
  w = _weights(deltas, weights)
  pairs = [_lora_pairs(d) for d in deltas]
  if any(ps.keys() != pairs[0].keys() for ps in pairs):
    raise ValueError('LoRA svd needs adapters on the same layers.')
  out = {}
  for p in pairs[0]:
    a0, b0 = pairs[0][p]
    in_dims, out_dims = a0.shape[:-1], b0.shape[1:]
    update = sum(wi * si * (ps[p][0].reshape(-1, ps[p][0].shape[-1])
                            @ ps[p][1].reshape(ps[p][1].shape[0], -1))
                 for wi, si, ps in zip(w, scales, pairs))
    if not 1 <= rank <= min(update.shape):
      raise ValueError(f'rank must be in [1, {min(update.shape)}] for {p!r}; found {rank!r}.')
    u, s, vh = jnp.linalg.svd(update, full_matrices=False)
    out[p + '/a'] = (u[:, :rank] * s[:rank]).reshape(in_dims + (rank,))
    out[p + '/b'] = vh[:rank].reshape((rank,) + out_dims)
  return {**out, **_others(deltas, w)}


def add_adapter(model: multi.MultiAdapted, params: Mapping, name: str, d: Delta, *,
                like: str, adapter_config: Any = None) -> tuple[multi.MultiAdapted, dict]:
  """`model` and `params` with a new adapter `name` holding delta `d`, placed like `like`
  (whose structure `d` must have, unless `adapter_config` replaces the adapter config of every
  target, e.g. LoRAConfig(rank=16) after lora_cat). Without head leaves in `d` the new adapter
  has no head."""
  has_head = any(k.startswith(multi.HEADS + '/') for k in d)
  reference = delta(model, params, like, heads=has_head)
  if adapter_config is None:
    check_same_structure([reference, d])
  elif sorted(reference) != sorted(d):
    raise ValueError(f'The delta holds other leaves than adapter {like!r}: '
                     f'{sorted(set(reference) ^ set(d))[:4]}.')
  spec = model.adapter(like)
  if adapter_config is not None:
    spec = dataclasses.replace(spec, targets=tuple(
        dataclasses.replace(t, adapter=adapter_config) for t in spec.targets))
  new = dataclasses.replace(spec, name=name, num_classes=spec.num_classes if has_head else None,
                            class_names=spec.class_names if has_head else ())
  bigger = model.with_adapter(new)
  flat = flatten(params)
  flat.update({_rename(k, WILDCARD, name): v for k, v in d.items()})
  return bigger, unflatten(flat)
