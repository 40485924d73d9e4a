"""Host offload tier: caches, pages and layers held in host memory, fetched when needed.

Four mechanisms, all over ordinary kvjax cache pytrees:

  * Placement by JAX memory kinds. `to_host(tree)` moves every array to the host memory
    space of the device that holds it (`pinned_host` where the backend offers it, else
    `unpinned_host`), keeping its sharding; `to_device(tree)` brings it back. Both are one
    asynchronous `jax.device_put`, so a transfer overlaps whatever is dispatched after it.
  * Swapping (`swap_out` / `swap_in`, and `swap_out_rows` / `swap_in_rows` for the rows of
    a paged cache, i.e. vLLM-style preemption by swapping). Exact by default (bit-exact
    round trip); `compress="int8"` quantizes floating arrays on the device before they
    leave (per-token symmetric int8 with a float32 scale per vector, kvjax.quant.formats),
    so 2x (bf16) or 4x (f32) fewer bytes cross the bus and sit in host memory, at an error
    of at most scale / 2 per entry.
  * Layer streaming (`stream_layers`): per-layer caches live on the host; the transfer of
    layer l+1 (and further, `prefetch`) is issued before layer l computes, and the updated
    layer goes back asynchronously, so transfers hide behind compute on accelerators.
  * Query-aware page retrieval (Quest, Tang et al., 2024; `QuestStore`): keys/values are
    held on the host in pages; per-page element-wise key min/max stay on the device. For a
    query q the score sum_d max(q_d * min_d, q_d * max_d) is an upper bound of q . k for
    every key of the page; only the top-k pages per (row, kv head) are fetched and attended,
    together with a device-resident window of recent tokens and the current chunk.

A model's whole cache in host memory: `HostCache` (every layer a HostCopy, streamed in by
`stream_layers` during each forward pass) and `QuestCache` (every layer a QuestStore plus
a device window); `OffloadSpec` says which. models.prefill(offload=OffloadSpec(...)) builds
them and models.decode runs on them (models/offload.py holds the model side).

Where device and host differ (GPU, TPU): `pinned_host` is page-locked host RAM the device
DMAs from, so `to_device` of a pinned array is an async copy over PCIe / the host link that
overlaps compute; XLA cannot run computations on host-memory operands, so selective page
fetches gather on the host (numpy, on the host copy of the array) and transfer only the
selected pages. On the CPU backend all memory kinds are the same RAM: transfers are memcpys
and "overlap" buys nothing, but every code path (placement, round trips, prefetch order,
selection) runs and is tested there. On a backend with no host memory kind, `to_host`
falls back to numpy arrays (a host copy) and `to_device` to `jax.device_put`.

Quest differences: Quest scores pages per query head and picks per head; kv heads here are
shared by G query heads (GQA), so a page's score for a kv head is the max over its G query
heads (and over the queries of the chunk), and selection is per (row, kv head). The page
holding the most recent offloaded tokens is always kept (`keep_last`), as is every token of
the device window.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax import paged as paged_lib

COMPRESSIONS = (None, "int8")
_NEG = attn_lib.NEG_INF


# -- memory kinds -----------------------------------------------------------------------------
def memory_kinds(device=None) -> tuple:
  """Memory kinds the device can address, e.g. ('device', 'pinned_host', 'unpinned_host')."""
  d = device if device is not None else jax.devices()[0]
  try:
    return tuple(m.kind for m in d.addressable_memories())
  except (AttributeError, NotImplementedError, RuntimeError):
    return ()


def host_memory_kind(device=None) -> Optional[str]:
  """'pinned_host' if available, else 'unpinned_host', else None (no host memory space)."""
  kinds = memory_kinds(device)
  for k in ("pinned_host", "unpinned_host"):
    if k in kinds:
      return k
  return None


def device_memory_kind(device=None) -> str:
  d = device if device is not None else jax.devices()[0]
  try:
    return d.default_memory().kind
  except (AttributeError, NotImplementedError, RuntimeError):
    return "device"


def memory_kind(x) -> str:
  """'numpy' for host numpy arrays, else the array's sharding memory kind."""
  if isinstance(x, np.ndarray):
    return "numpy"
  return x.sharding.memory_kind or device_memory_kind()


