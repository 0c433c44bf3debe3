"""--mode=compare on the tiny ViT: one row per method, resumable, and the offline fallback."""

import json
import os

import pytest

from configs import vit_b16_adapter
from tests import cli_runner
from vadapt import artifacts
from vadapt import demo
from vadapt import train


def tiny_config(**compare):
  c = vit_b16_adapter.get_config('test')
  with c.unlocked():
    c.compare = dict(methods=('linear', 'houlsby'), learning_rates=dict(linear=1e-2), **compare)
  return c


def test_compare_trains_each_method_once_and_reuses_finished_runs(tmp_path, capsys, monkeypatch):
  rows = demo.compare(tiny_config(), str(tmp_path))
  assert [r.method for r in rows] == ['linear', 'houlsby']
  linear, houlsby = rows
  assert linear.learning_rate == 1e-2 and houlsby.learning_rate == 1e-3  # config's own rate.
  assert linear.steps == houlsby.steps == 4 and linear.eval_examples == 64
  assert linear.trainable < houlsby.trainable < houlsby.total
  assert linear.total + (houlsby.trainable - linear.trainable) == houlsby.total
  assert 0 < linear.delta_bytes < houlsby.delta_bytes < houlsby.backbone_bytes
  table = capsys.readouterr().out.rsplit('===', 1)[1]
  assert 'linear' in table and f'{houlsby.trainable:,}' in table and 'of backbone' in table
  stored = json.load(open(tmp_path / 'houlsby' / demo.RESULT_FILE))
  assert stored['row'] == {k: getattr(houlsby, k) for k in stored['row']}

  def no_training(*args, **kwargs):
    raise AssertionError('a finished method was trained again')
  monkeypatch.setattr(train, 'train_and_evaluate', no_training)
  assert demo.compare(tiny_config(), str(tmp_path)) == rows
  changed = tiny_config()
  changed.total_steps = 5
  with pytest.raises(ValueError, match='holds a result of another config'):
    demo.compare(changed, str(tmp_path))


def test_unknown_or_no_methods_are_errors(tmp_path):
  with pytest.raises(ValueError, match="compare.methods has 'lora2'"):
    demo.compare(tiny_config(), str(tmp_path), methods=('lora2',))
  with pytest.raises(ValueError, match='Nothing to compare'):  # Through the CLI's dispatch.
    cli_runner.run_main(['--config=configs/vit_b16_adapter.py:test', f'--workdir={tmp_path}',
                         '--mode=compare'])


def test_without_the_artifacts_the_fallback_runs_after_one_line(tmp_path, capsys, monkeypatch):
  def offline(name):
    raise artifacts.ArtifactError(f'Cannot fetch {name}: no network.')
  monkeypatch.setattr(artifacts, 'fetch', offline)
  fallback = os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'vit_b16_adapter.py')
  config = tiny_config(artifacts=('dinov2_s14_onnx',), fallback=fallback + ':test')
  assert demo.compare(config, str(tmp_path)) == []
  out = capsys.readouterr().out
  assert out.splitlines()[0] == ('Cannot fetch the pre-trained backbone and data (Cannot fetch '
                                 f'dinov2_s14_onnx: no network.); running '
                                 f'{os.path.relpath(fallback)}:test instead.')
  assert os.path.isdir(tmp_path / 'vit_b16_adapter' / 'checkpoints')
  with pytest.raises(artifacts.ArtifactError, match='no network'):
    demo.compare(tiny_config(artifacts=('dinov2_s14_onnx',)), str(tmp_path))


def test_each_method_gets_its_own_rate_and_lr_mults():
  from configs import dinov2_fashion_mnist  # pylint: disable=g-import-not-at-top
  c = dinov2_fashion_mnist.get_config()
  full, houlsby = demo.method_config(c, 'full'), demo.method_config(c, 'houlsby')
  assert full.optimizer.learning_rate == 1e-4 and houlsby.optimizer.learning_rate == 1e-3
  assert tuple(full.optimizer.lr_mults) == (('^head/', 100.0),)  # The head at the probe's rate.
  assert tuple(houlsby.optimizer.lr_mults) == ()
  single = dinov2_fashion_mnist.get_config('method=full')  # One run: the same settings.
  assert tuple(single.optimizer.lr_mults) == tuple(full.optimizer.lr_mults)
