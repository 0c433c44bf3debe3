"""Fashion-MNIST: the IDX reader, the source's resolution order, and the real files in the pipeline."""

import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vadapt import artifacts
from vadapt import input_pipeline as ip
from vadapt.data import idx
from vadapt.data import sources


def write_split(folder, split, images, labels, compress=True):
  prefix = sources.IDX_SPLITS[split]
  ext = '.gz' if compress else ''
  idx.write(os.path.join(folder, f'{prefix}-images-idx3-ubyte{ext}'), images)
  idx.write(os.path.join(folder, f'{prefix}-labels-idx1-ubyte{ext}'), labels)


def fake_split(n, seed, size=6):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, size, size), dtype=np.uint8),
          (np.arange(n) % 10).astype(np.uint8)[rng.permutation(n)])


@pytest.fixture
def idx_folder(tmp_path):
  """A Fashion-MNIST-shaped folder: 1,200 train and 50 test 6x6 images, train gzipped."""
  write_split(tmp_path, 'train', *fake_split(1200, 0), compress=True)
  write_split(tmp_path, 'test', *fake_split(50, 1), compress=False)
  return tmp_path


def config(**overrides):
  cfg = ip.default_config()
  cfg.update({'source': 'fashion_mnist', **overrides})
  cfg.lock()
  return cfg


# ------------------------------------------------------------------------------------ IDX format


@pytest.mark.parametrize('dtype', [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize('name', ['a-idx3-ubyte', 'a-idx3-ubyte.gz'])
def test_idx_roundtrip(tmp_path, dtype, name):
  array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
  path = str(tmp_path / name)
  idx.write(path, array)
  with open(path, 'rb') as f:
    assert (f.read(2) == b'\x1f\x8b') == name.endswith('.gz')
  out = idx.read(path)
  assert out.dtype == dtype and out.dtype.isnative
  np.testing.assert_array_equal(out, array)


def test_idx_header_is_big_endian_as_in_the_published_files(tmp_path):
  path = str(tmp_path / 'labels')
  idx.write(path, np.array([3, 1, 4], np.uint8))
  with open(path, 'rb') as f:
    assert f.read() == bytes.fromhex('00000801 00000003 030104')


@pytest.mark.parametrize('data, match', [
    (b'', 'found nothing'),
    (b'\x00\x00\x07\x01\x00\x00\x00\x01\x05', r'type one of .*found 00 00 07 01'),
    (b'P\x00\x08\x01', 'not an IDX file'),
    (b'\x00\x00\x08\x03\x00\x00\x00\x02', 'declares 3 dimensions but the file ends after 8'),
    (bytes.fromhex('00000801 00000004 010203'), r'shape \(4,\) of uint8 \(4 bytes.*3 bytes: trunc'),
    (bytes.fromhex('00000801 00000002 010203'), r'holds 3 bytes: trailing data'),
])
def test_idx_bad_files_are_named_errors(tmp_path, data, match):
  path = tmp_path / 'bad-idx1-ubyte'
  path.write_bytes(data)
  with pytest.raises(idx.IdxFormatError, match=match):
    idx.read(str(path))


def test_idx_corrupt_gzip_and_missing_file(tmp_path):
  path = tmp_path / 'x-idx1-ubyte.gz'
  path.write_bytes(gzip.compress(bytes.fromhex('00000801 00000003 030104'))[:-6])
  with pytest.raises(idx.IdxFormatError, match='not a readable gzip file'):
    idx.read(str(path))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    idx.read(str(tmp_path / 'nope'))


# ------------------------------------------------------------------------------- idx as a source


def test_folder_source_reads_grey_as_rgb_in_file_order(idx_folder):
  images, labels = fake_split(1200, 0)
  train, test = ip.load_tables(config(path=str(idx_folder)))
  assert train.kind == 'pixels' and train.images.shape == (1200, 6, 6, 3)
  assert train.class_names == sources.FASHION_MNIST_CLASSES
  np.testing.assert_array_equal(train.labels, labels)
  for c in range(3):
    np.testing.assert_array_equal(train.images[..., c], images)
  assert len(test) == 50  # The uncompressed files of the test split are read too.


def test_class_names_are_tfds_fashion_mnist_names():
  builder = tfds.builder_cls('fashion_mnist')
  assert tuple(builder(data_dir='/nonexistent').info.features['label'].names) == (
      sources.FASHION_MNIST_CLASSES)


def test_folder_source_splits_vtab_few_shot_and_batches(idx_folder):
  path = str(idx_folder)
  info = ip.get_info(config(path=path, train_split='train[:300]', eval_split='test[10:]'))
  assert (info.num_train, info.num_eval, info.num_classes) == (300, 40, 10)
  vtab_train, vtab_val = ip.load_tables(config(path=path, vtab_1k=True))
  full, _ = ip.load_tables(config(path=path))
  np.testing.assert_array_equal(vtab_train.labels, full.labels[:800])
  np.testing.assert_array_equal(vtab_val.labels, full.labels[800:1000])
  few = config(path=path, few_shot=3)
  assert np.all(np.bincount(ip.load_tables(few)[0].labels) == 3)
  batch = next(ip.make_train_iterator(few, global_batch_size=6, image_size=14, process_index=0,
                                      process_count=1))
  assert batch['image'].shape == (6, 14, 14, 3)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 1])
  (ev,) = list(ip.make_eval_iterator(config(path=path), global_batch_size=64, image_size=28,
                                     process_index=0, process_count=1))
  assert ev['image'].shape == (64, 28, 28, 3) and ev['mask'].sum() == 50


