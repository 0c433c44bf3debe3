"""Injection: identity at init, training touches only the delta, golden adapter paths for every
placement, scan/remat, custom models, dropout and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vadapt import api, inject, partition, placements
from vadapt.adapters import BottleneckConfig
from vadapt.models import vit
from vadapt.pretrained.common import flatten, unflatten

ATT, MLP = 'MultiHeadDotProductAttention_0', 'MlpBlock_0'
BOTTLENECK_8 = {'down/kernel': (32, 8), 'down/bias': (8,), 'up/kernel': (8, 32), 'up/bias': (32,)}
WITH_NORM = {**BOTTLENECK_8, 'norm/scale': (32,), 'norm/bias': (32,)}


def _golden(modules, leaves, blocks=(0, 1)):
  return {f'Transformer/encoderblock_{i}/{m}/adapter/{leaf}': shape
          for i in blocks for m in modules for leaf, shape in leaves.items()}


# Adapter params of mu/4 (width 32, depth 2) with bottleneck 8, per placement.
GOLDEN = {
    'houlsby': _golden((ATT, MLP), BOTTLENECK_8),
    'pfeiffer': _golden((MLP,), BOTTLENECK_8),
    'parallel': _golden((MLP,), WITH_NORM),
    'parallel_attn': _golden((ATT,), WITH_NORM),
}


@pytest.fixture(scope='module')
def backbone():
  """mu/4 with 'pre-trained' weights: a random head, so gradients reach the adapters."""
  model = vit.from_variant('mu/4', num_classes=10)
  # Jitted init: op-by-op initialisation of even a tiny ViT is slow on CPU.
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), params['head']['kernel'].shape)
  return model, params


@pytest.fixture(scope='module')
def batch():
  images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
  labels = jax.random.randint(jax.random.key(3), (8,), 0, 10)
  return images, labels


def _perturb_adapters(params, seed=0):
  """Random adapter weights (a constant shift would vanish in the next LayerNorm)."""
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return unflatten({k: v + 0.1 * jax.random.normal(key, v.shape) if '/adapter/' in k else v
                    for key, (k, v) in zip(keys, flat.items())})


def _adapter_shapes(params):
  return {k: tuple(v.shape) for k, v in flatten(params).items() if '/adapter/' in k}


def _train(model, params, batch, steps=5, rules=None, **apply_kwargs):
  """Adam on the adapters only, gradients over the delta alone; returns (params, losses)."""
  images, targets = batch
  labels = partition.label_tree(params, rules or partition.default_rules(train_head=False))
  delta, frozen = partition.split(params, labels)
  tx = partition.make_optimizer(labels, {'adapter': optax.adam(1e-2), 'head': optax.adam(1e-2)})
  opt_state = tx.init(delta)

  def loss_fn(p):
    logits = model.apply({'params': p}, images, **apply_kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  grad_fn = partition.value_and_grad_delta(loss_fn)

  @jax.jit
  def step(delta, opt_state):
    loss, grads = grad_fn(delta, frozen)
    updates, opt_state = tx.update(grads, opt_state, delta)
    return optax.apply_updates(delta, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    delta, opt_state, loss = step(delta, opt_state)
    losses.append(float(loss))
  return partition.merge(delta, frozen), losses


@pytest.mark.parametrize('method', sorted(GOLDEN))
def test_placement_identity_training_and_paths(method, backbone, batch):
  model, bb_params = backbone
  images, _ = batch
  adapted = api.adapt(model, method, bottleneck=8)
  params = api.init_with_pretrained(adapted, bb_params, jax.random.key(4), images)
  assert _adapter_shapes(params) == GOLDEN[method]
  np.testing.assert_array_equal(adapted.apply({'params': params}, images),
                                model.apply({'params': bb_params}, images))

  trained, losses = _train(adapted, params, batch)
  assert losses[-1] < losses[0], losses
  before, after = flatten(params), flatten(trained)
  for path, value in before.items():
    if '/adapter/' in path:
      continue
    np.testing.assert_array_equal(after[path], value, err_msg=path)
  assert any(not np.array_equal(after[p], before[p]) for p in GOLDEN[method] if '/up/' in p)


def test_scan_and_loop_agree_with_adapters(backbone):
  model, bb_params = backbone
  x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  loop = api.adapt(model, 'houlsby', bottleneck=8)
  params = api.init_with_pretrained(loop, bb_params, jax.random.key(4), x)
  # Non-zero adapters, so agreement is not only the shared identity.
  params = _perturb_adapters(params)

  flat = flatten(params)
  stacked = {k: v for k, v in flat.items() if 'encoderblock_' not in k}
  for key in {k.replace('encoderblock_0/', 'encoderblock/') for k in flat if 'encoderblock_0/' in k}:
    stacked[key] = jnp.stack([flat[key.replace('encoderblock/', f'encoderblock_{i}/')]
                              for i in range(2)])
  scan_model = vit.from_variant('mu/4', num_classes=10, scan=True, remat=True)
  scan = api.adapt(scan_model, 'houlsby', bottleneck=8)
  scan_init = jax.eval_shape(scan.init, jax.random.key(0), x)['params']
  assert {k: v.shape for k, v in flatten(scan_init).items()} == {
      k: v.shape for k, v in stacked.items()}
  assert flatten(scan_init)[f'Transformer/encoderblock/{MLP}/adapter/up/kernel'].shape == (2, 8, 32)
  np.testing.assert_allclose(loop.apply({'params': params}, x),
                             scan.apply({'params': unflatten(stacked)}, x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(loop.apply({'params': params}, x), model.apply({'params': bb_params}, x))


def test_scanned_block_target_is_adapted_once(backbone):
  """The scan block subclass calls a compact super().__call__: one adapter, at the compact level."""
  model = vit.from_variant('mu/4', num_classes=10, scan=True)
  target = inject.Target(r'Transformer/encoderblock', BottleneckConfig(bottleneck=4))
  adapted = inject.Adapted(model, (target,))
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.jit(adapted.init)(jax.random.key(0), x)
  assert _adapter_shapes(variables['params']) == {
      'Transformer/encoderblock/adapter/down/kernel': (2, 32, 4),
      'Transformer/encoderblock/adapter/down/bias': (2, 4),
      'Transformer/encoderblock/adapter/up/kernel': (2, 4, 32),
      'Transformer/encoderblock/adapter/up/bias': (2, 32)}
  bare = {'params': {k: v for k, v in variables['params'].items()}}
  np.testing.assert_array_equal(adapted.apply(variables, x), model.apply(bare, x))


def test_layer_selection(backbone):
  model, _ = backbone
  deep = vit.from_variant('mu/4', num_classes=10, num_layers=5)
  x = jnp.zeros((1, 32, 32, 3))

  def blocks(layers):
    params = jax.eval_shape(api.adapt(deep, 'pfeiffer', bottleneck=4, layers=layers).init,
                            jax.random.key(0), x)['params']
    return sorted({k.split('/')[1] for k in flatten(params) if '/adapter/' in k})

  assert blocks([1, 3]) == ['encoderblock_1', 'encoderblock_3']
  assert blocks(range(2, 4)) == ['encoderblock_2', 'encoderblock_3']
  assert blocks(placements.skip_lowest(2)) == ['encoderblock_2', 'encoderblock_3', 'encoderblock_4']
  assert len(blocks(None)) == 5
  with pytest.raises(ValueError, match='runs its blocks under nn.scan'):
    api.adapt(vit.from_variant('mu/4', scan=True), 'houlsby', bottleneck=4, layers=[0])


def test_adapter_dropout_follows_train_flag(backbone):
  model, bb_params = backbone
  x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  adapted = api.adapt(model, 'pfeiffer', bottleneck=8, dropout=0.5)
  params = api.init_with_pretrained(adapted, bb_params, jax.random.key(4), x)
  v = {'params': _perturb_adapters(params)}
  np.testing.assert_array_equal(adapted.apply(v, x), adapted.apply(v, x, train=False))
  a = adapted.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)})
  b = adapted.apply(v, x, train=True, rngs={'dropout': jax.random.key(1)})
  assert not np.allclose(a, b)


def test_jitted_adapted_and_bare_models_do_not_share_traces(backbone):
  model, bb_params = backbone
  x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  adapted = api.adapt(model, 'pfeiffer', bottleneck=8)
  params = api.init_with_pretrained(adapted, bb_params, jax.random.key(4), x)
  params = _perturb_adapters(params)
  bare_params = {k: v for k, v in params.items()}
  run = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
  bare_out = run(model, {'params': bare_params}, x)
  adapted_out = run(adapted, {'params': params}, x)
  assert not np.allclose(bare_out, adapted_out)
  np.testing.assert_allclose(run(model, {'params': bare_params}, x),
                             model.apply({'params': bare_params}, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adapted_out, adapted.apply({'params': params}, x),
                             rtol=1e-5, atol=1e-5)


class TinyNet(nn.Module):
  """A compact model unrelated to vadapt's backbones."""

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.relu(nn.Dense(16, name='fc1')(x))
    x = nn.Dropout(0.1)(x, deterministic=not train)
    return nn.Dense(4, name='fc2')(x)


