"""Input pipeline: sources, splits, preprocessing families, determinism, multi-host and padding."""

import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from vadapt import input_pipeline as ip
from vadapt.data import iterators
from vadapt.data import preprocess
from vadapt.data import sources

S = 16  # Image size: small keeps the TF work trivial on 2 cores.


def digits_config(**overrides):
  cfg = ip.default_config()
  cfg.update(overrides)
  cfg.lock()
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def train_batches(cfg, n, **kwargs):
  kwargs = {'global_batch_size': 8, 'image_size': S, 'process_index': 0, 'process_count': 1,
            **kwargs}
  return take(ip.make_train_iterator(cfg, **kwargs), n)


def eval_batches(cfg, **kwargs):
  kwargs = {'global_batch_size': 64, 'image_size': S, 'process_index': 0, 'process_count': 1,
            **kwargs}
  return list(ip.make_eval_iterator(cfg, **kwargs))


def write_image(path, size, color, fmt):
  Image.new('RGB', size, color).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
  """root/{train,val}/{cat,dog}/ with jpg and png files of different sizes."""
  colors = {'cat': (200, 30, 30), 'dog': (30, 30, 200)}
  for split, n in (('train', 5), ('val', 3)):
    for name, color in colors.items():
      d = tmp_path / split / name
      d.mkdir(parents=True)
      for i in range(n):
        fmt, ext = ('JPEG', 'jpg') if i % 2 else ('PNG', 'png')
        write_image(d / f'{i}.{ext}', (20 + 7 * i, 24 + 3 * i), color, fmt)
  return tmp_path


# ------------------------------------------------------------------------------------- config


def test_default_config_has_every_field_and_locks():
  cfg = ip.default_config()
  cfg.lock()
  for field in ('source', 'name', 'data_dir', 'train_split', 'eval_split', 'path', 'classes',
                'few_shot', 'few_shot_seed', 'vtab_1k', 'shuffle_buffer', 'cache', 'crop_scale',
                'flip', 'eval_crop_fraction'):
    assert field in cfg
  cfg.name = 'cifar10'  # None fields accept a value after locking.
  cfg.classes = [5, 6]
  with pytest.raises(AttributeError):
    cfg.nmae = 'typo'


# ------------------------------------------------------------------------------------- digits


