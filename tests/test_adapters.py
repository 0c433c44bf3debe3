"""Adapter modules on their own: names, shapes, zero-init identity, options and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt.adapters import BottleneckAdapter, BottleneckConfig, ConvAdapter, ConvAdapterConfig


def _shapes(variables):
  return jax.tree.map(lambda x: tuple(x.shape), variables['params'])


def test_bottleneck_param_names_and_zero_output():
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  adapter = BottleneckAdapter(bottleneck=8, layer_norm=True, learnable_scale=True, scale=0.1)
  variables = adapter.init(jax.random.key(1), x)
  assert _shapes(variables) == {
      'norm': {'scale': (32,), 'bias': (32,)},
      'down': {'kernel': (32, 8), 'bias': (8,)},
      'up': {'kernel': (8, 32), 'bias': (32,)},
      'scale': (),
  }
  np.testing.assert_array_equal(variables['params']['scale'], np.float32(0.1))
  np.testing.assert_array_equal(adapter.apply(variables, x), np.zeros_like(x))


def test_reduction_factor_and_out_features():
  x = jnp.ones((3, 48))
  adapter = BottleneckAdapter(reduction_factor=16, out_features=20)
  variables = adapter.init(jax.random.key(0), x)
  assert _shapes(variables) == {'down': {'kernel': (48, 3), 'bias': (3,)},
                                'up': {'kernel': (3, 20), 'bias': (20,)}}
  assert adapter.apply(variables, x).shape == (3, 20)


def test_fixed_scale_multiplies_output():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  one, tenth = BottleneckAdapter(bottleneck=4), BottleneckAdapter(bottleneck=4, scale=0.1)
  variables = one.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda p: p + 0.5, variables)  # A non-zero up-projection.
  np.testing.assert_allclose(tenth.apply(variables, x), 0.1 * one.apply(variables, x), rtol=1e-6)
  assert 'scale' not in variables['params']


@pytest.mark.parametrize('activation', ['relu', 'gelu', 'quick_gelu'])
def test_activations_by_name(activation):
  x = jnp.ones((2, 8))
  adapter = BottleneckAdapter(bottleneck=4, activation=activation)
  adapter.apply(adapter.init(jax.random.key(0), x), x)


def test_dropout_only_when_not_deterministic():
  x = jax.random.normal(jax.random.key(0), (4, 16))
  adapter = BottleneckAdapter(bottleneck=16, dropout_rate=0.5)
  variables = jax.tree.map(lambda p: p + 1.0, adapter.init(jax.random.key(1), x))
  a = adapter.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
  b = adapter.apply(variables, x, deterministic=False, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(adapter.apply(variables, x), adapter.apply(variables, x))


@pytest.mark.parametrize('kwargs', [{}, {'bottleneck': 8, 'reduction_factor': 4}])
def test_bottleneck_needs_exactly_one_size(kwargs):
  with pytest.raises(ValueError, match='exactly one of bottleneck .* and reduction_factor'):
    BottleneckConfig(**kwargs)
  with pytest.raises(ValueError, match='exactly one of bottleneck'):
    ConvAdapterConfig(**kwargs)
  with pytest.raises(ValueError, match='exactly one of bottleneck'):
    BottleneckAdapter(**kwargs).init(jax.random.key(0), jnp.ones((1, 8)))


def test_config_rejects_unknown_activation_and_bad_dropout():
  with pytest.raises(ValueError, match="Unknown activation 'swishy'"):
    BottleneckConfig(bottleneck=4, activation='swishy')
  with pytest.raises(ValueError, match=r'dropout must be in \[0, 1\)'):
    BottleneckConfig(bottleneck=4, dropout=1.5)


def test_conv_adapter_series_and_strided_parallel():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  series = ConvAdapterConfig(reduction_factor=4).build(
      in_shape=x.shape, out_shape=x.shape, name='adapter', parent=None)
  variables = series.init(jax.random.key(1), x)
  assert _shapes(variables) == {'down': {'kernel': (1, 1, 16, 4), 'bias': (4,)},
                                'up': {'kernel': (1, 1, 4, 16), 'bias': (16,)}}
  np.testing.assert_array_equal(series.apply(variables, x), np.zeros_like(x))

  parallel = ConvAdapterConfig(bottleneck=4).build(
      in_shape=x.shape, out_shape=(2, 4, 4, 32), name='adapter', parent=None)
  assert parallel.strides == (2, 2)
  variables = parallel.init(jax.random.key(1), x)
  assert parallel.apply(variables, x).shape == (2, 4, 4, 32)


def test_conv_adapter_rejects_non_maps():
  with pytest.raises(ValueError, match=r'NHWC feature maps \(B, H, W, C\); found shape \(2, 16\)'):
    ConvAdapter(bottleneck=4).init(jax.random.key(0), jnp.ones((2, 16)))
  with pytest.raises(ValueError, match='Cannot map a 8x8 map onto 3x3'):
    ConvAdapterConfig(bottleneck=4).build(in_shape=(1, 8, 8, 4), out_shape=(1, 3, 3, 4),
                                          name='adapter', parent=None)
