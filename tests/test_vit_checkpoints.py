"""ViT checkpoint readers and writers: round trips, adaptation to the model, and errors."""

import functools
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from vadapt.models import vit
from vadapt.pretrained import vit as pv
from vadapt.pretrained.common import CheckpointMismatchError, flatten, unflatten

POSEMB = 'Transformer/posembed_input/pos_embedding'


def _random_params(model, size=32, seed=0):
  """Every leaf random (heads and biases included), so a wrong mapping cannot go unseen."""
  rng = np.random.RandomState(seed)
  return unflatten({k: (0.3 * rng.randn(*s.shape)).astype(s.dtype)
                    for k, s in sorted(pv.abstract_params(model, size).items())})


@functools.partial(jax.jit, static_argnames=('model', 'return_features'))
def _apply(model, params, images, return_features=False):
  # One compile per model and shape; eager apply compiles every op separately, which is slower.
  return model.apply({'params': params}, images, return_features=return_features)


def _images(size=32, n=2):
  return np.random.RandomState(42).randn(n, *(size if isinstance(size, tuple) else (size, size)),
                                         3).astype(np.float32)


def _assert_same_params(a, b):
  a, b = flatten(a), flatten(b)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.fixture(scope='module')
def tiny():
  model = vit.from_variant('mu/4', num_classes=10)
  params = _random_params(model)
  return model, params, _apply(model, params, _images())


# ----------------------------------------------------------------------------- round trips


def test_vit_jax_round_trip(tiny, tmp_path):
  model, params, logits = tiny
  path = tmp_path / 'ViT-mu_4.npz'
  pv.save_vit_jax_npz(params, path)
  with np.load(path, allow_pickle=False) as f:
    keys = set(f.files)
    assert f[POSEMB].shape == (1, 65, 32)  # class-token slot + 8x8 grid
  # vit_jax's pre-Linen names are what the file holds.
  assert 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel' in keys
  assert 'Transformer/encoderblock_1/LayerNorm_2/scale' in keys
  assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias' in keys
  assert pv.detect_format(path) == 'vit_jax'
  loaded = pv.load(path, model, image_size=32)
  _assert_same_params(loaded, params)
  np.testing.assert_array_equal(_apply(model, loaded, _images()), logits)


@pytest.mark.parametrize('file_scan', [False, True])
@pytest.mark.parametrize('model_scan', [False, True])
def test_big_vision_round_trip(tmp_path, file_scan, model_scan):
  loop = vit.from_variant('mu/4', num_classes=10, posemb_includes_cls=False)
  params = _random_params(loop)
  logits = _apply(loop, params, _images())
  path = tmp_path / 'bv.npz'
  pv.save_big_vision_npz(params, path, scan=file_scan)
  with np.load(path, allow_pickle=False) as f:
    assert f['pos_embedding'].shape == (1, 64, 32)  # no class-token slot
    if file_scan:
      assert f['Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel'].shape == (
          2, 32, 2, 16)
      assert not any('encoderblock_' in k for k in f.files)
  assert pv.detect_format(path) == 'big_vision'

  model = loop.clone(scan=model_scan)
  loaded = pv.load(path, model, image_size=32)
  expected = pv.stack_layers(flatten(params)) if model_scan else flatten(params)
  _assert_same_params(loaded, unflatten(expected))
  out = _apply(model, loaded, _images())
  if model_scan:  # nn.scan is a different program from the unrolled loop.
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-6)
  else:
    np.testing.assert_array_equal(out, logits)


def test_big_vision_map_head(tmp_path):
  model = vit.from_variant('mu/4', num_classes=10, posemb_includes_cls=False, classifier='map',
                           scan=True)
  params = _random_params(model)
  pv.save_big_vision_npz(params, tmp_path / 'map.npz', scan=True)
  with np.load(tmp_path / 'map.npz', allow_pickle=False) as f:
    assert f['MAPHead_0/probe'].shape == (1, 1, 32)
  assert pv.inspect(tmp_path / 'map.npz')['classifier'] == 'map'
  _assert_same_params(pv.load(tmp_path / 'map.npz', model, image_size=32), params)


def test_big_vision_training_checkpoint_prefix(tmp_path):
  model = vit.from_variant('mu/4', num_classes=10, posemb_includes_cls=False)
  params = _random_params(model)
  flat = {'params/' + k: v for k, v in flatten(params).items()}
  flat['params/pos_embedding'] = flat.pop('params/' + POSEMB)
  flat['opt/some_state'] = np.zeros(3)  # optimizer state is ignored
  np.savez(tmp_path / 'ckpt.npz', **flat)
  _assert_same_params(pv.load(tmp_path / 'ckpt.npz', model, image_size=32), params)


