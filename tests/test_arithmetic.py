"""Adapter arithmetic: weighted sums, interpolation, negation, TIES and DARE against peft's
definitions, structure checks, and merged deltas served as ordinary adapters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import arithmetic, inject, multi
from vadapt.adapters import BottleneckConfig
from vadapt.pretrained.common import flatten, unflatten


class Features(nn.Module):
  """A compact two-layer feature extractor."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name='fc2')(nn.relu(nn.Dense(12, name='fc1')(x)))


def _adapter(name, bottleneck=3, num_classes=4):
  cfg = BottleneckConfig(bottleneck=bottleneck)
  return multi.NamedAdapter(name, (inject.Target('fc1', cfg), inject.Target('fc2', cfg)),
                            num_classes=num_classes)


@pytest.fixture(scope='module')
def setup():
  x = jax.random.normal(jax.random.key(0), (5, 8))
  model = multi.adapt(Features(), [_adapter('a'), _adapter('b'), _adapter('w', bottleneck=2)])
  params = jax.jit(model.init)(jax.random.key(1), x)['params']
  rng = np.random.default_rng(0)
  params = unflatten({k: np.asarray(v) + rng.normal(size=v.shape).astype(np.float32)
                      if multi.owner(k, model.names()) else v
                      for k, v in flatten(params).items()})
  return model, params, x