class SetupNet(nn.Module):
  """Setup-style: interception cannot create params in its __call__."""

  def setup(self):
    self.fc = nn.Dense(4)

  def __call__(self, x):
    return self.fc(x)


class Outer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return SetupNet(name='inner')(x)


def test_custom_compact_model_all_positions():
  x = jax.random.normal(jax.random.key(0), (3, 8))
  cfg = BottleneckConfig(bottleneck=2)
  targets = (inject.Target('fc1', cfg, position='input', name='pre'),
             inject.Target('fc1', cfg, position='output'),
             inject.Target('fc2', cfg, position='parallel'))
  adapted = api.adapt(TinyNet(), targets=targets)
  variables = jax.jit(adapted.init)(jax.random.key(1), x)
  shapes = {k: v for k, v in _adapter_shapes(variables['params']).items()}
  shapes.update({k: tuple(v.shape) for k, v in flatten(variables['params']).items()
                 if '/pre/' in k})
  assert shapes == {
      'fc1/pre/down/kernel': (8, 2), 'fc1/pre/down/bias': (2,),
      'fc1/pre/up/kernel': (2, 8), 'fc1/pre/up/bias': (8,),
      'fc1/adapter/down/kernel': (16, 2), 'fc1/adapter/down/bias': (2,),
      'fc1/adapter/up/kernel': (2, 16), 'fc1/adapter/up/bias': (16,),
      'fc2/adapter/down/kernel': (16, 2), 'fc2/adapter/down/bias': (2,),
      'fc2/adapter/up/kernel': (2, 4), 'fc2/adapter/up/bias': (4,)}
  bare = {'params': {k: {n: v[n] for n in ('kernel', 'bias')}
                     for k, v in variables['params'].items()}}
  np.testing.assert_array_equal(adapted.apply(variables, x), TinyNet().apply(bare, x))


