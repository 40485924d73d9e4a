"""Query-aware page retrieval (Quest: "Quest: Query-Aware Sparsity for Efficient Long-Context
LLM Inference", Tang et al., 2024, arXiv:2406.10774): keys/values held on the host in pages,
per-page key bounds on the device, the top-k pages per (row, kv head) fetched each step.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax.offload.placement import to_host
from kvjax.offload.spec import QUEST
from kvjax.offload.swap import HostCopy, swap_in


_NEG = attn_lib.NEG_INF


# -- Quest: query-aware page selection -------------------------------------------------------------
def page_bounds(k, lengths, page_size: int):
  """Per-page element-wise key min / max: (kmin, kmax [B, H, M, D], page_valid [B, H, M]).

  k [B, H, S, D] with S a multiple of page_size; slots >= lengths [B, H] are ignored.
  Pages with no valid slot get kmin = kmax = 0 and page_valid False.
  """
  b, h, s, d = k.shape
  if s % page_size:
    raise ValueError(f"slots S={s} must be a multiple of page_size={page_size}")
  m = s // page_size
  valid = (jnp.arange(s) < lengths[..., None]).reshape(b, h, m, page_size, 1)
  kp = k.astype(jnp.float32).reshape(b, h, m, page_size, d)
  kmin = jnp.min(jnp.where(valid, kp, jnp.inf), axis=3)
  kmax = jnp.max(jnp.where(valid, kp, -jnp.inf), axis=3)
  pv = jnp.any(valid[..., 0], axis=-1)
  kmin = jnp.where(pv[..., None], kmin, 0.0)
  kmax = jnp.where(pv[..., None], kmax, 0.0)
  return kmin, kmax, pv


def page_scores(q, kmin, kmax, page_valid, q_positions=None):
  """Upper bound of q . k over each page: [B, Hkv, M] float32 (invalid pages: -1e30).

  q [B, Hq, T, D] (RoPE applied); the bound of a kv head's page is the max over its G query
  heads and over the valid queries of the chunk.
  """
  b, hq, t, d = q.shape
  hkv = kmin.shape[1]
  g = hq // hkv
  qg = q.astype(jnp.float32).reshape(b, hkv, g, t, 1, d)
  ub = jnp.sum(jnp.maximum(qg * kmin[:, :, None, None], qg * kmax[:, :, None, None]), -1)
  if q_positions is not None:
    ub = jnp.where((q_positions >= 0)[:, None, None, :, None], ub, _NEG)
  ub = jnp.max(ub, axis=(2, 3))                                         # [B, Hkv, M]
  return jnp.where(page_valid, ub, _NEG)


def select_pages(scores, page_valid, top_k: int, *, keep_last: bool = True):
  """Top-k pages per (row, kv head): (indices [B, H, K] ascending, selected-valid [B, H, K]).

  keep_last forces the last valid page in (it holds the most recent offloaded tokens).
  """
  m = scores.shape[-1]
  k = min(top_k, m)
  s = scores
  if keep_last:
    last = jnp.max(jnp.where(page_valid, jnp.arange(m), -1), axis=-1)     # [B, H]
    s = jnp.where(jnp.arange(m) == last[..., None], jnp.inf, s)
  _, idx = jax.lax.top_k(s, k)
  idx = jnp.sort(idx, axis=-1)
  ok = jnp.take_along_axis(page_valid, idx, axis=-1)
  return idx.astype(jnp.int32), ok


class QuestStore(NamedTuple):
  """One layer's offloaded context: pages in host memory, key bounds on the device.

  k_pages, v_pages: [B, H, M, P, D|Dv] host memory; pos_pages [B, H, M, P] int32 host
  (-1 = empty); kmin, kmax [B, H, M, D] float32 device; page_valid [B, H, M] device.
  """

  k_pages: Any
  v_pages: Any
  pos_pages: Any
  kmin: jax.Array
  kmax: jax.Array
  page_valid: jax.Array

  @property
  def page_size(self) -> int:
    return self.pos_pages.shape[-1]

  @property
  def num_pages(self) -> int:
    return self.pos_pages.shape[2]

  @property
  def host_nbytes(self) -> int:
    return cache_lib.tree_nbytes((self.k_pages, self.v_pages, self.pos_pages))

  @property
  def device_nbytes(self) -> int:
    return cache_lib.tree_nbytes((self.kmin, self.kmax, self.page_valid))


def quest_offload(cache: cache_lib.DenseKVCache, page_size: int, *,
                  kind: Optional[str] = None) -> QuestStore:
  """Pages a (dense, unstacked) layer cache out to host memory, keeping bounds on device.

  The cache's slots [0, length) are cut into pages of page_size (the last page padded).
  """
  b, h, s, d = cache.k.shape
  m = -(-s // page_size)
  pad = m * page_size - s
  slot = jnp.arange(s)
  valid = slot < cache.lengths[..., None]
  pos = jnp.where(valid & (cache.positions >= 0), cache.positions, -1)
  k = jnp.pad(cache.k, ((0, 0), (0, 0), (0, pad), (0, 0)))
  v = jnp.pad(cache.v, ((0, 0), (0, 0), (0, pad), (0, 0)))
  pos = jnp.pad(pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
  kmin, kmax, pv = page_bounds(k, cache.lengths, page_size)
  host = to_host((k.reshape(b, h, m, page_size, d), v.reshape(b, h, m, page_size, -1),
                  pos.reshape(b, h, m, page_size)), kind)
  return QuestStore(*host, kmin, kmax, pv)


def _host_np(x):
  return x if isinstance(x, np.ndarray) else np.asarray(x)


def fetch_pages(store: QuestStore, idx, ok):
  """Gathers pages idx [B, H, K] on the host and sends only them to the device.

  Returns (k [B, H, K*P, D], v, positions [B, H, K*P]) on the device; unselected (ok False)
  pages get positions -1.
  """
  idx_np, ok_np = np.asarray(idx), np.asarray(ok)

  def take(a):
    a = _host_np(a)
    extra = a.ndim - 3
    sel = np.take_along_axis(a, idx_np.reshape(idx_np.shape + (1,) * extra), axis=2)
    return sel.reshape(sel.shape[:2] + (-1,) + sel.shape[4:])

  k, v, pos = take(store.k_pages), take(store.v_pages), take(store.pos_pages)
  pos = np.where(np.repeat(ok_np, store.page_size, axis=-1), pos, -1)
  return jax.device_put((k, v, pos))


@functools.partial(jax.jit, static_argnames=("top_k", "keep_last"))
def _quest_select(q, q_positions, kmin, kmax, page_valid, top_k, keep_last):
  scores = page_scores(q, kmin, kmax, page_valid, q_positions)
  return select_pages(scores, page_valid, top_k, keep_last=keep_last)


@functools.partial(jax.jit, static_argnames=("spec",))
def _quest_attend(q, k_new, v_new, q_positions, sel_k, sel_v, sel_pos, recent, spec):
  recent = recent.append(k_new, v_new, q_positions)
  k = jnp.concatenate([sel_k.astype(recent.k.dtype), recent.k], axis=2)
  v = jnp.concatenate([sel_v.astype(recent.v.dtype), recent.v], axis=2)
  rpos = jnp.where(recent.valid_mask(), recent.positions, -1)
  pos = jnp.concatenate([sel_pos, rpos], axis=2)
  b, h, s = pos.shape
  res = attn_lib.attention(q, k, v, jnp.full((b, h), s, jnp.int32), q_positions=q_positions,
                           k_positions=pos, spec=spec, return_lse=True)
  return res, recent


def quest_attend(q, k_new, v_new, q_positions, store: QuestStore,
                 recent: cache_lib.DenseKVCache,
                 spec: attn_lib.AttentionSpec = attn_lib.AttentionSpec(), *, top_k: int,
                 keep_last: bool = True):
  """One attention step over offloaded pages (top-k by Quest bound) + the device window.

  Args:
    q: [B, Hq, T, D] queries; k_new, v_new [B, Hkv, T, D]; q_positions [B, T].
    store: the offloaded context (quest_offload).
    recent: device-resident DenseKVCache of tokens after the offloaded ones (may be empty);
      the chunk is appended to it.
    top_k: pages fetched per (row, kv head).

  Returns: (AttentionOutput with lse, recent', selected page indices [B, Hkv, K]).
  """
  recent.check_room(q_positions)
  idx, ok = _quest_select(q, q_positions, store.kmin, store.kmax, store.page_valid,
                          top_k=top_k, keep_last=keep_last)
  sel_k, sel_v, sel_pos = fetch_pages(store, idx, ok)
  res, recent = _quest_attend(q, k_new, v_new, q_positions, sel_k, sel_v, sel_pos, recent,
                              spec)
  return res, recent, idx


# -- a model's prompt offloaded for Quest decoding ------------------------------------------------
@flax.struct.dataclass
class QuestCache:
  """A model's prompt offloaded for Quest decoding, and the device window decoded since.

  Attributes:
    stores: per layer a QuestStore (pages on the host, key bounds on the device).
    recent: per layer a device DenseKVCache of the tokens fed after the prompt.
    selected: per layer the page indices [B, Hkv, top_k] the last step attended to.
    next_position: [B] int32.
    top_k, keep_last: static selection settings.
  """

  stores: tuple
  recent: tuple
  selected: tuple
  next_position: jax.Array
  top_k: int = flax.struct.field(pytree_node=False, default=4)
  keep_last: bool = flax.struct.field(pytree_node=False, default=True)

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(offloaded=True)
  offload_mode: ClassVar[str] = QUEST  # a step fetches each layer's top-k pages

  @classmethod
  def from_layers(cls, layers: Sequence[Any], next_position, *, page_size: int, room: int,
                  top_k: int, keep_last: bool = True, kind: Optional[str] = None
                  ) -> "QuestCache":
    """Pages dense layer caches (device arrays, or HostCopy brought in one at a time) out."""
    stores, recent, sel = [], [], []
    for i, c in enumerate(layers):
      if isinstance(c, HostCopy):
        c = swap_in(c)
      if not cache_lib.caps(c).pressable:  # DenseKVCache's slot layout
        raise ValueError(f"layer {i} is a {type(c).__name__}; Quest offload pages "
                         "DenseKVCache layers only (build the cache with window_cache=False "
                         "and no quantized kinds)")
      st = quest_offload(c, page_size, kind=kind)
      stores.append(st)
      recent.append(cache_lib.DenseKVCache.init(c.batch, c.kv_heads, room, c.k.shape[-1],
                                                c.k.dtype, v_head_dim=c.v.shape[-1]))
      sel.append(jnp.zeros((c.batch, c.kv_heads, min(top_k, st.num_pages)), jnp.int32))
    return cls(tuple(stores), tuple(recent), tuple(sel), jnp.asarray(next_position, jnp.int32),
               top_k, keep_last)

  @classmethod
  def from_model_cache(cls, cache, **kw) -> "QuestCache":
    """From a ModelCache or a HostCache (then one layer at a time is on the device)."""
    layers = cache.layers if cache_lib.caps(cache).offloaded else cache.layers()
    return cls.from_layers(layers, cache.next_position, **kw)

  @property
  def num_layers(self) -> int:
    return len(self.stores)

  @property
  def batch(self) -> int:
    return int(self.next_position.shape[0])

  @property
  def room(self) -> int:
    return self.recent[0].capacity

  @property
  def host_nbytes(self) -> int:
    return sum(s.host_nbytes for s in self.stores)

  @property
  def device_nbytes(self) -> int:
    """Resident device bytes: key bounds, windows, selections, next_position (the pages a
    step fetches, top_k * page_size tokens per (row, kv head, layer), come and go)."""
    return (sum(s.device_nbytes for s in self.stores)
            + cache_lib.tree_nbytes((self.recent, self.selected, self.next_position)))

  @property
  def nbytes(self) -> int:
    return self.host_nbytes + self.device_nbytes

  def check_room(self, positions_new) -> None:
    r = self.recent[0]
    need = np.asarray(r.lengths).max(-1) + np.asarray(positions_new >= 0).sum(-1)
    if (need > r.capacity).any():
      raise ValueError(f"Quest window overflow: {need.max()} tokens after the prompt exceed "
                       f"OffloadSpec.room={r.capacity}; raise room")
