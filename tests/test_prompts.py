"""Visual prompt tuning: placement and counts, numerics against VPT's forward written out, scan,
CLIP's image tower, DINOv2's registers, training from the config, and the errors. (AdapterDrop's
resume is checked by tests/test_checkpoint.py's bit-identical resume, which runs with it on.)

VPT is not an identity at init (prompts join attention at once), so instead of identity the tests
check where the prompts go, how many there are, and what the model computes with them.
"""

import os

from absl import flags
from absl.testing import flagsaver
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runner import parse_flags
from config_overrides import load_config
from vadapt import api, backbones, experiment, inject, partition, placements, train
from vadapt import checkpoint as ckpt_lib
from vadapt.adapters import PromptConfig
from vadapt.adapters import prompts as prompts_lib
from vadapt.models import clip, resnet, vit
from vadapt.pretrained.common import flatten, unflatten

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, 'configs', 'vit_b16_adapter.py')


def _prompt_shapes(params):
  return {k: tuple(v.shape) for k, v in flatten(params).items() if '/adapter/' in k}


@pytest.mark.parametrize('method,golden', [
    # Jia et al.: deep = layers x prompts x width; shallow = prompts x width (one set).
    ('vpt_deep', {f'Transformer/encoderblock_{i}/adapter/prompts': (50, 768) for i in range(12)}),
    ('vpt_shallow', {'Transformer/encoderblock_0/adapter/prompts': (50, 768)}),
])
def test_vit_b16_prompt_placement_and_counts(method, golden):
  model = api.adapt(vit.from_variant('B/16', num_classes=1000), method, prompts=50)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  assert _prompt_shapes(params) == golden
  counts = partition.count(params, partition.label_tree(params, partition.default_rules()))
  assert counts['adapter'] == {'vpt_deep': 460_800, 'vpt_shallow': 38_400}[method]
  assert counts['head'] == 768 * 1000 + 1000
  assert counts['frozen'] == 86_567_656 - counts['head']  # The bare ViT-B/16 less its head.


def test_scan_stacks_deep_prompts_and_agrees_with_the_loop():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  loop = api.adapt(vit.from_variant('mu/4', num_classes=10), 'vpt_deep', prompts=3)
  params = jax.jit(loop.init)(jax.random.key(1), x)['params']
  flat = flatten(params)
  stacked = {k: v for k, v in flat.items() if 'encoderblock_' not in k}
  for key in {k.replace('encoderblock_0/', 'encoderblock/') for k in flat
              if 'encoderblock_0/' in k}:
    stacked[key] = jnp.stack([flat[key.replace('encoderblock/', f'encoderblock_{i}/')]
                              for i in range(2)])
  scan = api.adapt(vit.from_variant('mu/4', num_classes=10, scan=True, remat=True), 'vpt_deep',
                   prompts=3)
  assert _prompt_shapes(jax.eval_shape(scan.init, jax.random.key(1), x)['params']) == {
      'Transformer/encoderblock/adapter/prompts': (2, 3, 32)}
  np.testing.assert_allclose(jax.jit(scan.apply)({'params': unflatten(stacked)}, x),
                             jax.jit(loop.apply)({'params': params}, x), rtol=1e-5, atol=1e-5)


def _vpt_reference(model, params, images, deep):
  """VPT's PromptedTransformer forward (incorporate_prompt, then forward_deep_prompt), written
  out over the backbone's own blocks: prompts after the class token, replaced at every block
  when deep; the classifier reads the class token, or pools the image tokens only."""
  _, features = model.apply({'params': params}, images, return_features=True)
  t = params['Transformer']
  n, k = images.shape[0], int(model.classifier == 'token')
  x = features['patches']
  if k:
    x = jnp.concatenate([jnp.tile(params['cls'], [n, 1, 1]), x], axis=1)
  x = x + t['posembed_input']['pos_embedding']
  block = vit.Encoder1DBlock(mlp_dim=model.mlp_dim, num_heads=model.num_heads)
  prompts = [t[f'encoderblock_{i}']['adapter']['prompts']
             for i in (range(model.num_layers) if deep else [0])]
  p = prompts[0].shape[0]
  x = jnp.concatenate([x[:, :k], jnp.broadcast_to(prompts[0], (n, p, x.shape[-1])), x[:, k:]], 1)
  for i in range(model.num_layers):
    if deep and i > 0:
      x = jnp.concatenate([x[:, :k], jnp.broadcast_to(prompts[i], (n, p, x.shape[-1])),
                           x[:, k + p:]], axis=1)
    x = block.apply({'params': t[f'encoderblock_{i}']}, x, True)
  x = nn.LayerNorm(epsilon=1e-6).apply({'params': t['encoder_norm']}, x)
  x = x[:, 0] if k else jnp.mean(x[:, p:], axis=1)
  return x @ params['head']['kernel'] + params['head']['bias']


