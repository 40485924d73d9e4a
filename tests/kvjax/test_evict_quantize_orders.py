"""Evict-then-quantize in both orders with attention-statistic presses, at prompt lengths
that KIVI's group and residual sizes do not divide.

Invariants: the kept token count is the press's budget, the press's protected window is
kept, and the quantize-first result keeps exactly the slots the press keeps on the
dequantized cache (the statistics stay aligned with the input's slots).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import models
from kvjax import mixed
from kvjax import presses as P
from kvjax.quant.model import quantize_model
from tests.kvjax.presses import helpers


@pytest.mark.parametrize("t,quant", [(15, "kivi2"), (17, "int4")])
@pytest.mark.parametrize("order", ["quantize_first", "evict_first"])
def test_snapkv_then_quantize_any_length_either_order(t, quant, order):
  model = helpers.tiny_model(head_dim=32)
  tokens = jnp.asarray(np.random.default_rng(t).integers(1, 64, (1, t)), jnp.int32)
  snap = P.SnapKVPress(compression_ratio=0.5, window_size=2)
  press = mixed.EvictThenQuantize(snap, quant, order=order)
  _, cache = models.prefill(model, tokens, press=press, capacity=t + 4)
  keep = int(t * 0.5)
  # reference: the same press on the cache it scores (dequantized for quantize_first)
  _, full, obs = models.prefill(model, tokens, observe=snap.observe)
  if order == "quantize_first":
    q = quantize_model(full, quant, config=model.config)
    full = full.map_layers(lambda i, c: q.layers()[i].to_dense(c.capacity, c.k.dtype))
  for i, layer in enumerate(cache.layers()):
    assert type(layer).__name__ == "QuantizedKVCache"
    kept = helpers.kept_positions(layer.to_dense())[0]
    ref = helpers.kept_positions(helpers.run(snap, full.layers()[i], obs[i]))[0]
    assert all(len(k) == keep and {t - 2, t - 1} <= set(k) for k in kept)
    assert kept == ref
  logits, _ = models.decode(model, jnp.asarray([[3]], jnp.int32), cache)
  assert np.isfinite(np.asarray(logits)).all()
