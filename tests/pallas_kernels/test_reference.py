"""Hand-computed cases for the pure-jnp reference (docs/CONVENTIONS.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import NEG_INF, attention_reference


def _uniform(s=12, t=1, hq=2, hkv=1, d=8, q_pos=(11,), length=None):
  """Identical keys: every visible slot gets the same logit, so probabilities are uniform."""
  q = jnp.ones((1, hq, t, d))
  k = jnp.ones((1, hkv, s, d))
  v = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32)[None, None, :, None], (1, hkv, s, d))
  lengths = jnp.full((1, hkv), s if length is None else length, jnp.int32)
  qpos = jnp.asarray([q_pos], jnp.int32)
  kpos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (1, hkv, s))
  return q, k, v, lengths, qpos, kpos


def _run(args, **kw):
  q, k, v, lengths, qpos, kpos = args
  return attention_reference(q, k, v, lengths, q_positions=qpos, k_positions=kpos, **kw)


def test_uniform_keys_give_uniform_probabilities():
  # Given identical keys and a query at position 11 over 12 slots
  out, lse, colsum = _run(_uniform())
  # Then the output is the mean of the values, lse = logit + log(12), colsum = G / 12
  np.testing.assert_allclose(out[0, :, 0, 0], np.full(2, 5.5), rtol=1e-6)
  np.testing.assert_allclose(lse[0, :, 0], np.full(2, 8 ** -0.5 * 8 + np.log(12)), rtol=1e-6)
  np.testing.assert_allclose(colsum[0, 0], np.full(12, 2 / 12), rtol=1e-6)


def test_causal_hides_future_slots():
  out, _, colsum = _run(_uniform(q_pos=(5,)))
  np.testing.assert_allclose(out[0, 0, 0, 0], np.mean(np.arange(6)), rtol=1e-6)
  assert np.all(np.asarray(colsum[0, 0, 6:]) == 0)


def test_window_sees_exactly_w_tokens():
  _, _, colsum = _run(_uniform(q_pos=(10,)), window=4)
  visible = np.flatnonzero(np.asarray(colsum[0, 0]))
  np.testing.assert_array_equal(visible, [7, 8, 9, 10])


def test_n_sink_stay_visible_with_window():
  out, _, colsum = _run(_uniform(q_pos=(10,)), window=4, n_sink=2)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(colsum[0, 0])), [0, 1, 7, 8, 9, 10])
  np.testing.assert_allclose(out[0, 0, 0, 0], np.mean([0, 1, 7, 8, 9, 10]), rtol=1e-6)


def test_lengths_zero_and_padding_queries_give_zeros_not_nan():
  args = _uniform(t=2, q_pos=(11, -1), length=0)
  out, lse, colsum = _run(args)
  assert np.all(np.asarray(out) == 0) and np.all(np.asarray(colsum) == 0)
  np.testing.assert_array_equal(lse, np.full((1, 2, 2), NEG_INF, np.float32))
  # A padding query next to a valid one: zeros for it, normal result for the other.
  out, lse, _ = _run(_uniform(t=2, q_pos=(11, -1)))
  assert np.all(np.asarray(out[0, :, 1]) == 0) and np.all(np.asarray(lse[0, :, 1]) == NEG_INF)
  np.testing.assert_allclose(out[0, :, 0, 0], 5.5, rtol=1e-6)


def test_length_one_and_evicted_slots():
  q, k, v, lengths, qpos, kpos = _uniform(length=1)
  out, _, _ = _run((q, k, v, lengths, qpos, kpos))
  np.testing.assert_allclose(out[0, :, 0, 0], 0.0)
  kpos = kpos.at[0, 0, 3].set(-1)
  out, _, colsum = _run((q, k, v, jnp.full((1, 1), 5, jnp.int32), qpos, kpos))
  np.testing.assert_allclose(out[0, 0, 0, 0], np.mean([0, 1, 2, 4]), rtol=1e-6)
  assert colsum[0, 0, 3] == 0


def test_sink_logits_join_the_denominator_only():
  args = _uniform(q_pos=(3,))
  sink = jnp.asarray([0.0, 2.0])
  out, lse, colsum = _run(args, sink_logits=sink, scale=0.0)
  # logits are 0 (scale 0) over 4 visible slots plus one sink logit per head.
  np.testing.assert_allclose(lse[0, :, 0], np.log(4 + np.exp([0.0, 2.0])), rtol=1e-6)
  mass = 4 / (4 + np.exp([0.0, 2.0]))
  np.testing.assert_allclose(out[0, :, 0, 0], mass * 1.5, rtol=1e-6)
  np.testing.assert_allclose(colsum[0, 0, :4], np.full(4, mass.sum() / 4), rtol=1e-6)


def test_softcap_bounds_logits():
  q, k, v, lengths, qpos, kpos = _uniform()
  _, lse, _ = _run((100 * q, k, v, lengths, qpos, kpos), softcap=5.0)
  np.testing.assert_allclose(lse[0, :, 0], 5 * np.tanh(100 * 8 ** 0.5 / 5) + np.log(12),
                             rtol=1e-6)


def test_colsum_window_counts_last_queries():
  args = _uniform(t=3, q_pos=(9, 10, 11))
  _, _, all_q = _run(args)
  _, _, last2 = _run(args, colsum_window=2)
  np.testing.assert_allclose(all_q.sum(), 2 * 3, rtol=1e-6)   # G * T
  np.testing.assert_allclose(last2.sum(), 2 * 2, rtol=1e-6)   # G * 2
  assert last2[0, 0, 11] > 0 and all_q[0, 0, 5] > last2[0, 0, 5] > 0


def test_gqa_query_head_reads_kv_head_h_div_g():
  b, hq, hkv, s, d = 1, 4, 2, 6, 8
  rng = np.random.default_rng(0)
  q = rng.standard_normal((b, hq, 1, d), np.float32)
  k = rng.standard_normal((b, hkv, s, d), np.float32)
  v = rng.standard_normal((b, hkv, s, d), np.float32)
  lengths = jnp.full((b, hkv), s, jnp.int32)
  qpos = jnp.full((b, 1), s - 1, jnp.int32)
  kpos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, hkv, s))
  out, _, _ = attention_reference(q, k, v, lengths, q_positions=qpos, k_positions=kpos)
  out, qn, kn, vn = np.asarray(out), np.asarray(q), np.asarray(k), np.asarray(v)
  for h in range(hq):
    logits = qn[0, h, 0] @ kn[0, h // 2].T * d ** -0.5
    p = np.exp(logits - logits.max())
    want = (p / p.sum()) @ vn[0, h // 2]
    np.testing.assert_allclose(out[0, h, 0], want, rtol=1e-5, atol=1e-6)


def test_matches_kvjax_reference():
  attn = pytest.importorskip("kvjax.attention")
  if not hasattr(attn, "reference_attention") or not hasattr(attn, "AttentionSpec"):
    pytest.skip("kvjax.attention has no reference_attention")
  from tests.pallas_kernels._util import problem  # pylint: disable=import-outside-toplevel
  p = problem(batch=2, q_heads=4, kv_heads=2, queries=3, slots=20, head_dim=8, gaps=True,
              pad_queries=1, nan_garbage=False)
  kw = dict(window=5, n_sink=2, softcap=10.0)
  ref = jax.jit(lambda q, k, v, n, qp, kp: tuple(attn.reference_attention(
      q, k, v, n, q_positions=qp, k_positions=kp, spec=attn.AttentionSpec(**kw),
      colsum_window=2)))
  want = ref(p["q"], p["k"], p["v"], p["k_lengths"], p["q_positions"], p["k_positions"])
  got = attention_reference(p["q"], p["k"], p["v"], p["k_lengths"],
                            q_positions=p["q_positions"], k_positions=p["k_positions"],
                            colsum_window=2, **kw)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
