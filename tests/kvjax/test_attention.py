"""Reference attention vs an explicit-loop numpy implementation of docs/CONVENTIONS.md."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention as A


def naive(q, k, v, k_lengths, q_pos, k_pos, *, scale, window=None, sinks=0, softcap=None,
          sink_logits=None, colsum_window=None):
  """Loops over every (b, h, t): the plain definition, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, hq, t, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  g = hq // hkv
  out = np.zeros((b, hq, t, v.shape[-1]))
  lse = np.full((b, hq, t), -1e30)
  colsum = np.zeros((b, hkv, s))
  for bi in range(b):
    last = q_pos[bi].max()
    for h in range(hq):
      kh = h // g
      for ti in range(t):
        qp = q_pos[bi, ti]
        vis = []
        for si in range(s):
          kp = k_pos[bi, kh, si]
          ok = si < k_lengths[bi, kh] and kp >= 0 and qp >= 0 and kp <= qp
          if window is not None:
            ok = ok and (qp - kp < window or kp < sinks)
          vis.append(ok)
        vis = np.array(vis)
        if not vis.any():
          continue
        logits = (k @ q[bi, h, ti])[bi, kh] * scale
        if softcap:
          logits = softcap * np.tanh(logits / softcap)
        logits = np.where(vis, logits, -np.inf)
        m = logits.max()
        e = np.where(vis, np.exp(logits - m), 0.0)
        den = e.sum()
        if sink_logits is not None:
          m2 = max(m, sink_logits[h])
          e = np.where(vis, np.exp(logits - m2), 0.0)
          den = e.sum() + np.exp(sink_logits[h] - m2)
          m = m2
        p = e / den
        out[bi, h, ti] = p @ v[bi, kh]
        lse[bi, h, ti] = m + math.log(den)
        if colsum_window is None or qp > last - colsum_window:
          colsum[bi, kh] += p
  return out, lse, colsum


def make(b=2, hq=4, hkv=2, t=5, s=9, d=8, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, hq, t, d)).astype(np.float32)
  k = rng.normal(size=(b, hkv, s, d)).astype(np.float32)
  v = rng.normal(size=(b, hkv, s, d)).astype(np.float32)
  k_lengths = rng.integers(0, s + 1, size=(b, hkv)).astype(np.int32)
  k_pos = np.tile(np.arange(s, dtype=np.int32), (b, hkv, 1))
  q_pos = np.tile(np.arange(s - t, s, dtype=np.int32), (b, 1))
  return q, k, v, k_lengths, q_pos, k_pos


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("window,sinks,softcap", [(None, 0, None), (3, 0, None), (3, 2, None),
                                                  (None, 0, 5.0), (4, 1, 2.0)])
