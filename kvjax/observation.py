"""What a forward pass reports per layer for presses (attention statistics, queries).

Presses declare what they need with an `Observe` (their `observe` attribute); the model
computes it inside attention (never as an S x S matrix) and hands each layer's dict to the
press: {"colsum": [B, Hkv, S] (aligned with the layer's cache slots),
        "queries": [B, Hq, W, D] last W valid queries, post-RoPE, zero-padded at the front,
        "lse": [B, Hq, W] those queries' attention log-sum-exps,
        "reconstruction": [B, Hkv, S] max attention each slot receives while the model
                          re-reads its context (KVzip; models.prefill runs that extra
                          forward in chunks of `reconstruction` tokens),
        "o_proj": [Hq * D, H] the layer's attention output projection (CriticalKV),
        "query_count" [B], "query_sum" [B, Hq, D], "query_outer" [B, Hq, D, D]: sums over
                          every prompt query at positions >= `query_moments` of the
                          pre-RoPE queries and their outer products (ExpectedAttention's
                          statistics; sums, so a chunked prefill adds its chunks up)}.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Observe:
  """Static request for per-layer observations.

  Attributes:
    colsum: attention probability mass per cache slot, summed over queries and the query
      heads of each kv group ([B, Hkv, S], float32).
    colsum_window: only the last `colsum_window` queries count (SnapKV's window).
    queries: keep the last `queries` query vectors (post-RoPE) [B, Hq, W, D].
    lse: with `queries`, also their attention log-sum-exps [B, Hq, W] (obs["lse"]), so a
      press can turn a logit into the forward's own probability without a softmax pass.
    reconstruction: > 0: after the prompt, re-feed the prompt through the prefilled cache in
      chunks of `reconstruction` tokens, each chunk after a repeat instruction and on top of
      the context alone (KVzip's chunked scoring), and report per slot the max attention
      probability that the reconstruction queries of the chunk holding the slot's token pay
      it (KVzip's context-reconstruction score). 0: off.
    reconstruction_prompt: what frames each chunk, (prefix, continue, overlap, suffix):
      the token ids of the repeat instruction fed before the first chunk; of the
      instruction fed before every later chunk, followed by the previous chunk's last
      `overlap` tokens (KVzip: "Repeat the part of the previous context exactly, starting
      with ..."; () = the first instruction again); and of what goes between the
      instruction and the chunk (in chat form, the end of the user turn and the start of
      the assistant's). () = no instruction at all.
    o_proj: report each layer's attention output projection weight.
    query_moments: None, or report the first and second moments (as sums, with their
      count) of the pre-RoPE queries at positions >= this value (see `query_moments`).
  """

  colsum: bool = False
  colsum_window: Optional[int] = None
  queries: int = 0
  lse: bool = False
  reconstruction: int = 0
  reconstruction_prompt: tuple = ()
  o_proj: bool = False
  query_moments: Optional[int] = None

  def merge(self, other: "Observe") -> "Observe":
    if self.colsum and other.colsum and self.colsum_window != other.colsum_window:
      raise ValueError(f"conflicting colsum_window requests: {self.colsum_window} vs "
                       f"{other.colsum_window}")
    if (self.reconstruction and other.reconstruction and
        self.reconstruction_prompt != other.reconstruction_prompt):
      raise ValueError(f"conflicting reconstruction_prompt requests: "
                       f"{self.reconstruction_prompt} vs {other.reconstruction_prompt}")
    moments = {m for m in (self.query_moments, other.query_moments) if m is not None}
    if len(moments) > 1:
      raise ValueError(f"conflicting query_moments requests: {sorted(moments)}")
    chunks = [c for c in (self.reconstruction, other.reconstruction) if c]
    rec = self if self.reconstruction else other
    return Observe(colsum=self.colsum or other.colsum,
                   colsum_window=self.colsum_window if self.colsum else other.colsum_window,
                   queries=max(self.queries, other.queries),
                   lse=self.lse or other.lse,
                   reconstruction=min(chunks) if chunks else 0,
                   reconstruction_prompt=rec.reconstruction_prompt,
                   o_proj=self.o_proj or other.o_proj,
                   query_moments=min(moments) if moments else None)

  def forward_part(self) -> "Observe":
    """What one forward pass computes (the reconstruction pass and weights come after)."""
    return Observe(colsum=self.colsum, colsum_window=self.colsum_window, queries=self.queries,
                   lse=self.lse, query_moments=self.query_moments)


MOMENT_KEYS = ("query_count", "query_sum", "query_outer")


def query_moments(q, positions, start: int, rope=None) -> dict:
  """Moment sums of the pre-RoPE queries at positions >= start (ExpectedAttention).

  Args:
    q: [B, Hq, T, D] queries as attention reads them (RoPE applied when `rope` is given).
    positions: [B, T] their positions (-1: padding, never counted).
    start: first position counted (ExpectedAttention leaves its sinks out).
    rope: the layer's kvjax.rope.RopeConfig, used to undo the rotation; None: q is
      already pre-RoPE.

  Returns: {"query_count": [B], "query_sum": [B, Hq, D], "query_outer": [B, Hq, D, D]},
  float32 sums, so the moments of a prompt fed in chunks are the sums of its chunks'.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from kvjax import rope as rope_lib  # pylint: disable=import-outside-toplevel
  qf = q.astype(jnp.float32)
  if rope is not None:
    pos = jnp.broadcast_to(positions[:, None, :], qf.shape[:3])
    qf = rope_lib.rerotate(qf, pos, jnp.zeros_like(pos), rope)
  w = (positions >= max(0, start)).astype(jnp.float32)              # [B, T]
  qw = qf * w[:, None, :, None]
  return {"query_count": jnp.sum(w, -1), "query_sum": jnp.sum(qw, 2),
          "query_outer": jnp.einsum("bhti,bhtj->bhij", qw, qf)}


def add_moments(totals, obs_list):
  """Per-layer observations with the moment sums of `totals` (a previous chunk's, or None)
  added in; returns (new totals, obs_list with the running sums)."""
  if totals is None:
    totals = [{k: o[k] for k in MOMENT_KEYS} for o in obs_list]
  else:
    totals = [{k: t[k] + o[k] for k in MOMENT_KEYS} for t, o in zip(totals, obs_list)]
  return totals, [dict(o, **t) for o, t in zip(obs_list, totals)]


def colsum_by_position(colsum, positions, length: int):
  """[B, Hkv, length] float32: slot-aligned colsum [B, Hkv, S] moved to token positions.

  `positions [B, Hkv, S]` are the slots' original positions (-1 = empty, dropped). Slots
  keep their positions through every eviction, so statistics indexed by position survive
  any re-layout of the cache (chunked prefill, a press before decode-time compression).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  b, h, _ = positions.shape
  ok = (positions >= 0) & (positions < length)
  idx = jnp.where(ok, positions, length)
  out = jnp.zeros((b, h, length + 1), jnp.float32)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  out = out.at[bi, hi, idx].add(jnp.where(ok, colsum.astype(jnp.float32), 0.0))
  return out[..., :length]


def colsum_at_slots(by_position, positions):
  """[B, Hkv, S]: position-indexed statistics [B, Hkv, P] read back at each slot (0 where
  the slot is empty or its position is outside [0, P))."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  p = by_position.shape[-1]
  ok = (positions >= 0) & (positions < p)
  got = jnp.take_along_axis(by_position, jnp.clip(positions, 0, p - 1), axis=-1)
  return jnp.where(ok, got, 0.0)


def realign_colsum(obs_list, old_positions, model_cache, length: int):
  """Per-layer observations with "colsum" moved by position from the slots `old_positions`
  (per layer [B, Hkv, S]) to `model_cache`'s slots, e.g. a prefill's statistics after its
  press re-laid the cache out. Other keys stay as they are."""
  out = []
  for obs, old, layer in zip(obs_list, old_positions, model_cache.layers()):
    obs = dict(obs or {})
    if obs.get("colsum") is not None:
      obs["colsum"] = colsum_at_slots(colsum_by_position(obs["colsum"], old, length),
                                      layer.positions)
    out.append(obs)
  return out
