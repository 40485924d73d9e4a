"""GGUF loading (llama.cpp's model file format): config, dequantized weights, tokenizer.

    model = models.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", dtype="bfloat16")
    tok = models.gguf.load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

A GGUF file (spec: ggml's docs/gguf.md) is a little-endian header -- magic "GGUF", version,
tensor count, metadata count -- then typed key/value metadata, then one info record per tensor
(name, ggml dims, quantization type, offset), then the aligned tensor data. We parse the header
ourselves so that every count, length and offset is checked against the file's real size
before anything is allocated (a crafted count cannot make us loop or allocate past what the
file holds), and memory-map the data. Quantized blocks are decoded by the `gguf` package
(`gguf.quants.dequantize`, numpy), so every type it can dequantize loads (F32, F16, BF16,
Q4_0 ... Q8_0, the K-quants, the IQ types, TQ1_0/TQ2_0, MXFP4); F64 is read directly.

Metadata -> `ModelConfig` for the `llama` (incl. Mistral-style files: llama layout with
`llama.attention.sliding_window`) and `qwen2` architectures; tensors are renamed to HF names
and handed to `models.hf.from_tensors`, so both loaders share one assignment path.
llama.cpp's converter permutes the rows of attn_q / attn_k (weights and biases) of llama-arch
models from HF's "rotate_half" RoPE layout to ggml's interleaved one; `unpermute_rows` undoes
it. qwen2 files are stored unpermuted. A Llama 3.x `rope_freqs` tensor is matched against
transformers' "llama3" RoPE scaling.

The tokenizer (`tokenizer.ggml.*`: gpt2-style byte-level BPE tokens, merges, token types,
special ids, add_bos flag, chat template) becomes a `tokenizers.Tokenizer` wrapped by
`models.tokenizer.HFTokenizer` (see `models.tokenizer.from_gguf_metadata`).

Files are data: nothing a file names is imported or called; a chat template is rendered by a
sandboxed Jinja environment (or the ChatML fallback) in `models.tokenizer`.

One file on purpose (about 640 lines): the bounded GGUF reader and its per-architecture
metadata and tensor mapping are one untrusted-file boundary.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from models.config import DTYPES, ModelConfig

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
SUPPORTED_ARCHS = ("llama", "qwen2")
MAX_DIMS = 4                      # GGML_MAX_DIMS
MAX_STRING_BYTES = 64 << 20       # one metadata string (an embedded tokenizer.json fits)
MAX_ARRAY_DEPTH = 4
MAX_ALIGNMENT = 1 << 16

# GGUF metadata value types (gguf.GGUFValueType) -> (struct code, byte size)
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
            6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
               10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
_FLOAT_TYPES = (6, 12)


class GGUFError(ValueError):
  """A GGUF file is malformed, truncated or unsupported (names the file and the field)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor record of a GGUF file.

  Attributes:
    name: the tensor's GGUF name (e.g. "blk.0.attn_q.weight").
    shape: numpy (row-major) shape, i.e. ggml's dims reversed ([out, in] for a weight).
    qtype: `gguf.GGMLQuantizationType`.
    offset: absolute byte offset of the data in the file.
    nbytes: bytes of data (blocks included).
  """

  name: str
  shape: tuple
  qtype: Any
  offset: int
  nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  """Parsed header of a GGUF file (metadata + tensor records; data stays on disk)."""

  path: str
  version: int
  metadata: dict
  tensors: dict            # name -> TensorInfo, in file order
  size: int

  @property
  def architecture(self) -> str:
    return _get(self, "general.architecture", str)


# --- header parsing ----------------------------------------------------------------------
class _Cursor:
  """Bounded little-endian reader over a memory-mapped file."""

  def __init__(self, buf: np.ndarray, path: str):
    self.buf, self.path, self.pos, self.size = buf, path, 0, buf.shape[0]

  def need(self, n: int, what: str):
    if n < 0 or self.pos + n > self.size:
      raise GGUFError(f"GGUF file {self.path!r} is truncated: {what} needs {n} bytes at offset "
                      f"{self.pos}, file has {self.size} bytes")

  def scalar(self, vtype: int, what: str):
    code, n = _SCALARS[vtype]
    self.need(n, what)
    (val,) = struct.unpack_from("<" + code, self.buf, self.pos)
    self.pos += n
    if vtype == 6 and math.isfinite(val):
      # float32 metadata (eps, rope base): the shortest decimal that is this float32, so
      # 1e-5 reads back as 1e-5 rather than 9.999999747378752e-06.
      val = float(np.format_float_positional(np.float32(val), unique=True, trim="0"))
    return val

  def string(self, what: str) -> str:
    n = self.scalar(10, f"length of {what}")
    if n > MAX_STRING_BYTES:
      raise GGUFError(f"GGUF file {self.path!r}: {what} claims {n} bytes "
                      f"(limit {MAX_STRING_BYTES})")
    self.need(n, what)
    raw = bytes(self.buf[self.pos:self.pos + n])
    self.pos += n
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise GGUFError(f"GGUF file {self.path!r}: {what} is not valid UTF-8 ({e})") from None

  def value(self, vtype: int, what: str, depth: int = 0):
    if vtype in _SCALARS:
      return self.scalar(vtype, what)
    if vtype == _STRING:
      return self.string(what)
    if vtype != _ARRAY:
      raise GGUFError(f"GGUF file {self.path!r}: {what} has unknown value type {vtype}; "
                      f"allowed: 0..12")
    if depth >= MAX_ARRAY_DEPTH:
      raise GGUFError(f"GGUF file {self.path!r}: {what} nests arrays deeper than "
                      f"{MAX_ARRAY_DEPTH}")
    etype = self.scalar(4, f"element type of {what}")
    count = self.scalar(10, f"element count of {what}")
    # Every element takes at least this many bytes, so the count is bounded by the file.
    min_size = _SCALARS[etype][1] if etype in _SCALARS else (8 if etype == _STRING else 12)
    if etype not in _SCALARS and etype not in (_STRING, _ARRAY):
      raise GGUFError(f"GGUF file {self.path!r}: {what} has unknown element type {etype}; "
                      f"allowed: 0..12")
    if count * min_size > self.size - self.pos:
      raise GGUFError(f"GGUF file {self.path!r} is truncated or corrupt: element count of "
                      f"{what} is {count} ({count * min_size}+ bytes), "
                      f"{self.size - self.pos} bytes left")
    if etype in _SCALARS:
      arr = np.frombuffer(self.buf, _NP_SCALARS[etype], count, self.pos).copy()
      self.pos += count * min_size
      return arr
    return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]


def read_header(path: str) -> GGUFFile:
  """Parses a GGUF file's metadata and tensor records, checking them against its size.

  Args:
    path: a .gguf file.

  Returns:
    GGUFFile (tensor data is read later, by `read_tensor`).

  Raises:
    FileNotFoundError: no such file.
    GGUFError (a ValueError): not GGUF, an unsupported version or big-endian file, a
      truncated file, a count / length / offset that does not fit the file, an unknown
      quantization type, overlapping or misaligned tensor data. The message names the file
      and the field.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist")
  size = os.path.getsize(path)
  if size < 24:
    raise GGUFError(f"{path!r} is not a GGUF file: {size} bytes, a GGUF header needs 24")
  buf = np.memmap(path, dtype=np.uint8, mode="r")
  cur = _Cursor(buf, path)
  magic = bytes(buf[:4])
  if magic != GGUF_MAGIC:
    raise GGUFError(f"{path!r} is not a GGUF file: magic {magic!r}, expected {GGUF_MAGIC!r}")
  cur.pos = 4
  version = cur.scalar(4, "version")
  if version not in SUPPORTED_VERSIONS:
    if struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
      raise GGUFError(f"GGUF file {path!r} is big-endian; only little-endian files are "
                      "supported")
    raise GGUFError(f"GGUF file {path!r} has version {version}; supported: "
                    f"{SUPPORTED_VERSIONS}")
  n_tensors = cur.scalar(10, "tensor_count")
  n_kv = cur.scalar(10, "kv_count")
  # A metadata pair takes >= 13 bytes (key length, value type, one byte), a tensor record
  # >= 28 (name length, n_dims, one dim, type, offset): bound both by the file size.
  for field, count, least in (("kv_count", n_kv, 13), ("tensor_count", n_tensors, 28)):
    if count * least > size - cur.pos:
      raise GGUFError(f"GGUF file {path!r} is truncated or corrupt: {field}={count} needs "
                      f"at least {count * least} bytes, {size - cur.pos} left")
  metadata = {}
  for i in range(n_kv):
    key = cur.string(f"metadata key #{i}")
    vtype = cur.scalar(4, f"value type of {key!r}")
    if key in metadata:
      raise GGUFError(f"GGUF file {path!r}: metadata key {key!r} appears twice")
    metadata[key] = cur.value(vtype, f"metadata {key!r}")
  infos = []
  for i in range(n_tensors):
    name = cur.string(f"name of tensor #{i}")
    n_dims = cur.scalar(4, f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
      raise GGUFError(f"GGUF file {path!r}: tensor {name!r} has n_dims={n_dims}; "
                      f"allowed: 1..{MAX_DIMS}")
    dims = [cur.scalar(10, f"dims of tensor {name!r}") for _ in range(n_dims)]
    qtype = cur.scalar(4, f"type of tensor {name!r}")
    offset = cur.scalar(10, f"offset of tensor {name!r}")
    infos.append((name, dims, qtype, offset))
  alignment = metadata.get("general.alignment", 32)
  if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1
      or alignment > MAX_ALIGNMENT or alignment & (alignment - 1)):
    raise GGUFError(f"GGUF file {path!r}: general.alignment={alignment!r}; must be a power "
                    f"of two <= {MAX_ALIGNMENT}")
  data_start = -(-cur.pos // alignment) * alignment
  tensors = {}
  for name, dims, qtype, offset in infos:
    tensors[name] = _tensor_info(path, size, data_start, alignment, name, dims, qtype,
                                 offset, tensors)
  spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
  for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
    if start < end:
      raise GGUFError(f"GGUF file {path!r}: data of tensors {a!r} and {b!r} overlap")
  return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, size=size)