@pytest.mark.parametrize('scan', [False, True])
def test_big_vision_bfloat16_npz_loads(tmp_path, scan):
  """big_vision saves bfloat16 params with np.savez, which stores them as 2-byte void ('|V2')."""
  model = vit.from_variant('mu/4', num_classes=10, posemb_includes_cls=False)
  params = _random_params(model)
  pv.save_big_vision_npz(params, tmp_path / 'f32.npz', scan=scan)
  with np.load(tmp_path / 'f32.npz', allow_pickle=False) as f:
    # As big_vision's save_checkpoint: '/'-joined names -> device_get'd bfloat16 arrays -> savez.
    flat = {'params/' + k: np.asarray(jnp.asarray(f[k], jnp.bfloat16)) for k in f.files}
  np.savez(tmp_path / 'bf16.npz', **flat)
  with np.load(tmp_path / 'bf16.npz', allow_pickle=False) as f:
    assert f['params/embedding/kernel'].dtype.str == '|V2'  # what makes a plain cast fail
  assert pv.detect_format(tmp_path / 'bf16.npz') == 'big_vision'
  loaded = pv.load(tmp_path / 'bf16.npz', model, image_size=32)
  want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), params)
  _assert_same_params(loaded, want)
  assert loaded['embedding']['kernel'].dtype == np.float32


def test_npz_with_other_untyped_arrays_is_one_error(tiny, tmp_path):
  _, params, _ = tiny
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  flat['cls'] = np.zeros((1, 1, 32), np.float32).view('V4')
  np.savez(tmp_path / 'v4.npz', **flat)
  with pytest.raises(ValueError, match=r"array 'cls' has the untyped dtype '\|V4'"):
    pv.load(tmp_path / 'v4.npz', vit.from_variant('mu/4', num_classes=10), image_size=32)


def test_hf_round_trip(tiny, tmp_path):
  model, params, logits = tiny
  path = tmp_path / 'model.safetensors'
  pv.save_hf_safetensors(params, path, num_heads=2)
  from safetensors.numpy import load_file
  tensors = load_file(path)
  assert tensors['vit.encoder.layer.0.attention.attention.query.weight'].shape == (32, 32)
  assert tensors['vit.embeddings.patch_embeddings.projection.weight'].shape == (32, 3, 4, 4)
  assert tensors['classifier.weight'].shape == (10, 32)
  loaded = pv.load(path, model, image_size=32)
  _assert_same_params(loaded, params)
  np.testing.assert_array_equal(_apply(model, loaded, _images()), logits)


@pytest.mark.parametrize('fmt', ['vit_jax', 'big_vision', 'hf'])
def test_bfloat16_params_are_written_as_float32(tiny, tmp_path, fmt):
  model, params, _ = tiny
  bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  path = tmp_path / ('model.safetensors' if fmt == 'hf' else 'w.npz')
  {'vit_jax': pv.save_vit_jax_npz, 'hf': pv.save_hf_safetensors,
   'big_vision': lambda p, f: pv.save_big_vision_npz(p, f, scan=False)}[fmt](bf16, path)
  loaded = pv.load(path, model.clone(posemb_includes_cls=fmt != 'big_vision'), image_size=32)
  np.testing.assert_array_equal(loaded['embedding']['kernel'],
                                np.asarray(bf16['embedding']['kernel'], np.float32))