def _is_array(x):
  return isinstance(x, (jax.Array, np.ndarray))


def _first_device(x):
  return next(iter(x.sharding.device_set))


def to_host(tree, kind: Optional[str] = None):
  """Moves every array leaf to host memory (async; shardings kept, memory kind changed).

  Args:
    tree: pytree of jax arrays (on any device / mesh).
    kind: host memory kind; default `host_memory_kind()` of each array's device.
  """
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for x in leaves:
    if isinstance(x, np.ndarray) or not isinstance(x, jax.Array):
      out.append(x)
      continue
    k = kind or host_memory_kind(_first_device(x))
    if k is None:
      out.append(np.asarray(x))
    else:
      out.append(jax.device_put(x, x.sharding.with_memory_kind(k)))
  return jax.tree.unflatten(treedef, out)


def to_device(tree, device=None):
  """Brings host arrays back to device memory (async). numpy leaves go to `device`."""
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for x in leaves:
    if isinstance(x, np.ndarray):
      out.append(jax.device_put(x, device))
    elif isinstance(x, jax.Array):
      out.append(jax.device_put(
          x, x.sharding.with_memory_kind(device_memory_kind(_first_device(x)))))
    else:
      out.append(x)
  return jax.tree.unflatten(treedef, out)


# -- compression-aware swapping -----------------------------------------------------------------
@flax.struct.dataclass
class Int8Tensor:
  """A float array stored as per-vector symmetric int8 codes (last axis = vector).

  codes uint8 [..., D] (code 128 = 0), scale float32 [..., 1]; x ~= (codes - 128) * scale.
  """

  codes: jax.Array
  scale: jax.Array
  dtype: str = flax.struct.field(pytree_node=False, default="float32")

  @property
  def shape(self) -> tuple:
    return tuple(self.codes.shape)


def quantize_int8(x) -> Int8Tensor:
  """Per-vector (last axis) symmetric int8 via kvjax.quant.formats (|error| <= scale / 2)."""
  from kvjax.quant import formats  # pylint: disable=import-outside-toplevel
  q = formats.quantize_int(x, bits=8, axis="token", symmetric=True, scale_dtype="float32")
  return Int8Tensor(q.codes, q.scale, jnp.dtype(x.dtype).name)


def dequantize_int8(t: Int8Tensor) -> jax.Array:
  from kvjax.quant import formats  # pylint: disable=import-outside-toplevel
  return formats.dequantize_int(t.codes, t.scale, None, bits=8, axis="token").astype(t.dtype)


def _compressible(x) -> bool:
  return (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2
          and x.shape[-1] > 1)


@flax.struct.dataclass
class HostCopy:
  """What `swap_out` returns: the tree with (optionally int8-coded) leaves in host memory."""

  tree: Any
  compress: Optional[str] = flax.struct.field(pytree_node=False, default=None)

  @property
  def nbytes(self) -> int:
    return cache_lib.tree_nbytes(self.tree)


@functools.partial(jax.jit, static_argnames=("compress",))
def _encode_tree(tree, compress):
  del compress
  return jax.tree.map(lambda x: quantize_int8(x) if _compressible(x) else x, tree)


@jax.jit
def _decode_tree(tree):
  return jax.tree.map(lambda x: dequantize_int8(x) if isinstance(x, Int8Tensor) else x, tree,
                      is_leaf=lambda x: isinstance(x, Int8Tensor))


def swap_out(tree, *, compress: Optional[str] = None, kind: Optional[str] = None) -> HostCopy:
  """Moves a cache (any pytree of arrays) to host memory, optionally int8-compressed.

  With compress="int8" every floating array of rank >= 2 is quantized *on the device*
  before the transfer; integer arrays (positions, lengths, tables) move exactly.
  """
  if compress not in COMPRESSIONS:
    raise ValueError(f"compress={compress!r}; allowed: {COMPRESSIONS}")
  if compress == "int8":
    tree = _encode_tree(tree, compress)
  return HostCopy(to_host(tree, kind), compress)


def swap_in(copy: HostCopy):
  """Inverse of swap_out: back on the device (dequantized if it was compressed)."""
  tree = to_device(copy.tree)
  return _decode_tree(tree) if copy.compress else tree


