"""Presses and generation on paged caches: `PagedPress` runs any kvjax press on a paged
`ModelCache` (dense view -> press -> re-page, freed pages back to the pool), `PagedModel`
adapts a model for `kvjax.generate`, and `check_press` rejects a dense-only press on paged
layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax.paged.model import _repage_model, to_dense
from kvjax.paged.rows import _rows_mask


def check_press(press, model_cache) -> None:
  """ValueError if a press that reads dense layers is given a cache with paged layers.

  Presses gather slots of `DenseKVCache` layers; on paged layers they run through
  `PagedPress` (which compacts a dense view and re-pages what is kept).
  """
  if isinstance(press, PagedPress) or not cache_lib.is_model_cache(model_cache):
    return
  if any(cache_lib.caps(c).paged for c in model_cache.layer_structs()):
    raise ValueError(
        f"press={type(press).__name__} works on dense KV layers, but the cache has "
        "PagedKVCache layers; wrap it as kvjax.paged.PagedPress(press) (PagedModel does "
        "this for kvjax.generate)")


@dataclasses.dataclass(frozen=True)
class PagedPress:
  """Runs any kvjax press on a paged ModelCache, returning the freed pages to the pool.

  `models.prefill(model, tokens, cache=paged, press=PagedPress(SnapKVPress(...)))`: the
  pages are gathered into a dense view (slots aligned with the attention observations),
  the press compacts it, and `repage` writes the kept tokens into fresh pages.
  """

  press: Any

  @property
  def observe(self):
    return self.press.observe

  def compress_model(self, model_cache, obs_list=None, config=None, *, rows=None, **kw):
    """Compresses every row (or only `rows`: indices or bool mask [B]) of every paged layer."""
    kw.pop("room", None)  # pages are allocated on demand; no room to reserve
    mask = (jnp.ones((model_cache.batch,), bool) if rows is None
            else _rows_mask(rows, model_cache.batch))
    dense = self.press.compress_model(to_dense(model_cache), obs_list, config, **kw)
    return _repage_model(model_cache, dense, mask)

  def maybe_compress(self, cache, step, obs=None):
    """Decode-time hook (kvjax.generate(decode_press=PagedPress(DecodingPress(...)))).

    The wrapped press sees the dense view (so "full" means a row filled its page table, not
    that the pool is short: pool pressure is kvjax.policy's job) and the rows are re-paged
    only when it compressed. The view is gathered every step: O(cache) extra reads.
    """
    inner = getattr(self.press, "maybe_compress", None)
    if inner is None:
      raise ValueError(f"{type(self.press).__name__} has no maybe_compress")
    before = getattr(self.press, "compressions", None)
    dense = to_dense(cache)
    out = inner(dense, step) if obs is None else inner(dense, step, obs=obs)
    if out is dense or (before is not None and self.press.compressions == before):
      return cache
    return _repage_model(cache, out, jnp.ones((cache.batch,), bool))

  def reset(self):
    if hasattr(self.press, "reset"):
      self.press.reset()


class PagedModel:
  """Duck-typed model adapter: `kvjax.generate(PagedModel(model, make_cache), tokens)`.

  `make_cache(batch, capacity)` builds an empty paged ModelCache, e.g.
  `lambda b, cap: models.init_cache(cfg, b, cap, layer_factory=paged.layer_factory(...))`.
  prefill() fills it (wrapping a `press` in PagedPress); decode() is the model's.
  """

  def __init__(self, model, make_cache: Callable[[int, int], cache_lib.ModelCache]):
    self.model = model
    self.make_cache = make_cache
    self.config = getattr(model, "config", None)

  def prefill(self, tokens, *, capacity: Optional[int] = None, press=None, cache=None, **kw):
    b, t = tokens.shape
    if cache is None:
      cache = self.make_cache(b, t if capacity is None else capacity)
    if press is not None and not isinstance(press, PagedPress):
      press = PagedPress(press)
    if press is not None:
      kw["press"] = press
    kw.pop("cache_dtype", None)  # the paged cache fixes its own dtype
    return self.model.prefill(tokens, cache=cache, **kw)

  def decode(self, tokens, cache, **kw):
    return self.model.decode(tokens, cache, **kw)
