"""Cache kinds for architectures that replace the full KV cache (the retrained families).

Every kind follows the protocol of `kvjax.cache` (`nbytes`, `capacity`, `length`, and
`append` / `attend` where they apply), is a registered pytree with static sizes, and so
rides in a `ModelCache` segment like any KV cache; one generate loop serves them all.

Kinds (what they hold; memory as a function of sequence length N):

  RingKVCache          O(window)  last `window` tokens (+ `sink_tokens` StreamingLLM sinks,
                                  Xiao et al., 2023) of a sliding-window layer in a ring
                                  buffer; with `dilation` d > 1 only the tokens a dilated
                                  layer can ever see (positions that are multiples of d).
  LinearAttentionState O(1)       S [B, H, Dk, Dv] of gated linear attention (GLA, Yang et
                                  al., 2023; RetNet, Sun et al., 2023; Mamba-2 SSD, Dao & Gu,
                                  2024 -- the SSD recurrence is linear attention with a
                                  scalar decay, q = C, k = B, v = dt * x).
  DiagonalState        O(1)       h [B, W] of a diagonal linear recurrence (Griffin's RG-LRU,
                                  De et al., 2024).
  ConvState            O(1)       the last K - 1 inputs of a causal depthwise conv1d.
  ConvRecurrentState   O(1)       a ConvState + a recurrent state (Mamba-2 / Griffin blocks).
  LatentKVCache        O(N), small  multi-head latent attention (DeepSeek-V2, 2024): the
                                  compressed c_kv [B, S, r] and the shared RoPE key
                                  [B, S, d_r]; attention runs in the latent space with the
                                  up-projections absorbed into the query and the output.

Recurrent states have no token slots: `capacity` is 0 (they never run out of room) and
`length` is zeros. They are float32 whatever the model dtype (as in recurrentgemma).

The math of linear attention lives here too, in its two forms:
  * `linear_attention_chunked`: the chunkwise-parallel form (training and prefill; GLA paper
    Sec. 4, fla's `chunk` kernels, `ssd_minimal.py`): quadratic inside chunks of C tokens,
    a scan over chunk states between them. Every exponent is a difference of cumulative
    log-decays taken in the causal direction, so it is <= 0: no overflow at any decay.
  * `linear_attention_recurrent`: the token-by-token recurrence (decode, and the reference).

Padding never changes a state: a padded token (position -1) has decay 1 and a zero key.
Shapes: B batch, H heads, T new tokens, Dk key dim, Dv value dim, S slots, C channels,
K conv width, W recurrence width.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Ring-buffer window cache (sliding, sinks, dilated)
# --------------------------------------------------------------------------------------------
def dilated_positions(positions, dilation: int, sink_tokens: int = 0):
  """Positions a dilated layer keeps as keys; others become -1 (invisible).

  A dilated layer (stride `dilation`, absolute phase) sees keys at positions that are
  multiples of `dilation`, plus the sink tokens. Longformer (Beltagy et al., 2020) dilates
  relative to each query (k = q - i*d); that pattern touches every residue mod d over a
  decode, so its cache would need the whole span. With the absolute phase used here (as in
  the strided pattern of Child et al., 2019) the cache holds only the keys it can see.
  """
  if dilation == 1:
    return positions
  keep = (positions >= 0) & ((positions % dilation == 0) | (positions < sink_tokens))
  return jnp.where(keep, positions, -1)


@flax.struct.dataclass
class RingKVCache:
  """Sliding-window KV cache of exactly `sink_tokens + window` slots (a ring buffer).

  Token at position p is visible to query q iff p <= q and (q - p < window * dilation or
  p < sink_tokens), and, with dilation d > 1, p % d == 0 or p < sink_tokens. Slots
  [0, sink_tokens) hold the sinks; slot sink_tokens + (p // d) % window holds the rest.

  Attributes:
    k: [B, Hkv, S, D] keys (RoPE applied), S = sink_tokens + window.
    v: [B, Hkv, S, Dv] values.
    positions: [B, Hkv, S] int32 original position per slot (-1 = empty).
    window, sink_tokens, dilation: static.
  """

  k: Array
  v: Array
  positions: Array
  window: int = flax.struct.field(pytree_node=False, default=1)
  sink_tokens: int = flax.struct.field(pytree_node=False, default=0)
  dilation: int = flax.struct.field(pytree_node=False, default=1)

  @classmethod
  def init(cls, batch: int, kv_heads: int, head_dim: int, *, window: int, sink_tokens: int = 0,
           dilation: int = 1, dtype=jnp.float32, v_head_dim: Optional[int] = None
           ) -> "RingKVCache":
    for name, val, lo in (("window", window, 1), ("sink_tokens", sink_tokens, 0),
                          ("dilation", dilation, 1)):
      if not isinstance(val, (int, np.integer)) or val < lo:
        raise ValueError(f"{name}={val!r}; must be an int >= {lo}")
    s = sink_tokens + window
    dv = head_dim if v_head_dim is None else v_head_dim
    return cls(k=jnp.zeros((batch, kv_heads, s, head_dim), dtype),
               v=jnp.zeros((batch, kv_heads, s, dv), dtype),
               positions=jnp.full((batch, kv_heads, s), -1, jnp.int32),
               window=int(window), sink_tokens=int(sink_tokens), dilation=int(dilation))

  @property
  def capacity(self) -> int:
    return self.sink_tokens + self.window

  @property
  def length(self) -> Array:
    """[B, Hkv] valid slots."""
    return jnp.sum(self.positions >= 0, axis=-1).astype(jnp.int32)

  @property
  def nbytes(self) -> int:
    return cache_lib.tree_nbytes(self)

  def spec(self, **kw) -> attn_lib.AttentionSpec:
    """The AttentionSpec whose mask this cache implements (extra fields: softcap, backend)."""
    return attn_lib.AttentionSpec(window=self.window * self.dilation,
                                  sink_tokens=self.sink_tokens, **kw)

  def _check_spec(self, spec: attn_lib.AttentionSpec):
    if spec.window != self.window * self.dilation or spec.sink_tokens != self.sink_tokens:
      raise ValueError(
          f"spec (window={spec.window}, sink_tokens={spec.sink_tokens}) does not match the ring "
          f"cache (window*dilation={self.window * self.dilation}, "
          f"sink_tokens={self.sink_tokens}); build it with cache.spec()")

  def _destinations(self, positions_new):
    """Slot of each new token [B, T]; tokens that are not kept (or overwritten later in the
    same chunk, so a scatter never sees two writes to one slot) map to capacity (dropped)."""
    d, w, s0 = self.dilation, self.window, self.sink_tokens
    pos = dilated_positions(positions_new, d, s0)
    sink = (pos >= 0) & (pos < s0)
    ring = (pos >= s0)
    j = pos // d
    last_j = jnp.max(jnp.where(ring, j, -1), axis=-1, keepdims=True)
    ring &= j > last_j - w
    dest = jnp.where(sink, pos, jnp.where(ring, s0 + j % w, self.capacity))
    return dest.astype(jnp.int32)

  def append(self, k_new, v_new, positions_new) -> "RingKVCache":
    """Writes the new tokens [B, Hkv, T, D] at positions [B, T] (-1 = padding, any place)."""
    dest = self._destinations(positions_new)
    dest = jnp.broadcast_to(dest[:, None, :], k_new.shape[:3])
    pos_b = jnp.broadcast_to(positions_new[:, None, :], dest.shape)
    return self.replace(k=cache_lib.scatter_slots(self.k, dest, k_new),
                        v=cache_lib.scatter_slots(self.v, dest, v_new),
                        positions=cache_lib.scatter_slots(self.positions, dest, pos_b))

  def attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, *,
             sink_logits=None, return_lse=False, return_colsum=False, colsum_window=None):
    """Attends q over (ring + new tokens), then writes the new tokens into the ring.

    The new chunk may be longer than the window: its tokens see each other through the
    mask before the ring keeps only the last `window`. colsum is not supported (its slots
    would not line up with the ring's).
    """
    self._check_spec(spec)
    if return_colsum:
      raise ValueError("RingKVCache.attend: return_colsum=True is not supported")
    del colsum_window
    b, hkv = self.k.shape[:2]
    t = k_new.shape[2]
    kpos_new = dilated_positions(q_positions, self.dilation, self.sink_tokens)
    k_all = jnp.concatenate([self.k, k_new.astype(self.k.dtype)], axis=2)
    v_all = jnp.concatenate([self.v, v_new.astype(self.v.dtype)], axis=2)
    p_all = jnp.concatenate(
        [self.positions, jnp.broadcast_to(kpos_new[:, None, :], (b, hkv, t))], axis=2)
    lengths = jnp.full((b, hkv), self.capacity + t, jnp.int32)
    res = attn_lib.attention(q, k_all, v_all, lengths, q_positions=q_positions,
                             k_positions=p_all, spec=spec, sink_logits=sink_logits,
                             return_lse=return_lse)
    return res, self.append(k_new, v_new, q_positions)


# --------------------------------------------------------------------------------------------
# Linear attention: chunkwise-parallel and recurrent forms
# --------------------------------------------------------------------------------------------
def _mask_padding(k, log_a, valid):
  """Padding tokens (valid False) get a zero key and decay 1 (log 0): the state is unchanged."""
  if valid is None:
    return k, log_a
  vk = valid[:, None, :, None]
  k = jnp.where(vk, k, 0)
  log_a = jnp.where(vk if log_a.ndim == 4 else valid[:, None, :], log_a, 0)
  return k, log_a


def _check_linear_shapes(q, k, v, log_a, state):
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k [B,H,T,Dk] and v [B,H,T,Dv] disagree: q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")
  if log_a.shape not in (q.shape[:3], q.shape):
    raise ValueError(f"log_a shape {log_a.shape}; expected {q.shape[:3]} (scalar decay) or "
                     f"{q.shape} (per key dim)")
  want = (q.shape[0], q.shape[1], q.shape[3], v.shape[3])
  if state.shape != want:
    raise ValueError(f"state shape {state.shape}; expected {want}")


def linear_attention_recurrent(q, k, v, log_a, state, valid=None):
  """Token-by-token gated linear attention (the decode form and the numerical reference).

    S_t = diag(exp(log_a_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t

  Args:
    q, k: [B, H, T, Dk] (any scaling of q is the caller's).
    v: [B, H, T, Dv].
    log_a: [B, H, T] scalar log-decay per head (RetNet, Mamba-2) or [B, H, T, Dk] per key
      dim (GLA); must be <= 0.
    state: [B, H, Dk, Dv] float32 state before the first token.
    valid: optional [B, T] bool; invalid tokens leave the state unchanged.

  Returns:
    o [B, H, T, Dv] float32, final state [B, H, Dk, Dv] float32.
  """
  _check_linear_shapes(q, k, v, log_a, state)
  f32 = jnp.float32
  q, k, v, log_a = (x.astype(f32) for x in (q, k, v, log_a))
  k, log_a = _mask_padding(k, log_a, valid)
  if log_a.ndim == 3:
    log_a = log_a[..., None]

  def step(s, xs):
    qt, kt, vt, at = xs  # [B,H,Dk], [B,H,Dk], [B,H,Dv], [B,H,Dk|1]
    s = jnp.exp(at)[..., None] * s + kt[..., :, None] * vt[..., None, :]
    return s, jnp.einsum("bhk,bhkv->bhv", qt, s)

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, log_a))
  state, o = jax.lax.scan(step, state.astype(f32), xs)
  return jnp.moveaxis(o, 0, 2), state


def linear_attention_chunked(q, k, v, log_a, state, valid=None, *, chunk_size: int = 64):
  """Chunkwise-parallel gated linear attention; same result as the recurrent form.

  Inside a chunk of C tokens with cumulative log-decay b_t (from the chunk start):
    o_t = (q_t * e^{b_t}) S_0 + sum_{s<=t} (q_t * e^{b_t - b_s}) . k_s  v_s
    S_C = e^{b_C} * S_0 + sum_s (k_s * e^{b_C - b_s})^T v_s
  The intra-chunk term is computed for all chunks at once; only the chunk states are
  scanned. A vector (per key dim) decay costs a [C, C, Dk] tensor per chunk and head (the
  stable form, without fla's secondary chunking); a scalar decay only [C, C].

  Args: as `linear_attention_recurrent`, plus chunk_size C (T need not be a multiple).
  Returns: o [B, H, T, Dv] float32, final state [B, H, Dk, Dv] float32.
  """
  _check_linear_shapes(q, k, v, log_a, state)
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r}; must be an int >= 1")
  f32 = jnp.float32
  q, k, v, log_a = (x.astype(f32) for x in (q, k, v, log_a))
  k, log_a = _mask_padding(k, log_a, valid)
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  scalar = log_a.ndim == 3
  c = int(min(chunk_size, t))
  n = -(-t // c)
  pad = n * c - t

  def chunks(x):  # [B,H,T,...] -> [B,H,N,C,...]; padded tokens: zero key, zero log-decay
    x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    return x.reshape(b, h, n, c, *x.shape[3:])

  qc, kc, vc, ac = chunks(q), chunks(k), chunks(v), chunks(log_a)
  bcum = jnp.cumsum(ac, axis=3)          # [B,H,N,C(,Dk)]
  btot = bcum[:, :, :, -1]               # [B,H,N(,Dk)]
  causal = jnp.tril(jnp.ones((c, c), bool))
  if scalar:
    diff = bcum[..., :, None] - bcum[..., None, :]                     # [B,H,N,C,C]
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    scores = jnp.einsum("bhntk,bhnsk->bhnts", qc, kc) * decay
    k_end = kc * jnp.exp(btot[..., None] - bcum)[..., None]
    q_dec = qc * jnp.exp(bcum)[..., None]
  else:
    diff = bcum[..., :, None, :] - bcum[..., None, :, :]               # [B,H,N,C,C,Dk]
    cm = causal[..., None]
    decay = jnp.where(cm, jnp.exp(jnp.where(cm, diff, 0.0)), 0.0)
    scores = jnp.einsum("bhntk,bhnsk,bhntsk->bhnts", qc, kc, decay)
    k_end = kc * jnp.exp(btot[..., None, :] - bcum)
    q_dec = qc * jnp.exp(bcum)
  o_intra = jnp.einsum("bhnts,bhnsv->bhntv", scores, vc)
  chunk_kv = jnp.einsum("bhnsk,bhnsv->bhnkv", k_end, vc)               # [B,H,N,Dk,Dv]
  g = jnp.exp(btot)                                                    # [B,H,N(,Dk)]

  def step(s, xs):
    gn, kvn = xs
    gn = gn[..., None, None] if scalar else gn[..., None]
    return gn * s + kvn, s  # emit the state at the chunk start

  state, starts = jax.lax.scan(step, state.astype(f32),
                               (jnp.moveaxis(g, 2, 0), jnp.moveaxis(chunk_kv, 2, 0)))
  starts = jnp.moveaxis(starts, 0, 2)                                  # [B,H,N,Dk,Dv]
  o_inter = jnp.einsum("bhntk,bhnkv->bhntv", q_dec, starts)
  o = (o_intra + o_inter).reshape(b, h, n * c, dv)[:, :, :t]
  return o, state


@dataclasses.dataclass(frozen=True)
class LinearAttentionSpec:
  """Static options of a linear-attention layer.

  Attributes:
    chunk_size: chunk length of the chunkwise-parallel form.
    mode: "auto" (recurrent for one new token, chunked otherwise) | "chunked" | "recurrent".
  """

  chunk_size: int = 64
  mode: str = "auto"

  def __post_init__(self):
    if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
      raise ValueError(f"chunk_size={self.chunk_size!r}; must be an int >= 1")
    if self.mode not in ("auto", "chunked", "recurrent"):
      raise ValueError(f"mode={self.mode!r}; allowed: ('auto', 'chunked', 'recurrent')")


def linear_attention(q, k, v, log_a, state, valid=None, *,
                     spec: LinearAttentionSpec = LinearAttentionSpec()):
  """Dispatch: the recurrent form for a single token (decode), the chunked form otherwise."""
  mode = spec.mode
  if mode == "auto":
    mode = "recurrent" if q.shape[2] == 1 else "chunked"
  if mode == "recurrent":
    return linear_attention_recurrent(q, k, v, log_a, state, valid)
  return linear_attention_chunked(q, k, v, log_a, state, valid, chunk_size=spec.chunk_size)


class _StateMixin:
  """Protocol members shared by fixed-size states."""

  @property
  def capacity(self) -> int:
    """No token slots: a fixed-size state never runs out of room."""
    return 0

  @property
  def nbytes(self) -> int:
    return cache_lib.tree_nbytes(self)


@flax.struct.dataclass
class LinearAttentionState(_StateMixin):
  """Fixed-size state of gated linear attention.

  Attributes:
    state: [B, H, Dk, Dv] float32.
  """

  state: Array

  @classmethod
  def init(cls, batch: int, heads: int, key_dim: int, value_dim: int) -> "LinearAttentionState":
    return cls(state=jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32))

  @property
  def length(self) -> Array:
    return jnp.zeros(self.state.shape[:2], jnp.int32)

  def attend(self, q, k_new, v_new, q_positions, spec: LinearAttentionSpec, *, log_decay):
    """Folds the new tokens into the state and reads it with q.

    Args:
      q, k_new: [B, H, T, Dk]; v_new: [B, H, T, Dv].
      q_positions: [B, T] int32 (-1 = padding: the token leaves the state unchanged).
      spec: LinearAttentionSpec.
      log_decay: [B, H, T] or [B, H, T, Dk] log of the per-step decay (<= 0).

    Returns:
      (AttentionOutput(out [B, H, T, Dv] float32, None, None), new state).
    """
    o, s = linear_attention(q, k_new, v_new, log_decay, self.state, q_positions >= 0,
                            spec=spec)
    return attn_lib.AttentionOutput(o, None, None), self.replace(state=s)


# --------------------------------------------------------------------------------------------
# Diagonal linear recurrence (RG-LRU) and causal conv1d
# --------------------------------------------------------------------------------------------
def diagonal_scan(a, x, h0, valid=None, *, parallel: bool = True):
  """h_t = a_t * h_{t-1} + x_t over T; a, x [B, T, W], h0 [B, W] float32.

  `parallel` uses an associative scan (training / prefill, O(log T) depth); otherwise a
  sequential scan (decode). Invalid tokens (valid [B, T] False) leave h unchanged.
  Returns h [B, T, W] float32 and the final h [B, W].
  """
  f32 = jnp.float32
  a, x = a.astype(f32), x.astype(f32)
  if valid is not None:
    a = jnp.where(valid[..., None], a, 1.0)
    x = jnp.where(valid[..., None], x, 0.0)
  if parallel:
    x = x.at[:, 0].add(a[:, 0] * h0)

    def combine(l, r):
      al, xl = l
      ar, xr = r
      return al * ar, ar * xl + xr

    _, h = jax.lax.associative_scan(combine, (a, x), axis=1)
    return h, h[:, -1]

  def step(hp, xs):
    at, xt = xs
    hn = at * hp + xt
    return hn, hn

  last, h = jax.lax.scan(step, h0.astype(f32), (jnp.moveaxis(a, 1, 0), jnp.moveaxis(x, 1, 0)))
  return jnp.moveaxis(h, 0, 1), last


@flax.struct.dataclass
class DiagonalState(_StateMixin):
  """h [B, W] float32 of a diagonal linear recurrence."""

  h: Array

  @classmethod
  def init(cls, batch: int, width: int) -> "DiagonalState":
    return cls(h=jnp.zeros((batch, width), jnp.float32))

  @property
  def length(self) -> Array:
    return jnp.zeros(self.h.shape[:1] + (1,), jnp.int32)

  def scan(self, a, x, positions):
    """Runs the recurrence over new tokens (parallel for T > 1); returns (h [B,T,W], state')."""
    h, last = diagonal_scan(a, x, self.h, positions >= 0, parallel=a.shape[1] > 1)
    return h, self.replace(h=last)


def causal_conv1d(x, w, b, state, n_valid=None):
  """Depthwise causal conv over time with a carried window of past inputs.

  Args:
    x: [B, T, C] new inputs, valid tokens first (right padding; padded inputs must be 0 or
      come after the valid ones -- their outputs are discarded).
    w: [K, C] taps; w[K-1] multiplies the current input.
    b: [C] bias.
    state: [B, K-1, C] the K-1 inputs before x (zeros at the start of a row).
    n_valid: [B] int32 valid tokens per row (default T).

  Returns:
    y [B, T, C] and the new state: the last K-1 inputs up to each row's last valid token.
  """
  bsz, t, _ = x.shape
  kw = w.shape[0]
  xe = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
  y = sum(xe[:, i:i + t] * w[i] for i in range(kw)) + b
  if kw == 1:
    return y, state
  if n_valid is None:
    n_valid = jnp.full((bsz,), t, jnp.int32)
  idx = n_valid[:, None] + jnp.arange(kw - 1)[None, :]       # [B, K-1]
  new_state = jnp.take_along_axis(xe, idx[..., None], axis=1)
  return y, new_state.astype(state.dtype)


@flax.struct.dataclass
class ConvState(_StateMixin):
  """window [B, K-1, C]: the last K-1 inputs of a causal depthwise conv1d."""

  window: Array

  @classmethod
  def init(cls, batch: int, kernel: int, channels: int, dtype=jnp.float32) -> "ConvState":
    if kernel < 1:
      raise ValueError(f"kernel={kernel}; must be >= 1")
    return cls(window=jnp.zeros((batch, kernel - 1, channels), dtype))

  @property
  def length(self) -> Array:
    return jnp.zeros(self.window.shape[:1] + (1,), jnp.int32)

  def apply(self, x, w, b, positions):
    """Convolves new inputs x [B, T, C] (valid tokens first); returns (y, state')."""
    valid = positions >= 0
    x = jnp.where(valid[..., None], x, 0)
    n_valid = jnp.sum(valid, axis=-1).astype(jnp.int32)
    y, win = causal_conv1d(x, w, b, self.window, n_valid)
    return y, self.replace(window=win)


@flax.struct.dataclass
class ConvRecurrentState(_StateMixin):
  """A conv window plus a recurrent state (Mamba-2: + LinearAttentionState; Griffin's
  recurrent block: + DiagonalState)."""

  conv: ConvState
  rec: Union[LinearAttentionState, DiagonalState]

  @property
  def length(self) -> Array:
    return self.rec.length


# --------------------------------------------------------------------------------------------
# Multi-head latent attention cache
# --------------------------------------------------------------------------------------------
@flax.struct.dataclass
class LatentKVCache:
  """MLA's compressed cache (DeepSeek-AI, 2024, "DeepSeek-V2"): one latent per token.

  Attention runs as multi-query attention over a single latent "kv head": keys are
  [c_kv ; k_rope] (r + d_r channels) and values are c_kv (r channels); the model absorbs
  W_UK into the query and W_UV into the output, so nothing per head is cached.

  Attributes:
    c_kv: [B, S, r] normalised latents.
    k_rope: [B, S, d_r] RoPE-rotated key part shared by all heads.
    positions: [B, S] int32 (-1 = empty).
    lengths: [B] int32 valid slots.
  """

  c_kv: Array
  k_rope: Array
  positions: Array
  lengths: Array

  @classmethod
  def init(cls, batch: int, capacity: int, latent_dim: int, rope_dim: int,
           dtype=jnp.float32) -> "LatentKVCache":
    if capacity < 1:
      raise ValueError(f"capacity={capacity}; must be >= 1")
    return cls(c_kv=jnp.zeros((batch, capacity, latent_dim), dtype),
               k_rope=jnp.zeros((batch, capacity, rope_dim), dtype),
               positions=jnp.full((batch, capacity), -1, jnp.int32),
               lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def capacity(self) -> int:
    return self.c_kv.shape[-2]

  @property
  def latent_dim(self) -> int:
    return self.c_kv.shape[-1]

  @property
  def length(self) -> Array:
    """[B, 1] valid slots (one latent head)."""
    return self.lengths[..., None]

  @property
  def nbytes(self) -> int:
    return cache_lib.tree_nbytes(self)

  def check_room(self, positions_new) -> None:
    cache_lib.check_room(self.lengths[..., None], positions_new, self.capacity,
                         what="latent cache")

  def append(self, c_new, k_rope_new, positions_new) -> "LatentKVCache":
    """Writes c_new [B, T, r], k_rope_new [B, T, d_r] at positions [B, T] (-1 = padding)."""
    cache_lib.check_room(self.lengths[..., None], positions_new, self.capacity,
                         what="latent cache")
    dest = cache_lib.pack_destinations(self.lengths[:, None], positions_new, self.capacity)
    n_new = jnp.sum(positions_new >= 0, axis=-1).astype(jnp.int32)

    def put(buf, new):
      return cache_lib.scatter_slots(buf[:, None], dest, new[:, None])[:, 0]

    return self.replace(c_kv=put(self.c_kv, c_new), k_rope=put(self.k_rope, k_rope_new),
                        positions=put(self.positions, positions_new),
                        lengths=jnp.minimum(self.lengths + n_new, self.capacity))

  def attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, *,
             return_lse=False):
    """Appends, then attends absorbed queries over the latents.

    Args:
      q: [B, H, T, r + d_r] absorbed queries [q_nope W_UK^T ; q_rope].
      k_new: [B, 1, T, r + d_r] new [c_kv ; k_rope] (RoPE applied to the rope part).
      v_new: must be None (values are the latents).
      q_positions: [B, T].
      spec: AttentionSpec (set `scale` to the head's (d_nope + d_r) ** -0.5).

    Returns:
      (AttentionOutput(out [B, H, T, r] in latent space, lse?, None), new cache).
    """
    if v_new is not None:
      raise ValueError("LatentKVCache.attend: v_new must be None (values are the latents)")
    r = self.latent_dim
    new = self.append(k_new[:, 0, :, :r], k_new[:, 0, :, r:], q_positions)
    keys = jnp.concatenate([new.c_kv, new.k_rope], axis=-1)[:, None]
    res = attn_lib.attention(q, keys, new.c_kv[:, None], new.lengths[:, None],
                             q_positions=q_positions, k_positions=new.positions[:, None],
                             spec=spec, return_lse=return_lse)
    return res, new
