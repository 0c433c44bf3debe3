"""Delta checkpoints: bit-identical resume, adapter export/import, backbone fingerprints."""

import copy
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import backbones
from vadapt import checkpoint as ckpt_lib
from vadapt import partition
from vadapt import evaluate
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


@pytest.mark.parametrize('killed_at', ['after_step_2', 'saving_step_4'])
def test_resume_is_bit_identical(run, killed_at, tmp_path, capsys):
  config, uninterrupted, root = run
  killed = str(tmp_path / 'killed')
  shutil.copytree(str(root / 'work'), killed)
  step_4 = os.path.join(killed, 'checkpoints', '4')
  if killed_at == 'after_step_2':  # Killed right after its step-2 checkpoint.
    shutil.rmtree(step_4)
    assert ckpt_lib.Checkpointer(killed).latest_step() == 2
  else:  # Killed while step 4 was being written: everything but Orbax's commit marker.
    os.remove(os.path.join(step_4, 'commit_success.txt'))
    assert ckpt_lib.Checkpointer(killed).latest_step() == 4
  resumed = train.train_and_evaluate(config, killed)
  out = capsys.readouterr().out
  assert 'Resumed from the checkpoint at step 2' in out
  if killed_at == 'saving_step_4':
    assert (f'Skipped the checkpoint at step 4 in {killed}/checkpoints: it has no commit marker '
            f'(commit_success.txt): its save never finished. Moved it to '
            f'{killed}/damaged_checkpoints/4 (kept for inspection).') in out
    assert os.path.isdir(os.path.join(killed, 'damaged_checkpoints', '4', 'delta'))

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


def test_fingerprint_sees_paths_shapes_dtypes_and_values():
  tree = {'a': {'kernel': np.zeros((2, 3), np.float32)}, 'b': np.zeros((4,), np.float32)}
  base = ckpt_lib.fingerprint(tree)
  assert base == ckpt_lib.fingerprint(jax.tree.map(jnp.asarray, tree))  # Host or device.
  assert base != ckpt_lib.fingerprint({**tree, 'b': np.asarray([0, 0, 0, 1e-30], np.float32)})
  assert base != ckpt_lib.fingerprint({**tree, 'b': np.zeros((5,), np.float32)})
  assert base != ckpt_lib.fingerprint({**tree, 'b': np.zeros((4,), np.float16)})
  assert base != ckpt_lib.fingerprint({'c': tree['a'], 'b': tree['b']})
  layout = ckpt_lib.layout_fingerprint(tree)
  assert layout == ckpt_lib.layout_fingerprint(jax.tree.map(np.ones_like, tree)) != base
  # CLIP's classifier is computed from the text tower and the class names: layout only.
  clip = {'classifier': {'value': np.ones((3, 4), np.float32)}, **tree}
  assert ckpt_lib.fingerprint(clip) == ckpt_lib.fingerprint(
      {'classifier': {'value': np.zeros((3, 4), np.float32)}, **tree})


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
  # Same architecture, other values: refused unless asked for.
  nudged = jax.tree.map(np.copy, backbone_params)
  nudged['embedding']['kernel'][0, 0, 0, 0] += 1e-3
  with pytest.raises(ckpt_lib.BackboneMismatchError, match='same architecture, different weights'):
    ckpt_lib.load_adapter(result.adapter_path, model, nudged)
  params = ckpt_lib.load_adapter(result.adapter_path, model, nudged, allow_other_backbone=True)
  assert params['embedding']['kernel'][0, 0, 0, 0] == nudged['embedding']['kernel'][0, 0, 0, 0]
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


def test_adapter_without_meta_or_truncated_is_a_clear_error(run, tmp_path):
  config, result, _ = run
  model, backbone_params = _backbone(config)
  bare = ckpt_lib.save_adapter(str(tmp_path / 'bare.safetensors'), result.delta, {})
  with pytest.raises(ckpt_lib.AdapterFileError, match=r'records no backbone fingerprint'):
    ckpt_lib.load_adapter(bare, model, backbone_params)
  with pytest.raises(ckpt_lib.AdapterFileError, match=r'stores no image_size.*pass image_size='):
    ckpt_lib.load_adapter(bare, model, backbone_params, allow_other_backbone=True)
  assert ckpt_lib.load_adapter(bare, model, backbone_params, allow_other_backbone=True,
                               image_size=32)
  data = open(result.adapter_path, 'rb').read()
  cut = tmp_path / 'cut.safetensors'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(ckpt_lib.AdapterFileError,
                     match=f'Cannot read adapter file .*{cut}.*truncated'):
    ckpt_lib.load_adapter(str(cut), model, backbone_params)