# -- paged rows: preemption by swapping -----------------------------------------------------------
@flax.struct.dataclass
class SwappedRows:
  """Pages of some rows of a paged ModelCache (or PagedKVCache), held on the host.

  pages: per paged segment, {pool field: [L, R, n, Hkv, P, ...]} (n = most pages any swapped
    row held), in host memory (HostCopy, maybe int8-coded).
  lengths: per paged segment [L, R, Hkv] (exact, host).
  next_position: [R] (exact, host) or None for a lone layer cache.
  """

  pages: Any
  lengths: Any
  next_position: Any


def _segments(cache):
  if isinstance(cache, paged_lib.PagedKVCache):
    return [cache]
  return list(cache.segments)


def _stacked(seg):
  return seg if seg.stacked else jax.tree.map(lambda x: x[None], seg)


@functools.partial(jax.jit, static_argnames=("n",))
def _gather_rows(seg, rows, n):
  """{field: [L, R, n, H, P, ...]} pages of `rows` (first n table entries)."""
  pt = jnp.clip(seg.page_table[:, rows, :n], 0, seg.num_pages - 1)     # [L, R, n]
  out = {}
  for f in paged_lib.POOL_FIELDS:
    a = getattr(seg, f)
    if a is not None:
      out[f] = jax.vmap(lambda pool, t: pool[t])(a, pt)
  return out


def swap_out_rows(cache, rows: Sequence[int], *, compress: Optional[str] = None):
  """Copies rows' pages to host memory and releases them. Returns (SwappedRows, cache').

  Bit-exact with compress=None (the raw page bytes move, codes and scales of a quantized
  pool included). With compress="int8" floating page data is int8-coded on the way out.
  """
  rows = np.asarray(rows, np.int32).reshape(-1)
  segs = _segments(cache)
  pages, lengths = [], []
  for seg in segs:
    if not isinstance(seg, paged_lib.PagedKVCache):
      pages.append(None)
      lengths.append(None)
      continue
    s = _stacked(seg)
    held = np.asarray(jnp.sum(s.page_table[:, rows] >= 0, axis=-1))
    n = max(int(held.max(initial=0)), 1)
    pages.append(swap_out(_gather_rows(s, jnp.asarray(rows), n), compress=compress))
    lengths.append(np.asarray(s.lengths[:, rows]))
  if isinstance(cache, paged_lib.PagedKVCache):
    out = SwappedRows(pages, lengths, None)
    return out, paged_lib.release(cache, rows)
  out = SwappedRows(pages, lengths, np.asarray(cache.next_position)[rows])
  return out, paged_lib.release_rows(cache, rows)


@jax.jit
def _restore_rows(seg, rows, lengths, data):
  """Allocates pages for rows (released first) and copies `data` pages into them."""
  def one(c, lens, dat):
    c = paged_lib.release(c, rows)
    # Plan an append of `lens` tokens per (row, head): allocates ceil(max len / P) pages.
    b, h = c.lengths.shape
    t = c.capacity
    full = jnp.zeros((b, h), jnp.int32).at[rows].set(lens)
    pos_h = jnp.where(jnp.arange(t)[None, None, :] < full[..., None], 0, -1)
    plan = paged_lib._plan(c._meta(None), pos_h, c.page_size)  # pylint: disable=protected-access
    n = next(iter(dat.values())).shape[1]
    dst = plan.meta["page_table"][rows, :n]                     # [R, n]
    held = (jnp.max(lens, -1) + c.page_size - 1) // c.page_size
    dst = jnp.where((jnp.arange(n)[None] < held[:, None]) & plan.ok, dst, c.num_pages)
    upd = {f: getattr(c, f).at[dst].set(dat[f].astype(getattr(c, f).dtype), mode="drop")
           for f in dat}
    return c.replace(**upd).replace(**plan.meta)
  return jax.vmap(one)(seg, lengths, data)


