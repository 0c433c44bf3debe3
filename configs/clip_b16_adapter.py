r"""Bottleneck adapters inside a frozen CLIP ViT-B/16's towers, trained on a tfds dataset.

The classifier is CLIP's zero-shot text-embedding matrix (class names x prompt templates). Adapters
in the image tower train against it as it is; adapters in the text tower change it, so it is
recomputed from the adapted text tower in every step.

  python -m vadapt.main --config=configs/clip_b16_adapter.py:tower=both \
      --config.backbone.checkpoint=/path/to/clip-vit-base-patch16 --workdir=workdir/pets_clip

Arguments after ':' (comma separated):
  variant=ViT-B/16     CLIP config name (ViT-B/32, ViT-B/16, ViT-L/14, ...)
  tower=vision         vision | text | both: the towers that get adapters
  loss=ce              ce (cross-entropy over the class text embeddings) | contrastive (FLYP:
                       symmetric InfoNCE of images against their classes' prompts)
  method=houlsby       houlsby | pfeiffer | parallel | parallel_attn
  bottleneck=64        adapter hidden width
  dataset=oxford_iiit_pet   any tfds dataset whose label feature names its classes
  steps=2000           training steps
  test                 a seconds-long CPU run (tiny random CLIP at 32x32, offline digits):

  python -m vadapt.main --config=configs/clip_b16_adapter.py:test,tower=both --workdir=/tmp/clip
"""

import ml_collections

from configs import common

_SCOPES = {'vision': 'vision/Transformer', 'text': 'text/Transformer', 'both': None}
_TEMPLATES = ('a photo of a {}.', 'itap of a {}.', 'a bad photo of the {}.',
              'a photo of the large {}.', 'a photo of the small {}.')


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='ViT-B/16', tower='vision', loss='ce', method='houlsby',
                         bottleneck=64, dataset='oxford_iiit_pet', steps=2000, test=False)
  if arg.tower not in _SCOPES:
    raise ValueError(f'tower={arg.tower!r}: expected one of {sorted(_SCOPES)}.')
  c = common.add_clip_settings(common.base_config())
  c.backbone.variant = arg.variant
  c.backbone.image_size = 224
  c.adapter.method = arg.method
  c.adapter.bottleneck = arg.bottleneck
  c.adapter.scope = _SCOPES[arg.tower]
  c.loss = arg.loss
  c.clip.templates = _TEMPLATES

  c.input.source = 'tfds'
  c.input.name = arg.dataset
  c.input.train_split = 'train'
  c.input.eval_split = 'test'

  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.schedule.warmup_steps = 100
  c.batch_size = 256
  c.eval_batch_size = 512
  c.total_steps = arg.steps
  if arg.test:
    common.apply_clip_test_settings(c)
    c.optimizer.learning_rate = 1e-2  # Visible change of the adapters in 4 steps.
  return c
