"""kvjax: cache-efficient attention for JAX.

Cache states are pytrees (`kvjax.cache`), techniques are pure functions over them, and
attention has one dispatch point (`kvjax.attention`).
"""

from kvjax import attention, cache, rope
from kvjax.attention import AttentionSpec
from kvjax.cache import DenseKVCache, ModelCache, fork
from kvjax.generate import GenerateOutput, generate, sample
from kvjax.window import WindowKVCache

__all__ = ["attention", "cache", "rope", "AttentionSpec", "DenseKVCache", "ModelCache",
           "generate", "sample", "GenerateOutput", "WindowKVCache", "fork"]