def swap_in_rows(cache, swapped: SwappedRows, rows: Sequence[int]):
  """Writes swapped rows back into `rows` (any rows; their current pages are released).

  Raises OutOfPages (before changing anything) if the pool lacks free pages.
  """
  rows = np.asarray(rows, np.int32).reshape(-1)
  segs = _segments(cache)
  if len(segs) != len(swapped.pages):
    raise ValueError(f"swapped rows come from a cache with {len(swapped.pages)} segments; "
                     f"this one has {len(segs)}")
  new_segs = []
  for seg, pages, lens in zip(segs, swapped.pages, swapped.lengths):
    if pages is None:
      new_segs.append(seg)
      continue
    s = _stacked(seg)
    if lens.shape[1] != rows.size:
      raise ValueError(f"{lens.shape[1]} rows were swapped out; got {rows.size} target rows")
    # Admission: pages needed vs free after releasing the target rows (worst layer).
    need = -(-lens.max(-1) // s.page_size)                              # [L, R]
    released = paged_lib.release(s, rows)
    free = np.asarray(released.num_free)
    if (need.sum(-1) > free).any():
      i = int(np.argmax(need.sum(-1) - free))
      raise paged_lib.OutOfPages(need.sum(-1)[i], free[i], "swap_in_rows")
    data = swap_in(pages)
    new = _restore_rows(s, jnp.asarray(rows), jnp.asarray(lens), data)
    new_segs.append(new if seg.stacked else jax.tree.map(lambda x: x[0], new))
  if isinstance(cache, paged_lib.PagedKVCache):
    return new_segs[0]
  nxt = cache.next_position.at[rows].set(jnp.asarray(swapped.next_position))
  return cache.replace(segments=tuple(new_segs), next_position=nxt)


# -- layer streaming with prefetch ---------------------------------------------------------------
def _fetch(host):
  """Host copy -> device (HostCopy: swap_in, dequantizing int8; else to_device)."""
  return swap_in(host) if isinstance(host, HostCopy) else to_device(host)


def _store(new, like):
  """Device -> host in the form of `like` (a HostCopy keeps its compression)."""
  if isinstance(like, HostCopy):
    return swap_out(new, compress=like.compress)
  return to_host(new)


def stream_layers(step_fn: Callable[[int, Any, Any], tuple], x, host_caches: Sequence[Any], *,
                  prefetch: int = 1, write_back: bool = True):
  """Runs layers whose caches live in host memory, prefetching the next ones.

  For each layer l: the device_put of layers l+1 .. l+prefetch is issued *before* layer l's
  compute is dispatched, so on an accelerator the copies run on the DMA engines while the
  device computes; the updated cache of layer l is sent back to the host asynchronously.

  Args:
    step_fn: fn(layer_index, x, device_cache) -> (x, new_device_cache); typically jitted.
    x: activations entering layer 0.
    host_caches: per-layer caches in host memory: trees (`to_host`) or HostCopy
      (`swap_out`, maybe int8: dequantized on the device after the fetch, quantized again
      on the device before the write-back).
    prefetch: layers fetched ahead (>= 0; 0 = fetch each layer just before it runs).
    write_back: return the updated caches in host memory, in the form they came in
      (else on the device).

  Returns: (x, new caches per layer).
  """
  if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
    raise ValueError(f"prefetch={prefetch!r}; must be an int >= 0")
  n = len(host_caches)
  inflight = {}

  def fetch(i):
    if i < n and i not in inflight:
      inflight[i] = _fetch(host_caches[i])

  out = []
  for i in range(n):
    fetch(i)                     # no-op when prefetched
    for j in range(i + 1, i + 1 + prefetch):
      fetch(j)                   # issued before layer i's compute is dispatched
    x, new = step_fn(i, x, inflight.pop(i))
    out.append(_store(new, host_caches[i]) if write_back else new)
  return x, out


# -- a model's cache in host memory ----------------------------------------------------------------
STREAM, QUEST = "stream", "quest"
MODES = (STREAM, QUEST)


@dataclasses.dataclass(frozen=True)
class OffloadSpec:
  """How a model's cache is held in host memory (models.prefill(offload=...)).

  Attributes:
    mode: "stream": every layer's cache lives on the host (HostCache) and is streamed to
      the device layer by layer, `prefetch` layers ahead, during every forward pass; exact
      with compress=None. "quest": the prompt's keys/values live on the host in pages of
      `page_size` with per-page key bounds on the device (QuestCache); each decode step
      fetches the `top_k` pages per (row, kv head) with the largest bound, and attends to
      them plus a device window of the tokens decoded since (`room` slots).
    prefetch: stream: layers fetched ahead (int >= 0).
    compress: stream: None (bit-exact) or "int8" (quantized on the device before each
      write-back; error <= scale / 2 per entry, scale = max |x| / 127 per vector).
    page_size, top_k, room, keep_last: quest settings (keep_last forces the page with the
      latest prompt tokens in).
    kind: host memory kind (default: pinned_host where offered, else unpinned_host).
  """

  mode: str = STREAM
  prefetch: int = 1
  compress: Optional[str] = None
  page_size: int = 16
  top_k: int = 4
  room: int = 64
  keep_last: bool = True
  kind: Optional[str] = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; allowed: {MODES}")
    if self.compress not in COMPRESSIONS:
      raise ValueError(f"compress={self.compress!r}; allowed: {COMPRESSIONS}")
    for name, lo in (("prefetch", 0), ("page_size", 1), ("top_k", 1), ("room", 1)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name}={v!r}; must be an int >= {lo}")
    if self.mode == QUEST and self.compress is not None:
      raise ValueError(f"compress={self.compress!r} applies to mode='stream' only; quest "
                       "pages move exactly")
    if self.kind not in (None, "pinned_host", "unpinned_host"):
      raise ValueError(f"kind={self.kind!r}; allowed: None, 'pinned_host', 'unpinned_host'")


@flax.struct.dataclass
class HostCache:
  """A model's per-layer caches held in host memory (one HostCopy per layer, layer order).

  Between forward passes no cache byte is on the device; a pass streams the layers in
  (stream_layers) with `prefetch` layers ahead, so the device holds at most prefetch + 1
  layers' caches at a time.

  Attributes:
    layers: tuple of HostCopy, one per layer (any layer cache kind, maybe int8-coded).
    next_position: [B] int32 (device), as ModelCache.next_position.
    prefetch: static, layers fetched ahead.
  """

  layers: tuple
  next_position: jax.Array
  prefetch: int = flax.struct.field(pytree_node=False, default=1)

  @classmethod
  def from_layers(cls, layers: Sequence[Any], next_position, *, compress: Optional[str] = None,
                  prefetch: int = 1, kind: Optional[str] = None) -> "HostCache":
    """Swaps device layer caches out (optionally int8-compressed)."""
    return cls(tuple(swap_out(c, compress=compress, kind=kind) for c in layers),
               jnp.asarray(next_position, jnp.int32), prefetch)

  @classmethod
  def from_model_cache(cls, cache: cache_lib.ModelCache, **kw) -> "HostCache":
    return cls.from_layers(cache.layers(), cache.next_position, **kw)

  def to_model_cache(self, keys=None) -> cache_lib.ModelCache:
    """Everything back on the device as a ModelCache (`keys`: the model's layer keys)."""
    return cache_lib.ModelCache.from_layers([swap_in(c) for c in self.layers],
                                            jnp.copy(self.next_position), keys=keys)

  @property
  def compress(self) -> Optional[str]:
    return self.layers[0].compress if self.layers else None

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  @property
  def batch(self) -> int:
    return int(self.next_position.shape[0])

  @property
  def host_nbytes(self) -> int:
    return sum(c.nbytes for c in self.layers)

  @property
  def nbytes(self) -> int:
    """Bytes held (all in host memory, next_position aside)."""
    return self.host_nbytes + cache_lib.tree_nbytes(self.next_position)

  def check_room(self, positions_new) -> None:
    for c in self.layers:
      check = getattr(c.tree, "check_room", None)
      if check is not None:
        check(positions_new)


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

  @classmethod
  def from_layers(cls, layers: Sequence[Any], next_position, *, page_size: int, room: int,
                  top_k: int, keep_last: bool = True, kind: Optional[str] = None
                  ) -> "QuestCache":
    """Pages dense layer caches (device arrays, or HostCopy brought in one at a time) out."""
    stores, recent, sel = [], [], []
    for i, c in enumerate(layers):
      if isinstance(c, HostCopy):
        c = swap_in(c)
      if not isinstance(c, cache_lib.DenseKVCache):
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
    layers = cache.layers if isinstance(cache, HostCache) else cache.layers()
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
