"""CLIP tokenizer: ids identical to OpenAI's clip.tokenize (and to transformers' CLIPTokenizer
where ftfy and HTML unescaping leave the text alone), truncation, padding, loading."""

import html
import importlib.util
import os
import random

import ftfy
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


# What OpenAI's cleaning (ftfy, HTML unescaping, whole-string lowercasing) is there for.
OPENAI_TEXTS = [
    'A photo of a golden retriever playing fetch in the park.',
    'Two people riding bicycles down a busy city street at night',
    # HTML entities, once and twice escaped, named and numeric.
    'Tom &amp; Jerry', '&quot;quoted&quot; &lt;b&gt;bold&lt;/b&gt;', 'fish &amp;amp; chips',
    'it&#39;s &#x27;here&#x27; &eacute;t&eacute; &nbsp;gap', 'AT&T &copy; 2024 &unknown; &amp',
    # Curly quotes and apostrophes, dashes, ellipses (everyday in scraped captions).
    '\u201cHello,\u201d she said \u2014 it\u2019s the dog\u2019s ball\u2026',
    '\u2018single\u2019 \u201edouble\u201c \u00abguillemets\u00bb',
    # Ligatures and fullwidth / halfwidth forms.
    '\ufb01ne \ufb02owers \ufb00 \ufb03 \ufb04', '\uff21\uff22\uff23\uff11\uff12\uff13 \uff01\uff1f',
    '\uff76\uff80\uff76\uff85 halfwidth katakana',
    # Mojibake: UTF-8 read as Windows-1252 / Latin-1, once and twice.
    'The Mona Lisa doesn\u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2t have eyebrows.',
    'caf\u00c3\u00a9 cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e', '\u00e2\u20ac\u0153quoted\u00e2\u20ac\x9d',
    # Case: the Greek final sigma, dotted I, titlecase digraphs, sharp s.
    '\u039f\u0394\u03a5\u03a3\u03a3\u0395\u03a5\u03a3 \u039b\u039f\u0393\u039f\u03a3',
    '\u0130stanbul \u01c5 \u1e9e STRASSE', 'Ǆ ǅ ǆ İstanbul ß ﬁ',
    # Special-token strings, in another case and inside words.
    '<|STARTOFTEXT|> caps <|EndOfText|>', 'hello<|endoftext|>world', '<|startoftext|>',
    # Combining marks, odd whitespace, control characters, terminal escapes.
    'e\u0301 vs \u00e9 and &#x301; alone', '\u00a0nbsp\u2003em\u3000ideographic\x1cfs\u200bzw',
    'tab\tnew\nline\r\ncrlf', 'bell\x07 \x1b[31mred\x1b[0m text', '\ufeffbom',
    # Long text (truncated by tokenize) and empty text.
    'a very long caption, ' * 40, '', '   ',
] + TEXTS


def _openai_simple_tokenizer():
  """OpenAI's own clip/simple_tokenizer.py (openai-clip), without clip/__init__ (torchvision)."""
  spec = importlib.util.find_spec('clip')
  path = spec and os.path.join(spec.submodule_search_locations[0], 'simple_tokenizer.py')
  if not path or not os.path.exists(path):
    pytest.skip('openai-clip (the test extra) is not installed')
  module_spec = importlib.util.spec_from_file_location('openai_clip_simple_tokenizer', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.SimpleTokenizer()


def _openai_tokenize(simple, texts, context_length=77):
  """clip.tokenize(texts, truncate=True) as OpenAI writes it, in numpy instead of torch."""
  sot, eot = simple.encoder['<|startoftext|>'], simple.encoder['<|endoftext|>']
  out = np.zeros((len(texts), context_length), np.int64)
  for i, text in enumerate(texts):
    tokens = [sot] + simple.encode(text) + [eot]
    if len(tokens) > context_length:
      tokens = tokens[:context_length]
      tokens[-1] = eot
    out[i, :len(tokens)] = tokens
  return out


@pytest.fixture(scope='module')
def tok():
  return clip_tokenizer.default_tokenizer()


@pytest.fixture(scope='module')
def openai():
  return _openai_simple_tokenizer()


def test_ids_identical_to_openai_clip_tokenize(tok, openai):
  got = clip_tokenizer.tokenize(OPENAI_TEXTS)
  want = _openai_tokenize(openai, OPENAI_TEXTS)
  for text, g, w in zip(OPENAI_TEXTS, got, want):
    assert list(g) == list(w), repr(text)
  # The cleaning mattered: on 20 of these it changes more than whitespace and case.
  assert sum(clip_tokenizer.clean(t) != ' '.join(t.split()).lower() for t in OPENAI_TEXTS) == 20


def test_ids_identical_to_openai_on_random_text(tok, openai):
  """Random strings over the characters and fragments where tokenizers tend to disagree."""
  pieces = (list('aZ09 .,;:!?\'"-_()[]{}<>|/\\@#$%^&*+=~`\t\n') +
            ['&amp;', '&quot;', '&#39;', '&lt;', '&nbsp;', '&#x2019;', '&amp;amp;', "'s", "'LL",
             '\u2019', '\u201c', '\u201d', '\u2014', '\ufb01', '\uff21', '\uff10', '\u00c3\u00a9',
             '\u00e2\u20ac\u2122', '\u03a3', '\u03c3', '\u0130', '\u00df', '\u0301', '\u00e9', '\u4e2d\u6587',
             '\ud55c', '\u0416', '\U0001f600', '\u200d', '\u00a0', '\u3000', '\x1b[1m', '\x00', '\x85',
             '<|startoftext|>', '<|ENDOFTEXT|>', 'Word', 'CAPS', '123', 'naïve'])
  rng = random.Random(0)
  texts = [''.join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(400)]
  np.testing.assert_array_equal(clip_tokenizer.tokenize(texts), _openai_tokenize(openai, texts))


def test_clean_is_openais_pipeline():
  assert clip_tokenizer.clean('  Tom &amp;amp;  Jerry\u2019s \ufb01sh  ') == "tom & jerry's fish"
  text = 'caf\u00c3\u00a9 &quot;\u039f\u0394\u039f\u03a3&quot;'
  assert clip_tokenizer.clean(text) == html.unescape(ftfy.fix_text(text)).lower() == 'café "οδος"'


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


# transformers' CLIPTokenizer skips ftfy and HTML unescaping: it agrees where those change nothing.
HF_TEXTS = [t for t in TEXTS if html.unescape(ftfy.fix_text(t)) == t]


def test_ids_identical_to_transformers_where_cleaning_changes_nothing(tok, hf_tok):
  assert len(HF_TEXTS) == len(TEXTS) - 1  # All but the ligature.
  want = hf_tok(HF_TEXTS, padding='max_length', max_length=77, truncation=True)['input_ids']
  got = clip_tokenizer.CLIPTokenizer(tok.tokenizer, pad_id=tok.eot_id)(HF_TEXTS)
  assert got.dtype == np.int32 and got.shape == (len(HF_TEXTS), 77)
  for text, g, w in zip(HF_TEXTS, got, want):
    assert list(g) == list(w), text


def test_unpadded_ids_identical_to_transformers(tok, hf_tok):
  for text in HF_TEXTS[:-2]:
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