def test_mismatched_counts_and_bad_labels_are_errors(tmp_path):
  images, labels = fake_split(20, 0)
  write_split(tmp_path, 'train', images, labels[:19])
  with pytest.raises(idx.IdxFormatError, match=r'disagree: .*holds 20 images but .*19 labels'):
    ip.get_info(config(path=str(tmp_path)))
  write_split(tmp_path, 'train', images, np.full(20, 10, np.uint8))
  with pytest.raises(idx.IdxFormatError, match=r'labels must lie in \[0, 10\), found 10'):
    ip.get_info(config(path=str(tmp_path), eval_split='train'))
  write_split(tmp_path, 'train', images.reshape(20, 36), labels)
  with pytest.raises(idx.IdxFormatError, match=r'expected uint8 images \(N, H, W\)'):
    ip.get_info(config(path=str(tmp_path), eval_split='train'))


def test_missing_files_and_folders_are_errors(tmp_path, idx_folder):
  os.remove(idx_folder / 't10k-labels-idx1-ubyte')
  with pytest.raises(FileNotFoundError, match=r"no t10k-labels-idx1-ubyte.gz .*split 'test'"):
    ip.get_info(config(path=str(idx_folder)))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    ip.get_info(config(path=str(tmp_path / 'missing')))
  with pytest.raises(ValueError, match=r"splits \['test', 'train'\], got 'validation'"):
    ip.get_info(config(path=str(idx_folder), train_split='validation'))


def test_without_path_tfds_is_used_when_prepared(tmp_path, monkeypatch):
  # A prepared tfds folder takes precedence over the artifact cache; tfds's reading is mocked.
  version = tmp_path / 'fashion_mnist' / '3.0.1'
  version.mkdir(parents=True)
  (version / 'dataset_info.json').write_text('{}')
  assert sources.fashion_mnist_location(None, str(tmp_path)) == ('tfds', str(tmp_path))
  with tfds.testing.mock_data(num_examples=12):
    info = ip.get_info(config(data_dir=str(tmp_path), cache=False))
  assert (info.num_train, info.num_eval) == (12, 12)
  assert info.class_names == sources.FASHION_MNIST_CLASSES


def test_without_path_or_tfds_the_cache_is_used_or_the_error_says_how_to_get_it(
    tmp_path, monkeypatch):
  empty_tfds = str(tmp_path / 'tfds')
  monkeypatch.setenv('VADAPT_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(ip.DatasetNotPreparedError, match=r'python -m vadapt.artifacts'):
    sources.fashion_mnist_location(None, empty_tfds)
  # Once the artifact module has fetched the files, they are what is read.
  monkeypatch.setattr(artifacts, 'cached', lambda name: '/fetched' if name == 'fashion_mnist'
                      else None)
  assert sources.fashion_mnist_location(None, empty_tfds) == ('idx', '/fetched')


# ------------------------------------------------------------------------------ the real files


def test_real_fashion_mnist_from_the_debian_package():
  folder = artifacts.fashion_mnist_dir()  # Fetched once into the cache (CI fetches it first).
  assert sources.fashion_mnist_location(None, '/nonexistent') == ('idx', folder)
  train, test = ip.load_tables(config(path=folder))
  assert train.images.shape == (60000, 28, 28, 3) and test.images.shape == (10000, 28, 28, 3)
  assert np.all(np.bincount(train.labels) == 6000) and np.all(np.bincount(test.labels) == 1000)
  # Stored class-mixed: VTAB-1k's first 800 hold every class.
  assert np.bincount(train.labels[:800], minlength=10).min() >= 60
  # Clothes on a black background: the corners are dark, the centre bright on average.
  grey = train.images[..., 0].astype(np.float32)
  assert grey[:, :2, :2].mean() < 1 and grey[:, 10:18, 10:18].mean() > 100