def _tensor_info(path, size, data_start, alignment, name, dims, qtype, offset, seen):
  import gguf  # pylint: disable=import-outside-toplevel
  if name in seen:
    raise GGUFError(f"GGUF file {path!r}: tensor {name!r} appears twice")
  try:
    qt = gguf.GGMLQuantizationType(qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
  except (ValueError, KeyError):
    raise GGUFError(f"GGUF file {path!r}: tensor {name!r} has unknown type {qtype}; "
                    f"known: {[t.name for t in gguf.GGMLQuantizationType]}") from None
  if any(d < 1 for d in dims) or math.prod(dims) > size * 64:
    raise GGUFError(f"GGUF file {path!r}: tensor {name!r} has dims {dims}; each must be "
                    ">= 1 and the element count must fit the file")
  if dims[0] % block:
    raise GGUFError(f"GGUF file {path!r}: tensor {name!r} ({qt.name}) has a row of "
                    f"{dims[0]} elements, not a multiple of its block size {block}")
  nbytes = math.prod(dims[1:]) * (dims[0] // block) * type_size
  if offset % alignment:
    raise GGUFError(f"GGUF file {path!r}: tensor {name!r} offset {offset} is not a multiple "
                    f"of general.alignment={alignment}")
  start = data_start + offset
  if start + nbytes > size:
    raise GGUFError(f"GGUF file {path!r} is truncated: tensor {name!r} needs bytes "
                    f"[{start}, {start + nbytes}), file has {size}")
  return TensorInfo(name=name, shape=tuple(reversed(dims)), qtype=qt, offset=start,
                    nbytes=nbytes)


def read_tensor(f: GGUFFile, name: str) -> np.ndarray:
  """Dequantizes one tensor to float32 (numpy shape = ggml dims reversed).

  Raises:
    GGUFError: unknown tensor, a type that cannot be dequantized, or non-finite values.
  """
  import gguf  # pylint: disable=import-outside-toplevel
  if name not in f.tensors:
    raise GGUFError(f"GGUF file {f.path!r} has no tensor {name!r}")
  t = f.tensors[name]
  raw = np.memmap(f.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
  rows = math.prod(t.shape[:-1])
  raw = raw.reshape(rows, t.nbytes // rows)
  if t.qtype == gguf.GGMLQuantizationType.F64:
    out = raw.view("<f8").astype(np.float32)
  else:
    try:
      out = gguf.quants.dequantize(raw, t.qtype)
    except NotImplementedError:
      raise GGUFError(f"GGUF file {f.path!r}: tensor {name!r} has type {t.qtype.name}, which "
                      "cannot be dequantized to float weights") from None
    out = np.array(out, dtype=np.float32)  # copies off the memory map
  out = out.reshape(t.shape)
  if not np.isfinite(out).all():
    raise GGUFError(f"GGUF file {f.path!r}: tensor {name!r} has non-finite values")
  return out


# --- metadata -> ModelConfig -------------------------------------------------------------
_REQUIRED = object()


def _get(f: GGUFFile, key: str, kind, default=_REQUIRED):
  """Typed metadata lookup; errors name the file and the key."""
  if key not in f.metadata:
    if default is _REQUIRED:
      raise GGUFError(f"GGUF file {f.path!r} lacks metadata {key!r}")
    return default
  v = f.metadata[key]
  if kind is int:
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.size and v.dtype.kind in "iu":
      if (v != v[0]).any():  # per-layer values (e.g. head counts) that differ
        raise GGUFError(f"GGUF file {f.path!r}: metadata {key!r} differs across layers "
                        f"({sorted(set(v.tolist()))}); only uniform layers are supported")
      v = int(v[0])
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise GGUFError(f"GGUF file {f.path!r}: metadata {key!r}={v!r}; must be an integer >= 0")
    return v
  if kind is float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise GGUFError(f"GGUF file {f.path!r}: metadata {key!r}={v!r}; must be a finite number")
    return float(v)
  if kind is bool:
    if not isinstance(v, bool):
      raise GGUFError(f"GGUF file {f.path!r}: metadata {key!r}={v!r}; must be a bool")
    return v
  if kind is str:
    if not isinstance(v, str):
      raise GGUFError(f"GGUF file {f.path!r}: metadata {key!r}={v!r}; must be a string")
    return v
  if kind is list:
    if not isinstance(v, (list, np.ndarray)):
      raise GGUFError(f"GGUF file {f.path!r}: metadata {key!r} must be an array")
    return v
  raise TypeError(kind)


def _positive(f, key, default=_REQUIRED):
  v = _get(f, key, int, default)
  if v is not None and v < 1:
    raise GGUFError(f"GGUF file {f.path!r}: metadata {key!r}={v}; must be >= 1")
  return v


def config_from_gguf(f: GGUFFile, dtype=None) -> ModelConfig:
  """ModelConfig from GGUF metadata (llama / Mistral-style llama / qwen2).

  Args:
    f: parsed header (`read_header`).
    dtype: parameter dtype (string, numpy or jnp dtype); default float32.
  """
  arch = f.architecture
  if arch not in SUPPORTED_ARCHS:
    raise GGUFError(f"GGUF file {f.path!r}: general.architecture={arch!r} is not supported; "
                    f"supported: {SUPPORTED_ARCHS}")
  a = arch
  n_layers = _positive(f, f"{a}.block_count")
  hidden = _positive(f, f"{a}.embedding_length")
  n_heads = _positive(f, f"{a}.attention.head_count")
  n_kv = _positive(f, f"{a}.attention.head_count_kv", n_heads)
  head_dim = _positive(f, f"{a}.attention.key_length", None)
  if head_dim is None:
    if hidden % n_heads:
      raise GGUFError(f"GGUF file {f.path!r}: {a}.embedding_length={hidden} is not a multiple "
                      f"of {a}.attention.head_count={n_heads} and "
                      f"{a}.attention.key_length is absent")
    head_dim = hidden // n_heads
  v_dim = _positive(f, f"{a}.attention.value_length", head_dim)
  if v_dim != head_dim:
    raise GGUFError(f"GGUF file {f.path!r}: {a}.attention.value_length={v_dim} differs from "
                    f"key_length={head_dim}; only equal head dims are supported")
  rot = _positive(f, f"{a}.rope.dimension_count", head_dim)
  if rot > head_dim:
    raise GGUFError(f"GGUF file {f.path!r}: {a}.rope.dimension_count={rot} exceeds the head "
                    f"dim {head_dim}")
  embed = f.tensors.get("token_embd.weight")
  if embed is None:
    raise GGUFError(f"GGUF file {f.path!r} has no tensor 'token_embd.weight'")
  vocab = _positive(f, f"{a}.vocab_size", None)
  if vocab is None:
    tokens = f.metadata.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, list) and tokens else embed.shape[0]
  rope_scaling = _rope_scaling(f, a, head_dim, rot)
  first = lambda s: f"blk.0.{s}" in f.tensors  # noqa: E731
  sliding = _positive(f, f"{a}.attention.sliding_window", None)
  if arch == "qwen2":
    architecture = "Qwen2ForCausalLM"
  else:
    architecture = "MistralForCausalLM" if sliding is not None else "LlamaForCausalLM"
  special = lambda k: _get(f, f"tokenizer.ggml.{k}", int, None)  # noqa: E731
  return ModelConfig(
      vocab_size=vocab, hidden_size=hidden,
      intermediate_size=_positive(f, f"{a}.feed_forward_length"), num_layers=n_layers,
      num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
      rms_norm_eps=_get(f, f"{a}.attention.layer_norm_rms_epsilon", float),
      rope_theta=_get(f, f"{a}.rope.freq_base", float, 10000.0),
      rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
      partial_rotary_factor=rot / head_dim,
      max_position_embeddings=_positive(f, f"{a}.context_length"),
      tie_word_embeddings="output.weight" not in f.tensors,
      attention_bias=arch == "qwen2" or first("attn_q.bias"),
      o_bias=arch != "qwen2" and first("attn_output.bias"),
      mlp_bias=first("ffn_gate.bias"),
      sliding_window=sliding, architecture=architecture, dtype=dtype_name(dtype) or "float32",
      bos_token_id=special("bos_token_id"), eos_token_id=special("eos_token_id"),
      pad_token_id=special("padding_token_id"))


def _rope_scaling(f: GGUFFile, a: str, head_dim: int, rot: int) -> Optional[dict]:
  kind = _get(f, f"{a}.rope.scaling.type", str, "none")
  factor = _get(f, f"{a}.rope.scaling.factor", float, None)
  if kind == "linear" or (kind == "none" and f"{a}.rope.scale_linear" in f.metadata):
    factor = factor if kind == "linear" else _get(f, f"{a}.rope.scale_linear", float)
    if factor is None or factor <= 0:
      raise GGUFError(f"GGUF file {f.path!r}: linear RoPE scaling needs "
                      f"{a}.rope.scaling.factor > 0, got {factor!r}")
    scaling = {"rope_type": "linear", "factor": factor}
  elif kind == "none":
    scaling = None
  else:
    raise GGUFError(f"GGUF file {f.path!r}: {a}.rope.scaling.type={kind!r} is not supported; "
                    "allowed: 'none', 'linear' (and Llama 3 'rope_freqs')")
  if "rope_freqs.weight" in f.tensors:
    if scaling is not None:
      raise GGUFError(f"GGUF file {f.path!r}: both {a}.rope.scaling.type={kind!r} and a "
                      "rope_freqs tensor; expected one")
    scaling = _llama3_from_freqs(f, a, head_dim, rot)
  return scaling


def _llama3_from_freqs(f: GGUFFile, a: str, head_dim: int, rot: int) -> dict:
  """Matches a `rope_freqs` tensor (per-frequency divisors) to HF's "llama3" scaling.

  llama.cpp divides each RoPE frequency by rope_freqs[i]; transformers' "llama3" rope type
  computes the same divisors from (factor, low_freq_factor, high_freq_factor,
  original_max_position_embeddings). The factor is the largest divisor; the rest is found
  from the divisors between the two regimes (or among common values when too few lie
  there), and every divisor is checked against the result.
  """
  t = f.tensors["rope_freqs.weight"]
  if t.shape != (rot // 2,):
    raise GGUFError(f"GGUF file {f.path!r}: rope_freqs has shape {t.shape}; expected "
                    f"({rot // 2},)")
  divisors = read_tensor(f, "rope_freqs.weight").astype(np.float64)
  theta = _get(f, f"{a}.rope.freq_base", float, 10000.0)
  wl = 2 * np.pi * theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot)  # wavelengths
  factor = float(divisors.max())
  candidates = []
  if factor > 1:
    # Between the two regimes, smooth = orig / wl / (high - low) - low / (high - low) is
    # linear in 1 / wl: fit it, then read (orig, high) off with low = 1 (or 2).
    smooth = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    mid = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    if mid.sum() >= 2:
      slope, icpt = np.polyfit(1 / wl[mid], smooth[mid], 1)
      for low in (1.0, 2.0, 0.5):
        if icpt < 0:
          span = -low / icpt
          candidates.append((round(slope * span), low, low + span))
  candidates += [(orig, low, high) for orig in (2 ** k for k in range(6, 21))
                 for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0))]
  for orig, low, high in candidates:
    smooth = np.clip((orig / wl - low) / (high - low), 0.0, 1.0)
    want = 1.0 / ((1 - smooth) / factor + smooth)
    if orig >= 1 and np.allclose(want, divisors, rtol=1e-4, atol=1e-5):
      return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
              "high_freq_factor": float(np.round(high, 4)),
              "original_max_position_embeddings": int(orig)}
  raise GGUFError(f"GGUF file {f.path!r}: the rope_freqs tensor matches no Llama 3 RoPE "
                  "scaling (factor, low/high freq factors, original context); not supported")


