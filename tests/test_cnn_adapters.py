"""Conv adapters on ResNet and EfficientNet-Lite: placements by name, identity at init, frozen
BatchNorm in the train step, the CLI end to end, and the errors for mismatched input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cli_runner import run_main
from vadapt import api, backbones, experiment, partition, placements
from vadapt.models import efficientnet, resnet, vit
from vadapt.pretrained.common import CheckpointMismatchError, flatten

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'cnn_adapter.py')


def random_variables(model, x, seed=0):
  """Random weights and non-trivial BatchNorm statistics, drawn on the host (fast)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if str(path[-1].key) == 'var':
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    scale = 1 / np.sqrt(np.prod(s.shape[:-1])) if str(path[-1].key) == 'kernel' else 0.2
    return (rng.standard_normal(s.shape) * scale).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


TINY = {
    'efficientnet': lambda: efficientnet.EfficientNetLite(width=0.25, depth=0.3, num_classes=5),
    'resnet': lambda: resnet.from_depth(18, num_classes=5, num_filters=8),
    'resnet_bottleneck': lambda: resnet.ResNet(stage_sizes=(1, 1, 1, 1), num_classes=5,
                                               block_cls=resnet.BottleneckResNetBlock,
                                               num_filters=4),
}
BLOCKS = {'efficientnet': ('blocks', 8), 'resnet': ('ResNetBlock', 8),
          'resnet_bottleneck': ('BottleneckResNetBlock', 4)}


@pytest.mark.parametrize('backbone,method', [
    ('efficientnet', 'conv'), ('efficientnet', 'conv_parallel'), ('resnet', 'conv_parallel'),
    ('resnet_bottleneck', 'conv')])
def test_identity_at_init_on_every_block(backbone, method):
  model = TINY[backbone]()
  x = jax.random.normal(jax.random.key(0), (2, 35, 35, 3))  # Odd maps: 18, 9, 5, 3, 2.
  variables = random_variables(model, x)
  adapted = api.adapt(model, method, reduction_factor=4)
  init = api.init_with_pretrained(adapted, variables['params'], jax.random.key(1), x,
                                  backbone_state={'batch_stats': variables['batch_stats']})
  name, count = BLOCKS[backbone]
  adapters = {k for k in flatten(init['params']) if '/adapter/' in k}
  assert {k.split('/')[0] for k in adapters} == {f'{name}_{i}' for i in range(count)}
  assert len(adapters) == 4 * count  # down and up, kernel and bias
  jax.tree.map(np.testing.assert_array_equal, init['batch_stats'], variables['batch_stats'])
  np.testing.assert_array_equal(*jax.jit(lambda i, v: (adapted.apply(i, x), model.apply(v, x)))(
      init, variables))


def test_layer_selection_and_parallel_strides():
  model = TINY['efficientnet']()
  x = jnp.zeros((1, 32, 32, 3))
  adapted = api.adapt(model, 'conv_parallel', bottleneck=2, layers=[1, 3])
  shapes = flatten(jax.eval_shape(adapted.init, jax.random.key(0), x)['params'])
  assert sorted(k for k in shapes if k.endswith('down/kernel')) == [
      'blocks_1/adapter/down/kernel', 'blocks_3/adapter/down/kernel']
  # Block 1 halves the map and widens 8 -> 8 channels; block 3 keeps 16x16... the adapter
  # matches whatever the block does (a strided 1x1 conv to the block's output width).
  specs = efficientnet.block_specs(0.25, 0.3)
  assert shapes['blocks_1/adapter/up/kernel'].shape == (1, 1, 2, specs[1].out_features)
  skip = api.adapt(model, 'conv', bottleneck=2, layers=placements.skip_lowest(6))
  shapes = flatten(jax.eval_shape(skip.init, jax.random.key(0), x)['params'])
  assert sorted({k.split('/')[0] for k in shapes if '/adapter/' in k}) == ['blocks_6', 'blocks_7']


