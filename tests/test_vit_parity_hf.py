"""Parity with Hugging Face transformers' ViT (PyTorch, random weights, offline).

The weights go through the files users hold (``save_pretrained`` directories and
``safetensors.torch.save_file`` of a state dict), are read by ``vadapt.pretrained.vit.load`` and
both models run on the same images (NCHW for torch, NHWC for us). The error reported is
max|ours - theirs| / max|theirs| over the whole output, in float32.
"""

import functools

import jax
import numpy as np
import pytest

from vadapt.models import vit
from vadapt.pretrained import vit as pv

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOLERANCE = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=4)


def _hf_model(cls, seed=0, **config):
  torch.manual_seed(seed)
  model = cls(transformers.ViTConfig(**config)).eval()
  with torch.no_grad():
    # HF initialises biases to 0 and LayerNorms to (1, 0): perturb everything so that a bias or
    # a scale mapped to the wrong place changes the output.
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _images(size, n=2, seed=1):
  return np.random.RandomState(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


@functools.partial(jax.jit, static_argnames='model')
def _apply(model, params, images):
  return model.apply({'params': params}, images, return_features=True)


def _rel_err(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _ours(path, model, nchw):
  params = pv.load(path, model, image_size=nchw.shape[-1])
  return _apply(model, params, np.transpose(nchw, (0, 2, 3, 1)))


def _check_classifier(hf, path, config_dir, label):
  images = _images(hf.config.image_size)
  with torch.no_grad():
    logits = hf(torch.from_numpy(images)).logits.numpy()
    tokens = hf.vit(torch.from_numpy(images)).last_hidden_state.numpy()
  model = vit.VisionTransformer(**pv.model_kwargs_from_hf_config(config_dir))
  our_logits, feats = _ours(path, model, images)
  errors = {'tokens': _rel_err(feats['encoded'], tokens), 'logits': _rel_err(our_logits, logits)}
  print(f'\n{label}: max relative error ' + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
  assert max(errors.values()) <= TOLERANCE, errors
  return errors


def test_image_classification_save_pretrained(tmp_path):
  hf = _hf_model(transformers.ViTForImageClassification, num_labels=10, **TINY)
  hf.save_pretrained(tmp_path)
  kwargs = pv.model_kwargs_from_hf_config(tmp_path / 'config.json')
  assert kwargs['num_classes'] == 10 and kwargs['activation'] == 'gelu_exact'
  assert kwargs['layer_norm_epsilon'] == 1e-12
  _check_classifier(hf, tmp_path, tmp_path, 'ViTForImageClassification tiny (save_pretrained)')


def test_image_classification_state_dict_names(tmp_path):
  """transformers 5 renames modules in memory (layers.i.attention.q_proj, mlp.fc1): read those too."""
  from safetensors.torch import save_file
  hf = _hf_model(transformers.ViTForImageClassification, seed=3, num_labels=5, **TINY)
  state = hf.state_dict()  # transformers 4 still has the on-disk names here; both are read.
  save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / 'weights.safetensors')
  hf.config.architectures = ['ViTForImageClassification']
  _check_classifier(hf, tmp_path / 'weights.safetensors', hf.config,
                    'ViTForImageClassification tiny (state_dict names)')


def test_vit_model_with_pooler(tmp_path):
  """ViTModel keys have no 'vit.' prefix; its pooler is our representation layer (dense + tanh)."""
  hf = _hf_model(transformers.ViTModel, seed=5, **TINY)
  hf.save_pretrained(tmp_path)
  images = _images(32)
  with torch.no_grad():
    out = hf(torch.from_numpy(images))
  kwargs = pv.model_kwargs_from_hf_config(tmp_path)
  assert kwargs['num_classes'] is None
  model = vit.VisionTransformer(**kwargs, representation_size=hf.config.pooler_output_size)
  pooled, feats = _ours(tmp_path, model, images)
  errors = {'tokens': _rel_err(feats['encoded'], out.last_hidden_state.numpy()),
            'pooler': _rel_err(pooled, out.pooler_output.numpy())}
  print('\nViTModel tiny (save_pretrained): max relative error '
        + ', '.join(f'{k} {v:.2e}' for k, v in errors.items()))
  assert max(errors.values()) <= TOLERANCE, errors

  # Without a representation layer the pooler is dropped and the class token is the output.
  plain = vit.VisionTransformer(**kwargs)
  features, _ = _ours(tmp_path, plain, images)
  assert _rel_err(features, out.last_hidden_state.numpy()[:, 0]) <= TOLERANCE


def test_export_to_hf(tmp_path):
  """Our params written by save_hf_safetensors load into transformers and compute the same."""
  model = vit.VisionTransformer(**pv.model_kwargs_from_hf_config(
      dict(TINY, architectures=['ViTForImageClassification'], num_labels=3)))
  rng = np.random.RandomState(0)
  params = {k: (0.3 * rng.randn(*s.shape)).astype(np.float32)
            for k, s in pv.abstract_params(model, 32).items()}
  from vadapt.pretrained.common import unflatten
  params = unflatten(params)
  out_dir = tmp_path / 'export'
  out_dir.mkdir()
  pv.save_hf_safetensors(params, out_dir / 'model.safetensors', num_heads=2)
  config = transformers.ViTConfig(**TINY, num_labels=3)
  config.architectures = ['ViTForImageClassification']
  config.save_pretrained(out_dir)
  hf = transformers.ViTForImageClassification.from_pretrained(out_dir).eval()
  images = _images(32)
  with torch.no_grad():
    logits = hf(torch.from_numpy(images)).logits.numpy()
  ours, _ = _apply(model, params, np.transpose(images, (0, 2, 3, 1)))
  err = _rel_err(ours, logits)
  print(f'\nexport to ViTForImageClassification tiny: max relative error logits {err:.2e}')
  assert err <= TOLERANCE


def test_bfloat16_weights(tmp_path):
  """safetensors.numpy has no bfloat16; such files are read from their header instead."""
  hf = _hf_model(transformers.ViTForImageClassification, seed=7, num_labels=4, **TINY)
  hf.to(torch.bfloat16).save_pretrained(tmp_path)
  model = vit.VisionTransformer(**pv.model_kwargs_from_hf_config(tmp_path))
  params = pv.load(tmp_path, model, image_size=32)
  kernel = params['Transformer']['encoderblock_1']['MlpBlock_0']['Dense_0']['kernel']
  assert kernel.dtype == np.float32
  from safetensors.torch import load_file
  weight = load_file(tmp_path / 'model.safetensors')['vit.encoder.layer.1.intermediate.dense.weight']
  assert weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(kernel, weight.float().numpy().T)


@pytest.mark.slow
def test_vit_b16_image_classification(tmp_path):
  hf = _hf_model(transformers.ViTForImageClassification, num_labels=1000)  # ViTConfig() is B/16
  hf.save_pretrained(tmp_path)
  kwargs = pv.model_kwargs_from_hf_config(tmp_path)
  assert {k: kwargs[k] for k in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim',
                                 'patch_size')} == vit.variant_config('B/16')
  _check_classifier(hf, tmp_path, tmp_path, 'ViTForImageClassification B/16 (save_pretrained)')
