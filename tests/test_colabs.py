"""The Colab notebooks run end to end: their code cells, in order, in one namespace, in test mode.

Test mode (VADAPT_COLAB_TEST=1) is one switch at the top of each notebook that swaps in a tiny
checkpoint the notebook writes itself and bundled data; every other line is what a user runs.
Shell lines (`!pip ...`) and magics (`%...`) are skipped. Besides the notebooks' own assertions,
the tests re-check their key results from the namespace they leave behind.
"""

import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

COLABS = pathlib.Path(__file__).resolve().parent.parent / 'colabs'
NOTEBOOKS = ('vit_adapters.ipynb', 'clip_zero_shot_and_adapters.ipynb')
SWITCH = "TEST_MODE = os.environ.get('VADAPT_COLAB_TEST') == '1'"


def load(name: str) -> dict:
  with open(COLABS / name, encoding='utf-8') as f:
    return json.load(f)


def code_cells(notebook: dict) -> list[str]:
  return [''.join(c['source']) for c in notebook['cells'] if c['cell_type'] == 'code']


def without_shell(source: str) -> str:
  """Replaces `!shell` and `%magic` lines by `pass` at the same indentation (blocks stay valid)."""
  lines = []
  for line in source.split('\n'):
    stripped = line.lstrip()
    if stripped.startswith(('!', '%')):
      line = line[:len(line) - len(stripped)] + 'pass'
    lines.append(line)
  return '\n'.join(lines)


