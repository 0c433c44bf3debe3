"""Composition blocks for named adapters, with AdapterHub's meanings.

  Stack('a', 'b')              one after another: at each module, b reads what a produced
  Parallel('a', 'b')           several tasks in one pass: the batch is replicated at the first
                               adapted block, lower layers run once; one output per task
  Average('a', 'b', weights=)  a weighted sum of the adapters' outputs at each module
  Fuse('a', 'b')               AdapterFusion (Pfeiffer et al., 2021): a trained attention over the
                               outputs of frozen task adapters, per module

A block is static (it is part of the traced program); which single adapter runs is data and is
chosen by index instead (see vadapt.multi). `combine` evaluates Stack, Average and Fuse at one
adapted module; Parallel is the per-example selection of vadapt.multi applied to a replicated
batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

# Positions whose adapter output can be fed to the next adapter of a Stack: an 'output' adapter
# rewrites the module's output, an 'input' adapter its input. A 'parallel' adapter reads the
# module's input and adds to its output, so it cannot read another adapter's result.
_CHAINABLE = ('output', 'input')


def _check_members(kind: str, members: Sequence[str]) -> tuple[str, ...]:
  members = tuple(members)
  if not members:
    raise ValueError(f'{kind} needs at least one adapter name.')
  bad = [m for m in members if not isinstance(m, str)]
  if bad:
    raise TypeError(f'{kind} takes adapter names (str); found {bad[:3]}. Blocks do not nest.')
  if len(set(members)) != len(members):
    raise ValueError(f'{kind}{members} names an adapter more than once.')
  return members


@dataclasses.dataclass(frozen=True, init=False)
class Stack:
  """Adapters applied one after another at every module (AdapterHub's Stack).

  Attributes:
    members: adapter names, innermost first.
  """
  members: tuple[str, ...]

  def __init__(self, *members: str):
    object.__setattr__(self, 'members', _check_members('Stack', members))


@dataclasses.dataclass(frozen=True, init=False)
class Parallel:
  """Several adapters on one batch in one pass; the model returns one output per member.

  Attributes:
    members: adapter names; outputs come back in this order.
  """
  members: tuple[str, ...]

  def __init__(self, *members: str):
    object.__setattr__(self, 'members', _check_members('Parallel', members))


@dataclasses.dataclass(frozen=True, init=False)
class Average:
  """The weighted sum of the members' outputs at every module (AdapterHub's Average).

  Attributes:
    members: adapter names.
    weights: one weight per member; defaults to equal weights summing to 1.
  """
  members: tuple[str, ...]
  weights: tuple[float, ...]

  def __init__(self, *members: str, weights: Optional[Sequence[float]] = None):
    members = _check_members('Average', members)
    weights = (1.0 / len(members),) * len(members) if weights is None else tuple(
        float(w) for w in weights)
    if len(weights) != len(members):
      raise ValueError(f'Average{members} needs one weight per adapter; found {len(weights)} '
                       'weights.')
    object.__setattr__(self, 'members', members)
    object.__setattr__(self, 'weights', weights)


@dataclasses.dataclass(frozen=True, init=False)
class Fuse:
  """AdapterFusion over frozen task adapters; its parameters are at `<module>/<name>/...`.

  Attributes:
    members: the task adapters' names (at least two).
    name: the fusion layers' module name, starting with 'fusion'; defaults to
      'fusion_' + '_'.join(members).
    dropout: dropout on the attention scores.
    temperature: softmax temperature.
  """
  members: tuple[str, ...]
  name: str
  dropout: float
  temperature: float

  def __init__(self, *members: str, name: Optional[str] = None, dropout: float = 0.0,
               temperature: float = 1.0):
    members = _check_members('Fuse', members)
    if len(members) < 2:
      raise ValueError(f'Fuse needs at least two adapters; found {members}.')
    name = name or 'fusion_' + '_'.join(members)
    # The prefix tells fusion layers apart from backbone modules (see multi.backbone_params).
    if '/' in name or '.' in name or not name.startswith('fusion'):
      raise ValueError(f'Fuse names start with "fusion" and hold no "/" or "."; found {name!r}.')
    if not 0.0 <= dropout < 1.0 or temperature <= 0:
      raise ValueError(f'Fuse needs 0 <= dropout < 1 and temperature > 0; found dropout='
                       f'{dropout!r}, temperature={temperature!r}.')
    object.__setattr__(self, 'members', members)
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 'dropout', float(dropout))
    object.__setattr__(self, 'temperature', float(temperature))


BLOCKS = (Stack, Parallel, Average, Fuse)


@dataclasses.dataclass(frozen=True)
class Slot:
  """One adapter of a member at the module being called.

  Attributes:
    member: the adapter's name.
    position: 'output', 'parallel' or 'input' (see vadapt.inject).
    run: maps (the adapter's input, its output shape) to its output, creating its parameters on
      first use.
  """
  member: str
  position: str
  run: Callable[[jax.Array, tuple[int, ...]], jax.Array]


def _positions(block, slots: Sequence[Slot], path: str) -> str:
  positions = {s.position for s in slots}
  if len(positions) > 1:
    found = ', '.join(f'{s.member!r}: {s.position!r}' for s in slots)
    raise ValueError(f'{type(block).__name__}{block.members} cannot combine adapters at different '
                     f'positions on {path!r} ({found}); their placements clash.')
  return positions.pop()


def combine(block, slots: Sequence[Slot], call: Callable[[jax.Array], jax.Array], x: jax.Array,
            path: str, fusion: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None):
  """The module's output under a Stack, Average or Fuse block.

  Args:
    block: the block.
    slots: the members' adapters at this module, in member order.
    call: runs the module on a (possibly adapted) first argument.
    x: the module's first argument.
    path: the module's path (for errors).
    fusion: for Fuse, maps (query (..., D), adapter outputs (K, ..., D)) to the fused delta.
  """
  if not slots:
    return call(x)
  if isinstance(block, Stack):
    per_member = {}
    for s in slots:
      per_member.setdefault(s.member, []).append(s)
    for member, own in per_member.items():
      bad = [s.position for s in own if s.position not in _CHAINABLE]
      if bad and len(per_member) > 1:
        raise ValueError(
            f'Stack{block.members} cannot chain {member!r} on {path!r}: its adapter there is '
            f"{bad[0]!r} (it reads the module's input, not the previous adapter's output); "
            f'stack adapters placed at {_CHAINABLE}.')
    for s in slots:
      if s.position == 'input':
        x = x + s.run(x, x.shape)
    y = call(x)
    for s in slots:
      if s.position == 'output':
        y = y + s.run(y, y.shape)
      elif s.position == 'parallel':
        y = y + s.run(x, y.shape)
    return y
  position = _positions(block, slots, path)
  if isinstance(block, Average):
    weight = dict(zip(block.members, block.weights))
    if position == 'input':
      return call(x + sum(weight[s.member] * s.run(x, x.shape) for s in slots))
    y = call(x)
    src = y if position == 'output' else x
    return y + sum(weight[s.member] * s.run(src, y.shape) for s in slots)
  if isinstance(block, Fuse):
    present = [s.member for s in slots]
    if present != list(block.members):
      missing = [m for m in block.members if m not in present]
      raise ValueError(f'Fuse{block.members}: {missing} have no adapter on {path!r} where '
                       f'{present} do; fuse adapters placed at the same modules.')
    if position != 'output':
      raise ValueError(f'Fuse{block.members} fuses adapters at position \'output\'; those on '
                       f'{path!r} are at {position!r}.')
    y = call(x)
    outs = [s.run(y, y.shape) for s in slots]
    shapes = {tuple(o.shape) for o in outs}
    if len(shapes) != 1:
      raise ValueError(f'Fuse{block.members}: the adapters on {path!r} produce shapes '
                       f'{sorted(shapes)}; fusion needs one width.')
    return y + fusion(y, jnp.stack(outs))
  raise TypeError(f'combine takes Stack, Average or Fuse; found {type(block).__name__}.')