def test_digits_sizes_shapes_and_vit_range():
  cfg = digits_config()
  info = ip.get_info(cfg)
  assert (info.num_classes, info.num_train, info.num_eval) == (10, 1437, 360)
  assert info.class_names == tuple('0123456789')
  # process_index/process_count default to JAX's (one process here).
  batch = next(ip.make_train_iterator(cfg, global_batch_size=8, image_size=S))
  assert batch['image'].shape == (8, S, S, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  # Digits are grayscale: the three channels agree.
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
  # Real strokes on a dark background, so both ends of the range occur.
  assert batch['image'].min() < -0.9 and batch['image'].max() > 0.5


def test_split_slicing_on_local_sources():
  info = ip.get_info(digits_config(train_split='train[:100]', eval_split='test[50%:]'))
  assert (info.num_train, info.num_eval) == (100, 180)


def test_classes_are_kept_and_relabelled_in_order():
  full_train, _ = ip.load_tables(digits_config())
  cfg = digits_config(classes=[7, 5])
  info = ip.get_info(cfg)
  assert info.class_names == ('7', '5') and info.num_classes == 2
  train, eval_ = ip.load_tables(cfg)
  assert set(np.unique(train.labels)) == {0, 1} and set(np.unique(eval_.labels)) == {0, 1}
  for new, old in ((0, 7), (1, 5)):
    np.testing.assert_array_equal(train.images[train.labels == new],
                                  full_train.images[full_train.labels == old])
  (batch,) = train_batches(cfg, 1)
  assert set(batch['label']) <= {0, 1}
  with pytest.raises(ValueError, match=r'\[0, 10\)'):
    ip.get_info(digits_config(classes=[3, 10]))


# ------------------------------------------------------------------------ preprocessing families


@pytest.mark.parametrize('family', ['vit', 'clip', 'imagenet'])
def test_family_normalisation_of_a_solid_colour(tmp_path, family):
  rgb = (250, 128, 3)
  for split in ('train', 'val'):
    (tmp_path / split / 'only').mkdir(parents=True)
    write_image(tmp_path / split / 'only' / 'a.png', (40, 30), rgb, 'PNG')
  cfg = digits_config(source='imagefolder', path=str(tmp_path), eval_split='val')
  fam = preprocess.get_family(family)
  expected = (np.array(rgb) / 255.0 - np.array(fam.mean)) / np.array(fam.std)
  (batch,) = eval_batches(cfg, global_batch_size=2, preprocess=family)
  np.testing.assert_allclose(batch['image'][0], np.broadcast_to(expected, (S, S, 3)), atol=1e-5)
  (batch,) = train_batches(cfg, 1, global_batch_size=2, preprocess=family)
  np.testing.assert_allclose(batch['image'], np.broadcast_to(expected, (2, S, S, 3)), atol=1e-5)


def test_clip_eval_resizes_short_side_and_center_crops(tmp_path):
  # 40 x 100 (h x w): red | green | blue columns. The center crop keeps only the green middle.
  pixels = np.zeros((40, 100, 3), np.uint8)
  pixels[:, :20] = (255, 0, 0)
  pixels[:, 20:80] = (0, 255, 0)
  pixels[:, 80:] = (0, 0, 255)
  for split in ('train', 'val'):
    (tmp_path / split / 'x').mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / split / 'x' / 'a.png')
  cfg = digits_config(source='imagefolder', path=str(tmp_path), eval_split='val')
  (batch,) = eval_batches(cfg, global_batch_size=1, image_size=32, preprocess='clip')
  fam = preprocess.FAMILIES['clip']
  rgb = batch['image'][0] * np.array(fam.std) + np.array(fam.mean)
  assert rgb.shape == (32, 32, 3)
  np.testing.assert_allclose(rgb.mean(axis=(0, 1)), [0, 1, 0], atol=0.02)


def test_tiny_images_are_resized_whole_for_eval():
  # 8x8 digits at 16: no center crop, the whole digit is resized (bilinear for 'vit').
  _, eval_ = ip.load_tables(digits_config())
  (batch, *_) = eval_batches(digits_config(), global_batch_size=8)
  whole = tf.image.resize(eval_.images[:8], (S, S), method='bilinear', antialias=True)
  np.testing.assert_allclose(batch['image'], whole.numpy() / 127.5 - 1, atol=1e-5)


def test_decoding_once_keeps_mixed_sizes_and_large_tables_encoded(folder):
  cfg = digits_config(source='imagefolder', path=str(folder), eval_split='val')
  train, _ = ip.load_tables(cfg)
  assert train.kind == 'files'  # The folder's images differ in size.
  same = (folder / 'same' / 'a')
  same.mkdir(parents=True)
  for i in range(3):
    write_image(same / f'{i}.png', (10, 6), (i, i, i), 'PNG')
  table = sources.load_imagefolder(str(folder / 'same'), 'train', val_fraction=0.5)
  decoded = iterators.decode_all(table)
  assert decoded.kind == 'pixels' and decoded.images.shape == (len(table), 6, 10, 3)
  assert iterators.decode_all(table, limit_bytes=100).kind == 'files'


def test_unknown_family():
  with pytest.raises(ValueError, match="'vit'"):
    train_batches(digits_config(), 1, preprocess='vgg')


# ----------------------------------------------------------------- determinism and resumability


def test_resume_at_step_k_is_bit_identical_to_an_uninterrupted_run():
  cfg = digits_config(few_shot=2)  # 20 examples, batch 8: the run crosses epoch boundaries.
  full = train_batches(cfg, 7, seed=3)
  resumed = train_batches(cfg, 3, seed=3, start_step=4)
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other_seed = train_batches(cfg, 1, seed=4)[0]
  assert not np.array_equal(other_seed['image'], full[0]['image'])


