"""CLIP's byte-level BPE tokenizer: the ids of OpenAI's ``clip.tokenize`` for any text.

The pipeline is OpenAI's ``SimpleTokenizer``, step by step: ftfy's ``fix_text`` (mojibake, curly
quotes, ligatures, fullwidth forms, terminal escapes, NFC), ``html.unescape`` twice (``&amp;amp;``
-> ``&``), runs of whitespace -> one space, strip, lowercase of the whole string (so
``<|STARTOFTEXT|>`` becomes the special token, as there); split on CLIP's pattern (special tokens,
contractions, letter runs, single digits, runs of other characters) with the ``regex`` module
OpenAI uses; byte-level BPE with the ``</w>`` end-of-word suffix, run by Hugging Face's
``tokenizers``. transformers' ``CLIPTokenizer`` (tokenizers-backed) skips ftfy and the HTML
unescaping, so it gives other ids wherever those change the text.

The vocabulary comes from, in order of preference:
  * a Hugging Face checkpoint directory (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``);
  * OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, vendored in ``vadapt/assets`` (MIT, see
    ``vadapt/assets/LICENSE.openai-clip``), expanded into vocab and merges exactly as OpenAI's
    ``SimpleTokenizer`` does. This is the default, so OpenAI checkpoints need no tokenizer file.

Outputs are int32 arrays of shape (N, context_length): ``<|startoftext|>`` text ``<|endoftext|>``
then padding. Text that does not fit is truncated to ``context_length - 2`` tokens and the end token
is kept (OpenAI's ``tokenize(..., truncate=True)``); with ``truncate=False`` it is an error instead.
Padding is 0 as in OpenAI's ``tokenize``; pass ``pad_id=tokenizer.eot_id`` for Hugging Face's
padding with the end token. CLIP models read text features at argmax(ids), the end token, either
way.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
from typing import Optional, Sequence

import ftfy
import numpy as np
import regex
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from vadapt.pretrained import common

SOT = '<|startoftext|>'
EOT = '<|endoftext|>'
CONTEXT_LENGTH = 77
DEFAULT_BPE_PATH = os.path.join(os.path.dirname(__file__), 'assets', 'bpe_simple_vocab_16e6.txt.gz')

# CLIP's pre-tokenisation pattern (OpenAI's SimpleTokenizer, case-folded input).
_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
            r"""[^\s\p{L}\p{N}]+""")
_SPLIT = regex.compile(_PATTERN, regex.IGNORECASE)
_WHITESPACE = regex.compile(r'\s+')
# OpenAI keeps the first 49152 - 256 - 2 merges of the file, so the vocabulary has 49408 entries.
_NUM_MERGES = 49152 - 256 - 2


def clean(text: str) -> str:
  """OpenAI's text normalisation before BPE (SimpleTokenizer's basic_clean, whitespace_clean and
  lower): ftfy.fix_text, HTML entities unescaped twice, whitespace runs -> ' ', lowercase."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE.sub(' ', text).strip().lower()


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
        + list(range(ord('®'), ord('ÿ') + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def openai_vocab_and_merges(
    bpe_path: str | os.PathLike = DEFAULT_BPE_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Expands OpenAI's merge file into (vocab {token: id}, merges) as SimpleTokenizer does.

  Ids: the 256 byte characters, the same with '</w>', one per merge, then <|startoftext|> and
  <|endoftext|> (49406, 49407).
  """
  path = common.require_file(bpe_path, 'CLIP BPE merge file')
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    lines = f.read().split('\n')
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
  units = list(bytes_to_unicode().values())
  tokens = units + [u + '</w>' for u in units] + [''.join(m) for m in merges] + [SOT, EOT]
  return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer(vocab: dict[str, int],
                    merges: Sequence[tuple[str, str]]) -> tokenizers.Tokenizer:
  """A ``tokenizers.Tokenizer`` with CLIP's normaliser, pre-tokeniser and BPE model."""
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=dict(vocab), merges=[tuple(m) for m in merges], continuing_subword_prefix='',
      end_of_word_suffix='</w>', fuse_unk=False, unk_token=EOT))
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_PATTERN), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([SOT, EOT])
  return tok


