"""Recurrent states and the latent KV cache of the retrained families.

Recurrent states follow their own written protocol, `RecurrentState`:

  scan(inputs, positions, **options) -> (outputs, state')
      folds T new tokens into the state and returns one output per token; `inputs` is a
      tuple of per-token arrays (below), positions [B, T] int32 (-1 = padding: the token
      leaves the state unchanged), options are the kind's weights and static settings;
  nbytes, length, check_room (a no-op), capacity == 0 (no token slots: a fixed-size state
  never runs out of room) and CAPS (`fixed_size`, `recurrent`), shared with the KV kinds
  (kvjax.cache), so both ride in one `ModelCache` and one generate loop serves them all.

Kinds (memory O(1) in the sequence length), with their scan inputs -> outputs:

  LinearAttentionState  S [B, H, Dk, Dv] of gated linear attention (GLA, Yang et al., 2023,
                        arXiv:2312.06635; RetNet, Sun et al., 2023, arXiv:2307.08621;
                        Mamba-2 SSD, Dao & Gu, 2024, arXiv:2405.21060 -- the SSD recurrence
                        is linear attention with a scalar decay, q = C, k = B, v = dt * x).
                        (q, k [B,H,T,Dk], v [B,H,T,Dv], log_decay [B,H,T(,Dk)]), spec=
                        -> o [B,H,T,Dv]
  DiagonalState         h [B, W] of a diagonal linear recurrence (Griffin's RG-LRU, De et
                        al., 2024, arXiv:2402.19427). (a, x [B,T,W]) -> h [B,T,W]
  ConvState             the last K - 1 inputs [B, K-1, C] of a causal depthwise conv1d.
                        (x [B,T,C],), w=, b= -> y [B,T,C]
  ConvRecurrentState    a ConvState + a recurrent state (Mamba-2 / Griffin blocks); the
                        block scans `conv`, then `rec`.

Recurrent states are float32 whatever the model dtype (as in recurrentgemma).

`LatentKVCache` is a KV layer cache (the `kvjax.cache.LayerCache` protocol) of multi-head
latent attention (DeepSeek-V2, DeepSeek-AI, 2024, arXiv:2405.04434): O(N) but small, the
compressed c_kv [B, S, r] and the shared RoPE key [B, S, d_r]; attention runs in the latent
space with the up-projections absorbed into the query and the output. Sliding-window rings
(with sinks and dilation) are `kvjax.window.WindowKVCache`.

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
from typing import ClassVar, Protocol, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib

Array = jax.Array


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


class RecurrentState(Protocol):
  """The protocol of recurrent states (see the module docstring for each kind's inputs)."""

  CAPS: ClassVar[cache_lib.Capabilities]

  def scan(self, inputs: tuple, positions, **options) -> tuple: ...

  def check_room(self, positions_new) -> None: ...

  @property
  def nbytes(self) -> int: ...

  @property
  def capacity(self) -> int: ...

  @property
  def length(self) -> Array: ...


class RecurrentStateBase:
  """The members every recurrent state shares (`RecurrentState` less `scan` and `length`)."""

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(fixed_size=True,
                                                                  recurrent=True)

  @property
  def capacity(self) -> int:
    """No token slots: a fixed-size state never runs out of room."""
    return 0

  @property
  def nbytes(self) -> int:
    return cache_lib.tree_nbytes(self)

  def check_room(self, positions_new) -> None:
    """A fixed-size state never overflows."""
    del positions_new


@flax.struct.dataclass
class LinearAttentionState(RecurrentStateBase):
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

  def scan(self, inputs, positions, *, spec: LinearAttentionSpec = LinearAttentionSpec()):
    """Folds the new tokens into the state and reads it with the queries.

    Args:
      inputs: (q, k [B, H, T, Dk], v [B, H, T, Dv], log_decay [B, H, T] or [B, H, T, Dk]
        log of the per-step decay, <= 0).
      positions: [B, T] int32 (-1 = padding: the token leaves the state unchanged).
      spec: LinearAttentionSpec.

    Returns:
      (o [B, H, T, Dv] float32, new state).
    """
    q, k, v, log_decay = inputs
    o, s = linear_attention(q, k, v, log_decay, self.state, positions >= 0, spec=spec)
    return o, self.replace(state=s)


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
class DiagonalState(RecurrentStateBase):
  """h [B, W] float32 of a diagonal linear recurrence."""

  h: Array

  @classmethod
  def init(cls, batch: int, width: int) -> "DiagonalState":
    return cls(h=jnp.zeros((batch, width), jnp.float32))

  @property
  def length(self) -> Array:
    return jnp.zeros(self.h.shape[:1] + (1,), jnp.int32)

  def scan(self, inputs, positions):
    """Runs the recurrence over new tokens (parallel for T > 1).

    Args:
      inputs: (a, x [B, T, W]): h_t = a_t * h_{t-1} + x_t.
      positions: [B, T] int32 (-1 = padding).

    Returns:
      (h [B, T, W] float32, new state).
    """
    a, x = inputs
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
class ConvState(RecurrentStateBase):
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

  def scan(self, inputs, positions, *, w, b):
    """Convolves new inputs (valid tokens first).

    Args:
      inputs: (x [B, T, C],).
      positions: [B, T] int32 (-1 = padding).
      w: [K, C] taps (w[K-1] multiplies the current input); b: [C] bias.

    Returns:
      (y [B, T, C], new state).
    """
    (x,) = inputs
    valid = positions >= 0
    x = jnp.where(valid[..., None], x, 0)
    n_valid = jnp.sum(valid, axis=-1).astype(jnp.int32)
    y, win = causal_conv1d(x, w, b, self.window, n_valid)
    return y, self.replace(window=win)


@flax.struct.dataclass
class ConvRecurrentState(RecurrentStateBase):
  """A conv window plus a recurrent state (Mamba-2: + LinearAttentionState; Griffin's
  recurrent block: + DiagonalState); the block scans `conv`, then `rec`."""

  conv: ConvState
  rec: Union[LinearAttentionState, DiagonalState]

  @property
  def length(self) -> Array:
    return self.rec.length


# --------------------------------------------------------------------------------------------
# Multi-head latent attention cache
# --------------------------------------------------------------------------------------------
@flax.struct.dataclass
class LatentKVCache(cache_lib.KVCacheBase):
  """MLA's compressed cache (DeepSeek-AI, 2024, "DeepSeek-V2", arXiv:2405.04434): one
  latent per token.

  Attention runs as multi-query attention over a single latent "kv head": keys are
  [c_kv ; k_rope] (r + d_r channels) and values are c_kv (r channels); the model absorbs
  W_UK into the query and W_UV into the output, so nothing per head is cached. In the
  `LayerCache` protocol the new keys are k_new [B, 1, T, r + d_r] = [c_kv ; k_rope] and
  v_new is None (the values are the latents).

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

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(colsum=True)

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
  def batch(self) -> int:
    return self.lengths.shape[-1]

  @property
  def kv_heads(self) -> int:
    return 1

  @property
  def head_dims(self) -> tuple:
    """Keys [c_kv ; k_rope], values c_kv."""
    return self.latent_dim + self.k_rope.shape[-1], self.latent_dim

  def check_room(self, positions_new) -> None:
    cache_lib.check_room(self.lengths[..., None], positions_new, self.capacity,
                         what="latent cache")

  def materialize(self) -> cache_lib.KVView:
    """Keys [c_kv ; k_rope] and values c_kv as one kv head."""
    slot = jnp.arange(self.capacity, dtype=jnp.int32)
    valid = ((slot < self.lengths[:, None]) & (self.positions >= 0))[:, None]
    keys = jnp.concatenate([self.c_kv, self.k_rope], axis=-1)[:, None]
    return cache_lib.KVView(keys, self.c_kv[:, None],
                            jnp.where(valid, self.positions[:, None], -1), valid)

  def _append(self, k_new, v_new, positions_new) -> "LatentKVCache":
    """Writes k_new [B, 1, T, r + d_r] = [c_kv ; k_rope] at positions [B, T] (-1 = padding)."""
    if v_new is not None:
      raise ValueError("LatentKVCache: v_new must be None (values are the latents)")
    self.check_room(positions_new)
    r = self.latent_dim
    dest = cache_lib.pack_destinations(self.lengths[:, None], positions_new, self.capacity)
    n_new = jnp.sum(positions_new >= 0, axis=-1).astype(jnp.int32)

    def put(buf, new):
      return cache_lib.scatter_slots(buf[:, None], dest, new[:, None])[:, 0]

    return self.replace(c_kv=put(self.c_kv, k_new[:, 0, :, :r]),
                        k_rope=put(self.k_rope, k_new[:, 0, :, r:]),
                        positions=put(self.positions, positions_new),
                        lengths=jnp.minimum(self.lengths + n_new, self.capacity))

  def _attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, **akw):
    """Appends, then attends absorbed queries over the latents.

    Args:
      q: [B, H, T, r + d_r] absorbed queries [q_nope W_UK^T ; q_rope].
      k_new: [B, 1, T, r + d_r] new [c_kv ; k_rope] (RoPE applied to the rope part).
      v_new: must be None (values are the latents).
      q_positions: [B, T].
      spec: AttentionSpec (set `scale` to the head's (d_nope + d_r) ** -0.5).

    Returns:
      (AttentionOutput(out [B, H, T, r] in latent space, lse?, colsum?), new cache).
    """
    new = self._append(k_new, v_new, q_positions)
    keys = jnp.concatenate([new.c_kv, new.k_rope], axis=-1)[:, None]
    res = attn_lib.attention(q, keys, new.c_kv[:, None], new.lengths[:, None],
                             q_positions=q_positions, k_positions=new.positions[:, None],
                             spec=spec, **akw)
    return res, new