def test_each_epoch_visits_every_example_once_in_a_new_order():
  cfg = digits_config(few_shot=2, crop_scale=None)
  train, _ = ip.load_tables(cfg)
  batches = train_batches(cfg, 10, global_batch_size=4)  # 2 epochs of 20
  labels = np.concatenate([b['label'] for b in batches])
  for epoch in (labels[:20], labels[20:]):
    np.testing.assert_array_equal(np.sort(epoch), np.sort(train.labels))
  assert not np.array_equal(labels[:20], labels[20:])


def gradient_folder(root):
  """One class holding one 24x32 image whose every pixel differs, for seeing crops and flips."""
  y, x = np.mgrid[:24, :32]
  pixels = np.stack([x * 8, y * 10, (x + y) * 4], axis=-1).astype(np.uint8)
  for split in ('train', 'val'):
    (root / split / 'only').mkdir(parents=True)
    Image.fromarray(pixels).save(root / split / 'only' / 'a.png')
  return str(root)


def test_every_copy_of_an_example_gets_its_own_augmentation(tmp_path):
  cfg = digits_config(source='imagefolder', path=gradient_folder(tmp_path), eval_split='val')
  (batch,) = train_batches(cfg, 1, global_batch_size=4)  # Four copies of the only image.
  images = batch['image'].reshape(4, -1)
  assert len({im.tobytes() for im in images}) == 4
  (batch,) = train_batches(digits_config(source='imagefolder', path=cfg.path, crop_scale=None,
                                         flip=False), 1, global_batch_size=4)
  assert len({im.tobytes() for im in batch['image']}) == 1


def test_flip_is_on_by_default_and_off_for_digits(tmp_path):
  path = gradient_folder(tmp_path)
  flips = {}
  for flip in (None, False):
    cfg = digits_config(source='imagefolder', path=path, eval_split='val', crop_scale=None,
                        flip=flip)
    # At 32 the 24x32 image is smaller than the model size, so eval resizes it whole, like train.
    (train,) = train_batches(cfg, 1, global_batch_size=16, image_size=32)
    (plain,) = eval_batches(cfg, global_batch_size=1, image_size=32)
    mirrored = [np.array_equal(im, plain['image'][0, :, ::-1]) for im in train['image']]
    unchanged = [np.array_equal(im, plain['image'][0]) for im in train['image']]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    flips[flip] = sum(mirrored)
  assert 0 < flips[None] < 16 and flips[False] == 0
  # Digits default to no flip: with no crop, every train image equals some eval image as is.
  cfg = digits_config(train_split='test', crop_scale=None)
  (train,) = train_batches(cfg, 1, global_batch_size=32)
  evaluated = np.concatenate([e['image'] for e in eval_batches(cfg, global_batch_size=360)])
  known = {im.tobytes() for im in evaluated}
  assert all(im.tobytes() in known for im in train['image'])


# ------------------------------------------------------------------------------------ multi-host


def test_processes_together_read_the_single_process_batch():
  cfg = digits_config()
  single = train_batches(cfg, 3, global_batch_size=8, seed=1)
  parts = [train_batches(cfg, 3, global_batch_size=8, seed=1, process_index=p, process_count=2)
           for p in range(2)]
  for step in range(3):
    assert parts[0][step]['image'].shape == (4, S, S, 3)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), single[step][key])


def test_batch_size_must_divide_by_process_count():
  with pytest.raises(ValueError, match='batch_size 9 does not divide by the process count 2'):
    train_batches(digits_config(), 1, global_batch_size=9, process_count=2)
  with pytest.raises(ValueError, match='process count 4'):
    eval_batches(digits_config(), global_batch_size=6, process_count=4)


