"""End-to-end training on the tiny configs, and the errors bad inputs must give."""

import os
import shutil

import jax
import numpy as np
import pytest

from vadapt import backbones
from vadapt import checkpoint as ckpt_lib
from vadapt import metrics as metrics_lib
from vadapt import partition
from vadapt import evaluate
from vadapt import experiment
from vadapt import train
from vadapt.pretrained import common as pretrained_common
from vadapt.pretrained import vit as vit_loader
from config_overrides import load_config

def get_config(name='vit_b16_adapter', arg='test', **overrides):
  """A `:test` config on one device (the sharding tests cover meshes) with dotted overrides."""
  return load_config(name, arg, **{'mesh.num_devices': 1, **overrides})


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """One 4-step run of vit_b16_adapter:test on a backbone loaded from a vit_jax .npz."""
  root = tmp_path_factory.mktemp('run')
  npz = str(root / 'backbone.npz')
  config = get_config(**{'backbone.checkpoint': npz, 'checkpoint_every': 2, 'max_to_keep': 5})
  random_backbone = get_config().backbone
  vit_loader.save_vit_jax_npz(backbones.load_params(
      random_backbone, backbones.make_model(random_backbone, 10), rng=jax.random.PRNGKey(42)), npz)
  result = train.train_and_evaluate(config, str(root / 'work'))
  return config, result, str(root / 'work'), npz


def test_vit_b16_adapter_test_config_trains(run):
  config, result, workdir, _ = run
  assert result.step == config.total_steps == 4
  assert np.isfinite(result.metrics['train/loss'])
  assert 0.0 <= result.metrics['eval/accuracy'] <= 1.0
  assert 'eval/accuracy_at_start' in result.metrics
  assert ckpt_lib.Checkpointer(workdir).all_steps() == [2, 4]
  assert os.path.exists(result.adapter_path)
  records = metrics_lib.read_jsonl(workdir)
  assert [r['step'] for r in records if 'train/loss' in r] == [2, 4]
  assert {'train/accuracy', 'train/learning_rate', 'train/grad_norm',
          'train/img_per_sec'} <= set(records[-2])
  assert any('eval/accuracy' in r for r in records)
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_digits_demo_test_config_pretrains_then_adapts(tmp_path):
  config = get_config('digits_demo')
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.step == config.total_steps
  # Stage 1 wrote a real vit_jax checkpoint; stage 2 loaded it, froze it and trained adapters.
  npz = os.path.join(tmp_path, config.pretrain.output)
  assert vit_loader.detect_format(npz) == 'vit_jax'
  assert ckpt_lib.Checkpointer(str(tmp_path / 'pretrain')).latest_step() == 4
  meta = ckpt_lib.Checkpointer(str(tmp_path)).restore_meta(4)
  assert meta['backbone_checkpoint'] == npz and meta['adapter']['method'] == 'houlsby'
  pretrained = pretrained_common.flatten(vit_loader.load(
      npz, backbones.make_model(config.backbone, 5), image_size=config.backbone.image_size))
  for key, value in pretrained_common.flatten(jax.device_get(result.frozen)).items():
    np.testing.assert_array_equal(value, pretrained[key], err_msg=key)
  # The new head started from zero, not from the source task's head.
  assert result.metrics['eval/accuracy_at_start'] < 0.5


def test_frozen_backbone_bit_identical(run):
  config, result, _, npz = run
  loaded = pretrained_common.flatten(vit_loader.load(
      npz, backbones.make_model(config.backbone, 10), image_size=config.backbone.image_size))
  frozen = pretrained_common.flatten(jax.device_get(result.frozen))
  assert frozen and set(frozen) == set(loaded) - {'head/kernel', 'head/bias'}
  for key, value in frozen.items():
    np.testing.assert_array_equal(value, loaded[key], err_msg=key)


def test_workdir_holds_only_delta_opt_state_and_meta(run):
  _, result, workdir, _ = run
  frozen = pretrained_common.flatten(jax.device_get(result.frozen))
  step_dir = os.path.join(result.checkpoint_dir, '4')
  items = {d for d in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, d))}
  assert items == {'delta', 'opt_state', 'meta'}
  delta_keys = set(pretrained_common.flatten(ckpt_lib.Checkpointer(workdir).restore_delta(4)))
  assert delta_keys and not delta_keys & set(frozen)
  assert all('/adapter/' in k or k.startswith('head/') for k in delta_keys)
  # Orbax stores these small arrays raw: a trained delta leaf's bytes appear in the checkpoint
  # files, while no frozen tensor's bytes appear anywhere in the workdir.
  blobs = []
  for root, _, files in os.walk(workdir):
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        blobs.append(fh.read())
  data = b'\0'.join(blobs)
  restored = ckpt_lib.Checkpointer(workdir).restore_delta(4)
  largest = max(jax.tree.leaves(restored), key=lambda x: x.size)
  assert np.asarray(largest).tobytes() in data
  for key, value in frozen.items():
    if value.nbytes >= 256:
      assert np.asarray(value).tobytes() not in data, f'{key} was written to {workdir}'
  delta_bytes = sum(np.asarray(v).nbytes for v in jax.tree.leaves(result.delta))
  assert 4 * delta_bytes < sum(v.nbytes for v in frozen.values())


