"""config.cache_features: the head trains on features computed once, as it would on the images.

Tolerance: on the CPUs measured the cached run's head params are bit-identical to the uncached
run's (the features come from another XLA program, so the last bits could differ elsewhere); the
tests allow 1e-6 relative. Resume with the cache on is bit-identical by construction.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from vadapt import experiment
from vadapt import feature_cache
from vadapt import input_pipeline
from vadapt import partition
from vadapt import train
from vadapt.pretrained import common as pretrained_common
from cli_runner import run_cli
from config_overrides import load_config


def get_config(name='vit_b16_adapter', arg='test', **overrides):
  """A linear probe on the tiny `:test` config, no augmentation, one device."""
  return load_config(name, arg, **{
      'mesh.num_devices': 1, 'adapter.method': 'linear', 'input.crop_scale': None,
      'eval_at_start': False, 'optimizer.learning_rate': 0.1, **overrides})


def assert_same_params(a, b, rtol=0.0):
  flat_a, flat_b = pretrained_common.flatten(a), pretrained_common.flatten(b)
  assert set(flat_a) == set(flat_b)
  for key in flat_a:
    np.testing.assert_allclose(flat_a[key], flat_b[key], rtol=rtol, atol=rtol, err_msg=key)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """4 steps without and with the cache, checkpoints at 2 and 4."""
  root = tmp_path_factory.mktemp('cache')
  common = {'checkpoint_every': 2, 'max_to_keep': 5}
  plain = train.train_and_evaluate(get_config(**common), str(root / 'plain'))
  cached = train.train_and_evaluate(get_config(cache_features=True, **common),
                                    str(root / 'cached'))
  return plain, cached, root, common


def test_cached_run_equals_the_uncached_run(runs):
  plain, cached, _, _ = runs
  assert_same_params(plain.delta, cached.delta, rtol=1e-6)
  assert cached.metrics['eval/accuracy'] == plain.metrics['eval/accuracy']
  np.testing.assert_allclose(cached.metrics['train/loss'], plain.metrics['train/loss'], rtol=1e-6)
  assert cached.metrics['train/feature_cache_seconds'] > 0
  assert 'train/feature_cache_seconds' not in plain.metrics
  # The head moved: equal runs are not two untrained heads.
  assert np.abs(cached.delta['head']['kernel']).max() > 1e-3


def test_resume_with_the_cache_is_bit_identical(runs, tmp_path, capsys):
  _, cached, root, common = runs
  killed = str(tmp_path / 'killed')
  shutil.copytree(str(root / 'cached'), killed)
  shutil.rmtree(os.path.join(killed, 'checkpoints', '4'))  # Killed after its step-2 checkpoint.
  resumed = train.train_and_evaluate(get_config(cache_features=True, **common), killed)
  out = capsys.readouterr().out
  assert 'Resumed from the checkpoint at step 2' in out
  assert 'Caching the frozen features: 1,437 train examples x 32 float32 = 0.2 MiB' in out
  assert resumed.step == 4
  assert_same_params(cached.delta, resumed.delta)


def test_cached_batches_are_the_image_batches_in_order_on_a_data_mesh():
  """Rows, labels and features of the steps across an epoch boundary, against the images."""
  config = get_config(cache_features=True, **{'mesh.num_devices': 2})
  exp = experiment.setup(config)
  cache = feature_cache.build(exp, exp.delta)
  n = exp.info.num_train
  assert cache.features.shape == (n, 32) and n % config.batch_size  # 1,437 rows: epochs straddle.
  start = n // config.batch_size - 1  # This step's batch ends the first epoch, the next starts one.
  images = input_pipeline.make_train_iterator(
      config.input, global_batch_size=config.batch_size, image_size=config.backbone.image_size,
      preprocess='vit', seed=config.seed, start_step=start)
  rows = cache.batches(config, start_step=start, process_index=0, process_count=1)
  forward = jax.jit(lambda p, x: feature_cache.module_input(
      exp.model, {'params': p}, x, jax.random.PRNGKey(0))[0])
  params = partition.merge(exp.delta, exp.frozen)
  for _ in range(3):
    want, got = next(images), next(rows)
    np.testing.assert_array_equal(got['label'], want['label'])
    np.testing.assert_allclose(got['image'], forward(params, want['image']), rtol=1e-5,
                               atol=1e-5)


def test_clip_adapter_on_cached_image_embeddings_gives_the_model_s_logits():
  """CLIP-Adapter: the adapter and the frozen classifier on cached embeddings, at the model's
  param paths, give the logits the model gives on the images of the same rows."""
  config = get_config('clip_adapter_fewshot', cache_features=True,
                      **{'adapter.method': 'clip_adapter'})
  exp = experiment.setup(config)
  cache = feature_cache.build(exp, exp.delta)
  assert set(pretrained_common.flatten(exp.delta)) == {
      'adapter/image_adapter/down/kernel', 'adapter/image_adapter/up/kernel'}
  # A trained-looking adapter (not the init), so the adapter's part of the logits counts.
  delta = jax.tree.map(lambda x: x + 0.05, exp.delta)
  params = {'params': partition.merge(delta, exp.frozen)}
  images = input_pipeline.make_train_iterator(
      config.input, global_batch_size=config.batch_size, image_size=config.backbone.image_size,
      preprocess='clip', seed=config.seed, start_step=2)
  rows = cache.batches(config, start_step=2, process_index=0, process_count=1)
  for _ in range(2):
    want, got = next(images), next(rows)
    np.testing.assert_array_equal(got['label'], want['label'])
    np.testing.assert_allclose(cache.model.apply(params, got['image'], train=True),
                               exp.model.apply(params, want['image'], train=True),
                               rtol=1e-5, atol=1e-5)


def top_block_config(method, **overrides):
  """`method` on the upper of the `:test` ViT's two blocks only."""
  return get_config(**{'adapter.method': method, 'adapter.layers': (1,), **overrides})


