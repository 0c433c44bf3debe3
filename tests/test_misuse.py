"""Silent misuse made loud: long CLIP prompts, adapter layers out of range, degenerate data,
CLIP modes on a trained workdir."""

import json
import logging
import os
import types

import jax
import numpy as np
import pytest

from cli_runner import run_main
from config_overrides import load_config
from vadapt import api
from vadapt import checkpoint as ckpt_lib
from vadapt import clip_modes
from vadapt import experiment
from vadapt import tokenizer as tokenizer_lib
from vadapt.models import clip_classifier
from vadapt.models import vit
from vadapt.pretrained import common as pretrained_common
from test_cli import image_folder

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, 'configs')


def test_prompt_cut_before_the_class_name_is_an_error_after_it_a_warning(caplog):
  tok = tokenizer_lib.default_tokenizer()
  long_lead = 'a photo of ' + 'a very ' * 40 + '{}.'
  with pytest.raises(ValueError, match=r"cutting it would remove the class name 'cat'"):
    clip_classifier.prompt_tokens(tok, ['cat', 'dog'], [long_lead])
  long_tail = 'a photo of a {}, ' + 'seen from far away ' * 20
  with caplog.at_level(logging.WARNING):
    ids = clip_classifier.prompt_tokens(tok, ['cat', 'dog'], ['a {}.', long_tail])
  assert "2 prompt(s) are longer than the text tower's 77 tokens and are cut after the class name" \
      in caplog.text
  assert len(ids[0][1]) == 77 and ids[0][1] != ids[1][1]  # Cut, but the classes still differ.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    clip_classifier.prompt_tokens(tok, ['cat'], ['a photo of a {}.'])
  assert not caplog.text


def test_adapter_layers_out_of_range_name_the_valid_ones():
  backbone = vit.from_variant('mu/4', num_classes=10, num_layers=2)
  with pytest.raises(ValueError, match=r'names block\(s\) \[5\] that the backbone does not have: '
                                       r'it has 2 blocks, indices 0-1'):
    api.adapt(backbone, 'houlsby', bottleneck=4, layers=(1, 5))
  config = load_config(**{'adapter.layers': (1, 5)})  # The test ViT has 2 blocks.
  with pytest.raises(ValueError, match=r'layers=\(1, 5\) names block\(s\) \[5\].*'
                                       r'indices 0-1'):
    experiment.setup(config, load_weights=False)


def test_a_single_class_dataset_is_an_error(tmp_path):
  data = image_folder(tmp_path / 'data', classes=('only',))
  config = load_config(**{'input.source': 'imagefolder', 'input.path': str(data),
                          'input.eval_split': 'val', 'input.val_fraction': 0.5})
  with pytest.raises(ValueError, match=r"has 1 class \['only'\]: a classifier needs at least 2"):
    experiment.setup(config, load_weights=False)


def test_a_batch_larger_than_the_training_set_is_a_warning_that_says_what_happens(caplog):
  config = load_config(batch_size=16)
  with caplog.at_level(logging.WARNING):
    experiment.check_batch_size(config, types.SimpleNamespace(num_train=6))
  assert ('batch_size=16 is larger than the whole training set (6 examples): every batch holds '
          'each example about 2.7 times') in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    experiment.check_batch_size(config, types.SimpleNamespace(num_train=16))
  assert not caplog.text


def test_method_conv_on_a_transformer_says_what_to_use():
  with pytest.raises(ValueError, match=r"adapter.method='conv' puts adapters on convolutional "
                                       r"\(ResNet, EfficientNet-Lite\) blocks.*use one of "
                                       r"houlsby, pfeiffer"):
    experiment.adapter_spec(load_config(**{'adapter.method': 'conv'}))
  from configs import vit_b16_adapter
  assert 'conv' not in vit_b16_adapter.__doc__


def test_clip_modes_on_a_trained_workdir_use_its_adapters(tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  config = os.path.join(CONFIGS, 'clip_b16_adapter.py')
  common = [f'--config={config}:test', f'--workdir={workdir}', '--config.total_steps=2',
            '--config.mesh.num_devices=1', '--config.eval_at_start=false']
  cfg = load_config('clip_b16_adapter', total_steps=2, eval_at_start=False,
                    **{'mesh.num_devices': 1})
  # Without a checkpoint: the base model, and the description printed with results says so.
  assert 'the base CLIP, without adapters (no checkpoint in' in (
      clip_modes.trained_model(cfg, workdir)[3])
  run_main(common)
  out = capsys.readouterr().out
  trained_accuracy = float(out.split('eval accuracy after 2 steps: ')[1].split()[0])
  run_main(common + ['--mode=zeroshot'])
  assert "with CLIP with the trained 'houlsby' adapters of step 2 in" in capsys.readouterr().out
  with open(os.path.join(workdir, 'zeroshot.json')) as f:
    assert round(json.load(f)['zeroshot/accuracy'], 3) == trained_accuracy
  # The params evaluated are the checkpoint's delta merged into the backbone.
  _, params, _, evaluated = clip_modes.trained_model(cfg, workdir)
  assert 'step 2' in evaluated
  exported, _ = ckpt_lib.read_adapter(os.path.join(workdir, 'adapter.safetensors'))
  merged = pretrained_common.flatten(jax.device_get(params))
  assert any('adapter' in k for k in exported)
  for key, value in exported.items():
    np.testing.assert_array_equal(merged[key], value, err_msg=key)
