"""LoRA and DoRA forward parity with Hugging Face peft on the same weights (PyTorch, CPU, offline).

A random transformers model is read into vadapt as the checkpoint parity tests do; peft wraps the
PyTorch model, every LoRA factor (and DoRA magnitude) gets random non-zero values, and the same
values are copied into vadapt's adapters. The error reported is max|ours - peft| / max|peft| over
the whole output, in float32.

peft's tensors map onto vadapt's params as follows (r = rank):
  Linear  lora_A (r, in)          -> a = A.T reshaped to in_dims + (r,)
                                     (q/k/v: (D, r); out: (H, D/H, r))
          lora_B (out, r)         -> b = B.T reshaped to (r,) + out_dims  (q/k/v: (r, H, D/H))
  Conv2d  lora_A (r, C, kh, kw)   -> a (kh, kw, C, r): A's conv has the base conv's kernel, stride
                                     and padding, exactly as vadapt runs A through the layer's op
          lora_B (out, r, 1, 1)   -> b (r, out): a 1x1 conv, vadapt's contraction over the rank axis
  DoRA    lora_magnitude_vector   -> magnitude reshaped to out_dims
"""

import copy
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import api
from vadapt.models import vit
from vadapt.pretrained import vit as pv
from vadapt.pretrained.common import flatten, unflatten

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

TOLERANCE = 1e-5
# peft folds B A into the kernel in f32: a rank-4 dot (3 adds), a scale and an add, each
# rounding by at most half an ulp of |W| + s |B| |A|.
MERGE_ULPS = 3.0
RANK, ALPHA = 4, 8
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=4)
ATT, MLP = 'MultiHeadDotProductAttention_0', 'MlpBlock_0'
# transformers 5's in-memory ViT module names -> vadapt module paths.
VIT_MODULES = {
    r'layers\.(\d+)\.attention\.q_proj': rf'Transformer/encoderblock_\1/{ATT}/query',
    r'layers\.(\d+)\.attention\.k_proj': rf'Transformer/encoderblock_\1/{ATT}/key',
    r'layers\.(\d+)\.attention\.v_proj': rf'Transformer/encoderblock_\1/{ATT}/value',
    r'layers\.(\d+)\.attention\.o_proj': rf'Transformer/encoderblock_\1/{ATT}/out',
    r'layers\.(\d+)\.mlp\.fc1': rf'Transformer/encoderblock_\1/{MLP}/Dense_0',
    r'layers\.(\d+)\.mlp\.fc2': rf'Transformer/encoderblock_\1/{MLP}/Dense_1',
    r'embeddings\.patch_embeddings\.projection': 'embedding',
}
# Every kind of layer LoRA reaches in a ViT: DenseGeneral q/k/v (D -> H, D/H) and out
# (H, D/H -> D), Dense fc1/fc2 and the strided patch-embedding Conv.
VIT_TARGETS = (rf'Transformer/encoderblock_\d+/{ATT}/(?:query|key|value|out)',
               rf'Transformer/encoderblock_\d+/{MLP}/Dense_[01]', 'embedding')
PEFT_VIT_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'fc1', 'fc2', 'projection']


