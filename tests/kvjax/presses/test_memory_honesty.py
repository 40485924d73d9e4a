"""Memory honesty: after compression, every registered press holds at most the bytes its
ratio promises (kept tokens x bytes per dense token, plus the decode room), or it reports
the real figure (`memory_fraction`, quoted in its repr) and holds exactly that.

The promise and the dense bytes are counted by hand here from the model's shapes
(K, V and the slot positions per kept slot, one length per row and kv head).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

import models
from kvjax.presses import registry
from tests.kvjax.presses import helpers

S, ROOM, B = 80, 4, 2          # S > SnapKV's default 64-token window
RATIOS = (0.5, 0.75)
# DuoAttention's pattern: layer 1's heads stream first, then layer 0's second head
DUO = dict(head_scores=((3.0, 2.0), (0.0, 1.0)), n_sink=4, recent_size=12)


@pytest.fixture(scope="module")
def model():
  return helpers.tiny_model()


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(3).integers(1, 64, (B, S)), jnp.int32)


def dense_bytes(cfg, slots_per_layer) -> int:
  """Bytes of float32 dense layers holding slots_per_layer[l] slots, plus next_position."""
  per_slot = 2 * cfg.head_dim * 4 + 4          # k, v (float32) and the int32 position
  return sum(B * cfg.num_kv_heads * (n * per_slot + 4) for n in slots_per_layer) + 4 * B


def build(name, ratio):
  return registry.make(name, ratio, **(DUO if name == "duo_attention" else {}))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", registry.names())
def test_nbytes_within_promise_or_reported(model, tokens, name, ratio):
  cfg = model.config
  n = cfg.num_layers
  press = build(name, ratio)
  _, bare = models.prefill(model, tokens, press=press, decode_room=0)
  promise = dense_bytes(cfg, [int(S * (1 - ratio))] * n)
  real = press.memory_fraction(S, num_layers=n, head_dim=cfg.head_dim)
  full = dense_bytes(cfg, [S] * n)
  # the reported figure is the measured one (within the positions' and indices' share)
  assert abs(bare.nbytes / full - real) < 0.03, (bare.nbytes / full, real)
  if bare.nbytes > promise:
    # not what the ratio says: the press's figure says more than the ratio, and its repr
    # quotes it
    assert real > (1 - ratio) + 0.01, (name, real)
    quoted = re.search(r"kv bytes kept ~?([0-9.]+)", repr(press))
    assert quoted is not None, repr(press)


@pytest.mark.parametrize("name", ["snapkv", "adakv", "lowrank"])
def test_decode_room_is_dense_slots(model, tokens, name):
  """The decode room adds ROOM dense slots per layer (low-rank slots hold rank-r latents:
  fewer bytes)."""
  cfg = model.config
  press = build(name, 0.5)
  _, with_room = models.prefill(model, tokens, press=press, decode_room=ROOM)
  _, bare = models.prefill(model, tokens, press=press, decode_room=0)
  per_slot = (2 * cfg.head_dim * 4 + 4) * B * cfg.num_kv_heads
  room = with_room.nbytes - bare.nbytes
  if name == "lowrank":
    assert 0 < room < per_slot * ROOM * cfg.num_layers
  else:
    assert room == per_slot * ROOM * cfg.num_layers


def test_adakv_figure_by_hand(model, tokens):
  """AdaKV pads every head to ceil(1.5 x uniform): at ratio 0.5 it stores 0.75 of the
  dense slots (60 of 80), and its repr says so at 4096 tokens (0.75)."""
  cfg = model.config
  press = build("adakv", 0.5)
  _, c = models.prefill(model, tokens, press=press, decode_room=0)
  assert [l.capacity for l in c.layers()] == [60, 60]
  assert c.nbytes == dense_bytes(cfg, [60, 60])
  assert press.memory_fraction(S) == 0.75
  assert "kv bytes kept 0.75 of dense at 4096 tokens" in repr(press)


def test_duo_figure_by_hand(model, tokens):
  """DuoAttention at 0.75 streams 3 of 4 heads: layer 0 (one streaming, one retrieval head)
  keeps all 80 slots, layer 1 (both streaming) keeps sink + recent = 16, so it holds
  (80 + 16) / 160 = 0.6 of the dense bytes, not 0.25 + 0.75 * 16 / 80 = 0.4."""
  cfg = model.config
  press = build("duo_attention", 0.75)
  _, c = models.prefill(model, tokens, press=press, decode_room=0)
  assert [l.capacity for l in c.layers()] == [80, 16]
  assert c.nbytes == dense_bytes(cfg, [80, 16])
  assert press.memory_fraction(S) == pytest.approx(96 / 160)
  big = press.memory_fraction(4096)
  assert f"kv bytes kept {big:.3g} of dense at 4096 tokens" in repr(press)
  assert big == pytest.approx((4096 + 16) / (2 * 4096))
