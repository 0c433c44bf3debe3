"""Adds adapters to an unmodified Flax backbone by method interception.

``Adapted(backbone, targets)`` is a module that calls ``backbone`` with a
``flax.linen.intercept_methods`` interceptor active. Whenever a backbone module whose '/'-joined
path fully matches a ``Target.pattern`` runs its ``__call__``, the interceptor builds the target's
adapter as a child of that module (so its params land at e.g.
``Transformer/encoderblock_0/MlpBlock_0/adapter/down/kernel``) and combines it with the call:

  'output'    y + adapter(y)            (Houlsby, Pfeiffer: before the residual add)
  'parallel'  y + adapter(x)            (AdaptFormer; x is the module's first argument)
  'input'     module(x + adapter(x))
  'wrap'      args, kwargs, finish = adapter(args, kwargs); finish(module(*args, **kwargs))

A 'wrap' adapter rewrites the module's call itself: it receives the positional arguments (a
tuple) and keyword arguments (a dict), returns the arguments the module runs on, and a plain
function that maps the module's output to the call's result (its output may be any pytree). This
is how visual prompts change the sequence length: insert prompt tokens into a block's input and
strip them from its output (vadapt.adapters.prompts). The adapter does not run the module itself
because Flax creates a module's submodules under whichever module is running: the backbone's own
layers must not end up inside the adapter. Wraps are outermost (first target outermost): the
other positions see the rewritten arguments and the module's own output.

AdapterDrop (Rueckle et al., 2021): with ``Adapted(..., drop_rate=r)`` each layer's adapters are
dropped, all together, with probability r on every training call (never at evaluation). A layer
is the nearest enclosing module named like a transformer block (``encoderblock`` or
``encoderblock_{i}``, see LAYER_NAME), else the adapted module itself. The decision is drawn from
the 'dropout' rng stream of that layer, so it is a function of the key the trainer passes
(fold_in(seed, step): a resumed run drops the same layers), differs per layer under nn.scan, and
a dropped adapter contributes exactly nothing: the module computes what the bare backbone does.
'wrap' adapters change what the module computes (not a residual), so they cannot be dropped.
The rate may follow a schedule over training (``drop_schedule='linear'``: from 0 at step 0 up to
``drop_rate`` at step ``drop_ramp_steps``, then constant); the model then needs the step, passed
as ``adapter_step=`` with the call (vadapt.train does). Rate and key are functions of the step
alone, so a resumed run still drops the same layers.

Why a wrapper module rather than a context manager around ``apply``: the interceptor must be
entered inside the traced code, or a jitted function traced once without it silently keeps
running without adapters (and vice versa). ``nn.share_scope`` makes the backbone use the
wrapper's scope, so backbone parameter paths are exactly those of the bare backbone.

Train flag: adapter dropout follows the call's ``train`` keyword (``deterministic`` = not train
when the backbone takes ``deterministic`` instead); without either, adapters are deterministic.
Calls are forwarded to the backbone unchanged.

Interception can only create parameters inside ``@nn.compact`` methods, so a targeted module's
``__call__`` must be compact (a subclass whose ``__call__`` calls a compact ``super().__call__``
is fine: the adapter is attached at the compact level). Under ``nn.scan`` a target such as
``Transformer/encoderblock/MlpBlock_0`` gets one adapter per layer, stacked on the scan axis.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Optional, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

POSITIONS = ('output', 'parallel', 'input', 'wrap')

# The module name of a transformer block, the unit AdapterDrop drops ('encoderblock' under nn.scan).
LAYER_NAME = re.compile(r'encoderblock(?:_\d+)?')
# How the AdapterDrop rate evolves over training (see drop_rate_at).
DROP_SCHEDULES = ('constant', 'linear')


def check_drop(rate: float, schedule: str = 'constant', ramp_steps: int = 0) -> None:
  """Validates an AdapterDrop rate and schedule; one-line errors naming what was found."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'drop_rate (AdapterDrop) must be in [0, 1); found {rate!r}.')
  if schedule not in DROP_SCHEDULES:
    raise ValueError(f'Unknown drop_schedule {schedule!r}; expected one of {DROP_SCHEDULES}.')
  if schedule == 'linear':
    if not rate:
      raise ValueError("drop_schedule='linear' ramps the AdapterDrop rate from 0 up to "
                       'drop_rate, which is 0: set drop_rate > 0.')
    if isinstance(ramp_steps, bool) or int(ramp_steps) != ramp_steps or ramp_steps < 1:
      raise ValueError(f"drop_schedule='linear' needs drop_ramp_steps, the step at which the rate "
                       f'reaches drop_rate, as a positive integer; found {ramp_steps!r}.')
  elif ramp_steps:
    raise ValueError(f"drop_ramp_steps={ramp_steps!r} applies to drop_schedule='linear' only; "
                     f'found drop_schedule={schedule!r}.')


