r"""Command line: parses flags and calls vadapt.train; nothing else lives here.

  python -m vadapt.main --config=configs/vit_b16_adapter.py --workdir=workdir/pets \
      --config.backbone.checkpoint=ViT-B_16.npz --config.adapter.bottleneck=32
  python -m vadapt.main --config=configs/vit_b16_adapter.py --workdir=workdir/pets --mode=eval
  python -m vadapt.main --config=... --workdir=workdir/pets --mode=export --out=adapter.safetensors
  python -m vadapt.main --config=configs/clip_adapter_fewshot.py --workdir=w --mode=zeroshot
  python -m vadapt.main --config=configs/clip_adapter_fewshot.py --workdir=w --mode=tip_adapter
  python -m vadapt.main --config=configs/clip_b16_adapter.py --workdir=w --mode=retrieval \
      --config.retrieval.path=captioned_images
"""

import os

# XLA:CPU's default schedule favours concurrency and keeps about 0.5 GiB more of ViT-B/16's
# activations alive; it also undoes remat entirely (benchmarks/results/train_step_cpu.md). XLA
# reads its flags once, before JAX starts, so the CLI sets this here unless the user chose.
# GPU and TPU compilers ignore it.
_CPU_SCHEDULER_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler'
if _CPU_SCHEDULER_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_CPU_SCHEDULER_FLAG}=false'.strip()

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from vadapt import clip_modes
from vadapt import evaluate
from vadapt import export
from vadapt import retrieval
from vadapt import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, optionally with an argument: file.py:arg.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and exports go here.')
_MODE = flags.DEFINE_enum('mode', None, ['train', 'eval', 'export', 'zeroshot', 'tip_adapter',
                                           'retrieval'],
                          'What to do; defaults to config.mode (train).')
_OUT = flags.DEFINE_string('out', None, 'export: the .safetensors file to write '
                           '(default WORKDIR/adapter.safetensors).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax logs every save at INFO; the progress lines are printed, so keep the log quiet.
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  mode = _MODE.value or config.get('mode', 'train')
  if mode == 'train':
    train.train_and_evaluate(config, _WORKDIR.value)
  elif mode == 'eval':
    evaluate.evaluate(config, _WORKDIR.value)
  elif mode == 'export':
    export.export_adapter(config, _WORKDIR.value, _OUT.value)
  elif mode == 'zeroshot':
    clip_modes.zero_shot(config, _WORKDIR.value)
  elif mode == 'tip_adapter':
    clip_modes.tip_adapter(config, _WORKDIR.value)
  elif mode == 'retrieval':
    retrieval.evaluate_retrieval(config, _WORKDIR.value)
  else:
    raise app.UsageError(f"Unknown mode {mode!r}; expected 'train', 'eval', 'export', "
                         "'zeroshot', 'tip_adapter' or 'retrieval'.")


if __name__ == '__main__':
  app.run(main)
