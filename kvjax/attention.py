"""Attention over KV caches: the reference (XLA) path and the one dispatch point.

Conventions (see docs/CONVENTIONS.md):
  B batch, T queries, S key slots, Hq query heads, Hkv kv heads, G = Hq // Hkv,
  D head_dim, Dv value head_dim.

  q            [B, Hq, T, D]     queries (RoPE applied)
  k, v         [B, Hkv, S, D|Dv] keys (RoPE applied) and values
  q_positions  [B, T]    int32   absolute position, -1 = padding query
  k_positions  [B, Hkv, S] int32 original position of each slot, -1 = empty
  k_lengths    [B, Hkv]  int32   slots >= length are invalid

A slot is visible to a query iff it is valid, causal (k_pos <= q_pos) and, with a window
W, either q_pos - k_pos < W or k_pos < sink_tokens. Query head h reads kv head h // G;
key/value heads are never repeated in memory (queries are reshaped to
[B, Hkv, G, T, D] instead).

Every query chunk is processed with a softmax over visible slots in float32. A query with
no visible slot gets output 0 and lse = -1e30: finite, never NaN.

`backend="xla"` runs the reference below; `backend="pallas"` calls `pallas_kernels`
(the only import of kernels in kvjax); `backend="auto"` picks pallas on GPU/TPU when the
kernel supports the requested options, xla otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite "minus infinity": masked logits and empty-row lse
BACKENDS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Static attention options of one layer (hashable; safe as a jit static arg).

  Attributes:
    scale: logit scale; None means head_dim ** -0.5.
    window: sliding window W (query sees exactly W tokens incl. itself); None = full.
    sink_tokens: with a window, tokens at positions < sink_tokens stay visible
      (StreamingLLM attention sinks; Xiao et al., 2023).
    softcap: logit soft-capping `c * tanh(s / c)` (Gemma 2); None = off.
    causal: causal masking on positions.
    backend: "auto" | "xla" | "pallas".
    q_chunk: reference path processes queries in chunks of this many tokens so the
      score matrix never exceeds [B, Hq, q_chunk, S].
  """

  scale: Optional[float] = None
  window: Optional[int] = None
  sink_tokens: int = 0
  softcap: Optional[float] = None
  causal: bool = True
  backend: str = "auto"
  q_chunk: int = 512

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"backend={self.backend!r}; allowed: {BACKENDS}")
    if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
      raise ValueError(f"window={self.window!r}; must be a positive int or None")
    if self.sink_tokens < 0:
      raise ValueError(f"sink_tokens={self.sink_tokens}; must be >= 0")
    if self.softcap is not None and self.softcap <= 0:
      raise ValueError(f"softcap={self.softcap}; must be > 0 or None")
    if self.q_chunk < 1:
      raise ValueError(f"q_chunk={self.q_chunk}; must be >= 1")


class AttentionOutput(NamedTuple):
  out: jax.Array                 # [B, Hq, T, Dv], dtype of q
  lse: Optional[jax.Array]       # [B, Hq, T] float32 log-sum-exp of visible logits
  colsum: Optional[jax.Array]    # [B, Hkv, S] float32 attention mass per slot


def visibility_mask(q_positions, k_positions, k_lengths, *, causal=True, window=None,
                    sink_tokens=0):
  """Boolean mask [B, Hkv, T, S] of slots visible to each query (docs/CONVENTIONS.md)."""
  s = k_positions.shape[-1]
  slot = jnp.arange(s, dtype=jnp.int32)
  valid_k = (slot[None, None, :] < k_lengths[:, :, None]) & (k_positions >= 0)  # [B,Hkv,S]
  qp = q_positions[:, None, :, None]  # [B,1,T,1]
  kp = k_positions[:, :, None, :]     # [B,Hkv,1,S]
  mask = valid_k[:, :, None, :] & (qp >= 0)
  if causal:
    mask &= kp <= qp
  if window is not None:
    in_window = (qp - kp) < window
    if sink_tokens:
      in_window |= kp < sink_tokens
    mask &= in_window
  return mask


