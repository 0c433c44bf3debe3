"""Image<->text retrieval from a captions.jsonl folder, through the function and the CLI."""

import importlib
import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vadapt import retrieval
from vadapt import tokenizer as tokenizer_lib
from vadapt import zeroshot
from vadapt.data import preprocess as preprocess_lib
from cli_runner import run_main

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, 'configs')
COLOURS = {'red': (220, 20, 20), 'green': (20, 200, 20), 'blue': (20, 20, 220),
           'yellow': (230, 230, 30), 'black': (0, 0, 0), 'white': (255, 255, 255)}
# (image, caption) in file order: some images have two captions, not adjacent.
PAIRS = [('img/red.png', 'a red square'), ('img/green.jpg', 'green'),
         ('img/red.png', 'something crimson'), ('img/blue.png', 'a blue picture'),
         ('img/yellow.png', 'yellow'), ('img/black.png', 'darkness'),
         ('img/green.jpg', 'a grassy colour'), ('img/white.png', 'a white image'),
         ('img/blue.png', 'the sea')]


def _write_folder(root, pairs=PAIRS):
  os.makedirs(root / 'img', exist_ok=True)
  for name, colour in COLOURS.items():
    image = Image.new('RGB', (48, 40), colour)  # Not square: exercises resize and crop.
    path = root / 'img' / f'{name}.png'
    image.save(path)
    if name == 'green':
      image.save(root / 'img' / 'green.jpg')
  with open(root / 'captions.jsonl', 'w') as f:
    for image, caption in pairs:
      f.write(json.dumps({'image': image, 'caption': caption}) + '\n')
  return root


def _config(path=''):
  config = importlib.import_module('configs.clip_b16_adapter').get_config('test')
  config.retrieval.path = str(path)
  return config


def test_read_captions_groups_captions_by_image(tmp_path):
  dataset = retrieval.read_captions(str(_write_folder(tmp_path)))
  assert dataset.images == ('img/red.png', 'img/green.jpg', 'img/blue.png', 'img/yellow.png',
                            'img/black.png', 'img/white.png')
  assert dataset.captions == tuple(c for _, c in PAIRS)
  np.testing.assert_array_equal(dataset.text_to_image, [0, 1, 0, 2, 3, 4, 1, 5, 2])


def test_mode_and_function_equal_independent_computation(tmp_path, capsys):
  root = _write_folder(tmp_path / 'data')
  run_main([f'--config={os.path.join(CONFIGS, "clip_b16_adapter.py")}:test',
             f'--workdir={tmp_path / "work"}', '--mode=retrieval',
             f'--config.retrieval.path={root}'])
  out = capsys.readouterr().out
  assert 'retrieval on 6 images, 9 captions' in out and 'text->image R@1/5/10' in out
  with open(tmp_path / 'work' / 'retrieval.json') as f:
    result = json.load(f)
  config = _config(root)
  assert retrieval.evaluate_retrieval(config) == result
  keys = {f'{d}/R@{k}' for d in ('image_to_text', 'text_to_image') for k in (1, 5, 10)}
  assert set(result) == keys | {'retrieval/images', 'retrieval/captions'}
  assert result['retrieval/images'] == 6 and result['retrieval/captions'] == 9
  assert all(0.0 <= result[k] <= 1.0 for k in keys)
  for d in ('image_to_text', 'text_to_image'):
    assert result[f'{d}/R@1'] <= result[f'{d}/R@5'] <= result[f'{d}/R@10']
    # 9 captions and 6 images: everything is within the top 10.
    assert result[f'{d}/R@10'] == 1.0

  # The same numbers from the pieces, with images and captions prepared here.
  model, params = retrieval.clip_backbone(config)
  family = preprocess_lib.get_family('clip')
  names = ['red.png', 'green.jpg', 'blue.png', 'yellow.png', 'black.png', 'white.png']
  images = np.stack([
      preprocess_lib.eval_preprocess(
          tf.constant(np.asarray(Image.open(root / 'img' / n).convert('RGB'))), 32, family)
      for n in names])
  assert images.shape == (6, 32, 32, 3)
  tokens = tokenizer_lib.default_tokenizer()([c for _, c in PAIRS])
  expected = zeroshot.retrieval_metrics(
      zeroshot.encode_images(model, params, images), zeroshot.encode_texts(model, params, tokens),
      [names.index(i.split('/')[1]) for i, _ in PAIRS])
  assert {k: result[k] for k in keys} == expected


@pytest.mark.parametrize('lines, match', [
    (['{"image": "img/red.png", "caption": "red"}', '{"image": "img/red.png", "caption": '],
     'line 2: not valid JSON'),
    (['{"image": "img/red.png", "caption": "red"}', '', '{"image": "img/red.png"}'],
     r"line 3: expected an object with string keys \"image\" and \"caption\"; found \['image'\]"),
    (['["img/red.png", "red"]'], 'line 1: expected an object'),
    (['{"image": "img/red.png", "caption": "red"}', '{"image": "img/nope.png", "caption": "x"}'],
     r"line 2: image file .*img/nope.png' does not exist"),
    ([], 'holds no captions'),
])
def test_bad_captions_file(tmp_path, lines, match):
  _write_folder(tmp_path)
  (tmp_path / 'captions.jsonl').write_text('\n'.join(lines))
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    retrieval.read_captions(str(tmp_path))


def test_missing_folder_captions_or_path(tmp_path):
  missing = tmp_path / 'missing'
  with pytest.raises(FileNotFoundError, match=f'folder {str(missing)!r} does not exist'):
    retrieval.read_captions(str(missing))
  with pytest.raises(FileNotFoundError, match='No captions file .*captions.jsonl'):
    retrieval.read_captions(str(tmp_path))
  with pytest.raises(ValueError, match='needs config.retrieval.path'):
    retrieval.evaluate_retrieval(_config(''))
