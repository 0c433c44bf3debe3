"""Named adapters on one backbone: paths, training by name, selection as data (no re-trace),
mixed batches, Parallel with shared lower blocks, Stack/Average/Fuse, adding and removing.

Compiles dominate the runtime: each model gets one jitted by-index function, shared by the tests;
"bit-identical before and after" compares two runs of that same compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vadapt import api, inject, multi, partition, placements
from vadapt.adapters import BottleneckConfig
from vadapt.composition import Average, Fuse, Parallel, Stack
from vadapt.models import vit
from vadapt.pretrained.common import flatten, unflatten

ATT, MLP = 'MultiHeadDotProductAttention_0', 'MlpBlock_0'
NAMES = ('a', 'b', 'c')
WIDTHS = {'a': 3, 'b': 5, 'c': 5}


def _jit(model, **call):
  """model.apply with a static selection, jitted (eager ViT calls are slow)."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x, **call))


def _by_index(model):
  return jax.jit(lambda p, x, i: model.apply({'params': p}, x, adapter=i))


def _perturb(model, params, seed=0):
  """Random adapters and heads (zero-initialised up-projections and heads hide mistakes)."""
  rng = np.random.default_rng(seed)
  return unflatten({k: np.asarray(v) + 0.2 * rng.normal(size=v.shape).astype(np.float32)
                    if multi.owner(k, model.names()) else v for k, v in flatten(params).items()})


@pytest.fixture(scope='module')
def setup():
  """mu/4 features backbone; a and c share a structure (houlsby, 8), b is pfeiffer 4."""
  backbone = vit.from_variant('mu/4', num_classes=None)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  bb_params = jax.jit(backbone.init)(jax.random.key(1), x)['params']
  model = multi.adapt(backbone, [
      multi.named(backbone, 'a', 'houlsby', bottleneck=8, num_classes=3),
      multi.named(backbone, 'b', 'pfeiffer', bottleneck=4, num_classes=5),
      multi.named(backbone, 'c', 'houlsby', bottleneck=8, num_classes=5)])
  params = _perturb(model, api.init_with_pretrained(model, bb_params, jax.random.key(2), x))
  alone = {n: _jit(model, adapter=n)(params, x) for n in NAMES}
  return model, params, x, alone, _by_index(model)


