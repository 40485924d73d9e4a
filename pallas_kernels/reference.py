"""Pure-jnp reference attention: exactly docs/CONVENTIONS.md, no tricks.

It materialises the [B, Hq, T, S] score matrix in float32, so it is for tests and for
the "XLA" baseline of the benchmark at modest sizes, not for long contexts.

Shapes: q [B, Hq, T, D]; k [B, Hkv, S, D]; v [B, Hkv, S, Dv]; k_lengths [B, Hkv];
q_positions [B, T]; k_positions [B, Hkv, S]; query head h reads kv head h // G.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def visibility(q_positions, k_positions, k_lengths, *, causal=True, window=None,
               n_sink=0):
  """[B, Hkv, T, S] bool: slot s visible to query t (docs/CONVENTIONS.md)."""
  s = k_positions.shape[-1]
  slot = jnp.arange(s, dtype=jnp.int32)
  valid = (slot[None, None, :] < k_lengths[:, :, None]) & (k_positions >= 0)
  qp = q_positions[:, None, :, None]
  kp = k_positions[:, :, None, :]
  vis = valid[:, :, None, :] & (qp >= 0)
  if causal:
    vis = vis & (kp <= qp)
  if window is not None:
    in_window = (qp - kp) < window
    if n_sink:
      in_window = in_window | (kp < n_sink)
    vis = vis & in_window
  return vis


@functools.partial(jax.jit, static_argnames=("scale", "causal", "window", "n_sink",
                                             "softcap", "colsum_window"))
def attention_reference(q, k, v, k_lengths, *, q_positions, k_positions, scale=None,
                        causal=True, window=None, n_sink=0, softcap=None,
                        sink_logits=None, colsum_window=None):
  """Reference attention.

  Args:
    q: [B, Hq, T, D]; k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv].
    k_lengths: [B, Hkv] int32; q_positions: [B, T] int32; k_positions: [B, Hkv, S] int32.
    scale: logit scale, default D ** -0.5.
    causal, window, n_sink, softcap: masking/logit options (CONVENTIONS.md).
    sink_logits: optional [Hq] learned sink logits (softmax denominator only).
    colsum_window: only queries with q_pos > max_t q_pos[b] - colsum_window count in colsum.

  Returns:
    out [B, Hq, T, Dv] (q.dtype), lse [B, Hq, T] float32, colsum [B, Hkv, S] float32.
  """
  b, hq, t, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  scale = d ** -0.5 if scale is None else scale
  qf = q.reshape(b, hkv, g, t, d).astype(jnp.float32)
  s = jnp.einsum("bhgtd,bhsd->bhgts", qf, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  vis = visibility(q_positions, k_positions, k_lengths, causal=causal, window=window,
                   n_sink=n_sink)[:, :, None]          # [B, Hkv, 1, T, S]
  s = jnp.where(vis, s, NEG_INF)
  m = jnp.max(s, axis=-1, keepdims=True)
  if sink_logits is not None:
    sl = sink_logits.astype(jnp.float32).reshape(1, hkv, g, 1, 1)
    m = jnp.maximum(m, sl)
  p = jnp.where(vis, jnp.exp(s - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  if sink_logits is not None:
    denom = denom + jnp.exp(sl - m)
  any_vis = jnp.any(vis, axis=-1, keepdims=True)
  safe = jnp.where(denom > 0, denom, 1.0)
  p = p / safe
  # Values of invalid slots never reach the output, even if they hold NaN.
  slot = jnp.arange(k.shape[2], dtype=jnp.int32)
  valid_slot = (slot[None, None, :] < k_lengths[:, :, None]) & (k_positions >= 0)
  vf = jnp.where(valid_slot[..., None], v.astype(jnp.float32), 0.0)
  out = jnp.einsum("bhgts,bhsd->bhgtd", p, vf, precision=jax.lax.Precision.HIGHEST)
  lse = jnp.where(any_vis, m + jnp.log(safe), NEG_INF)[..., 0]
  qw = q_positions >= 0
  if colsum_window is not None:
    last = jnp.max(q_positions, axis=-1, keepdims=True)
    qw = qw & (q_positions > last - colsum_window)
  colsum = jnp.einsum("bhgts,bt->bhs", p, qw.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  return (out.reshape(b, hq, t, -1).astype(q.dtype), lse.reshape(b, hq, t), colsum)
