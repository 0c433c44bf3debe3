"""EfficientNet-Lite: the real ImageNet Lite0 weights against an independent PyTorch forward,
ImageNet predictions on shipped photos, the safetensors round trip and bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import artifacts
from vadapt.models import efficientnet
from vadapt.pretrained import efficientnet as ckpt
from vadapt.pretrained.common import CheckpointMismatchError

torch = pytest.importorskip('torch')
F = torch.nn.functional

# ImageNet-1k class indices (the standard sorted-synset order; tensorflow_datasets' imagenet2012
# labels.txt lists the synsets: line 968 is n07920052 'espresso', ...).
ESPRESSO, TABBY, TIGER_CAT, EGYPTIAN_CAT, TRIPOD, PALACE, DAISY = 967, 281, 282, 285, 872, 698, 985
SYNSETS = {ESPRESSO: 'n07920052', TABBY: 'n02123045', TIGER_CAT: 'n02123159',
           EGYPTIAN_CAT: 'n02124075', TRIPOD: 'n04485082', PALACE: 'n03877845',
           DAISY: 'n11939491'}


# ------------------------------------------------------------------ independent PyTorch reference


def _same_pad(x, k, s):
  """TensorFlow 'SAME': total padding so that out = ceil(in / s), the extra pixel at the end."""
  pads = []
  for size in (x.shape[3], x.shape[2]):
    total = max((-(-size // s) - 1) * s + k - size, 0)
    pads += [total // 2, total - total // 2]
  return F.pad(x, pads)


def _bn(sd, name, x):
  return F.batch_norm(x, sd[f'{name}.running_mean'], sd[f'{name}.running_var'],
                      sd[f'{name}.weight'], sd[f'{name}.bias'], training=False, eps=1e-3)


def torch_lite0(sd, x):
  """EfficientNet-Lite0 written from its definition: stem, 16 MBConv blocks, head, classifier."""
  stages = [(1, 3, 1, 1), (2, 3, 2, 6), (2, 5, 2, 6), (3, 3, 2, 6), (3, 5, 1, 6), (4, 5, 2, 6),
            (1, 3, 1, 6)]
  x = F.conv2d(_same_pad(x, 3, 2), sd['_conv_stem.weight'], stride=2)
  x = F.relu6(_bn(sd, '_bn0', x))
  i = 0
  for repeats, k, stride, expand in stages:
    for j in range(repeats):
      s = stride if j == 0 else 1
      p = f'_blocks.{i}.'
      h = x
      if expand != 1:
        h = F.relu6(_bn(sd, p + '_bn0', F.conv2d(h, sd[p + '_expand_conv.weight'])))
      h = F.conv2d(_same_pad(h, k, s), sd[p + '_depthwise_conv.weight'], stride=s,
                   groups=h.shape[1])
      h = F.relu6(_bn(sd, p + '_bn1', h))
      h = _bn(sd, p + '_bn2', F.conv2d(h, sd[p + '_project_conv.weight']))
      x = h + x if s == 1 and h.shape == x.shape else h
      i += 1
  x = F.relu6(_bn(sd, '_bn1', F.conv2d(x, sd['_conv_head.weight'])))
  return F.linear(x.mean((2, 3)), sd['_fc.weight'], sd['_fc.bias'])


# ------------------------------------------------------------------------------------ fixtures


def _photo(rgb, size=224):
  """Centre crop, bicubic resize, (x - 127) / 128 as the Lite models were trained."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgb = np.asarray(rgb)
  if rgb.ndim == 2:
    rgb = np.repeat(rgb[..., None], 3, axis=-1)
  h, w = rgb.shape[:2]
  s = min(h, w)
  crop = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  img = Image.fromarray(crop).resize((size, size), Image.BICUBIC)
  return (np.asarray(img, np.float32) - 127.0) / 128.0


@pytest.fixture(scope='module')
def pth():
  return artifacts.efficientnet_lite0_pth()


@pytest.fixture(scope='module')
def photos():
  """{name: image} from the photos scikit-image and scikit-learn ship."""
  skdata = pytest.importorskip('skimage.data')
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  china, flower = load_sample_images().images
  return {'coffee': _photo(skdata.coffee()), 'chelsea': _photo(skdata.chelsea()),
          'camera': _photo(skdata.camera()), 'china': _photo(china), 'flower': _photo(flower)}


@pytest.fixture(scope='module')
def lite0(pth, photos):
  model = ckpt.model_from_checkpoint(pth)
  variables = ckpt.load(pth, model)
  x = np.stack(list(photos.values()))
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, x))
  return model, variables, x, logits


