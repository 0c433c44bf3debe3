"""DINOv2 in vadapt's ViT: parity with transformers (random weights, offline), the position-grid
resampling against PyTorch, golden parameter counts, the three file formats, adapters on it, and
errors for files and inputs that are not what they claim.

The error reported is max|ours - theirs| / max|theirs| over the whole output, in float32.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import api, backbones
from vadapt.models import vit
from vadapt.pretrained import dinov2 as pd
from vadapt.pretrained import vit as pv
from vadapt.pretrained.common import CheckpointMismatchError, flatten, unflatten

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOLERANCE = 1e-5
# mu/14: width 32, 2 blocks, 2 heads, MLP 64 (mlp_ratio 2), a 37x37 position grid as the real ones.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            image_size=518, patch_size=14)
# transformers' Dinov2Model / Dinov2WithRegistersModel parameter counts (built on the meta device
# from these widths: mlp_ratio 4, SwiGLU for g) minus the mask token (D), which only masked-image
# pre-training uses and vadapt does not hold. Backbone only (num_classes=None).
GOLDEN = {
    'S/14': 22_056_192,
    'B/14': 86_579_712,
    'L/14': 304_367_616,
    'g/14': 1_136_479_232,
    'mu/14': 80_000,
    'S/14-reg': 22_057_728,
    'B/14-reg': 86_582_784,
    'L/14-reg': 304_371_712,
    'g/14-reg': 1_136_485_376,
    'mu/14-reg': 80_128,
}


def _rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _images(h, w, n=2, seed=1):
  return np.random.RandomState(seed).uniform(-2, 2, (n, 3, h, w)).astype(np.float32)


@functools.partial(jax.jit, static_argnames='model')
def _encode(model, params, images):
  return model.apply({'params': params}, images, return_features=True)[1]['encoded']


@functools.partial(jax.jit, static_argnames='model')
def _apply(model, params, images):
  return model.apply({'params': params}, images)


def _hf_model(kind, seed=0):
  """A tiny transformers model with every parameter perturbed, so misplaced weights show."""
  torch.manual_seed(seed)
  if kind == 'registers':
    model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**TINY))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        **TINY, use_swiglu_ffn=kind == 'swiglu'))
  with torch.no_grad():
    for p in model.parameters():  # LayerScale gains, LayerNorms, registers all leave 0 / 1.
      p.add_(0.3 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope='module', params=['plain', 'registers', 'swiglu'])
def hf_dir(request, tmp_path_factory):
  model = _hf_model(request.param)
  path = tmp_path_factory.mktemp(f'dinov2_{request.param}')
  model.save_pretrained(path)
  return request.param, model, str(path)


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize('antialias', [False, True])
@pytest.mark.parametrize('sizes', [(37, 16), (37, 3), (37, 40), (4, 9), (5, 5)])
def test_resample_matrix_is_torch_bicubic(sizes, antialias):
  n, m = sizes
  # Resampling the identity along H (W kept) gives torch's (out, in) weight matrix.
  eye = torch.eye(n, dtype=torch.float64).reshape(1, 1, n, n)
  want = torch.nn.functional.interpolate(eye, size=(m, n), mode='bicubic', align_corners=False,
                                         antialias=antialias)[0, 0].numpy()
  got = vit.resample_matrix(n, m, antialias=antialias)
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize('sizes', [(37, 16), (37, 4), (37, 74)])
def test_resample_matrix_official_scale_factor(sizes):
  # The official DINOv2 code passes scale_factor=(out + 0.1) / in instead of a size.
  n, m = sizes
  eye = torch.eye(n, dtype=torch.float64).reshape(1, 1, n, n)
  want = torch.nn.functional.interpolate(eye, scale_factor=((m + 0.1) / n, 1.0), mode='bicubic',
                                         align_corners=False)[0, 0].numpy()
  assert want.shape == (m, n)
  np.testing.assert_allclose(vit.resample_matrix(n, m, offset=0.1), want, atol=1e-12)


def test_interpolate_grid_keeps_an_unchanged_grid():
  table = jnp.arange(2 * 9 * 3, dtype=jnp.float32).reshape(1, 18, 3)[:, :9]
  assert vit.interpolate_grid(table, (3, 3), (3, 3)) is table


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize('hw', [(224, 224), (42, 70)])
def test_parity_with_transformers(hf_dir, hw):
  """224 resamples the 37x37 grid to 16x16; 42x70 to a non-square 3x5 grid."""
  kind, hf, path = hf_dir
  model, params = pd.load_model(path)
  assert model.num_registers == (4 if kind == 'registers' else 0)
  assert model.posemb_interpolation_antialias == (kind == 'registers')
  assert model.gated_mlp == (kind == 'swiglu')
  images = _images(*hw)
  with torch.no_grad():
    theirs = hf(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
  ours = _encode(model, params, jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert ours.shape == theirs.shape
  assert _rel_err(ours, theirs) <= TOLERANCE


@pytest.mark.slow
def test_s14_parity_with_transformers(tmp_path):
  """Full-size ViT-S/14 (random weights) at 224 and at 280x196 (a 20x14 grid)."""
  torch.manual_seed(0)
  config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                     image_size=518, patch_size=14)
  hf = transformers.Dinov2Model(config)
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.05 * torch.randn_like(p))
  hf.eval().save_pretrained(tmp_path)
  model, params = pd.load_model(tmp_path)
  assert model == vit.dinov2('S/14')
  for h, w in ((224, 224), (280, 196)):
    images = _images(h, w)
    with torch.no_grad():
      theirs = hf(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    ours = _encode(model, params, jnp.asarray(images.transpose(0, 2, 3, 1)))
    assert _rel_err(ours, theirs) <= TOLERANCE, (h, w, _rel_err(ours, theirs))


def test_pooled_outputs_match_transformers(tmp_path):
  """num_classes=None is the pooler output; 'token_gap' feeds Dinov2ForImageClassification."""
  torch.manual_seed(3)
  hf = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**TINY, num_labels=5))
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.3 * torch.randn_like(p))
  hf.eval().save_pretrained(tmp_path)
  model, params = pd.load_model(tmp_path)
  assert (model.classifier, model.num_classes) == ('token_gap', 5)
  images = _images(56, 56)
  with torch.no_grad():
    logits = hf(pixel_values=torch.from_numpy(images)).logits.numpy()
    pooled = hf.dinov2(pixel_values=torch.from_numpy(images)).pooler_output.numpy()
  x = jnp.asarray(images.transpose(0, 2, 3, 1))
  assert _rel_err(_apply(model, params, x), logits) <= TOLERANCE
  features, features_params = pd.load_model(tmp_path, num_classes=None, classifier='token')
  assert 'head' not in features_params
  assert _rel_err(_apply(features, features_params, x), pooled) <= TOLERANCE


def _official_state_dict(hf):
  """transformers on-disk names -> facebookresearch/dinov2 names (what its .pth files hold)."""
  sd = {k: v.clone() for k, v in hf.state_dict().items()}
  out = {'cls_token': sd.pop('embeddings.cls_token'),
         'pos_embed': sd.pop('embeddings.position_embeddings'),
         'mask_token': sd.pop('embeddings.mask_token'),
         'patch_embed.proj.weight': sd.pop('embeddings.patch_embeddings.projection.weight'),
         'patch_embed.proj.bias': sd.pop('embeddings.patch_embeddings.projection.bias'),
         'norm.weight': sd.pop('layernorm.weight'), 'norm.bias': sd.pop('layernorm.bias')}
  for i in range(TINY['num_hidden_layers']):
    p, b = f'encoder.layer.{i}.', f'blocks.{i}.'
    for leaf in ('weight', 'bias'):
      out[f'{b}attn.qkv.{leaf}'] = torch.cat(
          [sd.pop(f'{p}attention.{x}_proj.{leaf}') for x in 'qkv'])
      out[f'{b}attn.proj.{leaf}'] = sd.pop(f'{p}attention.o_proj.{leaf}')
      for name in ('norm1', 'norm2', 'mlp.fc1', 'mlp.fc2'):
        out[f'{b}{name}.{leaf}'] = sd.pop(f'{p}{name}.{leaf}')
    out[f'{b}ls1.gamma'] = sd.pop(f'{p}layer_scale1.lambda1')
    out[f'{b}ls2.gamma'] = sd.pop(f'{p}layer_scale2.lambda1')
  assert not sd, sorted(sd)
  return out


def test_official_pth(tmp_path):
  hf = _hf_model('plain')
  state = _official_state_dict(hf)
  torch.save(state, tmp_path / 'dinov2_vitmu14_pretrain.pth')
  # Chunked training layout (blocks.{chunk}.{index}) reads the same.
  torch.save({k.replace('blocks.', 'blocks.0.'): v for k, v in state.items()},
             tmp_path / 'chunked.pth')
  kwargs = pd.model_kwargs_from_checkpoint(tmp_path / 'dinov2_vitmu14_pretrain.pth')
  # The official code resamples by scale factor (offset 0.1); the file shows no head count.
  assert kwargs['posemb_interpolation_offset'] == 0.1
  model = vit.dinov2('mu/14', posemb_interpolation_offset=0.1)
  params = pd.load(tmp_path / 'dinov2_vitmu14_pretrain.pth', model)
  chunked = pd.load(tmp_path / 'chunked.pth', model)
  jax.tree.map(np.testing.assert_array_equal, params, chunked)
  # At the pre-training size (37x37 patches) no resampling happens: exactly transformers.
  images = _images(518, 518, n=1)
  with torch.no_grad():
    theirs = hf(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
  ours = _encode(model, params, jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert _rel_err(ours, theirs) <= TOLERANCE


def test_scan_loads_the_same_function(hf_dir):
  kind, _, path = hf_dir
  if kind != 'plain':
    pytest.skip('one architecture is enough')
  model, params = pd.load_model(path)
  scanned, scanned_params = pd.load_model(path, scan=True)
  assert flatten(scanned_params)['Transformer/encoderblock/LayerScale_0/scale'].shape == (2, 32)
  x = jnp.asarray(_images(28, 28).transpose(0, 2, 3, 1))
  np.testing.assert_allclose(_encode(scanned, scanned_params, x), _encode(model, params, x),
                             rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- counts


def _count(model, size=518):
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_every_variant_has_a_golden_count():
  assert set(GOLDEN) == set(vit.DINOV2_VARIANTS)


@pytest.mark.parametrize('variant', sorted(GOLDEN))
def test_param_count(variant):
  # nn.scan traces one block; the stacked count is the same. Nothing is allocated.
  assert _count(vit.dinov2(variant, scan=True)) == GOLDEN[variant]


def test_golden_counts_are_transformers_counts():
  for variant, count in GOLDEN.items():
    c = vit.dinov2_config(variant)
    kwargs = dict(hidden_size=c['hidden_size'], num_hidden_layers=c['num_layers'],
                  num_attention_heads=c['num_heads'], image_size=518, patch_size=14,
                  mlp_ratio=2 if variant.startswith('mu/') else 4,
                  use_swiglu_ffn=c['gated_mlp'])
    with torch.device('meta'):  # shapes only: ViT-g would be 4.5 GB of float32.
      if c['num_registers']:
        hf = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**kwargs, num_register_tokens=4))
      else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    assert sum(p.numel() for p in hf.parameters()) - c['hidden_size'] == count, variant


# ----------------------------------------------------------------------------- adapters


@pytest.fixture(scope='module')
def backbone():
  model = vit.dinov2('mu/14-reg', num_classes=3)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))['params']
  params['head']['kernel'] = jax.random.normal(jax.random.key(1), params['head']['kernel'].shape)
  return model, params


def _with_adapters(model, backbone_params, method):
  adapted = api.adapt(model, method, bottleneck=4)
  x = jax.random.normal(jax.random.key(2), (2, 28, 42, 3))
  params = api.init_with_pretrained(adapted, backbone_params, jax.random.key(3), x)
  return adapted, params, x


def _perturb(params, where):
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(4), len(flat))
  return unflatten({k: v + 0.3 * jax.random.normal(key, v.shape) if where in k else v
                    for key, (k, v) in zip(keys, flat.items())})


@pytest.mark.parametrize('method', ['houlsby', 'pfeiffer', 'parallel'])
def test_adapters_are_identity_at_init(backbone, method):
  model, backbone_params = backbone
  adapted, params, x = _with_adapters(model, backbone_params, method)
  adapter_keys = [k for k in flatten(params) if '/adapter/' in k]
  assert adapter_keys and all('/MlpBlock_0/' in k or '/MultiHeadDotProductAttention_0/' in k
                              for k in adapter_keys)
  plain = _apply(model, backbone_params, x)
  np.testing.assert_array_equal(_apply(adapted, params, x), plain)
  # Trained adapters change the output.
  moved = _apply(adapted, _perturb(params, '/adapter/'), x)
  assert np.abs(np.asarray(moved) - np.asarray(plain)).max() > 1e-3


def test_layer_scale_applies_after_the_adapter(backbone):
  """Zero LayerScale gains silence each branch with its adapter: the adapter sits inside."""
  model, backbone_params = backbone
  adapted, params, x = _with_adapters(model, backbone_params, 'houlsby')
  flat = flatten(_perturb(params, '/adapter/'))
  silenced = unflatten({k: np.zeros_like(v) if '/LayerScale_' in k else v
                        for k, v in flat.items()})
  silenced_backbone = {k: v for k, v in flatten(silenced).items() if '/adapter/' not in k}
  np.testing.assert_array_equal(_apply(adapted, silenced, x),
                                _apply(model, unflatten(silenced_backbone), x))


# ----------------------------------------------------------------------------- backbones


def _cfg(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = dict(model='dinov2', variant='mu/14', image_size=28, dtype='float32', checkpoint='',
             checkpoint_format='auto', overrides={}, reset_head=False)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


@pytest.mark.slow
def test_adapter_run_from_a_config(hf_dir, tmp_path):
  """backbone.model='dinov2' through the CLI's code path: one Houlsby step on digits at 28 px.

  Slow only for the suite's budget (~30 s of CPU); make_model and load_params are also tested
  below, and the Fashion-MNIST tests train DINOv2 from its config.
  """
  kind, _, path = hf_dir
  if kind != 'registers':
    pytest.skip('one architecture is enough')
  from config_overrides import load_config  # pylint: disable=g-import-not-at-top
  from vadapt import train  # pylint: disable=g-import-not-at-top
  config = load_config(**{'mesh.num_devices': 1, 'backbone.model': 'dinov2',
                          'backbone.variant': 'mu/14-reg', 'backbone.image_size': 28,
                          'backbone.checkpoint': path, 'total_steps': 1, 'eval_at_start': False,
                          'checkpoint_every': 1})
  model = backbones.make_model(config.backbone, 10)
  assert model.posemb_interpolation_antialias and model.num_registers == 4
  result = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(result.metrics['train/loss'])
  delta, frozen = flatten(result.delta), flatten(result.frozen)
  assert any('/MlpBlock_0/adapter/' in k for k in delta) and 'head/kernel' in delta
  # The frozen backbone is the file's weights, bit for bit.
  _, loaded = pd.load_model(path)
  loaded = flatten(loaded)
  assert set(frozen) == set(loaded)
  for k, v in loaded.items():
    np.testing.assert_array_equal(frozen[k], v)


def test_backbone_from_config(hf_dir):
  kind, _, path = hf_dir
  if kind != 'registers':
    pytest.skip('one architecture is enough')
  cfg = _cfg(variant='mu/14-reg', checkpoint=path)
  model = backbones.make_model(cfg, num_classes=4)
  params = backbones.load_params(cfg, model)
  assert model.posemb_interpolation_antialias and model.num_registers == 4
  assert flatten(params)['head/kernel'].shape == (32, 4)
  assert not np.any(flatten(params)['head/kernel'])
  _, loaded = pd.load_model(path)
  for k, v in flatten(loaded).items():
    np.testing.assert_array_equal(flatten(params)[k], v)


def test_backbone_rejects_a_size_not_divisible_by_14():
  with pytest.raises(ValueError, match=r'image_size=50 is not divisible by the DINOv2 patch size '
                                       r'14: expected a multiple of 14'):
    backbones.make_model(_cfg(image_size=50), num_classes=2)


# ----------------------------------------------------------------------------- bad input


def test_resolution_not_divisible_by_the_patch():
  model = vit.dinov2('mu/14')
  with pytest.raises(ValueError, match=r'Image size 50x56 is not divisible by the patch size 14: '
                                       r'expected a height and width that are multiples of 14'):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 50, 56, 3), jnp.float32))


def test_dinov2_file_as_plain_vit(hf_dir, tmp_path):
  _, _, path = hf_dir
  with pytest.raises(pv.UnknownCheckpointFormatError,
                     match=r'holds DINOv2 \(found .*\), expected a plain ViT: load it with '
                           r'vadapt.pretrained.dinov2.load'):
    pv.load(path, vit.from_variant('mu/4', num_classes=None), image_size=32)
  for name in ('vit_s_focus.onnx', 'dinov2_vits14_pretrain.pth'):
    (tmp_path / name).write_bytes(b'\0' * 16)
    with pytest.raises(pv.UnknownCheckpointFormatError, match='vadapt.pretrained.dinov2.load'):
      pv.load(tmp_path / name, vit.from_variant('mu/4', num_classes=None), image_size=32)


def test_plain_vit_file_as_dinov2(tmp_path):
  model = vit.from_variant('mu/4', num_classes=None, activation='gelu_exact')
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  pv.save_hf_safetensors(params, tmp_path / 'vit.safetensors')
  pv.save_vit_jax_npz(params, tmp_path / 'vit.npz')
  with pytest.raises(pv.UnknownCheckpointFormatError,
                     match=r'holds a plain ViT \(encoder.layer.0.layernorm_before, no '
                           r'LayerScale\), expected DINOv2'):
    pd.load(tmp_path / 'vit.safetensors', vit.dinov2('mu/14'))
  with pytest.raises(pv.UnknownCheckpointFormatError, match='a .npz holds a vit_jax / big_vision '
                                                            'ViT, not DINOv2'):
    pd.load(tmp_path / 'vit.npz', vit.dinov2('mu/14'))


def test_plain_vit_model_for_a_dinov2_file(hf_dir):
  _, _, path = hf_dir
  with pytest.raises(ValueError, match=r'is DINOv2, but the model is a plain ViT'):
    pd.load(path, vit.from_variant('mu/4', num_classes=None))


def test_dinov2_file_into_another_size(hf_dir):
  kind, _, path = hf_dir
  if kind != 'plain':
    pytest.skip('one architecture is enough')
  with pytest.raises(CheckpointMismatchError, match='has 2 attention heads but the model has 6'):
    pd.load(path, vit.dinov2('S/14'))
  with pytest.raises(CheckpointMismatchError, match='shape mismatches'):
    pd.load(path, vit.dinov2('mu/14', posemb_grid=16))
  with pytest.raises(CheckpointMismatchError, match=r'missing keys \(1\):\n    registers'):
    pd.load(path, vit.dinov2('mu/14-reg'))


def test_corrupt_files(hf_dir, tmp_path):
  _, _, path = hf_dir
  data = open(os.path.join(path, 'model.safetensors'), 'rb').read()
  (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(pv.UnknownCheckpointFormatError,
                     match=r'Cannot read .*cut.safetensors.* as a DINOv2 checkpoint: safetensors '
                           'cannot read it'):
    pd.load(tmp_path / 'cut.safetensors', vit.dinov2('mu/14'))
  torch.save(_official_state_dict(_hf_model('plain')), tmp_path / 'full.pth')
  data = (tmp_path / 'full.pth').read_bytes()
  (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
  with pytest.raises(pv.UnknownCheckpointFormatError,
                     match=r'cut.pth.* as a DINOv2 checkpoint: torch.load\(weights_only=True\) '
                           'refused it'):
    pd.load(tmp_path / 'cut.pth', vit.dinov2('mu/14'))
  # A pickle of arbitrary objects is refused without running anything.
  torch.save({'model': {'blocks.0.norm1.weight': object()}}, tmp_path / 'objects.pth')
  with pytest.raises(pv.UnknownCheckpointFormatError, match='refused it'):
    pd.read(tmp_path / 'objects.pth')
  (tmp_path / 'garbage.onnx').write_bytes(b'not a protobuf' * 10)
  with pytest.raises(pv.UnknownCheckpointFormatError,
                     match=r'garbage.onnx.* as a DINOv2 checkpoint: onnx cannot parse it'):
    pd.read(tmp_path / 'garbage.onnx')


def test_wrong_onnx_file(tmp_path):
  onnx = pytest.importorskip('onnx')
  from onnx import helper, numpy_helper, TensorProto  # pylint: disable=g-import-not-at-top
  weight = numpy_helper.from_array(np.ones((4, 2), np.float32), 'fc.weight')
  graph = helper.make_graph(
      [helper.make_node('MatMul', ['x', 'fc.weight'], ['y'], name='/fc/MatMul')], 'mlp',
      [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 4])],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 2])], [weight])
  onnx.save(helper.make_model(graph), tmp_path / 'mlp.onnx')
  with pytest.raises(pv.UnknownCheckpointFormatError,
                     match=r'expected an ONNX graph with a DINOv2 backbone under backbone\.\* '
                           r'\(backbone.embeddings.patch_embeddings.projection.weight\); found '
                           r"initializers named \['fc'\]"):
    pd.read(tmp_path / 'mlp.onnx')
