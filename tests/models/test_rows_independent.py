"""Property: a batch row's logits equal that row run alone, whatever the other rows hold.

Random masks (padding anywhere, all-padding rows), one-shot or chunked prefill, and a
press followed by a decode step: every logit is finite, and every row with tokens equals
the same tokens prefilled (and decoded) as a batch of one without padding.
"""

import functools

import numpy as np
from flax import nnx
from hypothesis import given, settings, strategies as st

import models
from kvjax import presses

CFG = models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2, sliding_window=None)
B, T = 3, 6        # fixed batch shape: one compile per mode; rows alone are 1..T tokens
PRESS = presses.KnormPress(budget=3)
ATOL = 1e-5        # float32, same ops in a different batch/padding layout


@functools.lru_cache(maxsize=None)
def _model():
  return models.Transformer(CFG, rngs=nnx.Rngs(0))


def _alone(tokens, mode, chunk, nxt):
  """Logits of one unpadded row: prefill [1, n, V] (or the decode step's [1, 1, V])."""
  m = _model()
  tok = np.asarray(tokens, np.int32)[None]
  if mode == "press":
    if tok.shape[1] <= PRESS.budget:   # nothing to evict: the row keeps every token
      _, cache = models.prefill(m, tok, capacity=tok.shape[1] + 1, logits="last")
    else:
      _, cache = models.prefill(m, tok, press=PRESS, decode_room=1, logits="last")
    return models.decode(m, np.asarray([[nxt]], np.int32), cache)[0]
  return models.prefill(m, tok)[0]


@settings(max_examples=8, deadline=None, derandomize=True)
@given(mask=st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B),
       seed=st.integers(0, 2 ** 16), mode=st.sampled_from(["one_shot", "chunked", "press"]),
       chunk=st.sampled_from([2, 4]))
def test_each_row_equals_the_row_alone(mask, seed, mode, chunk):
  rng = np.random.default_rng(seed)
  mask = np.asarray(mask, np.int32)
  tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
  nxt = rng.integers(0, CFG.vocab_size, (B, 1)).astype(np.int32)
  m = _model()
  if mode == "press":
    _, cache = models.prefill(m, tokens, attention_mask=mask, press=PRESS, decode_room=1,
                              logits="last")
    got, _ = models.decode(m, nxt, cache)
  else:
    got, _ = models.prefill(m, tokens, attention_mask=mask,
                            chunk_size=chunk if mode == "chunked" else None)
  got = np.asarray(got)
  assert np.isfinite(got).all(), f"non-finite logits (mode={mode}, mask={mask.tolist()})"
  for r in range(B):
    keep = mask[r].astype(bool)
    if not keep.any():
      continue            # an all-padding row: finite (checked above) is all it owes
    want = np.asarray(_alone(tokens[r, keep], mode, chunk, int(nxt[r, 0])))[0]
    row = got[r] if mode == "press" else got[r, keep]
    np.testing.assert_allclose(row, want, atol=ATOL, rtol=0,
                               err_msg=f"row {r} (mode={mode}, mask={mask.tolist()})")
