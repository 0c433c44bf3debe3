r"""Image<->text retrieval (recall@1/5/10) with a CLIP backbone on a folder of captioned images.

The folder holds ``captions.jsonl``, one JSON object per line, ``{"image": "relative/path.jpg",
"caption": "text"}``; several lines may name the same image (several captions, as in COCO or
Flickr30k). Images are resized and normalised as the CLIP eval pipeline does.

  python -m vadapt.main --config=configs/clip_b16_adapter.py --workdir=w --mode=retrieval \
      --config.backbone.checkpoint=clip-vit-base-patch16 --config.retrieval.path=flickr_test
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf

from vadapt import backbones
from vadapt import files
from vadapt import metrics as metrics_lib
from vadapt import tokenizer as tokenizer_lib
from vadapt import zeroshot
from vadapt.data import preprocess as preprocess_lib
from vadapt.pretrained import common as pretrained_common

CAPTIONS_FILE = 'captions.jsonl'


@dataclasses.dataclass(frozen=True)
class CaptionDataset:
  """Images with their captions.

  Attributes:
    root: the folder the image paths are relative to.
    images: distinct image paths (relative to root), in order of first mention.
    captions: every caption, in file order.
    text_to_image: (len(captions),) index into `images` of the image each caption describes.
  """
  root: str
  images: tuple[str, ...]
  captions: tuple[str, ...]
  text_to_image: np.ndarray


def read_captions(root: str) -> CaptionDataset:
  """Reads ROOT/captions.jsonl; checks every line and that every named image file exists."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Retrieval dataset folder {root!r} does not exist (expected a folder '
                            f'holding {CAPTIONS_FILE} and the images).')
  path = os.path.join(root, CAPTIONS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No captions file {path!r}: expected one JSON object per line, '
                            '{"image": "relative/path.jpg", "caption": "text"}.')
  index: dict[str, int] = {}
  captions, text_to_image = [], []
  with open(path, encoding='utf-8') as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}, line {line_number}: not valid JSON ({e.msg}); expected '
                         '{"image": ..., "caption": ...}.') from None
      if not isinstance(record, dict) or not all(
          isinstance(record.get(k), str) for k in ('image', 'caption')):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{path}, line {line_number}: expected an object with string keys '
                         f'"image" and "caption"; found {found}.')
      image = record['image']
      if image not in index:
        if not os.path.isfile(os.path.join(root, image)):
          raise FileNotFoundError(f'{path}, line {line_number}: image file '
                                  f'{os.path.join(root, image)!r} does not exist.')
        index[image] = len(index)
      captions.append(record['caption'])
      text_to_image.append(index[image])
  if not captions:
    raise ValueError(f'{path} holds no captions; retrieval needs at least one image with a '
                     'caption.')
  return CaptionDataset(root=root, images=tuple(index), captions=tuple(captions),
                        text_to_image=np.asarray(text_to_image, np.int32))


def load_images(dataset: CaptionDataset, image_size: int, family: str = 'clip') -> np.ndarray:
  """Decodes the dataset's images (RGB) -> float32 (N, image_size, image_size, 3), normalised."""
  fam = preprocess_lib.get_family(family)
  images = []
  for name in dataset.images:
    with Image.open(os.path.join(dataset.root, name)) as img:
      pixels = np.asarray(img.convert('RGB'))
    images.append(preprocess_lib.eval_preprocess(tf.constant(pixels), image_size, fam).numpy())
  return np.stack(images)


def clip_backbone(config: ml_collections.ConfigDict):
  """(CLIP, params) for config.backbone.

  Built through backbones.make_model/load_params, so checkpoints, overrides and the random init
  match the trainer's; unlike clip_modes._clip_backbone it needs no classification dataset (the
  classifier gets one placeholder class and is dropped).
  """
  cfg = config.backbone
  if cfg.model != 'clip':
    raise ValueError(f"Retrieval needs backbone.model='clip'; found {cfg.model!r}.")
  if cfg.checkpoint:
    pretrained_common.require_file(cfg.checkpoint, 'backbone.checkpoint')
  else:
    metrics_lib.log('backbone.checkpoint is empty: evaluating a randomly initialised CLIP.')
  classifier = backbones.make_model(cfg, 1, class_names=('object',), templates=('{}',))
  params = backbones.load_params(cfg, classifier,
                                 rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
  params = {k: v for k, v in params.items() if k != 'classifier'}
  return classifier.clip, jax.device_put(params)


def evaluate_retrieval(config: ml_collections.ConfigDict, workdir: Optional[str] = None
                       ) -> dict[str, Any]:
  """Image->text and text->image recall@1/5/10 on config.retrieval.path (workdir/retrieval.json).

  Returns:
    {'image_to_text/R@k', 'text_to_image/R@k' for k in 1, 5, 10, 'retrieval/images',
    'retrieval/captions'}.
  """
  path = config.get('retrieval', {}).get('path', '')
  if not path:
    raise ValueError('Retrieval needs config.retrieval.path: a folder holding '
                     f'{CAPTIONS_FILE} and the images.')
  from vadapt import clip_modes  # pylint: disable=g-import-not-at-top
  dataset = read_captions(path)
  images = load_images(dataset, config.backbone.image_size, config.get('preprocess', 'clip'))
  bs = config.eval_batch_size
  if clip_modes.latest_checkpoint_step(workdir) is None:
    model, params = clip_backbone(config)
    where = f'no checkpoint in {os.path.abspath(workdir)}' if workdir else 'no workdir'
    evaluated = f'the base CLIP, without adapters ({where})'
    context_length = model.context_length
    image_embeds = zeroshot.encode_images(model, params, images, batch_size=bs)
    encode_text = lambda t: zeroshot.encode_texts(model, params, t, batch_size=bs)
  else:  # The workdir's trained adapters, through the classifier model they were trained in.
    model, params, _, evaluated = clip_modes.trained_model(config, workdir)
    context_length = model.backbone.clip.context_length if hasattr(model, 'backbone') else (
        model.clip.context_length)
    image_fn = clip_modes.model_fn(model, 'image_features')
    text_fn = clip_modes.model_fn(model, 'text_features')
    image_embeds = zeroshot.batched(lambda x: image_fn(params, x), images, bs)
    encode_text = lambda t: zeroshot.batched(lambda x: text_fn(params, x), t, bs)
  tokens = tokenizer_lib.default_tokenizer()(list(dataset.captions),
                                             context_length=context_length, truncate=True)
  text_embeds = encode_text(tokens)
  result: dict[str, Any] = zeroshot.retrieval_metrics(image_embeds, text_embeds,
                                                      dataset.text_to_image)
  result['retrieval/images'] = len(dataset.images)
  result['retrieval/captions'] = len(dataset.captions)
  metrics_lib.log(
      f'retrieval on {len(dataset.images)} images, {len(dataset.captions)} captions of {path!r}: '
      f'image->text R@1/5/10 {result["image_to_text/R@1"]:.4f}/{result["image_to_text/R@5"]:.4f}/'
      f'{result["image_to_text/R@10"]:.4f}, text->image R@1/5/10 '
      f'{result["text_to_image/R@1"]:.4f}/{result["text_to_image/R@5"]:.4f}/'
      f'{result["text_to_image/R@10"]:.4f}; with {evaluated}')
  if workdir and jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'retrieval.json'), result, indent=2)
  return result
