"""DuoAttention gate learning: the gated forward against numpy and the model itself."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import presets
from models import tokenizer as tok_lib
from models.transformer import Transformer
from train import duo_gates


def _np_attention(q, k, v, mask, scale):
  b, hq, t, d = q.shape
  g = hq // k.shape[1]
  k = np.repeat(k, g, axis=1)
  v = np.repeat(v, g, axis=1)
  s = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bhkd->bhqd", p, v)


def test_gated_attention_mixes_full_and_streaming_per_kv_head():
  rng = np.random.default_rng(0)
  b, hq, hkv, t, d = 2, 4, 2, 11, 8
  q, k, v = (rng.standard_normal(s).astype(np.float32)
             for s in [(b, hq, t, d), (b, hkv, t, d), (b, hkv, t, d)])
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  full = _np_attention(q, k, v, j <= i, 0.3)
  stream = _np_attention(q, k, v, (j <= i) & ((j < 2) | (i - j < 3)), 0.3)
  alpha = np.array([1.0, 0.25], np.float32)
  got = np.asarray(duo_gates.gated_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                             jnp.asarray(alpha), n_sink=2, recent=3, scale=0.3))
  a = np.repeat(alpha, hq // hkv)[None, :, None, None]
  np.testing.assert_allclose(got, a * full + (1 - a) * stream, rtol=1e-5, atol=1e-5)


def test_all_gates_open_reproduce_the_model():
  model = Transformer(presets.PRESETS["tiny"], rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 40)), jnp.int32)
  gc = duo_gates.GateConfig(n_sink=2, recent=4, length=40, n_tail=4)
  alphas = jnp.ones((model.config.num_layers, model.config.num_kv_heads))
  h = duo_gates.hidden_states(model, tokens, alphas, gc)
  w = model.embed.value.T if model.config.tie_word_embeddings else model.lm_head.value
  logits = np.asarray(jnp.einsum("bth,hv->btv", h, w))
  np.testing.assert_allclose(logits, np.asarray(model(tokens)), rtol=2e-4, atol=2e-4)
  # closed gates differ once the context is longer than n_sink + recent
  h0 = duo_gates.hidden_states(model, tokens, jnp.zeros_like(alphas), gc)
  assert float(jnp.abs(h0 - h)[:, -1].max()) > 1e-4


def test_training_moves_only_the_gates_and_respects_the_range(tmp_path):
  model = Transformer(presets.PRESETS["tiny"], rngs=nnx.Rngs(0))
  before = {k: np.asarray(v) for k, v in model.layer_params().items()}
  gc = duo_gates.GateConfig(n_sink=2, recent=8, length=160, batch=2, steps=6, lr=0.05,
                            lam=0.5, n_tail=8)
  gates, hist = duo_gates.train_gates(model, tok_lib.ByteTokenizer(), gc)
  assert gates.shape == (2, 2) and (gates >= 0).all() and (gates <= 1).all()
  assert gates.mean() < 1.0          # the L1 term closes gates that cost little
  assert all(np.isfinite(h["loss"]) for h in hist) and len(hist) == 6
  for k, v in model.layer_params().items():
    np.testing.assert_array_equal(np.asarray(v), before[k])
  path = str(tmp_path / "g.json")
  duo_gates.save_gates(path, gates, gc, "tiny", hist)
  np.testing.assert_array_equal(duo_gates.load_gates(path, 2, 2), gates)
  with pytest.raises(ValueError, match="layers, kv heads"):
    duo_gates.load_gates(path, 3, 2)


def test_bad_gate_files_and_configs(tmp_path):
  p = tmp_path / "g.json"
  p.write_text(json.dumps({"gates": [[0.5, 2.0]]}))
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    duo_gates.load_gates(str(p))
  p.write_text("{not json")
  with pytest.raises(ValueError, match="not JSON"):
    duo_gates.load_gates(str(p))
  with pytest.raises(ValueError, match="n_sink \\+ recent"):
    duo_gates.GateConfig(n_sink=100, recent=300, length=384)
  with pytest.raises(ValueError, match="lr"):
    duo_gates.GateConfig(lr=float("nan"))


def test_passkey_batch_ends_with_the_answer():
  tok = tok_lib.ByteTokenizer()
  gc = duo_gates.GateConfig(length=200, batch=3)
  x = duo_gates.passkey_batch(tok, gc, 0)
  assert x.shape == (3, 200)
  for row in x:
    text = tok.decode(row.tolist())
    key = text.rsplit("The pass key is ", 1)[1][:5]
    assert text.endswith(f"The pass key is {key}.") and f"The pass key is {key}. Remember" in text