@pytest.mark.parametrize('method', ['houlsby', 'lora', 'vpt_deep'])
def test_top_block_adapters_on_cached_block_inputs_train_as_uncached(method, tmp_path, capsys):
  """Adapters on the top block train on the cached input of that block as on the images (VPT-deep:
  the prompts join the cached tokens, the cache holds the block's input without them)."""
  plain = train.train_and_evaluate(top_block_config(method), str(tmp_path / 'plain'))
  cached = train.train_and_evaluate(top_block_config(method, cache_features=True),
                                    str(tmp_path / 'cached'))
  out = capsys.readouterr().out
  assert ('Caching the frozen features: the input of Transformer/encoderblock_1: 1,437 train '
          'examples x 65 x 32 float32 = 11.4 MiB') in out
  assert_same_params(plain.delta, cached.delta, rtol=1e-6)
  np.testing.assert_allclose(cached.metrics['train/loss'], plain.metrics['train/loss'], rtol=1e-6)
  assert cached.metrics['eval/accuracy'] == plain.metrics['eval/accuracy']
  init = pretrained_common.flatten(experiment.setup(top_block_config(method)).delta)
  trained = pretrained_common.flatten(cached.delta)
  moved = [k for k in trained if 'head' not in k and np.abs(trained[k] - init[k]).max() > 1e-4]
  assert moved, 'the block\'s adapter did not train: equal runs prove nothing'


def test_top_block_cache_from_the_command_line(tmp_path, capsys):
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'vit_b16_adapter.py')
  argv = [f'--config={config}:test', f'--workdir={tmp_path / "w"}', '--config.mesh.num_devices=1',
          '--config.adapter.method=pfeiffer', '--config.adapter.layers=(1,)',
          '--config.input.crop_scale=()', '--config.cache_features=True',
          '--config.total_steps=2', '--config.eval_at_start=false']
  assert run_cli(argv) == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  assert 'Caching the frozen features: the input of Transformer/encoderblock_1: ' in out
  assert 'step 2/2' in out


@pytest.mark.parametrize('method', ['houlsby', 'pfeiffer', 'parallel', 'lora', 'dora', 'ssf',
                                    'ia3', 'vpt_deep'])
