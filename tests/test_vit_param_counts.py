"""Golden parameter counts for every registered ViT variant.

1000-class head, class-token classifier, 224x224 images ('mu/*': 32x32), vit_jax's position
embedding with a class-token slot. Counted with jax.eval_shape, so nothing is allocated.
"""

import jax
import numpy as np
import pytest

from vadapt.models import vit

GOLDEN = {
    'Ti/16': 5_717_416,
    'Ti/32': 6_131_560,
    'S/8': 22_055_272,
    'S/14': 22_004_584,
    'S/16': 22_050_664,
    'S/32': 22_878_952,
    'B/8': 86_576_872,
    'B/14': 86_475_496,
    'B/16': 86_567_656,
    'B/32': 88_224_232,
    'L/14': 304_203_752,
    'L/16': 304_326_632,
    'L/32': 306_535_400,
    'H/14': 632_045_800,
    'mu/4': 53_832,
    'mu/8': 56_904,
}


def _image_size(variant):
  return 32 if variant.startswith('mu/') else 224


def count_params(variant, **overrides):
  model = vit.from_variant(variant, num_classes=1000, **overrides)
  size = _image_size(variant)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def closed_form(variant, posemb_includes_cls=True):
  """The count written out from the architecture, independent of the Flax module."""
  c = vit.variant_config(variant)
  d, p, mlp = c['hidden_size'], c['patch_size'], c['mlp_dim']
  tokens = (_image_size(variant) // p) ** 2 + (1 if posemb_includes_cls else 0)
  embedding = p * p * 3 * d + d
  block = (4 * (d * d + d)        # q, k, v, out (heads only reshape them)
           + 2 * 2 * d            # two LayerNorms
           + d * mlp + mlp + mlp * d + d)
  return embedding + d + tokens * d + c['num_layers'] * block + 2 * d + d * 1000 + 1000


@pytest.mark.parametrize('variant', sorted(GOLDEN))
def test_param_count(variant):
  # nn.scan traces one block instead of all of them; the stacked count is the same.
  assert count_params(variant, scan=True) == GOLDEN[variant]
  assert closed_form(variant) == GOLDEN[variant]


def test_every_variant_is_in_the_table():
  assert set(vit.VARIANTS) == set(GOLDEN)


@pytest.mark.parametrize('variant', ['mu/4', 'B/16'])
def test_scan_does_not_change_the_count(variant):
  assert count_params(variant, scan=False) == count_params(variant, scan=True)


# google-research/vision_transformer, vit_jax/models_test.py MODEL_SIZES (1000 classes, 224x224).
VIT_JAX_MODEL_SIZES = {
    'Ti/16': 5_717_416,
    'S/16': 22_050_664,
    'S/32': 22_878_952,
    'B/8': 86_576_872,
    'B/16': 86_567_656,
    'B/32': 88_224_232,
    'L/16': 304_326_632,
    'L/32': 306_535_400,
    'H/14': 632_045_800,
}


@pytest.mark.parametrize('variant', sorted(VIT_JAX_MODEL_SIZES))
def test_public_figures(variant):
  assert GOLDEN[variant] == VIT_JAX_MODEL_SIZES[variant]


def test_public_figures_other_layouts():
  # big_vision keeps no position for the class token: 196 positions, 768 fewer parameters.
  assert count_params('B/16', scan=True, posemb_includes_cls=False) == 86_566_888
  assert closed_form('B/16', posemb_includes_cls=False) == 86_566_888
  # vit_jax 'ViT-B_16-gap-norep': no class token and no slot for it.
  assert count_params('B/16', scan=True, classifier='gap') == 86_566_120
