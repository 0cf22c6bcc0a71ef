"""Text that ships with Python, as byte-level tokens: nothing is downloaded.

Two sources are available wherever CPython is installed:

- ``'topics'``: the prose of the Python reference manual, as shipped for
  ``help()`` in ``pydoc_data/topics.py`` (about 80 documents, ~0.5 MB);
- ``'stdlib'``: the top-level ``.py`` modules of the standard library
  (~170 documents, ~4.5 MB of code and docstrings).

``'all'`` uses both. Every document is encoded as UTF-8 bytes, so the
vocabulary is the 256 byte values and no tokenizer is needed. The train/eval
split is by document, from a CRC32 of its name (stable across runs, machines
and Python hash seeds), so eval text is never seen in training.

Example::

    corpus = load_corpus('topics')
    batches = corpus.batches('train', batch_size=16, seq_len=128, seed=0)
    x = next(batches)  # uint8 array (16, 129): inputs x[:, :-1], targets x[:, 1:]

The benchmarks' small LM reads the standard library's sources as one raw
byte stream instead (:func:`stdlib_bytes`, no split, no separators), through
the same :func:`windows`. This module is the one text loader of the examples
and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib
from collections.abc import Iterator

import numpy as np

SOURCES = ('topics', 'stdlib', 'all')
VOCAB_SIZE = 256  # byte-level
EOS = 0  # the NUL byte never occurs in the text; it separates documents


def _topics() -> dict[str, str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return {f'topics/{k}': v for k, v in sorted(topics.topics.items())}


def _stdlib_files() -> list[tuple[str, str]]:
  """``(name, path)`` of the standard library's top-level ``.py`` modules, in
  sorted order (the same on every run of one Python version)."""
  root = sysconfig.get_paths()['stdlib']
  out = []
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name)
    if name.endswith('.py') and os.path.isfile(path):
      out.append((name, path))
  return out


def _stdlib(max_bytes: int | None) -> dict[str, str]:
  docs = {}
  total = 0
  for name, path in _stdlib_files():
    with open(path, encoding='utf-8', errors='replace') as f:
      text = f.read()
    docs[f'stdlib/{name}'] = text
    total += len(text)
    if max_bytes is not None and total >= max_bytes:
      break
  return docs


def stdlib_bytes(max_bytes: int = 4 << 20) -> np.ndarray:
  """The first ``max_bytes`` bytes of the standard library's sources, as one
  uint8 stream (files concatenated in sorted order, no separators)."""
  chunks, total = [], 0
  for _, path in _stdlib_files():
    with open(path, 'rb') as f:
      chunk = f.read()
    chunks.append(chunk)
    total += len(chunk)
    if total >= max_bytes:
      break
  return np.frombuffer(b''.join(chunks)[:max_bytes], np.uint8)


def windows(tokens: np.ndarray, batch_size: int, seq_len: int,
            seed: int = 0) -> Iterator[np.ndarray]:
  """Endless random windows of ``seq_len + 1`` tokens, ``(batch, seq+1)``.

  The window starts come from ``np.random.default_rng(seed)``, so a seed
  fixes the whole data order. The windows have ``tokens``' dtype.
  """
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    yield tokens[starts[:, None] + offsets[None, :]]


def is_eval_document(name: str, eval_fraction: float) -> bool:
  """Whether a document belongs to the eval split (a stable hash of its name)."""
  return (zlib.crc32(name.encode()) % 1000) < int(eval_fraction * 1000)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Byte-level train and eval token streams.

  Attributes:
    train: uint8 tokens of the training documents, separated by ``EOS``.
    eval: uint8 tokens of the held-out documents.
    train_docs: names of the training documents.
    eval_docs: names of the held-out documents.
  """

  train: np.ndarray
  eval: np.ndarray
  train_docs: tuple[str, ...]
  eval_docs: tuple[str, ...]

  @property
  def vocab_size(self) -> int:
    return VOCAB_SIZE

  def split(self, split: str) -> np.ndarray:
    if split not in ('train', 'eval'):
      raise ValueError(f"`split` must be 'train' or 'eval', got {split!r}.")
    return self.train if split == 'train' else self.eval

  def batches(self, split: str, batch_size: int, seq_len: int,
              seed: int = 0) -> Iterator[np.ndarray]:
    """Endless random windows of ``seq_len + 1`` tokens, ``(batch, seq+1)``.

    The window starts come from ``np.random.default_rng(seed)``, so a seed
    fixes the whole data order.
    """
    data = self.split(split)
    if len(data) <= seq_len + 1:
      raise ValueError(f'the {split} split has {len(data)} tokens, fewer than '
                       f'`seq_len + 1` = {seq_len + 1}.')
    yield from windows(data, batch_size, seq_len, seed)

  def eval_batches(self, batch_size: int, seq_len: int,
                   num_batches: int) -> list[np.ndarray]:
    """A fixed list of eval batches (the same on every call and machine)."""
    it = self.batches('eval', batch_size, seq_len, seed=1234)
    return [next(it) for _ in range(num_batches)]


def load_corpus(source: str = 'topics', eval_fraction: float = 0.1,
                max_stdlib_bytes: int | None = 2_000_000) -> Corpus:
  """Loads text that ships with Python as a byte-level :class:`Corpus`.

  Args:
    source: ``'topics'``, ``'stdlib'`` or ``'all'`` (see the module docstring).
    eval_fraction: the fraction of documents (by a hash of their names) held
      out for evaluation, in ``(0, 1)``.
    max_stdlib_bytes: stop reading standard-library modules (in sorted order)
      after about this many characters; ``None`` reads them all.

  Returns:
    A :class:`Corpus`.
  """
  if source not in SOURCES:
    raise ValueError(f'`source` must be one of {SOURCES}, got {source!r}.')
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f'`eval_fraction` must be in (0, 1), got {eval_fraction}.')
  docs = {}
  if source in ('topics', 'all'):
    docs.update(_topics())
  if source in ('stdlib', 'all'):
    docs.update(_stdlib(max_stdlib_bytes))
  train_docs = [n for n in docs if not is_eval_document(n, eval_fraction)]
  eval_docs = [n for n in docs if is_eval_document(n, eval_fraction)]
  if not eval_docs or not train_docs:  # tiny corpora: hold out the last doc
    train_docs, eval_docs = list(docs)[:-1], list(docs)[-1:]

  def encode(names):
    sep = bytes([EOS])
    blob = sep.join(docs[n].encode('utf-8') for n in names)
    return np.frombuffer(blob, dtype=np.uint8).copy()

  return Corpus(train=encode(train_docs), eval=encode(eval_docs),
                train_docs=tuple(train_docs), eval_docs=tuple(eval_docs))


def decode(tokens: np.ndarray) -> str:
  """Bytes back to text (invalid UTF-8 is replaced)."""
  return bytes(np.asarray(tokens, np.uint8).tolist()).decode(
      'utf-8', errors='replace')
