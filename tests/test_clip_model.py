"""The Flax CLIP module: layout, parameter counts, shapes, masking, bad inputs, adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt.models import clip
from vadapt.pretrained.common import flatten, unflatten

# Parameter counts of OpenAI's released models (as printed by OpenAI's CLIP notebook) and of
# the tiny test config.
PARAM_COUNTS = {
    'ViT-B/32': 151_277_313,
    'ViT-B/16': 149_620_737,
    'ViT-L/14': 427_616_513,
    'ViT-L/14@336px': 427_944_193,
    'ViT-L/14@336': 427_944_193,
    'tiny': 1_643_297,
}


def abstract_params(model):
  images, tokens = clip.dummy_inputs(model)
  return jax.eval_shape(model.init, jax.random.key(0), images, tokens)['params']


# '@336' is an alias of '@336px'.
@pytest.mark.parametrize('name', sorted(set(clip.CONFIGS) - {'ViT-L/14@336'}))
def test_param_counts(name):
  shapes = abstract_params(clip.from_config(name))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PARAM_COUNTS[name]


def test_every_config_has_a_count():
  assert set(clip.CONFIGS) == set(PARAM_COUNTS)
  assert clip.CONFIGS['ViT-L/14@336'] is clip.CONFIGS['ViT-L/14@336px']


def test_parameter_layout():
  flat = {k: v.shape for k, v in flatten(abstract_params(clip.from_config('ViT-B/32'))).items()}
  expected = {
      'logit_scale': (),
      'vision/embedding/kernel': (32, 32, 3, 768),
      'vision/class_embedding': (768,),
      'vision/positional_embedding': (50, 768),
      'vision/ln_pre/scale': (768,),
      'vision/Transformer/encoderblock_11/MultiHeadDotProductAttention_0/query/kernel':
          (768, 12, 64),
      'vision/Transformer/encoderblock_11/MultiHeadDotProductAttention_0/out/kernel':
          (12, 64, 768),
      'vision/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel': (768, 3072),
      'vision/ln_post/bias': (768,),
      'vision/proj': (768, 512),
      'text/token_embedding/embedding': (49408, 512),
      'text/positional_embedding': (77, 512),
      'text/Transformer/encoderblock_11/MultiHeadDotProductAttention_0/key/kernel': (512, 8, 64),
      'text/Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel': (2048, 512),
      'text/ln_final/scale': (512,),
      'text/proj': (512, 512),
  }
  for key, shape in expected.items():
    assert flat[key] == shape, key
  assert 'vision/embedding/bias' not in flat  # OpenAI's patch conv has no bias
  assert not any(k.startswith('vision/Transformer/encoderblock_12') for k in flat)


@pytest.fixture(scope='module')
def tiny():
  model = clip.from_config('tiny')
  images, tokens = clip.dummy_inputs(model)
  params = jax.jit(model.init)(jax.random.key(0), images, tokens)['params']
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((2, 77), np.int32)
  tokens[0, :4] = [49406, 320, 2368, 49407]
  tokens[1, :6] = [49406, 320, 1125, 539, 1929, 49407]
  return model, params, images, tokens


# Compiled whole: far faster than op-by-op dispatch for these tests.
apply = jax.jit(lambda model, v, *args, method=None: model.apply(v, *args, method=method),
                static_argnums=0, static_argnames='method')


def test_forward_shapes_and_logits(tiny):
  model, params, images, tokens = tiny
  v = {'params': params}
  image = apply(model, v, images, method='encode_image')
  text = apply(model, v, tokens, method='encode_text')
  assert image.shape == (3, 32) and text.shape == (2, 32)
  logits_per_image, logits_per_text = apply(model, v, images, tokens)
  assert logits_per_image.shape == (3, 2)
  np.testing.assert_array_equal(logits_per_text, logits_per_image.T)
  want = 1 / 0.07 * clip.l2_normalize(image) @ clip.l2_normalize(text).T
  np.testing.assert_allclose(logits_per_image, want, rtol=1e-5)


def test_text_is_causal_and_read_at_end_token(tiny):
  model, params, _, tokens = tiny
  v = {'params': params}
  base = apply(model, v, tokens, method='encode_text')
  # Tokens after the end token (smaller ids, so argmax still finds it) change nothing.
  changed = tokens.copy()
  changed[:, 10:] = 7
  np.testing.assert_allclose(apply(model, v, changed, method='encode_text'), base, rtol=1e-6)
  # A token before it does.
  changed = tokens.copy()
  changed[:, 2] = 1000
  assert np.max(np.abs(apply(model, v, changed, method='encode_text') - base)) > 1e-4
  # Shorter sequences give the same features as the zero-padded full context.
  np.testing.assert_allclose(apply(model, v, tokens[:, :8], method='encode_text'), base,
                             rtol=1e-5, atol=1e-6)


def test_first_eos_pooling_option(tiny):
  model, params, _, tokens = tiny
  v = {'params': params}
  padded = np.where(tokens == 0, 49407, tokens)  # Hugging Face pads with the end token
  first_eos = model.clone(eos_token_id=49407)
  np.testing.assert_allclose(apply(first_eos, v, padded, method='encode_text'),
                             apply(model, v, tokens, method='encode_text'), rtol=1e-6)


def test_remat_and_bfloat16(tiny):
  model, params, images, tokens = tiny
  v = {'params': params}
  want = apply(model, v, images, method='encode_image')
  got = apply(model.clone(remat=True), v, images, method='encode_image')
  np.testing.assert_allclose(got, want, rtol=1e-6)
  bf16 = apply(model.clone(dtype=jnp.bfloat16), v, images, method='encode_image')
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), want, rtol=0.1, atol=0.1)


def test_bad_inputs(tiny):
  model, params, _, tokens = tiny
  v = {'params': params}
  with pytest.raises(ValueError, match=r'shape \(batch, 32, 32, 3\); found shape \(1, 64, 64, 3\)'):
    model.apply(v, np.zeros((1, 64, 64, 3), np.float32), method='encode_image')
  with pytest.raises(ValueError, match=r'found shape \(1, 3, 32, 32\)'):  # channels first
    model.apply(v, np.zeros((1, 3, 32, 32), np.float32), method='encode_image')
  with pytest.raises(ValueError, match='length 80 exceed the context length 77'):
    model.apply(v, np.zeros((1, 80), np.int32), method='encode_text')
  with pytest.raises(ValueError, match="Unknown CLIP config 'ViT-H/99'"):
    clip.from_config('ViT-H/99')
  with pytest.raises(TypeError, match='Unknown CLIP options'):
    clip.from_config('tiny', widht=3)


def test_adapters_inject_into_each_tower_with_identity_at_init(tiny):
  api = pytest.importorskip('vadapt.api')
  model, params, images, tokens = tiny
  want = apply(model, {'params': params}, images, tokens)
  towers = {  # tower -> (adapt options, adapted blocks)
      'vision': (dict(scope='vision/Transformer'), ('0', '1')),
      'text': (dict(scope='text/Transformer', layers=[1]), ('1',)),
  }
  for tower, (options, indices) in towers.items():
    adapted = api.adapt(model, 'houlsby', bottleneck=8, **options)
    full = api.init_with_pretrained(adapted, params, jax.random.key(1), images[:1],
                                    tokens[:1])
    blocks = {k.split('/adapter/')[0] for k in flatten(full) if '/adapter/' in k}
    assert blocks == {f'{tower}/Transformer/encoderblock_{i}/{m}' for i in indices
                      for m in ('MlpBlock_0', 'MultiHeadDotProductAttention_0')}
    got = apply(adapted, {'params': full}, images, tokens)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # The adapters are live: perturbing them changes the logits.
    rng = np.random.default_rng(0)
    perturbed = unflatten({k: x + rng.normal(size=x.shape) if '/adapter/' in k else x
                           for k, x in flatten(full).items()})
    logits = apply(adapted, {'params': perturbed}, images, tokens)[0]
    assert np.max(np.abs(logits - want[0])) > 1e-2
  # Without a scope the placement covers both towers' encoders.
  both = api.adapt(model, 'houlsby', bottleneck=8, layers=[1])
  shapes = jax.eval_shape(both.init, jax.random.key(1), images[:1], tokens[:1])['params']
  blocks = {k.split('/adapter/')[0] for k in flatten(shapes) if '/adapter/' in k}
  assert blocks == {f'{t}/Transformer/encoderblock_1/{m}' for t in ('vision', 'text')
                    for m in ('MlpBlock_0', 'MultiHeadDotProductAttention_0')}
  # One tower's encoder runs alone through call_method; the other tower's targets stay idle.
  both_params = api.init_with_pretrained(both, params, jax.random.key(1), images[:1], tokens[:1])
  text = both.apply({'params': both_params}, 'encode_text', tokens, method='call_method')
  np.testing.assert_array_equal(
      text, model.apply({'params': params}, tokens, method='encode_text'))