@pytest.mark.parametrize('method,classifier', [('vpt_deep', 'token'), ('vpt_shallow', 'gap')])
def test_matches_vpt_forward_and_features_keep_their_layout(method, classifier):
  model = vit.from_variant('mu/4', num_classes=10, classifier=classifier)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  adapted = api.adapt(model, method, prompts=3, dropout=0.5)
  params = jax.jit(adapted.init)(jax.random.key(1), x)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), params['head']['kernel'].shape)
  out, features = jax.jit(lambda p: adapted.apply({'params': p}, x, return_features=True))(params)
  ref = jax.jit(_vpt_reference, static_argnums=(0, 3))(model, params, x, method == 'vpt_deep')
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
  bare = unflatten({k: v for k, v in flatten(params).items() if '/adapter/' not in k})
  assert not np.allclose(out, model.apply({'params': bare}, x), atol=1e-3)  # Not an identity.
  tokens = 64 + int(classifier == 'token')  # Prompts are gone from every returned feature.
  assert features['encoded'].shape == (2, tokens, 32)
  assert features['blocks'].shape == (2, 2, tokens, 32)
  if method == 'vpt_deep':  # Prompt dropout (0.5) acts in training only; `out` was an eval call.
    train = jax.jit(lambda rng: adapted.apply({'params': params}, x, train=True,
                                              rngs={'dropout': rng}))
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))


def test_dinov2_registers_stay_in_front_and_the_result_does_not_depend_on_where_prompts_sit():
  """Blocks are permutation-equivariant: prompts in front of everything (prefix 0) give what
  prompts after the class and register tokens give, if each is stripped where it was put."""
  model = vit.from_variant('mu/4', num_classes=10, num_registers=2, layer_scale_init=1.0,
                           classifier='token_gap')
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  adapted = api.adapt(model, 'vpt_deep', prompts=3)
  assert adapted.targets[0].adapter.prefix_tokens == 3  # Class token and two registers.
  params = jax.jit(adapted.init)(jax.random.key(1), x)['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), params['head']['kernel'].shape)
  in_front = inject.Adapted(model, placements.vpt_deep(PromptConfig(3, prefix_tokens=0)))
  run = jax.jit(lambda m, p: m.apply({'params': p}, x, return_features=True), static_argnums=0)
  (a, fa), (b, fb) = run(adapted, params), run(in_front, params)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(fa['encoded'], fb['encoded'], rtol=1e-5, atol=1e-5)
  assert fa['encoded'].shape == (2, 1 + 2 + 64, 32)


def test_init_range_is_vpts():
  assert prompts_lib.init_range(768, 16) == pytest.approx((6 / (3 * 16 * 16 + 768)) ** 0.5)
  module = PromptConfig(400, patch_size=4).build(in_shape=(1, 65, 32), out_shape=None,
                                                 name='prompts', parent=None)
  x = jnp.zeros((1, 65, 32))
  value = np.asarray(module.init(jax.random.key(0), (x,), {})['params']['prompts'])
  bound = (6 / (3 * 4 * 4 + 32)) ** 0.5
  assert value.shape == (400, 32)
  assert np.abs(value).max() <= bound and np.abs(value).max() > 0.99 * bound
  assert abs(value.mean()) < 0.05 * bound


def test_clip_image_tower_only():
  model = clip.from_config('tiny')
  images, tokens = clip.dummy_inputs(model, batch=2)
  images = jax.random.normal(jax.random.key(0), images.shape)
  for method, blocks in (('vpt_deep', (0, 1)), ('vpt_shallow', (0,))):
    abstract = jax.eval_shape(api.adapt(model, method, prompts=5).init, jax.random.key(1), images,
                              tokens)['params']
    assert _prompt_shapes(abstract) == {
        f'vision/Transformer/encoderblock_{i}/adapter/prompts': (5, 32) for i in blocks}
  # The image tower alone (no text tower to compile): prompts change the image embedding.
  adapted = api.adapt(model, 'vpt_deep', prompts=5)
  encode = jax.jit(lambda v: adapted.apply(v, 'encode_image', images, method='call_method'))
  variables = jax.jit(lambda rng: adapted.init(rng, 'encode_image', images,
                                               method='call_method'))(jax.random.key(1))
  bare = {'params': unflatten({k: v for k, v in flatten(variables['params']).items()
                               if '/adapter/' not in k})}
  assert not np.allclose(encode(variables), jax.jit(lambda v: model.apply(
      v, images, method='encode_image'))(bare), atol=1e-4)


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name='fc')(x)


