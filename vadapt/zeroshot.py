"""Zero-shot classification and image-text retrieval with a CLIP model.

A zero-shot classifier is a (D, C) matrix: for each class, the text embeddings of every prompt
template filled with the class name are L2-normalised, averaged and normalised again (OpenAI's
prompt ensembling). Logits are ``exp(logit_scale) * normalize(image_features) @ classifier``.
"""

from __future__ import annotations

import functools

from typing import Any, Callable, Mapping, Optional, Sequence, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vadapt import metrics as metrics_lib
from vadapt.models import clip as clip_model

Template = Union[str, Callable[[str], str]]

# The 80 prompts OpenAI ensembled for ImageNet (CLIP's Prompt_Engineering_for_ImageNet notebook).
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.', 'a rendering of a {}.',
    'graffiti of a {}.', 'a bad photo of the {}.', 'a cropped photo of the {}.',
    'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.',
    'a dark photo of the {}.', 'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.',
    'a photo of the cool {}.', 'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a painting of the {}.', 'a painting of a {}.', 'a pixelated photo of the {}.',
    'a sculpture of the {}.', 'a bright photo of the {}.', 'a cropped photo of a {}.',
    'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.',
    'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.',
    'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.',
    'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.',
    'a photo of the small {}.', 'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.',
    'a drawing of the {}.', 'a photo of the large {}.', 'a black and white photo of a {}.',
    'the plushie {}.', 'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.',
    'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.', 'a photo of a small {}.',
    'a tattoo of the {}.',
)

# The 7-prompt subset OpenAI selected from the list above.
SIMPLE_IMAGENET_TEMPLATES: tuple[str, ...] = (
    'itap of a {}.', 'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.',
    'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.',
)

DEFAULT_TEMPLATES: tuple[str, ...] = ('a photo of a {}.',)

Params = Mapping[str, Any]


def _fill(template: Template, name: str) -> str:
  return template(name) if callable(template) else template.format(name)


def check_prompt_lengths(tokenizer: Callable, class_names: Sequence[str],
                         templates: Sequence[Template]) -> None:
  """Prompts must fit the text tower's context, at least up to the end of the class name.

  The tokenizer cuts longer prompts (OpenAI's truncate=True). A cut behind the class name is a
  warning; a cut into it is an error, since every class would then get the same prompt. Needs a
  tokenizer with `encode` (ids without start/end tokens) and `context_length`, as
  vadapt.tokenizer.CLIPTokenizer has; other tokenizers are not checked.
  """
  encode, length = getattr(tokenizer, 'encode', None), getattr(tokenizer, 'context_length', None)
  if encode is None or length is None:
    return
  room = length - 2  # Start and end tokens.
  marker = '\x00'
  cut = []
  for template in templates:
    head = _fill(template, marker).split(marker)[0]
    for name in class_names:
      prompt = _fill(template, name)
      if len(encode(prompt)) <= room:
        continue
      if len(encode(head + name)) > room:
        raise ValueError(
            f'The prompt {prompt[:80]!r}... is {len(encode(prompt)) + 2} tokens long and the text '
            f'tower reads {length}: cutting it would remove the class name {name!r}, so classes '
            'would get the same prompt. Shorten the template or the class name.')
      cut.append(prompt)
  if cut:
    logging.warning('%d prompt(s) are longer than the text tower\'s %d tokens and are cut after '
                    'the class name, e.g. %r.', len(cut), length, cut[0][:80])


def batched(fn: Callable[[jax.Array], jax.Array], inputs: np.ndarray,
             batch_size: int) -> np.ndarray:
  """Applies a jitted fn in fixed-size batches (the last one padded, so it compiles once)."""
  n = len(inputs)
  outputs = []
  starts = range(0, n, batch_size)
  for start in metrics_lib.progress_iter(starts, total=len(starts), desc='encode'):
    chunk = np.asarray(inputs[start:start + batch_size])
    size = len(chunk)
    if size < batch_size and n > batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - size, axis=0)])
    outputs.append(np.asarray(fn(chunk))[:size])
  return np.concatenate(outputs)


@functools.partial(jax.jit, static_argnames=('model', 'method'))
def _encode(model: clip_model.CLIP, params: Params, inputs: jax.Array, method: str) -> jax.Array:
  # Params are an argument, not a closure constant: one compilation per (model, method, shape),
  # reused across calls and batches, and no weights baked into the executable.
  return model.apply({'params': params}, inputs, method=method)


def encode_images(model: clip_model.CLIP, params: Params, images: np.ndarray, *,
                  batch_size: int = 64) -> np.ndarray:
  """Images (N, H, W, C) -> unnormalised image embeddings (N, E)."""
  fn = lambda x: _encode(model, params, x, 'encode_image')
  return batched(fn, images, batch_size)


def encode_texts(model: clip_model.CLIP, params: Params, token_ids: np.ndarray, *,
                 batch_size: int = 256) -> np.ndarray:
  """Token ids (N, L) -> unnormalised text embeddings (N, E)."""
  fn = lambda x: _encode(model, params, x, 'encode_text')
  return batched(fn, token_ids, batch_size)


