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


@pytest.mark.parametrize('subscripts, shapes', [
    ('...qhd,...khd->...hqk', ((2, 5, 3, 4), (2, 7, 3, 4))),
    ('...hqk,...khd->...qhd', ((2, 3, 5, 7), (2, 7, 3, 4))),
    ('...qhd,...khd->...hqk', ((5, 3, 4), (7, 3, 4))),  # no batch axis
    ('ij,jk->ik', ((3, 4), (4, 5))),  # anything else: jnp.einsum
])
def test_head_major_einsum_is_flax_s_einsum(subscripts, shapes):
  a, b = (jax.random.normal(jax.random.PRNGKey(i), s) for i, s in enumerate(shapes))
  want = jnp.einsum(subscripts, a, b)
  got = layers.head_major_einsum(subscripts, a, b)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('causal', [False, True])
def test_attention_with_head_major_products_matches_flax_s(causal):
  """Same params, masks, softmax and dropout: only the two products' operand layout differs."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 24))
  mask = nn.make_causal_mask(jnp.ones((2, 9), jnp.int32)) if causal else None
  kw = dict(num_heads=3, dropout_rate=0.1, broadcast_dropout=False)
  plain = nn.MultiHeadDotProductAttention(**kw)
  fast = nn.MultiHeadDotProductAttention(
      **kw, qk_attn_weights_einsum_cls=lambda: layers.head_major_einsum,
      attn_weights_value_einsum_cls=lambda: layers.head_major_einsum)
  params = plain.init(jax.random.PRNGKey(1), x, x, mask=mask, deterministic=True)
  for deterministic in (True, False):
    rngs = {'dropout': jax.random.PRNGKey(2)}
    want = plain.apply(params, x, x, mask=mask, deterministic=deterministic, rngs=rngs)
    got = fast.apply(params, x, x, mask=mask, deterministic=deterministic, rngs=rngs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x, x, mask=mask, deterministic=True) ** 2)
  grad = lambda m: jax.grad(loss(m))(params)
  for g_want, g_got in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(fast))):
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-5)


def test_the_vit_block_uses_head_major_attention_products():
  from vadapt.models import vit  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 5, 16))
  block = vit.Encoder1DBlock(mlp_dim=32, num_heads=2)
  seen = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.MultiHeadDotProductAttention) and context.method_name == (
        '__call__'):
      seen.append(context.module.qk_attn_weights_einsum_cls()
                  is layers.head_major_einsum is context.module.attn_weights_value_einsum_cls())
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    block.init(jax.random.PRNGKey(0), x)
  assert seen == [True]


def test_gelu_exact_is_pytorchs_erf_form():
  x = np.linspace(-12, 12, 20001).astype(np.float32)
  ours = np.asarray(layers.gelu_exact(jnp.asarray(x)))
  np.testing.assert_allclose(ours, np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False)),
                             rtol=0, atol=1e-6)
  grad = jax.grad(lambda v: layers.gelu_exact(v).sum())(jnp.asarray(x))
  want = jax.grad(lambda v: jax.nn.gelu(v, approximate=False).sum())(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=0, atol=1e-6)
  assert layers.get_activation('gelu_exact') is layers.gelu_exact
  assert layers.gelu_exact(jnp.ones(2, jnp.bfloat16)).dtype == jnp.bfloat16
  torch = pytest.importorskip('torch')
  np.testing.assert_allclose(ours, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(),
                             rtol=0, atol=1e-6)
