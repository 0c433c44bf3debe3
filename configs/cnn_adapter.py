r"""Conv adapters (Rebuffi et al.) on a frozen, pre-trained CNN: EfficientNet-Lite or ResNet.

The real run adapts the ImageNet EfficientNet-Lite0 (`python -m vadapt.artifacts` fetches it into
~/.cache/vadapt; the config points there) to Fashion-MNIST:

  python -m vadapt.main --config=configs/cnn_adapter.py --workdir=workdir/fmnist_conv
  python -m vadapt.main --config=configs/cnn_adapter.py:method=linear --workdir=workdir/fmnist_lin
  python -m vadapt.main --config=configs/cnn_adapter.py:method=full --workdir=workdir/fmnist_full

A ResNet checkpoint you hold (torchvision/timm .pth or Hugging Face safetensors; the depth is the
variant, and a file of another depth or width is refused):

  python -m vadapt.main --config=configs/cnn_adapter.py:model=resnet,variant=50 \
      --config.backbone.checkpoint=/path/to/resnet50.pth --workdir=workdir/fmnist_r50

Arguments after ':' (comma separated):
  model=efficientnet_lite   efficientnet_lite | resnet
  variant=                  lite0 ... lite4 (default lite0) | ResNet depth 18 ... 152 (default 50)
  method=conv               conv (adapter after each block) | conv_parallel (alongside each
                            block) | lora | dora (on every dense convolution inside the blocks;
                            --config.adapter.rank, .alpha, .modules) | bitfit (BatchNorm shifts
                            and head) | linear (head only) | full (every parameter); the methods
                            that work on a CNN
  reduction=8               adapter width = block width // reduction
  image_size=64             Fashion-MNIST's 28 px upsampled (>= 32; 224 is the Lite0 size)
  train_examples=0          first N train images only (0: all 60,000)
  steps=1000, batch=64      the same budget for every method
  test                      a seconds-long CPU run: a tiny random CNN at 32 px on the offline
                            digits, 4 steps

BatchNorm statistics stay frozen (also for method=full) unless --config.backbone.train_batch_norm.
"""

import os

import ml_collections

from configs import common

_VARIANTS = {'efficientnet_lite': 'lite0', 'resnet': '50'}
_PREPROCESS = {'efficientnet_lite': 'efficientnet_lite', 'resnet': 'imagenet'}
# Tiny random backbones for :test (no checkpoint).
_TEST_OVERRIDES = {'efficientnet_lite': {'width': 0.25, 'depth': 0.3},
                   'resnet': {'num_filters': 8}}
_LEARNING_RATES = {'conv': 1e-3, 'conv_parallel': 1e-3, 'lora': 1e-3, 'dora': 1e-3,
                   'bitfit': 1e-3, 'linear': 1e-2, 'full': 1e-4}


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model='efficientnet_lite', variant='', method='conv', reduction=8.0,
                         image_size=64, train_examples=0, steps=1000, batch=64, test=False)
  if arg.model not in _VARIANTS:
    raise ValueError(f'model={arg.model!r}: expected one of {sorted(_VARIANTS)}.')
  if arg.method not in _LEARNING_RATES:
    raise ValueError(f'method={arg.method!r} does not apply to a CNN; expected one of '
                     f'{sorted(_LEARNING_RATES)}.')
  c = common.base_config()
  c.backbone.model = arg.model
  c.backbone.variant = arg.variant or _VARIANTS[arg.model]
  c.backbone.image_size = arg.image_size
  c.backbone.train_batch_norm = False
  if arg.model == 'efficientnet_lite' and c.backbone.variant == 'lite0':
    # Where `python -m vadapt.artifacts` puts the ImageNet Lite0 weights.
    cache = os.environ.get('VADAPT_CACHE', os.path.join(os.path.expanduser('~'), '.cache',
                                                        'vadapt'))
    c.backbone.checkpoint = os.path.join(cache, 'efficientnet_lite0_pth',
                                         'efficientnet-lite0-57934424.pth')
  c.preprocess = _PREPROCESS[arg.model]

  c.adapter.method = arg.method
  c.adapter.bottleneck = None
  c.adapter.reduction_factor = arg.reduction

  c.input.source = 'fashion_mnist'
  c.input.name = 'fashion_mnist'
  c.input.train_split = f'train[:{arg.train_examples}]' if arg.train_examples else 'train'
  c.input.eval_split = 'test'
  c.input.crop_scale = None  # Centred garments: resize only, plus flips.
  c.input.flip = True

  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = _LEARNING_RATES[arg.method]
  c.optimizer.weight_decay = 1e-4
  c.schedule.warmup_steps = min(100, arg.steps // 10)
  c.schedule.decay = 'cosine'
  c.label_smoothing = 0.0
  c.grad_clip_norm = 1.0
  c.batch_size = arg.batch
  c.eval_batch_size = 500
  c.total_steps = arg.steps
  c.eval_every = 0
  c.checkpoint_every = 0
  c.log_every = 50

  if arg.test:
    common.apply_test_settings(c)
    c.backbone.variant = _VARIANTS[arg.model]
    c.backbone.overrides = ml_collections.ConfigDict(_TEST_OVERRIDES[arg.model])
    c.backbone.checkpoint = ''
    c.adapter.bottleneck = None
    c.adapter.reduction_factor = 4.0
  return c
