"""CLIP through the trainer: tower adapters (CE / contrastive), CLIP-Adapter, zero-shot, Tip-Adapter."""

import json
import os

import jax
import numpy as np
import pytest

from vadapt import backbones
from vadapt import checkpoint as ckpt_lib
from vadapt import partition
from vadapt import tokenizer as tokenizer_lib
from vadapt import clip_modes
from vadapt import experiment
from vadapt import train
from vadapt.models import clip_classifier
from vadapt.pretrained import common as pretrained_common
from config_overrides import load_config
from cli_runner import run_main

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, 'configs')


def get_config(name, arg='test', **overrides):
  return load_config(name, arg, **overrides)


def _flat(tree):
  return pretrained_common.flatten(jax.device_get(tree))


def _initial_params(config):
  """The backbone params the trainer started from (same seed-derived key)."""
  model, backbone = experiment.build_model(config, 10, tuple(str(i) for i in range(10)))
  params = backbones.load_params(config.backbone, backbone,
                                 rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
  return model, backbone, params


def _save_hf_clip(path):
  """A random Hugging Face CLIPModel with the 'tiny' config's shapes, saved to `path`."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  hf = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, image_size=32, patch_size=8),
      text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77),
      projection_dim=32))
  hf.save_pretrained(path)
  return str(path)


@pytest.fixture(scope='module')
def both_towers(tmp_path_factory):
  """Adapters in both towers of a CLIP loaded from a Hugging Face checkpoint directory."""
  hf_dir = _save_hf_clip(tmp_path_factory.mktemp('clip_hf') / 'hf')
  config = get_config('clip_b16_adapter', 'test,tower=both', total_steps=2, eval_at_start=False,
                      **{'backbone.checkpoint': hf_dir})
  workdir = str(tmp_path_factory.mktemp('clip_both'))
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope='module')
def vision_contrastive(tmp_path_factory):
  config = get_config('clip_b16_adapter', 'test,tower=vision,loss=contrastive', total_steps=2,
                      eval_at_start=False)
  workdir = str(tmp_path_factory.mktemp('clip_vision'))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_both_towers_train_and_only_adapters_change(both_towers):
  config, _, result = both_towers
  assert result.step == 2 and 0.0 <= result.metrics['eval/accuracy'] <= 1.0
  assert np.isfinite(result.metrics['train/loss'])
  delta = _flat(result.delta)
  assert delta and all('/adapter/' in k for k in delta)
  assert any(k.startswith('vision/Transformer/') for k in delta)
  assert any(k.startswith('text/Transformer/') for k in delta)
  # Every CLIP leaf (both towers, logit_scale) is frozen and bit-identical after training: the
  # Hugging Face checkpoint's weights, as its loader reads them.
  from vadapt.pretrained import clip as clip_loader  # pylint: disable=g-import-not-at-top
  model, _, initial = _initial_params(config)
  initial, frozen = _flat(initial), _flat(result.frozen)
  assert set(frozen) == set(initial)
  _, loaded = clip_loader.load(config.backbone.checkpoint, model.backbone.clip)
  loaded = _flat(loaded)
  assert loaded
  for path, value in loaded.items():
    np.testing.assert_array_equal(frozen[path], value, err_msg=path)
  assert 'logit_scale' in frozen and 'classifier/value' not in frozen  # Recomputed, not held.
  for path, value in initial.items():
    np.testing.assert_array_equal(frozen[path], value, err_msg=path)
  # The export holds the adapters only.
  flat, meta = ckpt_lib.read_adapter(result.adapter_path)
  assert set(flat) == set(delta) and meta['adapter'].get('scope') is None


def test_text_adapters_change_the_classifier(both_towers):
  config, _, result = both_towers
  model, backbone, initial = _initial_params(config)
  before = backbone.apply({'params': initial}, method='text_classifier')
  params = partition.merge(result.delta, result.frozen)
  after = train.apply_method(model, params, 'text_classifier')
  assert before.shape == after.shape == (32, 10)
  assert not np.allclose(before, after, atol=1e-6)


def test_vision_only_keeps_the_classifier_and_trains_contrastively(vision_contrastive):
  config, _, result = vision_contrastive
  assert config.loss == 'contrastive' and np.isfinite(result.metrics['train/loss'])
  delta = _flat(result.delta)
  assert delta and all(k.startswith('vision/Transformer/') and '/adapter/' in k for k in delta)
  model, backbone, initial = _initial_params(config)
  frozen = _flat(result.frozen)
  for path, value in _flat(initial).items():
    np.testing.assert_array_equal(frozen[path], value, err_msg=path)
  # The held classifier is the text tower's zero-shot matrix, and stays it.
  np.testing.assert_allclose(frozen['classifier/value'],
                             backbone.apply({'params': initial}, method='text_classifier'),
                             rtol=1e-6, atol=1e-6)
  params = partition.merge(result.delta, result.frozen)
  np.testing.assert_array_equal(train.apply_method(model, params, 'classifier'),
                                frozen['classifier/value'])


def test_contrastive_loss_is_symmetric_infonce():
  logits = np.array([[3.0, 1.0], [0.5, 2.0]], np.float32)
  log_softmax = lambda x, a: x - np.log(np.sum(np.exp(x), axis=a, keepdims=True))
  expected = -0.5 * (np.mean(np.diag(log_softmax(logits, 1))) +
                     np.mean(np.diag(log_softmax(logits, 0))))
  np.testing.assert_allclose(clip_classifier.contrastive_loss(logits), expected, rtol=1e-6)


def test_clip_adapter_fewshot_test_config_trains(tmp_path):
  config = get_config('clip_adapter_fewshot', total_steps=2, eval_at_start=False)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert config.input.few_shot == 16 and result.step == 2
  delta = _flat(result.delta)
  assert set(delta) == {'adapter/image_adapter/down/kernel', 'adapter/image_adapter/up/kernel'}
  assert delta['adapter/image_adapter/down/kernel'].shape == (32, 8)  # Reduction 4.
  _, _, initial = _initial_params(config)
  frozen = _flat(result.frozen)
  for path, value in _flat(initial).items():
    np.testing.assert_array_equal(frozen[path], value, err_msg=path)
  # Resume: a second call finds the finished run and evaluates it again.
  again = train.train_and_evaluate(config, str(tmp_path), export=False)
  assert again.step == 2 and again.metrics['eval/accuracy'] == result.metrics['eval/accuracy']


def test_clip_adapter_ratio_zero_equals_zero_shot(tmp_path):
  config = get_config('clip_adapter_fewshot', 'test,ratio=0', total_steps=1,
                      eval_at_start=False)
  trained = train.train_and_evaluate(config, str(tmp_path / 'train'), export=False)
  zs = clip_modes.zero_shot(config, str(tmp_path / 'zs'))
  assert trained.metrics['eval/accuracy'] == zs['zeroshot/accuracy']
  assert trained.metrics['eval/examples'] == zs['zeroshot/examples'] == 64
  with open(tmp_path / 'zs' / 'zeroshot.json') as f:
    assert json.load(f)['zeroshot/accuracy'] == zs['zeroshot/accuracy']


def test_zeroshot_and_tip_adapter_modes_through_main(tmp_path, capsys):
  config = os.path.join(CONFIGS, 'clip_adapter_fewshot.py')
  common = [f'--config={config}:test', f'--workdir={tmp_path}']
  run_main(common + ['--mode=zeroshot'])
  assert 'zero-shot top-1 accuracy' in capsys.readouterr().out
  run_main(common + ['--mode=tip_adapter'])
  out = capsys.readouterr().out
  assert 'Tip-Adapter top-1 accuracy' in out and 'cache of 160 images' in out
  with open(tmp_path / 'tip_adapter.json') as f:
    tip = json.load(f)
  with open(tmp_path / 'zeroshot.json') as f:
    zs = json.load(f)
  assert tip['tip/cache_size'] == 160 and tip['zeroshot/accuracy'] == zs['zeroshot/accuracy']
  assert 0.0 <= tip['tip/accuracy'] <= 1.0 and 'tip/search_accuracy' in tip


def test_tip_adapter_alpha_zero_is_zero_shot():
  config = get_config('clip_adapter_fewshot', **{'clip.tip_search_split': '',
                                                 'clip.tip_alpha': 0.0})
  result = clip_modes.tip_adapter(config)
  assert result['tip/accuracy'] == result['zeroshot/accuracy']


def test_missing_class_names_are_a_clear_error():
  config = get_config('clip_b16_adapter')
  with pytest.raises(ValueError, match='class names'):
    experiment.build_model(config, 10, None)
  with pytest.raises(ValueError, match='class names; found an empty list'):
    experiment.build_model(config, 0, ())
  with pytest.raises(ValueError, match='exactly one'):
    clip_classifier.prompt_tokens(tokenizer_lib.default_tokenizer(), ['cat'], ['a photo'])


def test_clip_only_options_are_rejected_elsewhere(tmp_path):
  config = get_config('vit_b16_adapter')
  with config.unlocked():
    config.loss = 'contrastive'
  with pytest.raises(ValueError, match="loss='contrastive' needs backbone.model='clip'"):
    train.train_and_evaluate(config, str(tmp_path))
  config = get_config('clip_b16_adapter', 'test,tower=text')
  with pytest.raises(ValueError, match='tower='):
    get_config('clip_b16_adapter', 'test,tower=image')
  assert config.adapter.scope == 'text/Transformer'


def test_tip_adapter_search_split_is_disjoint_from_the_cache():
  from vadapt import input_pipeline  # pylint: disable=g-import-not-at-top
  config = get_config('clip_adapter_fewshot')
  cache_table, _ = input_pipeline.load_tables(config.input)
  search_input = config.input.copy_and_resolve_references()
  search_input.eval_split = config.clip.tip_search_split
  _, search_table = input_pipeline.load_tables(search_input)
  as_bytes = lambda table: {np.asarray(image).tobytes() for image in table.images}
  assert len(cache_table.images) == 16 * 10
  assert not as_bytes(cache_table) & as_bytes(search_table)
