"""vadapt: adapters for frozen, pre-trained vision and vision-language models in JAX/Flax.

The few-line path::

  import vadapt
  from vadapt.models import vit
  from vadapt.pretrained import vit as vit_ckpt

  backbone = vit.from_variant('B/16', num_classes=37)
  backbone_params = vit_ckpt.load('ViT-B_16.npz', backbone, image_size=224)
  model = vadapt.adapt(backbone, 'houlsby', bottleneck=64)
  params = vadapt.init_with_pretrained(model, backbone_params, jax.random.key(0),
                                       jnp.zeros((1, 224, 224, 3)))
  labels = vadapt.partition.label_tree(params, vadapt.partition.default_rules())
  delta, frozen = vadapt.partition.split(params, labels)

Submodules that pull in TensorFlow (input_pipeline, train) are imported on first use only.
"""

import importlib

from vadapt import partition
from vadapt.api import adapt, init_with_pretrained
from vadapt.inject import Adapted, Target

__version__ = '0.1.0'

_LAZY_SUBMODULES = (
    'api', 'artifacts', 'backbones', 'checkpoint', 'clip_modes', 'evaluate', 'experiment',
    'adapter_dir', 'arithmetic', 'composition', 'multi',
    'export', 'inject', 'input_pipeline', 'layers', 'losses', 'merge', 'metrics', 'placements',
    'retrieval',
    'sharding', 'tokenizer', 'train', 'zeroshot', 'adapters', 'models', 'pretrained', 'data',
)


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f'vadapt.{name}')
  raise AttributeError(f'module vadapt has no attribute {name!r}')


__all__ = ['Adapted', 'Target', 'adapt', 'init_with_pretrained', 'partition', '__version__']
