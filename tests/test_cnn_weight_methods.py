"""LoRA, DoRA and BitFit on ResNet and EfficientNet-Lite by their default placements: which
convolutions are adapted, identity at init, merging, training from the config, and the methods
that have no place on a CNN. (Forward parity with peft's LoRA on Conv2d: test_peft_parity.py.)"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cli_runner import run_main
from vadapt import api, experiment, merge, partition, placements, train
from vadapt.models import efficientnet, resnet
from vadapt.pretrained.common import flatten, unflatten

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'cnn_adapter.py')
TINY = {
    'efficientnet': lambda: efficientnet.EfficientNetLite(width=0.25, depth=0.3, num_classes=5),
    'resnet': lambda: resnet.ResNet(stage_sizes=(1, 1, 1, 1), block_cls=resnet.ResNetBlock,
                                    num_classes=5, num_filters=4, freeze_batch_norm=True),
    'resnet_bottleneck': lambda: resnet.ResNet(stage_sizes=(1, 1, 1, 1), num_classes=5,
                                               block_cls=resnet.BottleneckResNetBlock,
                                               num_filters=4, freeze_batch_norm=True),
}
X = jax.random.normal(jax.random.key(0), (4, 33, 33, 3))


def _variables(model, seed=0):
  """Random weights and non-trivial BatchNorm statistics, drawn on the host."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), X)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if str(path[-1].key) in ('var', 'scale'):
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if str(path[-1].key) == 'kernel' else 0.2
    return (rng.standard_normal(s.shape) * scale).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _init(adapted, variables):
  return api.init_with_pretrained(adapted, variables['params'], jax.random.key(1), X,
                                  backbone_state={'batch_stats': variables['batch_stats']})


@pytest.mark.parametrize('backbone', sorted(TINY))
def test_lora_goes_on_every_dense_conv_of_every_block(backbone):
  model = TINY[backbone]()
  bare = flatten(jax.eval_shape(model.init, jax.random.key(0), X)['params'])
  adapted = flatten(jax.eval_shape(api.adapt(model, 'lora', rank=2).init, jax.random.key(0),
                                   X)['params'])
  lora = {k[:-len('/lora/a')] for k in adapted if k.endswith('/lora/a')}
  convs = {k[:-len('/kernel')] for k in bare if k.endswith('/kernel')
           and k.split('/')[0].startswith(('blocks_', 'ResNetBlock_', 'BottleneckResNetBlock_'))}
  # Every convolution inside a block but the depthwise ones; not the stem, head conv or head.
  assert lora == {c for c in convs if not c.endswith('depthwise_conv')}
  assert any(c.endswith('conv_proj' if 'resnet' in backbone else 'expand_conv') for c in lora)
  for layer in lora:  # peft's Conv2d LoRA: A has the conv's kernel, B is a 1x1 conv.
    kh, kw, c_in, c_out = bare[f'{layer}/kernel'].shape
    assert adapted[f'{layer}/lora/a'].shape == (kh, kw, c_in, 2)
    assert adapted[f'{layer}/lora/b'].shape == (2, c_out)
  if backbone == 'efficientnet':
    assert any(c.endswith('depthwise_conv') for c in convs)
    # Subsets by name and by block.
    only = flatten(jax.eval_shape(api.adapt(model, 'lora', rank=2, modules=['project_conv'],
                                            layers=[1, 2]).init, jax.random.key(0), X)['params'])
    assert sorted(k for k in only if k.endswith('/lora/a')) == [
        'blocks_1/project_conv/lora/a', 'blocks_2/project_conv/lora/a']


def _perturb(params, method):
  """Trained-looking adapters: every leaf of `method`'s adapters moved off its initial value."""
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(2), len(flat))
  return unflatten({k: v + 0.1 * jax.random.normal(key, v.shape) if f'/{method}/' in k else v
                    for key, (k, v) in zip(keys, flat.items())})


@pytest.mark.parametrize('backbone,method', [('resnet', 'dora'), ('resnet_bottleneck', 'lora')])
def test_identity_at_init_and_merge(backbone, method):
  model = TINY[backbone]()
  variables = _variables(model)
  adapted = api.adapt(model, method, rank=2, alpha=4)
  init = _init(adapted, variables)
  jax.tree.map(np.testing.assert_array_equal, init['batch_stats'], variables['batch_stats'])

  @jax.jit
  def outputs(variables, init):
    """Bare, adapted at init, adapted with trained-looking adapters, and those merged."""
    params = _perturb(init['params'], method)
    merged = {**init, 'params': merge.merge(adapted, params)}
    return (model.apply(variables, X), adapted.apply(init, X),
            adapted.apply({**init, 'params': params}, X), model.apply(merged, X))

  bare, ours, moved, merged = outputs(variables, init)
  rel = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
  if method == 'lora':
    np.testing.assert_array_equal(ours, bare)
  else:  # DoRA's magnitude and forward norm are separately compiled reductions.
    assert rel(ours, bare) <= 1e-6
  # Folded into the convolutions, the adapters leave the bare CNN computing the same.
  assert rel(moved, bare) > 1e-2
  assert rel(merged, moved) <= 1e-6


