"""CLIP-Adapter and Tip-Adapter(-F) on a tiny CLIP: zero-shot at alpha = 0, training, caches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vadapt import tokenizer as clip_tokenizer
from vadapt import zeroshot
from vadapt.adapters import clip_adapter, tip_adapter
from vadapt.models import clip

CLASSES = ('cat', 'dog', 'car')


@pytest.fixture(scope='module')
def tiny():
  """A tiny CLIP, its params, a zero-shot classifier and random images with labels."""
  model = clip.from_config('tiny')
  images, tokens = clip.dummy_inputs(model)
  params = jax.jit(model.init)(jax.random.key(0), images, tokens)['params']
  classifier = zeroshot.zero_shot_classifier(
      model, params, clip_tokenizer.default_tokenizer(), CLASSES)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(12, 32, 32, 3)).astype(np.float32)
  labels = np.arange(12) % 3
  features = jnp.asarray(zeroshot.encode_images(model, params, images))
  return model, params, classifier, images, labels, features


def test_clip_adapter_ratio_zero_is_zero_shot_exactly(tiny):
  _, params, classifier, _, _, features = tiny
  scale = params['logit_scale']
  want = zeroshot.zero_shot_logits(features, classifier, scale)
  adapter = clip_adapter.CLIPAdapter(ratio=0.0)
  variables = adapter.init(jax.random.key(1), features, classifier, scale)
  assert jax.tree.map(jnp.shape, variables['params']) == {
      'image_adapter': {'down': {'kernel': (32, 8)}, 'up': {'kernel': (8, 32)}}}
  np.testing.assert_array_equal(adapter.apply(variables, features, classifier, scale), want)
  jitted = jax.jit(lambda v, f: adapter.apply(v, f, classifier, scale))
  np.testing.assert_array_equal(
      jitted(variables, features),
      jax.jit(lambda f: zeroshot.zero_shot_logits(f, classifier, scale))(features))
  # A non-zero ratio does change the logits: the test above is not vacuous.
  blended = clip_adapter.CLIPAdapter(ratio=0.5).apply(variables, features, classifier, scale)
  assert np.max(np.abs(blended - want)) > 1e-3


def test_clip_adapter_matches_paper_formula(tiny):
  _, params, classifier, _, _, features = tiny
  scale = params['logit_scale']
  adapter = clip_adapter.CLIPAdapter(ratio=0.2, adapt_text=True, text_ratio=0.3)
  variables = adapter.init(jax.random.key(2), features, classifier, scale)
  p = jax.tree.map(np.asarray, variables['params'])
  relu = lambda x: np.maximum(x, 0)
  mlp = lambda x, q: relu(relu(x @ q['down']['kernel']) @ q['up']['kernel'])
  f = np.asarray(features)
  f = 0.2 * mlp(f, p['image_adapter']) + 0.8 * f
  f /= np.linalg.norm(f, axis=1, keepdims=True)
  t = np.asarray(classifier).T
  t = 0.3 * mlp(t, p['text_adapter']) + 0.7 * t
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  np.testing.assert_allclose(adapter.apply(variables, features, classifier, scale),
                             np.exp(float(scale)) * f @ t.T, rtol=1e-5, atol=1e-4)


def test_tip_adapter_alpha_zero_is_zero_shot_exactly(tiny):
  _, params, classifier, _, labels, features = tiny
  scale = params['logit_scale']
  want = zeroshot.zero_shot_logits(features, classifier, scale)
  cache = tip_adapter.build_cache(features, labels, shots=2, seed=0)
  got = tip_adapter.tip_adapter_logits(features, classifier, scale, cache, alpha=0.0, beta=5.0)
  np.testing.assert_array_equal(got, want)
  module = tip_adapter.TipAdapterF(alpha=0.0, beta=5.0)
  variables = module.init(jax.random.key(0), features, classifier, scale, cache)
  np.testing.assert_array_equal(module.apply(variables, features, classifier, scale, cache), want)
  # At init Tip-Adapter-F is the training-free Tip-Adapter.
  np.testing.assert_array_equal(variables['params']['cache_keys'], cache.keys)
  module = tip_adapter.TipAdapterF(alpha=2.0, beta=5.0)
  np.testing.assert_allclose(
      module.apply(variables, features, classifier, scale, cache),
      tip_adapter.tip_adapter_logits(features, classifier, scale, cache, alpha=2.0, beta=5.0),
      rtol=1e-6)


def test_tip_adapter_formula_and_cache_recall(tiny):
  _, params, classifier, _, labels, features = tiny
  scale = params['logit_scale']
  cache = tip_adapter.build_cache(features, labels)  # all 12 examples
  f = np.asarray(features) / np.linalg.norm(features, axis=1, keepdims=True)
  keys = np.asarray(cache.keys)
  affinity = np.exp(-3.0 * (1 - f @ keys.T))
  want = np.exp(float(scale)) * f @ np.asarray(classifier) + 0.7 * affinity @ np.asarray(
      cache.values)
  got = tip_adapter.tip_adapter_logits(features, classifier, scale, cache, alpha=0.7, beta=3.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  # With a sharp affinity and a heavy cache, the cache recalls the labels of its own keys.
  got = tip_adapter.tip_adapter_logits(features, classifier, scale, cache, alpha=1e4,
                                       beta=100.0)
  np.testing.assert_array_equal(np.argmax(got, axis=1), labels)


def test_hyperparameter_search_finds_the_cache(tiny):
  _, params, classifier, _, labels, features = tiny
  scale = params['logit_scale']
  cache = tip_adapter.build_cache(features, labels)
  zero_shot = zeroshot.accuracy(zeroshot.zero_shot_logits(features, classifier, scale), labels)
  alpha, beta, acc = tip_adapter.search_hyperparameters(
      features, labels, classifier, scale, cache, alphas=(0.0, 1e2, 1e4), betas=(1.0, 100.0))
  # The features are the cache's own keys, so a heavy, sharp cache recalls every label
  # (see test_tip_adapter_formula_and_cache_recall), while zero-shot on random images does not.
  assert zero_shot < 1.0
  assert acc == 1.0 and alpha > 0.0
  # Ties go to the smallest alpha: 1e4 also reaches 1.0 with beta = 100.
  assert alpha == 1e2 or not np.array_equal(
      np.argmax(tip_adapter.tip_adapter_logits(features, classifier, scale, cache, alpha=1e2,
                                               beta=beta), axis=1), labels)


def test_build_cache_sampling():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(30, 8)).astype(np.float32)
  labels = np.repeat(np.arange(3), 10)
  cache = tip_adapter.build_cache(features, labels, shots=4, seed=1)
  assert cache.keys.shape == (12, 8) and cache.values.shape == (12, 3)
  np.testing.assert_allclose(np.linalg.norm(cache.keys, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(np.argmax(cache.values, axis=1), np.repeat(np.arange(3), 4))
  again = tip_adapter.build_cache(features, labels, shots=4, seed=1)
  np.testing.assert_array_equal(cache.keys, again.keys)
  other = tip_adapter.build_cache(features, labels, shots=4, seed=2)
  assert not np.array_equal(cache.keys, other.keys)
  # Augmented views (V, N, E) are averaged before normalising.
  views = np.stack([features, 3 * features])
  np.testing.assert_allclose(tip_adapter.build_cache(views, labels, shots=4, seed=1).keys,
                             cache.keys, rtol=1e-6)
  with pytest.raises(ValueError, match='Class 2 has 1 examples, fewer than shots=4'):
    tip_adapter.build_cache(features[:21], labels[:21], shots=4)


def _train(loss_fn, params, labels_tree, steps=8, lr=1e-2):
  tx = optax.multi_transform({'train': optax.adam(lr), 'frozen': optax.set_to_zero()},
                             labels_tree)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return params, losses


def _frozen_labels(tree, trainable):
  return {k: jax.tree.map(lambda _: 'train' if k == trainable else 'frozen', v)
          for k, v in tree.items()}


@pytest.mark.parametrize('method', ['clip_adapter', 'tip_adapter_f'])
def test_training_lowers_loss_and_keeps_clip_frozen(tiny, method):
  model, params, classifier, images, labels, features = tiny
  if method == 'clip_adapter':
    head = clip_adapter.CLIPAdapter(ratio=0.5)
    extra = ()
    head_params = head.init(jax.random.key(3), features, classifier, params['logit_scale'])
  else:
    head = tip_adapter.TipAdapterF(alpha=1.0, beta=5.0)
    # Cache from a few examples with shuffled labels, so the keys have something to learn.
    extra = (tip_adapter.build_cache(features[:6], (labels[:6] + 1) % 3),)
    head_params = head.init(jax.random.key(3), features, classifier, params['logit_scale'],
                            *extra)
  tree = {'clip': params, 'head': head_params['params']}

  def loss_fn(tree):
    # CLIP runs inside the loss, as in training on images; its params get zero updates.
    f = model.apply({'params': tree['clip']}, images, method='encode_image')
    logits = head.apply({'params': tree['head']}, f, classifier, tree['clip']['logit_scale'],
                        *extra)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  trained, losses = _train(loss_fn, tree, _frozen_labels(tree, 'head'))
  print(f'\n{method} loss: {losses[0]:.4f} -> {losses[-1]:.4f}')
  assert losses[-1] < losses[0] - 1e-3
  jax.tree.map(np.testing.assert_array_equal, trained['clip'], params)
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)),
                                         trained['head'], tree['head']))
  assert all(changed)
