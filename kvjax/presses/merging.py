"""Merging evicted tokens into kept ones, an option of the gather step (`merge=` on any
ScorerPress, ChunkKV and AdaKV included).

  "cam"  CaM (Zhang et al., 2024, "CaM: Cache Merging for Memory-efficient LLMs
         Inference", ICML 2024): an evicted token's value is merged into its sequential
         neighbour: the next kept slot (the previous one at the end of the row).
  "d2o"  D2O (Wan et al., 2024, "D2O: Dynamic Discriminative Operations for Efficient
         Generative Inference of Large Language Models", arXiv:2406.13035): an evicted
         token is merged into the kept slot of the same head whose key is most similar
         (cosine), if that similarity is >= merge_threshold; keys and values both merge.

Both merge by an attention-weighted average: a kept slot t that receives evicted tokens E
becomes (a_t x_t + sum_{e in E} a_e x_e) / (a_t + sum_e a_e), where a is the attention mass
each slot received (obs["colsum"]; uniform weights when the press has no attention
statistics). Kept slots that receive nothing stay bit-identical.

Differences from the papers: CaM samples a Bernoulli merge mask from attention ratios and
spreads a value over `merge_budget` neighbours; here the expected (deterministic) weighted
average into one neighbour is used. D2O's EMA similarity threshold is a fixed threshold.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.presses import base


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def merge_targets(orig, new, idx, mode: str, threshold: float):
  """(new index of every original slot [B,H,S] (-1 evicted), merge target [B,H,S] (-1 none))."""
  b, h, s = orig.positions.shape
  k_new = idx.shape[-1]
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  j = jnp.broadcast_to(jnp.arange(k_new, dtype=jnp.int32), idx.shape)
  newidx = jnp.full((b, h, s), -1, jnp.int32).at[bi, hi, idx].set(j, mode="drop")
  kept = newidx >= 0
  if mode == "cam":
    nxt = jax.lax.cummin(jnp.where(kept, newidx, k_new), axis=2, reverse=True)
    prv = jax.lax.cummax(jnp.where(kept, newidx, -1), axis=2)
    target = jnp.where(nxt < k_new, nxt, prv)
  elif mode == "d2o":
    sim = jnp.einsum("bhsd,bhkd->bhsk", _normalize(orig.k.astype(jnp.float32)),
                     _normalize(new.k.astype(jnp.float32)))
    sim = jnp.where((idx < s)[:, :, None, :], sim, -jnp.inf)
    best = jnp.argmax(sim, axis=-1).astype(jnp.int32)
    target = jnp.where(jnp.max(sim, axis=-1) >= threshold, best, -1)
  else:
    raise ValueError(f"merge={mode!r}; allowed: {base.MERGE_MODES[1:]}")
  evicted = base.valid_slots(orig) & ~kept
  return newidx, jnp.where(evicted, target, -1)


def merge_evicted(orig, new, idx, colsum: Optional[jax.Array], *, mode: str,
                  threshold: float = 0.5):
  """Merges evicted slots of `orig` into the kept slots of `new` (same K as idx).

  Args:
    orig: the layer cache before eviction [B, H, S, D].
    new: the gathered cache [B, H, K, D] (gather_slots(orig, idx, ...)).
    idx: [B, H, K] kept slot indices (sentinel S = empty).
    colsum: [B, H, S] attention mass per original slot, or None (uniform weights).
    mode: "cam" | "d2o".
    threshold: d2o similarity threshold.
  """
  b, h, s = orig.positions.shape
  k_new = idx.shape[-1]
  newidx, target = merge_targets(orig, new, idx, mode, threshold)
  kept = newidx >= 0
  valid = base.valid_slots(orig)
  if colsum is None:
    w = valid.astype(jnp.float32)
  else:
    w = jnp.where(valid, jnp.maximum(colsum.astype(jnp.float32), 0.0) + 1e-12, 0.0)
  merged = target >= 0
  dest = jnp.where(kept, newidx, jnp.where(merged, target, k_new))
  w = jnp.where(kept | merged, w, 0.0)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  received = jnp.zeros((b, h, k_new + 1), jnp.int32).at[bi, hi, dest].add(
      merged.astype(jnp.int32))[..., :k_new]
  wsum = jnp.zeros((b, h, k_new + 1), jnp.float32).at[bi, hi, dest].add(w)[..., :k_new]

  def average(x_orig, x_new):
    num = jnp.zeros((b, h, k_new + 1, x_orig.shape[-1]), jnp.float32).at[bi, hi, dest].add(
        w[..., None] * x_orig.astype(jnp.float32))[:, :, :k_new]
    avg = (num / jnp.maximum(wsum, 1e-30)[..., None]).astype(x_new.dtype)
    return jnp.where((received > 0)[..., None], avg, x_new)

  out = new.replace(v=average(orig.v, new.v))
  if mode == "d2o":
    out = out.replace(k=average(orig.k, new.k))
  return out
