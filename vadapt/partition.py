"""Trainability as data: regex rules label every parameter; labels drive split, optimizer, counts.

  labels = label_tree(params, default_rules())        # 'adapter' | 'head' | 'frozen' per leaf
  delta, frozen = split(params, labels)               # trained leaves / the rest (pruned dicts)
  tx = make_optimizer(labels, {'adapter': optax.adam(1e-3), 'head': optax.adam(1e-3)})
  opt_state = tx.init(delta)                          # no state for frozen leaves
  loss, grads = value_and_grad_delta(loss_fn)(delta, frozen, batch)   # grads over delta only

Paths are '/'-joined keys of the nested 'params' dict, e.g.
'Transformer/encoderblock_0/MlpBlock_0/adapter/down/kernel'.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import traverse_util

FROZEN = 'frozen'

Rules = Sequence[tuple[str, str]]


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  if not isinstance(tree, Mapping):
    raise TypeError(f'Expected a nested dict of parameters; found {type(tree).__name__}.')
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _unflat(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


# Module names adapters are created under (a Target's name): bottleneck adapters, then the
# weight-space methods (vadapt.adapters.lora, dora, ssf, ia3).
ADAPTER_NAMES = ('adapter', 'lora', 'dora', 'ssf', 'ia3')


def default_rules(train_head: bool = True, *,
                  adapter_names: Sequence[str] = ADAPTER_NAMES) -> list[tuple[str, str]]:
  """Adapters (path segments named like a Target's name, ADAPTER_NAMES by default) train, the
  classifier head trains unless train_head=False, everything else is frozen."""
  names = '|'.join(re.escape(n) for n in adapter_names)
  return [
      (rf'(?:^|/)(?:{names})/', 'adapter'),
      (r'^head/', 'head' if train_head else FROZEN),
      (r'.*', FROZEN),
  ]


def bitfit_rules(train_head: bool = True) -> list[tuple[str, str]]:
  """BitFit (Ben Zaken et al., 2022): every bias (dense, conv and LayerNorm) trains, and the
  head unless train_head=False; the rest is frozen."""
  return [
      (r'^head/', 'head' if train_head else FROZEN),
      (r'(?:^|/)bias$', 'bias'),
      (r'.*', FROZEN),
  ]


def label_tree(params: Mapping[str, Any], rules: Rules) -> dict[str, Any]:
  """A tree like `params` whose leaves are labels: the first rule whose regex `re.search`es the
  leaf's path wins. Raises ValueError listing the paths no rule covers."""
  compiled = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise TypeError(f'Each rule must be a (regex, label) pair; found {rule!r}.')
    pattern, label = rule
    if not isinstance(label, str) or not label:
      raise TypeError(f'Rule {pattern!r} needs a non-empty string label; found {label!r}.')
    compiled.append((re.compile(pattern), label))
  labels, uncovered = {}, []
  for path in _flat(params):
    label = next((lab for rx, lab in compiled if rx.search(path)), None)
    if label is None:
      uncovered.append(path)
    labels[path] = label
  if uncovered:
    shown = '\n  '.join(uncovered[:30]) + (f'\n  ... and {len(uncovered) - 30} more'
                                            if len(uncovered) > 30 else '')
    raise ValueError(f'{len(uncovered)} parameters match no rule in {[p for p, _ in rules]}; '
                     f'add a rule (e.g. (".*", "frozen")) for:\n  {shown}')
  return _unflat(labels)


def split(params: Mapping[str, Any], labels: Mapping[str, Any]) -> tuple[dict, dict]:
  """(delta, frozen): the leaves labelled other than 'frozen', and the rest, as pruned dicts."""
  flat, flat_labels = _flat(params), _flat(labels)
  if set(flat) != set(flat_labels):
    missing = sorted(set(flat) - set(flat_labels))[:10]
    extra = sorted(set(flat_labels) - set(flat))[:10]
    raise ValueError(f'labels do not match params: unlabelled {missing}, labels without a '
                     f'parameter {extra}. Build labels with label_tree(params, rules).')
  delta = {k: v for k, v in flat.items() if flat_labels[k] != FROZEN}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
  return _unflat(delta), _unflat(frozen)


def merge(delta: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
  """The full params tree from split's two halves; a path in both is an error."""
  flat_delta, flat_frozen = _flat(delta), _flat(frozen)
  overlap = sorted(set(flat_delta) & set(flat_frozen))
  if overlap:
    raise ValueError(f'delta and frozen both hold {len(overlap)} paths, e.g. {overlap[:5]}.')
  return _unflat({**flat_frozen, **flat_delta})


# Model state that is not a parameter (BatchNorm statistics) rides in the parameter tree under its
# collection name ('batch_stats/...'), so split, merge, sharding and checkpoints treat it like any
# leaf (frozen by the label rules, never differentiated); the steps turn the tree back into Flax
# variables with to_variables.
STATE_COLLECTIONS = ('batch_stats',)


def to_variables(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'params': ..., 'batch_stats': ...} from a params tree that carries model state."""
  state = {c: tree[c] for c in STATE_COLLECTIONS if c in tree}
  return {'params': {k: v for k, v in tree.items() if k not in state}, **state}


def from_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of to_variables: params with the state collections as top-level entries."""
  unknown = sorted(set(variables) - {'params', *STATE_COLLECTIONS})
  if unknown:
    raise ValueError(f'Variables hold collections {unknown}; supported besides params: '
                     f'{list(STATE_COLLECTIONS)}.')
  params = dict(variables.get('params', {}))
  clash = sorted(set(params) & set(STATE_COLLECTIONS))
  if clash:
    raise ValueError(f'A top-level parameter module is named {clash}, a name reserved for the '
                     'collection of the same name.')
  return {**params, **{c: variables[c] for c in STATE_COLLECTIONS if c in variables}}


def value_and_grad_delta(loss_fn: Callable[..., Any], has_aux: bool = False):
  """Wraps loss_fn(params, *args) into f(delta, frozen, *args) -> (loss, grads wrt delta).

  Differentiating only the delta keeps the backward pass from building frozen-weight gradients.
  """
  def loss_of_delta(delta, frozen, *args, **kwargs):
    return loss_fn(merge(delta, frozen), *args, **kwargs)
  return jax.value_and_grad(loss_of_delta, has_aux=has_aux)


def _path_str(key_path) -> str:
  parts = []
  for k in key_path:
    parts.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return '/'.join(parts)


def scale_by_path(rules: Sequence[tuple[str, float]], labels: Mapping[str, Any]
                  ) -> optax.GradientTransformation:
  """Multiplies the updates of parameters whose path matches a rule's regex by its factor.

  big_vision's `lr_mults`: after the optimizer, so for SGD and AdamW (decoupled weight decay
  included) a factor m is that parameter's learning rate times m. The first matching rule wins;
  only trainable leaves (label other than 'frozen' in `labels`) count.

  Raises:
    ValueError: a rule that is not a valid regex, a factor that is not positive, or a rule that
      matches no trainable parameter (checked here, before any step).
  """
  compiled = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'lr_mults entries are (regex, factor) pairs; found {rule!r}.')
    pattern, factor = rule
    try:
      compiled.append((re.compile(pattern), float(factor)))
    except re.error as e:
      raise ValueError(f'lr_mults pattern {pattern!r} is not a valid regex: {e}.') from None
    if not float(factor) > 0:
      raise ValueError(f'lr_mults factor for {pattern!r} must be positive; found {factor!r}.')
  trainable = [p for p, label in _flat(labels).items() if label != FROZEN]
  for regex, _ in compiled:
    if not any(regex.search(p) for p in trainable):
      raise ValueError(f'lr_mults pattern {regex.pattern!r} matches no trainable parameter '
                       f'(e.g. {", ".join(trainable[:3]) or "none"}).')

  def factor_of(path: str) -> float:
    return next((m for regex, m in compiled if regex.search(path)), 1.0)

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda kp, u: u if u is None else u * factor_of(_path_str(kp)), updates)
    return scaled, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(labels: Mapping[str, Any],
                   transforms: Mapping[str, optax.GradientTransformation]
                   ) -> optax.GradientTransformation:
  """optax.multi_transform over labels; 'frozen' -> set_to_zero (no state) unless given.

  Leaves are matched to labels by path, so the optimizer can be initialised on the full params or
  on the delta alone (the efficient choice, with grads from value_and_grad_delta).
  """
  flat_labels = _flat(labels)
  used = set(flat_labels.values())
  transforms = dict(transforms)
  transforms.setdefault(FROZEN, optax.set_to_zero())
  missing = sorted(used - set(transforms))
  if missing:
    raise ValueError(f'No optimizer transform for labels {missing}; transforms given for '
                     f'{sorted(transforms)}.')

  def labels_for(tree):
    def label(key_path, _):
      path = _path_str(key_path)
      if path not in flat_labels:
        raise ValueError(f'Parameter {path!r} has no label; the optimizer was built for labels '
                         f'of a different tree.')
      return flat_labels[path]
    return jax.tree_util.tree_map_with_path(label, tree)

  return optax.multi_transform(transforms, labels_for)


