"""Weight-space methods (LoRA, ...): identity at init, training touches only the delta, merging
into the bare backbone and unmerging, nn.scan/remat, other layer kinds, CLIP's towers, errors."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cli_runner import run_main
from config_overrides import load_config
from vadapt import api, backbones, experiment, inject, merge, partition
from vadapt import checkpoint as ckpt_lib
from vadapt.adapters import BottleneckConfig
from vadapt.adapters.lora import LoRAConfig
from vadapt.models import clip, vit
from vadapt.pretrained.common import flatten, unflatten

ATT, MLP = 'MultiHeadDotProductAttention_0', 'MlpBlock_0'
CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'vit_b16_adapter.py')
# Merged outputs must match the adapted model within this relative error (f32).
MERGE_RTOL = 1e-6
DORA_IDENTITY_RTOL = 1e-6


def _golden(leaves, blocks=(0, 1)):
  return {f'Transformer/encoderblock_{i}/{m}/{leaf}': shape
          for i in blocks for m, m_leaves in leaves.items() for leaf, shape in m_leaves.items()}


# mu/4: width 32, 2 heads of 16, MLP 64, depth 2.
QKV_LORA4 = {'lora/a': (32, 4), 'lora/b': (4, 2, 16)}
QKV_DORA4 = {'dora/a': (32, 4), 'dora/b': (4, 2, 16), 'dora/magnitude': (2, 16)}
_SSF = lambda shape: {'ssf/scale': shape, 'ssf/shift': shape}
METHODS = {
    # method: (adapt() options, golden adapter leaves of the default placement)
    'lora': (dict(rank=4, alpha=8), _golden({f'{ATT}/query': QKV_LORA4,
                                             f'{ATT}/value': QKV_LORA4})),
    'dora': (dict(rank=4, alpha=8), _golden({f'{ATT}/query': QKV_DORA4,
                                             f'{ATT}/value': QKV_DORA4})),
    'ssf': ({}, _golden({'LayerNorm_0': _SSF((32,)), 'LayerNorm_1': _SSF((32,)),
                         f'{ATT}/query': _SSF((2, 16)), f'{ATT}/key': _SSF((2, 16)),
                         f'{ATT}/value': _SSF((2, 16)), f'{ATT}/out': _SSF((32,)),
                         f'{MLP}/Dense_0': _SSF((64,)), f'{MLP}/Dense_1': _SSF((32,))})),
    # Keys and values at their outputs, the MLP hidden at the input of Dense_1.
    'ia3': ({}, _golden({f'{ATT}/key': {'ia3/scale': (2, 16)},
                         f'{ATT}/value': {'ia3/scale': (2, 16)},
                         f'{MLP}/Dense_1': {'ia3/scale': (64,)}})),
}
# Every layer kind a method supports (DenseGeneral q/k/v and out, Dense, LayerNorm; inputs and
# outputs), for the merge tests.
KERNELS = ('query', 'key', 'value', 'out', 'fc1', 'fc2')
ALL_LAYERS = {
    'lora': dict(modules=KERNELS),
    'dora': dict(modules=KERNELS),
    'ssf': {},
    'ia3': dict(modules=KERNELS),
}


@pytest.fixture(scope='module')
def backbone():
  """mu/4 with 'pre-trained' weights: a random head, so gradients reach the adapters."""
  model = vit.from_variant('mu/4', num_classes=10)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), params['head']['kernel'].shape)
  return model, params


@pytest.fixture(scope='module')
def batch():
  images = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
  labels = jax.random.randint(jax.random.key(3), (8,), 0, 10)
  return images, labels


def _apply(model, params, x):
  return jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)


def _is_adapter(path):
  return any(f'/{n}/' in path for n in partition.ADAPTER_NAMES)


def _perturb(params, seed=0):
  """Trained-looking adapters: every adapter leaf moved off its initial value."""
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return unflatten({k: v + 0.1 * jax.random.normal(key, v.shape) if _is_adapter(k) else v
                    for key, (k, v) in zip(keys, flat.items())})


def _merge(model, params):
  return jax.jit(lambda p: merge.merge(model, p))(params)


def _unmerge(model, bare, adapters):
  return jax.jit(lambda b, a: merge.unmerge(model, b, a))(bare, adapters)


def _rel_err(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _train(model, params, batch, rules, steps=4):
  """Adam on the trainable labels, gradients over the delta alone; returns (params, losses)."""
  images, targets = batch
  labels = partition.label_tree(params, rules)
  delta, frozen = partition.split(params, labels)
  delta_labels, _ = partition.split(labels, labels)
  tx = partition.make_optimizer(delta_labels, {
      label: optax.adam(1e-2) for label in set(jax.tree.leaves(delta_labels))})
  opt_state = tx.init(delta)

  def loss_fn(p):
    logits = model.apply({'params': p}, images, train=True)
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
  return partition.merge(delta, frozen), losses


@pytest.mark.parametrize('method', sorted(METHODS))
def test_identity_at_init_training_and_frozen_leaves(method, backbone, batch):
  model, bb_params = backbone
  images, _ = batch
  options, golden = METHODS[method]
  adapted = api.adapt(model, method, **options)
  params = api.init_with_pretrained(adapted, bb_params, jax.random.key(4), images)
  assert {k: v.shape for k, v in flatten(params).items() if _is_adapter(k)} == golden
  got, want = _apply(adapted, params, images), _apply(model, bb_params, images)
  if method == 'dora':
    # m / ||W + sBA|| is 1 up to rounding: the magnitude m = ||W|| was computed by the init
    # program, the norm by this one (XLA may reduce in another order).
    assert _rel_err(got, want) < DORA_IDENTITY_RTOL
  else:
    np.testing.assert_array_equal(got, want)

  trained, losses = _train(adapted, params, batch, partition.default_rules(train_head=False))
  assert losses[-1] < losses[0], losses
  before, after = flatten(params), flatten(trained)
  for path, value in before.items():
    if not _is_adapter(path):
      np.testing.assert_array_equal(after[path], value, err_msg=path)
  assert all(not np.array_equal(after[p], before[p]) for p in golden)


@pytest.mark.parametrize('method', sorted(ALL_LAYERS))
def test_merge_matches_adapted_model_and_unmerge_restores(method, backbone, batch):
  model, bb_params = backbone
  images, _ = batch
  adapted = api.adapt(model, method, **{**METHODS[method][0], **ALL_LAYERS[method]})
  params = _perturb(api.init_with_pretrained(adapted, bb_params, jax.random.key(4), images))
  want = _apply(adapted, params, images)
  assert _rel_err(want, _apply(model, bb_params, images)) > 1e-2  # The adapters do something.

  bare = _merge(adapted, params)
  assert jax.tree.map(jnp.shape, bare) == jax.tree.map(jnp.shape, bb_params)
  assert _rel_err(_apply(model, bare, images), want) < MERGE_RTOL

  adapters = merge.adapter_params(adapted, params)
  if method == 'dora':
    with pytest.raises(ValueError, match='DoRA cannot be unmerged'):
      merge.unmerge(adapted, bare, adapters)
    return
  restored = _unmerge(adapted, bare, adapters)
  flat_restored, flat_params, flat_bare = flatten(restored), flatten(params), flatten(bare)
  assert set(flat_restored) == set(flat_params)
  for path, value in flat_params.items():
    if _is_adapter(path) or np.array_equal(flat_bare[path], value):
      np.testing.assert_array_equal(flat_restored[path], value, err_msg=path)
    else:  # Undoing the fold in f32: within two roundings of the original or merged value.
      big = np.maximum(np.abs(np.asarray(value)), np.abs(np.asarray(flat_bare[path])))
      assert np.all(np.abs(flat_restored[path] - value) <= 2 * np.spacing(big)), path


def test_bitfit_trains_biases_and_head_only(backbone, batch):
  model, bb_params = backbone
  adapted = api.adapt(model, 'bitfit')
  params = api.init_with_pretrained(adapted, bb_params, jax.random.key(4), batch[0])
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, bb_params)
  trained, losses = _train(adapted, params, batch, partition.bitfit_rules(train_head=True))
  assert losses[-1] < losses[0], losses
  before, after = flatten(params), flatten(trained)
  changed = {k for k in before if not np.array_equal(after[k], before[k])}
  assert changed and all(k.endswith('/bias') or k.startswith('head/') for k in changed)
  assert 'Transformer/encoderblock_1/LayerNorm_0/bias' in changed
  with pytest.raises(ValueError, match=r"Options \['rank'\] do not apply to 'bitfit'"):
    api.adapt(model, 'bitfit', rank=4)


def test_merge_and_unmerge_refuse_wrong_input(backbone, batch):
  model, bb_params = backbone
  images, _ = batch
  adapted = api.adapt(model, 'lora', rank=2)
  params = api.init_with_pretrained(adapted, bb_params, jax.random.key(4), images)
  bare = merge.merge(adapted, params)
  with pytest.raises(ValueError, match='Nothing to merge.*merged already'):
    merge.merge(adapted, bare)
  with pytest.raises(ValueError, match='never merged'):
    merge.unmerge(adapted, params, params)
  with pytest.raises(ValueError, match='holds no adapter parameters'):
    merge.unmerge(adapted, bare, {})
  houlsby = api.adapt(model, 'houlsby', bottleneck=4)
  with pytest.raises(ValueError, match=r"Only weight-space adapters.*\['BottleneckConfig'\]"):
    merge.merge(houlsby, api.init_with_pretrained(houlsby, bb_params, jax.random.key(4), images))
  with pytest.raises(TypeError, match='inject.Adapted'):
    merge.merge(model, params)


def test_lora_bad_options(backbone):
  model, _ = backbone
  x = jnp.zeros((1, 32, 32, 3))
  for rank in (0, -1, 2.5):
    with pytest.raises(ValueError, match='rank must be a positive integer'):
      api.adapt(model, 'lora', rank=rank)
  with pytest.raises(ValueError, match=r"rank 33 is larger than the layer's width.*\(32, 2, 16\)"
                                       r".*rank <= 32"):
    jax.eval_shape(api.adapt(model, 'lora', rank=33).init, jax.random.key(0), x)
  with pytest.raises(TypeError, match=r"LoRA needs a layer with a kernel.*'Transformer/"
                                      r"encoderblock_0/LayerNorm_0' is a LayerNorm"):
    jax.eval_shape(api.adapt(model, 'lora', modules=('norm1',)).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"LoRAConfig goes at position parallel; found "
                                       r"position='output'"):
    inject.Target('.*/query', LoRAConfig(rank=2), position='output')
  with pytest.raises(ValueError, match=r"Unknown block layers \['qkv'\]"):
    api.adapt(model, 'lora', modules=('qkv',))
  with pytest.raises(ValueError, match=r"Options \['bottleneck'\] do not apply to method 'lora'"):
    api.adapt(model, 'lora', bottleneck=8)
  with pytest.raises(ValueError, match=r"Options \['rank'\] apply to the weight-space methods"):
    api.adapt(model, 'houlsby', bottleneck=8, rank=4)


def test_scan_remat_and_loop_agree_and_merge(backbone):
  model, bb_params = backbone
  x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  loop = api.adapt(model, 'lora', rank=4, modules=('query', 'out', 'fc2'))
  params = _perturb(api.init_with_pretrained(loop, bb_params, jax.random.key(4), x))
  flat = flatten(params)
  stacked = {k: v for k, v in flat.items() if 'encoderblock_' not in k}
  block0 = [k for k in flat if 'encoderblock_0/' in k]
  for key in {k.replace('encoderblock_0/', 'encoderblock/') for k in block0}:
    stacked[key] = jnp.stack([flat[key.replace('encoderblock/', f'encoderblock_{i}/')]
                              for i in range(2)])
  stacked = unflatten(stacked)
  scan_model = vit.from_variant('mu/4', num_classes=10, scan=True, remat=True)
  scan = api.adapt(scan_model, 'lora', rank=4, modules=('query', 'out', 'fc2'))
  assert jax.tree.map(jnp.shape, jax.eval_shape(scan.init, jax.random.key(0), x)['params']) == (
      jax.tree.map(jnp.shape, stacked))
  want = _apply(loop, params, x)
  np.testing.assert_allclose(_apply(scan, stacked, x), want, rtol=1e-5, atol=1e-5)
  # Merging works on the stacked layout too (leading layer axis on every leaf).
  assert _rel_err(_apply(scan_model, _merge(scan, stacked), x), want) < 1e-5


class FusedNet(nn.Module):
  """A compact model with a strided conv stem and a fused qkv projection (as in DINOv2/timm)."""

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    del train
    x = nn.Conv(8, (3, 3), strides=(2, 2), padding='SAME', name='stem')(x)
    x = x.reshape(x.shape[0], -1, 8)
    q, k, v = jnp.split(nn.Dense(24, name='qkv')(x), 3, axis=-1)
    attn = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(8), axis=-1)
    return nn.Dense(5, name='proj')((attn @ v).mean(axis=1))


def test_lora_on_conv_and_fused_qkv():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  net = FusedNet()
  bb = jax.jit(net.init)(jax.random.key(1), x)['params']
  adapted = api.adapt(net, 'lora', rank=2, alpha=4, targets=['stem', 'qkv'])
  params = api.init_with_pretrained(adapted, bb, jax.random.key(2), x)
  assert {k: v.shape for k, v in flatten(params).items() if '/lora/' in k} == {
      'stem/lora/a': (3, 3, 3, 2), 'stem/lora/b': (2, 8),
      'qkv/lora/a': (8, 2), 'qkv/lora/b': (2, 24)}
  np.testing.assert_array_equal(_apply(adapted, params, x), _apply(net, bb, x))
  params = _perturb(params)
  want = _apply(adapted, params, x)
  assert _rel_err(want, _apply(net, bb, x)) > 1e-2
  assert _rel_err(_apply(net, _merge(adapted, params), x), want) < MERGE_RTOL


def test_lora_on_both_clip_towers():
  model = clip.from_config('tiny')
  images, tokens = clip.dummy_inputs(model, batch=2)
  images = jax.random.normal(jax.random.key(3), images.shape)
  bb = jax.jit(model.init)(jax.random.key(0), images, tokens)['params']
  adapted = api.adapt(model, 'lora', rank=2)
  params = api.init_with_pretrained(adapted, bb, jax.random.key(1), images, tokens)
  towers = {k.split('/')[0] for k in flatten(params) if '/lora/' in k}
  assert towers == {'vision', 'text'}
  run = lambda m, p: jax.jit(lambda p: m.apply({'params': p}, images, tokens))(p)
  for got, want in zip(run(adapted, params), run(model, bb)):
    np.testing.assert_array_equal(got, want)
  params = _perturb(params)
  for got, want in zip(run(model, _merge(adapted, params)), run(adapted, params)):
    assert _rel_err(got, want) < 1e-5


def test_unmergeable_target_in_custom_list_is_named(backbone):
  model, _ = backbone
  targets = [inject.Target(f'.*/{ATT}/query', LoRAConfig(rank=2), position='parallel',
                           name='lora'),
             inject.Target(f'.*/{MLP}', BottleneckConfig(bottleneck=2))]
  adapted = api.adapt(model, targets=targets)
  with pytest.raises(ValueError, match='MlpBlock_0'):
    merge.merge(adapted, {})


# A CLI run compiles a train and an eval step: LoRA and BitFit (the two code paths: adapter
# modules, label rules only) run in the fast suite, the other weight-space methods in the slow one.
@pytest.mark.parametrize('method', ['lora', 'bitfit'] + [
    pytest.param(m, marks=pytest.mark.slow) for m in ('dora', 'ssf', 'ia3')])
def test_cli_trains_exports_and_reloads(method, tmp_path):
  """`--config.adapter.method=...` on the :test config; the exported file reloads onto the
  backbone and (weight-space methods) merges into it."""
  workdir = str(tmp_path / 'work')
  run_main([f'--config={CONFIG}:test', f'--workdir={workdir}', '--config.mesh.num_devices=1',
            f'--config.adapter.method={method}', '--config.adapter.rank=2',
            '--config.total_steps=2'])
  flat, meta = ckpt_lib.read_adapter(os.path.join(workdir, 'adapter.safetensors'))
  assert meta['adapter']['method'] == method
  if method == 'bitfit':
    assert flat and all(k.endswith('/bias') or k.startswith('head/') for k in flat)
  else:
    assert {k for k in flat if not k.startswith('head/')} == {
        k for k in flat if f'/{method}/' in k} != set()
  if method in ('lora', 'dora'):
    assert meta['adapter']['rank'] == 2
  config = load_config(**{'adapter.method': method, 'adapter.rank': 2})
  model, backbone = experiment.build_model(config, 10)
  backbone_params = backbones.load_params(config.backbone, backbone,
                                          rng=jax.random.fold_in(jax.random.PRNGKey(0), 1))
  params = ckpt_lib.load_adapter(os.path.join(workdir, 'adapter.safetensors'), model,
                                 backbone_params)
  images = jax.random.normal(jax.random.key(7), (4, 32, 32, 3))
  adapted = _apply(model, params, images)
  if method != 'bitfit':
    assert _rel_err(_apply(backbone, _merge(model, params), images), adapted) < 1e-5


@pytest.mark.parametrize('method', ['lora', 'ssf'])
def test_on_a_dinov2_style_vit(method):
  """LayerScale, register tokens and a SwiGLU MLP (DINOv2 ViT-g's options) on the tiny ViT."""
  model = vit.from_variant('mu/4', num_classes=10, layer_scale_init=0.1, num_registers=2,
                           gated_mlp=True, activation='silu', classifier='token_gap')
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  bb = jax.jit(model.init)(jax.random.key(1), x)['params']
  bb['head']['kernel'] = jax.random.normal(jax.random.key(3), bb['head']['kernel'].shape)
  adapted = api.adapt(model, method, **({'modules': KERNELS} if method == 'lora' else {}))
  params = api.init_with_pretrained(adapted, bb, jax.random.key(2), x)
  np.testing.assert_array_equal(_apply(adapted, params, x), _apply(model, bb, x))
  params = _perturb(params)
  want = _apply(adapted, params, x)
  assert _rel_err(_apply(model, _merge(adapted, params), x), want) < MERGE_RTOL