def _train(model, variables, rules, steps=2):
  """A few steps of the trainer's own step; returns (start, end) params and the losses."""
  tree = partition.from_variables(variables)
  labels = partition.label_tree(tree, [(r'^batch_stats/', 'frozen')] + rules)
  delta, frozen = partition.split(tree, labels)
  delta_labels, _ = partition.split(labels, labels)
  tx = partition.make_optimizer(delta_labels, {
      label: optax.adam(3e-2) for label in set(jax.tree.leaves(delta_labels))})
  step = jax.jit(train.make_train_step(model, tx, optax.constant_schedule(3e-2), num_classes=5,
                                       label_smoothing=0.0, seed=0))
  batch = {'image': X, 'label': jnp.array([0, 1, 2, 3])}
  opt_state, losses, new = tx.init(delta), [], delta
  for i in range(steps):
    new, opt_state, metrics = step(new, opt_state, frozen, batch, i)
    losses.append(float(metrics['loss']))
  return flatten(tree), flatten(partition.merge(new, frozen)), losses


def test_lora_and_bitfit_train_only_their_parameters():
  model = TINY['resnet']()
  variables = _variables(model)
  variables['params']['head']['kernel'] *= 20  # A head that passes gradients on.
  adapted = api.adapt(model, 'lora', rank=2)
  before, after, losses = _train(adapted, _init(adapted, variables),
                                 partition.default_rules(train_head=False))
  assert losses[-1] < losses[0], losses
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all('/lora/' in k for k in changed)
  assert 'ResNetBlock_0/Conv_0/lora/b' in changed

  bitfit = api.adapt(model, 'bitfit')
  before, after, losses = _train(bitfit, variables, partition.bitfit_rules(train_head=True))
  assert losses[-1] < losses[0], losses
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  # A CNN's biases are its BatchNorm shifts (the convolutions have none), plus the head.
  biases = {k for k in before if k.endswith('/bias') and not k.startswith('head/')}
  assert biases and all('BatchNorm' in k or 'bn_' in k or 'norm_proj' in k for k in biases)
  assert changed == biases | {'head/kernel', 'head/bias'}


@pytest.mark.parametrize('model,method', [('efficientnet_lite', 'lora'), ('resnet', 'dora'),
                                          ('resnet', 'bitfit')])
def test_config_builds_the_cnn_method(model, method):
  """What the CLI builds from configs/cnn_adapter.py: the model, labels and trainable counts."""
  from configs import cnn_adapter  # pylint: disable=g-import-not-at-top
  config = cnn_adapter.get_config(f'test,model={model},method={method}')
  spec = experiment.adapter_spec(config)
  assert spec['method'] == method and (method == 'bitfit' or spec['rank'] == 8)
  adapted, backbone = experiment.build_model(config, 10)
  x = jnp.zeros((1, 32, 32, 3))
  params = flatten(jax.eval_shape(adapted.init, jax.random.key(0), x)['params'])
  counts = partition.count(params, partition.label_tree(params, experiment.label_rules(config)))
  head = 10 * (1 + flatten(jax.eval_shape(backbone.init, jax.random.key(0), x)['params'])[
      'head/kernel'].shape[0])
  if method == 'bitfit':
    assert set(counts) == {'bias', 'head', 'frozen'}
    assert counts['bias'] == sum(int(np.prod(v.shape)) for k, v in params.items()
                                 if k.endswith('/bias') and not k.startswith('head/'))
  else:
    assert set(counts) == {'adapter', 'head', 'frozen'}
    assert counts['adapter'] == sum(int(np.prod(v.shape)) for k, v in params.items()
                                    if f'/{method}/' in k) > 0
  assert counts['head'] == head


@pytest.mark.slow  # Two CLI runs (~1 min each on a 2-core CPU); the steps are tested above.
def test_cli_trains_lora_and_bitfit_on_cnns(tmp_path, capsys):
  for model, method in (('efficientnet_lite', 'lora'), ('resnet', 'bitfit')):
    work = str(tmp_path / method)
    run_main([f'--config={CONFIG}:test,model={model},method={method}', f'--workdir={work}',
              '--config.mesh.num_devices=1', '--config.total_steps=2'])
    out = capsys.readouterr().out
    assert f"method '{method}'" in out and 'eval accuracy after 2 steps' in out, out


