"""Many named adapters on one frozen backbone; which one runs is chosen per call, as data.

  tasks = [multi.named(backbone, 'pets', 'houlsby', bottleneck=8, num_classes=37),
           multi.named(backbone, 'flowers', 'pfeiffer', bottleneck=8, num_classes=102)]
  model = multi.adapt(backbone, tasks)
  params = api.init_with_pretrained(model, backbone_params, rng, images)   # every adapter + head
  logits = model.apply({'params': params}, images, adapter='pets')         # one adapter, static
  logits = model.apply({'params': params}, images, adapter=jnp.int32(1))   # by index: data
  logits = model.apply({'params': params}, images, adapter=model.indices(['pets', 'flowers', ...]))
  outs = model.apply({'params': params}, images, adapter=composition.Parallel('pets', 'flowers'))

Each adapter's parameters live under its name next to the module it adapts
(``.../MlpBlock_0/pets/down/kernel``; a Target named other than 'adapter' gives
``.../<name>.<target name>/...``), its head at ``heads/<name>/{kernel,bias}``. Which adapters train
is the label rules' business (`rules`), so training one leaves the others bit-identical.

The `adapter=` argument of a call:
  None                   no adapter (the backbone alone; without heads)
  'name'                 that adapter and its head; static, so a different name is another trace
  int array, () or (B,)  the adapter's index (`index`, `indices`) for the whole batch or per
                         example; -1 is no adapter. Data: switching re-traces nothing. Bottleneck
                         and conv adapters of one structure at a module are stacked and the
                         chosen one gathered; others (other structures, LoRA, which reads the
                         layer's kernel) all run and are masked. Logits of heads narrower than the
                         widest are padded with -inf.
  a list of names        the same per example, converted with `indices` (outside jit)
  Stack/Parallel/Average/Fuse   composition blocks (vadapt.composition); static

`drop_lowest=k` skips the adapters of the lowest k blocks at inference (AdapterDrop); with Parallel
the batch is then replicated only at the first block that still adapts, so the blocks below run
once for all tasks. A scan model (vadapt.models.vit with scan=True) runs every block as one
module: its lowest k layers' adapters add exact zeros (chosen by the layer index the scan passes
each block, as data), and Parallel replicates the input (a scan's carry keeps one shape), so the
outputs equal the unrolled model's but the lower blocks are not shared.

`adapt(..., drop_rate=r)` is AdapterDrop during training, as in vadapt.inject: each layer's
adapters (whichever the call selects) add nothing to a training call with probability r, drawn
per layer and call from the 'dropout' rng.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vadapt import api
from vadapt import composition
from vadapt import inject
from vadapt.adapters.bottleneck import BottleneckConfig
from vadapt.adapters.conv import ConvAdapterConfig
from vadapt.adapters.fusion import AdapterFusion
from vadapt.pretrained.common import flatten, unflatten

_NAME = re.compile(r'[A-Za-z0-9_\-]+')
# Modules whose input is the residual stream: a Parallel batch is replicated at one of these.
_BLOCK = re.compile(r'(?:.+/)?(?:encoderblock(?:_\d+)?|(?:Bottleneck)?ResNetBlock_\d+)')
# The block index of a module path, for AdapterDrop.
_LAYER = re.compile(r'(?:^|/)(?:encoderblock|(?:Bottleneck)?ResNetBlock)_(\d+)(?:/|$)')
# The blocks of a scan model: one module for all layers.
_SCANNED = re.compile(r'(?:^|/)encoderblock(?:/|$)')
HEADS = 'heads'
_UNSET = object()
_POSITIONS = ('output', 'parallel', 'input')
# Adapters that depend only on their own parameters: same-structure ones are stacked and the
# selected one gathered. Others (LoRA reads the adapted layer's kernel) are all run and masked.
_GATHERABLE = (BottleneckConfig, ConvAdapterConfig)


def check_name(name: str, what: str = 'Adapter') -> str:
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f'{what} names are letters, digits, "_" and "-"; found {name!r}.')
  return name


@dataclasses.dataclass(frozen=True)
class NamedAdapter:
  """One task's delta: adapters at some modules and, optionally, its own classifier head.

  Attributes:
    name: unique within a model; its parameters live under this name.
    targets: where and how (vadapt.inject.Target); empty for a head-only task (e.g. one served
      by a fusion of other adapters).
    num_classes: width of its own head on the backbone's features; None to use the backbone's
      output as it is.
    class_names: the head's class names (stored with the adapter, served with predictions).
  """
  name: str
  targets: tuple[inject.Target, ...] = ()
  num_classes: Optional[int] = None
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    check_name(self.name)
    if not isinstance(self.targets, tuple) or not all(
        isinstance(t, inject.Target) for t in self.targets):
      raise TypeError(f'NamedAdapter {self.name!r}: targets must be a tuple of '
                      f'vadapt.inject.Target; found {self.targets!r}.')
    if self.num_classes is not None and (int(self.num_classes) != self.num_classes
                                         or self.num_classes < 1):
      raise ValueError(f'NamedAdapter {self.name!r}: num_classes must be a positive integer or '
                       f'None; found {self.num_classes!r}.')
    if self.class_names and len(self.class_names) != self.num_classes:
      raise ValueError(f'NamedAdapter {self.name!r}: {len(self.class_names)} class names for '
                       f'num_classes={self.num_classes}.')


def param_name(adapter: str, target: inject.Target) -> str:
  """The module name of `adapter`'s parameters for `target` on the module it adapts."""
  return adapter if target.name == 'adapter' else f'{adapter}.{target.name}'


