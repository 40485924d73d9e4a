"""Pieces shared by the attention kernels: masks, the online-softmax step, block ranges.

Shape legend (docs/CONVENTIONS.md): B batch, T queries, S slots, Hq query heads, Hkv kv
heads, G = Hq // Hkv, D head_dim, Dv value head_dim, R query rows of one kernel program,
bk slots of one key block, bq queries of one query block.

Everything in the "in-kernel" section runs inside Pallas kernels on both lowerings
(Mosaic for TPU, Triton for GPU) and in interpret mode, so it only uses ops both lowerings
support: elementwise math, `jnp.where`, keepdims reductions, 2-D `lax.dot_general`.
Per-row state (running max `m`, denominator `l`) is kept as `[R, 1]` columns.

Everything in the "wrapper" section is plain jnp that runs before a kernel (on small
int32 arrays: positions and lengths), never on K/V.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30        # finite "minus infinity": masked logits and the lse of empty rows
LANES = 128            # TPU lane width: per-row vectors are lane-replicated [R, 128]
SUBLANES = 8
_BIG = 2 ** 30         # larger than any position; "no valid slot" sentinel for block minima
_NT = (((1,), (1,)), ((), ()))   # dot_general numbers for a @ b.T
_NN = (((1,), (0,)), ((), ()))   # a @ b


class MaskSpec(NamedTuple):
  """Static masking/logit options (hashable; passed into kernel bodies)."""
  scale: float
  causal: bool = True
  window: int | None = None
  n_sink: int = 0
  softcap: float | None = None


# ----------------------------------------------------------------------------------------
# In-kernel helpers
# ----------------------------------------------------------------------------------------

def visible(q_pos, k_pos, slot, length, spec: MaskSpec):
  """Slot visibility, docs/CONVENTIONS.md.

  Args:
    q_pos: [R, 1] int32 query positions (-1 = padding row).
    k_pos: [1, bk] int32 slot positions (-1 = empty slot).
    slot: [1, bk] int32 absolute slot indices.
    length: scalar int32, slots >= length are invalid.
    spec: static options.

  Returns:
    [R, bk] bool.
  """
  vis = (slot < length) & (k_pos >= 0) & (q_pos >= 0)
  if spec.causal:
    vis = vis & (k_pos <= q_pos)
  if spec.window is not None:
    in_window = (q_pos - k_pos) < spec.window
    if spec.n_sink > 0:
      in_window = in_window | (k_pos < spec.n_sink)
    vis = vis & in_window
  return vis


def logits(q, k, spec: MaskSpec):
  """Scaled (and soft-capped) float32 logits q @ k.T: [R, D] x [bk, D] -> [R, bk]."""
  s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
  s = s * spec.scale
  if spec.softcap is not None:
    s = spec.softcap * jnp.tanh(s / spec.softcap)
  return s


def online_softmax_step(s, vis, v, m_prev, l_prev, acc_prev):
  """One flash-attention step (Dao et al., 2022) over a key block.

  Masked probabilities are zeroed explicitly (not only pushed to -1e30), so rows with no
  visible slot keep m = -1e30, l = 0 and produce exact zeros instead of NaN.

  Args:
    s: [R, bk] float32 logits; vis: [R, bk] bool; v: [bk, Dv] value block (rows that are
      not valid slots must already be zero or finite).
    m_prev, l_prev: [R, 1] float32 running max / denominator; acc_prev: [R, Dv] float32.

  Returns:
    (m, l, acc) updated.
  """
  s = jnp.where(vis, s, NEG_INF)
  m_cur = jnp.max(s, axis=1, keepdims=True)
  m_new = jnp.maximum(m_prev, m_cur)
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
  acc_new = alpha * acc_prev + pv
  return m_new, l_new, acc_new


def finalize(m, l, acc):
  """Normalised output [R, Dv] and lse [R, 1] (-1e30 for rows with nothing visible)."""
  nonempty = l > 0.0
  safe_l = jnp.where(nonempty, l, 1.0)
  out = acc * (1.0 / safe_l)
  lse = jnp.where(nonempty, m + jnp.log(safe_l), NEG_INF)
  return out, lse


def column_mass(s, vis, lse_rows):
  """Attention probabilities summed over rows: [R, bk] -> [1, bk] float32."""
  p = jnp.where(vis, jnp.exp(s - lse_rows), 0.0)
  return jnp.sum(p, axis=0, keepdims=True)


def step_to_block(step, a1, n1, a2):
  """Maps a step in [0, n1 + n2) over two block ranges [a1, a1+n1) u [a2, ...) to a block."""
  return jnp.where(step < n1, a1 + step, a2 + (step - n1))


# ----------------------------------------------------------------------------------------
# Wrapper helpers (plain jnp, on positions/lengths only)
# ----------------------------------------------------------------------------------------

def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(x: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(x, 1))))


def round_up(x: int, m: int) -> int:
  return cdiv(x, m) * m


def _pad_last(x, size, value):
  pad = size - x.shape[-1]
  if pad == 0:
    return x
  widths = [(0, 0)] * (x.ndim - 1) + [(0, pad)]
  return jnp.pad(x, widths, constant_values=value)


def query_block_stats(q_positions, block_q):
  """Per query block min/max of valid positions: [B, T] -> two [B, nqb] int32.

  Blocks without a valid query get min = _BIG, max = -1 (so nothing is visible to them).
  """
  b, t = q_positions.shape
  nqb = cdiv(t, block_q)
  qp = _pad_last(q_positions, nqb * block_q, -1).reshape(b, nqb, block_q)
  valid = qp >= 0
  qmin = jnp.min(jnp.where(valid, qp, _BIG), axis=-1)
  qmax = jnp.max(jnp.where(valid, qp, -1), axis=-1)
  return qmin.astype(jnp.int32), qmax.astype(jnp.int32)


def key_block_stats(k_positions, k_lengths, block_k):
  """Per key block min/max of valid slot positions: [B, Hkv, S] -> two [B, Hkv, nkb].

  A slot is valid when s < k_lengths and k_pos >= 0. Blocks without a valid slot get
  min = _BIG, max = -_BIG.
  """
  b, h, s = k_positions.shape
  nkb = cdiv(s, block_k)
  kp = _pad_last(k_positions, nkb * block_k, -1).reshape(b, h, nkb, block_k)
  slot = jnp.arange(nkb * block_k, dtype=jnp.int32).reshape(nkb, block_k)
  valid = (kp >= 0) & (slot[None, None] < k_lengths[:, :, None, None])
  kmin = jnp.min(jnp.where(valid, kp, _BIG), axis=-1)
  kmax = jnp.max(jnp.where(valid, kp, -_BIG), axis=-1)
  return kmin.astype(jnp.int32), kmax.astype(jnp.int32)


def _block_predicates(qmin, qmax, kmin, kmax, spec: MaskSpec):
  """Conservative "some pair in (q block, k block) may be visible" tests.

  Shapes: q stats [B, 1, nqb, 1], k stats [B, Hkv, 1, nkb] -> [B, Hkv, nqb, nkb] bools.
  Returns (main, sink): `main` covers causal + window, `sink` the sink tokens (only
  meaningful with a window). A pair is visible only if main | sink holds for its blocks.
  """
  has_k = kmin < _BIG
  has_q = qmax >= 0
  base = has_k & has_q
  if spec.causal:
    base = base & (kmin <= qmax)
  main = base
  if spec.window is not None:
    # some slot with k_pos > q_pos - W for some query: kmax > qmin - W
    main = main & (kmax > qmin - spec.window)
  sink = None
  if spec.window is not None and spec.n_sink > 0:
    sink = base & (kmin < spec.n_sink)
  return main, sink


def _hull(pred, axis):
  """[first, last + 1) of True entries along `axis` (0, 0 when none)."""
  n = pred.shape[axis]
  anyp = jnp.any(pred, axis=axis)
  first = jnp.argmax(pred, axis=axis).astype(jnp.int32)
  last = (n - 1 - jnp.argmax(jnp.flip(pred, axis=axis), axis=axis)).astype(jnp.int32)
  lo = jnp.where(anyp, first, 0)
  hi = jnp.where(anyp, last + 1, 0)
  return lo, hi


class BlockRanges(NamedTuple):
  """Key blocks a query block visits: [a1, a1 + n1) then [a2, a2 + n2), disjoint.

  Each field [B, Hkv, nqb] int32. With a window and sink tokens the first range holds the
  sink blocks and the second the window band; otherwise n1 = 0.
  """
  a1: jax.Array
  n1: jax.Array
  a2: jax.Array
  n2: jax.Array

  def packed(self):
    """[B, Hkv, nqb, 4] int32 (a1, n1, a2, n2)."""
    return jnp.stack([self.a1, self.n1, self.a2, self.n2], axis=-1).astype(jnp.int32)


def key_ranges(q_positions, k_positions, k_lengths, *, block_q, block_k, spec: MaskSpec):
  """Key-block ranges per (batch, kv head, query block) from position statistics.

  Blocks outside the returned ranges hold no slot visible to any query of the block
  (beyond k_lengths, in the causal future, before the window and not a sink), so kernels
  skip them: no DMA on TPU, no load on GPU.
  """
  qmin, qmax = query_block_stats(q_positions, block_q)
  kmin, kmax = key_block_stats(k_positions, k_lengths, block_k)
  main, sink = _block_predicates(qmin[:, None, :, None], qmax[:, None, :, None],
                                 kmin[:, :, None, :], kmax[:, :, None, :], spec)
  a2, b2 = _hull(main, axis=-1)
  if sink is None:
    zeros = jnp.zeros_like(a2)
    return BlockRanges(zeros, zeros, a2, b2 - a2)
  a1, b1 = _hull(sink, axis=-1)
  e1 = b1 > a1
  e2 = b2 > a2
  overlap = e1 & e2 & (a1 <= b2) & (a2 <= b1)
  # Order the two ranges, merging them when they touch or overlap.
  lo_a = jnp.where(a1 <= a2, a1, a2)
  lo_b = jnp.where(a1 <= a2, b1, b2)
  hi_a = jnp.where(a1 <= a2, a2, a1)
  hi_b = jnp.where(a1 <= a2, b2, b1)
  merged_a = jnp.minimum(a1, a2)
  merged_b = jnp.maximum(b1, b2)
  only2 = ~e1
  only1 = e1 & ~e2
  a_1 = jnp.where(overlap | only2 | only1, 0, lo_a)
  n_1 = jnp.where(overlap | only2 | only1, 0, lo_b - lo_a)
  a_2 = jnp.where(overlap, merged_a, jnp.where(only2, a2, jnp.where(only1, a1, hi_a)))
  b_2 = jnp.where(overlap, merged_b, jnp.where(only2, b2, jnp.where(only1, b1, hi_b)))
  return BlockRanges(a_1, n_1, a_2, b_2 - a_2)


def length_ranges(k_lengths, block_k):
  """Ranges from lengths only (no window): blocks [0, cdiv(length, block_k)). [B, Hkv, 1]."""
  n = (k_lengths + (block_k - 1)) // block_k
  zeros = jnp.zeros_like(n)
  return BlockRanges(zeros[..., None], zeros[..., None], zeros[..., None], n[..., None])


def query_ranges(q_positions, k_positions, k_lengths, *, block_q, block_k, spec: MaskSpec):
  """Query-block hull [a, a + n) per (batch, kv head, key block): [B, Hkv, nkb] each."""
  qmin, qmax = query_block_stats(q_positions, block_q)
  kmin, kmax = key_block_stats(k_positions, k_lengths, block_k)
  main, sink = _block_predicates(qmin[:, None, :, None], qmax[:, None, :, None],
                                 kmin[:, :, None, :], kmax[:, :, None, :], spec)
  pred = main if sink is None else (main | sink)
  a, b = _hull(pred, axis=-2)
  return a, b - a


def combine_splits(o_parts, lse_parts):
  """Exact log-sum-exp merge of split-K partial results (flash-decoding).

  Args:
    o_parts: [..., P, R, Dv] float32 outputs, each normalised over its own split.
    lse_parts: [..., P, R] float32 lse of each split (-1e30 when the split saw nothing).

  Returns:
    out [..., R, Dv] float32, lse [..., R] float32 (-1e30 when nothing was visible).
  """
  m = jnp.max(lse_parts, axis=-2, keepdims=True)
  w = jnp.where(lse_parts > NEG_INF / 2, jnp.exp(lse_parts - m), 0.0)
  denom = jnp.sum(w, axis=-2, keepdims=True)
  nonempty = denom > 0.0
  safe = jnp.where(nonempty, denom, 1.0)
  out = jnp.sum(o_parts * (w / safe)[..., None], axis=-3)
  lse = jnp.where(nonempty, m + jnp.log(safe), NEG_INF)[..., 0, :]
  return out, lse


def apply_sink_logits(out, lse, sink_logits):
  """Folds learned per-head sink logits into the softmax denominator.

  out [B, Hq, T, Dv] float32, lse [B, Hq, T]; sink_logits [Hq]. Rows with nothing visible
  keep out = 0 and lse = -1e30 (docs/CONVENTIONS.md).
  """
  sl = sink_logits.astype(jnp.float32)[None, :, None]
  nonempty = lse > NEG_INF / 2
  new_lse = jnp.logaddexp(lse, sl)
  factor = jnp.where(nonempty, jnp.exp(lse - new_lse), 0.0)
  return out * factor[..., None], jnp.where(nonempty, new_lse, NEG_INF)


def colsum_query_positions(q_positions, colsum_window):
  """Positions of the queries that count towards colsum (others -> -1)."""
  if colsum_window is None:
    return q_positions
  last = jnp.max(q_positions, axis=-1, keepdims=True)
  keep = (q_positions >= 0) & (q_positions > last - colsum_window)
  return jnp.where(keep, q_positions, -1)


def resolve_interpret(platform: str, interpret):
  """The `interpret=` value for pallas_call: TPU interpret mode for the TPU variant."""
  if not interpret:
    return False
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    params = getattr(pltpu, "InterpretParams", None)
    if params is not None:
      return params() if interpret is True else interpret
  return True


def check_platform(platform: str) -> str:
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"platform={platform!r}; must be 'tpu' or 'gpu'")
  return platform


def check_head_dim(name: str, d: int):
  if d % 8 != 0 or not 8 <= d <= 256:
    raise ValueError(f"{name}={d}; the kernels need a multiple of 8 in [8, 256]")


def check_static(*, window, n_sink, softcap, scale=None):
  if window is not None and (not isinstance(window, int) or window < 1):
    raise ValueError(f"window={window!r}; must be a positive int or None")
  if not isinstance(n_sink, int) or n_sink < 0:
    raise ValueError(f"n_sink={n_sink!r}; must be an int >= 0")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap={softcap!r}; must be > 0 or None")
  if scale is not None and not scale > 0:
    raise ValueError(f"scale={scale!r}; must be > 0 or None")