def test_without_the_cache_the_backward_pass_stops_at_the_lowest_adapted_block(method):
  """Every method that honours adapter.layers: the gradient differentiates the delta only, so the
  frozen block below the adapted one runs forward and never backward."""
  exp = experiment.setup(top_block_config(method))

  def grad(delta, frozen, x):
    def loss(delta):
      variables = partition.to_variables(partition.merge(delta, frozen))
      rngs = {'dropout': jax.random.PRNGKey(0)}
      return exp.model.apply(variables, x, train=True, rngs=rngs).sum()
    return jax.grad(loss)(delta)

  size = exp.config.backbone.image_size
  images = np.zeros((8, size, size, 3), np.float32)
  text = jax.jit(grad).lower(exp.delta, exp.frozen, images).as_text(debug_info=True)
  ops = [line for line in text.splitlines() if 'encoderblock_' in line]
  backward = [line for line in ops if 'transpose(' in line]
  assert any('encoderblock_0' in line for line in ops)  # Block 0 runs forward...
  assert any('encoderblock_1' in line for line in backward)
  assert not any('encoderblock_0' in line for line in backward)  # ...and never backward.


def test_the_cached_step_leaves_out_the_frozen_blocks():
  """The gradient on cached block inputs has no patch embedding and no block 0 in it."""
  exp = experiment.setup(top_block_config('houlsby', cache_features=True))
  _, model = feature_cache.check(exp)
  assert feature_cache.boundary(exp) == ('Transformer', 'encoderblock_1')

  def grad_of(model):
    def grad(delta, frozen, x):
      def loss(delta):
        variables = partition.to_variables(partition.merge(delta, frozen))
        return model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)}).sum()
      return jax.grad(loss)(delta)
    return jax.jit(grad)

  size = exp.config.backbone.image_size
  images = np.zeros((8, size, size, 3), np.float32)
  tokens = np.zeros((8, 65, 32), np.float32)
  plain = grad_of(exp.model).lower(exp.delta, exp.frozen, images).compile()
  cached = grad_of(model).lower(exp.delta, exp.frozen, tokens).compile()
  flops = lambda c: (c.cost_analysis()[0] if isinstance(c.cost_analysis(), list)
                     else c.cost_analysis())['flops']
  assert flops(cached) < 0.7 * flops(plain)  # Measured 0.59: one block's forward of two gone.
  text = cached.as_text()
  assert 'convolution' not in text and 'encoderblock_0' not in text
  assert 'encoderblock_0' in plain.as_text()


@pytest.mark.parametrize('overrides, found', [
    ({'adapter.method': 'houlsby'},
     "found adapter.method='houlsby' with adapter.layers=None (every block)"),
    ({'adapter.method': 'lora', 'adapter.layers': (0, 1)},
     "found adapter.method='lora' with adapter.layers=(0, 1) (block 0 trains)"),
    ({'adapter.method': 'bitfit', 'adapter.layers': (1,)},
     "found adapter.method='bitfit' (it trains the first block or below)"),
    ({'adapter.method': 'houlsby', 'adapter.layers': (1,), 'backbone.scan': True},
     'found backbone.scan=True.'),
    ({'input.crop_scale': (0.08, 1.0)}, 'found input.crop_scale=(0.08, 1.0) (random resized'),
    ({'input.flip': True}, 'found input.flip=True (random horizontal flips)'),
    ({'backbone.dropout_rate': 0.1}, 'found backbone.dropout_rate=0.1.'),
])
def test_refuses_in_one_line_before_reading_weights_or_data(overrides, found, tmp_path):
  # The checkpoint does not exist: any work before the refusal would fail on it instead.
  config = get_config(cache_features=True, **{'backbone.checkpoint': str(tmp_path / 'no.npz'),
                                              **overrides})
  with pytest.raises(feature_cache.FeatureCacheError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  message = str(e.value)
  assert '\n' not in message and message.startswith('cache_features=True needs ')
  assert found in message
  assert not os.path.exists(tmp_path / 'work')


def test_flip_on_by_default_for_a_photo_source_is_named():
  config = get_config(cache_features=True, **{'input.source': 'fashion_mnist'})
  with pytest.raises(feature_cache.FeatureCacheError, match='default for this source'):
    feature_cache.check_config(config)


def test_refuses_features_above_the_memory_limit(tmp_path):
  config = get_config(cache_features=True, cache_features_max_mib=0)
  with pytest.raises(feature_cache.FeatureCacheError,
                     match=r'the features \(1,437 train examples x 32 float32 = 0\.2 MiB\) '
                           r'exceed cache_features_max_mib=0;'):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not os.path.exists(tmp_path / 'work' / 'checkpoints')
