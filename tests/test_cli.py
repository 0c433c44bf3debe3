"""The command line as a user meets it: help, one-line errors, every option reachable, any cwd."""

import json
import os
import sys

import numpy as np
from PIL import Image
import pytest

from cli_runner import run_cli
from vadapt import checkpoint as ckpt_lib

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
CONFIG = os.path.join(REPO, 'configs', 'vit_b16_adapter.py')


def image_folder(root, classes=('ant', 'bee', 'cat'), per_class=6, size=(12, 10)):
  """root/<class>/<i>.png, each class its own colour."""
  for c, name in enumerate(classes):
    os.makedirs(root / name, exist_ok=True)
    for i in range(per_class):
      colour = (80 * c % 256, 40 + 20 * i, 200 - 60 * c)
      Image.new('RGB', size, colour).save(root / name / f'{i}.png')
  return root


def test_help_lists_modes_methods_and_the_configs_options(capsys):
  assert run_cli(['--help']) == 0
  out = capsys.readouterr().out
  for word in ('train', 'eval', 'export', 'predict', 'zeroshot', 'tip_adapter', 'retrieval',
               'houlsby', 'pfeiffer', 'clip_adapter', '--workdir', '--config'):
    assert word in out
  assert run_cli(['--help', f'--config={CONFIG}']) == 0
  out = capsys.readouterr().out
  assert "Arguments after ':'" in out  # The config's own documentation.
  for option in ('--config.input.path=None  (str)', '--config.input.few_shot=None  (int)',
                 '--config.adapter.reduction_factor=None  (float)',
                 '--config.backbone.overrides.num_layers=None  (int)',
                 "--config.adapter.method='houlsby'"):
    assert option in out