# ------------------------------------------------------------------------------ eval padding


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_pads_the_last_batch_and_masks_every_example_exactly_once(process_count):
  cfg = digits_config()
  _, eval_ = ip.load_tables(cfg)
  per_process = [eval_batches(cfg, global_batch_size=64, process_index=p,
                              process_count=process_count) for p in range(process_count)]
  assert len({len(b) for b in per_process}) == 1  # Every process runs the same number of steps.
  assert len(per_process[0]) == 6  # ceil(360 / 64)
  labels = []
  for step in range(6):
    batch = {k: np.concatenate([pp[step][k] for pp in per_process]) for k in ('label', 'mask')}
    assert batch['mask'].dtype == bool and batch['label'].shape == (64,)
    labels.append(batch['label'][batch['mask']])
  assert sum(b['mask'].sum() for pp in per_process for b in pp) == 360
  np.testing.assert_array_equal(np.concatenate(labels), eval_.labels)
  assert not per_process[-1][-1]['mask'][-1]


# -------------------------------------------------------------------------- few-shot, VTAB-1k


def test_few_shot_counts_and_seed():
  train_a, eval_a = ip.load_tables(digits_config(few_shot=5, few_shot_seed=0))
  train_b, _ = ip.load_tables(digits_config(few_shot=5, few_shot_seed=0, cache=False))
  train_c, _ = ip.load_tables(digits_config(few_shot=5, few_shot_seed=1))
  np.testing.assert_array_equal(np.bincount(train_a.labels), [5] * 10)
  assert len(eval_a) == 360  # Eval is untouched.
  np.testing.assert_array_equal(train_a.images, train_b.images)
  assert not np.array_equal(train_a.images, train_c.images)
  assert ip.get_info(digits_config(few_shot=5, classes=[1, 2])).num_train == 10


def test_few_shot_names_a_class_with_too_few_examples():
  train, _ = ip.load_tables(digits_config(train_split='train[:100]'))
  counts = np.bincount(train.labels)
  rare = int(np.argmin(counts))
  # Relabelling puts the rare class first, so it is the one reported.
  with pytest.raises(ValueError, match=rf"class '{rare}' \(label 0\) has only {counts[rare]} "):
    ip.get_info(digits_config(few_shot=int(counts[rare]) + 1, train_split='train[:100]',
                              classes=[rare, (rare + 1) % 10]))


def test_vtab_1k_takes_800_train_and_200_val_from_train():
  cfg = digits_config(vtab_1k=True)
  info = ip.get_info(cfg)
  assert (info.num_train, info.num_eval) == (800, 200)
  full, _ = ip.load_tables(digits_config())
  train, val = ip.load_tables(cfg)
  np.testing.assert_array_equal(train.images, full.images[:800])
  np.testing.assert_array_equal(val.images, full.images[800:1000])
  with pytest.raises(ValueError, match=r'at least 1000 .* found \d+'):
    ip.get_info(digits_config(vtab_1k=True, classes=[0, 1, 2, 3, 4]))


# -------------------------------------------------------------------------------- ImageFolder


def test_imagefolder_with_split_folders(folder):
  cfg = digits_config(source='imagefolder', path=str(folder), eval_split='test')  # val stands in
  info = ip.get_info(cfg)
  assert info.class_names == ('cat', 'dog') and (info.num_train, info.num_eval) == (10, 6)
  (batch,) = eval_batches(cfg, global_batch_size=6)
  red = batch['image'][..., 0].mean(axis=(1, 2)) > batch['image'][..., 2].mean(axis=(1, 2))
  np.testing.assert_array_equal(red, batch['label'] == 0)  # cat images are red
  (batch,) = train_batches(cfg, 1, global_batch_size=4)
  assert batch['image'].shape == (4, S, S, 3)


def test_imagefolder_split_by_fraction(folder):
  cfg = digits_config(source='imagefolder', path=str(folder / 'train'), val_fraction=0.4,
                      eval_split='val')
  train, eval_ = ip.load_tables(cfg)
  assert (len(train), len(eval_)) == (6, 4)
  assert set(train.images) & set(eval_.images) == set()


