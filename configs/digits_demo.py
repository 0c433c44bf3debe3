r"""Offline demo: adapt a pre-trained, frozen ViT to a new task on real handwritten digits.

  python -m vadapt.main --config=configs/digits_demo.py --workdir=workdir/digits_demo

Real pre-trained weights cannot be downloaded on an offline machine, so the run pre-trains its own
backbone first, honestly, on a different task from the same offline data (scikit-learn's 8x8
handwritten digits, upsampled):

  stage 1  full training of a small ViT on digits 0-4 (the source task), saved as a vit_jax-format
           .npz in WORKDIR/pretrained/ -- skipped when that file already exists;
  stage 2  the .npz is loaded the way a user loads ViT-B_16.npz, frozen, and Houlsby adapters plus a
           new 5-way head are trained on digits 5-9 (the new task).

Arguments: `test` (a seconds-long version), e.g. `--config=configs/digits_demo.py:test`.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, test=False)
  c = common.base_config()
  c.backbone.variant = 'mu/4'
  # A small ViT (4 blocks of width 64) that learns digits in about a minute on two CPU cores.
  c.backbone.overrides.update(dict(hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128))
  c.backbone.image_size = 16
  c.backbone.checkpoint = ''  # Filled in from stage 1.
  # Digits 5-9 reuse the label ids 0-4 of the source task: the new head starts from zero.
  c.backbone.reset_head = True

  c.input.source = 'digits'
  c.input.name = 'digits'
  c.input.classes = (5, 6, 7, 8, 9)
  c.input.crop_scale = None  # 8x8 digits lose their strokes under random crops.

  c.adapter.method = 'houlsby'
  c.adapter.bottleneck = 16
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.0
  c.schedule.warmup_steps = 20
  c.label_smoothing = 0.0
  c.batch_size = 64
  c.eval_batch_size = 256
  c.total_steps = 300
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint_every = 100

  c.pretrain.enabled = True
  c.pretrain.classes = (0, 1, 2, 3, 4)
  c.pretrain.total_steps = 300
  c.pretrain.learning_rate = 3e-3
  c.pretrain.output = 'pretrained/vit_digits0-4.npz'

  if arg.test:
    c.backbone.overrides.num_layers = 2
    c.backbone.overrides.hidden_size = 32
    c.backbone.overrides.num_heads = 2
    c.backbone.overrides.mlp_dim = 64
    c.adapter.bottleneck = 8
    c.batch_size = 16
    c.eval_batch_size = 64
    c.total_steps = 4
    c.pretrain.total_steps = 4
    c.log_every = 2
    c.checkpoint_every = 2
    c.schedule.warmup_steps = 1
  return c