def _write_then_fail(target):
  """Puts some bytes where a writer was told to, then dies (as on a kill or a full disk)."""
  if hasattr(target, 'write'):
    target.write(b'partial')
  else:
    with open(target, 'wb') as f:
      f.write(b'partial')
  raise OSError('disk full')


def test_files_are_replaced_atomically(run, tmp_path, monkeypatch):
  from vadapt.pretrained import vit as vit_loader
  _, result, _ = run
  adapter = str(tmp_path / 'a.safetensors')
  ckpt_lib.save_adapter(adapter, result.delta, {'step': 1})
  npz = str(tmp_path / 'backbone.npz')
  frozen = jax.device_get(result.frozen)
  frozen = {**frozen, 'head': jax.tree.map(np.asarray, result.delta['head'])}
  vit_loader.save_vit_jax_npz(frozen, npz)
  from vadapt.pretrained import state_dict
  torch_style = state_dict.save(str(tmp_path / 'cnn.safetensors'), {'w': np.ones(3, np.float32)})
  before = {p: open(p, 'rb').read() for p in (adapter, npz, torch_style)}

  import safetensors.numpy
  monkeypatch.setattr(safetensors.numpy, 'save_file',
                      lambda tensors, filename, **kw: _write_then_fail(filename))
  monkeypatch.setattr(np, 'savez', lambda file, **arrays: _write_then_fail(file))
  with pytest.raises(OSError, match='disk full'):
    ckpt_lib.save_adapter(adapter, result.delta, {'step': 2})
  with pytest.raises(OSError, match='disk full'):
    vit_loader.save_vit_jax_npz(frozen, npz)
  with pytest.raises(OSError, match='disk full'):
    state_dict.save(torch_style, {'w': np.zeros(3, np.float32)})
  from vadapt import files
  with pytest.raises(OSError, match='disk full'):
    with files.atomic_path(str(tmp_path / 'r.json')) as tmp:
      _write_then_fail(tmp)
  # The previous files are whole, and no temporary file is left behind.
  assert {p: open(p, 'rb').read() for p in (adapter, npz, torch_style)} == before
  assert sorted(os.listdir(tmp_path)) == ['a.safetensors', 'backbone.npz', 'cnn.safetensors']


def _data_files(step_dir):
  return [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, 'delta'))
          for f in fs if os.path.basename(r) == 'd']


def _truncate(step_dir):
  for path in _data_files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    'empty': (lambda d: (shutil.rmtree(d), os.mkdir(d)), 'its directory is empty'),
    'uncommitted': (lambda d: os.remove(os.path.join(d, 'commit_success.txt')),
                    'it has no commit marker'),
    'truncated_data': (_truncate, 'its files cannot be read'),
    'missing_data': (lambda d: [os.remove(p) for p in _data_files(d)], 'its files cannot be read'),
}


@pytest.fixture(scope='module')
def exp(run):
  return experiment.setup(run[0])


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_the_newest_intact_step_is_used_and_damaged_ones_are_kept(run, exp, damage, tmp_path,
                                                                   capsys):
  _, _, root = run
  work = str(tmp_path / 'work')
  shutil.copytree(str(root / 'work'), work)
  step_4 = os.path.join(work, 'checkpoints', '4')
  damage_fn, why = DAMAGE[damage]
  damage_fn(step_4)
  assert _data_files(os.path.join(work, 'checkpoints', '2'))
  opt_sh = experiment.opt_state_shardings(exp)
  delta, _, step = experiment.restore_or_init(exp, ckpt_lib.Checkpointer(work), opt_sh,
                                              purpose='eval')
  out = capsys.readouterr().out
  assert step == 2 and f'Skipped the checkpoint at step 4 in {work}/checkpoints: {why}' in out
  assert os.path.isdir(step_4)  # Evaluation moves nothing.
  want = ckpt_lib.Checkpointer(str(root / 'work')).restore_delta(2)
  for key, value in pretrained_common.flatten(want).items():
    np.testing.assert_array_equal(pretrained_common.flatten(jax.device_get(delta))[key], value)

  checkpointer = ckpt_lib.Checkpointer(work)
  _, _, step = experiment.restore_or_init(exp, checkpointer, opt_sh)
  assert step == 2 and checkpointer.all_steps() == [2]
  assert 'kept for inspection' in capsys.readouterr().out
  assert not os.path.exists(step_4)
  assert os.path.isdir(os.path.join(work, 'damaged_checkpoints', '4'))