def test_train_step_updates_batch_norm_statistics_when_asked():
  """With backbone.train_batch_norm the statistics sit in the delta and follow the batches; the
  frozen default is checked end to end by the CLI test below."""
  from vadapt import train  # pylint: disable=g-import-not-at-top
  model = TINY['resnet']().clone(freeze_batch_norm=False)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = random_variables(model, x)
  adapted = api.adapt(model, 'conv', reduction_factor=2)
  tree = partition.from_variables(api.init_with_pretrained(
      adapted, variables['params'], jax.random.key(1), x,
      backbone_state={'batch_stats': variables['batch_stats']}))
  labels = partition.label_tree(tree, [(r'^batch_stats/', 'batch_stats')] +
                                partition.default_rules())
  delta, frozen = partition.split(tree, labels)
  delta_labels, _ = partition.split(labels, labels)
  tx = partition.make_optimizer(delta_labels, {'adapter': optax.adam(1e-2),
                                               'head': optax.adam(1e-2),
                                               'batch_stats': optax.set_to_zero()})
  step = jax.jit(train.make_train_step(adapted, tx, optax.constant_schedule(1e-2), num_classes=5,
                                       label_smoothing=0.0, seed=0, update_batch_stats=True))
  start = jax.device_get(delta)
  new, _, metrics = step(delta, tx.init(delta), frozen,
                         {'image': x, 'label': jnp.array([0, 1, 2, 3])}, 0)
  assert bool(metrics['finite'])
  # The running averages the forward pass computed, not an optimizer update.
  _, state = adapted.apply(partition.to_variables(tree), x, train=True, mutable=['batch_stats'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(new['batch_stats']), jax.device_get(state['batch_stats']))
  assert not np.allclose(new['batch_stats']['bn_init']['mean'],
                         start['batch_stats']['bn_init']['mean'])
  # The trunk's weights stay where they were.
  assert set(frozen) == {k for k in variables['params'] if k != 'head'}


def test_cli_trains_conv_adapters_and_keeps_the_backbone_bit_identical(tmp_path, capsys):
  from configs import cnn_adapter  # pylint: disable=g-import-not-at-top
  from vadapt import train  # pylint: disable=g-import-not-at-top
  config = cnn_adapter.get_config('test')
  with config.unlocked():
    config.mesh.num_devices = 1
    config.total_steps = 2
  result = train.train_and_evaluate(config, str(tmp_path / 'work'))
  out = capsys.readouterr().out
  assert "method 'conv'" in out and 'eval accuracy after 2 steps' in out
  loaded = backbones.load_params(config.backbone, backbones.make_model(config.backbone, 10),
                                 rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
  frozen = flatten(jax.device_get(result.frozen))
  expected = flatten(loaded)
  # Everything but the head (trained) is frozen: weights and BatchNorm statistics, bit for bit.
  assert set(frozen) == {k for k in expected if not k.startswith('head/')}
  assert any(k.startswith('batch_stats/') for k in frozen)
  for k, v in frozen.items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)
  assert any(np.any(v) for k, v in flatten(result.delta).items() if k.endswith('up/kernel'))
  # The exported adapter goes back onto the loaded backbone, statistics included.
  from vadapt import checkpoint  # pylint: disable=g-import-not-at-top
  model, _ = experiment.build_model(config, 10)
  params = checkpoint.load_adapter(result.adapter_path, model, loaded)
  flat = flatten(params)
  for k, v in flatten(result.delta).items():
    np.testing.assert_array_equal(flat[k], v)
  logits = model.apply(partition.to_variables(params), jnp.zeros((1, 32, 32, 3)))
  assert np.all(np.isfinite(logits))


@pytest.mark.slow  # A second CLI run; the fast suite has the EfficientNet one above.
def test_cli_resnet_parallel_then_eval(tmp_path, capsys):
  work = str(tmp_path / 'work')
  args = [f'--config={CONFIG}:test,model=resnet,method=conv_parallel', f'--workdir={work}',
          '--config.mesh.num_devices=1', '--config.total_steps=1']
  run_main(args)
  run_main(args + ['--mode=eval'])
  assert 'step 1: eval accuracy' in capsys.readouterr().out


# ------------------------------------------------------------------------------ bad input


def test_transformer_placement_on_a_cnn_and_the_reverse():
  with pytest.raises(ValueError, match=r"Method 'houlsby' places adapters in transformer blocks "
                     r"\(ViT, CLIP\); ResNet is a CNN: use 'conv' or 'conv_parallel'"):
    api.adapt(resnet.from_depth(18), 'houlsby', bottleneck=8)
  with pytest.raises(ValueError, match=r"Method 'parallel' .* EfficientNetLite is a CNN"):
    api.adapt(efficientnet.from_variant('lite0'), 'parallel', bottleneck=8)
  with pytest.raises(ValueError, match=r"Method 'conv' places conv adapters in CNN blocks "
                     r"\(ResNet, EfficientNet-Lite\); VisionTransformer is a transformer: use one "
                     r"of \['houlsby'"):
    api.adapt(vit.from_variant('mu/4', num_classes=3), 'conv', bottleneck=8)
  from configs import cnn_adapter  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="method='houlsby' does not apply to a CNN"):
    cnn_adapter.get_config('method=houlsby')
  config = cnn_adapter.get_config('test')
  with config.unlocked():
    config.adapter.method = 'pfeiffer'
  with pytest.raises(ValueError, match="adapter.method='pfeiffer' puts adapters in transformer "
                     "blocks, and backbone.model='efficientnet_lite' is a CNN"):
    experiment.build_model(config, 10)


def test_checkpoint_of_another_variant_and_too_small_images_from_the_config():
  from configs import cnn_adapter  # pylint: disable=g-import-not-at-top
  from vadapt import artifacts  # pylint: disable=g-import-not-at-top
  config = cnn_adapter.get_config('variant=lite1')
  with config.unlocked():
    config.backbone.checkpoint = artifacts.efficientnet_lite0_pth()
  model = backbones.make_model(config.backbone, 10)
  with pytest.raises(CheckpointMismatchError, match=r'holds EfficientNet-Lite lite0 .* but the '
                     r'model is lite1 \(21 blocks'):
    backbones.load_params(config.backbone, model)
  config = cnn_adapter.get_config('model=resnet,image_size=16')
  with pytest.raises(ValueError, match=r'ResNet downsamples by 32: images must be at least '
                     r'32x32; found 16x16'):
    backbones.load_params(config.backbone, backbones.make_model(config.backbone, 10))
  config = cnn_adapter.get_config('test,model=resnet')
  with config.unlocked():
    config.backbone.variant = 'R50'
  with pytest.raises(ValueError, match=r"variant for model='resnet' is the depth \(18, 34"):
    backbones.make_model(config.backbone, 10)
