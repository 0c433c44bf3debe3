"""Parity of vadapt's Flax CLIP with transformers' PyTorch CLIPModel, and checkpoint loading.

Errors are max |ours - reference| / max |reference| over each output, in float32.
"""

import functools
import re

import jax
import numpy as np
import pytest

from vadapt.models import clip
from vadapt.pretrained import clip as clip_pretrained
from vadapt.pretrained.common import CheckpointMismatchError

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOLERANCE = 1e-5


def hf_model(*, vision, text, projection_dim, seed=0):
  """A CLIPModel with random weights, every tensor perturbed so no LayerNorm is the identity."""
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=text, vision_config=vision, projection_dim=projection_dim)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == 'logit_scale':
        p.fill_(np.log(1 / 0.07))
      else:
        p.add_(0.02 * torch.randn_like(p))
  return model


def tiny_hf(eos_token_id=2, seed=0):
  return hf_model(
      vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8),
      text=dict(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77,
                eos_token_id=eos_token_id, bos_token_id=998, pad_token_id=1),
      projection_dim=24, seed=seed)


def inputs(model, batch=3, length=77, eos=None, seed=0):
  rng = np.random.default_rng(seed)
  config = model.config
  size = config.vision_config.image_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  vocab = config.text_config.vocab_size
  ids = rng.integers(0, vocab - 2, size=(batch, length)).astype(np.int64)
  if eos is not None:
    # An end token before the end, followed by ids that may be larger: argmax and
    # first-occurrence pooling then pick different positions.
    for i in range(batch):
      ids[i, 5 + 7 * i] = eos
  return images, ids


def reference(model, images, ids):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return {k: getattr(out, k).numpy() for k in
          ('image_embeds', 'text_embeds', 'logits_per_image', 'logits_per_text')}


@functools.partial(jax.jit, static_argnums=0)
def ours(model, params, images, ids):
  image = model.apply({'params': params}, images, method='encode_image')
  text = model.apply({'params': params}, ids, method='encode_text')
  logits_per_image, logits_per_text = model.apply({'params': params}, images, ids)
  return {'image_embeds': clip.l2_normalize(image), 'text_embeds': clip.l2_normalize(text),
          'logits_per_image': logits_per_image, 'logits_per_text': logits_per_text}


def errors(got, want):
  return {k: float(np.max(np.abs(np.asarray(got[k]) - want[k])) / np.max(np.abs(want[k])))
          for k in want}


def assert_parity(got, want, label):
  errs = errors(got, want)
  print(f'\n{label} relative errors: ' + ', '.join(f'{k}={v:.2e}' for k, v in errs.items()))
  assert max(errs.values()) <= TOLERANCE, errs


def hf_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_to_openai(sd):
  """The inverse renaming, written independently of the loader: HF names -> OpenAI names."""
  out = {}
  layer = re.compile(r'(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)')
  fused = {}
  for k, v in sd.items():
    if k.endswith('position_ids'):
      continue
    m = layer.fullmatch(k)
    if m:
      tower = 'visual.' if m.group(1) == 'vision' else ''
      prefix = f'{tower}transformer.resblocks.{m.group(2)}.'
      rest = m.group(3)
      qkv = re.fullmatch(r'self_attn\.([qkv])_proj\.(weight|bias)', rest)
      if qkv:
        fused.setdefault((prefix, qkv.group(2)), {})[qkv.group(1)] = v
        continue
      for old, new in [('self_attn.out_proj.', 'attn.out_proj.'), ('layer_norm1.', 'ln_1.'),
                       ('layer_norm2.', 'ln_2.'), ('mlp.fc1.', 'mlp.c_fc.'),
                       ('mlp.fc2.', 'mlp.c_proj.')]:
        if rest.startswith(old):
          out[prefix + new + rest[len(old):]] = v
      continue
    names = {
        'vision_model.embeddings.patch_embedding.weight': 'visual.conv1.weight',
        'vision_model.embeddings.class_embedding': 'visual.class_embedding',
        'vision_model.embeddings.position_embedding.weight': 'visual.positional_embedding',
        'vision_model.pre_layrnorm.weight': 'visual.ln_pre.weight',
        'vision_model.pre_layrnorm.bias': 'visual.ln_pre.bias',
        'vision_model.post_layernorm.weight': 'visual.ln_post.weight',
        'vision_model.post_layernorm.bias': 'visual.ln_post.bias',
        'text_model.embeddings.token_embedding.weight': 'token_embedding.weight',
        'text_model.embeddings.position_embedding.weight': 'positional_embedding',
        'text_model.final_layer_norm.weight': 'ln_final.weight',
        'text_model.final_layer_norm.bias': 'ln_final.bias',
        'logit_scale': 'logit_scale',
    }
    if k in names:
      out[names[k]] = v
    elif k == 'visual_projection.weight':
      out['visual.proj'] = v.T.copy()
    elif k == 'text_projection.weight':
      out['text_projection'] = v.T.copy()
    else:
      raise AssertionError(f'unmapped key {k}')
  for (prefix, kind), parts in fused.items():
    out[f'{prefix}attn.in_proj_{kind}'] = np.concatenate([parts['q'], parts['k'], parts['v']])
  return out


@pytest.fixture(scope='module')
def tiny():
  model = tiny_hf()
  return model, hf_state_dict(model)


