"""KVzip (kvjax/presses/kvzip.py + models/press_inputs.py) against numpy references.

Given a tiny random model and a ragged (left-padded) batch, when the context is
reconstructed through the prefilled cache, then every context slot's score is the max
softmax attention (numpy, over the whole visible sequence) that a query of the chunk
reproducing it pays it, chunk by chunk as the paper scores; the head-wise budget keeps the
layer's best scores across heads; and models.prefill(press=KVzipPress(...)) shrinks nbytes.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import attention as attn_lib
from kvjax.observation import Observe
from kvjax.presses import registry
from kvjax.presses.kvzip import KVzipPress, aligned_query_positions, max_attention
from models.config import ModelConfig
from tests.kvjax.presses import helpers

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
T, PAD, PREFIX = 20, 3, (5, 6, 7)


@pytest.fixture(scope="module")
def model():
  return models.Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, T), 3, 64), np.int32)
  mask = np.ones((2, T), np.int32)
  mask[1, :PAD] = 0                                    # row 1 left-padded
  return tokens, mask


def np_max_attention(q, qpos, k, kpos, klen, scale, window=None):
  """numpy: per (b, kv head, slot) max over group heads and queries of softmax(q.k)."""
  b, hq, w, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  g = hq // hkv
  out = np.zeros((b, hkv, s))
  for bi in range(b):
    for h in range(hq):
      j = h // g
      for t in range(w):
        if qpos[bi, t] < 0:
          continue
        vis = [(sl < klen[bi, j] and 0 <= kpos[bi, j, sl] <= qpos[bi, t] and
                (window is None or qpos[bi, t] - kpos[bi, j, sl] < window)) for sl in range(s)]
        vis = np.array(vis)
        if not vis.any():
          continue
        logit = (k[bi, j].astype(np.float64) @ q[bi, h, t].astype(np.float64)) * scale
        p = np.where(vis, np.exp(logit - logit[vis].max()), 0.0)
        out[bi, j] = np.maximum(out[bi, j], p / p.sum())
  return out


def test_max_attention_matches_numpy_hand_case():
  rng = np.random.default_rng(0)
  cache = helpers.make_cache(b=2, h=2, s=7, d=4, lengths=[7, 5])
  q = rng.normal(size=(2, 4, 3, 4)).astype(np.float32)
  qpos = np.array([[4, 5, 6], [-1, 3, 4]], np.int32)
  args = (np.asarray(cache.k), np.asarray(cache.positions), np.asarray(cache.lengths))
  for window in (None, 3):
    got = max_attention(jnp.asarray(q), jnp.asarray(qpos), cache.k, cache.positions,
                        cache.lengths, attn_lib.AttentionSpec(window=window))
    want = np_max_attention(q, qpos, *args, scale=0.5, window=window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
  # hand case: one query, two equal keys and one masked -> 0.5 each
  k = jnp.ones((1, 1, 3, 2))
  got = max_attention(jnp.ones((1, 1, 1, 2)), jnp.array([[1]]), k,
                      jnp.array([[[0, 1, 2]]]), jnp.array([[3]]))
  np.testing.assert_allclose(np.asarray(got), [[[0.5, 0.5, 0.0]]], atol=1e-7)


def test_aligned_query_positions_right_aligns_like_observe_queries():
  pos = jnp.array([[-1, -1, 3, 4], [5, 6, 7, 8]])
  np.testing.assert_array_equal(np.asarray(aligned_query_positions(pos, 3)),
                                [[-1, 3, 4], [6, 7, 8]])


CONT, OVERLAP, SUFFIX = (9, 10), 2, (11,)


def reference_scores(model, tokens, mask, chunk):
  """numpy reference of KVzip's chunked scoring, written from the paper's procedure with no
  working cache: for every chunk, one plain forward over context + that chunk's input
  (instruction, quoted overlap, suffix, the chunk's tokens), then the max attention of the
  chunk-input queries onto the context slots of the tokens that chunk reproduces."""
  b = tokens.shape[0]
  lengths = mask.sum(1)
  valid = [tokens[r][mask[r] > 0] for r in range(b)]
  n = max(-(-int(n_r) // chunk) for n_r in lengths)
  best = None
  for c in range(n):
    inputs, spans = [], []
    for r in range(b):
      part = valid[r][c * chunk:(c + 1) * chunk]
      head = list(PREFIX) if c == 0 else list(CONT) + list(
          valid[r][max(0, c * chunk - OVERLAP):c * chunk])
      inputs.append(head + list(SUFFIX) + list(part))
      spans.append((c * chunk, c * chunk + len(part) - 1))
    w = max(len(x) for x in inputs)
    chunk_ids = np.zeros((b, w), np.int32)
    chunk_mask = np.zeros((b, w), np.int32)
    for r, x in enumerate(inputs):
      chunk_ids[r, :len(x)] = x
      chunk_mask[r, :len(x)] = 1
    full = np.concatenate([tokens, chunk_ids], axis=1)
    fmask = np.concatenate([mask, chunk_mask], axis=1)
    _, cache, obs = models.prefill(model, jnp.asarray(full), attention_mask=jnp.asarray(fmask),
                                   observe=Observe(queries=w))
    out = []
    for i, layer in enumerate(cache.layers()):
      q = np.asarray(obs[i]["queries"])
      # obs["queries"] holds each row's last w valid queries, right-aligned: keep only the
      # row's own chunk-input queries (positions from lengths[r])
      qpos = np.full((b, w), -1)
      for r in range(b):
        n_r = len(inputs[r])
        qpos[r, w - n_r:] = lengths[r] + np.arange(n_r)
      sc = np_max_attention(q, qpos, np.asarray(layer.k), np.asarray(layer.positions),
                            np.asarray(layer.lengths), scale=CFG.head_dim ** -0.5)
      kpos = np.asarray(layer.positions)
      lo = np.array([s[0] for s in spans])[:, None, None]
      hi = np.array([s[1] for s in spans])[:, None, None]
      mine = (kpos >= lo) & (kpos <= hi)
      out.append(np.where(mine, sc, 0.0)[..., :T])
    best = out if best is None else [np.maximum(x, y) for x, y in zip(best, out)]
  return best


@pytest.mark.parametrize("chunk", [7, 100])
def test_reconstruction_scores_match_numpy_chunk_by_chunk(model, batch, chunk):
  tokens, mask = batch
  want = reference_scores(model, tokens, mask, chunk)
  p = KVzipPress(chunk_size=chunk, repeat_ids=PREFIX, continue_ids=CONT, overlap=OVERLAP,
                 answer_ids=SUFFIX)
  _, cache, obs = models.prefill(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                                 observe=p.observe)
  got = [np.asarray(o["reconstruction"]) for o in obs]
  chex.assert_shape(got, (2, CFG.num_kv_heads, T))
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=1e-6)
  # every valid context slot got a score from the chunk that reproduces it
  for g in got:
    assert (g[0] > 0).all() and (g[1][:, :T - PAD] > 0).all()
  # the prefilled cache is the plain prefill's: the reconstruction ran on a copy
  _, plain = models.prefill(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  chex.assert_trees_all_equal(plain, cache)


def test_headwise_budget_keeps_the_layer_best_scores_across_heads():
  # Given hand scores where head 0 holds most of the high ones
  b, h, s = 1, 2, 10
  cache = helpers.make_cache(b=b, h=h, s=s, d=4)
  rec = np.zeros((b, h, s), np.float32)
  rec[0, 0] = [9, 1, 8, 7, 6, 5, 4, 3.5, 0.3, 0.2]
  rec[0, 1] = [9, 0.1, 0.2, 4.5, 0.3, 0.35, 0.6, 0.7, 0.05, 3]
  obs = {"reconstruction": jnp.asarray(rec)}
  # When KVzip keeps half (5 per head on average, 10 for the layer) with room for 2x
  p = KVzipPress(compression_ratio=0.5, n_sink=1, head_capacity_factor=2.0)
  out = p(cache, obs)
  # Then the layer keeps its 10 best (sinks first), whatever the head: numpy top-k
  flat = rec.reshape(-1).copy()
  flat[[0, s]] = np.inf                                   # slot 0 of each head is a sink
  top = set(np.argsort(-flat, kind="stable")[:10].tolist())
  want = [[sorted(i % s for i in top if i // s == j) for j in range(h)]]
  assert helpers.kept_positions(out) == want
  assert [len(x) for x in want[0]] == [7, 3]             # non-uniform per head
  # headwise=False: each head its own top 5
  uni = KVzipPress(compression_ratio=0.5, n_sink=1, headwise=False)(cache, obs)
  assert helpers.kept_positions(uni) == [[[0, 2, 3, 4, 5], [0, 3, 6, 7, 9]]]
  # a head never exceeds ceil(factor * uniform) = the layer's static capacity
  capped = KVzipPress(compression_ratio=0.5, n_sink=1, head_capacity_factor=1.2)(cache, obs)
  assert capped.positions.shape[-1] == 6
  assert [len(x) for x in helpers.kept_positions(capped)[0]] == [6, 4]


def test_prefill_with_kvzip_shrinks_nbytes_by_the_ratio(model, batch):
  tokens, mask = batch
  kw = dict(attention_mask=jnp.asarray(mask))
  _, full = models.prefill(model, jnp.asarray(tokens), **kw)
  # uniform per-head capacity: exactly half the slots (and bytes) of the full cache
  p = KVzipPress(compression_ratio=0.5, repeat_ids=PREFIX, head_capacity_factor=1.0)
  _, half = models.prefill(model, jnp.asarray(tokens), press=p, **kw)
  assert half.capacity == (T // 2,) * CFG.num_layers
  assert half.nbytes == pytest.approx(full.nbytes / 2, rel=0.02)
  # each row keeps int(L / 2) per head on average; a ragged row's heads may differ (the
  # static per-head cap comes from the capacity, 10), its total may not
  lens = np.asarray(half.layers()[0].lengths)
  np.testing.assert_array_equal(lens.sum(1), [20, 2 * ((T - PAD) // 2)])
  assert lens.max() <= T // 2
  # default head-wise budgets: capacity 1.5x the uniform budget, same total kept per row
  _, hw = models.prefill(model, jnp.asarray(tokens), press=registry.make("kvzip", 0.5), **kw)
  assert hw.capacity == (15,) * CFG.num_layers and hw.nbytes < full.nbytes
  for layer in hw.layers():
    np.testing.assert_array_equal(np.asarray(layer.lengths).sum(1), [20, 2 * ((T - PAD) // 2)])
  # the compressed cache decodes
  logits, _ = models.decode(model, jnp.asarray(tokens[:, :2]), hw, check_capacity=False)
  assert np.isfinite(np.asarray(logits)).all()


def test_errors_name_the_argument(model, batch):
  tokens, _ = batch
  with pytest.raises(ValueError, match=r"chunk_size=0; must be an int >= 1"):
    KVzipPress(chunk_size=0)
  with pytest.raises(ValueError, match=r"repeat_ids\[1\]=-3; must be a token id"):
    KVzipPress(repeat_ids=(1, -3))
  with pytest.raises(ValueError, match=r"continue_ids\[0\]=-1; must be a token id"):
    KVzipPress(continue_ids=(-1,))
  with pytest.raises(ValueError, match=r"overlap=-1; must be an int >= 0"):
    KVzipPress(overlap=-1)
  with pytest.raises(ValueError, match=r"outside the vocabulary 0..63"):
    models.prefill(model, jnp.asarray(tokens), press=KVzipPress(0.5, repeat_ids=(99,)))
  with pytest.raises(ValueError, match=r"needs obs\['reconstruction'\]"):
    KVzipPress(compression_ratio=0.5)(helpers.make_cache(), {})
  with pytest.raises(ValueError, match="only in one-shot models.prefill; not in chunked"):
    models.prefill(model, jnp.asarray(tokens), press=KVzipPress(0.5), chunk_size=8)