def count(params: Mapping[str, Any], labels: Mapping[str, Any]) -> dict[str, int]:
  """{label: number of scalars}; works on arrays and jax.ShapeDtypeStruct alike."""
  out: dict[str, int] = {}
  flat_labels = _flat(labels)
  for path, leaf in _flat(params).items():
    out[flat_labels[path]] = out.get(flat_labels[path], 0) + int(np.prod(np.shape(leaf)))
  return out


@dataclasses.dataclass(frozen=True)
class ParamStats:
  """Parameter accounting for one labelling.

  Attributes:
    by_label: scalars per label.
    total: all scalars.
    trainable: scalars not labelled 'frozen'.
    trainable_percent: 100 * trainable / total.
    delta_bytes: bytes of the trainable leaves (what a checkpoint of the delta stores).
  """
  by_label: dict[str, int]
  total: int
  trainable: int
  trainable_percent: float
  delta_bytes: int


def stats(params: Mapping[str, Any], labels: Mapping[str, Any]) -> ParamStats:
  """Totals, trainable count and %, and the delta's size in bytes."""
  by_label = count(params, labels)
  total = sum(by_label.values())
  trainable = total - by_label.get(FROZEN, 0)
  flat_labels = _flat(labels)
  delta_bytes = sum(int(np.prod(np.shape(v))) * np.dtype(v.dtype).itemsize
                    for k, v in _flat(params).items() if flat_labels[k] != FROZEN)
  return ParamStats(by_label=by_label, total=total, trainable=trainable,
                    trainable_percent=100.0 * trainable / max(total, 1), delta_bytes=delta_bytes)


