"""kvjax.recurrent: chunked == recurrent linear attention (values and gradients), padding
invariance, diagonal scans, conv windows, the RecurrentState protocol, latent cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention as attn_lib
from kvjax import recurrent as rec


def randn(seed, *shape):
  """Test inputs from numpy (jax.random would compile a kernel per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --- linear attention ---------------------------------------------------------------------------
def _inputs(vector, b=2, h=2, t=11, dk=4, dv=3, seed=0):
  q, k = randn(seed, b, h, t, dk), randn(seed + 1, b, h, t, dk)
  v = randn(seed + 2, b, h, t, dv)
  shape = (b, h, t, dk) if vector else (b, h, t)
  log_a = -np.logaddexp(0.0, np.asarray(randn(seed + 3, *shape))) * 2.0  # decays in (0, 1)
  s0 = randn(seed + 4, b, h, dk, dv)
  return q, k, v, log_a, s0


def naive_linear_attention(q, k, v, log_a, s0):
  """Python loop over tokens with explicit matrices (float64)."""
  q, k, v, log_a, s = (np.asarray(x, np.float64) for x in (q, k, v, log_a, s0))
  if log_a.ndim == 3:
    log_a = np.repeat(log_a[..., None], q.shape[-1], -1)
  out = np.zeros(v.shape)
  for t in range(q.shape[2]):
    s = np.exp(log_a[:, :, t])[..., None] * s + k[:, :, t, :, None] * v[:, :, t, None, :]
    out[:, :, t] = np.einsum("bhk,bhkv->bhv", q[:, :, t], s)
  return out, s


@pytest.mark.parametrize("vector", [False, True])
def test_chunked_and_recurrent_equal_the_naive_loop(vector):
  q, k, v, log_a, s0 = _inputs(vector)
  ref_o, ref_s = naive_linear_attention(q, k, v, log_a, s0)
  rec_o, rec_s = jax.jit(rec.linear_attention_recurrent)(q, k, v, log_a, s0)
  np.testing.assert_allclose(rec_o, ref_o, atol=1e-4)
  np.testing.assert_allclose(rec_s, ref_s, atol=1e-4)
  for c in (4, 16):  # T = 11 is not a multiple of 4; 16 > T is a single chunk
    o, s = jax.jit(functools.partial(rec.linear_attention_chunked, chunk_size=c))(
        q, k, v, log_a, s0)
    np.testing.assert_allclose(o, ref_o, atol=1e-4, err_msg=f"chunk={c}")
    np.testing.assert_allclose(s, ref_s, atol=1e-4, err_msg=f"chunk={c}")


def test_chunked_gradients_equal_recurrent_gradients_at_strong_decay():
  q, k, v, log_a, s0 = _inputs(True, t=9)
  log_a = log_a * 20.0  # e^{-40}-scale decays: a naive q*e^{b}, k*e^{-b} split overflows

  def loss(fn, *args):
    o, s = fn(*args)
    return jnp.sum(jnp.sin(o)) + jnp.sum(s ** 2)

  chunked = functools.partial(rec.linear_attention_chunked, chunk_size=4)
  g_c = jax.jit(jax.grad(functools.partial(loss, chunked), argnums=(0, 1, 2, 3, 4)))(
      q, k, v, log_a, s0)
  g_r = jax.jit(jax.grad(functools.partial(loss, rec.linear_attention_recurrent),
                         argnums=(0, 1, 2, 3, 4)))(q, k, v, log_a, s0)
  for a, b in zip(g_c, g_r):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_padding_tokens_leave_the_state_unchanged():
  q, k, v, log_a, s0 = _inputs(False, b=1, t=6)
  valid = jnp.array([[False, True, True, False, True, False]])
  idx = np.array([1, 2, 4])

  @jax.jit
  def run(q, k, v, log_a, s0):
    got = rec.linear_attention_chunked(q, k, v, log_a, s0, valid, chunk_size=4)
    ref = rec.linear_attention_recurrent(q[:, :, idx], k[:, :, idx], v[:, :, idx],
                                         log_a[:, :, idx], s0)
    return got, ref

  (o, s), (o_ref, s_ref) = run(q, k, v, log_a, s0)
  np.testing.assert_allclose(s, s_ref, atol=1e-5)
  np.testing.assert_allclose(o[:, :, idx], o_ref, atol=1e-5)


def test_linear_state_scan_equals_the_naive_loop_and_skips_padding():
  q, k, v, log_a, s0 = _inputs(False, t=6)
  pos = jnp.asarray(np.where(np.arange(6) < 4, np.arange(6), -1)[None].repeat(2, 0), jnp.int32)
  ref_o, ref_s = naive_linear_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], log_a[:, :, :4],
                                        s0)
  o, st_ = jax.jit(lambda s, *xs: s.scan(xs, pos))(rec.LinearAttentionState(state=s0),
                                                     q, k, v, log_a)
  np.testing.assert_allclose(o[:, :, :4], ref_o, atol=1e-4)
  np.testing.assert_allclose(st_.state, ref_s, atol=1e-4)


