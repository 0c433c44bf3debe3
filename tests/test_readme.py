"""The README's Python example runs as written (on a tiny checkpoint in place of ViT-B/16)."""

import re
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from vadapt.models import vit
from vadapt.pretrained import vit as vit_ckpt

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _python_blocks():
  return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_library_example_runs_and_trains_only_the_delta(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tiny = vit.from_variant('mu/4', num_classes=1000)
  params = tiny.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  vit_ckpt.save_vit_jax_npz(params, 'ViT-B_16.npz')

  code = _python_blocks()[0].replace('224', '32').replace('bottleneck=64', 'bottleneck=8')
  namespace = {}
  exec(compile(code, str(README), 'exec'), namespace)  # pylint: disable=exec-used

  delta, frozen, opt_state = namespace['delta'], namespace['frozen'], namespace['opt_state']
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  labels = jnp.arange(4) % 37
  new_delta, _, loss = namespace['step'](delta, opt_state, frozen, images, labels)
  assert np.isfinite(loss)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                         delta, new_delta)
  assert any(jax.tree.leaves(changed))
  # The example's model is the backbone exactly at init.
  model, backbone = namespace['model'], namespace['backbone']
  np.testing.assert_array_equal(
      model.apply({'params': namespace['params']}, images),
      backbone.apply({'params': namespace['backbone_params']}, images))