def summary_table(params: Mapping[str, Any], labels: Mapping[str, Any]) -> str:
  """A plain-text table with one row per module (path prefix, label, #params, leaf shapes) and
  totals, for printing from a CLI."""
  flat_labels = _flat(labels)
  rows: dict[str, dict[str, Any]] = {}
  for path, leaf in _flat(params).items():
    module, _, leaf_name = path.rpartition('/')
    row = rows.setdefault(module or '(top level)', {'labels': [], 'n': 0, 'shapes': []})
    if flat_labels[path] not in row['labels']:
      row['labels'].append(flat_labels[path])
    row['n'] += int(np.prod(np.shape(leaf)))
    row['shapes'].append(f'{leaf_name}{tuple(np.shape(leaf))}')
  header = ('module', 'label', 'params', 'shapes')
  lines = [(m, ','.join(r['labels']), f'{r["n"]:,}', ' '.join(r['shapes']))
           for m, r in rows.items()]
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header[:3])]
  fmt = lambda c: f'{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]}'
  s = stats(params, labels)
  by_label = ', '.join(f'{k}: {v:,}' for k, v in sorted(s.by_label.items()))
  return '\n'.join(
      [fmt(header), fmt(tuple('-' * w for w in widths) + ('-' * 6,))]
      + [fmt(line) for line in lines]
      + [f'total {s.total:,} ({by_label}); trainable {s.trainable:,} '
         f'({s.trainable_percent:.3f}%), delta {s.delta_bytes / 2**20:.2f} MiB'])
