"""Labels, split/merge, the optimizer over labels, accounting, and pre-trained overlay errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vadapt import api, partition
from vadapt.models import vit
from vadapt.pretrained.common import CheckpointMismatchError, flatten

X = jnp.zeros((1, 32, 32, 3))


@pytest.fixture(scope='module')
def setup():
  """(adapted model, bare backbone params, adapted params) for mu/4 + pfeiffer-8."""
  model = vit.from_variant('mu/4', num_classes=10)
  adapted = api.adapt(model, 'pfeiffer', bottleneck=8)
  bb_params = jax.jit(model.init)(jax.random.key(0), X)['params']
  params = api.init_with_pretrained(adapted, bb_params, jax.random.key(1), X)
  return adapted, bb_params, params


def test_default_rules_labels(setup):
  _, _, params = setup
  labels = flatten(partition.label_tree(params, partition.default_rules()))
  assert labels['Transformer/encoderblock_1/MlpBlock_0/adapter/up/kernel'] == 'adapter'
  assert labels['head/kernel'] == 'head'
  assert labels['Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'] == 'frozen'
  assert labels['cls'] == 'frozen'
  no_head = flatten(partition.label_tree(params, partition.default_rules(train_head=False)))
  assert no_head['head/kernel'] == 'frozen'
  renamed = {'Transformer': {'b': {'pre': {'up': {'kernel': 0}}}, 'preface': {'kernel': 0}}}
  labels = flatten(partition.label_tree(renamed, partition.default_rules(adapter_names=['pre'])))
  assert labels == {'Transformer/b/pre/up/kernel': 'adapter', 'Transformer/preface/kernel': 'frozen'}


def test_first_matching_rule_wins(setup):
  _, _, params = setup
  rules = [(r'encoderblock_0/.*adapter', 'early'), (r'adapter', 'late'), (r'.*', 'frozen')]
  labels = flatten(partition.label_tree(params, rules))
  assert labels['Transformer/encoderblock_0/MlpBlock_0/adapter/up/bias'] == 'early'
  assert labels['Transformer/encoderblock_1/MlpBlock_0/adapter/up/bias'] == 'late'


def test_uncovered_leaves_are_listed(setup):
  _, _, params = setup
  with pytest.raises(ValueError, match=r'(?s)match no rule.*head/bias.*head/kernel'):
    partition.label_tree(params, [(r'Transformer|embedding|cls', 'frozen')])


def test_split_merge_roundtrip_and_overlap(setup):
  _, _, params = setup
  labels = partition.label_tree(params, partition.default_rules())
  delta, frozen = partition.split(params, labels)
  assert sorted(flatten(delta)) == sorted(
      k for k in flatten(params) if '/adapter/' in k or k.startswith('head/'))
  assert 'head' not in frozen and 'MlpBlock_0' in frozen['Transformer']['encoderblock_0']
  assert 'adapter' not in frozen['Transformer']['encoderblock_0']['MlpBlock_0']
  merged = partition.merge(delta, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  with pytest.raises(ValueError, match=r"both hold 2 paths.*head/bias"):
    partition.merge(delta, {'head': params['head']})


def _state_bytes(state):
  leaves = jax.tree.leaves(state)
  return len(leaves), sum(np.asarray(x).nbytes for x in leaves)


def test_optimizer_state_only_for_delta(setup):
  _, _, params = setup
  labels = partition.label_tree(params, partition.default_rules(train_head=False))
  delta, _ = partition.split(params, labels)
  tx = partition.make_optimizer(labels, {'adapter': optax.adam(1e-3)})
  reference = _state_bytes(optax.adam(1e-3).init(delta))
  assert _state_bytes(tx.init(params)) == reference
  assert _state_bytes(tx.init(delta)) == reference
  # Frozen leaves get exactly zero updates when the optimizer sees the full tree.
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  flat = flatten(updates)
  assert all(not np.any(flat[k]) for k in flat if '/adapter/' not in k)
  assert all(np.all(flat[k] != 0) for k in flat if '/adapter/' in k)


def test_optimizer_needs_a_transform_per_label(setup):
  _, _, params = setup
  labels = partition.label_tree(params, partition.default_rules())
  with pytest.raises(ValueError, match=r"No optimizer transform for labels \['head'\]"):
    partition.make_optimizer(labels, {'adapter': optax.sgd(0.1)})


def test_value_and_grad_delta_differentiates_only_delta(setup):
  adapted, _, params = setup
  labels = partition.label_tree(params, partition.default_rules())
  delta, frozen = partition.split(params, labels)
  loss = lambda p, x: jnp.sum(adapted.apply({'params': p}, x) ** 2)
  value, grads = jax.jit(partition.value_and_grad_delta(loss))(delta, frozen, X + 1.0)
  assert jax.tree.structure(grads) == jax.tree.structure(delta)
  assert np.isfinite(value)


def test_count_stats_and_summary(setup):
  _, _, params = setup
  labels = partition.label_tree(params, partition.default_rules())
  # pfeiffer-8 on width 32, depth 2: 2 x (32*8 + 8 + 8*32 + 32); head 32*10 + 10.
  by_label = partition.count(params, labels)
  assert by_label['adapter'] == 2 * (32 * 8 + 8 + 8 * 32 + 32) == 1104
  assert by_label['head'] == 330
  total = sum(x.size for x in jax.tree.leaves(params))
  assert sum(by_label.values()) == total
  s = partition.stats(params, labels)
  assert (s.total, s.trainable, s.delta_bytes) == (total, 1434, 1434 * 4)
  assert s.trainable_percent == pytest.approx(100 * 1434 / total)
  # Works on shapes alone (eval_shape), for models too large to instantiate.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert partition.count(abstract, labels) == by_label
  table = partition.summary_table(params, labels)
  assert re.search(r'\nTransformer/encoderblock_0/MlpBlock_0/adapter/down +adapter +264 ', table)
  assert 'kernel(32, 8) bias(8,)' in table or 'bias(8,) kernel(32, 8)' in table
  assert 'trainable 1,434' in table


def test_overlay_keeps_backbone_weights(setup):
  _, bb_params, params = setup
  flat, bb = flatten(params), flatten(bb_params)
  for k, v in bb.items():
    np.testing.assert_array_equal(flat[k], v)
  assert set(flat) - set(bb) == {k for k in flat if '/adapter/' in k}


def test_overlay_rejects_missing_and_extra_keys(setup):
  adapted, bb_params, _ = setup
  broken = jax.tree.map(lambda x: x, bb_params)
  del broken['head']
  broken['Transformer']['extra'] = {'kernel': jnp.zeros(3)}
  broken['cls'] = jnp.zeros((1, 1, 31))
  with pytest.raises(CheckpointMismatchError,
                     match=r'(?s)missing keys \(2\).*head/bias.*unexpected keys \(1\).*'
                           r'Transformer/extra/kernel.*cls: \(1, 1, 32\) vs \(1, 1, 31\)'):
    api.init_with_pretrained(adapted, broken, jax.random.key(1), X)
  with pytest.raises(ValueError, match="'params' collection itself"):
    api.init_with_pretrained(adapted, {'params': bb_params}, jax.random.key(1), X)
  with pytest.raises(TypeError, match='expects an Adapted model'):
    api.init_with_pretrained(adapted.backbone, bb_params, jax.random.key(1), X)
