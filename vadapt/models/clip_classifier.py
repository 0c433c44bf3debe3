"""CLIP as an image classifier whose weights are the zero-shot text-embedding matrix.

  logits = exp(logit_scale) * normalize(encode_image(x)) @ W,      W: (E, C)

W is built from the class names and prompt templates as in ``vadapt.zeroshot``: the text
embeddings of every (class, template) prompt are normalised, averaged over the templates and
normalised again. The prompts' token ids are a field of the module (``class_tokens``), so W can be
computed inside a jitted step:

  recompute_text=False  W is computed once from the text tower and held as the frozen parameter
                        ``classifier/value`` (the text tower is not run during training);
  recompute_text=True   W is recomputed from the (adapted) text tower on every call, so adapters
                        in the text tower change the classifier.

With ``clip_adapter_ratio`` set, a CLIP-Adapter (``vadapt.adapters.clip_adapter``) sits on the
image features (params under ``adapter/``); ratio 0 reproduces the zero-shot logits bit for bit.

The CLIP params keep their own paths (``vision/...``, ``text/...``, ``logit_scale``), so the
module loads OpenAI / Hugging Face weights unchanged and adapters injected by ``vadapt.api.adapt``
find the towers at ``vision/Transformer`` and ``text/Transformer``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vadapt import zeroshot
from vadapt.adapters.clip_adapter import CLIPAdapter
from vadapt.models.clip import CLIP, l2_normalize


def prompt_tokens(tokenizer: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                  templates: Sequence[str]) -> tuple[tuple[tuple[int, ...], ...], ...]:
  """Token ids (C, T, L) of every template filled with every class name, as nested tuples.

  Trailing padding common to all prompts is dropped: the text tower reads features at the
  end-of-text token and uses the leading position embeddings for shorter sequences. A prompt cut
  to the context length is a warning, or an error where the cut removes the class name.
  """
  class_names, templates = list(class_names), list(templates)
  if not class_names:
    raise ValueError('A CLIP classifier needs class names; found an empty list. Use a dataset '
                     'that names its classes (tfds ClassLabel names, ImageFolder directories).')
  if not templates:
    raise ValueError("A CLIP classifier needs at least one prompt template, e.g. "
                     "('a photo of a {}.',); found none.")
  bad = [t for t in templates if not isinstance(t, str) or t.count('{}') != 1]
  if bad:
    raise ValueError(f"Prompt templates must be strings with exactly one '{{}}'; found {bad}.")
  zeroshot.check_prompt_lengths(tokenizer, class_names, templates)
  prompts = [t.format(name) for name in class_names for t in templates]
  ids = np.asarray(tokenizer(prompts))
  length = int(np.max(np.nonzero(ids.any(axis=0))[0])) + 1
  ids = ids[:, :length].reshape(len(class_names), len(templates), length)
  return tuple(tuple(tuple(int(i) for i in row) for row in cls) for cls in ids)


class ComputedConstant(nn.Module):
  """A 'params' leaf ``value`` whose initial value is computed (not drawn from a random key).

  Held in 'params' so that it loads and shards like the rest of the frozen backbone; the backbone
  fingerprint counts its layout, not its values (vadapt.checkpoint.DERIVED_LEAVES).
  """

  @nn.compact
  def __call__(self, compute: Callable[[], jax.Array]) -> jax.Array:
    return self.variable('params', 'value', compute).value


class CLIPClassifier(nn.Module):
  """Images (B, H, W, C) -> class logits (B, num_classes) with CLIP's zero-shot classifier.

  Attributes:
    clip: the CLIP model (its params are this module's params, at the same paths).
    class_tokens: (C, T, L) token ids of the prompts, from ``prompt_tokens``.
    recompute_text: recompute the classifier from the text tower on every call (for adapters
      in the text tower); otherwise hold it as the frozen ``classifier/value`` (E, C).
    clip_adapter_ratio: None for no CLIP-Adapter; else its residual ratio alpha.
    clip_adapter_reduction: the CLIP-Adapter's bottleneck reduction.
  """
  clip: CLIP
  class_tokens: tuple
  recompute_text: bool = False
  clip_adapter_ratio: Optional[float] = None
  clip_adapter_reduction: int = 4

  def setup(self):
    # No prefix: the params are CLIP's own tree (plus 'classifier' and 'adapter/').
    nn.share_scope(self, self.clip)
    if not self.recompute_text:
      self.frozen_classifier = ComputedConstant(name='classifier')
    if self.clip_adapter_ratio is not None:
      self.adapter = CLIPAdapter(ratio=self.clip_adapter_ratio,
                                 reduction=self.clip_adapter_reduction, dtype=self.clip.dtype)

  @property
  def num_classes(self) -> int:
    return len(self.class_tokens)

  def _tokens(self) -> jax.Array:
    return jnp.asarray(np.asarray(self.class_tokens, np.int32))  # (C, T, L)

  def _text_embeddings(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """Prompt ensembles (N, T, L) -> unit-norm class embeddings (N, E)."""
    n, t, length = tokens.shape
    emb = self.clip.encode_text(tokens.reshape(n * t, length), train=train)
    emb = l2_normalize(emb.astype(jnp.float32)).reshape(n, t, -1).mean(axis=1)
    return l2_normalize(emb)

  def text_classifier(self, *, train: bool = False) -> jax.Array:
    """The (E, C) zero-shot classifier from the text tower as it is now (adapted or not)."""
    return self._text_embeddings(self._tokens(), train=train).T

  def classifier(self, *, train: bool = False) -> jax.Array:
    """The (E, C) classifier the logits use: recomputed, or the frozen ``classifier/value``."""
    if self.recompute_text:
      return self.text_classifier(train=train)
    return self.frozen_classifier(lambda: jax.lax.stop_gradient(self.text_classifier()))

  def image_features(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Unnormalised image embeddings (B, E) (before any CLIP-Adapter)."""
    return self.clip.encode_image(images, train=train)

  def text_features(self, token_ids: jax.Array, *, train: bool = False) -> jax.Array:
    """Unnormalised text embeddings (B, E) of token ids (B, L) (retrieval, captions)."""
    return self.clip.encode_text(token_ids, train=train)

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    features = self.image_features(images, train=train)
    classifier = self.classifier(train=train).astype(features.dtype)
    logit_scale = self.clip.logit_scale
    if self.clip_adapter_ratio is not None:
      return self.adapter(features, classifier, logit_scale)
    return zeroshot.zero_shot_logits(features, classifier, logit_scale)

  def contrastive_logits(self, images: jax.Array, labels: jax.Array, *,
                         train: bool = False) -> jax.Array:
    """(B, B) image-text logits of each image against the prompt ensemble of each image's class.

    The text side is the class's row of the classifier: recomputed from the text tower for the
    batch's classes only when recompute_text, else read from the frozen classifier.
    """
    image = l2_normalize(self.image_features(images, train=train))
    if self.recompute_text:
      text = self._text_embeddings(self._tokens()[labels], train=train)
    else:
      text = self.classifier(train=train).T[labels]
    scale = jnp.exp(self.clip.logit_scale).astype(image.dtype)
    return scale * image @ text.astype(image.dtype).T


def contrastive_loss(logits: jax.Array) -> jax.Array:
  """Symmetric InfoNCE over (B, B) logits whose diagonal holds the matching pairs (CLIP, FLYP)."""
  labels = jnp.arange(logits.shape[0])
  logits = logits.astype(jnp.float32)
  per_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], 1)
  per_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], 0)
  return 0.5 * (jnp.mean(per_image) + jnp.mean(per_text))

