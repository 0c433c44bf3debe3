"""CLIP tokenizer: ids identical to transformers' CLIPTokenizer, truncation, padding, loading."""

import numpy as np
import pytest

from vadapt import tokenizer as clip_tokenizer

TEXTS = [
    'a photo of a cat.',
    'A PHOTO OF A DOG!!',
    "It's what they'll've done, isn't it? We'd've known; I'm sure you're right.",
    'Numbers: 3.14159, 2024-06-01, 1,000,000 and 42nd street',
    'naïve café, Zürich, São Paulo, Ελληνικά, русский, 日本語のテキスト, 한국어',
    'emoji 😀🐱‍👤 and symbols ©®™ ≤ ≥ → ∞',
    '   leading,   repeated\tand\ntrailing whitespace   ',
    'punctuation!?... (brackets) [more] {braces} "quotes" \'single\' #hash @at $5 %50 ^&*_+=~`|\\/<>',
    'a-hyphenated_word with under_scores and CamelCaseWords',
    'Ǆ ǅ ǆ İstanbul ß ﬁ',  # case folding edge cases
    '',
    'word ' * 100,  # longer than the context
    'hello<|endoftext|>world',
]


@pytest.fixture(scope='module')
def tok():
  return clip_tokenizer.default_tokenizer()


@pytest.fixture(scope='module')
def hf_tok(tok, tmp_path_factory):
  transformers = pytest.importorskip('transformers')
  directory = tmp_path_factory.mktemp('clip_tokenizer')
  tok.save_vocab_and_merges(directory)
  return transformers.CLIPTokenizer.from_pretrained(str(directory))


def test_vocab_matches_openai_layout(tok):
  vocab, merges = clip_tokenizer.openai_vocab_and_merges()
  assert len(vocab) == tok.vocab_size == 49408
  assert len(merges) == 48894
  assert (tok.sot_id, tok.eot_id) == (49406, 49407)
  assert vocab['!'] == 0 and vocab['!</w>'] == 256
  # Well-known ids of OpenAI CLIP's vocabulary.
  np.testing.assert_array_equal(tok('a photo of a cat.')[0, :8],
                                [49406, 320, 1125, 539, 320, 2368, 269, 49407])


def test_ids_identical_to_transformers(tok, hf_tok):
  want = hf_tok(TEXTS, padding='max_length', max_length=77, truncation=True)['input_ids']
  got = clip_tokenizer.CLIPTokenizer(tok.tokenizer, pad_id=tok.eot_id)(TEXTS)
  assert got.dtype == np.int32 and got.shape == (len(TEXTS), 77)
  for text, g, w in zip(TEXTS, got, want):
    assert list(g) == list(w), text


def test_unpadded_ids_identical_to_transformers(tok, hf_tok):
  for text in TEXTS[:-2]:
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False)['input_ids'], text


def test_truncation_keeps_end_token(tok):
  ids = tok('word ' * 100)
  assert ids.shape == (1, 77)
  assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
  assert np.all(ids[0, 1:-1] == tok.encode('word')[0])


def test_strict_mode_rejects_long_text(tok):
  strict = clip_tokenizer.CLIPTokenizer(tok.tokenizer, truncate=False)
  assert strict('word ' * 75).shape == (1, 77)  # exactly fits: 75 + start + end
  with pytest.raises(ValueError, match='Text 0 is 78 tokens long.*context length 77'):
    strict('word ' * 76)


def test_zero_padding_and_custom_context(tok):
  ids = tok(['a cat', 'a'], context_length=8)
  np.testing.assert_array_equal(ids, [[49406, 320, 2368, 49407, 0, 0, 0, 0],
                                      [49406, 320, 49407, 0, 0, 0, 0, 0]])
  assert clip_tokenizer.tokenize('a cat').shape == (1, 77)


def test_decode_round_trip(tok):
  assert tok.decode(tok('Hello,   World! 42')[0]) == 'hello , world ! 4 2'


def test_loads_hf_directory_and_tokenizer_json(tok, hf_tok, tmp_path):
  tok.save_vocab_and_merges(tmp_path / 'vm')
  from_files = clip_tokenizer.CLIPTokenizer.from_pretrained(tmp_path / 'vm')
  hf_tok.save_pretrained(str(tmp_path / 'hf'))
  assert (tmp_path / 'hf' / 'tokenizer.json').exists()
  from_json = clip_tokenizer.CLIPTokenizer.from_pretrained(tmp_path / 'hf')
  want = tok(TEXTS)
  np.testing.assert_array_equal(from_files(TEXTS), want)
  np.testing.assert_array_equal(from_json(TEXTS), want)


def test_missing_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    clip_tokenizer.CLIPTokenizer.from_pretrained(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='neither tokenizer.json'):
    clip_tokenizer.CLIPTokenizer.from_pretrained(tmp_path)
