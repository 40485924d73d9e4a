"""Training data without downloads: text streams (bytes or any tokenizer), synthetic tasks,
and a mixer.

Sources share one protocol: `source.example(seed, index) -> tasks.Example`, a pure function.
Text sources cut a token stream (documents joined by EOS) into fixed-length chunks and visit
the chunks of each epoch in a seeded random order, so chunk `index` is also a pure function
of (seed, index).

Tokens are UTF-8 bytes (ByteTokenizer ids) by default. A text source's `tokenizer` setting
picks another: a directory with tokenizer.json (its tokenizer_config.json /
generation_config.json / config.json are honoured), a tokenizer.json file, a .gguf file (or
a directory holding one), or a named model (`models.fetch.MODELS`, e.g. "smollm2-135m");
"" or "bytes" keeps bytes. Documents are then tokenised once, when the source is built
(no BOS; the tokenizer's EOS separates documents).

`Mixture` draws each row of a batch from one source (chosen by a hash of (seed, row index)
with the configured weights) and keeps one counter per source; its whole state is a small
dict of ints (`state()` / `restore(state)`), so a resumed run reads exactly the batches an
uninterrupted run would have read.

Text corpora:
  * `stdlib_corpus(split)`: the Python standard library's own `*.py` sources (sorted
    relative paths; about 2% of files, chosen by a hash of the path, are held out as
    "validation").
  * `file_corpus(paths)`: user text files (one document each) or JSONL files (one document
    per line, from a text field).

Shapes: B batch, T model input length, L = T + 1 example length.
"""

from __future__ import annotations

import bisect
import collections
import functools
import json
import os
import sysconfig
import zlib
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from train import tasks as tasks_lib
from train.tasks import EOS, Example

SPLITS = ("train", "validation")


# --- text corpora -------------------------------------------------------------------------
class Corpus:
  """Documents as byte strings, read lazily: doc i is `read(i)`, its size `sizes[i]`."""

  def __init__(self, names: Sequence[str], sizes: Sequence[int],
               read: Callable[[int], bytes], cache_docs: int = 256):
    if not names:
      raise ValueError("the corpus has no documents")
    self.names = list(names)
    self.sizes = np.asarray(sizes, np.int64)
    self._read = read
    self._cache = collections.OrderedDict()
    self._cache_docs = cache_docs

  def __len__(self):
    return len(self.names)

  def doc(self, i: int) -> bytes:
    if i in self._cache:
      self._cache.move_to_end(i)
      return self._cache[i]
    data = self._read(i)
    if len(data) != self.sizes[i]:
      raise ValueError(f"document {self.names[i]!r} changed size on disk "
                       f"({self.sizes[i]} -> {len(data)} bytes); the stream would shift")
    self._cache[i] = data
    if len(self._cache) > self._cache_docs:
      self._cache.popitem(last=False)
    return data


def _stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def _held_out(name: str, percent: int) -> bool:
  return zlib.crc32(name.encode()) % 100 < percent