def _colsum_query_weights(q_positions, colsum_window):
  """[B, T] float32 weights: 1 for queries that count towards colsum."""
  valid = q_positions >= 0
  if colsum_window is None:
    return valid.astype(jnp.float32)
  last = jnp.max(q_positions, axis=-1, keepdims=True)
  return (valid & (q_positions > last - colsum_window)).astype(jnp.float32)


def _reference_chunk(q, k, v, q_positions, k_positions, k_lengths, qweights, *, scale,
                     causal, window, sink_tokens, softcap, sink_logits):
  """Attention for one query chunk. q [B,Hq,Tc,D] -> out, lse, colsum."""
  b, hq, t, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  qg = q.reshape(b, hkv, g, t, d).astype(jnp.float32)
  logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, k.astype(jnp.float32)) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  mask = visibility_mask(q_positions, k_positions, k_lengths, causal=causal,
                         window=window, sink_tokens=sink_tokens)[:, :, None]
  logits = jnp.where(mask, logits, NEG_INF)
  m = jnp.max(logits, axis=-1, keepdims=True)
  if sink_logits is not None:
    sl = sink_logits.astype(jnp.float32).reshape(1, hkv, g, 1, 1)
    m = jnp.maximum(m, sl)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  if sink_logits is not None:
    denom = denom + jnp.exp(sl - m)
  any_visible = jnp.any(mask, axis=-1, keepdims=True)
  safe = jnp.where(denom > 0, denom, 1.0)
  p = p / safe
  out = jnp.einsum("bhgts,bhsd->bhgtd", p, v.astype(jnp.float32))
  lse = jnp.where(any_visible, m + jnp.log(safe), NEG_INF)[..., 0]
  # Multiply-and-reduce fuses with the softmax on XLA:CPU; the equivalent einsum made XLA
  # transpose p and tripled the cost of a chunk whenever colsum was requested.
  colsum = jnp.sum(p * qweights[:, None, None, :, None], axis=(2, 3))
  return (out.reshape(b, hq, t, -1).astype(q.dtype), lse.reshape(b, hq, t), colsum)


def reference_attention(q, k, v, k_lengths, *, q_positions, k_positions, spec, sink_logits=None,
                        colsum_window=None):
  """Pure-jnp attention (the numerical reference). Returns AttentionOutput (all fields)."""
  b, hq, t, d = q.shape
  scale = spec.scale if spec.scale is not None else d ** -0.5
  qweights = _colsum_query_weights(q_positions, colsum_window)
  kw = dict(scale=scale, causal=spec.causal, window=spec.window,
            sink_tokens=spec.sink_tokens, softcap=spec.softcap, sink_logits=sink_logits)
  chunk = spec.q_chunk
  if t <= chunk:
    out, lse, colsum = _reference_chunk(q, k, v, q_positions, k_positions, k_lengths,
                                        qweights, **kw)
    return AttentionOutput(out, lse, colsum)
  # Long query blocks: scan over query chunks so memory is O(chunk * S), not O(T * S).
  n = -(-t // chunk)
  pad = n * chunk - t
  qp = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
  pp = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=-1)
  wp = jnp.pad(qweights, ((0, 0), (0, pad)))
  qs = qp.reshape(b, hq, n, chunk, d).transpose(2, 0, 1, 3, 4)
  ps = pp.reshape(b, n, chunk).transpose(1, 0, 2)
  ws = wp.reshape(b, n, chunk).transpose(1, 0, 2)

  def body(colsum, xs):
    qc, pc, wc = xs
    o, l, c = _reference_chunk(qc, k, v, pc, k_positions, k_lengths, wc, **kw)
    return colsum + c, (o, l)

  colsum0 = jnp.zeros(k.shape[:3], jnp.float32)
  colsum, (outs, lses) = jax.lax.scan(body, colsum0, (qs, ps, ws))
  out = outs.transpose(1, 2, 0, 3, 4).reshape(b, hq, n * chunk, -1)[:, :, :t]
  lse = lses.transpose(1, 2, 0, 3).reshape(b, hq, n * chunk)[:, :, :t]
  return AttentionOutput(out, lse, colsum)