def test_matches_naive(hq, hkv, window, sinks, softcap):
  q, k, v, kl, qp, kp = make(hq=hq, hkv=hkv)
  qp[1, :2] = -1  # padding queries
  kp[0, 0, 3] = -1  # an empty slot in the middle
  spec = A.AttentionSpec(window=window, n_sink=sinks, softcap=softcap, backend="xla")
  res = A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(kl),
                    q_positions=jnp.asarray(qp), k_positions=jnp.asarray(kp), spec=spec,
                    return_lse=True, return_colsum=True)
  out, lse, colsum = naive(q, k, v, kl, qp, kp, scale=8 ** -0.5, window=window, sinks=sinks,
                           softcap=softcap)
  np.testing.assert_allclose(res.out, out, atol=2e-5)
  np.testing.assert_allclose(res.lse, lse, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(res.colsum, colsum, atol=2e-5)


def test_sink_logits_and_colsum_window():
  q, k, v, kl, qp, kp = make(hq=4, hkv=2, t=6)
  sl = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
  res = A.attention(*map(jnp.asarray, (q, k, v, kl)), q_positions=jnp.asarray(qp),
                    k_positions=jnp.asarray(kp), spec=A.AttentionSpec(backend="xla"),
                    sink_logits=jnp.asarray(sl), return_lse=True, return_colsum=True,
                    colsum_window=2)
  out, lse, colsum = naive(q, k, v, kl, qp, kp, scale=8 ** -0.5, sink_logits=sl,
                           colsum_window=2)
  np.testing.assert_allclose(res.out, out, atol=2e-5)
  np.testing.assert_allclose(res.lse, lse, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(res.colsum, colsum, atol=2e-5)


def test_query_chunking_equals_one_shot():
  q, k, v, kl, qp, kp = make(t=9, s=9)
  kl[:] = 9
  args = dict(q_positions=jnp.asarray(qp), k_positions=jnp.asarray(kp), return_lse=True,
              return_colsum=True)
  one = A.attention(*map(jnp.asarray, (q, k, v, kl)), spec=A.AttentionSpec(backend="xla"), **args)
  chunked = A.attention(*map(jnp.asarray, (q, k, v, kl)),
                        spec=A.AttentionSpec(backend="xla", q_chunk=4), **args)
  for a, b in zip(one, chunked):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_window_sees_exactly_w_tokens():
  # uniform keys -> probabilities are 1/(visible count)
  b, s, w = 1, 10, 4
  q = jnp.ones((b, 1, s, 4))
  k = jnp.ones((b, 1, s, 4))
  v = jnp.ones((b, 1, s, 4))
  pos = jnp.arange(s, dtype=jnp.int32)[None]
  res = A.attention(q, k, v, jnp.full((b, 1), s, jnp.int32), q_positions=pos,
                    k_positions=pos[:, None], spec=A.AttentionSpec(window=w, backend="xla"),
                    return_colsum=True)
  # column s is seen by queries s..s+w-1 (clipped at the end) with prob 1/min(t+1, w)
  expected = np.zeros(s)
  for t in range(s):
    n = min(t + 1, w)
    for j in range(t - n + 1, t + 1):
      expected[j] += 1 / n
  np.testing.assert_allclose(res.colsum[0, 0], expected, atol=1e-6)


def test_fully_masked_rows_are_finite_bf16():
  q, k, v, kl, qp, kp = make()
  kl[:] = 0  # nothing visible
  big = jnp.asarray(k) * 1e4
  res = A.attention(jnp.asarray(q, jnp.bfloat16), big.astype(jnp.bfloat16),
                    jnp.asarray(v, jnp.bfloat16), jnp.asarray(kl), q_positions=jnp.asarray(qp),
                    k_positions=jnp.asarray(kp), spec=A.AttentionSpec(backend="xla"),
                    return_lse=True, return_colsum=True)
  assert bool(jnp.all(jnp.isfinite(res.out.astype(jnp.float32))))
  assert bool(jnp.all(res.out == 0))
  assert bool(jnp.all(jnp.isfinite(res.lse)))
  assert bool(jnp.all(res.colsum == 0))


def test_large_magnitude_bf16_no_nan():
  q, k, v, kl, qp, kp = make()
  kl[:] = 9
  res = A.attention(jnp.asarray(q * 300, jnp.bfloat16), jnp.asarray(k * 300, jnp.bfloat16),
                    jnp.asarray(v, jnp.bfloat16), jnp.asarray(kl), q_positions=jnp.asarray(qp),
                    k_positions=jnp.asarray(kp), spec=A.AttentionSpec(backend="xla"))
  assert bool(jnp.all(jnp.isfinite(res.out.astype(jnp.float32))))


def test_bad_input_errors():
  q, k, v, kl, qp, kp = map(jnp.asarray, make(hq=3, hkv=2))
  with pytest.raises(ValueError, match="multiple of kv heads"):
    A.attention(q, k, v, kl, q_positions=qp, k_positions=kp)
  q, k, v, kl, qp, kp = map(jnp.asarray, make())
  with pytest.raises(ValueError, match="k_lengths shape"):
    A.attention(q, k, v, kl[:, :1], q_positions=qp, k_positions=kp)
  with pytest.raises(ValueError, match="backend"):
    A.AttentionSpec(backend="cuda")
  with pytest.raises(ValueError, match="window"):
    A.AttentionSpec(window=0)


def test_jit_and_grad():
  q, k, v, kl, qp, kp = map(jnp.asarray, make())
  f = jax.jit(lambda q: A.attention(q, k, v, kl, q_positions=qp, k_positions=kp).out.sum())
  g = jax.grad(f)(q)
  assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("t", [1, 7])
def test_pallas_dispatch_matches_xla_in_interpret_mode(t):
  # The dispatch point forwards every option (causal, window, sinks, softcap, sink logits).
  q, k, v, kl, qp, kp = make(hq=4, hkv=2, t=t, s=19, d=64)
  args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(kl))
  sl = jnp.asarray([0.3, -0.2, 0.0, 1.0], jnp.float32)
  for causal in (True, False):
    kw = dict(q_positions=jnp.asarray(qp), k_positions=jnp.asarray(kp), sink_logits=sl,
              return_lse=True, return_colsum=True)
    spec = dict(window=5, n_sink=1, softcap=20.0, causal=causal)
    ref = A.attention(*args, spec=A.AttentionSpec(backend="xla", **spec), **kw)
    got = A.attention(*args, spec=A.AttentionSpec(backend="pallas", **spec), interpret=True, **kw)
    np.testing.assert_allclose(got.out, ref.out, atol=2e-5)
    np.testing.assert_allclose(got.lse, ref.lse, atol=2e-5)
    np.testing.assert_allclose(got.colsum, ref.colsum, atol=2e-5)


# -- the blocked XLA path (block skipping + online softmax) ----------------------------------
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1)])
@pytest.mark.parametrize("window,sinks,softcap,colsum_window,use_sink_logits",
                         [(None, 0, None, None, False), (3, 2, None, 2, False),
                          (None, 0, 5.0, 3, True), (4, 0, None, None, True)])