def test_paths_identity_at_init_and_mixed_batches_without_heads():
  backbone = vit.from_variant('mu/4', num_classes=10)
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  bb_params = jax.jit(backbone.init)(jax.random.key(1), x)['params']
  bb_params['head']['kernel'] = jax.random.normal(jax.random.key(3), (32, 10))
  model = multi.adapt(backbone, [multi.named(backbone, 'a', 'houlsby', bottleneck=8),
                                 multi.named(backbone, 'b', 'pfeiffer', bottleneck=4)])
  params = api.init_with_pretrained(model, bb_params, jax.random.key(2), x)
  adapters = sorted({k.rpartition('/')[0].rpartition('/')[0] for k in flatten(params)
                     if multi.owner(k, ['a', 'b'])})
  assert adapters == sorted(f'Transformer/encoderblock_{i}/{m}/{n}' for i in (0, 1)
                            for m, n in ((ATT, 'a'), (MLP, 'a'), (MLP, 'b')))
  assert multi.backbone_params(model, params).keys() == bb_params.keys()
  bare = jax.jit(backbone.apply)({'params': bb_params}, x)
  # Zero up-projections add exactly nothing, in one compiled program for every index.
  run = _by_index(model)
  none = run(params, x, jnp.int32(-1))
  np.testing.assert_allclose(none, bare, rtol=1e-5, atol=1e-5)  # Another XLA program.
  for i in (0, 1):
    np.testing.assert_array_equal(run(params, x, jnp.int32(i)), none)
  # A mixed batch may leave examples on the bare backbone (-1).
  params = _perturb(model, params)
  out = run(params, x, model.indices(['b', None, 'a']))
  np.testing.assert_allclose(out[1], bare[1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out[0], bare[0]) and not np.allclose(out[2], bare[2])


def _train(model, params, x, rules, steps=3, **call):
  labels = partition.label_tree(params, rules)
  delta, frozen = partition.split(params, labels)
  tx = partition.make_optimizer(partition.split(labels, labels)[0], {
      k: optax.adam(3e-2) for k in ('adapter', 'head', 'fusion')})
  opt_state = tx.init(delta)
  targets = jnp.arange(x.shape[0]) % 3

  def loss_fn(p):
    logits = model.apply({'params': p}, x, **call)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(delta, opt_state):
    loss, grads = partition.value_and_grad_delta(loss_fn)(delta, frozen)
    updates, opt_state = tx.update(grads, opt_state, delta)
    return optax.apply_updates(delta, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    delta, opt_state, loss = step(delta, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  return partition.merge(delta, frozen)


def test_training_one_adapter_leaves_the_others_bit_identical(setup):
  model, params, x, _, run = setup
  trained = _train(model, params, x, multi.rules(model, ['b']), adapter='b')
  before, after = flatten(params), flatten(trained)
  changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert changed and all(multi.owner(k, NAMES) == 'b' for k in changed)
  assert any(k.startswith('heads/b/') for k in changed)
  for n in ('a', 'c'):
    i = jnp.int32(model.index(n))
    np.testing.assert_array_equal(run(trained, x, i), run(params, x, i))
  assert not np.array_equal(run(trained, x, jnp.int32(1)), run(params, x, jnp.int32(1)))


def test_switching_by_index_does_not_retrace(setup):
  model, params, x, alone, _ = setup
  traces = []

  @jax.jit
  def run(params, x, index):
    traces.append(1)
    return model.apply({'params': params}, x, adapter=index)

  for _ in range(2):
    for n in NAMES:
      out = run(params, x, jnp.int32(model.index(n)))
      w = WIDTHS[n]
      np.testing.assert_allclose(out[:, :w], alone[n], rtol=1e-6, atol=1e-6)
      assert np.all(out[:, w:] == -np.inf)  # Narrower heads are padded.
  assert len(traces) == 1 and run._cache_size() == 1


def test_mixed_batch_equals_each_example_alone(setup):
  model, params, x, alone, run = setup
  names = ['c', 'a', 'b', 'c']
  out = run(params, x, model.indices(names))
  for row, n in enumerate(names):
    np.testing.assert_allclose(out[row, :WIDTHS[n]], alone[n][row], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(model._selection(names), model.indices(names))


def test_parallel_runs_tasks_in_one_pass_sharing_the_lower_blocks(setup):
  model, params, x, alone, _ = setup
  outs = _jit(model, adapter=Parallel('a', 'b', 'c'))(params, x)
  for n, out in zip(NAMES, outs):
    np.testing.assert_allclose(out, alone[n], rtol=1e-6, atol=1e-6)
  dropped = _jit(model, adapter=Parallel('a', 'c'), drop_lowest=1)(params, x)
  for n, out in zip('ac', dropped):
    np.testing.assert_allclose(out, _jit(model, adapter=n, drop_lowest=1)(params, x),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(out, alone[n])
  # The batch is replicated at the first block that still adapts; the blocks below run once.
  point = lambda k: model._replication_point('__call__', Parallel('a', 'c'), (x,), {}, k)
  assert point(0) == 'Transformer/encoderblock_0'
  assert point(1) == 'Transformer/encoderblock_1'


def test_stack_and_average(setup):
  model, params, x, alone, _ = setup
  apply = lambda **kw: _jit(model, **kw)(params, x)
  np.testing.assert_array_equal(apply(adapter=Average('a', 'c', weights=(1, 0)), head='a'),
                                alone['a'])
  # Stack('a', 'c'): at every module c reads what a produced (the order of plain targets).
  cfg = BottleneckConfig(bottleneck=8)
  reference = inject.Adapted(model.backbone, tuple(
      inject.Target(t.pattern, t.adapter, t.position, name=n)
      for n in 'ac' for t in placements.houlsby(cfg)))
  features = jax.jit(reference.apply)({'params': {
      k: v for k, v in params.items() if k != 'heads'}}, x)
  head = params['heads']['c']
  stack = apply(adapter=Stack('a', 'c'))
  np.testing.assert_allclose(stack, features @ head['kernel'] + head['bias'], rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(apply(adapter=Stack('c', 'a'), head='c'), stack)


def test_fusion_training_leaves_task_adapters_bit_identical(setup):
  model, params, x, _, _ = setup
  fused = model.with_adapter(multi.NamedAdapter('f', num_classes=3))
  fuse = Fuse('a', 'c')
  params_f = multi.init_missing(fused, params, jax.random.key(5), x, adapter=fuse, head='f')
  fusion = {k: v for k, v in flatten(params_f).items() if '/fusion_a_c/' in k}
  assert len(fusion) == 4 * 5  # 2 blocks x {attention, MLP} x query, key (2 each) + value.
  np.testing.assert_array_equal(
      fusion[f'Transformer/encoderblock_0/{MLP}/fusion_a_c/value/kernel'], np.eye(32))
  trained = _train(fused, params_f, x, multi.rules(fused, ['f'], fusions=['fusion_a_c']),
                   adapter=fuse, head='f')
  before, after = flatten(params_f), flatten(trained)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all('/fusion_a_c/' in k or k.startswith('heads/f/') for k in changed)
  assert not [k for k in flatten(multi.backbone_params(fused, trained)) if 'fusion' in k]
  task_outputs = jax.jit(lambda p: [fused.apply({'params': p}, x, adapter=n) for n in NAMES])
  for a, b in zip(task_outputs(trained), task_outputs(params_f)):
    np.testing.assert_array_equal(a, b)


def test_adding_and_removing_adapters_keeps_the_others(setup):
  model, params, x, alone, run = setup
  bigger = model.with_adapter(multi.named(model.backbone, 'd', 'parallel', bottleneck=4,
                                          num_classes=2))
  jax.eval_shape(lambda p: bigger.apply({'params': p}, x, adapter='a'), params)  # d unused.
  with pytest.raises(ValueError, match=r"Adapter 'd' has no parameters on .*init_missing"):
    jax.eval_shape(lambda p: bigger.apply({'params': p}, x, adapter=jnp.int32(0)), params)
  grown = multi.init_missing(bigger, params, jax.random.key(7), x)
  assert all(leaf is flatten(params)[k] for k, leaf in flatten(grown).items()
             if k in flatten(params))
  assert set(flatten(grown)) - set(flatten(params)) == set(
      multi.adapter_params(bigger, grown, 'd'))
  # Continual learning: an earlier task evaluates exactly as before the new one was added.
  np.testing.assert_array_equal(_jit(bigger, adapter='a')(grown, x), alone['a'])
  shrunk = multi.remove_params(bigger, grown, 'd')
  assert flatten(shrunk).keys() == flatten(params).keys()
  assert bigger.without('d').names() == NAMES


def test_bad_input(setup):
  model, params, x, _, _ = setup
  backbone = model.backbone
  apply = lambda **kw: jax.eval_shape(lambda p: model.apply({'params': p}, x, **kw), params)
  with pytest.raises(ValueError, match=r"Duplicate adapter names \['a'\]"):
    multi.adapt(backbone, [multi.named(backbone, 'a', 'pfeiffer', bottleneck=2)] * 2)
  with pytest.raises(ValueError, match=r"Adapter names are letters, digits"):
    multi.named(backbone, 'a/b', 'pfeiffer', bottleneck=2)
  with pytest.raises(KeyError, match=r"No adapter named 'z' is loaded; loaded: \['a', 'b', 'c'\]"):
    apply(adapter='z')
  with pytest.raises(KeyError, match="No adapter named 'z'"):
    model.indices(['a', 'z'])
  with pytest.raises(KeyError, match="No adapter named 'z'"):
    apply(adapter=Stack('a', 'z'))
  with pytest.raises(ValueError, match=r'indices \[3\] are out of range'):
    apply(adapter=np.array([0, 3, 1, 1]))
  with pytest.raises(TypeError, match='integer indices'):
    apply(adapter=jnp.float32(0))
  with pytest.raises(ValueError, match='names an adapter more than once'):
    Stack('a', 'a')
  with pytest.raises(ValueError, match='Fuse needs at least two adapters'):
    Fuse('a')
  with pytest.raises(ValueError, match='Fuse names start with "fusion"'):
    Fuse('a', 'c', name='mix')
  with pytest.raises(ValueError, match='pass head='):
    apply(adapter=Average('a', 'c'))
  with pytest.raises(ValueError, match=r"Fuse\('a', 'b'\): \['b'\] have no adapter on "
                                       r"'Transformer/encoderblock_0/Multi.* where \['a'\] do"):
    apply(adapter=Fuse('a', 'b'), head='b')
  clash = multi.adapt(backbone, [multi.named(backbone, 'o', 'pfeiffer', bottleneck=2),
                                 multi.named(backbone, 'p', 'parallel', bottleneck=2)])
  clash_params = jax.eval_shape(clash.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"Stack\('o', 'p'\) cannot chain 'p'.*'parallel'"):
    jax.eval_shape(lambda v: clash.apply(v, x, adapter=Stack('o', 'p')), clash_params)
  with pytest.raises(ValueError, match=r"different positions on .*'o': 'output', 'p': 'parall"):
    jax.eval_shape(lambda v: clash.apply(v, x, adapter=Average('o', 'p')), clash_params)
  mixed = model.with_adapter(multi.named(backbone, 'nohead', 'pfeiffer', bottleneck=2))
  mixed_params = jax.eval_shape(mixed.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"every adapter to have a head or none; \['nohead'\]"):
    jax.eval_shape(lambda v: mixed.apply(v, x, adapter=jnp.int32(0)), mixed_params)
  named_like_module = multi.adapt(backbone, [multi.named(backbone, 'Transformer', 'pfeiffer',
                                                         bottleneck=2)])
  with pytest.raises(ValueError, match=r"\['Transformer'\] are also module names"):
    jax.eval_shape(named_like_module.init, jax.random.key(0), x)


def test_scan_model_equals_the_unrolled_one_with_parallel_and_drop_lowest():
  """Under nn.scan every block is one module: the lowest layers' adapters are dropped by the
  layer index the scan passes as data, and Parallel replicates the input."""
  from vadapt.pretrained.vit import stack_layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))

  def build(scan):
    backbone = vit.from_variant('mu/4', num_classes=None, num_layers=3, scan=scan)
    return multi.adapt(backbone, [
        multi.named(backbone, 'a', 'houlsby', bottleneck=8, num_classes=3),
        multi.named(backbone, 'b', 'pfeiffer', bottleneck=4, num_classes=5),
        multi.named(backbone, 'c', 'lora', rank=2, num_classes=5)])

  loop, scan = build(False), build(True)
  params = _perturb(loop, jax.jit(loop.init)(jax.random.key(1), x)['params'])
  stacked = unflatten(stack_layers(flatten(params)))
  assert flatten(stacked).keys() == flatten(
      jax.eval_shape(scan.init, jax.random.key(1), x)['params']).keys()
  for call in (dict(adapter=Parallel('a', 'b', 'c')),
               dict(adapter=Parallel('a', 'b', 'c'), drop_lowest=1),
               dict(adapter=np.asarray([0, 1, 2]), drop_lowest=2),
               dict(adapter='b', drop_lowest=1)):
    got = jax.jit(lambda p, call=call: scan.apply({'params': p}, x, **call))(stacked)
    want = jax.jit(lambda p, call=call: loop.apply({'params': p}, x, **call))(params)
    full = jax.jit(lambda p, call=call: loop.apply({'params': p}, x, **{**call,
                                                                       'drop_lowest': 0}))(params)
    for g, w, f in zip(*(jax.tree.leaves(t) for t in (got, want, full))):
      finite = np.isfinite(w)  # Heads narrower than the widest are padded with -inf.
      np.testing.assert_array_equal(np.isfinite(g), finite)
      np.testing.assert_allclose(np.asarray(g)[finite], np.asarray(w)[finite], rtol=1e-6,
                                 atol=1e-6, err_msg=str(call))
      if call.get('drop_lowest'):
        assert not np.allclose(np.asarray(w)[finite], np.asarray(f)[finite])
