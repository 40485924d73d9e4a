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

Modules, one a mechanism: `placement` (memory kinds, `to_host` / `to_device`), `swap`
(whole trees and paged rows, optionally int8), `stream` (`stream_layers`, `HostCache`),
`quest` (page bounds, selection, `quest_attend`, `QuestCache`), and `spec` (`OffloadSpec`).
Every public name is re-exported here.
"""

from kvjax.offload.placement import (device_memory_kind, host_memory_kind, memory_kind,
                                     memory_kinds, to_device, to_host)
from kvjax.offload.quest import (QuestCache, QuestStore, fetch_pages, page_bounds, page_scores,
                                 quest_attend, quest_offload, select_pages)
from kvjax.offload.spec import MODES, QUEST, STREAM, OffloadSpec
from kvjax.offload.stream import HostCache, stream_layers
from kvjax.offload.swap import (COMPRESSIONS, HostCopy, Int8Tensor, SwappedRows, dequantize_int8,
                                quantize_int8, swap_in, swap_in_rows, swap_out, swap_out_rows)

__all__ = ["memory_kinds", "host_memory_kind", "device_memory_kind", "memory_kind", "to_host",
           "to_device", "page_bounds", "page_scores", "select_pages", "QuestStore",
           "quest_offload", "fetch_pages", "quest_attend", "QuestCache", "STREAM", "QUEST",
           "MODES", "OffloadSpec", "stream_layers", "HostCache", "COMPRESSIONS", "Int8Tensor",
           "quantize_int8", "dequantize_int8", "HostCopy", "swap_out", "swap_in", "SwappedRows",
           "swap_out_rows", "swap_in_rows"]
