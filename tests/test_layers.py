"""vadapt.layers: the depthwise convolution as shifted multiply-adds (and its own gradient) equals
XLA's grouped conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import layers
from vadapt.models import efficientnet


@pytest.mark.parametrize('kernel,stride,padding,size,bias', [
    (3, 1, 'SAME', 17, False), (5, 2, 'SAME', 17, True), (3, 2, 'SAME', 16, False),
    (5, 1, 'VALID', 12, False), (3, 2, ((1, 2), (0, 1)), 15, True), (3, 1, 1, 9, False),
    (5, 2, ((3, 1), (0, 4)), 10, False), (3, 2, ((3, 5), (0, 6)), 7, False)])
def test_depthwise_conv_equals_the_grouped_conv(kernel, stride, padding, size, bias):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 8))
  kw = dict(features=8, kernel_size=(kernel, kernel), strides=(stride, stride), padding=padding,
            feature_group_count=8, use_bias=bias)
  ref, dw = nn.Conv(**kw), layers.DepthwiseConv(**kw)
  params = ref.init(jax.random.key(1), x)
  if bias:
    params = jax.tree.map(lambda p: p + 0.5, params)
  assert jax.tree.map(jnp.shape, dw.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
  want, got = ref.apply(params, x), dw.apply(params, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * float(jnp.abs(want).max()))
  loss = lambda m: lambda p, x: (m.apply(p, x) ** 2).sum()
  g_want = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  g_got = jax.grad(loss(dw), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.abs(b).max()))


def test_other_settings_run_as_nn_conv():
  """A clone with feature_group_count=1 (LoRA's dense A on a depthwise layer) is nn.Conv."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8))
  m = layers.DepthwiseConv(4, (3, 3), feature_group_count=1)
  params = m.init(jax.random.key(1), x)
  assert params['params']['kernel'].shape == (3, 3, 8, 4)
  np.testing.assert_array_equal(m.apply(params, x), nn.Conv(4, (3, 3)).apply(params, x))


def test_efficientnet_depthwise_implementations_agree():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  tiny = dict(width=0.25, depth=0.3, num_classes=5)
  shifted = efficientnet.EfficientNetLite(**tiny, depthwise='shifted')
  conv = efficientnet.EfficientNetLite(**tiny, depthwise='conv')
  params = shifted.init(jax.random.key(1), x)
  want = conv.apply(params, x)
  np.testing.assert_allclose(shifted.apply(params, x), want, rtol=0,
                             atol=1e-5 * float(jnp.abs(want).max()))
  with pytest.raises(ValueError, match="depthwise='fast': expected 'shifted', 'conv' or None"):
    efficientnet.EfficientNetLite(**tiny, depthwise='fast').init(jax.random.key(1), x)


def test_depthwise_gradient_runs_once_behind_a_conditional_on_cpu():
  """On CPU the VJP wraps its gradients in a conditional (so XLA stores them instead of fusing
  them into every consumer); the gradients are bit for bit those computed directly."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
  pads, strides = ((1, 1), (1, 1)), (2, 2)
  g = jax.random.normal(jax.random.key(2), (2, 5, 5, 4))

  def via_vjp(x, kernel, g):
    _, vjp = jax.vjp(lambda x, k: layers._depthwise(x, k, pads, strides), x, kernel)
    return vjp(g)

  direct = jax.jit(lambda x, k, g: layers._depthwise_grads(pads, strides, (x, k), g))
  got, want = jax.jit(via_vjp)(x, kernel, g), direct(x, kernel, g)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  has_cond = 'cond' in str(jax.make_jaxpr(via_vjp)(x, kernel, g))
  assert has_cond == (jax.default_backend() == 'cpu')
