"""The model protocol and the inference steps both model stacks share (models.protocol).

Given a Llama-family Transformer and a pattern Decoder, when they are driven through the
one inference API, then both satisfy CachedLM, build their caches as a model method, and
reject the same bad arguments with the same message; the shared steps match hand-computed
or numpy references.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import presses
import models
from models import protocol
from tests.models import family_checks

CFG = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2)


@functools.lru_cache(maxsize=None)
def _transformer():
  return models.Transformer(CFG, rngs=nnx.Rngs(0))


_decoder = family_checks.tiny_hybrid


MODELS = {"transformer": _transformer, "decoder": _decoder}


def _toks(b=2, t=5):
  return (np.arange(b * t, dtype=np.int32).reshape(b, t) * 7) % 64


@pytest.mark.parametrize("name", sorted(MODELS))
def test_both_stacks_satisfy_the_protocol_and_build_caches_as_a_method(name):
  m = MODELS[name]()
  assert isinstance(m, protocol.CachedLM)
  cache = m.init_cache(3, 8, dtype=jnp.bfloat16)
  assert isinstance(cache, kvjax.ModelCache)
  assert cache.batch == 3
  np.testing.assert_array_equal(cache.next_position, np.zeros(3, np.int32))
  dense = [c for c in cache.layers() if isinstance(c, kvjax.DenseKVCache)]
  assert dense, "both test models hold global-attention layers"
  for c in dense:
    assert c.capacity == 8 and c.k.dtype == jnp.bfloat16
    np.testing.assert_array_equal(c.lengths, 0)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("kw, match", [
    (dict(logits="first"), r"logits='first'; allowed: \('all', 'last'\)"),
    (dict(decode_room=-1, press=presses.StreamingLLMPress(compression_ratio=0.5)),
     r"decode_room=-1; must be an int >= 0"),
    (dict(decode_room=2), r"decode_room=2 only applies with a press"),
    (dict(attention_mask=np.ones((2, 5), np.int32), prompt_lengths=np.array([5, 4])),
     "either attention_mask or prompt_lengths"),
])
def test_both_stacks_reject_bad_prefill_arguments_alike(name, kw, match):
  with pytest.raises(ValueError, match=match):
    MODELS[name]().prefill(_toks(), **kw)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_both_stacks_check_the_batch_and_the_room_before_a_step(name):
  m = MODELS[name]()
  _, cache = m.prefill(_toks(), capacity=6)
  with pytest.raises(ValueError, match="batch mismatch: tokens have batch 3"):
    m.decode(_toks(3, 1), cache)
  _, cache = m.decode(_toks(2, 1), cache)       # fills the 6th slot
  with pytest.raises(ValueError, match="overflow|capacity|room"):
    m.decode(_toks(2, 1), cache)


def test_press_room_splits_capacity_into_prompt_and_room():
  press = object()
  assert protocol.press_room(press, None, 10, None, 4) == (4, 6)     # prompt + room
  assert protocol.press_room(press, None, 10, 3, 4) == (10, 3)       # explicit room
  assert protocol.press_room(press, object(), 10, None, 4) == (10, 0)  # given cache
  assert protocol.press_room(press, None, [10, 12], None, 4) == ([10, 12], 0)
  assert protocol.press_room(None, None, 10, None, 4) == (10, 0)
  with pytest.raises(ValueError, match=r"capacity=3 is smaller than the prompt \(4 tokens\)"):
    protocol.press_room(press, None, 3, None, 4)


def test_prompt_mask_marks_the_first_lengths_tokens():
  got = np.asarray(protocol.prompt_mask(None, np.array([3, 0, 5]), 5))
  want = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(got, want)
  mask = np.ones((1, 2))
  assert protocol.prompt_mask(mask, None, 2) is mask


def test_depth_order_unstacks_repeats_repeat_major():
  # group 0: 2 repeats of a 2-slot pattern; group 1: 1 repeat of 1 slot
  a, b, c = np.array([10, 11]), np.array([20, 21]), np.array([30])
  got = [int(x) for x in protocol.depth_order([(2, [a, b]), (1, [c])])]
  assert got == [10, 20, 11, 21, 30]


def test_last_token_is_each_rows_last_valid_token_whatever_the_padding():
  pos = np.array([[-1, -1, 4, 5, 6],    # left padded
                  [0, 1, 2, -1, -1],    # right padded
                  [-1, -1, -1, -1, -1],  # no token: slot 0
                  [7, 8, 9, 10, 11]])
  x = np.arange(4 * 5 * 2, dtype=np.float32).reshape(4, 5, 2)
  got = np.asarray(protocol.last_token(jnp.asarray(x), jnp.asarray(pos)))
  want = np.stack([x[0, 4], x[1, 2], x[2, 0], x[3, 4]])[:, None]
  np.testing.assert_array_equal(got, want)


def test_advance_moves_next_position_past_valid_tokens_only():
  cache = kvjax.ModelCache.from_layers(
      [kvjax.DenseKVCache.init(2, 1, 4, 2)], jnp.asarray([3, 7], jnp.int32))
  pos = jnp.asarray([[3, 4, -1], [-1, -1, -1]])
  new = protocol.advance(cache, cache.segments, pos)
  np.testing.assert_array_equal(new.next_position, [5, 7])
