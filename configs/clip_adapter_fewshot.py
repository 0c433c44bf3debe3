r"""CLIP-Adapter (Gao et al., 2021), 16 shots per class, on a frozen CLIP; Tip-Adapter and
zero-shot from the same config.

A residual feature adapter (reduction 4, ratio alpha) on the frozen image embedding, with the
frozen zero-shot classifier (class names x prompt templates):

  python -m vadapt.main --config=configs/clip_adapter_fewshot.py \
      --config.backbone.checkpoint=/path/to/clip-vit-base-patch16 --workdir=workdir/clip_adapter
  # Training-free, from the same 16 shots (cache) and config:
  python -m vadapt.main --config=configs/clip_adapter_fewshot.py --workdir=... --mode=tip_adapter
  python -m vadapt.main --config=configs/clip_adapter_fewshot.py --workdir=... --mode=zeroshot

Arguments after ':' (comma separated):
  variant=ViT-B/16   CLIP config name
  shots=16           training examples per class (input.few_shot; the Tip-Adapter cache too)
  ratio=0.2          CLIP-Adapter residual ratio alpha (0 = zero-shot CLIP)
  dataset=oxford_iiit_pet   any tfds dataset whose label feature names its classes
  steps=2000         training steps
  test               a seconds-long CPU run (tiny random CLIP at 32x32, offline digits):

  python -m vadapt.main --config=configs/clip_adapter_fewshot.py:test --workdir=/tmp/clip_fs
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='ViT-B/16', shots=16, ratio=0.2,
                         dataset='oxford_iiit_pet', steps=2000, test=False)
  c = common.add_clip_settings(common.base_config())
  c.backbone.variant = arg.variant
  c.backbone.image_size = 224
  c.adapter.method = 'clip_adapter'
  c.clip.ratio = arg.ratio
  c.clip.reduction = 4
  c.clip.templates = ('a photo of a {}.',)

  c.input.source = 'tfds'
  c.input.name = arg.dataset
  # The few-shot examples (and Tip-Adapter's cache) come from the first 90% of train; alpha and
  # beta are searched on the last 10%, which the cache never sees.
  c.input.train_split = 'train[:90%]'
  c.input.eval_split = 'test'
  c.input.few_shot = arg.shots
  c.clip.tip_search_split = 'train[90%:]'

  # The authors' recipe: SGD, cosine decay, batch 32.
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 1e-2
  c.optimizer.momentum = 0.9
  c.schedule.warmup_steps = 0
  c.batch_size = 32
  c.eval_batch_size = 256
  c.total_steps = arg.steps
  if arg.test:
    common.apply_clip_test_settings(c)
    c.input.few_shot = arg.shots
    c.optimizer.learning_rate = 0.1
  return c
