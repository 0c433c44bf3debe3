"""vadapt.pretrained.common.read_safetensors: the weight-file reader behind the ViT and DINOv2
loaders (the same arrays as safetensors' own readers, one copy of the weights at a time)."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vadapt.pretrained import dinov2 as pd
from vadapt.pretrained import vit as pv
from vadapt.pretrained.common import consume, read_safetensors


def test_same_arrays_as_safetensors(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {'w': rng.normal(size=(3, 5)).astype(np.float32),
             'h': rng.normal(size=(2, 2, 2)).astype(np.float16),
             'd': rng.normal(size=(4,)),
             'i': rng.integers(-9, 9, size=(7,)),
             'b': rng.integers(0, 2, size=(3,)).astype(bool),
             'u': rng.integers(0, 255, size=(2, 3)).astype(np.uint8),
             'scalar': np.array(1.5, np.float32),
             'empty': np.zeros((0, 3), np.float32)}
  save_file(tensors, str(tmp_path / 'm.safetensors'), metadata={'format': 'np'})
  got = read_safetensors(str(tmp_path / 'm.safetensors'))
  want = load_file(str(tmp_path / 'm.safetensors'))
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v)
  got['w'][0, 0] = 7.0  # Writable, as load_file's arrays are.


def test_bfloat16_from_torch(tmp_path):
  torch = pytest.importorskip('torch')
  from safetensors.torch import save_file as save_torch  # pylint: disable=g-import-not-at-top
  w = torch.randn(4, 6, dtype=torch.bfloat16)
  save_torch({'w': w}, str(tmp_path / 'bf16.safetensors'))
  got = read_safetensors(str(tmp_path / 'bf16.safetensors'))['w']
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), w.float().numpy())


def _write(path, header, data=b''):
  raw = json.dumps(header).encode()
  path.write_bytes(len(raw).to_bytes(8, 'little') + raw + data)
  return str(path)


@pytest.mark.parametrize('case, message', [
    ('short', 'does not fit'),
    ('not_json', 'not JSON'),
    ('list', 'JSON list'),
    ('dtype', 'unsupported dtype'),
    ('offsets', 'do not match'),
    ('past_end', 'do not match'),
])
def test_malformed_files_are_named(tmp_path, case, message):
  path = tmp_path / f'{case}.safetensors'
  if case == 'short':
    path.write_bytes((10 ** 6).to_bytes(8, 'little') + b'{}')
    file = str(path)
  elif case == 'not_json':
    path.write_bytes((4).to_bytes(8, 'little') + b'\xff{x]')
    file = str(path)
  elif case == 'list':
    file = _write(path, [1, 2])
  elif case == 'dtype':
    file = _write(path, {'w': {'dtype': 'C64', 'shape': [1], 'data_offsets': [0, 8]}}, bytes(8))
  elif case == 'offsets':
    file = _write(path, {'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 4]}}, bytes(8))
  else:
    file = _write(path, {'w': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]}}, bytes(8))
  with pytest.raises(ValueError, match=message):
    read_safetensors(file)
  # The loaders report it as a file they cannot read, naming the file.
  with pytest.raises(pv.UnknownCheckpointFormatError, match='safetensors cannot read it'):
    pv._read_safetensors([file])  # pylint: disable=protected-access
  with pytest.raises(pv.UnknownCheckpointFormatError, match='safetensors cannot read it'):
    pd._read_safetensors(file)  # pylint: disable=protected-access


def test_consume_empties_as_it_goes():
  tensors = {'a': 1, 'b': 2, 'c': 3}
  seen = []
  for key, value in consume(tensors):
    seen.append((key, value, len(tensors)))
  assert seen == [('a', 1, 2), ('b', 2, 1), ('c', 3, 0)] and not tensors


# VmHWM, the process's own high-water mark (ru_maxrss would start from the parent's at fork).
_PEAK = """
from vadapt import host_memory
from vadapt.pretrained import vit
def hwm():
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM:'))
before = max(hwm(), host_memory.resident_bytes())
vit.{reader}
print((hwm() - before) / {size})
"""


def test_reading_holds_one_copy_of_the_weights(tmp_path):
  """A fresh process's peak RSS while reading a ~96 MiB file, and while converting a Hugging Face
  ViT file to vadapt's names, stays near one copy of the weights (safetensors.numpy.load_file
  reaches two: the whole file's bytes plus the arrays copied out of them)."""
  rng = np.random.default_rng(0)
  # Hugging Face ViT names: the conversion transposes every Linear kernel (a copy each).
  d, layers = 576, 12
  tensors = {'vit.embeddings.patch_embeddings.projection.weight':
                 rng.normal(size=(d, 3, 4, 4)).astype(np.float32)}
  for i in range(layers):
    for name in ('attention.attention.query', 'attention.attention.key',
                 'attention.attention.value', 'attention.output.dense'):
      tensors[f'vit.encoder.layer.{i}.{name}.weight'] = rng.normal(size=(d, d)).astype(np.float32)
    tensors[f'vit.encoder.layer.{i}.intermediate.dense.weight'] = rng.normal(
        size=(2 * d, d)).astype(np.float32)
  file = str(tmp_path / 'model.safetensors')
  save_file(tensors, file)
  size = sum(v.nbytes for v in tensors.values())
  assert size > 90 * 2 ** 20
  for reader in (f'_read_safetensors([{file!r}])', f'_read_hf({file!r}, 8)'):
    out = subprocess.run([sys.executable, '-c', _PEAK.format(reader=reader, size=size)],
                         capture_output=True, text=True, check=True)
    ratio = float(out.stdout.split()[-1])
    assert 0.9 < ratio < 1.35, (reader, ratio, out.stderr[-2000:])