class WithHead(nn.Module):
  """An adapted model used as a submodule: patterns stay relative to the backbone."""

  @nn.compact
  def __call__(self, x):
    target = inject.Target('fc2', BottleneckConfig(bottleneck=2))
    # parent=None: built unbound, the backbone becomes the wrapper's child, not a sibling.
    x = inject.Adapted(TinyNet(parent=None), (target,), name='body')(x)
    return nn.Dense(3, name='fc2')(x)


def test_adapted_model_nested_in_another():
  params = jax.eval_shape(WithHead().init, jax.random.key(0), jnp.ones((1, 8)))['params']
  assert sorted(k for k in flatten(params) if 'adapter' in k) == [
      'body/fc2/adapter/down/bias', 'body/fc2/adapter/down/kernel',
      'body/fc2/adapter/up/bias', 'body/fc2/adapter/up/kernel']


def test_catch_all_pattern_does_not_adapt_adapters():
  adapted = api.adapt(TinyNet(), 'pfeiffer', bottleneck=2, targets=['.*'])
  params = jax.eval_shape(adapted.init, jax.random.key(0), jnp.ones((1, 8)))['params']
  prefixes = sorted({k.rpartition('adapter/')[0] for k in flatten(params) if 'adapter/' in k})
  # Every module of the model (the model itself at path ''), never the adapters' own layers.
  assert prefixes == ['', 'Dropout_0/', 'fc1/', 'fc2/']
  assert not any(k.count('adapter') > 1 for k in flatten(params))