def zero_shot_classifier(model: clip_model.CLIP, params: Params, tokenizer: Callable,
                         class_names: Sequence[str],
                         templates: Sequence[Template] = DEFAULT_TEMPLATES, *,
                         batch_size: int = 256) -> jax.Array:
  """Builds the (E, C) classifier from class names and prompt templates.

  Args:
    model, params: a CLIP model and its params.
    tokenizer: maps a list of strings to token ids (N, L), e.g. vadapt.tokenizer.CLIPTokenizer.
    class_names: C names; templates: format strings with one '{}' or callables name -> prompt.
  Returns:
    float32 (E, C) with unit-norm columns.
  """
  class_names, templates = list(class_names), list(templates)
  if not class_names:
    raise ValueError('zero_shot_classifier needs at least one class name; got an empty list.')
  if not templates:
    raise ValueError('zero_shot_classifier needs at least one prompt template; got none.')
  check_prompt_lengths(tokenizer, class_names, templates)
  prompts = [_fill(t, name) for name in class_names for t in templates]
  embeddings = encode_texts(model, params, np.asarray(tokenizer(prompts)), batch_size=batch_size)
  embeddings = clip_model.l2_normalize(jnp.asarray(embeddings, jnp.float32))
  per_class = embeddings.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return clip_model.l2_normalize(per_class).T


def zero_shot_logits(image_features: jax.Array, classifier: jax.Array,
                     logit_scale: jax.Array) -> jax.Array:
  """exp(logit_scale) * normalize(features (N, E)) @ classifier (E, C) -> (N, C).

  `logit_scale` is the model's parameter (a log); the adapters reuse this function so that their
  "no adaptation" setting reproduces zero-shot logits bit for bit.
  """
  features = clip_model.l2_normalize(image_features)
  return jnp.exp(logit_scale).astype(features.dtype) * (features @ classifier)


def predict(model: clip_model.CLIP, params: Params, images: np.ndarray, classifier: jax.Array,
            *, batch_size: int = 64) -> np.ndarray:
  """Zero-shot logits (N, C) for images (N, H, W, C); argmax gives the predicted class."""
  features = encode_images(model, params, images, batch_size=batch_size)
  return np.asarray(zero_shot_logits(jnp.asarray(features), classifier, params['logit_scale']))


def accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
  """Top-k accuracy of logits (N, C) against integer labels (N,)."""
  topk = np.argsort(-np.asarray(logits), axis=1)[:, :k]
  return float(np.mean(np.any(topk == np.asarray(labels)[:, None], axis=1)))


def retrieval_metrics(image_embeds: np.ndarray, text_embeds: np.ndarray,
                      text_to_image: Optional[Sequence[int]] = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k for image->text and text->image retrieval.

  Args:
    image_embeds: (N_img, E); text_embeds: (N_txt, E); both normalised here.
    text_to_image: (N_txt,) index of the image each text describes (several captions per image
      allowed, as in COCO/Flickr); default: text i describes image i.
  Returns:
    {'image_to_text/R@k': ..., 'text_to_image/R@k': ...}. An image counts as retrieved at k when any
    of its captions is among its k most similar texts.
  """
  images = np.asarray(clip_model.l2_normalize(jnp.asarray(image_embeds, jnp.float32)))
  texts = np.asarray(clip_model.l2_normalize(jnp.asarray(text_embeds, jnp.float32)))
  if text_to_image is None:
    if len(images) != len(texts):
      raise ValueError(f'{len(images)} images but {len(texts)} texts: pass text_to_image to say '
                       'which image each text describes.')
    text_to_image = np.arange(len(texts))
  text_to_image = np.asarray(text_to_image)
  if text_to_image.shape != (len(texts),) or text_to_image.min() < 0 or (
      text_to_image.max() >= len(images)):
    raise ValueError(f'text_to_image must hold {len(texts)} image indices in [0, {len(images)}); '
                     f'found shape {text_to_image.shape}, range [{text_to_image.min()}, '
                     f'{text_to_image.max()}].')
  uncaptioned = np.flatnonzero(np.bincount(text_to_image, minlength=len(images)) == 0)
  if len(uncaptioned):
    raise ValueError(f'Images {uncaptioned[:10].tolist()} have no text in text_to_image; every '
                     'image needs at least one caption for image->text recall.')
  sims = images @ texts.T  # (N_img, N_txt)
  # Rank of the best matching caption of each image, and of each text's image.
  text_order = np.argsort(-sims, axis=1, kind='stable')
  match = text_to_image[text_order] == np.arange(len(images))[:, None]
  image_rank = np.argmax(match, axis=1)
  image_order = np.argsort(-sims.T, axis=1, kind='stable')
  text_rank = np.argmax(image_order == text_to_image[:, None], axis=1)
  metrics = {}
  for k in ks:
    metrics[f'image_to_text/R@{k}'] = float(np.mean(image_rank < k))
    metrics[f'text_to_image/R@{k}'] = float(np.mean(text_rank < k))
  return metrics
