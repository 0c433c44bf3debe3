"""ResNet checkpoints: Hugging Face ResNetModel / ResNetForImageClassification (v1.5 and v1) and
torchvision-layout state dicts, against PyTorch forwards; architecture from the file; bad input."""

import jax
import numpy as np
import pytest

from vadapt.models import resnet
from vadapt.pretrained import resnet as ckpt
from vadapt.pretrained.common import CheckpointMismatchError

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
F = torch.nn.functional

# 67 px: odd feature maps at every stage (34, 17, 9, 5, 3) exercise PyTorch's padding exactly.
SIZE = 67


def _randomise_batch_norm(module, seed):
  """Non-trivial BatchNorm weights and running statistics (fresh ones are the identity)."""
  g = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      m.weight.data = 1 + 0.2 * torch.randn(n, generator=g)
      m.bias.data = 0.2 * torch.randn(n, generator=g)
      m.running_mean.data = 0.2 * torch.randn(n, generator=g)
      m.running_var.data = 0.5 + torch.rand(n, generator=g)


def _images(n=2, seed=0):
  return np.random.default_rng(seed).standard_normal((n, SIZE, SIZE, 3)).astype(np.float32)


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


HF_CASES = {
    'bottleneck_v1.5': dict(layer_type='bottleneck', embedding_size=16,
                            hidden_sizes=[64, 128, 256, 512], depths=[1, 2, 1, 1]),
    'bottleneck_v1': dict(layer_type='bottleneck', embedding_size=16,
                          hidden_sizes=[64, 128, 256, 512], depths=[1, 2, 1, 1],
                          downsample_in_bottleneck=True),
    'basic': dict(layer_type='basic', embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                  depths=[2, 1, 1, 1]),
}


@pytest.mark.parametrize('case', sorted(HF_CASES))
def test_parity_with_hugging_face(tmp_path, case):
  torch.manual_seed(0)
  config = transformers.ResNetConfig(num_labels=7, **HF_CASES[case])
  hf = transformers.ResNetForImageClassification(config).eval()
  _randomise_batch_norm(hf, seed=1)
  hf.save_pretrained(tmp_path / 'hf')
  x = _images()
  with torch.no_grad():
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2)
    ref_logits = hf(pixels).logits.numpy()
    ref_pooled = hf.resnet(pixels).pooler_output.numpy()[:, :, 0, 0]

  model = ckpt.model_from_checkpoint(tmp_path / 'hf')  # Architecture from the files.
  assert (tuple(model.stage_sizes), model.num_filters, model.num_classes) == (
      tuple(config.depths), 16, 7)
  assert model.downsample_in_bottleneck == (case == 'bottleneck_v1')
  variables = ckpt.load(tmp_path / 'hf', model, image_size=SIZE)
  both = jax.jit(lambda v, x: (model.apply(v, x), model.clone(num_classes=None).apply(
      {'params': {k: p for k, p in v['params'].items() if k != 'head'},
       'batch_stats': v['batch_stats']}, x)))
  logits, pooled = both(variables, x)
  assert _rel(np.asarray(logits), ref_logits) <= 1e-5
  assert _rel(np.asarray(pooled), ref_pooled) <= 1e-5