def run_notebook(name: str, tmp_path, monkeypatch) -> dict:
  """Executes the notebook's code cells in test mode in tmp_path; returns their namespace."""
  monkeypatch.setenv('VADAPT_COLAB_TEST', '1')
  monkeypatch.chdir(tmp_path)
  namespace = {'__name__': '__main__'}
  for i, source in enumerate(code_cells(load(name))):
    # The file name shows up in tracebacks: a failure names the notebook and the cell.
    exec(compile(without_shell(source), f'{name}[code cell {i}]', 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


def test_without_shell_keeps_python_and_blocks_valid():
  source = "!pip install -q vadapt\nx = 1\nif x:\n  %time y = 2\n  z = '!not a shell line'"
  out = without_shell(source)
  assert out == "pass\nx = 1\nif x:\n  pass\n  z = '!not a shell line'"
  namespace = {}
  exec(out, namespace)  # pylint: disable=exec-used
  assert namespace['z'] == '!not a shell line' and 'y' not in namespace


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_clean_and_has_one_switch(name):
  notebook = load(name)
  assert notebook['nbformat'] == 4
  for cell in notebook['cells']:
    assert cell['cell_type'] in ('code', 'markdown')
    if cell['cell_type'] == 'code':
      # Outputs are never committed: the repository stays small and diffs stay readable.
      assert cell['outputs'] == [] and cell['execution_count'] is None, cell['source'][:2]
  cells = code_cells(notebook)
  assert cells[0].lstrip().startswith(('!pip install', '#')), 'first code cell installs vadapt'
  switch_cells = [i for i, c in enumerate(cells) if 'VADAPT_COLAB_TEST' in c]
  assert switch_cells == [1] and SWITCH in cells[1], 'the test-mode switch is the second cell'
  # Nothing but the settings picks tiny models: later cells read only the settings' variables.
  settings = [i for i, c in enumerate(cells) if re.search(r'^if TEST_MODE:', c, re.M)]
  assert settings and settings[0] <= 4, settings


def test_vit_adapters_notebook(tmp_path, monkeypatch):
  ns = run_notebook('vit_adapters.ipynb', tmp_path, monkeypatch)
  assert ns['TEST_MODE'] is True
  # Training moved accuracy clearly above the zero head's (one class of ten).
  assert ns['acc_before'] == pytest.approx(0.1, abs=0.02)
  assert ns['acc_after'] > ns['acc_before'] + 0.05, (ns['acc_before'], ns['acc_after'])
  assert ns['losses'][-1] < ns['losses'][0]

  # The frozen tree is exactly the checkpoint on disk, read here independently.
  from vadapt.pretrained import vit as vit_ckpt
  from vadapt.pretrained.common import flatten
  path = tmp_path / 'vadapt_vit_adapters' / 'tiny_vit.npz'
  on_disk = flatten(vit_ckpt.load(path, ns['backbone'], image_size=ns['IMAGE_SIZE']))
  frozen = flatten(ns['frozen'])
  assert set(frozen) == set(on_disk) - {'head/kernel', 'head/bias'}
  for key, value in frozen.items():
    np.testing.assert_array_equal(np.asarray(value), on_disk[key], err_msg=key)
  # Only adapters and the head were trained, and they are what the files hold.
  delta = flatten(ns['delta'])
  assert all('/adapter/' in k or k.startswith('head/') for k in delta)
  from vadapt import checkpoint
  saved, meta = checkpoint.read_adapter(ns['adapter_path'])
  assert set(saved) == set(delta) and meta['adapter'] == {'method': 'houlsby', 'bottleneck': 8}
  for key, value in saved.items():
    np.testing.assert_array_equal(value, np.asarray(delta[key]), err_msg=key)
  assert ns['acc_reloaded'] == ns['acc_after']
  # The data-parallel step ran on every simulated device and matched the single-device step.
  assert ns['num_devices'] == jax.device_count()
  assert ns['sharded_max_diff'] < 1e-4
  assert len(ns['sharded_delta']['head']['kernel'].sharding.device_set) == jax.device_count()


def test_clip_notebook(tmp_path, monkeypatch):
  ns = run_notebook('clip_zero_shot_and_adapters.ipynb', tmp_path, monkeypatch)
  from vadapt import zeroshot
  from vadapt.adapters import clip_adapter, tip_adapter
  assert ns['TEST_MODE'] is True
  # The model was built from the tiny checkpoint's shapes and config.json.
  model = ns['model']
  assert (model.image_size, model.patch_size, model.vision_heads, model.text_heads,
          model.eos_token_id) == (32, 8, 2, 2, None)
  assert sorted(os.listdir(tmp_path / 'tiny_clip')) == [
      'config.json', 'merges.txt', 'model.safetensors', 'vocab.json']

  num_classes, shots = ns['num_classes'], ns['SHOTS']
  classifier = np.asarray(ns['classifier'])
  assert classifier.shape == (model.embed_dim, num_classes)
  np.testing.assert_allclose(np.linalg.norm(classifier, axis=0), 1.0, rtol=1e-5)
  # Features of every test image once (eval padding dropped), and of every few-shot view.
  assert ns['test_features'].shape == (360, model.embed_dim) and len(ns['test_labels']) == 360
  assert len(ns['train_features']) == ns['AUGMENTED_VIEWS'] * num_classes * shots
  np.testing.assert_array_equal(np.asarray(ns['cache'].values).sum(axis=0), shots)

  # alpha = 0 and ratio = 0 are zero-shot CLIP, bit for bit (checked again outside the notebook).
  features, scale = jnp.asarray(ns['test_features']), ns['logit_scale']
  zero_shot = zeroshot.zero_shot_logits(features, ns['classifier'], scale)
  np.testing.assert_array_equal(tip_adapter.tip_adapter_logits(
      features, ns['classifier'], scale, ns['cache'], alpha=0.0, beta=ns['beta']), zero_shot)
  np.testing.assert_array_equal(clip_adapter.CLIPAdapter(ratio=0.0).apply(
      {'params': ns['adapter_params']}, features, ns['classifier'], scale), zero_shot)

  results = ns['results']
  best_zero_shot = max(v for k, v in results.items() if k.startswith('zero-shot'))
  # The few-shot cache carries label information that random prompts do not.
  assert results[f'Tip-Adapter, {shots} shots'] > best_zero_shot + 0.1, results
  for losses in (ns['tip_f_losses'], ns['adapter_losses']):
    assert len(losses) == ns['ADAPTER_STEPS'] and np.mean(losses[-5:]) < np.mean(losses[:5])
