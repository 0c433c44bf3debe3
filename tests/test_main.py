"""The command line: absl flags, config file with argument and overrides, modes."""

import importlib
import os

from absl import flags
from absl.testing import flagsaver
import pytest

from cli_runner import parse_flags
from cli_runner import run_main
from vadapt import checkpoint as ckpt_lib

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'vit_b16_adapter.py')


def test_train_then_eval_then_export_through_flags(tmp_path, capsys):
  workdir = str(tmp_path / 'work')
  common = [f'--config={CONFIG}:test', f'--workdir={workdir}', '--config.mesh.num_devices=1']
  run_main(common + ['--config.adapter.bottleneck=4', '--config.total_steps=2'])
  out = capsys.readouterr().out
  assert 'step 2/2' in out and 'img/s' in out and 'ETA' in out
  assert 'trainable' in out and 'eval accuracy after 2 steps' in out
  meta = ckpt_lib.Checkpointer(workdir).restore_meta(2)
  assert meta['adapter']['bottleneck'] == 4  # The override reached the run.

  run_main(common + ['--config.adapter.bottleneck=4', '--config.total_steps=2', '--mode=eval'])
  assert 'step 2: eval accuracy' in capsys.readouterr().out

  out_path = str(tmp_path / 'exported.safetensors')
  run_main(common + ['--config.adapter.bottleneck=4', '--config.total_steps=2', '--mode=export',
                 f'--out={out_path}'])
  flat, meta = ckpt_lib.read_adapter(out_path)
  assert meta['adapter']['bottleneck'] == 4
  assert flat['Transformer/encoderblock_0/MlpBlock_0/adapter/down/kernel'].shape == (32, 4)


def test_config_key_typo_is_an_error(tmp_path):
  with flagsaver.flagsaver():
    with pytest.raises(KeyError, match='Did you mean "adapter" instead of "adaptr"'):
      parse_flags([f'--config={CONFIG}:test', f'--workdir={tmp_path}', '--config.adaptr.bottleneck=1'])
  assert not os.listdir(tmp_path)


def test_unknown_config_argument_is_an_error(tmp_path):
  with flagsaver.flagsaver():
    with pytest.raises(flags.IllegalFlagValueError, match="Unknown config argument 'bottlenek'"):
      parse_flags([f'--config={CONFIG}:bottlenek=3', f'--workdir={tmp_path}'])


def test_eval_without_checkpoint_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    run_main([f'--config={CONFIG}:test', f'--workdir={tmp_path}', '--mode=eval'])


CONFIG_FILES = sorted(f for f in os.listdir(os.path.join(os.path.dirname(CONFIG)))
                      if f.endswith('.py') and f != 'common.py')


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_config_loads_and_documents_its_launch_command(name):
  module = importlib.import_module(f'configs.{name[:-3]}')
  assert f'python -m vadapt.main --config=configs/{name}' in module.__doc__
  full, test = module.get_config(), module.get_config('test')
  assert full.total_steps > test.total_steps
  real = (full.get('compare') or full.get('study') or {}).get('artifacts')
  if real:
    # A config about real weights and data (vadapt.artifacts): `test` shrinks the run, not them.
    assert (test.backbone.checkpoint, test.input.source) == (full.backbone.checkpoint,
                                                            full.input.source)
    if full.get('study'):  # Fewer methods, seeds and examples.
      assert len(test.study.methods) * len(test.study.seeds) < (
          len(full.study.methods) * len(full.study.seeds))
      assert test.study.train_examples < full.study.train_examples
    else:
      assert test.backbone.image_size < full.backbone.image_size
  else:
    if full.backbone.model in ('efficientnet_lite', 'resnet'):  # A tiny random CNN.
      assert test.backbone.overrides and not test.backbone.checkpoint
    else:
      tiny = 'tiny' if full.backbone.model == 'clip' else 'mu/4'  # The tiny CLIP / ViT.
      assert test.backbone.variant == tiny
    assert test.input.source == 'digits'
  with pytest.raises(ValueError, match="Unknown config argument 'nope'"):
    module.get_config('nope=1')


def test_config_arguments_are_typed():
  from configs import vit_b16_adapter
  config = vit_b16_adapter.get_config('variant=Ti/16,method=pfeiffer,bottleneck=16,steps=7')
  assert (config.backbone.variant, config.adapter.method) == ('Ti/16', 'pfeiffer')
  assert (config.adapter.bottleneck, config.total_steps) == (16, 7)
  with pytest.raises(ValueError, match=r'bottleneck=.*expected int'):
    vit_b16_adapter.get_config('bottleneck=wide')
