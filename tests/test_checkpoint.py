"""Delta checkpoints: bit-identical resume, adapter export/import, backbone fingerprints."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import backbones
from vadapt import checkpoint as ckpt_lib
from vadapt import partition
from vadapt import experiment
from vadapt import export
from vadapt import train
from vadapt.pretrained import common as pretrained_common
from config_overrides import load_config


def get_config(**overrides):
  return load_config(**{'mesh.num_devices': 1, **overrides})


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 4-step run with checkpoints at 2 and 4; adapter dropout and AdapterDrop on, so their keys
  must follow the step for the resumed run to match."""
  root = tmp_path_factory.mktemp('ckpt')
  config = get_config(**{'total_steps': 4, 'checkpoint_every': 2, 'max_to_keep': 5,
                         'adapter.dropout': 0.3, 'adapter.drop_rate': 0.5})
  result = train.train_and_evaluate(config, str(root / 'work'))
  return config, result, root


def test_resume_is_bit_identical(run):
  config, uninterrupted, root = run
  # A run killed right after its step-2 checkpoint leaves exactly this workdir behind.
  killed = str(root / 'killed')
  shutil.copytree(str(root / 'work'), killed)
  shutil.rmtree(os.path.join(killed, 'checkpoints', '4'))
  assert ckpt_lib.Checkpointer(killed).latest_step() == 2
  resumed = train.train_and_evaluate(config, killed)

  assert resumed.step == 4
  flat_a = pretrained_common.flatten(uninterrupted.delta)
  flat_b = pretrained_common.flatten(resumed.delta)
  assert set(flat_a) == set(flat_b)
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
  # And the dropout really acted: a run without it ends elsewhere (so the test can fail).
  assert not np.array_equal(flat_a['head/kernel'], np.zeros_like(flat_a['head/kernel']))


def test_meta_records_spec_and_fingerprint(run):
  _, result, root = run
  meta = ckpt_lib.Checkpointer(str(root / 'work')).restore_meta(4)
  assert meta['step'] == 4
  assert meta['adapter']['method'] == 'houlsby' and meta['adapter']['bottleneck'] == 8
  assert meta['adapter']['dropout'] == 0.3 and meta['adapter']['drop_rate'] == 0.5
  assert meta['config']['adapter']['bottleneck'] == 8
  assert meta['backbone_fingerprint'] == ckpt_lib.fingerprint(result.frozen)
  assert len(meta['backbone_fingerprint']) == 64
  assert meta['backbone_checkpoint'] == ''  # The :test config starts from a random init.


def test_fingerprint_sees_paths_shapes_and_dtypes():
  tree = {'a': {'kernel': np.zeros((2, 3), np.float32)}, 'b': np.zeros((4,), np.float32)}
  base = ckpt_lib.fingerprint(tree)
  assert base == ckpt_lib.fingerprint(jax.tree.map(np.ones_like, tree))  # Values do not count.
  assert base != ckpt_lib.fingerprint({**tree, 'b': np.zeros((5,), np.float32)})
  assert base != ckpt_lib.fingerprint({**tree, 'b': np.zeros((4,), np.float16)})
  assert base != ckpt_lib.fingerprint({'c': tree['a'], 'b': tree['b']})


def _backbone(config):
  model, backbone = experiment.build_model(config, 10)
  # The run's backbone was a random init from config.seed (no checkpoint): rebuild the same one.
  backbone_params = backbones.load_params(config.backbone, backbone,
                                          rng=jax.random.fold_in(jax.random.PRNGKey(0), 1))
  return model, backbone_params


def test_exported_adapter_restores_the_trained_model(run, tmp_path):
  config, result, root = run
  model, backbone_params = _backbone(config)
  path = export.export_adapter(config, str(root / 'work'), str(tmp_path / 'x.safetensors'))
  flat, meta = ckpt_lib.read_adapter(path)
  assert set(flat) == set(pretrained_common.flatten(result.delta))
  assert meta['adapter']['method'] == 'houlsby' and meta['step'] == 4
  for key, value in pretrained_common.flatten(result.delta).items():
    np.testing.assert_array_equal(flat[key], value, err_msg=key)

  params = ckpt_lib.load_adapter(path, model, backbone_params)
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  expected = model.apply({'params': partition.merge(result.delta, jax.device_get(result.frozen))},
                         images, train=False)
  np.testing.assert_array_equal(model.apply({'params': params}, images, train=False), expected)
  # The file has no backbone tensor in it.
  assert not any(k.startswith(('embedding/', 'Transformer/posembed')) for k in flat)


def test_adapter_on_another_backbone_is_refused(run):
  config, result, _ = run
  model, backbone_params = _backbone(config)
  other = jax.tree.map(lambda x: np.asarray(x, np.float16), backbone_params)
  with pytest.raises(ckpt_lib.BackboneMismatchError, match='fingerprint'):
    ckpt_lib.load_adapter(result.adapter_path, model, other)
  wider = backbones.make_model(get_config(**{'backbone.variant': 'mu/8'}).backbone, 10)
  wider_params = backbones.load_params(get_config(**{'backbone.variant': 'mu/8'}).backbone, wider)
  with pytest.raises(ckpt_lib.BackboneMismatchError):
    ckpt_lib.load_adapter(result.adapter_path, model, wider_params)


def test_read_adapter_rejects_foreign_files(tmp_path):
  from safetensors.numpy import save_file
  path = str(tmp_path / 'plain.safetensors')
  save_file({'w': np.zeros(3, np.float32)}, path)
  with pytest.raises(ValueError, match='not a vadapt adapter file'):
    ckpt_lib.read_adapter(path)
  with pytest.raises(FileNotFoundError):
    ckpt_lib.read_adapter(str(tmp_path / 'missing.safetensors'))


def test_checkpointer_roundtrip_keeps_structure_and_shardings(tmp_path):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ('data',))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  delta = {'head': {'kernel': jax.device_put(jnp.arange(6.0).reshape(2, 3), sh)}}
  opt_state = (jax.device_put(jnp.zeros((), jnp.int32), sh), {'mu': delta})
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1)
  checkpointer.save(1, delta, opt_state, {'step': 1, 'note': 'x'})
  checkpointer.save(2, delta, opt_state, {'step': 2, 'note': 'y'})
  checkpointer.wait()
  assert checkpointer.all_steps() == [2]  # max_to_keep
  d, o, meta = checkpointer.restore(2, delta, opt_state)
  checkpointer.close()
  assert meta == {'step': 2, 'note': 'y'}
  np.testing.assert_array_equal(d['head']['kernel'], delta['head']['kernel'])
  assert d['head']['kernel'].sharding == sh
  assert jax.tree.structure(o) == jax.tree.structure(opt_state)
