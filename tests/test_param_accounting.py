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


# Weight-space methods with their defaults (LoRA/DoRA: r=8 on query and value), ViT-B/16, 1000
# classes: (trainable with the head, with the head frozen, total).
WEIGHT_METHOD_FIGURES = {
    'lora': (1_063_912, 294_912, 86_862_568),
    'dora': (1_082_344, 313_344, 86_881_000),
    'ssf': (971_752, 202_752, 86_770_408),
    'ia3': (824_296, 55_296, 86_622_952),
    'bitfit': (871_912, 102_912, 86_567_656),
}
# Published: Hu et al. count r=8 on W_q and W_v of ViT-B as 12 x 2 x (768 x 8 + 8 x 768).
LORA_B16_QV_R8 = 294_912


def _b16_params(method, **options):
  model = vadapt.adapt(vit.from_variant('B/16', num_classes=1000), method, **options)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']


def _rules(method, train_head):
  return (partition.bitfit_rules(train_head) if method == 'bitfit'
          else partition.default_rules(train_head=train_head))


@pytest.mark.parametrize('method', sorted(WEIGHT_METHOD_FIGURES))
def test_weight_method_counts_match_the_readme(method):
  params = _b16_params(method)
  with_head, head_frozen, total = WEIGHT_METHOD_FIGURES[method]
  for train_head, expected in ((True, with_head), (False, head_frozen)):
    stats = partition.stats(params, partition.label_tree(params, _rules(method, train_head)))
    assert (stats.trainable, stats.total) == (expected, total)


def _peft_trainable(config):
  """Trainable parameters peft adds to Hugging Face's ViT-B/16, built on the meta device."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  with torch.device('meta'):
    model = transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False)
    model = pytest.importorskip('peft').get_peft_model(model, config)
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_dora_ia3_counts_match_the_paper_and_peft():
  peft = pytest.importorskip('peft')
  ours = {}
  for method in ('lora', 'dora', 'ia3'):
    params = _b16_params(method)
    ours[method] = partition.count(params, partition.label_tree(params, _rules(method, False)))
  assert ours['lora']['adapter'] == LORA_B16_QV_R8
  # Hugging Face's ViT names: q_proj, k_proj, v_proj, o_proj; mlp.fc1, mlp.fc2.
  lora = dict(r=8, lora_alpha=8, target_modules=['q_proj', 'v_proj'])
  assert _peft_trainable(peft.LoraConfig(**lora)) == LORA_B16_QV_R8
  assert _peft_trainable(peft.LoraConfig(**lora, use_dora=True)) == ours['dora']['adapter']
  # (IA)³ with the MLP as a feed-forward module: fc2's input is rescaled, as in vadapt.
  assert _peft_trainable(peft.IA3Config(target_modules=['k_proj', 'v_proj', 'fc2'],
                                        feedforward_modules=['fc2'])) == ours['ia3']['adapter']
