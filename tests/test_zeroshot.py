"""Zero-shot classification on a CLIP whose answer is known by construction, and retrieval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import tokenizer as clip_tokenizer
from vadapt import zeroshot
from vadapt.models import clip
from vadapt.pretrained.common import flatten, unflatten

COLOURS = ('red', 'green', 'blue')


def colour_clip():
  """A tiny CLIP built by hand so that the text 'red' matches red images, and so on.

  With width W = E = 32 and e_k the k-th unit vector:
  * every block's query and key kernels are 0, so attention is uniform (over the causal prefix in
    the text tower); value and out are the identity and the MLP output is 0, so a block adds the
    mean of LayerNorm(token) over the attended tokens;
  * vision: the patch conv maps colour channel k to e_k, class and position embeddings are 0. The
    class token starts at 0 (LayerNorm(0) = 0) and collects the mean over patches of
    LayerNorm(p^2 e_k) = u_k, the standardised e_k; ln_post and the identity projection keep the
    direction u_k;
  * text: every token embedding is 0 except the words red, green, blue (e_0, e_1, e_2). The
    end-of-text token collects the mean over its prefix, i.e. a positive multiple of u_k for the
    colour word k. So text embeddings of class k point along u_k like images of colour k, and
    u_k . u_j is largest for j = k.
  """
  model = clip.from_config('tiny')
  images, tokens = clip.dummy_inputs(model)
  shapes = flatten(jax.eval_shape(model.init, jax.random.key(0), images, tokens)['params'])
  # LayerNorms start as identity maps (scale 1, bias 0); everything not set below stays 0.
  flat = {k: (np.ones if k.endswith('/scale') else np.zeros)(v.shape, np.float32)
          for k, v in shapes.items()}
  flat['logit_scale'] = np.float32(np.log(100.0))
  tok = clip_tokenizer.default_tokenizer()
  width = 32
  eye = np.eye(width, dtype=np.float32)
  for key in list(flat):
    value = flat[key]
    if '/MultiHeadDotProductAttention_0/' in key:
      if key.endswith('value/kernel'):
        flat[key] = eye.reshape(value.shape)
      elif key.endswith('out/kernel'):
        flat[key] = eye.reshape(value.shape)
      else:
        flat[key] = np.zeros_like(value)
    elif '/MlpBlock_0/Dense_1/' in key:
      flat[key] = np.zeros_like(value)
  kernel = np.zeros_like(flat['vision/embedding/kernel'])
  for k in range(3):
    kernel[:, :, k, k] = 1.0
  flat['vision/embedding/kernel'] = kernel
  for key in ('vision/class_embedding', 'vision/positional_embedding',
              'text/positional_embedding'):
    flat[key] = np.zeros_like(flat[key])
  embedding = np.zeros_like(flat['text/token_embedding/embedding'])
  for k, colour in enumerate(COLOURS):
    (token,) = tok.encode(colour)
    embedding[token] = 5.0 * eye[k]
  flat['text/token_embedding/embedding'] = embedding
  flat['vision/proj'] = eye
  flat['text/proj'] = eye
  return model, unflatten(flat), tok


def colour_images(labels):
  images = np.zeros((len(labels), 32, 32, 3), np.float32)
  for i, label in enumerate(labels):
    images[i, ..., label] = 1.0
  return images


@pytest.fixture(scope='module')
def setup():
  return colour_clip()


def test_zero_shot_answers_known_problem(setup):
  model, params, tok = setup
  templates = ('a photo of a {}.', 'a {} thing', lambda c: f'{c}!')
  classifier = zeroshot.zero_shot_classifier(model, params, tok, COLOURS, templates)
  assert classifier.shape == (32, 3)
  np.testing.assert_allclose(jnp.linalg.norm(classifier, axis=0), 1.0, rtol=1e-6)
  labels = np.array([0, 1, 2, 2, 1, 0])
  logits = zeroshot.predict(model, params, colour_images(labels), classifier, batch_size=4)
  assert logits.shape == (6, 3)
  np.testing.assert_array_equal(np.argmax(logits, axis=1), labels)
  assert zeroshot.accuracy(logits, labels) == 1.0

  # Reordering the class names reorders the answer: the classifier reads the names.
  reordered = ('blue', 'red', 'green')
  classifier = zeroshot.zero_shot_classifier(model, params, tok, reordered)
  logits = zeroshot.predict(model, params, colour_images(labels), classifier)
  np.testing.assert_array_equal(np.argmax(logits, axis=1), [1, 2, 0, 0, 2, 1])


def test_empty_class_list_is_an_error(setup):
  model, params, tok = setup
  with pytest.raises(ValueError, match='at least one class name'):
    zeroshot.zero_shot_classifier(model, params, tok, [])
  with pytest.raises(ValueError, match='at least one prompt template'):
    zeroshot.zero_shot_classifier(model, params, tok, COLOURS, templates=[])


def test_retrieval_metrics_hand_computed():
  images = np.eye(4, dtype=np.float32)
  texts = np.eye(4, dtype=np.float32)
  # Texts 2 and 3 lean towards each other's image: their right image comes second.
  texts[2] = 0.6 * images[2] + 0.8 * images[3]
  texts[3] = 0.6 * images[3] + 0.8 * images[2]
  metrics = zeroshot.retrieval_metrics(images, texts, ks=(1, 2))
  assert metrics == {'image_to_text/R@1': 0.5, 'text_to_image/R@1': 0.5,
                     'image_to_text/R@2': 1.0, 'text_to_image/R@2': 1.0}


def test_retrieval_with_several_captions_per_image():
  images = np.eye(3, dtype=np.float32)
  # Image 0 has captions 0, 1; image 1 has 2, 3; image 2 has 4, whose nearest image is 1.
  texts = np.array([[1, 0.1, 0], [0.9, 0, 0.2], [0, 1, 0], [0.3, 1, 0], [0, 1, 0.5]], np.float32)
  metrics = zeroshot.retrieval_metrics(images, texts, text_to_image=[0, 0, 1, 1, 2], ks=(1, 2))
  # image->text: 0 -> text 0 (ok); 1 -> text 2 (ok); 2 -> text 4 (sim .45, best; ok).
  assert metrics['image_to_text/R@1'] == 1.0
  # text->image: 4 -> image 1 first, image 2 second.
  assert metrics['text_to_image/R@1'] == 0.8
  assert metrics['text_to_image/R@2'] == 1.0
  with pytest.raises(ValueError, match='no text'):
    zeroshot.retrieval_metrics(images, texts, text_to_image=[0, 0, 1, 1, 1])
