"""Properties of the shared pieces: exact split combine, sound block ranges."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _common as C
from pallas_kernels.reference import attention_reference
from tests.pallas_kernels._util import problem

_SETTINGS = dict(max_examples=6, deadline=None, derandomize=True,
                 suppress_health_check=list(hypothesis.HealthCheck))


@functools.partial(jax.jit, static_argnames=("chunks",))
def _split_and_combine(q, k, v, lengths, qpos, kpos, chunks):
  """Reference on `chunks` slot ranges (as split-K programs see them), merged by lse."""
  s = k.shape[2]
  bounds = np.linspace(0, s, chunks + 1).astype(int)
  outs, lses = [], []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    slot = jnp.arange(s)
    in_chunk = (slot >= lo) & (slot < hi)
    o, l, _ = attention_reference(q, k, v, lengths, q_positions=qpos,
                                  k_positions=jnp.where(in_chunk, kpos, -1))
    outs.append(o.astype(jnp.float32))
    lses.append(l)
  return C.combine_splits(jnp.stack(outs, axis=2), jnp.stack(lses, axis=2))


@hypothesis.settings(**_SETTINGS)
@hypothesis.given(seed=st.integers(0, 2 ** 16))
def test_combine_splits_is_exact(seed):
  chunks = 5
  # Given the reference on disjoint slot chunks (some empty: short lengths)
  p = problem(batch=2, q_heads=2, kv_heads=1, queries=2, slots=30, head_dim=8, seed=seed,
              nan_garbage=False)
  out, lse = _split_and_combine(p["q"], p["k"], p["v"], p["k_lengths"], p["q_positions"],
                                p["k_positions"], chunks)
  # Then the lse-merge equals attention over all slots, empty rows included.
  want_out, want_lse, _ = attention_reference(p["q"], p["k"], p["v"], p["k_lengths"],
                                              q_positions=p["q_positions"],
                                              k_positions=p["k_positions"])
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnames=("spec",))
def _ranges_and_visibility(qpos, kpos, lengths, spec):
  ranges = C.key_ranges(qpos, kpos, lengths, block_q=4, block_k=4, spec=spec)
  # brute force with the in-kernel predicate: [B, Hkv, T, S]
  vis = C.visible(qpos[:, None, :, None], kpos[:, :, None, :],
                  jnp.arange(kpos.shape[-1])[None, None, None, :],
                  lengths[:, :, None, None], spec)
  return ranges, vis


@hypothesis.settings(**_SETTINGS)
@hypothesis.given(seed=st.integers(0, 2 ** 16),
                  spec=st.sampled_from([C.MaskSpec(1.0), C.MaskSpec(1.0, window=5),
                                        C.MaskSpec(1.0, window=3, n_sink=2),
                                        C.MaskSpec(1.0, causal=False)]))
def test_key_ranges_cover_every_visible_pair(seed, spec):
  # Given shuffled slot positions with evictions, padding queries and ragged lengths
  rng = np.random.default_rng(seed)
  b, hkv, t, s = 2, 2, 12, 24
  kpos = np.stack([rng.permutation(s) for _ in range(b * hkv)]).reshape(b, hkv, s)
  kpos = np.where(rng.random(kpos.shape) < 0.2, -1, kpos).astype(np.int32)
  qpos = np.sort(rng.integers(-1, s, (b, t)), axis=1).astype(np.int32)
  lengths = rng.integers(0, s + 1, (b, hkv)).astype(np.int32)
  r, vis = jax.tree.map(np.asarray, _ranges_and_visibility(qpos, kpos, lengths, spec))
  # Then every visible (query, slot) pair falls in a visited key block of its query block
  for bi, hi, ti, si in zip(*np.nonzero(vis)):
    qb, kb = ti // 4, si // 4
    a1, n1, a2, n2 = (r.a1[bi, hi, qb], r.n1[bi, hi, qb], r.a2[bi, hi, qb], r.n2[bi, hi, qb])
    assert a1 <= kb < a1 + n1 or a2 <= kb < a2 + n2, (bi, hi, ti, si)
  # and the two ranges never overlap (each block is visited once).
  assert np.all((r.n1 == 0) | (r.a1 + r.n1 <= r.a2))