def random_variables(model, x, seed=0):
  """Random weights and positive running variances in the model's layout (jitting a deep CNN's
  init compiles dozens of random initialisers: much slower than filling the shapes on the host)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if 'var' in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
    return (rng.standard_normal(s.shape) * 0.2).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


# --------------------------------------------------------------------------------------- tests


def test_architecture_read_from_the_file(pth):
  from vadapt.pretrained import state_dict  # pylint: disable=g-import-not-at-top
  info = ckpt.inspect(state_dict.read(pth))
  assert info['variant'] == 'lite0' and info['num_blocks'] == 16 and info['num_classes'] == 1000
  model = ckpt.model_from_checkpoint(pth)
  assert (model.width, model.depth, model.num_classes) == (1.0, 1.0, 1000)


def test_param_counts_match_the_checkpoint(lite0):
  _, variables, _, _ = lite0
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count(variables['params']) == 4_652_008  # The published Lite0 size.
  assert count(variables['batch_stats']) == 42_016


def test_parity_with_pytorch_on_the_real_weights(pth, lite0):
  _, _, x, logits = lite0
  sd = torch.load(pth, map_location='cpu', weights_only=True)
  with torch.no_grad():
    ref = torch_lite0(sd, torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  rel = np.max(np.abs(logits - ref)) / np.max(np.abs(ref))
  assert rel <= 1e-5, rel


def test_imagenet_predictions_on_shipped_photos(lite0, photos):
  _, _, _, logits = lite0
  top5 = dict(zip(photos, np.argsort(-logits, axis=-1)[:, :5].tolist()))
  assert top5['coffee'][0] == ESPRESSO
  assert top5['camera'][0] == TRIPOD  # The cameraman's tripod fills the centre crop.
  assert {TABBY, TIGER_CAT, EGYPTIAN_CAT} <= set(top5['chelsea'][:3])
  assert top5['china'][0] == PALACE
  assert top5['flower'][0] == DAISY
  labels = os.path.join(os.path.dirname(__import__('tensorflow_datasets').__file__),
                        'datasets', 'imagenet2012', 'labels.txt')
  if os.path.exists(labels):  # The indices above are the standard synset order.
    synsets = open(labels).read().split()
    assert {i: synsets[i] for i in SYNSETS} == SYNSETS


def test_safetensors_round_trip(tmp_path, pth, lite0):
  model, variables, _, _ = lite0
  path = ckpt.save(tmp_path / 'lite0.safetensors', variables)
  from vadapt.pretrained import state_dict  # pylint: disable=g-import-not-at-top
  original = state_dict.read(pth)
  written = state_dict.read(path)
  assert sorted(written) == sorted(original)
  for k in original:
    np.testing.assert_array_equal(written[k], original[k])
  again = ckpt.load(path, model)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(variables))


def test_new_head_for_another_class_count(pth):
  model = efficientnet.from_variant('lite0', num_classes=10)
  variables = ckpt.load(pth, model)
  assert variables['params']['head']['kernel'].shape == (1280, 10)
  assert not np.any(variables['params']['head']['kernel'])
  features = ckpt.load(pth, efficientnet.from_variant('lite0', num_classes=None))
  assert 'head' not in features['params']


def test_checkpoint_of_another_variant_is_a_clear_error(pth):
  with pytest.raises(CheckpointMismatchError, match=r'holds EfficientNet-Lite lite0 \(16 blocks.*'
                     r'the model is lite2 \(21 blocks, output channels 352\)'):
    ckpt.load(pth, efficientnet.from_variant('lite2'))


# Published parameter counts (1000 classes) and block counts of Lite0-4.
GOLDEN = {'lite0': (4_652_008, 16), 'lite1': (5_416_680, 21), 'lite2': (6_092_072, 21),
          'lite3': (8_197_096, 24), 'lite4': (13_006_568, 30)}


@pytest.mark.parametrize('variant', [
    'lite0', pytest.param('lite1', marks=pytest.mark.slow), 'lite2',
    pytest.param('lite3', marks=pytest.mark.slow), pytest.param('lite4', marks=pytest.mark.slow)])
def test_variant_shapes(variant):
  width, depth, _, _ = efficientnet.VARIANTS[variant]
  shapes = jax.eval_shape(efficientnet.from_variant(variant).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
  specs = efficientnet.block_specs(width, depth)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert (count, len(specs)) == GOLDEN[variant]
  # Lite scales neither the stem (32), the head (1280) nor the first and last stage's repeats.
  assert specs[0].in_features == 32 and specs[0].out_features == efficientnet.round_filters(
      16, width)
  assert shapes['params']['conv_head']['kernel'].shape[-1] == 1280


def test_bad_images():
  model = efficientnet.from_variant('lite0', num_classes=3)
  with pytest.raises(ValueError, match=r'at least 32x32; found 16x16'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match=r'RGB images of shape \(batch, height, width, 3\); found '
                     r'shape \(1, 32, 32\)'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32)))


def test_unknown_variant_and_file_type(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown EfficientNet-Lite variant 'b0'; known: \['lite0'"):
    efficientnet.from_variant('b0')
  (tmp_path / 'w.npz').write_bytes(b'')
  with pytest.raises(ValueError, match='expected .safetensors or a PyTorch file'):
    ckpt.load(tmp_path / 'w.npz', efficientnet.from_variant('lite0'))


def test_batch_norm_frozen_unless_asked():
  model = efficientnet.EfficientNetLite(width=0.25, depth=0.3, num_classes=4)  # 8 blocks
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = random_variables(model, x)
  live = model.clone(freeze_batch_norm=False)

  @jax.jit
  def stats_after_a_train_step(variables):
    run = lambda m: m.apply(variables, x, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(2)})[1]['batch_stats']
    return run(model), run(live)
  frozen, updated = stats_after_a_train_step(variables)
  # Frozen by default: train=True reads the running statistics and changes nothing.
  jax.tree.map(np.testing.assert_array_equal, frozen, variables['batch_stats'])
  assert not np.allclose(updated['bn0']['mean'], variables['batch_stats']['bn0']['mean'])