def test_unmatched_pattern_lists_near_paths(backbone):
  model, _ = backbone
  adapted = api.adapt(model, targets=[inject.Target(r'Transformer/encoderblock_\d+/MlpBlock_1',
                                                    BottleneckConfig(bottleneck=4))])
  with pytest.raises(inject.TargetNotFoundError,
                     match=r"matches no module.*Transformer/encoderblock_0/MlpBlock_0"):
    jax.eval_shape(adapted.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_non_compact_target_says_why():
  adapted = api.adapt(Outer(), targets=[inject.Target('inner', BottleneckConfig(bottleneck=2))])
  with pytest.raises(inject.NotCompactError, match=r"'inner' \(SetupNet\).*not @nn.compact"):
    jax.eval_shape(adapted.init, jax.random.key(0), jnp.ones((1, 8)))


def test_bad_targets():
  with pytest.raises(ValueError, match="Unknown adapter position 'after'"):
    inject.Target('x', BottleneckConfig(bottleneck=2), position='after')
  with pytest.raises(ValueError, match='not a valid regex'):
    inject.Target('(', BottleneckConfig(bottleneck=2))
  with pytest.raises(TypeError, match='config with a build'):
    inject.Target('x', {'bottleneck': 2})


def test_two_targets_one_name_on_one_module():
  cfg = BottleneckConfig(bottleneck=2)
  adapted = api.adapt(TinyNet(), targets=[inject.Target('fc1', cfg), inject.Target('fc.', cfg)])
  with pytest.raises(ValueError, match=r"named \['adapter', 'adapter'\] on 'fc1'.*distinct name"):
    jax.eval_shape(adapted.init, jax.random.key(0), jnp.ones((1, 8)))


def test_unknown_method_lists_known(backbone):
  with pytest.raises(ValueError, match="Unknown adaptation method 'lorra'.*houlsby, pfeiffer"):
    api.adapt(backbone[0], 'lorra', bottleneck=8)


@pytest.mark.parametrize('kwargs', [{}, {'bottleneck': 8, 'reduction_factor': 4}])
def test_adapt_needs_exactly_one_size(backbone, kwargs):
  with pytest.raises(ValueError, match='exactly one of bottleneck'):
    api.adapt(backbone[0], 'houlsby', **kwargs)


class _Affine(nn.Module):
  """A 'wrap' adapter for tests: runs the module on s * x and returns -(its output) + 1."""

  @nn.compact
  def __call__(self, args, kwargs, *, deterministic=True):
    del deterministic
    s = self.param('s', nn.initializers.constant(2.0), ())
    return (s * args[0], *args[1:]), kwargs, lambda y: 1.0 - y


class _AffineConfig:

  def build(self, *, in_shape, out_shape, name, parent):
    assert in_shape == (3, 16) and out_shape is None
    return _Affine(name=name, parent=parent)


def test_wrap_rewrites_the_call_outermost():
  """'wrap' sees the call first and the result last; the module's own layers keep their paths."""
  x = jax.random.normal(jax.random.key(0), (3, 8))
  cfg = BottleneckConfig(bottleneck=2)
  adapted = api.adapt(TinyNet(), targets=[inject.Target('fc2', _AffineConfig(), 'wrap', 'w'),
                                          inject.Target('fc2', cfg, position='output')])
  variables = jax.jit(adapted.init)(jax.random.key(1), x)
  params = _perturb_adapters(variables['params'])
  assert sorted(flatten(params)) == [
      'fc1/bias', 'fc1/kernel', 'fc2/adapter/down/bias', 'fc2/adapter/down/kernel',
      'fc2/adapter/up/bias', 'fc2/adapter/up/kernel', 'fc2/bias', 'fc2/kernel', 'fc2/w/s']
  p = params
  h = nn.relu(x @ p['fc1']['kernel'] + p['fc1']['bias'])
  y = (2.0 * h) @ p['fc2']['kernel'] + p['fc2']['bias']
  a = p['fc2']['adapter']
  y = y + nn.relu(y @ a['down']['kernel'] + a['down']['bias']) @ a['up']['kernel'] + a['up']['bias']
  np.testing.assert_allclose(adapted.apply({'params': params}, x), 1.0 - y, rtol=1e-6, atol=1e-6)


class _ReturnsArgs(nn.Module):

  def __call__(self, args, kwargs, *, deterministic=True):
    return args, kwargs


class _BadWrapConfig:

  def build(self, *, in_shape, out_shape, name, parent):
    return _ReturnsArgs(name=name, parent=parent)


def test_wrap_adapter_must_return_args_kwargs_and_a_function():
  adapted = api.adapt(TinyNet(), targets=[inject.Target('fc2', _BadWrapConfig(), 'wrap')])
  with pytest.raises(TypeError, match=r"'wrap' adapter \(_ReturnsArgs on 'fc2'\) must return"):
    jax.eval_shape(adapted.init, jax.random.key(0), jnp.ones((1, 8)))


def _stack_layers(params, depth=2):
  flat = flatten(params)
  stacked = {k: v for k, v in flat.items() if 'encoderblock_' not in k}
  for key in {k.replace('encoderblock_0/', 'encoderblock/') for k in flat
              if 'encoderblock_0/' in k}:
    stacked[key] = jnp.stack([flat[key.replace('encoderblock/', f'encoderblock_{i}/')]
                              for i in range(depth)])
  return unflatten(stacked)


def test_adapter_drop_drops_whole_layers_per_call(backbone):
  """Every training call equals the model with the adapters of some subset of layers; each
  subset occurs; the key decides it (fold_in(seed, step) in the trainer); eval keeps them all."""
  model, bb_params = backbone
  x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  params = _perturb_adapters(api.init_with_pretrained(api.adapt(model, 'houlsby', bottleneck=8),
                                                      bb_params, jax.random.key(4), x))
  flat = flatten(params)
  subsets = {(0, 1): None, (0,): None, (1,): None, (): None}
  for kept in subsets:
    sub = unflatten({k: v for k, v in flat.items()
                     if '/adapter/' not in k or any(f'encoderblock_{i}/' in k for i in kept)})
    m = api.adapt(model, 'houlsby', bottleneck=8, layers=kept) if kept else model
    subsets[kept] = np.asarray(jax.jit(m.apply)({'params': sub}, x))
  assert min(np.abs(a - b).max() for i, a in enumerate(subsets.values())
             for b in list(subsets.values())[i + 1:]) > 1e-3

  def which(out):
    [kept] = [k for k, ref in subsets.items() if np.allclose(out, ref, rtol=1e-5, atol=1e-4)]
    return kept

  scan = api.adapt(vit.from_variant('mu/4', num_classes=10, scan=True), 'houlsby', bottleneck=8,
                   drop_rate=0.5)
  for adapted, p in ((api.adapt(model, 'houlsby', bottleneck=8, drop_rate=0.5), params),
                     (scan, _stack_layers(params))):
    run = jax.jit(lambda rng, p=p, m=adapted: m.apply({'params': p}, x, train=True,
                                                        rngs={'dropout': rng}))
    seen = [which(run(jax.random.fold_in(jax.random.key(0), step))) for step in range(24)]
    assert set(seen) == set(subsets), seen
    assert which(run(jax.random.fold_in(jax.random.key(0), 3))) == seen[3]
    np.testing.assert_allclose(adapted.apply({'params': p}, x), subsets[(0, 1)],
                               rtol=1e-5, atol=1e-4)


def test_adapter_drop_rejects_bad_rates_and_wrap_targets(backbone):
  model, _ = backbone
  with pytest.raises(ValueError, match=r'drop_rate \(AdapterDrop\) must be in \[0, 1\)'):
    jax.eval_shape(api.adapt(model, 'houlsby', bottleneck=8, drop_rate=1.0).init,
                   jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  adapted = inject.Adapted(TinyNet(), (inject.Target('fc2', _AffineConfig(), 'wrap'),),
                           drop_rate=0.5)
  x = jnp.ones((3, 8))
  v = jax.jit(adapted.init)(jax.random.key(0), x)
  with pytest.raises(ValueError, match="cannot drop the 'wrap' adapter on 'fc2'"):
    adapted.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)})