def _check_shapes(q, k, v, k_lengths, q_positions, k_positions):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4 [B,H,T|S,D]; got {q.shape}, {k.shape}, {v.shape}")
  b, hq, t, d = q.shape
  bk, hkv, s, dk = k.shape
  if bk != b or v.shape[:3] != k.shape[:3] or dk != d:
    raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
  if k_lengths.shape != (b, hkv):
    raise ValueError(f"k_lengths shape {k_lengths.shape}; expected {(b, hkv)}")
  if q_positions.shape != (b, t):
    raise ValueError(f"q_positions shape {q_positions.shape}; expected {(b, t)}")
  if k_positions.shape != (b, hkv, s):
    raise ValueError(f"k_positions shape {k_positions.shape}; expected {(b, hkv, s)}")


def _pallas_available(spec, sink_logits, q, v):
  try:
    import pallas_kernels  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  supports = getattr(pallas_kernels, "supports", None)
  if supports is None:
    return False
  return supports(window=spec.window, sink_tokens=spec.sink_tokens, softcap=spec.softcap,
                  causal=spec.causal, sink_logits=sink_logits is not None,
                  head_dim=q.shape[-1], head_dim_v=v.shape[-1], dtype=q.dtype)


def attention(q, k, v, k_lengths, *, q_positions, k_positions, spec=AttentionSpec(),
              sink_logits=None, return_lse=False, return_colsum=False, colsum_window=None,
              interpret=False) -> AttentionOutput:
  """The dispatch point: attention of queries over a (ragged) key/value set.

  Args:
    q: [B, Hq, T, D] queries.
    k, v: [B, Hkv, S, D] / [B, Hkv, S, Dv] keys and values.
    k_lengths: [B, Hkv] int32 valid slots per (batch, kv head).
    q_positions: [B, T] int32 query positions (-1 = padding).
    k_positions: [B, Hkv, S] int32 slot positions (-1 = empty).
    spec: static AttentionSpec.
    sink_logits: optional learned sink logit per query head [Hq] (softmax denominator only).
    return_lse / return_colsum: request the optional statistics.
    colsum_window: only the last `colsum_window` queries of each row count in colsum.
    interpret: run Pallas kernels in interpret mode (CPU testing).

  Returns:
    AttentionOutput(out [B,Hq,T,Dv], lse [B,Hq,T] | None, colsum [B,Hkv,S] | None).
  """
  _check_shapes(q, k, v, k_lengths, q_positions, k_positions)
  backend = spec.backend
  if backend == "auto":
    on_accel = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
    backend = "pallas" if on_accel and _pallas_available(spec, sink_logits, q, v) else "xla"
  if backend == "pallas":
    if not _pallas_available(spec, sink_logits, q, v):
      raise ValueError(f"backend='pallas' does not support these options ({spec}, "
                       f"sink_logits={'set' if sink_logits is not None else None}); use 'xla'")
    import pallas_kernels  # pylint: disable=import-outside-toplevel
    out, lse, colsum = pallas_kernels.attention(
        q, k, v, k_lengths, q_positions=q_positions, k_positions=k_positions,
        scale=spec.scale, window=spec.window, sink_tokens=spec.sink_tokens,
        softcap=spec.softcap, causal=spec.causal, sink_logits=sink_logits,
        return_lse=return_lse, return_colsum=return_colsum, colsum_window=colsum_window,
        interpret=interpret)
    return AttentionOutput(out, lse if return_lse else None, colsum if return_colsum else None)
  res = reference_attention(q, k, v, k_lengths, q_positions=q_positions,
                            k_positions=k_positions, spec=spec, sink_logits=sink_logits,
                            colsum_window=colsum_window)
  return AttentionOutput(res.out, res.lse if return_lse else None,
                         res.colsum if return_colsum else None)