def drop_rate_at(rate: float, schedule: str, ramp_steps: int, step) -> jax.Array:
  """The AdapterDrop rate at training step `step` (completed steps, 0 for the first one)."""
  if schedule == 'constant':
    return jnp.float32(rate)
  progress = jnp.minimum(jnp.asarray(step, jnp.float32) / jnp.float32(ramp_steps), 1.0)
  return jnp.float32(rate) * progress


def scheduled_drop_rate(rate: float, schedule: str, ramp_steps: int, step: Any,
                        train: bool) -> Optional[jax.Array]:
  """The rate a scheduled AdapterDrop uses in this call; None for a constant rate or inference.

  Raises:
    ValueError: a scheduled rate in training without the step (`adapter_step=`).
  """
  if not train or schedule == 'constant':
    return None
  if step is None:
    raise ValueError(f'drop_schedule={schedule!r} sets the AdapterDrop rate from the training '
                     'step: call the model with adapter_step=<step> (vadapt.train does), or use '
                     "drop_schedule='constant'.")
  return drop_rate_at(rate, schedule, ramp_steps, step)


class AdapterConfig(Protocol):
  """What a Target needs from an adapter description (see vadapt.adapters)."""

  def build(self, *, in_shape: tuple[int, ...], out_shape: Optional[tuple[int, ...]], name: str,
            parent: nn.Module) -> nn.Module:
    """A module mapping arrays of in_shape to out_shape, called as `m(x, deterministic=...)`.

    For position 'wrap': in_shape is the module's first array argument's shape, out_shape is
    None, and the module is called as `m(args, kwargs, deterministic=...)` and returns
    `(args, kwargs, finish)` (see the module docstring).
    """


class TargetNotFoundError(ValueError):
  """A target pattern matched no module of the backbone."""


class NotCompactError(TypeError):
  """A targeted module's __call__ is not @nn.compact, so no adapter can be created inside it."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Where to put one adapter and how to combine it with the module it adapts.

  Attributes:
    pattern: regex, `re.fullmatch`-ed against the '/'-joined module path, e.g.
      r'Transformer/encoderblock_\\d+/MlpBlock_0'.
    adapter: the adapter's config (e.g. vadapt.adapters.BottleneckConfig); its widths come from
      the tensors it sees.
    position: 'output' (y + a(y)), 'parallel' (y + a(x)), 'input' (module(x + a(x))) or
      'wrap' (the adapter rewrites the module's arguments and output).
    name: the adapter's module name under the adapted module; distinct targets on the same
      module need distinct names.
  """
  pattern: str
  adapter: Any
  position: str = 'output'
  name: str = 'adapter'

  def __post_init__(self):
    if self.position not in POSITIONS:
      raise ValueError(f'Unknown adapter position {self.position!r}; expected one of {POSITIONS}.')
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f'Target pattern {self.pattern!r} is not a valid regex: {e}.') from None
    if not self.name or '/' in self.name:
      raise ValueError(f'Target name must be a non-empty module name without "/"; '
                       f'found {self.name!r}.')
    if not callable(getattr(self.adapter, 'build', None)):
      raise TypeError(f'Target adapter must be a config with a build(...) method (e.g. '
                      f'vadapt.adapters.BottleneckConfig); found {type(self.adapter).__name__}.')
    # Weight-space adapters (LoRA: y + s B A x) only make sense at some positions.
    allowed = getattr(self.adapter, 'positions', POSITIONS)
    if self.position not in allowed:
      raise ValueError(f'{type(self.adapter).__name__} goes at position {" or ".join(allowed)}; '
                       f'found position={self.position!r} for {self.pattern!r}.')


