r"""Bottleneck adapters on a frozen, pre-trained ViT-B/16, fine-tuned on a tfds dataset.

Launch (the checkpoint is a vit_jax/big_vision .npz or a Hugging Face .safetensors you hold):

  python -m vadapt.main --config=configs/vit_b16_adapter.py \
      --config.backbone.checkpoint=/path/to/ViT-B_16.npz --workdir=workdir/pets_houlsby

Arguments after ':' (comma separated), e.g. `--config=configs/vit_b16_adapter.py:method=pfeiffer`:
  variant=B/16      ViT variant (Ti/16, S/16, B/16, L/16, ...)
  method=houlsby    houlsby | pfeiffer | parallel | parallel_attn | lora | dora | ssf | ia3 |
                    bitfit | vpt_shallow | vpt_deep | full | linear
                    (LoRA rank: --config.adapter.rank=8; VPT: --config.adapter.prompts=50)
  bottleneck=64     adapter hidden width
  dataset=oxford_iiit_pet   any tfds image classification dataset (e.g. cifar100)
  steps=2000        training steps
  test              a seconds-long CPU run (tiny mu/4 ViT at 32x32, offline digits, 4 steps):

  python -m vadapt.main --config=configs/vit_b16_adapter.py:test --workdir=/tmp/vadapt_test
"""

import ml_collections

from configs import common

_EVAL_SPLITS = {'oxford_iiit_pet': 'test', 'cifar100': 'test', 'cifar10': 'test'}


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, variant='B/16', method='houlsby', bottleneck=64,
                         dataset='oxford_iiit_pet', steps=2000, test=False)
  c = common.base_config()
  c.backbone.variant = arg.variant
  c.backbone.image_size = 224
  c.adapter.method = arg.method
  c.adapter.bottleneck = arg.bottleneck

  c.input.source = 'tfds'
  c.input.name = arg.dataset
  c.input.train_split = 'train'
  c.input.eval_split = _EVAL_SPLITS.get(arg.dataset, 'test')

  c.optimizer.name = 'adamw'
  # Full fine-tuning wants a smaller step than freshly initialised adapters.
  c.optimizer.learning_rate = 1e-4 if arg.method == 'full' else 1e-3
  c.optimizer.weight_decay = 1e-4
  c.schedule.warmup_steps = 100
  c.schedule.decay = 'cosine'
  c.label_smoothing = 0.1
  c.grad_clip_norm = 1.0
  c.batch_size = 512
  c.eval_batch_size = 512
  c.total_steps = arg.steps
  c.eval_every = 500
  c.checkpoint_every = 500
  c.backbone.dtype = 'float32'

  if arg.test:
    common.apply_test_settings(c)
  return c