# --- tensors -----------------------------------------------------------------------------
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
}
_BLOCK_RE = re.compile(r"blk\.(\d{1,6})\.(.+)")
# Tensors that carry no parameters of ours (rope_freqs becomes the RoPE config).
_SKIP = ("rope_freqs.weight",)
_SKIP_BLOCK = ("attn_rot_embd",)


def hf_name(name: str, n_layers: int) -> str:
  """GGUF tensor name -> HF name (unknown names are returned as they are)."""
  if name in _TOP_NAMES:
    return _TOP_NAMES[name]
  m = _BLOCK_RE.fullmatch(name)
  if m and int(m.group(1)) < n_layers and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}"
  return name


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's RoPE row permutation of a q/k projection (weight or bias).

  llama.cpp's convert_hf_to_gguf.py stores HF's q_proj / k_proj as
  `w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)`
  (the two rotate_half halves of each head interleaved pairwise); this is its inverse.

  Args:
    w: [n_heads * head_dim, ...] rows as stored in the GGUF file.
    n_heads: heads of that projection (kv heads for k).
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(f"cannot unpermute {rows} rows over n_heads={n_heads}: rows must be a "
                     "multiple of 2 * n_heads")
  return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


class _LazyTensors(Mapping):
  """HF name -> dequantized tensor, decoded on access (one stacked param at a time)."""

  def __init__(self, f: GGUFFile, config: ModelConfig, permuted: bool):
    self.f, self.config, self.permuted = f, config, permuted
    self.names = {}
    for name in f.tensors:
      m = _BLOCK_RE.fullmatch(name)
      if name in _SKIP or (m and m.group(2).split(".")[0] in _SKIP_BLOCK):
        continue
      self.names[hf_name(name, config.num_layers)] = name

  def __getitem__(self, key: str) -> np.ndarray:
    w = read_tensor(self.f, self.names[key])
    if self.permuted and (".q_proj." in key or ".k_proj." in key):
      heads = self.config.num_heads if ".q_proj." in key else self.config.num_kv_heads
      w = unpermute_rows(w, heads)
    return w

  def __iter__(self) -> Iterator[str]:
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)

  def shape(self, key: str) -> tuple:
    return self.f.tensors[self.names[key]].shape