def test_bad_input_errors():
  vit_mu = vit.from_variant('mu/4', num_classes=10)
  with pytest.raises(ValueError, match="'vpt_deep' places adapters in transformer blocks.*"
                     'ResNet is a CNN'):
    api.adapt(resnet.ResNet(stage_sizes=(1,), block_cls=resnet.ResNetBlock, num_classes=2),
              'vpt_deep', prompts=4)
  with pytest.raises(ValueError, match='VPT inserts prompt tokens.*_Mlp has none'):
    api.adapt(_Mlp(), 'vpt_shallow', prompts=4)
  for bad in (0, -3):
    with pytest.raises(ValueError, match=f'positive number of prompt tokens; found {bad}'):
      api.adapt(vit_mu, 'vpt_deep', prompts=bad)
  with pytest.raises(ValueError, match="'vpt_deep' needs prompts="):
    api.adapt(vit_mu, 'vpt_deep')
  with pytest.raises(ValueError, match=r"Options \['bottleneck'\] do not apply to 'vpt_shallow'"):
    api.adapt(vit_mu, 'vpt_shallow', prompts=4, bottleneck=8)
  with pytest.raises(ValueError,
                     match="prompts=4 is an option of the VPT methods, not of 'houlsby'"):
    api.adapt(vit_mu, 'houlsby', bottleneck=8, prompts=4)
  with pytest.raises(ValueError, match="'vpt_shallow' inserts prompts before the first block.*"
                     'nn.scan'):
    api.adapt(vit.from_variant('mu/4', scan=True), 'vpt_shallow', prompts=4)
  with pytest.raises(ValueError, match="drop_rate \\(AdapterDrop\\) does not apply to 'vpt_deep'"):
    api.adapt(vit_mu, 'vpt_deep', prompts=4, drop_rate=0.1)
  # Explicit prompt targets on a module that takes no token sequence.
  adapted = inject.Adapted(_Mlp(), (inject.Target('fc', PromptConfig(2), 'wrap'),))
  with pytest.raises(ValueError, match=r'VPT needs a token sequence \(batch, tokens, width\).*'
                     r'found shape \(3, 8\)'):
    jax.eval_shape(adapted.init, jax.random.key(0), jnp.ones((3, 8)))


def test_vpt_reachable_from_the_command_line(tmp_path):
  with flagsaver.flagsaver():
    parse_flags([f'--config={CONFIG}:test', f'--workdir={tmp_path}',
                 '--config.adapter.method=vpt_deep', '--config.adapter.prompts=6',
                 '--config.adapter.drop_rate=0.0'])
    config = flags.FLAGS.config
    assert experiment.adapter_spec(config) == {'method': 'vpt_deep', 'prompts': 6, 'layers': None,
                                               'dropout': 0.0, 'drop_rate': 0.0}
  # On CLIP, VPT's default scope is the image tower: the text classifier need not be recomputed.
  assert not experiment.adapts_text_tower({'method': 'vpt_deep'})
  assert experiment.adapts_text_tower({'method': 'houlsby'})


def _backbone_params(config, model):
  """The :test config's backbone: a random init from the config's seed (as setup draws it)."""
  return backbones.load_params(config.backbone, model,
                               rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))


def test_vpt_deep_trains_from_the_config_exports_and_keeps_the_backbone(tmp_path):
  config = load_config(**{'mesh.num_devices': 1, 'adapter.method': 'vpt_deep',
                          'adapter.prompts': 4, 'total_steps': 3, 'eval_at_start': False})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.step == 3 and np.isfinite(result.metrics['train/loss'])
  model, backbone = experiment.build_model(config, 10)
  bb_params = flatten(_backbone_params(config, backbone))
  frozen = flatten(jax.device_get(result.frozen))
  assert set(frozen) == set(bb_params) - {'head/kernel', 'head/bias'}
  for key, value in frozen.items():
    np.testing.assert_array_equal(value, bb_params[key], err_msg=key)
  delta = flatten(result.delta)
  assert set(delta) == {'head/kernel', 'head/bias'} | {
      f'Transformer/encoderblock_{i}/adapter/prompts' for i in range(2)}
  assert delta['Transformer/encoderblock_0/adapter/prompts'].shape == (4, 32)

  params = ckpt_lib.load_adapter(result.adapter_path, model, unflatten(bb_params))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  np.testing.assert_array_equal(
      model.apply({'params': params}, images),
      model.apply({'params': partition.merge(result.delta, frozen)}, images))
  _, meta = ckpt_lib.read_adapter(result.adapter_path)
  assert meta['adapter'] == {'method': 'vpt_deep', 'prompts': 4, 'layers': None, 'dropout': 0.0,
                             'drop_rate': 0.0}
  rebuilt = api.adapt(backbone, **{k: v for k, v in meta['adapter'].items() if k != 'method'},
                      method=meta['adapter']['method'])
  assert rebuilt == model
