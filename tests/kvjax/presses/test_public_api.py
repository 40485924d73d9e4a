"""Every technique through the public API: models.prefill(press=...), models.decode,
kvjax.generate(press=..., decode_press=...) and the compare harness's technique names.

References are independent of the code under test: numpy projections and channel masks,
hand-counted bytes, and the uncompressed model's own logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import models
from kvjax import presses as P
from tests.kvjax.presses import helpers

T, ROOM = 16, 4


@pytest.fixture(scope="module")
def model():
  return helpers.tiny_model()


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, T)), jnp.int32)


@pytest.fixture(scope="module")
def dense(model, tokens):
  """The uncompressed prompt cache (float32) and the last 4 queries of every layer."""
  _, cache, obs = models.prefill(model, tokens, observe=models.Observe(queries=4))
  return cache, obs


def test_think_press_prefill_decode_and_generate(model, tokens, dense):
  press = P.ThinKPress(keep_ratio=0.5, window=4)
  _, cache = models.prefill(model, tokens, press=press, capacity=T + ROOM)
  full, obs = dense
  d = model.config.head_dim
  for layer, ref, o in zip(cache.layers(), full.layers(), obs):
    assert type(layer).__name__ == "PrunedKeyCache" and layer.capacity == T + ROOM
    # ThinK's criterion in numpy: top half of ||Q_c|| * ||K_c|| per (row, kv head).
    k = np.asarray(ref.k, np.float64)
    q = np.asarray(o["queries"], np.float64).reshape(2, 2, 2, 4, d)
    crit = np.sqrt((k ** 2).sum(2)) * np.sqrt((q ** 2).sum((2, 3)))
    want = np.sort(np.argsort(-crit, axis=-1, kind="stable")[..., :d // 2], axis=-1)
    np.testing.assert_array_equal(np.asarray(layer.channels), want)
    view = layer.materialize()
    mask = np.zeros((2, 2, 1, d))
    np.put_along_axis(mask, want[:, :, None, :], 1.0, axis=-1)
    np.testing.assert_allclose(np.asarray(view.k)[:, :, :T], k * mask, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(view.v)[:, :, :T], np.asarray(ref.v))
  # the room holds decoded tokens; generate runs the same press end to end
  nxt = jnp.asarray([[3], [5]], jnp.int32)
  _, cache = models.decode(model, nxt, cache)
  assert np.asarray(cache.layers()[0].lengths).tolist() == [[T + 1] * 2] * 2
  out = kvjax.generate(model, tokens, max_new_tokens=ROOM, press=press)
  assert out.tokens.shape == (2, ROOM)
  assert type(out.cache.layers()[0]).__name__ == "PrunedKeyCache"


def test_lowrank_press_prefill_and_generate(model, tokens, dense):
  press = P.LowRankPress(compression_ratio=0.5)
  _, cache = models.prefill(model, tokens, press=press, capacity=T + ROOM)
  full, _ = dense
  r = model.config.head_dim // 2
  for layer, ref in zip(cache.layers(), full.layers()):
    assert type(layer).__name__ == "LowRankKVCache" and layer.capacity == T + ROOM
    view = layer.materialize()
    for name, got in (("k", view.k), ("v", view.v)):
      x = np.asarray(getattr(ref, name), np.float64)          # [B, H, S, D]
      for h in range(2):   # one basis per kv head, from the batch's tokens
        _, vec = np.linalg.eigh(np.einsum("bsd,bse->de", x[:, h], x[:, h]))
        p = vec[:, ::-1][:, :r]
        np.testing.assert_allclose(np.asarray(got)[:, h, :T], x[:, h] @ p @ p.T, atol=2e-4)
  out = kvjax.generate(model, tokens, max_new_tokens=ROOM, press=press)
  assert out.tokens.shape == (2, ROOM)


def test_think_and_lowrank_are_compare_techniques():
  from experiments import compare  # pylint: disable=import-outside-toplevel
  ts = compare.parse_techniques(["think", "lowrank"], [0.5])
  assert [t.label for t in ts] == ["think@0.5", "lowrank@0.5"]
  built = [t.build() for t in ts]
  assert built[0] == P.ThinKPress(keep_ratio=0.5) and built[1] == P.LowRankPress(0.5)
  # the real byte figures are in the repr: keys halved, values whole -> 3/4 of K + V
  assert "~0.75" in repr(built[0])


# --- attention statistics across chunks, evictions and prefill -> decode ------------------
def test_chunked_prefill_sums_h2o_statistics_over_every_chunk(model, tokens):
  # Without a press, the chunked totals are the one-shot prompt's attention mass.
  _, _, one = models.prefill(model, tokens, observe=models.Observe(colsum=True))
  _, _, chunked = models.prefill(model, tokens, observe=models.Observe(colsum=True),
                                 chunk_size=4)
  for a, b in zip(one, chunked):
    np.testing.assert_allclose(np.asarray(b["colsum"]), np.asarray(a["colsum"]), rtol=1e-5,
                               atol=1e-6)
  # A budget of 12 evicts nothing before the last chunk of 4, so the last compression must
  # see every query's mass and keep exactly what one-shot H2O keeps.
  press = P.H2OPress(budget=12)
  _, ref = models.prefill(model, tokens, press=press)
  _, got = models.prefill(model, tokens, press=press, chunk_size=4)
  for a, b in zip(ref.layers(), got.layers()):
    assert helpers.kept_positions(b) == helpers.kept_positions(a)


def test_h2o_normalize_counts_queries_by_position_not_slot():
  cache = helpers.make_cache(b=1, h=2, s=8, lengths=[8])
  # an earlier eviction left positions with gaps: slot i no longer holds position i
  pos = np.array([[[0, 2, 3, 7, 9, 10, 12, 13]] * 2], np.int32)
  cache = cache.replace(positions=jnp.asarray(pos))
  col = np.random.default_rng(4).random((1, 2, 8)).astype(np.float32)
  obs = {"colsum": jnp.asarray(col), "next_position": jnp.asarray([14], jnp.int32)}
  got = np.asarray(helpers.score(P.H2OPress(compression_ratio=0.5, normalize=True), cache, obs))
  np.testing.assert_allclose(got, col / (14 - pos), rtol=1e-6)


def test_generate_hands_prefill_statistics_to_the_decode_press(model, tokens):
  seen = []

  class Recording(P.DecodingPress):
    def maybe_compress(self, model_cache, step, obs=None):
      if step == 0:   # copies: the decode step that follows donates the cache
        seen.append(([None if o is None else np.asarray(o["colsum"]) for o in obs or [None]],
                     [np.asarray(l.positions) for l in model_cache.layers()]))
      return super().maybe_compress(model_cache, step, obs=obs)

  policy = Recording(P.H2OPress(), compression_interval=0, target_size=8)
  kvjax.generate(model, tokens, max_new_tokens=3, press=P.KnormPress(compression_ratio=0.5),
                 decode_press=policy)
  cols, positions = seen[0]
  assert len(cols) == 2 and cols[0] is not None
  _, _, full = models.prefill(model, tokens, observe=models.Observe(colsum=True))
  for col, f, pos in zip(cols, full, positions):
    # reference: the full prompt's mass per position (dense slot == position here),
    # read at the positions the prefill press kept; 0 on empty slots
    want = np.where(pos >= 0, np.take_along_axis(np.asarray(f["colsum"]),
                                                 np.maximum(pos, 0), -1), 0.0)
    np.testing.assert_allclose(col, want, rtol=1e-5, atol=1e-6)