class CLIPTokenizer:
  """Text -> int32 token ids (N, context_length) for CLIP's text tower.

  Attributes:
    tokenizer: the underlying ``tokenizers.Tokenizer`` (no post-processor is relied on).
    context_length: output length, including start and end tokens.
    truncate: True truncates long text keeping the end token; False raises ValueError.
    pad_id: id used for padding (0 as in OpenAI; eot_id as in Hugging Face).
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, context_length: int = CONTEXT_LENGTH,
               truncate: bool = True, pad_id: int = 0):
    if context_length < 2:
      raise ValueError(f'context_length must leave room for start and end tokens; got '
                       f'{context_length}.')
    self.tokenizer = tokenizer
    self.context_length = context_length
    self.truncate = truncate
    self.pad_id = pad_id
    ids = {t: tokenizer.token_to_id(t) for t in (SOT, EOT)}
    if None in ids.values():
      raise ValueError(f'The vocabulary lacks CLIP special tokens: {ids}.')
    self.sot_id, self.eot_id = ids[SOT], ids[EOT]
    self._byte_encoder = bytes_to_unicode()
    self._bpe_cache: dict[str, list[int]] = {SOT: [self.sot_id], EOT: [self.eot_id]}

  @classmethod
  def from_bpe(cls, bpe_path: str | os.PathLike = DEFAULT_BPE_PATH, **kwargs) -> 'CLIPTokenizer':
    """From OpenAI's bpe_simple_vocab_16e6.txt.gz (the vendored copy by default)."""
    return cls(build_tokenizer(*openai_vocab_and_merges(bpe_path)), **kwargs)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> 'CLIPTokenizer':
    """From a Hugging Face directory (tokenizer.json, or vocab.json + merges.txt) or a file."""
    path = common.require_file(path, 'CLIP tokenizer')
    if os.path.isdir(path):
      if os.path.exists(os.path.join(path, 'tokenizer.json')):
        return cls(tokenizers.Tokenizer.from_file(os.path.join(path, 'tokenizer.json')), **kwargs)
      vocab_path, merges_path = (os.path.join(path, n) for n in ('vocab.json', 'merges.txt'))
      if not (os.path.exists(vocab_path) and os.path.exists(merges_path)):
        raise FileNotFoundError(
            f'{path!r} holds neither tokenizer.json nor vocab.json + merges.txt; found '
            f'{sorted(os.listdir(path))}.')
      with open(vocab_path, encoding='utf-8') as f:
        vocab = json.load(f)
      with open(merges_path, encoding='utf-8') as f:
        merges = [tuple(line.split()) for line in f.read().split('\n')
                  if line and not line.startswith('#version')]
      return cls(build_tokenizer(vocab, merges), **kwargs)
    if path.endswith('.json'):
      return cls(tokenizers.Tokenizer.from_file(path), **kwargs)
    return cls.from_bpe(path, **kwargs)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def _bpe(self, word: str) -> list[int]:
    ids = self._bpe_cache.get(word)
    if ids is None:
      units = ''.join(self._byte_encoder[b] for b in word.encode('utf-8'))
      # The BPE model alone: cleaning and splitting happened above, exactly as OpenAI does them.
      ids = [t.id for t in self.tokenizer.model.tokenize(units)]
      if len(self._bpe_cache) < 100_000:
        self._bpe_cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE ids of one text, without start/end tokens or truncation."""
    return [i for word in _SPLIT.findall(clean(text)) for i in self._bpe(word)]

  def __call__(self, texts: str | Sequence[str], *, context_length: Optional[int] = None,
               truncate: Optional[bool] = None) -> np.ndarray:
    """Tokenizes one text or a list -> int32 (N, context_length)."""
    if isinstance(texts, str):
      texts = [texts]
    length = self.context_length if context_length is None else context_length
    truncate = self.truncate if truncate is None else truncate
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      ids = [self.sot_id] + self.encode(text) + [self.eot_id]
      if len(ids) > length:
        if not truncate:
          raise ValueError(
              f'Text {i} is {len(ids)} tokens long with start and end tokens, more than the '
              f'context length {length}: {text[:60]!r}... Shorten it, or tokenize with '
              'truncate=True to keep the first tokens and the end token.')
        ids = ids[:length - 1] + [self.eot_id]
      out[i, :len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Token ids -> text: drops the start token, stops at the end token."""
    kept = []
    for i in map(int, ids):
      if i == self.eot_id:
        break  # what follows is padding, which may be 0, a real token ('!')
      if i != self.sot_id:
        kept.append(i)
    text = self.tokenizer.decode(kept, skip_special_tokens=True)
    return text.replace('</w>', ' ').strip()

  def save_vocab_and_merges(self, directory: str | os.PathLike) -> None:
    """Writes Hugging Face's vocab.json and merges.txt (for transformers' CLIPTokenizer)."""
    model = json.loads(self.tokenizer.to_str())['model']
    os.makedirs(directory, exist_ok=True)
    vocab = dict(self.tokenizer.get_vocab(with_added_tokens=True))
    with open(os.path.join(directory, 'vocab.json'), 'w', encoding='utf-8') as f:
      json.dump(vocab, f, ensure_ascii=False)
    merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
    with open(os.path.join(directory, 'merges.txt'), 'w', encoding='utf-8') as f:
      f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
  """The OpenAI CLIP tokenizer from the vendored merge file (cached: building takes ~1 s)."""
  return CLIPTokenizer.from_bpe()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH,
             truncate: bool = True) -> np.ndarray:
  """OpenAI-style ``clip.tokenize``: int32 (N, context_length), zero padded."""
  return default_tokenizer()(texts, context_length=context_length, truncate=truncate)