def test_tiny_parity_from_safetensors_dir(tiny, tmp_path):
  hf, _ = tiny
  hf.save_pretrained(tmp_path)
  model, params = clip_pretrained.load(tmp_path)
  assert (model.vision_heads, model.text_heads, model.eos_token_id) == (2, 4, None)
  assert (model.image_size, model.patch_size, model.embed_dim) == (32, 8, 24)
  images, ids = inputs(hf)
  assert_parity(ours(model, params, images, ids), reference(hf, images, ids), 'tiny HF')


def test_tiny_parity_first_eos_pooling(tmp_path):
  hf = tiny_hf(eos_token_id=500, seed=1)
  hf.save_pretrained(tmp_path)
  model, params = clip_pretrained.load(tmp_path)
  assert model.eos_token_id == 500
  images, ids = inputs(hf, eos=500, seed=1)
  want = reference(hf, images, ids)
  assert_parity(ours(model, params, images, ids), want, 'tiny HF first-eos')
  # The argmax rule reads another position for these ids, so the test tells the rules apart.
  argmax_model = model.clone(eos_token_id=None)
  text = ours(argmax_model, params, images, ids)['text_embeds']
  assert errors({'text_embeds': text}, {'text_embeds': want['text_embeds']})['text_embeds'] > 1e-2


def test_sharded_safetensors_dir(tiny, tmp_path):
  hf, sd = tiny
  hf.save_pretrained(tmp_path, max_shard_size='200KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  model, params = clip_pretrained.load(tmp_path)
  want = clip_pretrained.params_from_state_dict(sd, model)
  jax.tree.map(np.testing.assert_array_equal, params, want)


def test_shorter_text_than_context(tiny):
  hf, sd = tiny
  model = clip.CLIP(**clip_pretrained.config_from_checkpoint(sd, vision_heads=2, text_heads=4))
  params = clip_pretrained.params_from_state_dict(sd, model)
  images, ids = inputs(hf, length=16)
  assert_parity(ours(model, params, images, ids), reference(hf, images, ids), 'tiny HF L=16')


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torch.jit is deprecated upstream
@pytest.mark.parametrize('fmt', ['npz', 'torch', 'torchscript'])
def test_openai_naming_round_trip(tiny, tmp_path, fmt):
  hf, sd = tiny
  openai_sd = hf_to_openai(sd)
  assert 'visual.transformer.resblocks.1.attn.in_proj_weight' in openai_sd
  assert openai_sd['visual.transformer.resblocks.1.attn.in_proj_weight'].shape == (96, 32)
  path = tmp_path / ('ckpt.npz' if fmt == 'npz' else 'ckpt.pt')
  if fmt == 'npz':
    np.savez(path, **openai_sd)
  elif fmt == 'torch':
    torch.save({k: torch.from_numpy(v) for k, v in openai_sd.items()}, path)
  else:
    torch.jit.save(torch.jit.script(_module_from_state_dict(openai_sd)), str(path))
  model, params = clip_pretrained.load(path, vision_heads=2, text_heads=4)
  images, ids = inputs(hf)
  assert_parity(ours(model, params, images, ids), reference(hf, images, ids),
                f'tiny OpenAI naming ({fmt})')


def _module_from_state_dict(sd):
  """A torch module tree whose state_dict() is `sd`, as in OpenAI's TorchScript files."""
  root = torch.nn.Module()
  for name, value in sd.items():
    *path, leaf = name.split('.')
    module = root
    for part in path:
      if not hasattr(module, part):
        module.add_module(part, torch.nn.Module())
      module = getattr(module, part)
    module.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(np.array(value))))
  return root


def test_checkpoint_of_another_size_is_one_error(tiny, tmp_path):
  _, sd = tiny
  np.savez(tmp_path / 'tiny.npz', **sd)
  other = clip.from_config('tiny')  # widths 32/32, 2 heads, vocab 49408, embed 32
  with pytest.raises(CheckpointMismatchError) as info:
    clip_pretrained.load(tmp_path / 'tiny.npz', model=other)
  message = str(info.value)
  assert 'shape mismatches' in message
  assert 'text/Transformer/encoderblock_0/LayerNorm_0/scale: (32,) vs (48,)' in message
  assert 'more' in message  # every mismatch is counted in the one error, not only the first
  assert 'missing keys' not in message and 'unexpected keys' not in message


def test_missing_and_unexpected_keys_listed(tiny, tmp_path):
  _, sd = tiny
  sd = dict(sd)
  del sd['vision_model.post_layernorm.bias']
  sd['vision_model.extra.weight'] = np.zeros(3, np.float32)
  model = clip.CLIP(**clip_pretrained.config_from_checkpoint(sd, vision_heads=2, text_heads=4))
  with pytest.raises(CheckpointMismatchError) as info:
    clip_pretrained.params_from_state_dict(sd, model)
  message = str(info.value)
  assert 'missing keys (1):\n    vision/ln_post/bias' in message
  assert 'unexpected keys (1):\n    vision_model.extra.weight' in message


def test_missing_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.safetensors'):
    clip_pretrained.load(tmp_path / 'nope.safetensors')


@pytest.mark.slow
def test_vit_b32_parity(tmp_path):
  hf = hf_model(
      vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, image_size=224, patch_size=32),
      text=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                eos_token_id=2),
      projection_dim=512)
  hf.save_pretrained(tmp_path)
  model, params = clip_pretrained.load(tmp_path)
  for field, value in clip.CONFIGS['ViT-B/32'].items():
    assert getattr(model, field) == value, field
  images, ids = inputs(hf, batch=2)
  assert_parity(ours(model, params, images, ids), reference(hf, images, ids), 'ViT-B/32')
