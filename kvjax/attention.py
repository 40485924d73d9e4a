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
W, either q_pos - k_pos < W or k_pos < n_sink. Query head h reads kv head h // G;
key/value heads are never repeated in memory (queries are reshaped to
[B, Hkv, G, T, D] instead).

Every query chunk is processed with a softmax over visible slots in float32. A query with
no visible slot gets output 0 and lse = -1e30: finite, never NaN.

`backend="xla"` runs `blocked_attention` when the key set spans more than one block of
K_BLOCK slots (it skips blocks no query can see: half of a causal prefill, the empty room
of a decode cache), else the one-shot `reference_attention` (the numerical reference that
tests and kernels compare against).

The dispatch rule. This module is the only one in kvjax that imports `pallas_kernels`
(lazily, so `import kvjax` never needs Pallas). Every cache kind reaches a kernel through
it -- dense K/V through `attention`, a quantized cache through `quantized_decode`, a page
pool through `paged_decode` -- and `kernel_backend` decides, with one rule for all:

  backend="auto"       the Pallas kernel on GPU/TPU when it supports the request
                       (`pallas_kernels.support`), else the XLA path. On CPU: XLA.
  backend="pallas"     the kernel, or a ValueError naming what it does not support (never a
                       silent fallback); on CPU it raises unless interpret mode is asked.
  backend="interpret"  the kernel in Pallas interpret mode on any platform (CPU tests), or
                       the same ValueError. `interpret=True` with "pallas" is the older
                       spelling of it.
  backend="xla"        the reference path, always.

What a kernel supports is asked once, as a typed `pallas_kernels.KernelRequest` (layout,
storage format, shapes, masking options, requested statistics), answered by a
`pallas_kernels.Support` that names the reason when it is not.