def _rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _randomise_lora(model, seed):
  """Non-zero LoRA factors (B starts at zero) and magnitudes away from ||W||."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if '.lora_' in name:
        scale = 0.5 if 'lora_magnitude_vector' in name else 0.2
        noise = scale * torch.randn(p.shape, generator=g)
        p.copy_(p * (1 + noise) if 'lora_magnitude_vector' in name else noise)


def _vit_path(torch_module):
  for pattern, path in VIT_MODULES.items():
    if re.fullmatch(pattern, torch_module):
      return re.sub(pattern, path, torch_module)
  raise KeyError(f'No vadapt module for {torch_module!r}.')


def _peft_tensors(peft_model, to_path, name):
  """{vadapt adapter leaf path: peft tensor as numpy} for every adapted module; `to_path` maps a
  PyTorch module name to the vadapt module path."""
  out = {}
  for key, value in peft_model.state_dict().items():
    m = re.fullmatch(r'base_model\.model\.(.+)\.(lora_A|lora_B|lora_magnitude_vector)\.default'
                     r'(?:\.weight)?', key)
    if m:
      leaf = {'lora_A': 'a', 'lora_B': 'b', 'lora_magnitude_vector': 'magnitude'}[m.group(2)]
      out[f'{to_path(m.group(1))}/{name}/{leaf}'] = value.numpy()
  return out


def _peft_forward(model, method, targets, inputs, to_path, rank=RANK):
  """(the model's output, peft's output, its adapter tensors by vadapt path) with random
  factors; `model` is left without adapters afterwards."""
  with torch.no_grad():
    bare = model(**inputs)
  peft_model = peft.get_peft_model(model, peft.LoraConfig(
      r=rank, lora_alpha=ALPHA, target_modules=targets, use_dora=method == 'dora'))
  try:
    peft_model.eval()
    _randomise_lora(peft_model, seed=2)
    with torch.no_grad():
      out = peft_model(**inputs)
    return bare, out, _peft_tensors(peft_model, to_path, method)
  finally:
    peft_model.unload()


def _to_vadapt(leaf: str, value: np.ndarray, shape) -> np.ndarray:
  """A peft tensor in vadapt's layout (see the module docstring)."""
  if leaf.endswith('/magnitude'):
    return value.reshape(shape)
  if value.ndim == 4:  # Conv2d: A (r, C, kh, kw) -> (kh, kw, C, r); B (out, r, 1, 1) -> (r, out).
    return (np.transpose(value, (2, 3, 1, 0)) if leaf.endswith('/a')
            else value[:, :, 0, 0].T).reshape(shape)
  return value.T.reshape(shape)


def _with_adapters(model, params, tensors, images):
  """The backbone's params plus peft's adapter values at the adapted model's adapter leaves,
  which must be exactly peft's."""
  shapes = flatten(jax.eval_shape(model.init, jax.random.key(0), images)['params'])
  flat = flatten(params)
  ours = set(shapes) - set(flat)
  assert ours == set(tensors), sorted(ours ^ set(tensors))[:6]
  for k, v in tensors.items():
    flat[k] = jnp.asarray(_to_vadapt(k, v, shapes[k].shape), shapes[k].dtype)
  return unflatten(flat)


@pytest.fixture(scope='module')
def hf_vit(tmp_path_factory):
  """A random transformers ViTModel (every weight perturbed) and the vadapt ViT read from it."""
  torch.manual_seed(0)
  hf = transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=False).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  path = tmp_path_factory.mktemp('hf_vit')
  hf.save_pretrained(path)
  model = vit.VisionTransformer(**pv.model_kwargs_from_hf_config(path))
  params = pv.load(path, model, image_size=TINY['image_size'])
  images = np.random.RandomState(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  return hf, model, params, images


@pytest.mark.parametrize('method', ['lora', 'dora'])
def test_vit_forward_matches_peft(method, hf_vit):
  hf, backbone, params, images = hf_vit
  bare, ref, tensors = _peft_forward(
      hf, method, PEFT_VIT_TARGETS,
      dict(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)), _vit_path)
  ref = ref.last_hidden_state.numpy()

  model = api.adapt(backbone, method, rank=RANK, alpha=ALPHA, targets=VIT_TARGETS)
  adapted = _with_adapters(model, params, tensors, images)
  ours = jax.jit(lambda p, x: model.apply({'params': p}, x, return_features=True)[1]['encoded'])(
      adapted, images)
  # The adapters must matter, or parity shows nothing.
  err, effect = _rel_err(ours, ref), _rel_err(bare.last_hidden_state.numpy(), ref)
  print(f'\n{method} vs peft on the tiny ViT (q/k/v/out/fc1/fc2 + patch conv, r={RANK}): max '
        f'relative error {err:.2e}; the adapters move the output by {effect:.2e}')
  assert err <= TOLERANCE
  assert effect > 100 * TOLERANCE


# ------------------------------------------------------------------------- LoRA on a CNN's convs

RESNETS = {
    'basic': dict(layer_type='basic', embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                  depths=[2, 1, 1, 1]),
    'bottleneck': dict(layer_type='bottleneck', embedding_size=8,
                       hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 1, 1]),
}
# peft's regex for vadapt's default CNN placement (placements.cnn_lora): every convolution inside
# a residual block (the main path's and the projection shortcut's), not the stem.
PEFT_RESNET_TARGETS = r'encoder\.stages\.\d+\.layers\.\d+\.(?:layer\.\d+|shortcut)\.convolution'