@pytest.mark.parametrize('args, cause', [
    (['--config.adaptr.bottleneck=1'], 'Did you mean "adapter" instead of "adaptr"'),
    (['--workdri=x'], 'Unknown command line flag \'workdri\''),
    (['--config.batch_size=0'], 'batch_size must be a positive number of images; found 0'),
    (['--mode=eval'], 'No checkpoint in'),
    (['--config.backbone.checkpoint=/no/such.npz'], '/no/such.npz'),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, args, cause):
  argv = [f'--config={CONFIG}:test', f'--workdir={tmp_path / "w"}'] + args
  assert run_cli(argv) == 2
  captured = capsys.readouterr()
  first, hint = captured.err.strip().splitlines()
  assert first.startswith('vadapt: error: ') and cause in first, first
  assert hint == '(-v shows the traceback)'
  assert 'Traceback' not in captured.err + captured.out
  with pytest.raises(Exception, match='batch_size must be a positive'):  # -v: the real error.
    run_cli([f'--config={CONFIG}:test', f'--workdir={tmp_path / "w"}', '-v',
             '--config.batch_size=0'])


def test_configs_load_from_any_directory(tmp_path, monkeypatch, capsys):
  """`from configs import common` resolves from the config file's location, not the cwd."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, 'path', [p for p in sys.path
                                    if os.path.abspath(p or '.') != REPO and p not in ('', '.')])
  for name in [m for m in sys.modules if m == 'configs' or m.startswith('configs.')]:
    monkeypatch.delitem(sys.modules, name)
  assert run_cli([f'--config={CONFIG}:test', f'--workdir={tmp_path / "w"}', '--mode=eval']) == 2
  err = capsys.readouterr().err
  assert 'No checkpoint in' in err and 'configs' not in err.split('No checkpoint')[0]


def test_every_none_default_option_is_settable_from_the_command_line_then_predict(tmp_path,
                                                                                capsys):
  data = tmp_path / 'data'
  image_folder(data / 'train', per_class=4)
  image_folder(data / 'val', per_class=3, size=(9, 14))
  workdir = tmp_path / 'w'
  argv = [f'--config={CONFIG}:test', f'--workdir={workdir}', '--config.mesh.num_devices=1',
          '--config.input.source=imagefolder', f'--config.input.path={data}',
          '--config.input.eval_split=val', '--config.input.classes=(0,2)',
          '--config.input.few_shot=2', '--config.input.flip=false', '--config.input.crop_scale=()',
          '--config.input.eval_crop_fraction=1.0', '--config.input.shuffle_buffer=10',
          '--config.adapter.reduction_factor=4', '--config.adapter.layers=(0,)',
          '--config.backbone.overrides.num_layers=1', '--config.backbone.overrides.mlp_dim=48',
          '--config.batch_size=4', '--config.total_steps=2', '--config.eval_at_start=false',
          '--config.optimizer.learning_rate=0.1']
  assert run_cli(argv) == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  assert 'step 2/2' in out
  accuracy = float(out.split('eval accuracy after 2 steps: ')[1].split()[0])
  meta = ckpt_lib.Checkpointer(str(workdir)).restore_meta(2)
  c = meta['config']['input']
  assert (c['path'], c['classes'], c['few_shot'], c['flip']) == (str(data), [0, 2], 2, False)
  assert (c['crop_scale'], c['eval_crop_fraction'], c['shuffle_buffer']) == ([], 1.0, 10)
  assert meta['adapter']['reduction_factor'] == 4 and meta['adapter']['bottleneck'] is None
  adapter = str(workdir / 'adapter.safetensors')
  flat, stored = ckpt_lib.read_adapter(adapter)
  # Width 32 // 4 = 8; one block (overrides.num_layers), the head has the two selected classes.
  assert flat['Transformer/encoderblock_0/MlpBlock_0/adapter/down/kernel'].shape == (32, 8)
  assert not any('encoderblock_1' in k for k in flat)
  assert flat['head/kernel'].shape == (32, 2)
  assert stored['class_names'] == ['ant', 'cat'] and stored['preprocess'] == 'vit'

  # --mode=predict with the file alone: top-k names and probabilities; on the eval images it
  # reproduces the run's eval accuracy (same model, same preprocessing).
  images = [str(data / 'val' / 'ant'), str(data / 'val' / 'cat')]
  assert run_cli(['--mode=predict', f'--adapter={adapter}', f'--images={",".join(images)}',
                  '--top_k=2']) == 0, capsys.readouterr().err
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 6
  correct = 0
  for line in lines:
    path, classes = line.split(': ')
    (first, p1), (second, p2) = [c.split() for c in classes.split(', ')]
    assert {first, second} == {'ant', 'cat'} and float(p1) >= float(p2)
    assert abs(float(p1) + float(p2) - 1.0) < 2e-3
    correct += first == os.path.basename(os.path.dirname(path))
  assert round(correct / 6, 3) == accuracy
  from vadapt import predict
  again = predict.predict(images, adapter, top_k=1)
  assert [p.top_k[0][0] for p in again] == [line.split(': ')[1].split()[0] for line in lines]

  # tfds data_dir reaches the loader (named in its offline error).
  argv = [f'--config={CONFIG}:test', f'--workdir={tmp_path / "t"}', '--config.input.source=tfds',
          '--config.input.name=mnist', f'--config.input.data_dir={tmp_path / "tfds"}']
  assert run_cli(argv) == 2
  assert str(tmp_path / 'tfds') in capsys.readouterr().err


def test_corrupt_or_non_image_files_are_named(tmp_path, capsys):
  data = image_folder(tmp_path / 'data', classes=('ant', 'bee'))
  (data / 'bee' / 'notes.jpg').write_text('not an image')
  argv = [f'--config={CONFIG}:test', f'--workdir={tmp_path / "w"}',
          '--config.input.source=imagefolder', f'--config.input.path={data}',
          '--config.input.eval_split=val', '--config.input.val_fraction=0.5']
  assert run_cli(argv) == 2
  err = capsys.readouterr().err.splitlines()[0]
  assert f"Image file '{data / 'bee' / 'notes.jpg'}' is not a jpg, png, gif or bmp image" in err

  os.remove(data / 'bee' / 'notes.jpg')
  good = (data / 'ant' / '0.png').read_bytes()
  (data / 'ant' / '3.png').write_bytes(good[:40])  # A PNG header, then nothing.
  assert run_cli(argv) == 2
  err = capsys.readouterr().err.splitlines()[0]
  assert f"Image '{data / 'ant' / '3.png'}' cannot be decoded" in err


def test_summary_reports_a_checkpoint_directory_like_a_file(tmp_path, capsys):
  import types
  import ml_collections
  from vadapt import train
  ckpt_dir = tmp_path / 'hf_clip'  # A Hugging Face CLIP checkpoint is a directory.
  ckpt_dir.mkdir()
  (ckpt_dir / 'model.safetensors').write_bytes(b'0' * 3072)
  (ckpt_dir / 'config.json').write_bytes(b'0' * 1024)
  config = ml_collections.ConfigDict(dict(adapter=dict(method='houlsby'), seed=0,
                                          backbone=dict(checkpoint=str(ckpt_dir))))
  exp = types.SimpleNamespace(config=config, counts={'adapter': 10, 'frozen': 90},
                              info=types.SimpleNamespace(num_classes=2),
                              frozen={'w': np.zeros((4,), np.float32)})
  metrics = {'eval/accuracy': 0.5, 'eval/examples': 8}
  train._log_summary(exp, metrics, str(tmp_path / 'checkpoints'), 2, None)
  out = capsys.readouterr().out
  assert f'it stays in {ckpt_dir} (4.0 KiB)' in out and 'rebuilt' not in out
  config.backbone.checkpoint = ''
  train._log_summary(exp, metrics, str(tmp_path / 'checkpoints'), 2, None)
  assert 'no backbone.checkpoint was given, so it is a random initialisation (seed 0)' in (
      capsys.readouterr().out)