@functools.lru_cache(maxsize=8)
def stdlib_corpus(split: str = "train", heldout_percent: int = 2,
                  root: Optional[str] = None) -> Corpus:
  """The standard library's `*.py` files (site-packages excluded), sorted by relative path."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; allowed: {SPLITS}")
  root = root or _stdlib_dir()
  names = []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages",
                                                  "__pycache__"))
    for f in files:
      if f.endswith(".py"):
        names.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
  names.sort()
  names = [n for n in names if _held_out(n, heldout_percent) == (split == "validation")]
  sizes = [os.path.getsize(os.path.join(root, n)) for n in names]

  def read(i):
    with open(os.path.join(root, names[i]), "rb") as f:
      return f.read()

  return Corpus(names, sizes, read)


def file_corpus(paths: Sequence[str], jsonl_field: str = "text") -> Corpus:
  """User files: `.jsonl` -> one document per line (field `jsonl_field`); else one per file."""
  docs, names = [], []
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p]
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"text file {path!r} does not exist")
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            rec = json.loads(line)
          except ValueError as e:
            raise ValueError(f"{path}:{ln}: not valid JSON ({e})") from e
          if not isinstance(rec, dict) or not isinstance(rec.get(jsonl_field), str):
            raise ValueError(f"{path}:{ln}: expected an object with a string field "
                             f"{jsonl_field!r}")
          docs.append(rec[jsonl_field].encode("utf-8"))
          names.append(f"{path}:{ln}")
    else:
      with open(path, "rb") as f:
        docs.append(f.read())
      names.append(path)
  return Corpus(names, [len(d) for d in docs], lambda i: docs[i])


BYTES = ("", "bytes")


def load_tokenizer(spec: str):
  """The tokenizer a text source's `tokenizer` setting names (None: UTF-8 bytes).

  Args:
    spec: "" / "bytes"; a directory with tokenizer.json; a tokenizer.json file; a .gguf
      file or a directory holding one; or a named model from models.fetch.MODELS.
  """
  from models import fetch  # pylint: disable=import-outside-toplevel
  from models import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  if not isinstance(spec, str):
    raise ValueError(f"tokenizer={spec!r}; must be a string (path, model name or 'bytes')")
  if spec in BYTES:
    return None
  path = spec
  if not os.path.exists(path):
    if path in fetch.MODELS:
      path = fetch.ensure(path)
    else:
      raise ValueError(f"tokenizer={spec!r} is neither an existing path (a directory with "
                       "tokenizer.json, a tokenizer.json file, a .gguf file) nor a named "
                       f"model {sorted(fetch.MODELS)}, nor 'bytes'")
  tok = tok_lib.load(path)
  if isinstance(tok, tok_lib.ByteTokenizer):
    raise ValueError(f"tokenizer={spec!r}: no tokenizer.json or .gguf file there; use "
                     "'bytes' for byte-level text")
  if tok.eos_id is None:
    raise ValueError(f"tokenizer={spec!r} has no EOS token (needed between documents); set "
                     "eos_token_id in config.json / generation_config.json")
  return tok


class TextStream:
  """Fixed-length chunks of a corpus's token stream (docs joined by EOS), shuffled per epoch.

  Chunk c holds stream tokens [c * L, c * L + L); every target counts in the loss except
  the first token (nothing predicts it). Tokens are the docs' bytes, or with `tokenizer`
  its ids (every doc tokenised once, here).
  """

  def __init__(self, corpus: Corpus, length: int, shuffle: bool = True, tokenizer=None):
    if length < 2:
      raise ValueError(f"TextStream: length={length}; must be >= 2")
    self.corpus, self.length, self.shuffle = corpus, length, shuffle
    self.tokenizer = tokenizer
    self.eos = EOS if tokenizer is None else int(tokenizer.eos_id)
    self._tokens = None
    sizes = corpus.sizes
    if tokenizer is not None:
      self._tokens = []
      for i in range(len(corpus)):
        try:
          text = corpus.doc(i).decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"document {corpus.names[i]!r} is not UTF-8 text ({e}); a "
                           "tokenizer reads text") from None
        self._tokens.append(np.asarray(tokenizer.encode(text, add_bos=False), np.int32))
      sizes = np.asarray([len(t) for t in self._tokens], np.int64)
    self._ends = np.cumsum(sizes + 1)  # +1: the EOS after each doc
    total = int(self._ends[-1])
    self.num_chunks = total // length
    if self.num_chunks < 1:
      unit = "bytes" if tokenizer is None else "tokens"
      raise ValueError(f"TextStream: the corpus holds {total} {unit} (EOS included), fewer "
                       f"than one chunk of length {length}")
    self._perm_cache = {}

  def _chunk_id(self, seed, index):
    epoch, i = divmod(index, self.num_chunks)
    if not self.shuffle:
      return i
    key = (seed, epoch)
    if key not in self._perm_cache:
      self._perm_cache = {key: tasks_lib.example_rng(seed, epoch, 99).permutation(
          self.num_chunks)}
    return int(self._perm_cache[key][i])

  def _doc_tokens(self, d: int) -> np.ndarray:
    if self._tokens is not None:
      return self._tokens[d]
    return np.frombuffer(self.corpus.doc(d), np.uint8)

  def read(self, start: int, n: int) -> np.ndarray:
    """n tokens of the stream starting at token `start`."""
    out = np.empty(n, np.int32)
    filled = 0
    d = bisect.bisect_right(self._ends, start)
    pos = start - (int(self._ends[d - 1]) if d else 0)
    while filled < n:
      piece = self._doc_tokens(d)[pos:pos + n - filled]
      out[filled:filled + len(piece)] = piece
      filled += len(piece)
      if filled < n:  # doc exhausted: its EOS, then the next doc
        out[filled] = self.eos
        filled += 1
        d, pos = d + 1, 0
    return out

  def example(self, seed: int, index: int) -> Example:
    c = self._chunk_id(seed, index)
    toks = self.read(c * self.length, self.length)
    mask = np.ones(self.length, np.float32)
    mask[0] = 0.0
    empty = np.zeros(0, np.int32)
    return Example(toks, mask, empty, empty)


# --- sources from config ------------------------------------------------------------------
def make_source(name: str, spec: Mapping, length: int, split: str = "train"):
  """One source from its config entry (`kind` plus settings; `weight` is read by the mixer).

  kinds: the task names in `tasks.TASKS`, "stdlib" (settings: heldout_percent), "files"
  (settings: paths, jsonl_field). Text kinds also take `tokenizer` (see `load_tokenizer`;
  default bytes); tasks are byte-level and refuse it.
  """
  spec = dict(spec)
  spec.pop("weight", None)
  kind = spec.pop("kind", name)
  tok_spec = spec.pop("tokenizer", "")
  if kind not in ("stdlib", "files"):
    if tok_spec not in BYTES:
      raise ValueError(f"source {name!r}: kind {kind!r} is a byte-level task; tokenizer="
                       f"{tok_spec!r} applies only to text kinds ('stdlib', 'files')")
    return tasks_lib.make_task(kind, length, **spec)
  tok = _cached_tokenizer(tok_spec)
  if kind == "stdlib":
    return TextStream(stdlib_corpus(split, **spec), length, shuffle=split == "train",
                      tokenizer=tok)
  if kind == "files":
    paths = spec.pop("paths", "")
    eval_paths = spec.pop("eval_paths", "")
    if split == "validation":
      if not eval_paths:
        raise ValueError(f"source {name!r}: set eval_paths to evaluate on user files")
      paths = eval_paths
    if not paths:
      raise ValueError(f"source {name!r}: kind 'files' needs paths (comma-separated)")
    return TextStream(file_corpus(paths, **spec), length, shuffle=split == "train",
                      tokenizer=tok)


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(spec):
  return load_tokenizer(spec)


def is_task(source) -> bool:
  return not isinstance(source, TextStream)


# --- batching ----------------------------------------------------------------------------
def collate(examples: Sequence[Example]) -> dict:
  """Examples of length L -> {inputs, targets [B, T] int32, weights [B, T] float32}."""
  toks = np.stack([e.tokens for e in examples])
  mask = np.stack([e.loss_mask for e in examples])
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": mask[:, 1:]}


class Mixture:
  """Deterministic, checkpointable mixture of sources.

  Row r of the global stream comes from source `choose(r)` (a function of (seed, r) and the
  weights) and is that source's `count[source]`-th example. `state()` is
  {"index": rows consumed, "<name>": examples taken from that source}.
  """

  def __init__(self, sources: Mapping[str, object], weights: Mapping[str, float], seed: int):
    if not sources:
      raise ValueError("the data mixture has no sources")
    self.names = sorted(sources)
    w = np.array([float(weights[n]) for n in self.names])
    if np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"mixture weights {dict(zip(self.names, w))} must be >= 0 with a "
                       "positive sum")
    self._cdf = np.cumsum(w / w.sum())
    self.sources = dict(sources)
    self.seed = int(seed)
    self._state = {"index": 0, **{n: 0 for n in self.names}}

  def choose(self, row: int) -> int:
    if len(self.names) == 1:
      return 0
    u = tasks_lib.example_rng(self.seed, row, 7).random()
    return min(int(np.searchsorted(self._cdf, u, side="right")), len(self.names) - 1)

  def state(self) -> dict:
    return dict(self._state)

  def restore(self, state: Mapping[str, int]):
    want = {"index", *self.names}
    if set(state) != want:
      raise ValueError(f"data-iterator state has keys {sorted(state)}; this mixture expects "
                       f"{sorted(want)} (were the data sources changed?)")
    self._state = {k: int(v) for k, v in state.items()}

  def next_batch(self, batch_size: int, rows: Optional[Sequence[int]] = None) -> dict:
    """The next `batch_size` global rows; only `rows` of them (default all) are built.

    Every host walks all rows (to keep the per-source counters in step) but builds only
    its own, so the global batch does not depend on the number of hosts.
    """
    wanted = set(range(batch_size) if rows is None else rows)
    examples, src_ids = [], []
    for r in range(batch_size):
      i = self.choose(self._state["index"] + r)
      name = self.names[i]
      k = self._state[name]
      self._state[name] = k + 1
      if r in wanted:
        examples.append(self.sources[name].example(self.seed, k))
        src_ids.append(i)
    self._state["index"] += batch_size
    batch = collate(examples)
    batch["source"] = np.asarray(src_ids, np.int32)
    return batch


def eval_batches(source, num_examples: int, batch_size: int, seed: int):
  """Fixed evaluation batches: examples 0..num_examples-1 of `source` under `seed`."""
  out = []
  for s in range(0, num_examples, batch_size):
    n = min(batch_size, num_examples - s)
    out.append(collate([source.example(seed, s + j) for j in range(n)]))
  return out