def _check_shapes(tensors: _LazyTensors, config: ModelConfig, path: str):
  """Compares every tensor record's shape with the config before anything is decoded."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from models import hf  # pylint: disable=import-outside-toplevel
  from models.transformer import Transformer  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  for ours, (names, tr) in hf._expected_names(model).items():  # pylint: disable=protected-access
    shape = tuple(getattr(model, ours).value.shape)
    if ours in Transformer.LAYER_PARAMS:
      shape = shape[1:]
    want = tuple(reversed(shape)) if tr else shape
    for n in names:
      if n in tensors and tensors.shape(n) != want:
        raise GGUFError(f"GGUF file {path!r}: tensor {tensors.names[n]!r} has shape "
                        f"{tensors.shape(n)}; the metadata implies {want}")


# --- public API --------------------------------------------------------------------------
def dtype_name(dtype) -> Optional[str]:
  """"float32" | "bfloat16" | "float16" (or None) from a string, numpy or jnp dtype."""
  if dtype is None:
    return None
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; allowed: {DTYPES} (as strings, numpy or jnp dtypes)")
  return name


def find_gguf(path: str) -> str:
  """The .gguf file at `path` (a file, or a directory holding exactly one)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    found = sorted(n for n in os.listdir(path) if n.endswith(".gguf"))
    if len(found) != 1:
      raise FileNotFoundError(f"directory {path!r} holds {len(found)} .gguf files "
                              f"({found[:8]}); expected exactly one")
    return os.path.join(path, found[0])
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist")
  return path


