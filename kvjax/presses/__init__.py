"""Token eviction and selection: presses over KV caches (kvpress names and defaults).

A press is a frozen dataclass; `press(layer_cache, obs, layer_idx=...)` returns a smaller
layer cache (static capacity = its budget + room for decode), and
`press.compress_model(model_cache, obs_list, config, room=N)` does every layer.
`models.prefill(model, tokens, press=..., decode_room=N)` runs it after the prompt;
`DecodingPress` compresses during `kvjax.generate(decode_press=...)`.

Scorers (each one file, citing its paper): StreamingLLMPress, H2OPress, SnapKVPress,
TOVAPress, KnormPress, ExpectedAttentionPress, KeyDiffPress, LagKVPress, RandomPress.
Budget rules: uniform (`compression_ratio` / `budget` on every scorer), PyramidKVPress,
PyramidBudgetPress (any scorer) and PerLayerCompressionPress (per layer), AdaKVPress
(head-wise), DuoAttentionPress
(retrieval vs streaming heads; `profile_head_scores`), ChunkKVPress (chunk-level).
Options of every scorer: protected sinks / recent slots, `merge="cam" | "d2o"`,
`rerotate=True`. Composition: `compose(p1, p2)`, `PerLayerPress`, `per_layer`.
Thinner caches that keep every token: ThinKPress (key channels), LowRankPress (latents).

By name: `registry.make("snapkv", 0.5)`, `registry.names()`; each press registers itself
with `@registry.register(name, query_agnostic=..., needs=...)` in its own file (see
registry.py), and launchers, benches, policies and flags read that one table.
"""

from kvjax.presses.adakv import AdaKVPress
from kvjax.presses.base import LayerContext, Press, ScorerPress, compress_model
from kvjax.presses.chunkkv import ChunkKVPress
from kvjax.presses.composed import ComposedPress, compose
from kvjax.presses.decoding import DecodingPress
from kvjax.presses.duo_attention import DuoAttentionPress, profile_head_scores
from kvjax.presses.expected_attention import ExpectedAttentionPress
from kvjax.presses.h2o import H2OPress
from kvjax.presses.keydiff import KeyDiffPress
from kvjax.presses.knorm import KnormPress
from kvjax.presses.lagkv import LagKVPress
from kvjax.presses.low_rank import LowRankPress
from kvjax.presses.per_layer import PerLayerCompressionPress, PerLayerPress, per_layer
from kvjax.presses.pyramidkv import PyramidBudgetPress, PyramidKVPress
from kvjax.presses.random_press import RandomPress
from kvjax.presses import registry
from kvjax.presses.snapkv import SnapKVPress
from kvjax.presses.streaming_llm import StreamingLLMPress
from kvjax.presses.think import ThinKPress
from kvjax.presses.tova import TOVAPress

__all__ = [
    "Press", "ScorerPress", "LayerContext", "compress_model",
    "StreamingLLMPress", "H2OPress", "SnapKVPress", "PyramidKVPress", "PyramidBudgetPress",
    "TOVAPress",
    "KnormPress", "ExpectedAttentionPress", "KeyDiffPress", "ChunkKVPress", "LagKVPress",
    "RandomPress", "AdaKVPress", "DuoAttentionPress", "profile_head_scores",
    "PerLayerCompressionPress", "PerLayerPress", "per_layer", "ComposedPress", "compose",
    "DecodingPress", "ThinKPress", "LowRankPress", "registry",
]