def named(backbone: nn.Module, name: str, method: str = 'houlsby', *,
          num_classes: Optional[int] = None, class_names: Sequence[str] = (),
          **adapt_kwargs) -> NamedAdapter:
  """A NamedAdapter placed like `api.adapt(backbone, method, **adapt_kwargs)` would place it."""
  targets = () if method is None else api.adapt(backbone, method, **adapt_kwargs).targets
  return NamedAdapter(name=name, targets=tuple(targets), num_classes=num_classes,
                      class_names=tuple(class_names))


def adapt(backbone: nn.Module, adapters: Iterable[NamedAdapter], *, drop_rate: float = 0.0,
          drop_schedule: str = 'constant', drop_ramp_steps: int = 0) -> 'MultiAdapted':
  """`backbone` holding every adapter of `adapters` (names must be unique); `drop_rate`,
  `drop_schedule`, `drop_ramp_steps`: AdapterDrop during training, as in vadapt.inject.Adapted
  (a scheduled rate needs adapter_step= with training calls)."""
  adapters = tuple(adapters)
  bad = [a for a in adapters if not isinstance(a, NamedAdapter)]
  if bad:
    raise TypeError(f'multi.adapt takes NamedAdapters (see multi.named); found {bad[:2]}.')
  names = [a.name for a in adapters]
  dups = sorted({n for n in names if names.count(n) > 1})
  if dups:
    raise ValueError(f'Duplicate adapter names {dups}: every adapter on a backbone needs its own '
                     'name.')
  targets = tuple(dataclasses.replace(t, name=param_name(a.name, t))
                  for a in adapters for t in a.targets)
  return MultiAdapted(backbone=backbone, targets=targets, adapters=adapters, drop_rate=drop_rate,
                      drop_schedule=drop_schedule, drop_ramp_steps=drop_ramp_steps)


class _Head(nn.Module):
  """A zero-initialised linear head's parameters (returned, not applied: heads are gathered).

  Attributes:
    num_classes: output width.
  """
  num_classes: int

  @nn.compact
  def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
    if not self.has_variable('params', 'kernel') and not self.is_mutable_collection('params'):
      raise ValueError(f'Adapter {self.name!r} has no head parameters (expected '
                       f'{HEADS}/{self.name}/kernel): initialise it with multi.init_missing (or '
                       'api.init_with_pretrained) after adding it.')
    kernel = self.param('kernel', nn.initializers.zeros, (features, self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_classes,))
    return kernel, bias


class _Heads(nn.Module):
  """Every task's head, at heads/<name>.

  Attributes:
    widths: (name, num_classes) per head.
  """
  widths: tuple[tuple[str, int], ...]

  @nn.compact
  def __call__(self, features: int,
               names: Optional[Sequence[str]] = None) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The heads `names` (default: all) as (kernel, bias)."""
    return {n: _Head(c, name=n)(features) for n, c in self.widths if names is None or n in names}


def _first_array(args, kwargs):
  for a in list(args) + list(kwargs.values()):
    if isinstance(a, (jax.Array, np.ndarray)):
      return a
  raise TypeError('The adapted module was called without an array argument.')


def _replace(args, kwargs, old, new):
  return (tuple(new if a is old else a for a in args),
          {k: new if v is old else v for k, v in kwargs.items()})


def _layer(path: str) -> Optional[int]:
  """The block index in `path`; None inside a scanned block (`encoderblock`: every layer is one
  module, and the index is data, see _scan_layer)."""
  m = _LAYER.search(path)
  if m:
    return int(m.group(1))
  if _SCANNED.search(path):
    return None
  raise ValueError(f'drop_lowest needs block indices in the adapted module paths (e.g. '
                   f'encoderblock_3, or a scanned encoderblock); {path!r} has none.')


@functools.lru_cache(maxsize=None)
def _layer_position(cls: type) -> Optional[int]:
  """Where a module class's __call__ takes a `layer` argument (after self), else None."""
  try:
    names = [n for n in inspect.signature(cls.__call__).parameters if n != 'self']
  except (TypeError, ValueError):
    return None
  return names.index('layer') if 'layer' in names else None