def test_blocked_matches_naive(hq, hkv, window, sinks, softcap, colsum_window,
                               use_sink_logits):
  # s=10 with 3-slot blocks: the last block is clamped and overlaps the one before it.
  q, k, v, kl, qp, kp = make(hq=hq, hkv=hkv, t=7, s=10, seed=3)
  qp[1, :2] = -1
  qp[0, 4] = -1  # padding inside the chunk
  kp[0, 0, 3] = -1
  kl[0, 0] = 10
  sl = np.linspace(-1.0, 1.0, hq).astype(np.float32) if use_sink_logits else None
  spec = A.AttentionSpec(window=window, n_sink=sinks, softcap=softcap, q_chunk=3,
                         backend="xla")
  res = A.blocked_attention(*map(jnp.asarray, (q, k, v, kl)), q_positions=jnp.asarray(qp),
                            k_positions=jnp.asarray(kp), spec=spec,
                            sink_logits=None if sl is None else jnp.asarray(sl),
                            return_colsum=True, colsum_window=colsum_window, k_block=3)
  out, lse, colsum = naive(q, k, v, kl, qp, kp, scale=8 ** -0.5, window=window, sinks=sinks,
                           softcap=softcap, sink_logits=sl, colsum_window=colsum_window)
  np.testing.assert_allclose(res.out, out, atol=2e-5)
  np.testing.assert_allclose(res.lse, lse, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(res.colsum, colsum, atol=2e-5)


def test_blocked_reads_a_layer_of_a_stacked_cache_in_place():
  q, k, v, kl, qp, kp = make(hq=4, hkv=2, t=1, s=11, seed=4)
  ks = np.stack([k * 0 + 7, k, k * 3])  # other layers hold different values
  vs = np.stack([v * 0 - 7, v, v * 3])
  res = A.attention(jnp.asarray(q), jnp.asarray(ks), jnp.asarray(vs), jnp.asarray(kl),
                    q_positions=jnp.asarray(qp), k_positions=jnp.asarray(kp),
                    spec=A.AttentionSpec(backend="xla"), return_lse=True, return_colsum=True,
                    layer=jnp.int32(1))
  out, lse, colsum = naive(q, k, v, kl, qp, kp, scale=8 ** -0.5)
  np.testing.assert_allclose(res.out, out, atol=2e-5)
  np.testing.assert_allclose(res.lse, lse, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(res.colsum, colsum, atol=2e-5)
  with pytest.raises(ValueError, match="layer-stacked"):
    A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(kl),
                q_positions=jnp.asarray(qp), k_positions=jnp.asarray(kp), layer=jnp.int32(0))


def test_long_key_sets_dispatch_to_blocked_and_keep_reference_values_and_grads():
  # S > K_BLOCK: attention() takes the blocked path; values and gradients (a custom VJP
  # through the reference) agree with the one-shot reference.
  s = A.K_BLOCK + 37
  q, k, v, kl, qp, kp = make(hq=4, hkv=2, t=40, s=s, seed=5)
  kl[:] = s
  kl[1, 0] = s - 100
  args = dict(q_positions=jnp.asarray(qp), k_positions=jnp.asarray(kp),
              spec=A.AttentionSpec(window=300, n_sink=4, backend="xla"))
  ref = A.reference_attention(*map(jnp.asarray, (q, k, v, kl)), **args, colsum_window=8)
  got = A.attention(*map(jnp.asarray, (q, k, v, kl)), **args, return_lse=True,
                    return_colsum=True, colsum_window=8)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  loss = lambda fn: lambda q_, k_: (fn(q_, k_, jnp.asarray(v), jnp.asarray(kl), **args).out
                                    ** 2).sum()
  g_got = jax.grad(loss(A.attention), argnums=(0, 1))(jnp.asarray(q), jnp.asarray(k))
  g_ref = jax.grad(loss(A.reference_attention), argnums=(0, 1))(jnp.asarray(q), jnp.asarray(k))
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
