r"""The transfer study on a CNN: the frozen, ImageNet EfficientNet-Lite0 and Fashion-MNIST.

  python -m vadapt.artifacts      # once: EfficientNet-Lite0 and Fashion-MNIST
  python -m vadapt.main --config=configs/transfer_study_cnn.py --workdir=workdir/study_cnn \
      --mode=study

The protocol and the code are configs/transfer_study.py's (VTAB-1k: rates chosen on 800 / 200,
3 seeds on 1,000 examples, all 10,000 test images; a 100 / 1,000 / 10,000-example sweep, here for
the linear probe, conv adapters and full fine-tuning), over the methods that apply to a CNN:
linear probe, BitFit (BatchNorm shifts), LoRA and DoRA on the blocks' dense convolutions, conv
adapters after each block (Rebuffi et al.) and alongside it, full fine-tuning and full_head (full
fine-tuning with the head at 1000x the rate). BatchNorm statistics stay frozen, as in
configs/cnn_adapter.py; adapters are block width // 8 wide.

The default: 64x64 input (the 28x28 images upsampled; at 64 px Lite0's last stage is already a
2x2 map) and 100 steps of batch 32 with 20 warm-up steps, as in the DINOv2 study; 74 runs, the 42
final and sweep runs each evaluating all 10,000 test images. On a 2-core AMD EPYC a run takes
0.5-2.5 min (training 5-50 s of it; loading, compiling and the evaluation the rest): the
committed study (benchmarks/results/transfer_efficientnet_lite0_fmnist_cpu/) took 140 min of run
time, part of it on shared cores. That is more than an hour: the fixed cost per run (30-50 s)
times 74 runs, not the training, dominates; `seeds=2` or fewer grid rates are the levers.

Arguments after ':' (comma separated):
  size=64          backbone.image_size (224 is Lite0's own)
  steps=100        training steps of every run
  seeds=3          seeds 0..n-1 of the final and sweep runs
  test             seconds: linear and conv adapters at 32 px, one seed, 2 steps on 64 images
"""

import ml_collections

from configs import cnn_adapter
from configs import common
from configs import transfer_study

METHODS = ('linear', 'bitfit', 'lora', 'dora', 'conv', 'conv_parallel', 'full', 'full_head')
VARIANTS = {'full_head': transfer_study.VARIANTS['full_head']}

# AdamW, cosine, as in the DINOv2 study: the probe and BitFit take large steps, the adapters and
# LoRA moderate ones, full fine-tuning small ones (full_head's head at 1000x the grid's rate).
# LoRA, DoRA and the conv adapters reach 3e-2, full fine-tuning 1e-3 and full_head 1e-3: at 64 px
# they chose the top of their first grids (1e-2, 3e-4; DoRA 1e-2, full_head 1e-4).
LEARNING_RATES = {
    'linear': (3e-3, 1e-2, 3e-2, 1e-1),
    'bitfit': (3e-3, 1e-2, 3e-2),
    'lora': (1e-3, 3e-3, 1e-2, 3e-2),
    'dora': (1e-3, 3e-3, 1e-2, 3e-2),
    'conv': (1e-3, 3e-3, 1e-2, 3e-2),
    'conv_parallel': (1e-3, 3e-3, 1e-2, 3e-2),
    'full': (3e-5, 1e-4, 3e-4, 1e-3),
    'full_head': (1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, size=64, steps=100, seeds=3, test=False)
  if arg.test:
    arg.size, arg.steps = 32, 2
  c = cnn_adapter.get_config(f'method=conv,image_size={arg.size},steps={arg.steps},batch=32')
  c.schedule.warmup_steps = max(min(20, arg.steps // 5), 1)
  c.log_every = max(arg.steps // 2, 1)
  c.eval_at_start = False  # The study reads the final accuracy only.
  transfer_study.add_study(c, METHODS, LEARNING_RATES, VARIANTS, seeds=arg.seeds,
                           sweep_methods=('linear', 'conv', 'full'),
                           artifacts=('efficientnet_lite0_pth', 'fashion_mnist'))
  if arg.test:
    c.batch_size = 16
    c.eval_batch_size = 64
    c.prefetch = 1
    transfer_study.test_sizes(c, {'linear': (3e-2,), 'conv': (1e-3,)})
  return c