@pytest.mark.parametrize('method', ['linear', 'full'])
def test_one_step_linear_probe_and_full_finetuning_use_the_same_path(method, tmp_path):
  config = get_config(**{'adapter.method': method, 'total_steps': 1, 'eval_at_start': False})
  result = train.train_and_evaluate(config, str(tmp_path))
  delta = pretrained_common.flatten(result.delta)
  if method == 'linear':
    assert set(delta) == {'head/kernel', 'head/bias'}
    assert result.adapter_path is not None
  else:
    assert not jax.tree.leaves(result.frozen) and 'embedding/kernel' in delta
    assert result.adapter_path is None  # Nothing adapter-sized to export.
  assert not any('/adapter/' in k for k in delta)
  assert np.isfinite(result.metrics['train/loss'])


def test_xla_cpu_individual_dots_reach_the_step_compiles(tmp_path, monkeypatch):
  """The switch adds XLA:CPU's individual-dot option to the train and eval steps' compiles; the
  run trains as without it (other matmul kernels: the same result up to rounding)."""
  seen = []
  jit = jax.jit

  def spy(fn, *args, **kwargs):
    seen.append(kwargs.get('compiler_options'))
    return jit(fn, *args, **kwargs)

  results = {}
  for on in (False, True):
    config = get_config(**{'total_steps': 1, 'eval_at_start': False,
                           'xla_cpu_individual_dots': on})
    expected = ({'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
                if on else None)
    assert experiment.compiler_options(config) == expected
    seen.clear()
    monkeypatch.setattr(jax, 'jit', spy)
    results[on] = train.train_and_evaluate(config, str(tmp_path / str(on)))
    monkeypatch.setattr(jax, 'jit', jit)
    if on:
      assert seen.count(expected) >= 2, seen  # The train step and the eval step.
    else:
      assert not any(seen), seen
  a, b = (pretrained_common.flatten(results[on].delta) for on in (False, True))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-4, atol=1e-5,
                               err_msg=k)


def test_compiler_options_xla_refuses_fail_before_any_work(tmp_path):
  config = get_config(**{'total_steps': 1})
  with config.unlocked():
    config.compiler_options = {'xla_no_such_option': 1}
  with pytest.raises(ValueError, match='XLA refused compiler_options'):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not os.path.exists(tmp_path / 'work') or not os.listdir(tmp_path / 'work')


# ------------------------------------------------------------------------------- bad inputs


def _assert_checkpoint_intact(workdir, step=4):
  checkpointer = ckpt_lib.Checkpointer(workdir)
  assert checkpointer.latest_step() == step
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(checkpointer.restore_delta(step)))


def test_unknown_dataset_name(run):
  workdir = run[2]
  config = get_config(**{'input.source': 'tfds', 'input.name': 'no_such_dataset_xyz'})
  with pytest.raises(Exception, match='no_such_dataset_xyz'):
    train.train_and_evaluate(config, workdir)
  _assert_checkpoint_intact(workdir)


def test_dataset_not_present_offline_fails_fast(tmp_path):
  import time
  config = get_config(**{'input.source': 'tfds', 'input.name': 'cifar10',
                         'input.data_dir': str(tmp_path / 'tfds')})
  start = time.perf_counter()
  with pytest.raises(Exception, match='cifar10'):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  # tfds's own download path retries for ~200 s; a generous bound keeps this robust under load.
  assert time.perf_counter() - start < 60


def test_missing_checkpoint_path(run, tmp_path):
  workdir = run[2]
  config = get_config(**{'backbone.checkpoint': str(tmp_path / 'nope.npz')})
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    train.train_and_evaluate(config, workdir)
  _assert_checkpoint_intact(workdir)


def test_batch_size_not_divisible_by_devices(tmp_path):
  assert jax.device_count() == 8
  config = get_config(batch_size=12, **{'mesh.num_devices': -1})
  with pytest.raises(ValueError, match=r'batch_size=12 is not divisible by the 8 devices'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints'))


def test_unknown_method():
  with pytest.raises(ValueError, match="Unknown adapter.method 'lora_typo'"):
    experiment.adapter_spec(get_config(**{'adapter.method': 'lora_typo'}))


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="Unknown config argument 'bottlenek'"):
    get_config('vit_b16_adapter', 'bottlenek=3')


