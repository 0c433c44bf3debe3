"""Serving files: an adapter directory round-trips bit-identically onto its backbone, sets load
in order, another backbone is refused, and nothing saved is overwritten unless asked."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from vadapt import adapter_dir, checkpoint, inject, multi
from vadapt.adapters import BottleneckConfig
from vadapt.pretrained.common import flatten, unflatten


class Features(nn.Module):
  """A compact two-layer feature extractor.

  Attributes:
    width: hidden width.
  """
  width: int = 12

  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name='fc2')(nn.relu(nn.Dense(self.width, name='fc1')(x)))


@pytest.fixture(scope='module')
def setup():
  x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
  backbone = Features()
  model = multi.adapt(backbone, [
      multi.NamedAdapter('pets', (inject.Target('fc1', BottleneckConfig(bottleneck=3)),),
                         num_classes=3, class_names=('cat', 'dog', 'rabbit')),
      multi.NamedAdapter('digits', (inject.Target(
          'fc2', BottleneckConfig(bottleneck=2, layer_norm=True), position='parallel',
          name='side'),), num_classes=2)])
  params = jax.jit(model.init)(jax.random.key(1), x)['params']
  rng = np.random.default_rng(1)
  params = unflatten({k: np.asarray(v) + rng.normal(size=v.shape).astype(np.float32)
                      if multi.owner(k, model.names()) else np.asarray(v)
                      for k, v in flatten(params).items()})
  run = jax.jit(lambda m, p, name: m.apply({'params': p}, x, adapter=name), static_argnums=(0, 2))
  return backbone, model, params, run


def test_round_trip_is_bit_identical(setup, tmp_path):
  backbone, model, params, run = setup
  directory = adapter_dir.save(str(tmp_path / 'pets'), model, params, 'pets')
  assert sorted(os.listdir(directory)) == ['adapter.safetensors', 'adapter_config.json']
  config = json.loads((tmp_path / 'pets' / 'adapter_config.json').read_text())
  assert config['class_names'] == ['cat', 'dog', 'rabbit'] and config['num_classes'] == 3
  assert config['targets'] == [{'pattern': 'fc1', 'position': 'output', 'name': 'adapter',
                                'adapter': BottleneckConfig(bottleneck=3).to_dict()}]
  bb_params = multi.backbone_params(model, params)
  loaded, loaded_params = adapter_dir.load(directory, backbone, bb_params)
  assert loaded.names() == ('pets',) and loaded.adapter('pets') == model.adapter('pets')
  np.testing.assert_array_equal(run(loaded, loaded_params, 'pets'), run(model, params, 'pets'))
  # Under another name, added to a model that already holds adapters.
  bigger, bigger_params = adapter_dir.add(loaded, loaded_params, directory, name='pets2')
  np.testing.assert_array_equal(run(bigger, bigger_params, 'pets2'), run(model, params, 'pets'))


def test_sets_load_in_order(setup, tmp_path):
  backbone, model, params, run = setup
  adapter_dir.save_set(str(tmp_path / 'all'), model, params)
  loaded, loaded_params = adapter_dir.load_set(str(tmp_path / 'all'), backbone,
                                               multi.backbone_params(model, params))
  assert loaded.adapters == model.adapters
  assert flatten(loaded_params).keys() == flatten(params).keys()
  for name in model.names():
    np.testing.assert_array_equal(run(loaded, loaded_params, name), run(model, params, name))


def test_nothing_is_overwritten_unless_asked(setup, tmp_path):
  _, model, params, _ = setup
  directory = str(tmp_path / 'pets')
  adapter_dir.save(directory, model, params, 'pets')
  before = (tmp_path / 'pets' / 'adapter.safetensors').read_bytes()
  with pytest.raises(FileExistsError, match=r"already holds \['adapter_config.json', "
                                            r"'adapter.safetensors'\]; pass overwrite=True"):
    adapter_dir.save(directory, model, params, 'digits')
  assert (tmp_path / 'pets' / 'adapter.safetensors').read_bytes() == before
  with pytest.raises(FileExistsError):  # A set writes nothing when one member exists.
    adapter_dir.save_set(str(tmp_path), model, params, ['digits', 'pets'])
  assert not (tmp_path / 'digits').exists()
  adapter_dir.save(directory, model, params, 'digits', overwrite=True)
  assert json.loads((tmp_path / 'pets' / 'adapter_config.json').read_text())['name'] == 'digits'


def test_another_backbone_is_refused(setup, tmp_path):
  _, model, params, _ = setup
  directory = adapter_dir.save(str(tmp_path / 'pets'), model, params, 'pets')
  wider = Features(width=16)
  wider_params = jax.jit(wider.init)(jax.random.key(3), np.zeros((1, 8), np.float32))['params']
  with pytest.raises(checkpoint.BackboneMismatchError, match='fingerprint'):
    adapter_dir.load(directory, wider, wider_params)
  bb_params = multi.backbone_params(model, params)
  retrained = jax.tree.map(lambda v: v + 1.0, bb_params)
  with pytest.raises(checkpoint.BackboneMismatchError, match='other weights'):
    adapter_dir.load(directory, Features(), retrained)
  adapter_dir.load(directory, Features(), retrained, check_weights=False)
  with pytest.raises(FileNotFoundError):
    adapter_dir.load(str(tmp_path / 'nowhere'), Features(), bb_params)
