"""models.from_llama / models.decoder_io: a Llama's weights in Decoder families, the teacher's
per-layer taps against a float64 numpy Llama, save/load, and the errors."""

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx

from models import decoder as dec
from models import decoder_io
from models import from_llama
from models import hf
from models import hybrid
from models import linear_attention as la_lib
from models import local
from models import ssm
from models.config import ModelConfig
from models.transformer import Transformer

TEACHER = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=500.0)


@pytest.fixture(scope="module")
def teacher():
  return Transformer(TEACHER, rngs=nnx.Rngs(0))


def _tokens(b=2, t=10, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (b, t)), jnp.int32)


def numpy_llama_taps(model, tokens):
  """Float64 numpy Llama: per-layer attention input (normed residual) and output, and logits."""
  c = model.config
  p = {k: np.asarray(v, np.float64) for k, v in
       nnx.state(model, nnx.Param).to_pure_dict().items()}

  def rms(x, w):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.rms_norm_eps)

  b, t = tokens.shape
  d, hq, hkv = c.head_dim, c.num_heads, c.num_kv_heads
  inv = c.rope_theta ** (-np.arange(0, d, 2) / d)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(x):  # [B, H, T, D], HF rotate-half
    return x * cos + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * sin

  x = p["embed"][np.asarray(tokens)]
  hs, ys = [], []
  causal = np.tril(np.ones((t, t), bool))
  for l in range(c.num_layers):
    h = rms(x, p["attn_norm"][l])
    q = rope((h @ p["wq"][l]).reshape(b, t, hq, d).transpose(0, 2, 1, 3))
    k = rope((h @ p["wk"][l]).reshape(b, t, hkv, d).transpose(0, 2, 1, 3))
    v = (h @ p["wv"][l]).reshape(b, t, hkv, d).transpose(0, 2, 1, 3)
    k, v = np.repeat(k, hq // hkv, 1), np.repeat(v, hq // hkv, 1)
    s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, hq * d) @ p["wo"][l]
    hs.append(h)
    ys.append(y)
    x = x + y
    m = rms(x, p["mlp_norm"][l])
    g = m @ p["w_gate"][l]
    x = x + ((g / (1 + np.exp(-g))) * (m @ p["w_up"][l])) @ p["w_down"][l]
  logits = rms(x, p["final_norm"]) @ p["lm_head"]
  return np.stack(hs), np.stack(ys), logits


