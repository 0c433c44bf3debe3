"""The trainable-parameter figures the README quotes (ViT-B/16 and ResNet-50, 1000 classes)."""

import jax
import jax.numpy as jnp
import pytest

import vadapt
from vadapt import partition
from vadapt.models import resnet
from vadapt.models import vit

# (trainable with the head, trainable with the head frozen, total)
README_FIGURES = {
    ('vit', 'houlsby'): (3_148_264, 2_379_264, 88_946_920),
    ('vit', 'pfeiffer'): (1_958_632, 1_189_632, 87_757_288),
    ('vit', 'parallel'): (1_977_064, 1_208_064, 87_775_720),
    ('resnet', 'conv'): (4_579_992, 2_530_992, 28_088_024),
}


@pytest.mark.parametrize('backbone,method', sorted(README_FIGURES))
def test_trainable_counts_match_the_readme(backbone, method):
  if backbone == 'vit':
    model = vadapt.adapt(vit.from_variant('B/16', num_classes=1000), method, bottleneck=64)
  else:
    model = vadapt.adapt(resnet.from_depth(50, num_classes=1000), method, reduction_factor=16)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  with_head, head_frozen, total = README_FIGURES[(backbone, method)]
  for train_head, expected in ((True, with_head), (False, head_frozen)):
    stats = partition.stats(params, partition.label_tree(
        params, partition.default_rules(train_head=train_head)))
    assert (stats.trainable, stats.total) == (expected, total)