def test_diagonal_state_scan_equals_a_loop():
  a = np.random.default_rng(5).uniform(size=(1, 5, 3))
  x, h0 = np.asarray(randn(6, 1, 5, 3)), np.asarray(randn(7, 1, 3))
  h, want = [], h0[0].astype(np.float64)
  for t in range(5):
    want = a[0, t] * want + x[0, t]
    h.append(want)
  got, st_ = rec.DiagonalState(h=jnp.asarray(h0)).scan((jnp.asarray(a, jnp.float32),
                                                        jnp.asarray(x)), jnp.arange(5)[None])
  np.testing.assert_allclose(got[0], np.stack(h), atol=1e-5)
  np.testing.assert_allclose(st_.h[0], want, atol=1e-5)


def test_linear_state_protocol():
  st_ = rec.LinearAttentionState.init(2, 3, 4, 5)
  assert st_.nbytes == 2 * 3 * 4 * 5 * 4 and st_.capacity == 0
  assert st_.CAPS.recurrent and st_.CAPS.fixed_size and not st_.CAPS.pressable
  np.testing.assert_array_equal(st_.length, np.zeros((2, 3)))
  st_.check_room(jnp.arange(10)[None])  # a fixed-size state never overflows
  with pytest.raises(ValueError, match="state shape"):
    rec.linear_attention_recurrent(*_inputs(False)[:4], jnp.zeros((2, 2, 3, 3)))
  with pytest.raises(ValueError, match="chunk_size=0"):
    rec.LinearAttentionSpec(chunk_size=0)


# --- diagonal scan, conv ------------------------------------------------------------------------
def test_diagonal_scan_parallel_equals_sequential_with_padding():
  a = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 7, 3)), jnp.float32)
  x, h0 = randn(1, 2, 7, 3), randn(2, 2, 3)
  valid = jnp.array([[True] * 7, [True] * 4 + [False] * 3])

  @jax.jit
  def run(a, x, h0):
    return (rec.diagonal_scan(a, x, h0, valid, parallel=True),
            rec.diagonal_scan(a, x, h0, valid, parallel=False),
            rec.diagonal_scan(a[1:, :4], x[1:, :4], h0[1:])[1])

  (hp, lp), (hs, ls), l4 = run(a, x, h0)
  np.testing.assert_allclose(hp, hs, atol=1e-5)
  np.testing.assert_allclose(lp, ls, atol=1e-5)
  np.testing.assert_allclose(lp[1], l4[0], atol=1e-5)  # trailing padding: state unchanged


def test_conv_window_carries_exactly_the_last_inputs():
  w = randn(0, 3, 2)
  b = jnp.zeros((2,))
  x = randn(1, 1, 7, 2)

  @jax.jit
  def run(x):
    full, _ = rec.causal_conv1d(x, w, b, jnp.zeros((1, 2, 2)))
    state = rec.ConvState.init(1, 3, 2)
    outs = []
    for s, e in ((0, 3), (3, 4), (4, 7)):
      y, state = state.scan((x[:, s:e],), jnp.arange(s, e)[None], w=w, b=b)
      outs.append(y)
    # right padding: the window stops at the last valid input
    _, padded = rec.ConvState.init(1, 3, 2).scan((x[:, :5],), jnp.array([[0, 1, 2, -1, -1]]),
                                                 w=w, b=b)
    return full, jnp.concatenate(outs, 1), state.window, padded.window

  full, chunked, window, padded_window = run(x)
  np.testing.assert_allclose(chunked, full, atol=1e-6)
  np.testing.assert_allclose(window, x[:, 5:7])
  np.testing.assert_allclose(padded_window, x[:, 1:3])


# --- latent cache --------------------------------------------------------------------------------
def test_latent_cache_attend_equals_mqa_over_concatenated_keys_and_overflow_raises():
  r, dr, h = 6, 2, 3
  c = rec.LatentKVCache.init(1, 5, r, dr)
  kn, q = randn(0, 1, 1, 4, r + dr), randn(1, 1, h, 4, r + dr)
  pos = jnp.array([[0, 1, -1, 2]])  # padding inside the chunk is skipped
  spec = attn_lib.AttentionSpec(scale=0.3)

  @jax.jit
  def run(c, q, kn):
    res, c2 = c.attend(q, kn, None, pos, spec)
    keep = kn[:, :, jnp.array([0, 1, 3])]
    ref = attn_lib.reference_attention(q, keep, keep[..., :r], jnp.array([[3]]),
                                       q_positions=pos, k_positions=jnp.array([[[0, 1, 2]]]),
                                       spec=spec)
    return res.out, ref.out, c2

  out, ref, c2 = run(c, q, kn)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  np.testing.assert_array_equal(c2.lengths, [3])
  assert c2.nbytes == 5 * (r + dr) * 4 + 5 * 4 + 4
  with pytest.raises(ValueError, match="latent cache overflow"):
    c2.append(kn[:, :, :3], None, jnp.array([[3, 4, 5]]))
  with pytest.raises(ValueError, match="v_new must be None"):
    c.append(kn, kn, pos)
  # the protocol's read-back: one kv head of keys [c_kv ; k_rope] and values c_kv, in order
  view = c2.materialize()
  np.testing.assert_array_equal(view.k[0, 0, :3], kn[0, 0, jnp.array([0, 1, 3])])
  np.testing.assert_array_equal(view.v[0, 0, :3], kn[0, 0, jnp.array([0, 1, 3]), :r])
  np.testing.assert_array_equal(view.positions[0, 0], [0, 1, 2, -1, -1])
  assert c2.head_dims == (r + dr, r) and not c2.CAPS.fixed_size