def test_adapter_drop_acts_on_lora(backbone):
  """AdapterDrop is the injection's, so weight-space methods (LoRA, at 'parallel') get it too."""
  model, bb_params = backbone
  x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  adapted = api.adapt(model, 'lora', rank=2, drop_rate=0.5)
  params = api.init_with_pretrained(adapted, bb_params, jax.random.key(4), x)
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(6), len(flat))
  params = unflatten({k: v + 0.3 * jax.random.normal(key, v.shape) if '/lora/' in k else v
                      for key, (k, v) in zip(keys, flat.items())})
  bare = unflatten({k: v for k, v in flat.items() if '/lora/' not in k})
  none = np.asarray(jax.jit(model.apply)({'params': bare}, x))
  every = np.asarray(jax.jit(adapted.apply)({'params': params}, x))
  run = jax.jit(lambda rng: adapted.apply({'params': params}, x, train=True,
                                          rngs={'dropout': rng}))
  kinds = set()
  for step in range(16):
    out = np.asarray(run(jax.random.fold_in(jax.random.key(0), step)))
    kinds.add('none' if np.allclose(out, none, rtol=1e-5, atol=1e-4) else
              'every' if np.allclose(out, every, rtol=1e-5, atol=1e-4) else 'some')
  assert kinds == {'none', 'every', 'some'} and not np.allclose(none, every, atol=1e-3)