def _is_compact(context) -> bool:
  fun = getattr(context.orig_method, 'func', context.orig_method)
  return bool(getattr(fun, 'compact', False))


def _compact_call_in_bases(cls: type) -> bool:
  """True when some base class defines a compact __call__ (reached through super().__call__)."""
  return any(getattr(base.__dict__.get('__call__'), 'compact', False) for base in cls.__mro__[1:])


def _first_array(args, kwargs, path: str, position: str):
  leaves = list(args) or list(kwargs.values())
  if not leaves or not isinstance(leaves[0], (jax.Array, np.ndarray)):
    raise TypeError(f'A {position!r} adapter on {path!r} needs the module called with an array as '
                    f'its first argument; found {type(leaves[0]).__name__ if leaves else "none"}.')
  return leaves[0]


class _Interceptor:
  """Holds one call's bookkeeping: which targets applied where, and every module path seen."""

  def __init__(self, targets: tuple[Target, ...], deterministic: bool, prefix: tuple[str, ...],
               drop_rate: float = 0.0, rate_now: Any = None):
    self.targets = targets
    self.prefix = prefix  # The wrapper's own path: patterns are relative to the backbone.
    self.regexes = [re.compile(t.pattern) for t in targets]
    self.deterministic = deterministic
    # drop_rate (a number) says whether layers are dropped at all; rate_now (possibly traced: a
    # scheduled rate) is this call's probability.
    self.drop_rate = 0.0 if deterministic else drop_rate
    self.rate_now = self.drop_rate if rate_now is None else rate_now
    # id(layer module) -> (module, keep): one AdapterDrop decision per layer and call. Keyed by
    # the bound instance (held, so its id stays unique), which is new in every (re)trace.
    self.keep: dict[int, tuple[nn.Module, jax.Array]] = {}
    self.applied: list[set[str]] = [set() for _ in targets]
    self.seen: dict[str, str] = {}  # path -> module class name
    self.active: set[str] = set()   # paths being adapted now (super().__call__, lifted wrappers)
    self.in_adapter = 0             # adapters' own Dense layers must not be adapted

  def __call__(self, next_fun, args, kwargs, context):
    if context.method_name != '__call__' or self.in_adapter:
      return next_fun(*args, **kwargs)
    module = context.module
    full = tuple(str(p) for p in module.path)
    if full[:len(self.prefix)] != self.prefix:
      return next_fun(*args, **kwargs)  # Not part of this backbone.
    path = '/'.join(full[len(self.prefix):])
    self.seen.setdefault(path, type(module).__name__)
    hits = [i for i, rx in enumerate(self.regexes) if rx.fullmatch(path)]
    if not hits or path in self.active:
      return next_fun(*args, **kwargs)
    if not _is_compact(context):
      if _compact_call_in_bases(type(module)):
        return next_fun(*args, **kwargs)  # Attach at the compact super().__call__ level.
      raise NotCompactError(
          f'Cannot adapt {path!r} ({type(module).__name__}): its __call__ is not @nn.compact. '
          'Interception can only create the adapter\'s parameters inside a compact method; write '
          'the module with @nn.compact instead of setup(), or target one of its compact '
          'submodules.')
    self.active.add(path)
    try:
      return self._adapt(module, path, hits, next_fun, args, kwargs)
    finally:
      self.active.discard(path)

  def _build(self, target: Target, module: nn.Module, in_shape, out_shape) -> nn.Module:
    return target.adapter.build(in_shape=tuple(in_shape),
                                out_shape=None if out_shape is None else tuple(out_shape),
                                name=target.name, parent=module)

  def _run(self, target: Target, module: nn.Module, x, out_shape):
    adapter = self._build(target, module, x.shape, out_shape)
    self.in_adapter += 1
    try:
      return adapter(x, deterministic=self.deterministic)
    finally:
      self.in_adapter -= 1

  def _wrap(self, target: Target, module: nn.Module, path: str, args, kwargs):
    leaves = [a for a in (*args, *kwargs.values()) if isinstance(a, (jax.Array, np.ndarray))]
    adapter = self._build(target, module, leaves[0].shape if leaves else (), None)
    self.in_adapter += 1
    try:
      out = adapter(args, kwargs, deterministic=self.deterministic)
    finally:
      self.in_adapter -= 1
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], tuple)
            and isinstance(out[1], dict) and callable(out[2])):
      raise TypeError(f'A \'wrap\' adapter ({type(adapter).__name__} on {path!r}) must return '
                      f'(args tuple, kwargs dict, output function); found {type(out).__name__}.')
    return out

  def _layer_keep(self, module: nn.Module) -> jax.Array:
    """AdapterDrop: whether this call keeps the adapters of `module`'s layer (a bool scalar)."""
    layer = module
    while isinstance(layer, nn.Module) and not LAYER_NAME.fullmatch(str(layer.name)):
      layer = layer.parent
    if not isinstance(layer, nn.Module):
      layer = module  # No enclosing block: each adapted module is its own layer.
    if id(layer) not in self.keep:
      self.keep[id(layer)] = (layer, jax.random.bernoulli(layer.make_rng('dropout'),
                                                          1.0 - self.rate_now))
    return self.keep[id(layer)][1]

  def _adapt(self, module, path, hits, next_fun, args, kwargs):
    targets = [self.targets[i] for i in hits]
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
      raise ValueError(f'Several targets put an adapter named {names} on {path!r} '
                       f'(patterns {[t.pattern for t in targets]}): give each a distinct name=.')
    for i in hits:
      self.applied[i].add(path)
    wraps = [t for t in targets if t.position == 'wrap']
    if wraps and self.drop_rate:
      raise ValueError(f'AdapterDrop (drop_rate={self.drop_rate}) cannot drop the \'wrap\' '
                       f'adapter on {path!r}: it rewrites the call (e.g. prompt tokens change the '
                       'sequence length) rather than adding a residual. Use drop_rate=0.')
    finishers = []
    for t in wraps:
      args, kwargs, finish = self._wrap(t, module, path, args, kwargs)
      finishers.append(finish)
    targets = [t for t in targets if t.position != 'wrap']
    # A dropped adapter still runs (its params exist and shapes stay static) but adds exactly 0.
    gate = lambda a: a
    if targets and self.drop_rate:
      keep = self._layer_keep(module)
      gate = lambda a: jnp.where(keep, a, jnp.zeros_like(a))
    x = None
    if any(t.position in ('input', 'parallel') for t in targets):
      x = _first_array(args, kwargs, path, 'input/parallel')
    for t in targets:
      if t.position == 'input':
        new_x = x + gate(self._run(t, module, x, x.shape))
        # Self-attention gets the same array as query and key/value: adapt every copy of it.
        args = tuple(new_x if a is x else a for a in args)
        kwargs = {k: new_x if v is x else v for k, v in kwargs.items()}
    y = next_fun(*args, **kwargs)
    for t in targets:
      if t.position == 'input':
        continue
      if not isinstance(y, jax.Array):
        raise TypeError(f'An {t.position!r} adapter on {path!r} needs the module to return one '
                        f'array; it returned {type(y).__name__}.')
      src = y if t.position == 'output' else x
      y = y + gate(self._run(t, module, src, y.shape))
    for finish in reversed(finishers):
      y = finish(y)
    return y

  def check(self) -> None:
    """Raises for targets that were never applied, naming near module paths."""
    for target, rx, applied in zip(self.targets, self.regexes, self.applied):
      if applied:
        continue
      matched = [p for p in self.seen if rx.fullmatch(p)]
      if matched:
        raise NotCompactError(
            f'Target {target.pattern!r} matches {matched[:5]} but no adapter could be attached: '
            'the module\'s __call__ is not @nn.compact (a non-compact override that does not call '
            'a compact super().__call__). Interception can only create parameters inside compact '
            'methods.')
      paths = sorted(p for p in self.seen if p)
      near = difflib.get_close_matches(target.pattern, paths, n=8, cutoff=0.4)
      listing = near or paths[:8]
      raise TargetNotFoundError(
          f'Target pattern {target.pattern!r} (re.fullmatch on the module path) matches no module '
          f'of the backbone. {"Near" if near else "Some"} module paths: {listing}'
          + (f' (of {len(paths)})' if not near else '') + '.')


