"""Paged KV cache: a page pool, per-sequence page tables, a free list and reference counts.

PagedAttention (Kwon et al., 2023, vLLM): keys and values live in fixed-size *pages* of a
shared pool; each sequence owns a page table mapping its logical pages to physical ones.
Memory is allocated a page at a time as sequences grow, freed pages go back to a free list,
and sequences that share a prefix (a system prompt) point at the same physical pages, with
reference counts and copy-on-write so one sequence's write never changes another's view.

Everything here is a pure, jittable function over one pytree (`PagedKVCache`); allocation
and freeing are array operations on a free *stack*, so a decode step allocates its pages
inside jit with no host round trip.

Layout (one layer; what the Pallas paged decode kernel reads). N pages, P page
size, M max pages per sequence, Hkv kv heads, D / Dv head dims, B rows, S partitions,
R residual window, G KIVI token group:

  k_pages     [N, Hkv, P, D]   keys (RoPE applied), dtype of the cache -- or, with `quant`,
                               integer codes packed along D (uint8 [N, Hkv, P, D*bits/8])
                               or FP8 codes [N, Hkv, P, D] (kvjax.quant layout)
  k_scale     [N, Hkv, P, D/g] per-token scales (quantized pools only, else None), or
              [N, Hkv, P/G, D] per-channel scales of each G-token group (KIVI keys)
  k_zero      like k_scale     zero points (asymmetric integer codes only, else None)
  v_pages, v_scale, v_zero     the same for values
  pos_pages   [N, Hkv, P] int32  original token position of each slot
  page_table  [B, M] int32     physical page of logical page j of row b; -1 = none.
                               Entries [0, held_b) are set, the rest are -1, with
                               held_b = ceil(max_h paged_b,h / P).
  lengths     [B, Hkv] int32   tokens of row b, head h (pages + residual window). Slot s of
                               row b (logical page s // P, offset s % P) is valid for head
                               h iff s < paged_b,h = lengths - res_lengths; contents of
                               slots beyond it are stale (never read).
  refcount    [N] int32        rows (per layer) pointing at each page; 0 = free
  free_stack  [N] int32        the free pages; partition s owns entries
                               [s*N/S, s*N/S + free_s) (top = last), global page ids
  num_free    [] int32         free pages, all partitions
  overflow    [] bool          sticky: some append found no free pages and was dropped
  part_free   [S] int32        free pages per partition (None when S = 1)
  k_res, v_res [B, Hkv, R, D|Dv], res_positions [B, Hkv, R], res_lengths [B, Hkv]
                               the residual window (None when R = 0): row b's newest
                               res_lengths tokens, exact, logically after its paged ones

A model's cache stacks one such pytree per layer (`ModelCache` segments add a leading
layer axis to every leaf): each layer has its own pool and its own copy of the (small)
tables, and since every layer sees the same appends, the tables stay identical across
layers. Nothing is shared between layers, so a layer can be offloaded on its own.

Semantics:
  * append writes the valid new tokens of each row after its current length, head-wise
    (head-wise lengths from presses such as AdaKV are supported). It first allocates the
    pages the row is missing, then copies every *shared* page the write would touch
    (refcount > 1) to a fresh page (copy-on-write), then scatters the tokens.
  * Allocation is all-or-nothing per call: if the pool lacks free pages for every row of
    the call, nothing is written, lengths and tables are unchanged and `overflow` is set.
    Outside jit (`check_room`, which `models.prefill/decode` call before the step) the
    same condition raises `OutOfPages` (a ValueError carrying `needed`/`free`/`partition`,
    the signal a scheduler uses to queue or preempt); a row that could not fit even in an
    empty pool (partition) raises a plain ValueError naming the sizes.
  * `fork` shares a row's pages with other rows (prefix sharing); `release` drops a row's
    references and returns pages whose count reaches zero to the free list.
  * Eviction: `repage` rewrites rows from a compacted dense view into fresh pages and
    frees the old ones; `PagedPress` wraps any kvjax press so `models.prefill(press=...)`
    works on paged caches and the freed pages return to the pool.

Sharding and partitions (data parallel serving). `partitions=S` splits the pool into S
independent pools of N/S pages, each with its own free stack: rows [s*B/S, (s+1)*B/S)
allocate only from partition s, forks stay inside a partition (a cross-partition fork is
a ValueError), and admission (`OutOfPages.partition`) is per partition. This is vLLM's
data-parallel layout -- one KV pool per data-parallel replica, each serving its own
sequences -- expressed as one pytree: `kvjax.sharding` puts partition s's pages,
refcounts and free list on the data shard that holds its rows (pages [N, ...] over `data`
when the mesh's data size divides S; kv heads over `model` as always), and allocation,
the page gather and the page scatter are vmapped over partitions with local page ids, so
XLA's SPMD partitioner keeps every page access on its device: a decode step on a (data 2
x model 4) mesh moves no page between devices (only the new tokens' K/V across heads,
the tensor-parallel output projection and scalar page counts). S = 1 (the default) is one
pool shared by every row, replicated over `data`; page tables always shard over `data`.

Quantized pages. Per-token formats (int8, fp8, int4/int2 per_token) store each token
independently. A residual window (`quant.residual` = R > 0) keeps each row's newest
tokens exact outside the pool; when an append pushes it past R tokens, the oldest whole
groups leave it into pages (KIVI's streaming rule, as in kvjax.quant.QuantizedKVCache).
KIVI (Liu et al., 2024: keys per channel over groups of G tokens, values per token, an
exact window of R tokens) maps onto pages with G dividing P: a page holds P/G key groups,
each written once, whole, when it is flushed, with its own per-channel scale/zero
([N, Hkv, P/G, D]), so the grouping is exactly KIVI's and the decoded tokens equal those
of the dense kvjax.quant KIVI cache (tests compare them). Differences from KIVI: the
window is per row and per head in full precision outside the pool (R tokens of
[B, Hkv, R, D] per row, counted by `nbytes`/`row_nbytes`, like KIVI's own residual), and
the key/value windows are one window (as kvjax.quant does). Eviction on a KIVI row
(`repage`) re-appends the kept tokens, so they are re-grouped (and those already
quantized are quantized again). pre_rope and outlier formats are not supported. Pools
with a residual window, and partitioned pools, take the reference attention path (the
paged Pallas kernel reads per-token single-partition pools). kvjax.offload's row swap does
not carry residual windows: kvjax.engine preempts such rows by recomputation.

Attention (reference path): the row's pages are gathered into a dense [B, Hkv, M*P (+R),
D] view and `kvjax.attention.attention` runs on it, so the dense-slot index of logical slot
s is s and presses' `colsum` observations align with `to_dense()`. Quantized pools decode
the gathered codes and use the current chunk's own keys/values exactly (as kvjax.quant
does; with a residual window, attention reads the row as it was plus the exact chunk).

Where this differs from vLLM: pages hold all kv heads of a token (vLLM: the same); page
tables are per layer copies (vLLM shares one block table across layers); copy-on-write is
per page at write time, and a batch in which two rows copy the same shared page gives each
a copy and frees the original (vLLM lets the last writer keep it).

Modules: `layout` (field groups, `OutOfPages`, page codecs), `alloc` (free stack, allocation
plans, copy-on-write, writes), `attend` (reference, residual-window and Pallas attention over
pages), `admission` (admission control, invariants), `pool` (the `PagedKVCache` pytree),
`rows` (release, fork, repage on one layer), `model` (paged `ModelCache`s: construction and
row operations over every paged layer), `press` (`PagedPress`, `PagedModel`). Every public
name is re-exported here.
"""

from kvjax.paged.admission import (check_admission, check_invariants, check_request,
                                   pages_needed)
from kvjax.paged.attend import dense_view
from kvjax.paged.layout import META_FIELDS, POOL_FIELDS, ROW_FIELDS, OutOfPages
from kvjax.paged.model import (ROW_AXIS_FIELDS, SHARED_FIELDS, fork_rows, join_rows,
                               layer_factory, model_cache_fn, overflowed, pages_in_use,
                               release_rows, split_rows, to_dense, with_table_width)
from kvjax.paged.pool import PagedKVCache
from kvjax.paged.press import PagedModel, PagedPress, check_press
from kvjax.paged.rows import fork, release, repage

__all__ = ["check_admission", "check_invariants", "check_request", "pages_needed",
           "dense_view", "META_FIELDS", "POOL_FIELDS", "ROW_FIELDS", "OutOfPages",
           "ROW_AXIS_FIELDS", "SHARED_FIELDS", "fork_rows", "join_rows", "layer_factory",
           "model_cache_fn", "overflowed", "pages_in_use", "release_rows", "split_rows",
           "to_dense", "with_table_width", "PagedKVCache", "PagedModel", "PagedPress",
           "check_press", "fork", "release", "repage"]