One file on purpose (about 700 lines): the reference, the blocked XLA path and the dispatch
rule are one contract -- every kernel and every cache kind is tested against the functions
here -- and the dispatch point is meant to be the only place a reader has to look.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite "minus infinity": masked logits and empty-row lse
BACKENDS = ("auto", "xla", "pallas", "interpret")
_ACCELERATORS = ("gpu", "tpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Static attention options of one layer (hashable; safe as a jit static arg).

  Attributes:
    scale: logit scale; None means head_dim ** -0.5.
    window: sliding window W (query sees exactly W tokens incl. itself); None = full.
    n_sink: with a window, tokens at positions < n_sink stay visible
      (StreamingLLM attention sinks; Xiao et al., 2023).
    softcap: logit soft-capping `c * tanh(s / c)` (Gemma 2); None = off.
    causal: causal masking on positions.
    backend: "auto" | "xla" | "pallas" | "interpret" (the dispatch rule: module docstring).
    q_chunk: reference path processes queries in chunks of this many tokens so the
      score matrix never exceeds [B, Hq, q_chunk, S].
  """

  scale: Optional[float] = None
  window: Optional[int] = None
  n_sink: int = 0
  softcap: Optional[float] = None
  causal: bool = True
  backend: str = "auto"
  q_chunk: int = 512

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"backend={self.backend!r}; allowed: {BACKENDS}")
    if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
      raise ValueError(f"window={self.window!r}; must be a positive int or None")
    if self.n_sink < 0:
      raise ValueError(f"n_sink={self.n_sink}; must be >= 0")
    if self.softcap is not None and self.softcap <= 0:
      raise ValueError(f"softcap={self.softcap}; must be > 0 or None")
    if self.q_chunk < 1:
      raise ValueError(f"q_chunk={self.q_chunk}; must be >= 1")


class AttentionOutput(NamedTuple):
  out: jax.Array                 # [B, Hq, T, Dv], dtype of q
  lse: Optional[jax.Array]       # [B, Hq, T] float32 log-sum-exp of visible logits
  colsum: Optional[jax.Array]    # [B, Hkv, S] float32 attention mass per slot


def visibility_mask(q_positions, k_positions, k_lengths, *, causal=True, window=None,
                    n_sink=0):
  """Boolean mask [B, Hkv, T, S] of slots visible to each query (docs/CONVENTIONS.md)."""
  s = k_positions.shape[-1]
  slot = jnp.arange(s, dtype=jnp.int32)
  in_length = slot[None, None, :] < k_lengths[:, :, None]                         # [B,Hkv,S]
  return _position_mask(q_positions, jnp.where(in_length, k_positions, -1), causal=causal,
                        window=window, n_sink=n_sink)


def _position_mask(q_positions, k_positions, *, causal, window, n_sink):
  """[B, Hkv, T, S]: query positions [B, T] x slot positions [B, Hkv, S] (-1 = none)."""
  qp = q_positions[:, None, :, None]  # [B,1,T,1]
  kp = k_positions[:, :, None, :]     # [B,Hkv,1,S]
  mask = (kp >= 0) & (qp >= 0)
  if causal:
    mask &= kp <= qp
  if window is not None:
    near = (qp - kp) < window
    if n_sink:
      near |= kp < n_sink
    mask &= near
  return mask


def _colsum_query_weights(q_positions, colsum_window):
  """[B, T] float32 weights: 1 for queries that count towards colsum."""
  valid = q_positions >= 0
  if colsum_window is None:
    return valid.astype(jnp.float32)
  last = jnp.max(q_positions, axis=-1, keepdims=True)
  return (valid & (q_positions > last - colsum_window)).astype(jnp.float32)


def _reference_chunk(q, k, v, q_positions, k_positions, k_lengths, qweights, *, scale,
                     causal, window, n_sink, softcap, sink_logits):
  """Attention for one query chunk. q [B,Hq,Tc,D] -> out, lse, colsum."""
  b, hq, t, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  qg = q.reshape(b, hkv, g, t, d).astype(jnp.float32)
  logits = jnp.einsum("bhgtd,bhsd->bhgts", qg, k.astype(jnp.float32)) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  mask = visibility_mask(q_positions, k_positions, k_lengths, causal=causal,
                         window=window, n_sink=n_sink)[:, :, None]
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
            n_sink=spec.n_sink, softcap=spec.softcap, sink_logits=sink_logits)
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


def _block_bounds(k_positions, valid, k_block):
  """Per key block, the smallest and largest valid slot position: ([B, Hkv, nb] x 2).

  Empty blocks get (2**30, -1), so no query can see them.
  """
  b, hkv, s = k_positions.shape
  nb = -(-s // k_block)
  pad = nb * k_block - s
  kp = jnp.pad(jnp.where(valid, k_positions, -1), ((0, 0), (0, 0), (0, pad)),
               constant_values=-1).reshape(b, hkv, nb, k_block)
  kmin = jnp.min(jnp.where(kp >= 0, kp, 2 ** 30), axis=-1)
  kmax = jnp.max(kp, axis=-1)
  return kmin, kmax


def _visible_blocks(kmin, kmax, qpos, *, causal, window, n_sink):
  """[nb] bool: key blocks that some valid query of `qpos` [B, C] may see (any row, head)."""
  big = jnp.int32(2 ** 30)
  qvalid = qpos >= 0
  qmax = jnp.max(jnp.where(qvalid, qpos, -1), axis=-1)[:, None, None]
  qmin = jnp.min(jnp.where(qvalid, qpos, big), axis=-1)[:, None, None]
  vis = (kmax >= 0) & (qmax >= 0)
  if causal:
    vis &= kmin <= qmax
  if window is not None:
    near = kmax > qmin - window
    if n_sink:
      near |= kmin < n_sink
    vis &= near
  return jnp.any(vis, axis=(0, 1))


class _Keys(NamedTuple):
  """The key/value set one blocked attention call reads, block by block, in place."""
  k: jax.Array           # [B, Hkv, S, D] or stacked [L, B, Hkv, S, D]
  v: jax.Array
  layer: Optional[jax.Array]
  positions: jax.Array   # [B, Hkv, S] (-1 = invalid or beyond length)
  block: int

  def load(self, j):
    """Block j: (k [B,Hkv,Kb,D] f32, v f32, positions [B,Hkv,Kb]). The last block may start
    before j * Kb (dynamic_slice clamps); slots already seen are marked invalid."""
    s = self.positions.shape[-1]
    start = jnp.minimum(j * self.block, s - self.block)
    kb, vb = (_load_block(x, self.layer, start, self.block) for x in (self.k, self.v))
    pb = jax.lax.dynamic_slice_in_dim(self.positions, start, self.block, axis=2)
    fresh = start + jnp.arange(self.block, dtype=jnp.int32) >= j * self.block
    return kb, vb, jnp.where(fresh, pb, -1)


def _load_block(x, layer, start, size):
  """x[layer][:, :, start:start + size] as float32 ([B, H, S, D] or stacked [L, B, H, S, D]).

  A uint16 buffer holds bfloat16 bits (kvjax.cache.to_bits: how the model's layer scan
  carries a bfloat16 cache, since XLA:CPU would convert a whole bfloat16 buffer to slice
  it); the block is converted after slicing."""
  if layer is None:
    blk = jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)
  else:
    blk = jax.lax.dynamic_slice(x, (layer, 0, 0, start, 0),
                                (1,) + x.shape[1:3] + (size,) + x.shape[4:])[0]
  if blk.dtype == jnp.uint16:
    blk = jax.lax.bitcast_convert_type(blk, jnp.bfloat16)
  return blk.astype(jnp.float32)


def _block_logits(qf, kb, qpos, kpos, *, causal, window, n_sink, softcap):
  """qf [B,Hkv,M,D] (M = G*C, scaled) x kb [B,Hkv,Kb,D] -> masked logits [B,Hkv,M,Kb], mask.

  qpos [B, M] positions of the M query rows (-1 = padding)."""
  if qf.shape[2] < qf.shape[3]:  # few query rows (decode): keep K in place, transpose logits
    lg = jnp.einsum("bhsd,bhmd->bhsm", kb, qf).swapaxes(-1, -2)
  else:
    lg = jnp.einsum("bhmd,bhsd->bhms", qf, kb)
  if softcap is not None:
    lg = softcap * jnp.tanh(lg / softcap)
  mask = _position_mask(qpos, kpos, causal=causal, window=window, n_sink=n_sink)
  return jnp.where(mask, lg, NEG_INF), mask


def _blocked_chunk(qf, qpos, keys: _Keys, order, count, *, sink_logits, mask_kw):
  """Online-softmax attention of one query chunk over the visible key blocks.

  qf [B, Hkv, M, D] float32 scaled queries (rows = G x C), qpos [B, M].
  Returns out [B, Hkv, M, Dv] f32, lse [B, Hkv, M] f32.
  """
  b, hkv, m_rows, _ = qf.shape
  dv = keys.v.shape[-1]
  m0 = jnp.full((b, hkv, m_rows), NEG_INF, jnp.float32)
  l0 = jnp.zeros((b, hkv, m_rows), jnp.float32)
  a0 = jnp.zeros((b, hkv, m_rows, dv), jnp.float32)

  def visit(j, st):
    m, l, acc = st
    kb, vb, pb = keys.load(order[j])
    lg, mask = _block_logits(qf, kb, qpos, pb, **mask_kw)
    mn = jnp.maximum(m, jnp.max(lg, axis=-1))
    p = jnp.where(mask, jnp.exp(lg - mn[..., None]), 0.0)
    alpha = jnp.exp(m - mn)
    return mn, l * alpha + jnp.sum(p, axis=-1), (
        acc * alpha[..., None] + jnp.einsum("bhms,bhsd->bhmd", p, vb))

  m, l, acc = jax.lax.fori_loop(0, count, visit, (m0, l0, a0))
  seen = m > NEG_INF / 2
  if sink_logits is not None:  # the sink only enters the denominator
    sl = sink_logits  # [1, Hkv, M]
    mf = jnp.maximum(m, sl)
    scale = jnp.exp(m - mf)
    l = l * scale + jnp.exp(sl - mf)
    acc = acc * scale[..., None]
    m = mf
  safe = jnp.where(l > 0, l, 1.0)
  out = acc / safe[..., None]
  lse = jnp.where(seen, m + jnp.log(safe), NEG_INF)
  return out, lse


def _blocked_colsum(qf, qpos, qw, lse, keys: _Keys, order, count, *, mask_kw):
  """Attention mass per slot, sum over rows of w * exp(logit - lse): [B, Hkv, S] f32.

  qf [B, Hkv, M, D], qpos / qw [B, Hkv, M] broadcastable weights, lse [B, Hkv, M]."""
  b, hkv, s = keys.positions.shape
  kb_size = keys.block

  def visit(j, colsum):
    blk = order[j]
    kb, _, pb = keys.load(blk)
    lg, mask = _block_logits(qf, kb, qpos, pb, **mask_kw)
    p = jnp.where(mask, jnp.exp(lg - lse[..., None]), 0.0)
    add = jnp.sum(p * qw[..., None], axis=2)  # [B, Hkv, Kb]
    start = jnp.minimum(blk * kb_size, s - kb_size)
    cur = jax.lax.dynamic_slice_in_dim(colsum, start, kb_size, axis=2)
    return jax.lax.dynamic_update_slice_in_dim(colsum, cur + add, start, axis=2)

  return jax.lax.fori_loop(0, count, visit, jnp.zeros((b, hkv, s), jnp.float32))


def _block_order(kmin, kmax, qpos, mask_kw):
  vis = _visible_blocks(kmin, kmax, qpos, causal=mask_kw["causal"], window=mask_kw["window"],
                        n_sink=mask_kw["n_sink"])
  order = jnp.argsort(~vis, stable=True).astype(jnp.int32)  # visible blocks first
  return order, jnp.sum(vis).astype(jnp.int32)


def blocked_attention(q, k, v, k_lengths, *, q_positions, k_positions, spec, sink_logits=None,
                      return_colsum=False, colsum_window=None, layer=None, k_block=None):
  """XLA attention that reads keys in blocks and skips the blocks no query can see.

  Same results as `reference_attention` up to float rounding (online softmax, as in
  "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
  arXiv:2205.14135). On CPU this is what makes long prompts and decode cheap: a causal
  prefill visits about half of the (query chunk, key block) pairs, a decode step only the
  blocks holding valid slots (a cache with room, or compressed to a smaller length, costs
  what it holds), and a sliding window only the blocks near each chunk. With `layer`, `k`
  and `v` carry a leading layer axis ([L, B, Hkv, S, D], a layer-scanned stacked cache) and
  blocks are sliced straight out of it, so the layer is never copied.

  colsum (when asked) is a second pass over the visible blocks for only the queries that
  count (the last `colsum_window` ones, gathered; all queries without a window), using the
  final log-sum-exp: attention statistics for presses without an S x S matrix.

  The loops over visible blocks have data-dependent trip counts, which reverse-mode
  autodiff cannot go through; gradients come from the reference instead (a custom VJP that
  recomputes `reference_attention`), so training through this path works unchanged.

  Returns AttentionOutput(out, lse, colsum | None).
  """
  return _blocked(q, k, v, k_lengths, q_positions, k_positions, sink_logits, layer, spec,
                  bool(return_colsum), colsum_window, k_block or K_BLOCK)


def _blocked_forward(q, k, v, k_lengths, q_positions, k_positions, sink_logits, layer, spec,
                     return_colsum, colsum_window, k_block):
  b, hq, t, d = q.shape
  hkv, s = k_positions.shape[1], k_positions.shape[2]
  g = hq // hkv
  dv = v.shape[-1]
  kb = min(k_block, s)
  scale = spec.scale if spec.scale is not None else d ** -0.5
  mask_kw = dict(causal=spec.causal, window=spec.window, n_sink=spec.n_sink,
                 softcap=spec.softcap)
  slot = jnp.arange(s, dtype=jnp.int32)
  kvalid = (slot[None, None, :] < k_lengths[:, :, None]) & (k_positions >= 0)
  kpos = jnp.where(kvalid, k_positions, -1)
  keys = _Keys(k, v, layer, kpos, kb)
  kmin, kmax = _block_bounds(kpos, kvalid, kb)
  sl = None
  chunk = min(spec.q_chunk, Q_BLOCK, t)
  if sink_logits is not None:
    sl = jnp.broadcast_to(sink_logits.astype(jnp.float32).reshape(1, hkv, g, 1),
                          (1, hkv, g, chunk)).reshape(1, hkv, g * chunk)
  n = -(-t // chunk)
  pad = n * chunk - t
  qp = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
  pp = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=-1)
  qs = (qp.reshape(b, hkv, g, n, chunk, d).transpose(3, 0, 1, 2, 4, 5)
        .reshape(n, b, hkv, g * chunk, d))
  ps = pp.reshape(b, n, chunk).transpose(1, 0, 2)

  def one_chunk(_, xs):
    qc, pc = xs
    order, count = _block_order(kmin, kmax, pc, mask_kw)
    rows = jnp.tile(pc, (1, g))  # row (g, c) has query c's position
    o, l = _blocked_chunk(qc.astype(jnp.float32) * scale, rows, keys, order, count,
                          sink_logits=sl, mask_kw=mask_kw)
    return None, (o, l)

  _, (outs, lses) = jax.lax.scan(one_chunk, None, (qs, ps))
  out = (outs.reshape(n, b, hkv, g, chunk, dv).transpose(1, 2, 3, 0, 4, 5)
         .reshape(b, hq, n * chunk, dv)[:, :, :t].astype(q.dtype))
  lse = lses.reshape(n, b, hkv, g, chunk).transpose(1, 2, 3, 0, 4).reshape(b, hq, n * chunk)
  lse = lse[:, :, :t]
  colsum = None
  if return_colsum:
    qweights = _colsum_query_weights(q_positions, colsum_window)  # [B, T]
    if colsum_window is not None and colsum_window < t:
      # Only the last `colsum_window` queries count: gather them (weight-0 rows pad).
      idx = jax.lax.top_k(jnp.where(qweights > 0, jnp.arange(t), -1), colsum_window)[1]
      take = lambda a, axis: jnp.take_along_axis(a, idx.reshape(
          (b,) + (1,) * (axis - 1) + (colsum_window,) + (1,) * (a.ndim - axis - 1)), axis=axis)
      qsel, lsel = take(q, 2), take(lse, 2)
      psel, wsel = take(q_positions, 1), take(qweights, 1)
      wsel = jnp.where(psel >= 0, wsel, 0.0)
    else:
      qsel, lsel, psel, wsel = q, lse, q_positions, qweights
    w = qsel.shape[2]
    c2 = min(spec.q_chunk, Q_BLOCK, w)
    n2 = -(-w // c2)
    pad2 = n2 * c2 - w
    pad_t = lambda a, value=0: jnp.pad(a, [(0, 0)] * 2 + [(0, pad2)] + [(0, 0)] * (a.ndim - 3),
                                       constant_values=value)
    qc = pad_t(qsel).reshape(b, hkv, g, n2, c2, d).transpose(3, 0, 1, 2, 4, 5)
    lc = pad_t(lsel).reshape(b, hkv, g, n2, c2).transpose(3, 0, 1, 2, 4)
    pc = jnp.pad(psel, ((0, 0), (0, pad2)), constant_values=-1).reshape(b, n2, c2)
    wc = jnp.pad(wsel, ((0, 0), (0, pad2))).reshape(b, n2, c2)

    def colsum_chunk(acc, xs):
      qx, lx, px, wx = xs
      order, count = _block_order(kmin, kmax, px, mask_kw)
      qf = qx.reshape(b, hkv, g * c2, d).astype(jnp.float32) * scale
      part = _blocked_colsum(qf, jnp.tile(px, (1, g)), jnp.tile(wx, (1, g))[:, None, :],
                             lx.reshape(b, hkv, g * c2), keys, order, count, mask_kw=mask_kw)
      return acc + part, None

    colsum, _ = jax.lax.scan(colsum_chunk, jnp.zeros((b, hkv, s), jnp.float32),
                             (qc, lc, pc.transpose(1, 0, 2), wc.transpose(1, 0, 2)))
  return AttentionOutput(out, lse, colsum)


_blocked = jax.custom_vjp(_blocked_forward, nondiff_argnums=(8, 9, 10, 11))


def _blocked_fwd(q, k, v, k_lengths, q_positions, k_positions, sink_logits, layer, spec,
                 return_colsum, colsum_window, k_block):
  res = _blocked_forward(q, k, v, k_lengths, q_positions, k_positions, sink_logits, layer,
                         spec, return_colsum, colsum_window, k_block)
  return res, (q, k, v, k_lengths, q_positions, k_positions, sink_logits, layer)


def _blocked_bwd(spec, return_colsum, colsum_window, k_block, saved, cotangent):
  del k_block
  q, k, v, k_lengths, q_positions, k_positions, sink_logits, layer = saved
  kl, vl = (k, v) if layer is None else (k[layer], v[layer])

  def ref(q_, k_, v_, sl_):
    r = reference_attention(q_, k_, v_, k_lengths, q_positions=q_positions,
                            k_positions=k_positions, spec=spec, sink_logits=sl_,
                            colsum_window=colsum_window)
    return AttentionOutput(r.out, r.lse, r.colsum if return_colsum else None)

  _, vjp = jax.vjp(ref, q, kl, vl, sink_logits)
  dq, dk, dv, dsl = vjp(cotangent)
  if layer is not None:
    dk = jnp.zeros_like(k).at[layer].set(dk)
    dv = jnp.zeros_like(v).at[layer].set(dv)
  return dq, dk, dv, None, None, None, dsl, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


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


# Keys per block of the blocked XLA path; key sets of at most this many slots use the
# one-shot reference (there is no block to skip).
K_BLOCK = 256
# Queries per chunk of the blocked path (at most spec.q_chunk): a [G * 256, 256] float32
# logits block stays in a CPU core's L2 cache; 512 x 512 blocks measured ~3x slower.
Q_BLOCK = 256


def attention(q, k, v, k_lengths, *, q_positions, k_positions, spec=AttentionSpec(),
              sink_logits=None, return_lse=False, return_colsum=False, colsum_window=None,
              interpret=False, layer=None) -> AttentionOutput:
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
    interpret: with spec.backend="pallas", the same as backend="interpret".
    layer: optional int32 scalar: `k` and `v` are a layer-stacked cache [L, B, Hkv, S, D]
      and this layer is attended (the XLA path reads its blocks in place; no layer copy).

  The XLA backend runs `blocked_attention` (skips key blocks no query sees) when the key
  set spans more than one block of K_BLOCK slots, else the one-shot reference.

  Returns:
    AttentionOutput(out [B,Hq,T,Dv], lse [B,Hq,T] | None, colsum [B,Hkv,S] | None).
  """
  if layer is not None:
    if k.ndim != 5 or v.ndim != 5:
      raise ValueError(f"with layer=, k and v must be layer-stacked [L,B,H,S,D]; got "
                       f"{k.shape}, {v.shape}")
    _check_shapes(q, k[0], v[0], k_lengths, q_positions, k_positions)
  else:
    _check_shapes(q, k, v, k_lengths, q_positions, k_positions)
  mode = kernel_backend(spec, q, layout="dense", num_kv_heads=k_positions.shape[1],
                        head_dim_v=v.shape[-1], return_colsum=return_colsum,
                        colsum_window=colsum_window, interpret=interpret)
  if mode != "xla":
    import pallas_kernels  # pylint: disable=import-outside-toplevel
    if layer is not None:
      k, v = k[layer], v[layer]
    out, lse, colsum = pallas_kernels.attention(
        q, k, v, k_lengths, q_positions=q_positions, k_positions=k_positions,
        sink_logits=sink_logits, return_lse=return_lse, return_colsum=return_colsum,
        colsum_window=colsum_window, interpret=mode == "interpret", **_mask_kwargs(spec))
    return AttentionOutput(out, lse if return_lse else None, colsum if return_colsum else None)
  if layer is not None or k.shape[2] > K_BLOCK:
    res = blocked_attention(q, k, v, k_lengths, q_positions=q_positions,
                            k_positions=k_positions, spec=spec, sink_logits=sink_logits,
                            return_colsum=return_colsum, colsum_window=colsum_window,
                            layer=layer, k_block=K_BLOCK)
  else:
    res = reference_attention(q, k, v, k_lengths, q_positions=q_positions,
                              k_positions=k_positions, spec=spec, sink_logits=sink_logits,
                              colsum_window=colsum_window)
  return AttentionOutput(res.out, res.lse if return_lse else None,
                         res.colsum if return_colsum else None)


# -- the dispatch rule for every cache kind ------------------------------------------------
def kernel_backend(spec: AttentionSpec, q, *, layout: str = "dense", num_kv_heads: int,
                   head_dim_v: int, quant=None, residual: bool = False, partitions: int = 1,
                   return_colsum: bool = False, colsum_window=None,
                   interpret: bool = False) -> str:
  """Where one attention call runs: "xla", "pallas" (kernel on device) or "interpret".

  The rule of the module docstring, the same for every cache kind. `layout` names the
  kernel ("dense" | "quantized" | "paged"); `quant` (a kvjax QuantSpec or None) how K/V
  are stored; `residual` / `partitions` the parts of a paged pool no kernel reads.

  Raises:
    ValueError: backend "pallas" on CPU, or "pallas" / "interpret" for a request the
      kernel does not support (the message names what).
  """
  backend = "interpret" if spec.backend == "pallas" and interpret else spec.backend
  if backend == "xla":
    return "xla"
  on_accel = jax.default_backend() in _ACCELERATORS
  if backend == "auto" and not on_accel:
    return "xla"
  if backend == "pallas" and not on_accel:
    raise ValueError(f"backend='pallas' runs Pallas kernels on GPU/TPU; the default backend "
                     f"is {jax.default_backend()!r}: use backend='interpret' (Pallas "
                     "interpret mode) or 'xla'")
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  storage = {} if quant is None else dict(
      fmt=quant.fmt, k_bits=quant.k_bits, v_bits=quant.v_bits, k_axis=quant.k_axis,
      v_axis=quant.v_axis, group_size=quant.group_size, pre_rope=quant.pre_rope,
      outliers=quant.outlier_frac > 0)
  verdict = pallas_kernels.support(pallas_kernels.KernelRequest(
      layout=layout, **storage, residual=residual, partitions=partitions,
      head_dim=q.shape[-1], head_dim_v=head_dim_v, dtype=jnp.dtype(q.dtype).name,
      num_q_heads=q.shape[1], num_kv_heads=num_kv_heads, num_queries=q.shape[2],
      scale=spec.scale, causal=spec.causal, window=spec.window,
      n_sink=spec.n_sink, softcap=spec.softcap, return_colsum=return_colsum,
      colsum_window=colsum_window if return_colsum else None))
  if verdict:
    return "pallas" if backend == "auto" else backend
  if backend == "auto":
    return "xla"
  raise ValueError(f"backend={spec.backend!r}: the Pallas {layout} kernel does not support "
                   f"{verdict.reason}; use backend='auto' (the XLA path where the kernel "
                   "cannot) or 'xla'")


def _mask_kwargs(spec: AttentionSpec):
  return dict(scale=spec.scale, causal=spec.causal, window=spec.window,
              n_sink=spec.n_sink, softcap=spec.softcap)


def quantized_decode(q, codes, exact, *, q_positions, quant, spec: AttentionSpec,
                     sink_logits=None, interpret: bool = False):
  """Decode attention read straight from a quantized cache (`kernel_backend` said so).

  Args:
    q: [B, Hq, T, D] queries.
    codes: (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, positions [B, Hkv, Sq],
      lengths [B, Hkv]): the quantized region in kvjax.quant's layout (zeros None =
      symmetric codes).
    exact: (k [B, Hkv, R, D], v, positions [B, Hkv, R]) slots attended exactly (the
      residual window and the current chunk), all R valid.
    q_positions: [B, T] int32.
    quant: the cache's QuantSpec.
    spec: the layer's AttentionSpec; sink_logits: optional [Hq].
    interpret: Pallas interpret mode (backend "interpret").

  Returns:
    (out [B, Hq, T, Dv], lse [B, Hq, T] float32).
  """
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, positions, lengths = codes
  ex_k, ex_v, ex_pos = exact
  return pallas_kernels.quantized_attention(
      q, k_codes, k_scale, v_codes, v_scale, lengths, q_positions=q_positions,
      k_positions=positions, k_zero=k_zero, v_zero=v_zero, k_res=ex_k, v_res=ex_v,
      res_positions=ex_pos, res_lengths=jnp.full(lengths.shape, ex_k.shape[2], jnp.int32),
      sink_logits=sink_logits, fmt=quant.fmt, k_bits=quant.k_bits, v_bits=quant.v_bits,
      k_axis=quant.k_axis, v_axis=quant.v_axis, group_size=quant.group_size,
      interpret=interpret, **_mask_kwargs(spec))


def paged_decode(q, pool, page_table, lengths, *, q_positions, layer=None, exact=None,
                 quant=None, spec: AttentionSpec, sink_logits=None, interpret: bool = False):
  """Decode attention over a page pool read in place (`kernel_backend` said so).

  Args:
    q: [B, Hq, T, D] queries.
    pool: (k_pages, v_pages, k_scale, k_zero, v_scale, v_zero, pos_pages) in kvjax.paged's
      layout ([N, Hkv, P, ...], or [L, N, ...] with `layer`); None where absent.
    page_table: [B, M] int32; lengths: [B, Hkv] int32 valid logical slots.
    q_positions: [B, T] int32.
    layer: optional int32 scalar: the layer of a stacked pool to read.
    exact: optional (k [B, Hkv, R, D], v, positions [B, Hkv, R]) slots attended exactly
      (the current chunk of a quantized pool), all R valid.
    quant: the pool's QuantSpec (None = float pool).
    spec, sink_logits, interpret: as for `quantized_decode`.

  Returns:
    (out [B, Hq, T, Dv], lse [B, Hq, T] float32).
  """
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  k_pages, v_pages, k_scale, k_zero, v_scale, v_zero, pos_pages = pool
  extra = {}
  if exact is not None:
    ex_k, ex_v, ex_pos = exact
    extra = dict(k_res=ex_k, v_res=ex_v, res_positions=ex_pos,
                 res_lengths=jnp.full(lengths.shape, ex_k.shape[2], jnp.int32))
  storage = {} if quant is None else dict(fmt=quant.fmt, k_bits=quant.k_bits,
                                          v_bits=quant.v_bits, group_size=quant.group_size)
  return pallas_kernels.paged_attention(
      q, k_pages, v_pages, page_table, lengths, q_positions=q_positions, pos_pages=pos_pages,
      k_scale=k_scale, k_zero=k_zero, v_scale=v_scale, v_zero=v_zero, layer=layer,
      sink_logits=sink_logits, interpret=interpret, **storage, **extra, **_mask_kwargs(spec))