def test_slot_conversion_is_exact(tiny, tmp_path):
  """A vit_jax file (class-token slot) into a big_vision-style model and back computes the same."""
  model, params, logits = tiny
  pv.save_vit_jax_npz(params, tmp_path / 'a.npz')
  bv_model = model.clone(posemb_includes_cls=False)
  folded = pv.load(tmp_path / 'a.npz', bv_model, image_size=32)
  assert folded['Transformer']['posembed_input']['pos_embedding'].shape == (1, 64, 32)
  np.testing.assert_allclose(_apply(bv_model, folded, _images()), logits,
                             rtol=1e-6, atol=1e-6)
  pv.save_big_vision_npz(folded, tmp_path / 'b.npz', scan=False)
  back = pv.load(tmp_path / 'b.npz', model, image_size=32)
  np.testing.assert_array_equal(back['Transformer']['posembed_input']['pos_embedding'][:, :1], 0)
  np.testing.assert_allclose(_apply(model, back, _images()), logits,
                             rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- inspection


@pytest.mark.parametrize('fmt', ['vit_jax', 'big_vision', 'hf'])
def test_model_kwargs_from_checkpoint(tmp_path, fmt):
  model = vit.from_variant('mu/8', num_classes=7, representation_size=16, scan=fmt == 'big_vision',
                           posemb_includes_cls=fmt != 'big_vision')
  params = _random_params(model)
  if fmt == 'hf':
    params = {k: v for k, v in params.items() if k != 'head'}  # HF has pooler or classifier
    model = model.clone(num_classes=None)
  path = tmp_path / ('model.safetensors' if fmt == 'hf' else 'm.npz')
  {'vit_jax': pv.save_vit_jax_npz,
   'big_vision': lambda p, f: pv.save_big_vision_npz(p, f, scan=True),
   'hf': pv.save_hf_safetensors}[fmt](params, path)

  info = pv.inspect(path)
  assert info['format'] == fmt
  assert info['image_size'] == 32 and info['patch_size'] == 8
  assert info['num_heads'] == (None if fmt == 'hf' else 2)  # HF q/k/v do not show the split
  if fmt == 'hf':
    (tmp_path / 'config.json').write_text(
        '{"model_type": "vit", "num_attention_heads": 2, "hidden_act": "gelu"}')
  kwargs = pv.model_kwargs_from_checkpoint(path)
  rebuilt = vit.VisionTransformer(**kwargs)
  expected = {f: getattr(model, f) for f in kwargs if f not in ('activation', 'layer_norm_epsilon')}
  assert {f: kwargs[f] for f in expected} == expected
  assert kwargs['activation'] == ('gelu_exact' if fmt == 'hf' else 'gelu')
  _assert_same_params(pv.load(path, rebuilt, image_size=32), params)


def test_hf_config_kwargs():
  kwargs = pv.model_kwargs_from_hf_config({
      'model_type': 'vit', 'architectures': ['ViTForImageClassification'], 'hidden_size': 768,
      'num_hidden_layers': 12, 'num_attention_heads': 12, 'intermediate_size': 3072,
      'patch_size': 16, 'hidden_act': 'gelu', 'layer_norm_eps': 1e-12,
      'id2label': {str(i): str(i) for i in range(1000)}})
  assert kwargs == dict(num_classes=1000, patch_size=16, hidden_size=768, num_layers=12,
                        num_heads=12, mlp_dim=3072, classifier='token', posemb_includes_cls=True,
                        activation='gelu_exact', layer_norm_epsilon=1e-12, channels=3)
  assert pv.model_kwargs_from_hf_config({'architectures': ['ViTModel']})['num_classes'] is None
  with pytest.raises(ValueError, match='model_type "vit"'):
    pv.model_kwargs_from_hf_config({'model_type': 'clip'})
  with pytest.raises(ValueError, match="hidden_act 'swish'"):
    pv.model_kwargs_from_hf_config({'hidden_act': 'swish'})


# ----------------------------------------------------------------------------- position embedding


def _bilinear_align_corners(grid, out_h, out_w):
  """Independent float64 reference: separable linear interpolation, corners onto corners."""
  grid = np.asarray(grid, np.float64)
  h, w, _ = grid.shape
  ys, xs = np.linspace(0, h - 1, out_h), np.linspace(0, w - 1, out_w)
  rows = np.stack([np.stack([np.interp(ys, np.arange(h), grid[:, j, c]) for j in range(w)], 1)
                   for c in range(grid.shape[2])], -1)
  return np.stack([np.stack([np.interp(xs, np.arange(w), rows[i, :, c]) for i in range(out_h)], 0)
                   for c in range(grid.shape[2])], -1)


def test_resize_posemb_matches_references(tiny, tmp_path):
  """32x32 (8x8 grid) loaded at 48x48 (12x12 grid).

  vit_jax resizes with scipy.ndimage.zoom(order=1), whose default grid_mode=False maps corner
  pixel centres onto corner pixel centres: that is bilinear with align_corners=True (checked
  against torch and an independent np.interp reference). align_corners=False, torch's default,
  is a different resampling and is shown to differ.
  """
  torch = pytest.importorskip('torch')
  model, params, _ = tiny
  pv.save_vit_jax_npz(params, tmp_path / 'a.npz')
  loaded = pv.load(tmp_path / 'a.npz', model, image_size=48)
  out = _apply(model, loaded, _images(48))
  assert out.shape == (2, 10) and np.all(np.isfinite(out))

  old = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
  new = loaded['Transformer']['posembed_input']['pos_embedding']
  assert new.shape == (1, 1 + 12 * 12, 32)
  np.testing.assert_array_equal(new[:, :1], old[:, :1])  # class-token slot untouched
  grid = old[0, 1:].reshape(8, 8, 32)
  nchw = torch.from_numpy(grid).permute(2, 0, 1)[None]
  resample = lambda align: torch.nn.functional.interpolate(
      nchw, size=(12, 12), mode='bilinear', align_corners=align)[0].permute(1, 2, 0).numpy()
  got = new[0, 1:].reshape(12, 12, 32)
  err_torch = np.abs(got - resample(True)).max()
  err_np = np.abs(got - _bilinear_align_corners(grid, 12, 12)).max()
  err_half_pixel = np.abs(got - resample(False)).max()
  print(f'posemb resize max abs error: torch align_corners=True {err_torch:.2e}, '
        f'np.interp float64 {err_np:.2e}; torch align_corners=False differs by {err_half_pixel:.2e}')
  assert err_torch < 1e-5 and err_np < 1e-5
  assert err_half_pixel > 1e-2


def test_resize_posemb_direct():
  posemb = np.random.RandomState(0).randn(1, 16, 3).astype(np.float32)  # 4x4, no slot
  out = pv.resize_posemb(posemb, (6, 2), has_cls=False)
  assert out.shape == (1, 12, 3) and out.dtype == np.float32
  np.testing.assert_allclose(
      out[0].reshape(6, 2, 3),
      scipy.ndimage.zoom(posemb[0].reshape(4, 4, 3), (6 / 4, 2 / 4, 1), order=1), rtol=1e-6)
  assert pv.resize_posemb(posemb, 4, has_cls=False) is posemb
  with pytest.raises(ValueError, match='15 grid positions after the class-token slot'):
    pv.resize_posemb(posemb, 6, has_cls=True)


def test_big_vision_resize(tmp_path):
  model = vit.from_variant('mu/4', num_classes=None, posemb_includes_cls=False, classifier='gap')
  params = _random_params(model)
  pv.save_big_vision_npz(params, tmp_path / 'gap.npz', scan=False)
  loaded = pv.load(tmp_path / 'gap.npz', model, image_size=(24, 40))
  assert loaded['Transformer']['posembed_input']['pos_embedding'].shape == (1, 6 * 10, 32)
  assert _apply(model, loaded, _images((24, 40))).shape == (2, 32)


# ----------------------------------------------------------------------------- heads


def test_head_replaced_with_zeros(tmp_path):
  big = vit.from_variant('mu/4', num_classes=1000)
  params = _random_params(big)
  pv.save_vit_jax_npz(params, tmp_path / 'i1k.npz')
  small = big.clone(num_classes=10)
  loaded = pv.load(tmp_path / 'i1k.npz', small, image_size=32)
  np.testing.assert_array_equal(loaded['head']['kernel'], np.zeros((32, 10)))
  np.testing.assert_array_equal(loaded['head']['bias'], np.zeros(10))
  logits, feats = _apply(small, loaded, _images(), return_features=True)
  np.testing.assert_array_equal(logits, 0.0)
  _, ref = _apply(big, params, _images(), return_features=True)
  np.testing.assert_array_equal(feats['encoded'], ref['encoded'])
  np.testing.assert_array_equal(feats['pre_logits'], ref['pre_logits'])

  # No head at all: the checkpoint's is dropped and the output is the features.
  headless = big.clone(num_classes=None)
  out = _apply(headless, pv.load(tmp_path / 'i1k.npz', headless, image_size=32), _images())
  np.testing.assert_array_equal(out, ref['pre_logits'])


def test_head_bias_init_is_respected(tmp_path):
  model = vit.from_variant('mu/4', num_classes=1000)
  pv.save_vit_jax_npz(_random_params(model), tmp_path / 'i1k.npz')
  loaded = pv.load(tmp_path / 'i1k.npz', model.clone(num_classes=3, head_bias_init=-6.9),
                   image_size=32)
  np.testing.assert_array_equal(loaded['head']['bias'], np.full(3, -6.9, np.float32))


def test_representation_layer_kept_or_dropped(tmp_path):
  model = vit.from_variant('mu/4', num_classes=10, representation_size=16)
  params = _random_params(model)
  pv.save_vit_jax_npz(params, tmp_path / 'rep.npz')
  kept = pv.load(tmp_path / 'rep.npz', model, image_size=32)
  _assert_same_params(kept, params)

  plain = model.clone(representation_size=None)
  dropped = pv.load(tmp_path / 'rep.npz', plain, image_size=32)
  assert 'pre_logits' not in dropped
  # Same class count, but the head read the dropped layer: it is replaced too.
  np.testing.assert_array_equal(dropped['head']['kernel'], 0.0)

  pv.save_vit_jax_npz(dropped, tmp_path / 'plain.npz')
  with pytest.raises(CheckpointMismatchError, match=r'representation_size=16.*no pre_logits'):
    pv.load(tmp_path / 'plain.npz', model, image_size=32)


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
  missing = tmp_path / 'nope' / 'ViT-B_16.npz'
  with pytest.raises(FileNotFoundError, match='ViT-B_16.npz'):
    pv.load(missing, vit.from_variant('mu/4'), image_size=32)
  with pytest.raises(FileNotFoundError, match='nope'):
    pv.inspect(missing)


@pytest.mark.parametrize('change, key', [
    (dict(hidden_size=48), 'Transformer/encoder_norm/scale: (48,) vs (32,)'),
    (dict(num_layers=3), 'missing keys (16)'),
    (dict(num_layers=1), 'unexpected keys (16)'),
    (dict(patch_size=8), 'embedding/kernel: (8, 8, 3, 32) vs (4, 4, 3, 32)'),
])
def test_other_architecture_is_one_error(tiny, tmp_path, change, key):
  _, params, _ = tiny
  pv.save_vit_jax_npz(params, tmp_path / 'a.npz')
  with pytest.raises(CheckpointMismatchError) as info:
    pv.load(tmp_path / 'a.npz', vit.from_variant('mu/4', num_classes=10, **change), image_size=32)
  assert key in str(info.value)
  assert str(tmp_path / 'a.npz') in str(info.value)


def test_all_differences_in_one_error(tiny, tmp_path):
  _, params, _ = tiny
  pv.save_vit_jax_npz(params, tmp_path / 'a.npz')
  model = vit.from_variant('mu/4', num_classes=10, classifier='gap', num_layers=3, hidden_size=48)
  with pytest.raises(CheckpointMismatchError) as info:
    pv.load(tmp_path / 'a.npz', model, image_size=32)
  message = str(info.value)
  assert 'missing keys' in message and 'Transformer/encoderblock_2/LayerNorm_0/scale' in message
  assert 'unexpected keys (1)' in message and '\n    cls' in message
  assert 'shape mismatches' in message and 'encoder_norm/scale: (48,) vs (32,)' in message


def test_hf_head_count_checked_against_config(tiny, tmp_path):
  model, params, _ = tiny
  pv.save_hf_safetensors(params, tmp_path / 'model.safetensors')
  (tmp_path / 'config.json').write_text('{"model_type": "vit", "num_attention_heads": 4}')
  with pytest.raises(CheckpointMismatchError, match='num_attention_heads=4'):
    pv.load(tmp_path, model, image_size=32)


def test_unknown_formats(tmp_path):
  model = vit.from_variant('mu/4')
  (tmp_path / 'weights.pt').write_bytes(b'not read')
  with pytest.raises(pv.UnknownCheckpointFormatError, match=r'(?s)PyTorch pickles.*vit_jax.*big_vision.*hf'):
    pv.load(tmp_path / 'weights.pt', model, image_size=32)
  (tmp_path / 'weights.h5').write_bytes(b'\0')
  with pytest.raises(ValueError, match=r"(?s)extension '.h5'.*Known formats"):
    pv.load(tmp_path / 'weights.h5', model, image_size=32)
  np.savez(tmp_path / 'other.npz', conv1=np.zeros(3))
  with pytest.raises(ValueError, match=r"(?s)\['conv1'\].*Known formats"):
    pv.load(tmp_path / 'other.npz', model, image_size=32)
  (tmp_path / 'fake.npz').write_bytes(b'\x80\x04pickle')
  with pytest.raises(ValueError, match=r'not an .npz \(zip\) archive'):
    pv.load(tmp_path / 'fake.npz', model, image_size=32)
  with pytest.raises(ValueError, match=r"format 'timm'; known: auto, vit_jax, big_vision, hf"):
    pv.load(tmp_path / 'other.npz', model, image_size=32, format='timm')


def test_object_arrays_are_never_unpickled(tiny, tmp_path):
  _, params, _ = tiny
  flat = flatten(params)
  flat['meta'] = np.array([{'evil': True}], dtype=object)
  np.savez(tmp_path / 'pickled.npz', **{k: np.asarray(v) if k != 'meta' else v
                                        for k, v in flat.items()})
  assert zipfile.is_zipfile(tmp_path / 'pickled.npz')
  with pytest.raises(ValueError, match='without unpickling'):
    pv.load(tmp_path / 'pickled.npz', vit.from_variant('mu/4', num_classes=10), image_size=32)