def test_imagefolder_missing_or_empty(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match=str(missing)):
    ip.get_info(digits_config(source='imagefolder', path=str(missing)))
  with pytest.raises(FileNotFoundError, match='no class subfolders'):
    ip.get_info(digits_config(source='imagefolder', path=str(tmp_path)))
  (tmp_path / 'cls').mkdir()
  with pytest.raises(FileNotFoundError, match='holds no images'):
    ip.get_info(digits_config(source='imagefolder', path=str(tmp_path)))


# --------------------------------------------------------------------------------------- tfds


def test_tfds_mock_data_runs_the_real_load_path(tmp_path):
  cfg = digits_config(source='tfds', name='cifar10', data_dir=str(tmp_path),
                      classes=[3, 5, 7])
  with tfds.testing.mock_data(num_examples=60):
    info = ip.get_info(cfg)
    (batch,) = train_batches(cfg, 1, global_batch_size=4)
    evals = eval_batches(cfg, global_batch_size=4)
  # Mock data has no label names on file, so tfds names the classes by their ids.
  assert info.num_classes == 3 and len(info.class_names) == 3
  assert 0 < info.num_train < 60 and 0 < info.num_eval < 60  # 60 mock examples, 3 of 10 classes
  assert set(batch['label']) <= {0, 1, 2}
  assert batch['image'].shape == (4, S, S, 3) and batch['image'].min() >= -1
  assert sum(b['mask'].sum() for b in evals) == info.num_eval


def test_tfds_offline_fails_fast_naming_dataset_and_data_dir(tmp_path):
  cfg = digits_config(source='tfds', name='cifar10', data_dir=str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(ip.DatasetNotPreparedError) as err:
    ip.get_info(cfg)
  # tfds's own download path retries for ~200 s; a generous bound keeps this robust under load.
  assert time.perf_counter() - start < 60
  assert 'cifar10' in str(err.value) and str(tmp_path) in str(err.value)
  assert 'tfds build' in str(err.value)


def test_tfds_unknown_name_suggests_close_names(tmp_path):
  cfg = digits_config(source='tfds', name='cifar_10', data_dir=str(tmp_path))
  with pytest.raises(ip.DatasetNotFoundError, match=r"cifar_10.*cifar10"):
    ip.get_info(cfg)


def test_unknown_source():
  with pytest.raises(ValueError, match='imagefolder'):
    ip.get_info(digits_config(source='csv'))


# ------------------------------------------------------------------------------------ device


def test_prefetch_to_device_builds_sharded_global_arrays():
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  cfg = digits_config()
  host = train_batches(cfg, 3)
  on_device = list(ip.prefetch_to_device(iter(host), 2, sharding))
  assert len(on_device) == 3
  for h, d in zip(host, on_device):
    assert d['image'].sharding == sharding and d['label'].sharding == sharding
    np.testing.assert_array_equal(np.asarray(d['image']), h['image'])
    np.testing.assert_array_equal(np.asarray(d['label']), h['label'])


def test_prefetch_keeps_size_batches_in_flight_and_takes_a_tree_of_shardings():
  mesh = Mesh(np.array(jax.devices()[:2]), ('data',))
  shardings = {'image': NamedSharding(mesh, P('data')), 'label': NamedSharding(mesh, P())}
  pulled = []

  def host_batches():
    for i in range(4):
      pulled.append(i)
      yield {'image': np.full((2, 3), i, np.float32), 'label': np.arange(2, dtype=np.int32) + i}

  it = ip.prefetch_to_device(host_batches(), 3, shardings)
  first = next(it)
  assert len(pulled) == 3  # Three batches were put on device before the first was used.
  assert first['label'].sharding == shardings['label']
  rest = list(it)
  assert [int(b['image'][0, 0]) for b in [first] + rest] == [0, 1, 2, 3]
