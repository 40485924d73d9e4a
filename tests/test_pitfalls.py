"""Pitfall regression suite: one test per known way KV compression goes silently wrong.

Every test checks against a reference that does not go through the code under test's own
shortcut: a no-cache forward of the full sequence (sliding-window models never look further
back than W tokens, so a cache pressed to its last W tokens must reproduce it exactly),
attention probabilities recomputed by hand from the observed queries and cached keys, the
same prompt without padding, the exact dense cache, and transformers' logits (fixture).

Tiny models only (2 layers, hidden <= 64, prompts <= 48 tokens): the file runs in well
under a minute on CPU.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import mixed
from kvjax import presses as P
from kvjax import quant
from tests.kvjax.presses import helpers

W = 4
MISTRAL = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=W,
                             architecture="MistralForCausalLM")
MISTRAL_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "mistral_sliding")


def _toks(b, t, seed=1, lo=0):
  return jax.random.randint(jax.random.key(seed), (b, t), lo, 64, dtype=jnp.int32)


def _nbytes(model_cache) -> int:
  return sum(int(x.nbytes) for c in model_cache.layers() for x in jax.tree.leaves(c))


def _valid_positions(layer):
  """[B][Hkv] sorted lists of the positions a layer cache holds (any cache kind)."""
  dense = layer.to_dense() if hasattr(layer, "to_dense") else layer
  return [[sorted(h) for h in row] for row in helpers.kept_positions(dense)]


@pytest.fixture(scope="module")
def window_model():
  return models.Transformer(MISTRAL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def gqa_model():
  return helpers.tiny_model()


# -- 1 ---------------------------------------------------------------------------------------
def test_next_position_after_eviction_is_original_length_in_every_layer(window_model):
  """A window-W model pressed to its last W tokens must decode exactly like the full model;
  a next position derived from the kept count (W) would rotate the new query wrongly."""
  m = window_model
  t, pad = 16, 5
  tok = np.array(_toks(2, t, seed=3, lo=1))
  mask = np.ones((2, t), np.int32)
  mask[1, :pad] = 0
  tok[1, :pad] = 0
  lengths = np.array([t, t - pad])
  steps = 3
  press = P.StreamingLLMPress(budget=W, n_sink=0)
  _, cache = models.prefill(m, jnp.asarray(tok), attention_mask=jnp.asarray(mask), press=press,
                            decode_room=steps, window_cache=False, logits="last")
  assert cache.capacity == (W + steps,) * 2          # really evicted (16 and 11 -> 4)
  np.testing.assert_array_equal(cache.next_position, lengths)
  for layer in cache.layers():
    for b, heads in enumerate(_valid_positions(layer)):
      for pos in heads:
        assert pos == list(range(lengths[b] - W, lengths[b]))
  cont = np.array([[7, 2, 11], [9, 4, 6]], np.int32)      # teacher-forced continuation
  got = []
  for step in range(steps):
    lg, cache = models.decode(m, jnp.asarray(cont[:, step:step + 1]), cache, logits="last")
    got.append(np.asarray(lg[:, 0]))
    for layer in cache.layers():  # the new token sits at the original length, every layer
      pos = np.asarray(layer.positions)
      ln = np.asarray(layer.lengths)
      last = np.take_along_axis(pos, ln[..., None] - 1, axis=2)[..., 0]
      np.testing.assert_array_equal(last, np.broadcast_to((lengths + step)[:, None], last.shape))
  for b in range(2):  # reference: no cache, the full sequence, one forward per row
    seq = np.concatenate([tok[b, mask[b] > 0], cont[b]])[None]
    ref = np.asarray(m(jnp.asarray(seq)))[0, lengths[b]:]
    np.testing.assert_allclose(np.stack(got)[:, b], ref, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache.next_position, lengths + steps)


# -- 2 ---------------------------------------------------------------------------------------
GQA_PRESSES = {
    "expected_attention": P.ExpectedAttentionPress(budget=8, n_sink=1, query_window=4,
                                                   n_future_positions=4),
    "adakv": P.AdaKVPress(P.SnapKVPress(budget=8, window_size=2)),
}


def _ref_colsum(q, k, kpos, qpos, group, scale):
  """Hand attention: q [B,Hq,Tq,D], k [B,Hkv,S,D] -> mass per slot summed over each kv
  head's query group and the queries [B,Hkv,S] (float64, numpy)."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  kr = np.repeat(k, group, axis=1)                                  # reference only
  s = np.einsum("bhtd,bhsd->bhts", q, kr) * scale
  vis = (np.asarray(kpos)[:, :, None, :] >= 0) & (
      np.asarray(kpos)[:, :, None, :] <= np.asarray(qpos)[:, None, :, None])
  vis = np.repeat(vis, group, axis=1)
  s = np.where(vis, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  b, hq, tq, sl = p.shape
  return p.reshape(b, hq // group, group, tq, sl).sum(axis=(2, 3))


def test_gqa_scoring_does_not_repeat_kv(gqa_model):
  t = 24
  tok = _toks(2, t, seed=5)
  cfg = gqa_model.config
  assert cfg.num_heads == 2 * cfg.num_kv_heads
  b, hkv, d, item = 2, cfg.num_kv_heads, cfg.head_dim, 4
  for name, press in GQA_PRESSES.items():
    _, c = models.prefill(gqa_model, tok, press=press, decode_room=1, logits="last")
    for layer in c.layers():
      assert layer.k.shape[1] == hkv, name
    # k, v [B, Hkv, S, D] float32 + positions [B, Hkv, S] + lengths [B, Hkv] int32
    want = sum(b * hkv * (cap * (2 * d * item + 4) + 4) for cap in c.capacity)
    assert _nbytes(c) == want, (name, _nbytes(c), want)   # x Hkv, never x Hq
  # Scores: colsum is [B, Hkv, S], the hand-computed mass summed over each query group,
  # and H2O keeps exactly the top-8 slots of that aggregated score per kv head.
  need = models.Observe(colsum=True, queries=t)
  _, cache, obs = models.prefill(gqa_model, tok, observe=need, logits="last")
  qpos = np.broadcast_to(np.arange(t), (2, t))
  _, pressed = models.prefill(gqa_model, tok, press=P.H2OPress(budget=8), logits="last")
  for layer, o, kept in zip(cache.layers(), obs, pressed.layers()):
    assert o["colsum"].shape == (2, cfg.num_kv_heads, t)
    ref = _ref_colsum(o["queries"], layer.k, layer.positions, qpos,
                      cfg.num_heads // cfg.num_kv_heads, cfg.head_dim ** -0.5)
    np.testing.assert_allclose(np.asarray(o["colsum"]), ref, atol=2e-4, rtol=1e-4)
    top = np.sort(np.argsort(-ref, axis=-1)[..., :8], axis=-1)
    assert _valid_positions(kept) == top.tolist()


# -- 3 ---------------------------------------------------------------------------------------
T3, PAD3 = 20, 8
PAD_PRESSES = {
    "streaming_llm": P.StreamingLLMPress(compression_ratio=0.5, n_sink=2),
    "snapkv": P.SnapKVPress(compression_ratio=0.5, window_size=2),
    "knorm": P.KnormPress(compression_ratio=0.5),
}
QUANTS = {"none": None, "int8": quant.int8(), "kivi2": quant.kivi(2, group_size=2, residual=4)}


@pytest.fixture(scope="module")
def pad_batch():
  tok = np.array(_toks(2, T3, seed=7, lo=1), np.int32)
  mask = np.ones((2, T3), np.int32)
  mask[1, :PAD3] = 0
  tok[1, :PAD3] = 0
  return jnp.asarray(tok), jnp.asarray(mask), jnp.asarray([[5], [9]], jnp.int32)


@pytest.mark.parametrize("qname", sorted(QUANTS))
@pytest.mark.parametrize("pname", sorted(PAD_PRESSES))
def test_left_padding_batch_equals_each_prompt_alone_under_every_press_and_quantizer(
    gqa_model, pad_batch, pname, qname):
  tok, mask, nxt = pad_batch
  press = PAD_PRESSES[pname]
  if QUANTS[qname] is not None:
    press = mixed.EvictThenQuantize(press, QUANTS[qname])
  m = gqa_model
  _, cache = models.prefill(m, tok, attention_mask=mask, press=press, decode_room=1,
                            logits="last")
  lengths = [T3, T3 - PAD3]
  np.testing.assert_array_equal(cache.next_position, lengths)
  kept = [_valid_positions(c) for c in cache.layers()]
  for layer in kept:
    for b, heads in enumerate(layer):
      for pos in heads:   # no pad slot (pads have no position), no duplicate, half kept
        assert all(0 <= p < lengths[b] for p in pos), (b, pos)
        assert len(set(pos)) == len(pos) == lengths[b] // 2
  lg, _ = models.decode(m, nxt, cache, logits="last")
  # the padded prompt without its padding (two copies, the batch's pre-press capacity)
  alone_tok = jnp.concatenate([tok[1:, PAD3:]] * 2)
  _, alone = models.prefill(m, alone_tok, press=press, capacity=T3, decode_room=1,
                            logits="last")
  assert [[_valid_positions(c)[0]] for c in alone.layers()] == [[layer[1]] for layer in kept]
  lg_alone, _ = models.decode(m, nxt[1:].repeat(2, 0), alone, logits="last")
  np.testing.assert_allclose(np.asarray(lg[1]), np.asarray(lg_alone[0]), atol=1e-5, rtol=1e-5)


# -- 4 ---------------------------------------------------------------------------------------
def test_kivi_keeps_full_precision_residual_window(gqa_model):
  """The last R (minus a partial group) tokens stay bit-exact; older ones are quantized."""
  t, g, r = 22, 4, 8
  tok = _toks(2, t, seed=9)
  _, dense = models.prefill(gqa_model, tok, capacity=t, logits="last")  # the press path shape
  spec = quant.kivi(2, group_size=g, residual=r)
  _, qc = models.prefill(gqa_model, tok, press=quant.QuantizePress(spec), capacity=t,
                         logits="last")
  for d, q in zip(dense.layers(), qc.layers()):
    assert isinstance(q, quant.QuantizedKVCache)
    n_res = np.asarray(q.res_lengths)
    assert ((n_res >= r - g + 1) & (n_res <= r)).all(), n_res
    np.testing.assert_array_equal(np.asarray(q.lengths), t)
    rpos = np.asarray(q.res_positions)
    dk, dv = np.asarray(d.k), np.asarray(d.v)
    for b in range(2):
      for h in range(dk.shape[1]):
        n = int(n_res[b, h])
        want = np.arange(t - n, t)                   # the most recent tokens
        np.testing.assert_array_equal(rpos[b, h, :n], want)
        np.testing.assert_array_equal(np.asarray(q.k_res)[b, h, :n], dk[b, h, want])
        np.testing.assert_array_equal(np.asarray(q.v_res)[b, h, :n], dv[b, h, want])
    # the quantized part is really 2-bit (not exact) but close in relative terms
    deq = q.to_dense()
    old = int(np.asarray(q.lengths - q.res_lengths).min())
    err = np.abs(np.asarray(deq.k)[:, :, :old] - dk[:, :, :old])
    assert err.max() > 0
    assert err.mean() < 0.5 * np.abs(dk[:, :, :old]).mean()


# -- 5 ---------------------------------------------------------------------------------------
def test_window_attends_exactly_w_tokens():
  # (a) transformers' Mistral (sliding_window=8 < 24 tokens), one-shot and through the ring
  m = models.from_pretrained(MISTRAL_FIXTURE, dtype="float32")
  exp = np.load(os.path.join(MISTRAL_FIXTURE, "expected.npz"))
  ids = jnp.asarray(exp["input_ids"], jnp.int32)
  np.testing.assert_allclose(np.asarray(m(ids)), exp["logits"], atol=1e-4, rtol=0)
  lg, cache = models.prefill(m, ids[:, :10])
  assert cache.capacity == (8, 8)                   # a ring of exactly W slots
  steps = [lg]
  for i in range(10, 24):
    out, cache = models.decode(m, ids[:, i:i + 1], cache)
    steps.append(out)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), exp["logits"], atol=1e-4,
                             rtol=0)
  # (b) hand count on one layer: with window W the last query sees exactly its last W
  # tokens, so it equals a no-window model run on those W tokens alone (RoPE is relative).
  one = MISTRAL.replace(num_layers=1)
  mw = models.Transformer(one, rngs=nnx.Rngs(2))
  full = models.Transformer(one.replace(sliding_window=None, architecture="LlamaForCausalLM"),
                            rngs=nnx.Rngs(2))
  x = _toks(1, 12, seed=11)
  got = np.asarray(mw(x))[0, -1]
  np.testing.assert_allclose(got, np.asarray(full(x[:, -W:]))[0, -1], atol=1e-5, rtol=0)
  for wrong in (W - 1, W + 1):                       # an off-by-one window would match these
    assert np.abs(got - np.asarray(full(x[:, -wrong:]))[0, -1]).max() > 1e-3


# -- 6 ---------------------------------------------------------------------------------------
def test_decode_time_compression_keeps_positions_right_after_many_steps(window_model):
  """40 decode steps with compression whenever the cache is full (every 3 steps, 13 times):
  a window-W model must still match the no-cache forward at every step."""
  m = window_model
  t, steps = 8, 40
  tok = _toks(1, t, seed=13)
  policy = P.DecodingPress(P.StreamingLLMPress(n_sink=0), compression_interval=0,
                           target_size=W, config=m.config)
  lg, cache = models.prefill(m, tok, press=P.StreamingLLMPress(budget=W,
                             n_sink=0), decode_room=3, window_cache=False, logits="last")
  seq = list(np.asarray(tok[0]))
  got = []
  compressions = 0
  for step in range(steps):
    nxt = int(jnp.argmax(lg[0, -1]))
    seq.append(nxt)
    if policy.needs_compression(cache):
      cache = policy.compress(cache)
      compressions += 1
    lg, cache = models.decode(m, jnp.asarray([[nxt]], jnp.int32), cache, logits="last")
    got.append(np.asarray(lg[0, -1]))
    assert int(cache.next_position[0]) == t + step + 1
    for layer in cache.layers():
      pos = np.asarray(layer.positions)
      assert pos.max() == t + step                   # the newest token at its true position
      assert layer.capacity == W + 3                 # memory stays bounded
  assert compressions >= 10
  ref = np.asarray(m(jnp.asarray([seq], jnp.int32)))[0, t:]   # one no-cache forward
  np.testing.assert_allclose(np.stack(got), ref, atol=1e-4, rtol=0)


# -- 7 ---------------------------------------------------------------------------------------
BF16_PRESSES = {
    "snapkv": P.SnapKVPress(compression_ratio=0.5, window_size=4),
    "knorm": P.KnormPress(compression_ratio=0.5),
    "expected_attention": P.ExpectedAttentionPress(compression_ratio=0.5, n_sink=1,
                                                   query_window=4, n_future_positions=4),
    "snapkv_int8": mixed.EvictThenQuantize(P.SnapKVPress(compression_ratio=0.5, window_size=4),
                                           quant.int8()),
    "keydiff": P.KeyDiffPress(compression_ratio=0.5),
    "tova": P.TOVAPress(compression_ratio=0.5),
}
MODEL_BF16 = ("expected_attention", "snapkv_int8")   # the exp / softmax / scale paths


def test_bf16_compression_with_large_magnitude_keys_has_no_nan_or_inf():
  """Keys of magnitude ~1e4 (beyond fp16's 65504 once squared or dotted): every press, a
  bf16 model, prefill + press + decode stay finite, and attention is not degenerate."""
  m = helpers.tiny_model(seed=4, dtype="bfloat16")
  m = nnx.merge(*nnx.split(m))                       # a copy: the cached model stays intact
  m.wk.value = m.wk.value * 3000.0
  m.wq.value = m.wq.value * 30.0
  t = 24
  tok = _toks(2, t, seed=15)
  _, dense = models.prefill(m, tok, capacity=t + 1, logits="last")
  kmax = max(float(jnp.abs(c.k.astype(jnp.float32)).max()) for c in dense.layers())
  assert kmax > 1e3, kmax
  nxt = jnp.asarray([[3], [4]], jnp.int32)
  ref, _ = models.decode(m, nxt, dense, logits="last")
  assert bool(jnp.isfinite(ref.astype(jnp.float32)).all())
  for name in MODEL_BF16:
    press = BF16_PRESSES[name]
    _, c = models.prefill(m, tok, press=press, decode_room=1, logits="last")
    for leaf in jax.tree.leaves([x for x in c.layers()]):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert bool(jnp.isfinite(leaf.astype(jnp.float32)).all()), name
    for layer in c.layers():
      for heads in _valid_positions(layer):
        assert all(len(p) == t // 2 and len(set(p)) == t // 2 for p in heads), name
    lg, _ = models.decode(m, nxt, c, logits="last")        # donates c
    lg = np.asarray(lg.astype(jnp.float32))
    assert np.isfinite(lg).all(), name
  # the scorers themselves, on a bf16 cache with keys ~3e4 and large queries
  lc = helpers.make_cache(b=2, h=2, s=16, d=16, dtype=np.float32)
  lc = lc.replace(k=(lc.k * 3e4).astype(jnp.bfloat16), v=lc.v.astype(jnp.bfloat16))
  obs = helpers.make_obs(lc, g=2, w=4)
  obs["queries"] = (obs["queries"] * 3e2).astype(jnp.bfloat16)
  for name in ("knorm", "keydiff", "tova"):
    press = BF16_PRESSES[name]
    s = helpers.score(press, lc, obs)
    valid = np.asarray(lc.valid_mask())
    assert np.isfinite(np.asarray(s, np.float32)[valid]).all(), name