def _is_train(kwargs) -> bool:
  if 'train' in kwargs:
    return bool(kwargs['train'])
  if 'deterministic' in kwargs:
    return not kwargs['deterministic']
  return False


class Adapted(nn.Module):
  """A backbone with adapters at the modules its targets match; parameters keep backbone paths.

  Attributes:
    backbone: the unmodified Flax model (compact where adapters go).
    targets: where and how to add adapters (see Target and vadapt.placements).
    drop_rate: AdapterDrop: the probability that a layer's adapters are left out of a training
      call (drawn per layer and call from the 'dropout' rng); 0 keeps every adapter. With a
      schedule, the rate it reaches.
    drop_schedule: 'constant' (drop_rate at every step) or 'linear' (0 at step 0, rising to
      drop_rate at step drop_ramp_steps, then constant; training calls pass adapter_step=).
    drop_ramp_steps: the length of the linear ramp in steps.
  """
  backbone: nn.Module
  targets: tuple[Target, ...]
  drop_rate: float = 0.0
  drop_schedule: str = 'constant'
  drop_ramp_steps: int = 0

  def setup(self):
    if not isinstance(self.targets, tuple) or not all(isinstance(t, Target) for t in self.targets):
      raise TypeError(f'Adapted.targets must be a tuple of vadapt.inject.Target; found '
                      f'{self.targets!r}.')
    check_drop(self.drop_rate, self.drop_schedule, self.drop_ramp_steps)
    # Backbone params stay at their own paths: the wrapper adds no prefix.
    nn.share_scope(self, self.backbone)

  def __call__(self, *args, **kwargs):
    """Calls the backbone with adapters; `train` (or `deterministic`) also drives adapter dropout."""
    return self.call_method('__call__', *args, **kwargs)

  def call_method(self, method: str, *args, adapter_step: Any = None, **kwargs):
    """Calls `backbone.<method>(*args, **kwargs)` with adapters (e.g. a CLIP model's encoder).

    `adapter_step` (the training step, an int or a traced scalar) sets a scheduled AdapterDrop
    rate; it is not passed on to the backbone.
    """
    train = _is_train(kwargs)
    rate_now = scheduled_drop_rate(self.drop_rate, self.drop_schedule, self.drop_ramp_steps,
                                   adapter_step, train)
    interceptor = _Interceptor(self.targets, deterministic=not train,
                               prefix=tuple(str(p) for p in self.path), drop_rate=self.drop_rate,
                               rate_now=rate_now)
    with nn.intercept_methods(interceptor):
      out = getattr(self.backbone, method)(*args, **kwargs)
    # Every target must fire on a full forward pass; another method (a CLIP model's encode_text)
    # runs only part of the backbone, so targets elsewhere legitimately stay idle.
    if method == '__call__':
      interceptor.check()
    return out