def test_teacher_decoder_taps_and_logits_match_numpy_llama(teacher):
  # Given the all-global Decoder holding the Llama's weights
  tdec, fresh = from_llama.decoder_from_transformer(teacher)
  assert fresh == []
  tok = _tokens()
  # When its forward reports per-layer taps
  pos = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
  logits, _, extras = dec.forward(tdec, tok, pos, None, taps=True)
  h, y = extras["taps"]
  # Then inputs, attention outputs and logits are a float64 numpy Llama's
  h_ref, y_ref, logits_ref = numpy_llama_taps(teacher, tok)
  np.testing.assert_allclose(h, h_ref, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(y, y_ref, atol=2e-6, rtol=1e-4)
  np.testing.assert_allclose(logits, logits_ref, atol=2e-5, rtol=1e-4)
  # and apply_mixers on the teacher's inputs gives back its outputs, layer by layer
  np.testing.assert_allclose(dec.apply_mixers(tdec, h, pos), y_ref, atol=2e-6, rtol=1e-4)


def test_gla_student_takes_q_o_and_group_repeated_kv(teacher):
  cfg = from_llama.student_config(la_lib.GLAConfig, TEACHER, chunk_size=4)
  assert (cfg.num_heads, cfg.key_dim, cfg.value_dim) == (4, 8, 8)
  student, fresh = from_llama.decoder_from_transformer(teacher, cfg)
  assert sorted(f.split("/")[-1] for f in fresh) == ["ba", "o_norm", "wa1", "wa2", "wg"]
  p = nnx.state(student, nnx.Param).to_pure_dict()["groups"][0][0]
  tp = nnx.state(teacher, nnx.Param).to_pure_dict()
  wk = np.asarray(tp["wk"]).reshape(3, 32, 2, 8)          # [L, H, Hkv, D]
  for head in range(4):  # query head h reads kv head h // 2 (GQA groups of 2)
    np.testing.assert_array_equal(
        np.asarray(p["mixer"]["wk"]).reshape(3, 32, 4, 8)[:, :, head], wk[:, :, head // 2])
  np.testing.assert_array_equal(p["mixer"]["wq"], tp["wq"])
  np.testing.assert_array_equal(p["w_down"], tp["w_down"])
  np.testing.assert_array_equal(p["mixer_norm"], tp["attn_norm"])


def test_hybrid_student_layers_come_from_their_depth(teacher):
  # (gla, gla, local attention): the attention slot is layer 2 of the teacher
  cfg = from_llama.student_config(hybrid.HybridConfig, TEACHER, recurrent="gla", window=4)
  student, _ = from_llama.decoder_from_transformer(teacher, cfg)
  p = nnx.state(student, nnx.Param).to_pure_dict()["groups"][0]
  tp = nnx.state(teacher, nnx.Param).to_pure_dict()
  np.testing.assert_array_equal(p[2]["mixer"]["wk"][0], tp["wk"][2])
  np.testing.assert_array_equal(p[1]["w_up"][0], tp["w_up"][1])


def test_decoder_save_load_round_trip(teacher, tmp_path):
  cfg = from_llama.student_config(local.DilatedConfig, TEACHER, window=3)
  model, _ = from_llama.decoder_from_transformer(teacher, cfg)
  decoder_io.save(model, str(tmp_path / "m"))
  back = decoder_io.load(str(tmp_path / "m"))
  assert back.config == cfg  # tuple fields (local_kinds) survive JSON
  tok = _tokens()
  np.testing.assert_array_equal(back(tok), model(tok))
  assert isinstance(decoder_io.load_any(str(tmp_path / "m")), dec.Decoder)


def test_corrupt_decoder_dir_is_named(teacher, tmp_path):
  cfg = from_llama.student_config(local.SlidingConfig, TEACHER)
  model, _ = from_llama.decoder_from_transformer(teacher, cfg)
  path = str(tmp_path / "m")
  decoder_io.save(model, path)
  tensors = hf.read_safetensors(f"{path}/model.safetensors")
  tensors.pop("embed")
  hf.write_safetensors(f"{path}/model.safetensors", {k: np.asarray(v) for k, v in
                                                      tensors.items()})
  with pytest.raises(ValueError, match=r"missing tensors \['embed'\]"):
    decoder_io.load(path)


@pytest.mark.parametrize("make, match", [
    (lambda: from_llama.student_config(la_lib.GLAConfig, TEACHER, hidden_size=48,
                                       num_heads=4),
     "hidden_size: student 48, teacher 32"),
    (lambda: from_llama.student_config(la_lib.GLAConfig, TEACHER, key_dim=16),
     "key_dim: student 16, teacher 8"),
    (lambda: from_llama.student_config(ssm.Mamba2Config, TEACHER, head_dim=16),
     "cannot be converted from attention; convertible mixers"),
    (lambda: from_llama.student_config(la_lib.GLAConfig, TEACHER, windw=4),
     r"student overrides \['windw'\] are not GLAConfig fields"),
    (lambda: from_llama.teacher_decoder_config(TEACHER.replace(attention_bias=True)),
     "attention_bias=True"),
    (lambda: from_llama.teacher_decoder_config(TEACHER.replace(sliding_window=4)),
     "full attention in every layer"),
    (lambda: from_llama.check_teacher(la_lib.GLAConfig()),
     "teacher must be a Llama-family"),
])
def test_inconsistent_student_or_foreign_teacher_is_named(make, match):
  with pytest.raises(ValueError, match=match):
    make()
