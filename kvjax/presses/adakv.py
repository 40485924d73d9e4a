"""AdaKV: head-wise adaptive budgets within a layer (Feng et al., 2024, "Ada-KV: Optimizing
KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
arXiv:2407.11550).

Wraps any scorer (a ScorerPress, or a scorer wrapper such as ChunkKVPress, whose heads then
keep whole chunks, or PyramidBudgetPress, whose layer totals follow the pyramid). The layer keeps the same total as the uniform rule (the sum over kv
heads of each head's uniform budget), but chooses it across heads: each head first keeps
its best `alpha_safeguard` fraction of its uniform budget, then the rest of the total goes
to the best remaining scores of the whole layer. Parameter names follow kvpress's
AdaKVPress.

Difference from kvpress, for real savings: kvpress masks evicted slots in place (no
memory saved). Here the layer's cache is re-laid out with static capacity
min(S, ceil(head_capacity_factor * uniform budget)), and a head keeps at most that many
slots; the cap is static (from S), never from data. The factor trades memory for freedom:
1.5 (default) stores 0.75 S at compression_ratio 0.5 and lets a head take 1.5x its uniform
share; 2.0 stores all S slots at ratio 0.5 (no saving there, 0.5 S at ratio 0.75);
head_capacity_factor=H (kv heads) lets one head take everything.

So the bytes are min(1, head_capacity_factor * (1 - compression_ratio)) of the dense
cache's, not 1 - compression_ratio: `memory_fraction` is the exact figure and the repr
quotes it. To compare AdaKV with a uniform press at equal bytes, give AdaKV the ratio r'
with head_capacity_factor * (1 - r') = 1 - r.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.presses import base, registry


@registry.register("adakv", query_agnostic=True, wraps="snapkv")
@dataclasses.dataclass(frozen=True, repr=False)
class AdaKVPress(base.ScorerWrapperPress):
  """Head-wise adaptive budget over any scorer.

  Attributes:
    press: the scorer providing scores and the uniform budget.
    alpha_safeguard: fraction of its uniform budget every head keeps. 0.20 (kvpress).
    head_capacity_factor: a head keeps at most this times the uniform budget (>= 1);
      sets the layer's static capacity. 1.5.
  """

  press: base.Press = None
  alpha_safeguard: float = 0.20
  head_capacity_factor: float = 1.5

  def __post_init__(self):
    self._check_scorer()
    if not 0 <= self.alpha_safeguard <= 1:
      raise ValueError(f"alpha_safeguard={self.alpha_safeguard}; must be in [0, 1]")
    if not self.head_capacity_factor >= 1:
      raise ValueError(f"head_capacity_factor={self.head_capacity_factor}; must be >= 1")

  def __repr__(self) -> str:
    return base.repr_with_memory(self)

  def layer_capacity(self, capacity, ctx=base.LayerContext()):
    uniform = int(self.press.keep_table(capacity, ctx).max())
    return max(1, min(capacity, math.ceil(self.head_capacity_factor * uniform)))

  def head_counts(self, scores, cache, table, k_static):
    """Per-(row, head) keep counts [B, Hkv] and per-head priority order [B, Hkv, S]."""
    b, h, s = scores.shape
    valid = base.valid_slots(cache)
    n_sink, n_recent = self.press.protected()
    tiers = base.protection_tiers(cache.lengths, s, n_sink, n_recent)
    order = base.rank_slots(scores, valid, tiers)
    uniform = jnp.asarray(table)[cache.lengths]                       # [B, H]
    safe = jnp.floor(uniform * self.alpha_safeguard).astype(jnp.int32)
    cap = jnp.minimum(cache.lengths, k_static)
    remaining = jnp.sum(uniform - safe, axis=1)                       # [B]
    # Candidates: each head's ranks [safe, cap), compared across heads by (tier, score).
    sc = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
    sorted_sc = jnp.take_along_axis(sc, order, axis=-1)
    sorted_tier = jnp.take_along_axis(jnp.where(valid, tiers, -1), order, axis=-1)
    r = jnp.arange(s, dtype=jnp.int32)
    cand = (r >= safe[..., None]) & (r < cap[..., None])
    flat_tier = jnp.where(cand, sorted_tier, -2).reshape(b, h * s)
    flat_sc = jnp.where(cand, sorted_sc, -jnp.inf).reshape(b, h * s)
    flat_idx = jnp.broadcast_to(jnp.arange(h * s, dtype=jnp.int32), (b, h * s))
    glob = jax.lax.sort((-flat_tier, -flat_sc, flat_idx), dimension=-1, is_stable=True,
                        num_keys=2)[-1]
    rank = jnp.zeros((b, h * s), jnp.int32).at[jnp.arange(b)[:, None], glob].set(
        jnp.broadcast_to(jnp.arange(h * s, dtype=jnp.int32), (b, h * s)))
    chosen = cand.reshape(b, h * s) & (rank < remaining[:, None])
    counts = jnp.sum(chosen.reshape(b, h, s), axis=-1).astype(jnp.int32)
    return safe + counts, order

  def choose(self, cache, obs, ctx, table, scores):
    s = cache.positions.shape[-1]
    p = self.press
    k_static = self.layer_capacity(s, ctx)
    keep, order = self.head_counts(scores, cache, table, k_static)
    idx = base.take_kept(order, keep, k_static, s)
    return base.finish(p, cache, obs, ctx, idx, keep)
