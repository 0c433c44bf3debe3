"""Subsets of a table: split slicing for local sources, class selection, few-shot and VTAB-1k."""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from vadapt.data.sources import Table

VTAB_TRAIN, VTAB_VAL = 800, 200

_SPLIT_RE = re.compile(r'^\s*(\w+)\s*(?:\[\s*([-\d]*%?)\s*:\s*([-\d]*%?)\s*\])?\s*$')


def parse_split(split: str) -> tuple[str, Optional[str], Optional[str]]:
  """'train[:800]' -> ('train', None, '800'); 'test[10%:]' -> ('test', '10%', None)."""
  match = _SPLIT_RE.match(split)
  if not match:
    raise ValueError(f"Split {split!r} is not of the form 'name' or 'name[start:stop]' "
                     "(integers or percentages, e.g. 'train[:800]', 'train[80%:]').")
  name, start, stop = match.groups()
  return name, start or None, stop or None


def _bound(text: Optional[str], n: int) -> Optional[int]:
  if text is None:
    return None
  if text.endswith('%'):
    return int(round(n * int(text[:-1]) / 100))
  return int(text)


def slice_table(table: Table, start: Optional[str], stop: Optional[str]) -> Table:
  """Applies tfds-style slice bounds (absolute or percent) to a table."""
  n = len(table)
  return table.take(np.arange(n)[slice(_bound(start, n), _bound(stop, n))])


def select_classes(table: Table, classes: Optional[Sequence[int]]) -> Table:
  """Keeps the labels in ``classes`` and relabels them 0..k-1 in the given order."""
  if classes is None:
    return table
  classes = [int(c) for c in classes]
  num = len(table.class_names)
  bad = [c for c in classes if not 0 <= c < num]
  if bad or len(set(classes)) != len(classes) or not classes:
    raise ValueError(f'classes must be distinct label ids in [0, {num}), got {classes}.')
  lookup = np.full(num, -1, dtype=np.int32)
  lookup[classes] = np.arange(len(classes), dtype=np.int32)
  keep = np.flatnonzero(lookup[table.labels] >= 0)
  return Table(images=table.images[keep], labels=lookup[table.labels[keep]],
               class_names=tuple(table.class_names[c] for c in classes), kind=table.kind)


def few_shot(table: Table, k: int, seed: int) -> Table:
  """k examples of every class, drawn without replacement by ``seed``; class-major order."""
  if k < 1:
    raise ValueError(f'few_shot must be a positive number of examples per class, got {k}.')
  rng = np.random.default_rng(seed)
  picks = []
  for label, name in enumerate(table.class_names):
    idx = np.flatnonzero(table.labels == label)
    if len(idx) < k:
      raise ValueError(f'few_shot={k} needs {k} examples of every class, but class {name!r} '
                       f'(label {label}) has only {len(idx)} in the train split.')
    picks.append(np.sort(rng.choice(idx, size=k, replace=False)))
  return table.take(np.concatenate(picks))


def vtab_1k(table: Table) -> tuple[Table, Table]:
  """VTAB-1k: the first 800 examples of the train split to train on, the next 200 to validate.

  This matches VTAB's ``train[:800]`` / ``train[800:1000]`` on tfds, whose train splits are stored
  shuffled; local sources are stored in a fixed shuffled order for the same reason.
  """
  if len(table) < VTAB_TRAIN + VTAB_VAL:
    raise ValueError(f'vtab_1k needs at least {VTAB_TRAIN + VTAB_VAL} examples in the train split, '
                     f'found {len(table)}.')
  return (table.take(np.arange(VTAB_TRAIN)),
          table.take(np.arange(VTAB_TRAIN, VTAB_TRAIN + VTAB_VAL)))