def _resnet_path(depths, block):
  """transformers' ResNet conv names -> vadapt's (blocks numbered over all stages)."""
  def to_path(torch_module):
    m = re.fullmatch(r'encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:layer\.(\d+)|shortcut)'
                     r'\.convolution', torch_module)
    stage, i, j = int(m.group(1)), int(m.group(2)), m.group(3)
    return f'{block}_{sum(depths[:stage]) + i}/' + ('conv_proj' if j is None else f'Conv_{j}')
  return to_path


@pytest.mark.parametrize('kind,method', [('basic', 'lora'), ('bottleneck', 'lora'),
                                         ('basic', 'dora')])
def test_resnet_convs_match_peft(kind, method, tmp_path):
  """The default CNN placement (method='lora' on a ResNet) against peft's LoRA on Conv2d."""
  from vadapt.pretrained import resnet as resnet_ckpt  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.ResNetConfig(**RESNETS[kind])
  hf = transformers.ResNetModel(config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():  # Non-trivial BatchNorms (fresh ones are the identity).
    for m in hf.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
        m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
  hf.save_pretrained(tmp_path)
  backbone = resnet_ckpt.model_from_checkpoint(tmp_path)
  variables = resnet_ckpt.load(tmp_path, backbone, image_size=35)
  images = np.random.default_rng(3).standard_normal((2, 35, 35, 3)).astype(np.float32)
  block = 'BottleneckResNetBlock' if kind == 'bottleneck' else 'ResNetBlock'
  bare, ref, tensors = _peft_forward(
      hf, method, PEFT_RESNET_TARGETS,
      dict(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)),
      _resnet_path(config.depths, block))
  ref = ref.pooler_output.numpy()[:, :, 0, 0]

  model = api.adapt(backbone, method, rank=RANK, alpha=ALPHA)  # The default placement.
  adapted = dict(variables, params=_with_adapters(model, variables['params'], tensors, images))
  ours = jax.jit(model.apply)(adapted, images)
  err, effect = _rel_err(ours, ref), _rel_err(bare.pooler_output.numpy()[:, :, 0, 0], ref)
  print(f'\n{method} vs peft on a {kind} ResNet (every block conv, r={RANK}): max relative error '
        f'{err:.2e}; the adapters move the output by {effect:.2e}')
  assert err <= TOLERANCE
  assert effect > 100 * TOLERANCE


# ------------------------------------------------------------- merging, against merge_and_unload


def _torch_weight(kernel: np.ndarray, torch_shape) -> np.ndarray:
  """A vadapt kernel in PyTorch's layout: Dense/DenseGeneral (in..., out...) -> (out, in);
  Conv (kh, kw, C, out) -> (out, C, kh, kw)."""
  if len(torch_shape) == 4:
    return np.transpose(kernel, (3, 2, 0, 1))
  return kernel.reshape(torch_shape[1], torch_shape[0]).T


def test_vit_lora_merge_matches_peft_merge_and_unload(hf_vit):
  """vadapt.merge.merge and peft's merge_and_unload fold the same LoRA into the same kernels.

  Both merged kernels are compared with the exact W + s B A (float64, from peft's own tensors):
  vadapt's is its correctly rounded value bit for bit; peft's (computed in f32 by torch) within
  MERGE_ULPS ulps of the terms' magnitude |W| + |s B A|. The two merged models' outputs then
  agree as the unmerged ones do (TOLERANCE).
  """
  from vadapt import merge  # pylint: disable=g-import-not-at-top
  hf, backbone, params, images = hf_vit
  peft_model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
      r=RANK, lora_alpha=ALPHA, target_modules=PEFT_VIT_TARGETS))
  peft_model.eval()
  _randomise_lora(peft_model, seed=2)
  tensors = _peft_tensors(peft_model, _vit_path, 'lora')
  state = {k: v.numpy().astype(np.float64) for k, v in peft_model.state_dict().items()}
  merged_hf = peft_model.merge_and_unload()
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    ref = merged_hf(pixel_values=pixels).last_hidden_state.numpy()

  model = api.adapt(backbone, 'lora', rank=RANK, alpha=ALPHA, targets=VIT_TARGETS)
  bare = merge.merge(model, _with_adapters(model, params, tensors, images))
  ours = flatten(bare)
  theirs = merged_hf.state_dict()
  scale, worst = ALPHA / RANK, 0.0
  for torch_module in {k.rpartition('.lora_A')[0] for k in state if '.lora_A.' in k}:
    name = torch_module[len('base_model.model.'):]
    w, a, b = (state[f'{torch_module}.{n}'] for n in (
        'base_layer.weight', 'lora_A.default.weight', 'lora_B.default.weight'))
    delta = scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)
    exact = w + delta
    got = _torch_weight(np.asarray(ours[f'{_vit_path(name)}/kernel']), w.shape)
    np.testing.assert_array_equal(got, exact.astype(np.float32), err_msg=name)
    # The magnitude f32 rounding acts on: |W| + s |B| |A|.
    terms = np.abs(w) + scale * (np.abs(b.reshape(b.shape[0], -1)) @ np.abs(
        a.reshape(a.shape[0], -1))).reshape(w.shape)
    ulps = np.abs(theirs[f'{name}.weight'].numpy() - exact) / np.spacing(terms.astype(np.float32))
    worst = max(worst, float(ulps.max()))
    assert ulps.max() <= MERGE_ULPS, (name, ulps.max())
  out = jax.jit(lambda p, x: backbone.apply({'params': p}, x, return_features=True)[1][
      'encoded'])(bare, images)
  err = _rel_err(out, ref)
  print(f'\nmerged LoRA vs peft merge_and_unload on the tiny ViT: kernels within {worst:.2f} ulps; '
        f'outputs max relative error {err:.2e}')
  assert err <= TOLERANCE