def test_no_intact_step_is_an_error_for_eval(run, exp, tmp_path):
  _, _, root = run
  work = str(tmp_path / 'work')
  shutil.copytree(str(root / 'work'), work)
  for step in ('2', '4'):
    os.remove(os.path.join(work, 'checkpoints', step, 'commit_success.txt'))
  with pytest.raises(FileNotFoundError, match='No intact checkpoint'):
    experiment.restore_or_init(exp, ckpt_lib.Checkpointer(work),
                               experiment.opt_state_shardings(exp), purpose='eval')


def snapshot(directory):
  """{relative path: bytes (None for a directory)} of everything under `directory`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), directory) + '/'] = None
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
  return out


def _like_run(run, **overrides):
  """The run's config with dotted overrides."""
  config = copy.deepcopy(run[0])
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize('override,change', [
    ({'adapter.bottleneck': 16}, 'adapter.bottleneck 8 -> 16'),
    ({'adapter.method': 'pfeiffer'}, "adapter.method 'houlsby' -> 'pfeiffer'"),
    ({'train_head': False}, 'train_head True -> False; trained parameters differ (head/bias'),
])
def test_a_changed_adapter_is_refused_in_one_line(run, tmp_path, override, change):
  _, _, root = run
  work = str(tmp_path / 'work')
  shutil.copytree(str(root / 'work'), work)
  before = snapshot(work)
  config = _like_run(run, **{'total_steps': 6, 'max_to_keep': 1, **override})
  with pytest.raises(experiment.CheckpointConfigMismatchError) as e:
    train.train_and_evaluate(config, work)
  message = str(e.value)
  assert '\n' not in message and change in message, message
  assert message.startswith(f'The checkpoint at step 4 in {work}/checkpoints was trained with '
                            'other settings than this config: ')
  assert message.endswith('Use a new --workdir for the new settings, go back to the '
                          "checkpoint's, or pass --config.checkpoint.restart=True to start over "
                          'here (the old run is moved to previous_runs/, not deleted).')
  if 'bottleneck' in change:  # Evaluation and export compare the same way.
    with pytest.raises(experiment.CheckpointConfigMismatchError,
                       match=f'{change}. Run with the settings it was trained with'):
      evaluate.evaluate(config, work)
    with pytest.raises(experiment.CheckpointConfigMismatchError, match=change):
      export.export_adapter(config, work, str(tmp_path / 'x.safetensors'))
  assert snapshot(work) == before


def test_restart_moves_the_previous_run_aside(run, tmp_path, capsys):
  _, _, root = run
  work = str(tmp_path / 'work')
  shutil.copytree(str(root / 'work'), work)
  before = snapshot(work)
  config = get_config(**{'total_steps': 2, 'adapter.bottleneck': 16, 'checkpoint.restart': True,
                         'eval_at_start': False})
  result = train.train_and_evaluate(config, work)
  assert result.step == 2 and ckpt_lib.Checkpointer(work).all_steps() == [2]
  previous = os.path.join(work, 'previous_runs', '1')
  assert (f'Starting over, as checkpoint.restart=True asks: the previous run\'s checkpoints, '
          f'metrics and adapter were moved to {previous}.') in capsys.readouterr().out
  assert snapshot(previous) == before


def test_changed_learning_rate_or_steps_on_resume_is_one_line(run, tmp_path, capsys):
  config, _, root = run
  config = _like_run(run, **{'total_steps': 8, 'optimizer.learning_rate': 0.002})
  exp2 = experiment.setup(config)
  capsys.readouterr()
  _, _, step = experiment.restore_or_init(exp2, ckpt_lib.Checkpointer(str(root / 'work')),
                                          experiment.opt_state_shardings(exp2))
  lines = capsys.readouterr().out.splitlines()
  assert step == 4 and lines[0] == (
      'Note: resuming step 4 with changed settings: optimizer.learning_rate 0.001 -> 0.002, '
      'total_steps 4 -> 8 (the optimizer state and step count carry over; the schedule follows '
      'the new values).'), lines
