"""Exact memory accounting of caches: bytes per layer, per kind, per component.

    rep = kvjax.memory.report(model_cache)
    print(rep)                 # a table: one row per layer, totals, compression factor
    rep.total == model_cache.nbytes   # always: every array held is counted once

Components (each array a cache holds goes to one): `kv` (full-precision keys/values),
`codes` (quantized or latent keys/values), `scales`, `zeros`, `outliers` (values + indices),
`residual` (full-precision recent-token window and its positions), `projection` (low-rank
bases, pruned-channel indices), `index` (positions, lengths), `other`. A kind names its
fields' components with a `BYTE_CATEGORIES` class dict; other fields are classified by name.

The reference is a bf16 `DenseKVCache` holding the same sequence uncompressed: for a
`ModelCache`, every row's original tokens (`next_position`, so eviction counts as saving);
for a lone layer cache, the tokens it holds (or `tokens=`). Its capacity is the longest
row (a static-shape cache pads rows to that), and it includes its own positions and
lengths arrays. `factor = reference / total`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np

COMPONENTS = ("kv", "codes", "scales", "zeros", "outliers", "residual", "projection", "index",
              "other")
BF16_BYTES = 2


def _leaf_bytes(tree) -> int:
  return sum(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _category(cache, name: str) -> str:
  cats = getattr(type(cache), "BYTE_CATEGORIES", {}) or {}
  if name in cats:
    return cats[name]
  if name in ("k", "v"):
    return "kv"
  if "scale" in name:
    return "scales"
  if "zero" in name:
    return "zeros"
  if "outlier" in name or name.endswith(("_out_val", "_out_idx")):
    return "outliers"
  if name.startswith("res") or "residual" in name:
    return "residual"
  if "proj" in name or "channel" in name:
    return "projection"
  if "position" in name or "length" in name:
    return "index"
  if "code" in name:
    return "codes"
  return "other"


def components(cache, n_layers: int = 1) -> dict:
  """Bytes per component of one layer of `cache` (leaves stacked over n_layers divided)."""
  out = {c: 0 for c in COMPONENTS}
  if dataclasses.is_dataclass(cache):
    for f in dataclasses.fields(cache):
      if not f.metadata.get("pytree_node", True):
        continue  # static configuration, not an array
      val = getattr(cache, f.name)
      if isinstance(val, (tuple, list)) and val and all(
          dataclasses.is_dataclass(x) for x in val):   # composite caches (per-head parts)
        for part in val:
          for c, nb in components(part, n_layers).items():
            out[c] += nb
        continue
      nb = _leaf_bytes(val)
      if nb:
        out[_category(cache, f.name)] += nb // n_layers
  else:
    out["other"] = _leaf_bytes(cache) // n_layers
  return out


def kind_label(cache) -> str:
  label = getattr(cache, "kind_label", None)
  return label if isinstance(label, str) else type(cache).__name__



def dense_bf16_bytes(batch: int, kv_heads: int, tokens: int, head_dim: int,
                     v_head_dim: int) -> int:
  """Bytes of a bf16 DenseKVCache with capacity `tokens` (k, v, positions, lengths)."""
  slots = batch * kv_heads * tokens
  return slots * (head_dim + v_head_dim) * BF16_BYTES + slots * 4 + batch * kv_heads * 4


@dataclasses.dataclass
class LayerBytes:
  layer: Optional[int]
  kind: str
  tokens: float          # tokens held per kv head, summed over rows (mean over heads)
  capacity: int
  components: dict
  total: int
  reference: int         # bf16 full cache of the same sequence

  @property
  def factor(self) -> float:
    return self.reference / max(self.total, 1)


@dataclasses.dataclass
class MemoryReport:
  layers: list
  extra: dict            # model-level arrays outside the layers (e.g. next_position)
  seq_tokens: int        # tokens of the uncompressed sequence, summed over rows

  @property
  def total(self) -> int:
    return sum(l.total for l in self.layers) + sum(self.extra.values())

  @property
  def reference(self) -> int:
    return sum(l.reference for l in self.layers) + sum(self.extra.values())

  @property
  def factor(self) -> float:
    return self.reference / max(self.total, 1)

  @property
  def bytes_per_token(self) -> float:
    """All bytes held per token of the uncompressed sequence (all layers)."""
    return self.total / max(self.seq_tokens, 1)

  def by_kind(self) -> dict:
    out = {}
    for l in self.layers:
      out[l.kind] = out.get(l.kind, 0) + l.total
    return out

  def by_component(self) -> dict:
    out = {c: sum(l.components[c] for l in self.layers) for c in COMPONENTS}
    out["index"] += sum(self.extra.values())
    return out

  def to_dict(self) -> dict:
    return {"total": self.total, "reference_bf16": self.reference, "factor": self.factor,
            "bytes_per_token": self.bytes_per_token, "by_kind": self.by_kind(),
            "by_component": self.by_component(), "extra": dict(self.extra),
            "layers": [dict(dataclasses.asdict(l), factor=l.factor) for l in self.layers]}

  def __str__(self) -> str:
    cols = [c for c in COMPONENTS if any(l.components[c] for l in self.layers)]
    head = ["layer", "kind", "tokens", "cap"] + cols + ["total", "bf16 full", "x"]
    rows = []
    for l in self.layers:
      rows.append([str(l.layer), l.kind, f"{l.tokens:g}", str(l.capacity)]
                  + [f"{l.components[c]:,}" for c in cols]
                  + [f"{l.total:,}", f"{l.reference:,}", f"{l.factor:.2f}"])
    if self.extra:
      rows.append(["-", "+".join(self.extra), "", ""] + [""] * len(cols)
                  + [f"{sum(self.extra.values()):,}", f"{sum(self.extra.values()):,}", ""])
    comp = self.by_component()
    rows.append(["all", "", "", ""] + [f"{comp[c]:,}" for c in cols]
                + [f"{self.total:,}", f"{self.reference:,}", f"{self.factor:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(x.rjust(w) if i >= 2 else x.ljust(w)  # noqa: E731
                              for i, (x, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    lines.append(f"bytes per token (all layers): {self.bytes_per_token:,.1f}; "
                 f"compression vs bf16 full cache: {self.factor:.2f}x")
    return "\n".join(lines)


def _layer_row(layer_idx, seg, j, n, seq_per_row: Sequence[int]):
  """Row for layer j of a segment stacked over n layers (n == 0: unstacked)."""
  comps = components(seg, max(n, 1))
  lengths = np.asarray(seg.length)
  if n:
    lengths = lengths[j]
  b, h = lengths.shape
  d, dv = seg.head_dims
  tokens = float(lengths.sum() / h)
  cap = seg.capacity
  longest = int(max(seq_per_row)) if len(seq_per_row) else 0
  ref = dense_bf16_bytes(b, h, longest, d, dv)
  return LayerBytes(layer=layer_idx, kind=kind_label(seg), tokens=tokens, capacity=int(cap),
                    components=comps, total=sum(comps.values()), reference=ref)


def report(cache, tokens: Optional[Sequence[int]] = None) -> MemoryReport:
  """Exact bytes of a ModelCache (per layer) or of one layer cache.

  Args:
    cache: a kvjax.cache.ModelCache, or one (unstacked) layer cache.
    tokens: per-row length of the uncompressed sequence (default: `next_position` of a
      ModelCache; the most tokens any head holds, for a layer cache).
  """
  segments = getattr(cache, "segments", None)
  if segments is not None:
    seq = np.asarray(cache.next_position) if tokens is None else np.asarray(tokens)
    # entry e, stacked index j -> model layer (scan groups interleave layers, e.g. Gemma 2)
    layer_of = getattr(cache, "entry_layers", None)
    layer_of = layer_of() if layer_of is not None else None
    rows, li = [], 0
    for e, (seg, n) in enumerate(zip(segments, cache.segment_sizes)):
      for j in range(n):
        rows.append(_layer_row(li if layer_of is None else layer_of[e][j], seg, j, n, seq))
        li += 1
    rows.sort(key=lambda r: r.layer)
    extra = {f.name: _leaf_bytes(getattr(cache, f.name)) for f in dataclasses.fields(cache)
             if f.name != "segments" and f.metadata.get("pytree_node", True)}
    return MemoryReport(rows, extra, int(seq.sum()))
  lengths = np.asarray(cache.length)
  seq = lengths.max(-1) if tokens is None else np.asarray(tokens)
  return MemoryReport([_layer_row(None, cache, 0, 0, seq)], {}, int(seq.sum()))