# ------------------------------------------------------------------ LoRA on grouped convolutions

G, C_IN, C_MID = 4, 8, 12


class _GroupedTorch(torch.nn.Module if torch else object):
  """A grouped 3x3 conv (4 groups) and a depthwise one (12 groups), as PyTorch writes them."""

  def __init__(self):
    super().__init__()
    self.grouped = torch.nn.Conv2d(C_IN, C_MID, 3, padding=1, groups=G)
    self.depthwise = torch.nn.Conv2d(C_MID, C_MID, 3, stride=2, padding=1, groups=C_MID)

  def forward(self, x):
    return self.depthwise(torch.relu(self.grouped(x)))


class _GroupedFlax(nn.Module):
  """The same convolutions in Flax (padding 1 on each side, as PyTorch's padding=1)."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(C_MID, (3, 3), padding=1, feature_group_count=G, name='grouped')(x)
    return nn.Conv(C_MID, (3, 3), strides=2, padding=1, feature_group_count=C_MID,
                   name='depthwise')(jax.nn.relu(x))


def test_lora_on_grouped_convs_matches_peft():
  """peft's LoRA on Conv2d with groups: A a dense conv, B a grouped 1x1 conv, rank a multiple
  of the groups (here r = 12 for a 4-group and a 12-group depthwise conv). Neither merges it."""
  from vadapt import merge  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = _GroupedTorch().eval()
  images = np.random.default_rng(4).standard_normal((2, 9, 9, C_IN)).astype(np.float32)
  params = {name: {'kernel': np.transpose(m.weight.detach().numpy(), (2, 3, 1, 0)),
                   'bias': m.bias.detach().numpy()}
            for name, m in (('grouped', net.grouped), ('depthwise', net.depthwise))}
  bare, ref, tensors = _peft_forward(
      net, 'lora', ['grouped', 'depthwise'], dict(x=torch.from_numpy(images).permute(0, 3, 1, 2)),
      lambda name: name, rank=C_MID)
  ref, bare = ref.permute(0, 2, 3, 1).numpy(), bare.permute(0, 2, 3, 1).numpy()
  model = api.adapt(_GroupedFlax(), 'lora', rank=C_MID, alpha=ALPHA,
                    targets=['grouped', 'depthwise'])
  adapted = _with_adapters(model, params, tensors, images)
  assert {k: v.shape for k, v in flatten(adapted).items() if '/lora/' in k} == {
      'grouped/lora/a': (3, 3, C_IN, C_MID), 'grouped/lora/b': (C_MID // G, C_MID),
      'depthwise/lora/a': (3, 3, C_MID, C_MID), 'depthwise/lora/b': (1, C_MID)}
  ours = jax.jit(model.apply)({'params': adapted}, images)
  err, effect = _rel_err(ours, ref), _rel_err(bare, ref)
  print(f'\nLoRA on grouped/depthwise convs vs peft: max relative error {err:.2e}; the adapters '
        f'move the output by {effect:.2e}')
  assert err <= TOLERANCE
  assert effect > 100 * TOLERANCE
  with pytest.raises(ValueError, match='grouped convolution .* cannot be merged'):
    merge.merge(model, adapted)