def test_nan_loss_stops_keeps_last_good_checkpoint_and_names_the_step(tmp_path):
  config = get_config(**{'total_steps': 6, 'checkpoint_every': 2, 'log_every': 1,
                         'debug.nan_at_step': 5, 'eval_at_start': False})
  with pytest.raises(train.TrainingDivergedError, match=r'diverged at step 5\b.*step 4'):
    train.train_and_evaluate(config, str(tmp_path))
  _assert_checkpoint_intact(str(tmp_path), step=4)
  assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [2, 4]


def test_resume_refuses_a_checkpoint_of_another_backbone(run):
  workdir = run[2]
  config = get_config(**{'backbone.variant': 'mu/8', 'total_steps': 6})
  with pytest.raises(experiment.CheckpointConfigMismatchError,
                     match=r"backbone.variant 'mu/4' -> 'mu/8'"):
    train.train_and_evaluate(config, workdir)
  _assert_checkpoint_intact(workdir)


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


@pytest.fixture(scope='module')
def other_weights(run, tmp_path_factory):
  """A backbone file of the same architecture as the run's, with other values."""
  path = str(tmp_path_factory.mktemp('other') / 'other_backbone.npz')
  cfg = get_config().backbone
  vit_loader.save_vit_jax_npz(backbones.load_params(
      cfg, backbones.make_model(cfg, 10), rng=jax.random.PRNGKey(7)), path)
  return path


def test_other_weights_of_the_same_shape_are_refused_and_nothing_is_touched(
    run, other_weights, tmp_path, capsys):
  _, _, workdir, npz = run
  work = str(tmp_path / 'work')
  shutil.copytree(workdir, work)
  before = snapshot(work)
  # max_to_keep=1 would delete steps 2 and 4 at the first save; total_steps=6 trains on.
  config = get_config(**{'backbone.checkpoint': other_weights, 'total_steps': 6,
                         'max_to_keep': 1})
  with pytest.raises(ckpt_lib.BackboneMismatchError) as e:
    train.train_and_evaluate(config, work)
  message = str(e.value)
  assert 'same architecture, different weights' in message
  assert npz in message and other_weights in message
  assert '--config.checkpoint.allow_other_backbone=True' in message
  assert snapshot(work) == before  # No step deleted, no adapter overwritten, no file added.

  with pytest.raises(ckpt_lib.BackboneMismatchError, match='different weights'):
    evaluate.evaluate(config, work)
  assert snapshot(work) == before
  capsys.readouterr()
  config.checkpoint.allow_other_backbone = True
  assert evaluate.evaluate(config, work)['step'] == 4
  assert 'Going on, as checkpoint.allow_other_backbone=True asks' in capsys.readouterr().out


def test_metrics_rows_are_on_disk_as_they_are_written(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write_scalars(1, {'train/loss': 2.5})
  writer.write_scalars(2, {'train/loss': 1.5})
  # Read by another reader while the writer is open (as after a kill -9: no flush, no close).
  assert metrics_lib.read_jsonl(str(tmp_path)) == [{'step': 1, 'train/loss': 2.5},
                                                   {'step': 2, 'train/loss': 1.5}]
  writer.close()


def test_labels_cover_delta_exactly():
  config = get_config()
  model, backbone = experiment.build_model(config, 10)
  assert model is not backbone
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros(
      (1, 32, 32, 3), np.float32))['params'])
  labels = partition.label_tree(shapes, experiment.label_rules(config))
  delta, frozen = partition.split(shapes, labels)
  assert set(pretrained_common.flatten(delta)) == {
      k for k in pretrained_common.flatten(shapes) if '/adapter/' in k or k.startswith('head/')}
  assert jax.tree.leaves(frozen)


@pytest.mark.slow
def test_vit_b16_recipe_one_step_from_a_vit_jax_checkpoint(tmp_path):
  """The real recipe (ViT-B/16 at 224 from an .npz, tfds) for one step on mock tfds data."""
  import tensorflow_datasets as tfds
  config = get_config(arg='dataset=cifar100', batch_size=8, eval_batch_size=8, total_steps=1,
                      eval_at_start=False)
  npz = str(tmp_path / 'ViT-B_16.npz')
  vit_loader.save_vit_jax_npz(backbones.load_params(
      config.backbone, backbones.make_model(config.backbone, 1000)), npz)
  config.backbone.checkpoint = npz
  with tfds.testing.mock_data(num_examples=8):
    result = train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert result.step == 1 and np.isfinite(result.metrics['train/loss'])
  assert sum(np.asarray(x).size for x in jax.tree.leaves(result.delta)) == 2_456_164
  # The 86M-parameter backbone is not in the workdir: far less than its 330 MiB is written.
  workdir_bytes = sum(os.path.getsize(os.path.join(r, f))
                      for r, _, fs in os.walk(tmp_path / 'work') for f in fs)
  assert workdir_bytes < 100 * 2 ** 20
