"""ResNet v1.5: golden parameter counts, and conv adapters (identity at init, frozen trunk)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vadapt import api, inject, partition, placements
from vadapt.adapters import ConvAdapterConfig
from vadapt.models import resnet
from vadapt.pretrained.common import flatten

# torchvision's counts for the same architectures with 1000 classes.
GOLDEN_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160,
                 152: 60_192_808}


@pytest.mark.parametrize('depth', [
    18, 34, 50, pytest.param(101, marks=pytest.mark.slow), pytest.param(152, marks=pytest.mark.slow)])
def test_golden_param_counts(depth):
  model = resnet.from_depth(depth)
  # Parameter shapes do not depend on the resolution: a small input keeps tracing cheap.
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params'])) == (
      GOLDEN_PARAMS[depth])
  assert set(variables) == {'params', 'batch_stats'}


def test_names_follow_flax_imagenet_example():
  variables = jax.eval_shape(resnet.from_depth(50).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3)))
  flat = {k: v.shape for k, v in flatten(variables['params']).items()}
  assert flat['conv_init/kernel'] == (7, 7, 3, 64)
  assert flat['bn_init/scale'] == (64,)
  assert flat['BottleneckResNetBlock_0/Conv_2/kernel'] == (1, 1, 64, 256)
  assert flat['BottleneckResNetBlock_0/conv_proj/kernel'] == (1, 1, 64, 256)
  assert flat['BottleneckResNetBlock_15/Conv_1/kernel'] == (3, 3, 512, 512)
  assert flat['head/kernel'] == (2048, 1000)
  assert 'BottleneckResNetBlock_16/Conv_0/kernel' not in flat


def test_unknown_depth_and_option():
  with pytest.raises(ValueError, match=r'Unknown ResNet depth 20; known depths: \[18, 34'):
    resnet.from_depth(20)
  with pytest.raises(TypeError, match='num_filter'):
    resnet.from_depth(18, num_filter=8)


@pytest.fixture(scope='module')
def tiny():
  """ResNet-18 at 1/8 width with 'pre-trained' weights and non-trivial batch statistics."""
  model = resnet.from_depth(18, num_classes=10, num_filters=8, freeze_batch_norm=True)
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  # Running statistics from one pass in training mode, as a trained trunk would have.
  _, state = jax.jit(lambda v, x: model.clone(freeze_batch_norm=False).apply(
      v, x, train=True, mutable=['batch_stats']))(variables, x)
  return model, {'params': variables['params'], **state}, x


def test_conv_adapters_identity_and_frozen_trunk(tiny):
  model, variables, x = tiny
  adapted = api.adapt(model, 'conv', reduction_factor=4)
  with pytest.raises(ValueError, match=r"collections \['batch_stats'\].*backbone_state"):
    api.init_with_pretrained(adapted, variables['params'], jax.random.key(2), x[:1])
  init = api.init_with_pretrained(adapted, variables['params'], jax.random.key(2), x[:1],
                                  backbone_state={'batch_stats': variables['batch_stats']})
  widths = [8, 8, 16, 16, 32, 32, 64, 64]
  assert {k: v.shape for k, v in flatten(init['params']).items() if '/adapter/' in k} == {
      f'ResNetBlock_{i}/adapter/{leaf}': shape for i, c in enumerate(widths)
      for leaf, shape in {'down/kernel': (1, 1, c, c // 4), 'down/bias': (c // 4,),
                          'up/kernel': (1, 1, c // 4, c), 'up/bias': (c,)}.items()}
  np.testing.assert_array_equal(adapted.apply(init, x), model.apply(variables, x))

  labels = partition.label_tree(init['params'], partition.default_rules(train_head=False))
  delta, frozen = partition.split(init['params'], labels)
  tx = partition.make_optimizer(labels, {'adapter': optax.adam(1e-2)})
  targets = jax.random.randint(jax.random.key(3), (x.shape[0],), 0, 10)

  def loss_fn(params, batch_stats):
    logits, state = adapted.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                  mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, state['batch_stats']

  grad_fn = partition.value_and_grad_delta(loss_fn, has_aux=True)

  @jax.jit
  def step(delta, opt_state, batch_stats):
    (loss, batch_stats), grads = grad_fn(delta, frozen, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, delta)
    return optax.apply_updates(delta, updates), opt_state, batch_stats, loss

  opt_state, batch_stats, losses = tx.init(delta), init['batch_stats'], []
  for _ in range(5):
    delta, opt_state, batch_stats, loss = step(delta, opt_state, batch_stats)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  jax.tree.map(np.testing.assert_array_equal, batch_stats, variables['batch_stats'])
  trained = flatten(partition.merge(delta, frozen))
  for k, v in flatten(variables['params']).items():
    np.testing.assert_array_equal(trained[k], v, err_msg=k)
  assert not np.array_equal(trained['ResNetBlock_7/adapter/up/kernel'],
                            flatten(init['params'])['ResNetBlock_7/adapter/up/kernel'])


def test_parallel_conv_adapters_follow_stride(tiny):
  model, variables, x = tiny
  target = inject.Target(placements.RESNET_BLOCKS, ConvAdapterConfig(bottleneck=4),
                         position='parallel')
  adapted = api.adapt(model, targets=[target])
  out = api.init_with_pretrained(adapted, variables['params'], jax.random.key(2), x[:1],
                                 backbone_state={'batch_stats': variables['batch_stats']})
  shapes = {k: v.shape for k, v in flatten(out['params']).items()}
  # Block 2 maps 8 channels at 8x8 to 16 at 4x4: the adapter sees its input and emits its output.
  assert shapes['ResNetBlock_2/adapter/down/kernel'] == (1, 1, 8, 4)
  assert shapes['ResNetBlock_2/adapter/up/kernel'] == (1, 1, 4, 16)
  np.testing.assert_array_equal(adapted.apply(out, x), model.apply(variables, x))