def is_gguf_path(path) -> bool:
  """True for "*.gguf", or a directory with a .gguf file and no config.json."""
  path = os.fspath(path)
  if path.endswith(".gguf"):
    return True
  return (os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))
          and any(n.endswith(".gguf") for n in os.listdir(path)))


def load_config(path: str, dtype=None) -> ModelConfig:
  """ModelConfig of a GGUF file (or a directory holding one)."""
  return config_from_gguf(read_header(find_gguf(path)), dtype)


def from_pretrained(path: str, dtype=None):
  """Loads a GGUF file into a `models.Transformer`.

  Args:
    path: a .gguf file, or a directory holding exactly one.
    dtype: parameter dtype ("float32" | "bfloat16" | "float16", numpy or jnp dtype);
      default float32. Quantized weights are decoded to float32, then cast.

  Returns:
    Transformer with the file's weights.
  """
  from models import hf  # pylint: disable=import-outside-toplevel
  fp = find_gguf(path)
  f = read_header(fp)
  config = config_from_gguf(f, dtype)
  tensors = _LazyTensors(f, config, permuted=f.architecture == "llama")
  _check_shapes(tensors, config, fp)
  return hf.from_tensors(config, tensors, fp)


def load_tokenizer(path: str):
  """The tokenizer stored in a GGUF file's metadata (`models.tokenizer.HFTokenizer`)."""
  from models import tokenizer  # pylint: disable=import-outside-toplevel
  f = read_header(find_gguf(path))
  return tokenizer.from_gguf_metadata(f.metadata, source=f.path)
