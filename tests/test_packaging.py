"""Installing: pip (git+URL or a clone) gets every file vadapt reads, accelerator extras exist,
no CPU TensorFlow is forced over an installed one, and the notebooks install on a fresh Colab."""

import fnmatch
import json
import os
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pyproject():
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)


def test_no_tensorflow_build_is_forced_and_accelerator_extras_exist():
  project = pyproject()['project']
  assert not [d for d in project['dependencies'] if d.startswith('tensorflow') and
              not d.startswith('tensorflow-datasets')]
  extras = project['optional-dependencies']
  assert extras['cpu'] == ['tensorflow-cpu>=2.21,<2.22']
  assert any(d.startswith('jax[cuda12]') for d in extras['cuda12'])
  assert any(d.startswith('jax[tpu]') for d in extras['tpu'])
  assert 'tqdm' in project['dependencies']
  # `make test` (CI) still installs everything the tests need, TensorFlow included.
  assert "pip install --quiet -e '.[cpu,test]'" in (ROOT / 'Makefile').read_text()


def test_package_data_covers_every_non_python_file():
  globs = pyproject()['tool']['setuptools']['package-data']['vadapt']
  package = ROOT / 'vadapt'
  data = [p.relative_to(package).as_posix() for p in package.rglob('*')
          if p.is_file() and p.suffix not in ('.py', '.pyc') and '__pycache__' not in p.parts]
  assert data  # The CLIP BPE merges at least.
  for path in data:
    assert any(fnmatch.fnmatch(path, g) for g in globs), f'{path} would be missing from a wheel'


def test_notebooks_clone_and_install_on_a_fresh_runtime():
  for name in ('vit_adapters.ipynb', 'clip_zero_shot_and_adapters.ipynb'):
    with open(ROOT / 'colabs' / name, encoding='utf-8') as f:
      cells = [''.join(c['source']) for c in json.load(f)['cells'] if c['cell_type'] == 'code']
    first = cells[0]
    assert '!test -d /content/vadapt || git clone' in first, name
    assert '!pip install -q "{VADAPT_SPEC}"' in first, name
    assert 'pip install -q -e /content/vadapt' not in first  # No copy there on a fresh runtime.
    assert "'cuda12'" in first and "'tpu'" in first, name