# ------------------------------------------------------------------------------ bad input


def test_methods_without_a_cnn_placement_and_bad_options():
  model = TINY['resnet']()
  for method in ('ssf', 'ia3'):
    with pytest.raises(ValueError, match=rf"Method '{method}' scales the LayerNorms and "
                       r"projections of transformer blocks .* ResNet is a CNN: use 'conv' or "
                       r"'conv_parallel' .*'lora' or 'dora' \(on its convolutions\) or 'bitfit'"):
      api.adapt(model, method)
  with pytest.raises(ValueError, match=r"Method 'vpt_deep' places adapters in transformer blocks"):
    api.adapt(model, 'vpt_deep', prompts=4)
  effnet = TINY['efficientnet']()
  with pytest.raises(ValueError, match=r"modules \['depthwise_conv'\]: LoRA on a depthwise "
                     r'convolution needs a rank that is a multiple of its channel count'):
    api.adapt(effnet, 'lora', modules=['depthwise_conv'])
  with pytest.raises(ValueError, match=r"Unknown CNN block convolutions \['query'\]; known: "
                     r"\['Conv_0'"):
    api.adapt(model, 'lora', modules=['query'])
  with pytest.raises(ValueError, match="scope='vision/Transformer' selects a transformer encoder; "
                     'ResNet is a CNN'):
    api.adapt(model, 'lora', scope='vision/Transformer')
  # Rank above a convolution's width: named, with the width it has.
  with pytest.raises(ValueError, match=r"LoRA rank 9 is larger than the layer's width: "
                     r"'blocks_0/project_conv' has a kernel \(1, 1, 32, 8\) \(32 in, 8 out\); "
                     r"use rank <= 8"):
    jax.eval_shape(api.adapt(effnet, 'lora', rank=9).init, jax.random.key(0), X)
  # And from the config, before any weights are loaded.
  from configs import cnn_adapter  # pylint: disable=g-import-not-at-top
  config = cnn_adapter.get_config('test,method=lora')
  with config.unlocked():
    config.adapter.method = 'ssf'
  with pytest.raises(ValueError, match="adapter.method='ssf' puts adapters in transformer blocks, "
                     "and backbone.model='efficientnet_lite' is a CNN: use one of conv, "
                     'conv_parallel, lora, dora, bitfit, linear, full'):
    experiment.adapter_spec(config)
  with config.unlocked():
    config.adapter.method = 'lora'
    config.adapter.scope = 'Transformer'
  with pytest.raises(ValueError, match="adapter.scope='Transformer' selects a transformer "
                     "encoder; backbone.model='efficientnet_lite' is a CNN"):
    experiment.adapter_spec(config)


def test_lora_on_a_depthwise_conv_follows_peft_rule():
  """peft's rule for LoRA on a grouped conv: the rank divisible by the groups (here a depthwise
  conv's channels); A dense, B per group, identity at init; it does not merge. DoRA refuses."""
  effnet = TINY['efficientnet']()
  variables = _variables(effnet)
  channels = variables['params']['blocks_0']['depthwise_conv']['kernel'].shape[-1]
  target = ['blocks_0/depthwise_conv']
  with pytest.raises(ValueError, match=r"LoRA on 'blocks_0/depthwise_conv': a grouped convolution "
                     rf"\(feature_group_count={channels}\) takes a rank divisible by its "
                     rf"{channels} groups \(as in peft\); found rank 2"):
    jax.eval_shape(api.adapt(effnet, 'lora', rank=2, targets=target).init, jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"DoRA on 'blocks_0/depthwise_conv': grouped convolutions"):
    jax.eval_shape(api.adapt(effnet, 'dora', rank=channels, targets=target).init,
                   jax.random.key(0), X)
  adapted = api.adapt(effnet, 'lora', rank=channels, targets=target)
  init = _init(adapted, variables)
  assert {k: v.shape for k, v in flatten(init['params']).items() if '/lora/' in k} == {
      'blocks_0/depthwise_conv/lora/a': (3, 3, channels, channels),
      'blocks_0/depthwise_conv/lora/b': (1, channels)}
  run = jax.jit(lambda m, v: m.apply(v, X), static_argnums=0)
  np.testing.assert_array_equal(run(adapted, init), run(effnet, variables))
  moved = {**init, 'params': _perturb(init['params'], 'lora')}
  assert float(jnp.abs(run(adapted, moved) - run(effnet, variables)).max()) > 0
  with pytest.raises(ValueError, match='grouped convolution .* cannot be merged'):
    merge.merge(adapted, moved['params'])