def test_linear_modes(setup):
  model, params, _ = setup
  a, b = (arithmetic.delta(model, params, n) for n in 'ab')
  a, b = ({k: np.asarray(v) for k, v in d.items()} for d in (a, b))
  assert 'fc1/*/down/kernel' in a and 'heads/*/kernel' in a
  np.testing.assert_array_equal(a['fc1/*/up/bias'], params['fc1']['a']['up']['bias'])
  mixed = arithmetic.weighted_sum([a, b], [0.25, 0.75])
  for k in a:
    np.testing.assert_allclose(mixed[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6)
  half, negated, same = (arithmetic.interpolate(a, b, 0.5), arithmetic.negate(a),
                         arithmetic.weighted_sum([a]))
  for k in a:
    np.testing.assert_allclose(half[k], (a[k] + b[k]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(negated[k], -a[k])
    np.testing.assert_array_equal(same[k], a[k])


def _peft_ties(tensors, weights, density):
  """peft.utils.merge_utils.ties with majority 'total', in numpy."""
  pruned = []
  for t in tensors:
    k = int(density * t.size)
    mask = np.zeros(t.size)
    mask[np.argsort(-np.abs(t).ravel(), kind='stable')[:k]] = 1
    pruned.append(t * mask.reshape(t.shape))
  stacked = np.stack(pruned)
  sign = np.where(stacked.sum(0) >= 0, 1, -1)
  agree = np.sign(stacked) == sign
  weighted = stacked * np.asarray(weights).reshape((-1,) + (1,) * t.ndim)
  return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


def test_ties_and_dare(setup):
  model, params, _ = setup
  a, b = (arithmetic.delta(model, params, n, heads=False) for n in 'ab')
  a, b = ({k: np.asarray(v) for k, v in d.items()} for d in (a, b))
  merged = arithmetic.ties([a, b], [0.7, 1.3], density=0.5)
  for k in a:
    np.testing.assert_allclose(merged[k], _peft_ties([a[k], b[k]], [0.7, 1.3], 0.5),
                               rtol=1e-6, atol=1e-7)
  full = arithmetic.dare([a, b], [0.5, 0.5], density=1.0, rng=jax.random.key(0))
  for k in a:  # density 1 keeps everything: the plain weighted sum.
    np.testing.assert_allclose(full[k], 0.5 * a[k] + 0.5 * b[k], rtol=1e-6)
  sparse = arithmetic.dare([a], [1.0], density=0.25, rng=jax.random.key(1))
  kernel, original = np.asarray(sparse['fc1/*/down/kernel']), np.asarray(a['fc1/*/down/kernel'])
  kept = kernel != 0
  np.testing.assert_allclose(kernel[kept], original[kept] / 0.25, rtol=1e-6)
  assert 0 < kept.mean() < 0.6
  elected = arithmetic.dare([a, b], [1.0, 1.0], density=0.5, rng=jax.random.key(1),
                            elect_sign=True)
  assert elected.keys() == a.keys()


def test_merged_adapter_serves_like_any_other(setup):
  model, params, x = setup
  a, b = (arithmetic.delta(model, params, n) for n in 'ab')
  bigger, grown = arithmetic.add_adapter(model, params, 'avg', arithmetic.interpolate(a, b, 0.5),
                                         like='a')
  assert bigger.names() == ('a', 'b', 'w', 'avg')
  np.testing.assert_array_equal(arithmetic.delta(bigger, grown, 'avg')['fc2/*/down/kernel'],
                                arithmetic.interpolate(a, b, 0.5)['fc2/*/down/kernel'])
  run = jax.jit(lambda p, i: bigger.apply({'params': p}, x, adapter=i))
  out = run(grown, jnp.int32(bigger.index('avg')))
  by_name = jax.jit(lambda p: bigger.apply({'params': p}, x, adapter='avg'))(grown)
  np.testing.assert_allclose(out, by_name, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(run(grown, 0), jax.jit(
      lambda p: model.apply({'params': p}, x, adapter=0))(params))


def test_different_structures_are_refused(setup):
  model, params, _ = setup
  a, w = arithmetic.delta(model, params, 'a'), arithmetic.delta(model, params, 'w')
  with pytest.raises(ValueError, match=r"one structure; delta 0 and delta 1 differ: shapes "
                                       r"\['fc1/\*/down/bias: \(3,\) vs \(2,\)'"):
    arithmetic.weighted_sum([a, w])
  with pytest.raises(ValueError, match=r'only in delta 0: \[.heads/\*/bias'):
    arithmetic.interpolate(a, arithmetic.delta(model, params, 'b', heads=False), 0.5)
  with pytest.raises(ValueError, match=r'density must be in \(0, 1\]'):
    arithmetic.ties([a], [1.0], density=0.0)
  with pytest.raises(ValueError, match='3 weights for 2 deltas'):
    arithmetic.weighted_sum([a, a], [1, 2, 3])
  with pytest.raises(ValueError, match='differ'):
    arithmetic.add_adapter(model, params, 'x', w, like='a')


def test_lora_merges(setup):
  _, _, x = setup
  from vadapt.adapters.lora import LoRAConfig, lora_delta  # pylint: disable=g-import-not-at-top
  from vadapt.composition import Average  # pylint: disable=g-import-not-at-top

  def lora(name, alpha):
    cfg = LoRAConfig(rank=2, alpha=alpha)
    return multi.NamedAdapter(name, (inject.Target('fc1', cfg, 'parallel', name='lora'),
                                     inject.Target('fc2', cfg, 'parallel', name='lora')))

  model = multi.adapt(Features(), [lora('p', 4.0), lora('q', None)])
  params = jax.jit(model.init)(jax.random.key(1), x)['params']
  rng = np.random.default_rng(3)
  params = unflatten({k: np.asarray(v) + rng.normal(size=v.shape).astype(np.float32)
                      if multi.owner(k, model.names()) else v for k, v in flatten(params).items()})
  p, q = (arithmetic.delta(model, params, n) for n in 'pq')
  scales = arithmetic.lora_scales(model, ['p', 'q'])
  assert scales == [2.0, 1.0]
  w = [0.7, -0.4]
  cat = arithmetic.lora_cat([p, q], w, scales)
  assert cat['fc1/*.lora/a'].shape == (8, 4) and cat['fc1/*.lora/b'].shape == (4, 12)
  kernel = (12, 6)
  update = lambda d, s=1.0: lora_delta(d['fc2/*.lora/a'], d['fc2/*.lora/b'], kernel, s)
  np.testing.assert_allclose(update(cat), w[0] * update(p, 2.0) + w[1] * update(q),
                             rtol=1e-5, atol=1e-5)
  # The merged adapter computes what averaging the two adapters' outputs computes.
  merged, merged_params = arithmetic.add_adapter(model, params, 'pq', cat, like='p',
                                                 adapter_config=LoRAConfig(rank=4))
  out = jax.jit(lambda v: merged.apply({'params': v}, x, adapter='pq'))(merged_params)
  avg = jax.jit(lambda v: merged.apply({'params': v}, x, adapter=Average('p', 'q', weights=w)))
  np.testing.assert_allclose(out, avg(merged_params), rtol=1e-5, atol=1e-5)
  # LoRA adapters (which read the layer's kernel) in a mixed batch: all run, each row masked.
  names = ['q', 'pq', 'p', 'q', 'pq']
  mixed = jax.jit(lambda v, i: merged.apply({'params': v}, x, adapter=i))(
      merged_params, merged.indices(names))
  alone = {n: jax.jit(lambda v, n=n: merged.apply({'params': v}, x, adapter=n))(merged_params)
           for n in set(names)}
  for row, n in enumerate(names):
    np.testing.assert_allclose(mixed[row], alone[n][row], rtol=1e-6, atol=1e-6)
  # SVD: full rank reproduces the update; rank 1 is the best rank-1 approximation.
  full = arithmetic.lora_svd([p, q], w, scales, rank=4)
  np.testing.assert_allclose(update(full), update(cat), rtol=1e-4, atol=1e-4)
  one = arithmetic.lora_svd([p, q], w, scales, rank=1)
  assert one['fc2/*.lora/a'].shape == (12, 1)
  sv = np.linalg.svd(np.asarray(update(cat)), compute_uv=False)
  np.testing.assert_allclose(np.linalg.norm(update(cat) - update(one)),
                             np.sqrt((sv[1:] ** 2).sum()), rtol=1e-4)
  linear = arithmetic.lora_linear([p, q], [0.25, 0.25], scales)
  np.testing.assert_allclose(linear['fc1/*.lora/b'], 0.5 * (p['fc1/*.lora/b'] + q['fc1/*.lora/b']),
                             rtol=1e-6)
  with pytest.raises(ValueError, match='square roots'):
    arithmetic.lora_linear([p, q], w, scales)
  with pytest.raises(ValueError, match=r'rank must be in \[1, 6\]'):
    arithmetic.lora_svd([p, q], w, scales, rank=7)