def _scan_layer(module: nn.Module, args, kwargs) -> Optional[jax.Array]:
  """The layer index a scanned block receives as its `layer` argument (vadapt.models.vit runs
  nn.scan over the block indices), else None."""
  position = _layer_position(type(module))
  if position is None:
    return None
  value = kwargs.get('layer', args[position] if position < len(args) else None)
  if (isinstance(value, jax.Array) and value.ndim == 0
      and jnp.issubdtype(value.dtype, jnp.integer)):
    return value
  return None


class _Interceptor(inject._Interceptor):  # pylint: disable=protected-access
  """Runs the adapters a call selects; creates missing ones when params are mutable.

  `index` is None (no adapter), an int array (global adapter index, () or per example), a
  composition block, or ('static', i).
  """

  def __init__(self, model: 'MultiAdapted', selection, *, deterministic: bool,
               prefix: tuple[str, ...], drop_lowest: int = 0, replicate_at: Optional[str] = None,
               copies: Optional[np.ndarray] = None, drop_rate: float = 0.0, rate_now: Any = None):
    super().__init__(model.targets, deterministic, prefix, drop_rate=drop_rate, rate_now=rate_now)
    self.model = model
    self.owner = [i for i, a in enumerate(model.adapters) for _ in a.targets]
    self.base_name = [t.name for a in model.adapters for t in a.targets]
    self.selection = selection
    self.drop_lowest = drop_lowest
    self.replicate_at = replicate_at
    self.copies = copies  # Parallel: the members' global indices, one batch copy each.
    self.scan_layer = None  # Inside a scanned block: the running layer's index (traced).

  def __call__(self, next_fun, args, kwargs, context):
    if self.in_adapter or context.method_name != '__call__':
      return super().__call__(next_fun, args, kwargs, context)
    if self.replicate_at is not None:
      full = tuple(str(p) for p in context.module.path)
      if full[:len(self.prefix)] == self.prefix and '/'.join(
          full[len(self.prefix):]) == self.replicate_at:
        self.replicate_at = None
        x = _first_array(args, kwargs)
        args, kwargs = _replace(args, kwargs, x, jnp.concatenate([x] * len(self.copies)))
    layer = None if self.scan_layer is not None else _scan_layer(context.module, args, kwargs)
    if layer is None:
      return super().__call__(next_fun, args, kwargs, context)
    self.scan_layer = layer
    try:
      return super().__call__(next_fun, args, kwargs, context)
    finally:
      self.scan_layer = None

  # Running one adapter.

  def _bound(self, module, target, src, out_shape):
    adapter = target.adapter.build(in_shape=tuple(src.shape), out_shape=tuple(out_shape),
                                   name=target.name, parent=module)
    self.in_adapter += 1
    try:
      return adapter(src, deterministic=self.deterministic)
    finally:
      self.in_adapter -= 1

  def _params(self, module, path, i, src, out_shape):
    target = self.targets[i]
    if not module.has_variable('params', target.name):
      if not module.is_mutable_collection('params'):
        raise ValueError(
            f'Adapter {self.model.adapters[self.owner[i]].name!r} has no parameters on {path!r} '
            f'(expected {path}/{target.name}/...): initialise it with multi.init_missing (or '
            'api.init_with_pretrained) after adding it.')
      self._bound(module, target, src, out_shape)
    return module.variables['params'][target.name]

  def _unbound(self, module, target, params, src, out_shape, rng):
    adapter = target.adapter.build(in_shape=tuple(src.shape), out_shape=tuple(out_shape),
                                   name=None, parent=None)
    self.in_adapter += 1
    try:
      return adapter.apply({'params': params}, src, deterministic=self.deterministic,
                           rngs={} if rng is None else {'dropout': rng})
    finally:
      self.in_adapter -= 1

  def _select(self, module, path, group, src, out_shape):
    """Output of the selected member of `group` (same-structure adapters), 0 where none is."""
    index = self.selection
    members = [self.owner[i] for i in group]
    table = np.full(len(self.model.adapters) + 1, -1, np.int32)
    table[np.asarray(members) + 1] = np.arange(len(members))
    target = self.targets[group[0]]
    if not isinstance(target.adapter, _GATHERABLE):
      return self._masked(module, group, table, src, out_shape)
    params = [self._params(module, path, i, src, out_shape) for i in group]
    rng = None if self.deterministic else module.make_rng('dropout')
    if self.copies is not None:  # Parallel: one block of rows per member, params per block.
      local = table[self.copies + 1]
      stacked = jax.tree.map(lambda *p: jnp.stack(p)[np.maximum(local, 0)], *params)
      n = len(self.copies)
      rows = src.reshape((n, src.shape[0] // n) + src.shape[1:])
      shape = (rows.shape[1],) + tuple(out_shape[1:])
      rngs = None if rng is None else jax.random.split(rng, n)
      out = jax.vmap(lambda p, s, r: self._unbound(module, target, p, s, shape, r),
                     in_axes=(0, 0, None if rngs is None else 0))(stacked, rows, rngs)
      out = out.reshape(tuple(out_shape))
      mask = np.repeat(local >= 0, rows.shape[1])
    else:
      local = jnp.asarray(table)[index + 1]
      if len(group) == 1:
        out = self._unbound(module, target, params[0], src, out_shape, rng)
      elif index.ndim == 0:
        p = jax.tree.map(lambda *p: jnp.stack(p)[jnp.maximum(local, 0)], *params)
        out = self._unbound(module, target, p, src, out_shape, rng)
      else:  # One adapter per example: gather its parameters, run it on its own row.
        p = jax.tree.map(lambda *p: jnp.stack(p)[jnp.maximum(local, 0)], *params)
        rngs = None if rng is None else jax.random.split(rng, src.shape[0])
        shape = (1,) + tuple(out_shape[1:])
        out = jax.vmap(lambda p, s, r: self._unbound(module, target, p, s[None], shape, r)[0],
                       in_axes=(0, 0, None if rngs is None else 0))(p, src, rngs)
      mask = local >= 0
    mask = jnp.reshape(mask, mask.shape + (1,) * (out.ndim - mask.ndim))
    return jnp.where(mask, out, jnp.zeros_like(out))

  def _masked(self, module, group, table, src, out_shape):
    # Adapters that read the layer they adapt (LoRA reads its kernel) run bound, every member;
    # each row keeps its own member's output (the others add exact zeros).
    if self.copies is not None:
      local = np.repeat(table[self.copies + 1], src.shape[0] // len(self.copies))
    else:
      local = jnp.asarray(table)[self.selection + 1]
    out = None
    for j, i in enumerate(group):
      y = self._bound(module, self.targets[i], src, out_shape)
      mask = local == j
      mask = jnp.reshape(mask, mask.shape + (1,) * (y.ndim - mask.ndim))
      y = jnp.where(mask, y, jnp.zeros_like(y))
      out = y if out is None else out + y
    return out

  # One adapted module.

  def _adapt(self, module, path, hits, next_fun, args, kwargs):
    names = [self.targets[i].name for i in hits]
    if len(set(names)) != len(names):
      raise ValueError(f'Several targets put an adapter named {names} on {path!r}: give each '
                       'target of one adapter a distinct name=.')
    for i in hits:
      self.applied[i].add(path)
    unknown = sorted({self.targets[i].position for i in hits} - set(_POSITIONS))
    if unknown:
      raise ValueError(f'Named adapters support positions {_POSITIONS}; {path!r} has {unknown}.')
    x = _first_array(args, kwargs)
    def call(new_x):
      new_args, new_kwargs = _replace(args, kwargs, x, new_x)
      return next_fun(*new_args, **new_kwargs)
    selection = self.selection
    gate = lambda a: a
    if self.drop_rate:  # AdapterDrop (training): the layer's adapters add exactly 0, or all add.
      keep = self._layer_keep(module)
      gate = lambda a: jnp.where(keep, a, jnp.zeros_like(a))
    layer = _layer(path) if self.drop_lowest else None
    if self.drop_lowest:
      if layer is None:  # A scanned block: its index is data; the lowest layers add exact 0.
        if self.scan_layer is None:
          raise ValueError(f'drop_lowest on the scanned block {path!r} needs its layer index: '
                           'the block must take it as its `layer` argument (as '
                           'vadapt.models.vit does), or build the model with scan=False.')
        above, inner = self.scan_layer >= self.drop_lowest, gate
        gate = lambda a: jnp.where(above, inner(a), jnp.zeros_like(a))
    dropped = self.drop_lowest and layer is not None and layer < self.drop_lowest
    if dropped:
      y = call(x)
    elif isinstance(selection, (jax.Array, np.ndarray)) or self.copies is not None:
      y = self._dynamic(module, path, hits, call, x, gate)
    elif selection is None:
      y = call(x)
    else:
      y = self._compose(module, path, hits, call, x, gate)
    if module.is_mutable_collection('params'):  # Creates the adapters this call did not run.
      for i in hits:
        t = self.targets[i]
        if not module.has_variable('params', t.name):
          src = y if t.position == 'output' else x
          self._bound(module, t, src, y.shape if t.position != 'input' else x.shape)
    return y

  def _dynamic(self, module, path, hits, call, x, gate):
    groups: dict[Any, list[int]] = {}
    for i in hits:
      t = self.targets[i]
      groups.setdefault((t.position, self.base_name[i], t.adapter), []).append(i)
    new_x = x
    for (position, _, _), group in groups.items():
      if position == 'input':
        new_x = new_x + gate(self._select(module, path, group, new_x, new_x.shape))
    y = call(new_x)
    for (position, _, _), group in groups.items():
      if position != 'input':
        src = y if position == 'output' else x
        y = y + gate(self._select(module, path, group, src, y.shape))
    return y

  def _compose(self, module, path, hits, call, x, gate):
    block = self.selection
    if isinstance(block, tuple):  # ('static', i): one adapter, as a Stack of one.
      block = composition.Stack(self.model.adapters[block[1]].name)
    order = {n: k for k, n in enumerate(block.members)}
    slots = []
    for i in sorted(hits, key=lambda i: order.get(self.model.adapters[self.owner[i]].name, -1)):
      member = self.model.adapters[self.owner[i]].name
      if member not in order:
        continue
      t = self.targets[i]
      run = lambda src, shape, t=t: gate(self._bound(module, t, src, shape))
      slots.append(composition.Slot(member=member, position=t.position, run=run))
    fusion = None
    if isinstance(block, composition.Fuse):
      def fusion(query, outputs):
        layer = AdapterFusion(dropout_rate=block.dropout, temperature=block.temperature,
                              name=block.name, parent=module)
        self.in_adapter += 1
        try:
          return layer(query, outputs, deterministic=self.deterministic)
        finally:
          self.in_adapter -= 1
    return composition.combine(block, slots, call, x, path, fusion)


class MultiAdapted(inject.Adapted):
  """A backbone holding any number of named adapters (and heads); build it with `adapt`.

  Attributes:
    backbone: the unmodified Flax model; one returning features (num_classes=None) when the
      adapters have heads of their own.
    targets: every adapter's targets, named by `param_name` (derived from adapters).
    adapters: the named adapters, in index order.
  """
  adapters: tuple[NamedAdapter, ...] = ()

  def setup(self):
    super().setup()
    expected = tuple(dataclasses.replace(t, name=param_name(a.name, t))
                     for a in self.adapters for t in a.targets)
    if expected != self.targets:
      raise ValueError('MultiAdapted.targets must be derived from its adapters: build it with '
                       'vadapt.multi.adapt.')
    widths = tuple((a.name, a.num_classes) for a in self.adapters if a.num_classes)
    self.head_bank = _Heads(widths, name=HEADS) if widths else None

  # Names (usable on an unbound model).

  @nn.nowrap
  def names(self) -> tuple[str, ...]:
    return tuple(a.name for a in self.adapters)

  @nn.nowrap
  def index(self, name: str) -> int:
    """The index of adapter `name` (the data a call selects it by)."""
    names = self.names()
    if name not in names:
      raise KeyError(f'No adapter named {name!r} is loaded; loaded: {list(names)}.')
    return names.index(name)

  @nn.nowrap
  def indices(self, names: Sequence[Optional[str]]) -> np.ndarray:
    """Per-example indices for a mixed batch (None: no adapter)."""
    if isinstance(names, str):
      raise TypeError('indices takes a sequence of names, one per example; for one name use '
                      'index().')
    return np.asarray([-1 if n is None else self.index(n) for n in names], np.int32)

  @nn.nowrap
  def adapter(self, name: str) -> NamedAdapter:
    return self.adapters[self.index(name)]

  @nn.nowrap
  def with_adapter(self, adapter: NamedAdapter) -> 'MultiAdapted':
    """A new model with `adapter` added (its parameters: `init_missing`)."""
    return adapt(self.backbone, self.adapters + (adapter,), **self._drop())

  @nn.nowrap
  def without(self, name: str) -> 'MultiAdapted':
    """A new model without adapter `name` (its parameters: `remove_params`)."""
    self.index(name)
    return adapt(self.backbone, tuple(a for a in self.adapters if a.name != name), **self._drop())

  @nn.nowrap
  def _drop(self) -> dict[str, Any]:
    return dict(drop_rate=self.drop_rate, drop_schedule=self.drop_schedule,
                drop_ramp_steps=self.drop_ramp_steps)

  # Calls.

  def __call__(self, *args, adapter=None, head=_UNSET, drop_lowest: int = 0, **kwargs):
    """Calls the backbone with the selected adapters (see the module docstring) and head."""
    return self.call_method('__call__', *args, adapter=adapter, head=head,
                            drop_lowest=drop_lowest, **kwargs)

  def call_method(self, method: str, *args, adapter=None, head=_UNSET, drop_lowest: int = 0,
                  adapter_step: Any = None, **kwargs):
    selection = self._selection(adapter)
    if int(drop_lowest) != drop_lowest or drop_lowest < 0:
      raise ValueError(f'drop_lowest must be a non-negative integer; found {drop_lowest!r}.')
    train = inject._is_train(kwargs)  # pylint: disable=protected-access
    rate_now = inject.scheduled_drop_rate(self.drop_rate, self.drop_schedule,
                                          self.drop_ramp_steps, adapter_step, train)
    common = dict(deterministic=not train, prefix=tuple(str(p) for p in self.path),
                  drop_lowest=drop_lowest, drop_rate=self.drop_rate, rate_now=rate_now)
    if isinstance(selection, composition.Parallel):
      return self._parallel(method, selection, args, kwargs, head, common)
    interceptor = _Interceptor(self, selection, **common)
    with nn.intercept_methods(interceptor):
      out = getattr(self.backbone, method)(*args, **kwargs)
    if method == '__call__':
      interceptor.check()
    self._check_names(interceptor)
    if (self.head_bank is not None and isinstance(out, jax.Array)
        and self.is_mutable_collection('params')):
      self.head_bank(out.shape[-1])  # Initialisation creates every head.
    return self._head(out, selection, head)

  @nn.nowrap
  def _selection(self, adapter):
    if adapter is None:
      return None
    if isinstance(adapter, str):
      return ('static', self.index(adapter))
    if isinstance(adapter, composition.BLOCKS):
      for m in adapter.members:
        self.index(m)
      if isinstance(adapter, composition.Fuse):
        check_name(adapter.name, 'Fusion')
        if adapter.name in self.names():
          raise ValueError(f'Fusion name {adapter.name!r} is also an adapter name.')
      return adapter
    if isinstance(adapter, (list, tuple)) and all(isinstance(a, (str, type(None)))
                                                  for a in adapter):
      return self.indices(adapter)
    traced = isinstance(adapter, jax.core.Tracer)
    index = adapter if traced else np.asarray(adapter)
    if not jnp.issubdtype(index.dtype, jnp.integer) or index.ndim > 1:
      raise TypeError(f'adapter= takes a name, a composition block, or integer indices of shape '
                      f'() or (batch,); found {index.dtype} of shape {index.shape}.')
    if not traced:  # Concrete indices are checked; traced ones cannot be (jnp.take clamps).
      bad = index[(index < -1) | (index >= len(self.adapters))]
      if bad.size:
        raise ValueError(f'Adapter indices {sorted(set(bad.tolist()))} are out of range: '
                         f'{len(self.adapters)} adapters are loaded ({list(self.names())}), '
                         'and -1 means none.')
    return jnp.asarray(index, jnp.int32)

  def _parallel(self, method, block, args, kwargs, head, common):
    members = np.asarray([self.index(m) for m in block.members], np.int32)
    x = _first_array(args, kwargs)
    at = self._replication_point(method, block, args, kwargs, common['drop_lowest'])
    if at is None:  # No block to share: replicate the input itself.
      args, kwargs = _replace(args, kwargs, x, jnp.concatenate([x] * len(members)))
    interceptor = _Interceptor(self, None, replicate_at=at, copies=members, **common)
    with nn.intercept_methods(interceptor):
      out = getattr(self.backbone, method)(*args, **kwargs)
    if method == '__call__':
      interceptor.check()
    self._check_names(interceptor)
    n, batch = len(members), x.shape[0]
    outs = jax.tree.map(lambda o: o.reshape((n, batch) + o.shape[1:]), out)
    return tuple(self._head(jax.tree.map(lambda o, k=k: o[k], outs), ('static', int(i)), head)
                 for k, i in enumerate(members))

  @nn.nowrap
  def _check_names(self, interceptor):
    # Parameters are attributed to adapters by path segment: a backbone module of the same name
    # would be mistaken for one.
    segments = {part for path in interceptor.seen for part in path.split('/')}
    clash = sorted(segments & (set(self.names()) | {HEADS}))
    if clash:
      raise ValueError(f'Adapter names {clash} are also module names of the backbone; rename the '
                       'adapters.')

  @nn.nowrap
  def _replication_point(self, method, block, args, kwargs, drop_lowest) -> Optional[str]:
    """The residual block that holds the members' first adapter in call order, if any."""
    order = _call_order(self.backbone, method, args, kwargs)
    regexes = [re.compile(t.pattern) for m in block.members for t in self.adapter(m).targets]

    def dropped(path):
      layer = _layer(path) if drop_lowest else None
      return layer is not None and layer < drop_lowest

    first = next((p for p in order if any(rx.fullmatch(p) for rx in regexes)
                  and not dropped(p)), None)
    if first is None:
      return None
    parts = first.split('/')
    for k in range(len(parts), 0, -1):
      if _BLOCK.fullmatch('/'.join(parts[:k])):
        if _SCANNED.search('/'.join(parts[:k])):
          # A scan's carry keeps one shape through every layer, and the modules around the scan
          # mix in arrays of the call's batch (a class token): replicate the input itself.
          return None
        return '/'.join(parts[:k])
    return None

  def _head(self, out, selection, head):
    if head is _UNSET:
      head = self._default_head(selection)
    if head is None:
      return out
    if not isinstance(out, jax.Array):
      raise TypeError(f'Heads need the backbone to return one feature array; it returned '
                      f'{type(out).__name__}.')
    if self.head_bank is None:
      raise ValueError(f'head={head!r} was asked for, but no adapter has a head of its own.')
    if isinstance(head, str):
      with_heads = [a.name for a in self.adapters if a.num_classes]
      if head not in with_heads:
        raise KeyError(f'No head named {head!r}; adapters with heads: {with_heads}.')
      kernel, bias = self.head_bank(out.shape[-1], (head,))[head]
      return out @ kernel.astype(out.dtype) + bias.astype(out.dtype)
    # Data: pad every head to the widest and gather the selected one.
    index = head
    banks = self.head_bank(out.shape[-1])
    width = max(k.shape[1] for k, _ in banks.values())
    kernels = jnp.stack([jnp.pad(banks[a.name][0], ((0, 0), (0, width - a.num_classes)))
                         for a in self.adapters])
    biases = jnp.stack([jnp.pad(banks[a.name][1], (0, width - a.num_classes),
                                constant_values=-jnp.inf) for a in self.adapters])
    safe = jnp.maximum(index, 0)
    if index.ndim == 0:
      logits = out @ kernels[safe] + biases[safe]
    else:
      logits = jnp.einsum('bd,bdc->bc', out, kernels[safe]) + biases[safe]
    mask = jnp.reshape(index >= 0, index.shape + (1,) * (logits.ndim - index.ndim))
    return jnp.where(mask, logits, -jnp.inf)

  @nn.nowrap
  def _default_head(self, selection):
    with_heads = [a.name for a in self.adapters if a.num_classes]
    if selection is None or not with_heads:
      return None
    if isinstance(selection, tuple):
      name = self.adapters[selection[1]].name
      return name if name in with_heads else None
    if isinstance(selection, composition.Stack):
      own = [m for m in selection.members if m in with_heads]
      return own[-1] if own else None
    if isinstance(selection, (composition.Average, composition.Fuse)):
      raise ValueError(f'{type(selection).__name__}{selection.members}: pass head= (the name of '
                       f'the head to use, or None for features); heads: {with_heads}.')
    if len(with_heads) != len(self.adapters):
      raise ValueError(f'Choosing adapters by index needs every adapter to have a head or none; '
                       f'{sorted(set(self.names()) - set(with_heads))} have none.')
    return selection


def _call_order(backbone: nn.Module, method: str, args, kwargs) -> list[str]:
  """Module paths of one abstract call of `backbone`, in call order (relative to it)."""
  bare = backbone.clone(parent=None)
  seen: dict[str, None] = {}

  def record(next_fun, a, k, context):
    if context.method_name == '__call__':
      seen.setdefault('/'.join(str(p) for p in context.module.path), None)
    return next_fun(*a, **k)

  spec = lambda v: (jax.ShapeDtypeStruct(v.shape, v.dtype)
                    if isinstance(v, (jax.Array, np.ndarray)) else v)
  arrays = [spec(a) for a in args]
  with nn.intercept_methods(record):
    jax.eval_shape(lambda *a: bare.init(jax.random.key(0), *a, method=method, **kwargs), *arrays)
  return list(seen)


# Parameters by adapter name.


def owner(path: str, names: Iterable[str]) -> Optional[str]:
  """The adapter (or head) a '/'-joined parameter path belongs to, else None."""
  parts = path.split('/')
  for name in names:
    if len(parts) > 1 and parts[0] == HEADS and parts[1] == name:
      return name
    if any(p == name or p.startswith(name + '.') for p in parts[:-1]):
      return name
  return None


def rules(model: MultiAdapted, train: Sequence[str] = (), *, heads: bool = True,
          fusions: Sequence[str] = ()) -> list[tuple[str, str]]:
  """Label rules: adapters in `train` -> 'adapter', their heads -> 'head' (if heads), fusion
  layers named in `fusions` -> 'fusion', everything else (other adapters too) frozen."""
  for name in train:
    model.index(name)
  out = []
  for name in train:
    out.append((rf'(?:^|/){re.escape(name)}(?:\.[^/]+)?/', 'adapter'))
    if heads:
      out.append((rf'^{HEADS}/{re.escape(name)}/', 'head'))
  out += [(rf'(?:^|/){re.escape(check_name(f, "Fusion"))}/', 'fusion') for f in fusions]
  return out + [(r'.*', 'frozen')]


def adapter_params(model: MultiAdapted, params: Mapping[str, Any], name: str) -> dict[str, Any]:
  """Adapter `name`'s leaves (adapters and head) as a flat {path: array} dict."""
  model.index(name)
  return {k: v for k, v in flatten(params).items() if owner(k, [name]) == name}


def remove_params(model: MultiAdapted, params: Mapping[str, Any], name: str) -> dict[str, Any]:
  """`params` without adapter `name`'s leaves (pair with model.without(name))."""
  model.index(name)
  return unflatten({k: v for k, v in flatten(params).items() if owner(k, [name]) != name})


def backbone_params(model: MultiAdapted, params: Mapping[str, Any]) -> dict[str, Any]:
  """The backbone's own leaves: no adapter, head or fusion layer."""
  names = model.names()
  return unflatten({k: v for k, v in flatten(params).items()
                    if owner(k, names) is None and not k.startswith(HEADS + '/')
                    and not any(p.startswith('fusion') for p in k.split('/')[:-1])})


def init_missing(model: MultiAdapted, params: Mapping[str, Any], rng: jax.Array, *sample_args,
                 **sample_kwargs) -> dict[str, Any]:
  """`params` plus freshly initialised leaves for whatever the model holds and they lack (a new
  adapter, its head, a fusion layer when called with adapter=Fuse(...)). Existing leaves are
  returned unchanged (the same arrays)."""
  abstract = flatten(jax.eval_shape(functools.partial(model.init, **sample_kwargs), rng,
                                    *sample_args)['params'])
  have = flatten(params)
  stale = sorted(set(have) - set(abstract))
  if stale:
    raise ValueError(f'params hold {len(stale)} leaves the model does not have, e.g. {stale[:3]}: '
                     'remove them with multi.remove_params.')
  new = sorted(set(abstract) - set(have))
  if not new:
    return unflatten(have)

  def create(params, rng, sample_args):
    _, created = model.apply({'params': params}, *sample_args, rngs={'params': rng},
                             mutable=['params'], **sample_kwargs)
    flat = flatten(created['params'])
    return {k: flat[k] for k in new}

  return unflatten({**have, **jax.jit(create)(params, rng, sample_args)})
