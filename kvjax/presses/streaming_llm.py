"""StreamingLLM: attention sinks + a recent window (Xiao et al., 2023, "Efficient Streaming
Language Models with Attention Sinks", arXiv:2309.17453).

Keeps the first `n_sink` tokens (attention sinks) and the most recent tokens that fit the
budget. Scores are slot indices (recency); the sinks are protected slots. Parameter names
and defaults follow kvpress's StreamingLLMPress.

Differences from the paper: the paper re-indexes positions inside the cache; here that is
the `rerotate=True` option (off by default, as in kvpress, where it is KeyRerotationPress).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.presses import base, registry


@registry.register("streaming_llm", query_agnostic=True)
@registry.register("streaming_rerotate", query_agnostic=True, needs=("rope",),
                   defaults={"rerotate": True},
                   summary="StreamingLLM with kept keys re-rotated to in-cache positions")
@dataclasses.dataclass(frozen=True)
class StreamingLLMPress(base.ScorerPress):
  """Sinks + recent window.

  Attributes:
    n_sink: initial tokens always kept (attention sinks); default 4 (kvpress).
  """

  n_sink: int = 4

  def __post_init__(self):
    super().__post_init__()
    base.check_nonneg_int("n_sink", self.n_sink)

  def protected(self):
    return self.n_sink, self.protect_recent

  def score(self, cache, obs, ctx):
    del obs, ctx
    s = cache.positions.shape[-1]
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32), cache.positions.shape)
