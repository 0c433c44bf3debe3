"""Mesh construction, sharding rules, and 1 vs 8 devices giving the same training."""


import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vadapt import metrics as metrics_lib
from vadapt import sharding
from vadapt import train
from config_overrides import load_config


def get_config(**overrides):
  return load_config(**overrides)


def test_make_mesh_uses_auto_axes_and_all_devices():
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(data=-1, fsdp=4).shape) == {'data': 2, 'fsdp': 4}
  assert dict(sharding.make_mesh(devices=jax.devices()[:1]).shape) == {'data': 1, 'fsdp': 1}


def test_make_mesh_rejects_bad_sizes():
  with pytest.raises(ValueError, match='fsdp=3 must be a positive divisor of the device count 8'):
    sharding.make_mesh(fsdp=3)
  with pytest.raises(ValueError, match='data=3 x fsdp=1 = 3 devices, but 8 are available'):
    sharding.make_mesh(data=3)


def test_batch_size_check():
  mesh = sharding.make_mesh()
  assert sharding.batch_size_per_shard(mesh, 16) == 2
  with pytest.raises(ValueError, match='batch_size=10 is not divisible by the 8 devices'):
    sharding.batch_size_per_shard(mesh, 10)


def test_fsdp_rule_splits_the_largest_divisible_dim():
  assert sharding.fsdp_spec((768, 3072), 4, min_size=1) == P(None, 'fsdp')
  assert sharding.fsdp_spec((768, 12, 64), 4, min_size=1) == P('fsdp', None, None)
  assert sharding.fsdp_spec((6, 7), 4, min_size=1) == P()  # Nothing divisible: replicated.
  assert sharding.fsdp_spec((768,), 4) == P()  # Small leaves stay whole.
  assert sharding.fsdp_spec((768, 3072), 1, min_size=1) == P()
  mesh = sharding.make_mesh(fsdp=4)
  tree = {'k': jax.ShapeDtypeStruct((64, 32), np.float32), 'b': np.zeros(32)}
  out = sharding.tree_shardings(tree, mesh, 'fsdp', min_size=1)
  assert out['k'].spec == P('fsdp', None) and out['b'].spec == P('fsdp')
  assert sharding.tree_shardings(tree, mesh)['k'].spec == P()
  with pytest.raises(ValueError, match="Unknown sharding rule 'zero3'"):
    sharding.tree_shardings(tree, mesh, 'zero3')


def _losses(workdir):
  return [r['train/loss'] for r in metrics_lib.read_jsonl(workdir) if 'train/loss' in r]


def test_one_and_eight_devices_and_fsdp_train_the_same(tmp_path):
  overrides = {'total_steps': 2, 'log_every': 1, 'checkpoint_every': 0, 'eval_at_start': False}
  runs = {
      'one': get_config(**overrides, **{'mesh.num_devices': 1}),
      'eight': get_config(**overrides),
      'fsdp': get_config(**overrides, **{'mesh.fsdp': 4, 'param_sharding': 'fsdp',
                                         'mesh.fsdp_min_size': 64}),
  }
  results = {k: train.train_and_evaluate(c, str(tmp_path / k)) for k, c in runs.items()}
  assert results['one'].frozen['embedding']['kernel'].sharding.mesh.size == 1
  block = results['fsdp'].frozen['Transformer']['encoderblock_0']
  kernel = block['MlpBlock_0']['Dense_0']['kernel']
  assert kernel.sharding.spec == P(None, 'fsdp')  # (32, 64): the wider dim is split.
  reference = _losses(str(tmp_path / 'one'))
  assert len(reference) == 2
  for name in ('eight', 'fsdp'):
    np.testing.assert_allclose(_losses(str(tmp_path / name)), reference, rtol=0, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 results[name].delta, results['one'].delta)