def test_hugging_face_resnet_model_file_without_config(tmp_path):
  """A bare ResNetModel .safetensors (no head, no config.json) loads as features."""
  torch.manual_seed(0)
  hf = transformers.ResNetModel(transformers.ResNetConfig(**HF_CASES['basic'])).eval()
  _randomise_batch_norm(hf, seed=2)
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file(hf.state_dict(), str(tmp_path / 'trunk.safetensors'))
  model = ckpt.model_from_checkpoint(tmp_path / 'trunk.safetensors')
  assert model.num_classes is None
  variables = ckpt.load(tmp_path / 'trunk.safetensors', model, image_size=SIZE)
  x = _images()
  with torch.no_grad():
    ref = hf(torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output.numpy()[:, :, 0, 0]
  assert _rel(np.asarray(jax.jit(model.apply)(variables, x)), ref) <= 1e-5


# ------------------------------------------------- torchvision layout, independent PyTorch forward


def _torchvision_state(stage_sizes, width, bottleneck, num_classes, seed=0):
  """A random torchvision-layout ResNet state dict."""
  g = torch.Generator().manual_seed(seed)
  sd = {}

  def conv(name, o, i, k):
    sd[f'{name}.weight'] = torch.randn(o, i, k, k, generator=g) * (2.0 / (i * k * k)) ** 0.5

  def bn(name, n):
    sd[f'{name}.weight'] = 1 + 0.2 * torch.randn(n, generator=g)
    sd[f'{name}.bias'] = 0.2 * torch.randn(n, generator=g)
    sd[f'{name}.running_mean'] = 0.2 * torch.randn(n, generator=g)
    sd[f'{name}.running_var'] = 0.5 + torch.rand(n, generator=g)
    sd[f'{name}.num_batches_tracked'] = torch.tensor(100)

  conv('conv1', width, 3, 7)
  bn('bn1', width)
  cin = width
  for s, n in enumerate(stage_sizes):
    mid = width * 2 ** s
    out = mid * 4 if bottleneck else mid
    for i in range(n):
      p = f'layer{s + 1}.{i}.'
      shapes = ([(mid, cin, 1), (mid, mid, 3), (out, mid, 1)] if bottleneck
                else [(mid, cin, 3), (out, mid, 3)])
      for j, (o, c, k) in enumerate(shapes):
        conv(f'{p}conv{j + 1}', o, c, k)
        bn(f'{p}bn{j + 1}', o)
      if i == 0 and (s > 0 or cin != out):
        conv(f'{p}downsample.0', out, cin, 1)
        bn(f'{p}downsample.1', out)
      cin = out
  sd['fc.weight'] = torch.randn(num_classes, cin, generator=g) * cin ** -0.5
  sd['fc.bias'] = torch.randn(num_classes, generator=g)
  return sd


def torchvision_forward(sd, x, stage_sizes, bottleneck):
  """torchvision's ResNet forward written out (v1.5: the stride sits on the 3x3 conv)."""
  def bn(name, h):
    return F.batch_norm(h, sd[f'{name}.running_mean'], sd[f'{name}.running_var'],
                        sd[f'{name}.weight'], sd[f'{name}.bias'], training=False, eps=1e-5)
  h = F.relu(bn('bn1', F.conv2d(x, sd['conv1.weight'], stride=2, padding=3)))
  h = F.max_pool2d(h, 3, stride=2, padding=1)
  for s, n in enumerate(stage_sizes):
    for i in range(n):
      p = f'layer{s + 1}.{i}.'
      stride = 2 if s > 0 and i == 0 else 1
      if bottleneck:
        y = F.relu(bn(p + 'bn1', F.conv2d(h, sd[p + 'conv1.weight'])))
        y = F.relu(bn(p + 'bn2', F.conv2d(y, sd[p + 'conv2.weight'], stride=stride, padding=1)))
        y = bn(p + 'bn3', F.conv2d(y, sd[p + 'conv3.weight']))
      else:
        y = F.relu(bn(p + 'bn1', F.conv2d(h, sd[p + 'conv1.weight'], stride=stride, padding=1)))
        y = bn(p + 'bn2', F.conv2d(y, sd[p + 'conv2.weight'], padding=1))
      if p + 'downsample.0.weight' in sd:
        h = bn(p + 'downsample.1', F.conv2d(h, sd[p + 'downsample.0.weight'], stride=stride))
      h = F.relu(h + y)
  return F.linear(h.mean((2, 3)), sd['fc.weight'], sd['fc.bias'])


@pytest.mark.parametrize('bottleneck', [False, True], ids=['basic', 'bottleneck'])
def test_parity_with_a_torchvision_state_dict(tmp_path, bottleneck):
  stages = (2, 1, 1, 1)
  sd = _torchvision_state(stages, 8, bottleneck, num_classes=5)
  torch.save({'state_dict': sd}, tmp_path / 'resnet.pth')  # Wrapped, as training scripts save.
  model = ckpt.model_from_checkpoint(tmp_path / 'resnet.pth')
  variables = ckpt.load(tmp_path / 'resnet.pth', model, image_size=SIZE)
  x = _images()
  with torch.no_grad():
    ref = torchvision_forward(sd, torch.from_numpy(x).permute(0, 3, 1, 2), stages,
                              bottleneck).numpy()
  assert _rel(np.asarray(jax.jit(model.apply)(variables, x)), ref) <= 1e-5

  # The same weights written back as safetensors, in both layouts, read without torch.
  for fmt in ckpt.FORMATS:
    path = ckpt.save(tmp_path / f'{fmt}.safetensors', variables, model, fmt)
    again = ckpt.load(path, ckpt.model_from_checkpoint(path), image_size=SIZE)
    jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(variables))


def test_resnet50_layout_read_from_a_state_dict():
  sd = _torchvision_state((3, 4, 6, 3), 64, True, num_classes=1000)
  info = ckpt.inspect({k: v.numpy() for k, v in sd.items()})
  assert info['format'] == 'torchvision' and info['depth'] == 50
  assert (info['stage_sizes'], info['bottleneck'], info['num_filters'], info['num_classes']) == (
      (3, 4, 6, 3), True, 64, 1000)


def test_checkpoint_of_another_depth_or_width_is_a_clear_error(tmp_path):
  torch.save(_torchvision_state((2, 1, 1, 1), 8, False, 5), tmp_path / 'r.pth')
  with pytest.raises(CheckpointMismatchError, match=(
      r"holds ResNet-12 \(basic blocks, stages \(2, 1, 1, 1\), stem width 8\) but the model is "
      r'ResNet-18 \(basic blocks, stages \(2, 2, 2, 2\), stem width 8\)')):
    ckpt.load(tmp_path / 'r.pth', resnet.from_depth(18, num_filters=8))
  with pytest.raises(CheckpointMismatchError, match=r'but the model is ResNet-12 \(basic blocks, '
                     r'stages \(2, 1, 1, 1\), stem width 16\)'):
    ckpt.load(tmp_path / 'r.pth', resnet.ResNet(stage_sizes=(2, 1, 1, 1),
                                                block_cls=resnet.ResNetBlock, num_filters=16))
  np.savez(tmp_path / 'other.npz', a=np.zeros(3))
  (tmp_path / 'vit.safetensors').write_bytes(b'')
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({'embedding/kernel': np.zeros((2, 2), np.float32)}, str(tmp_path / 'vit.safetensors'))
  with pytest.raises(CheckpointMismatchError, match='Not a ResNet checkpoint in a known layout'):
    ckpt.load(tmp_path / 'vit.safetensors', resnet.from_depth(18))


def test_image_below_the_minimum():
  model = resnet.from_depth(18, num_filters=8)
  with pytest.raises(ValueError, match=r'at least 32x32; found 16x16'):
    jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
