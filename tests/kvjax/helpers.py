"""Helpers shared by the cache tests."""

import numpy as np


def ragged_chunk(rng, t, valid, offset, left=True, *, heads, head_dim):
  """A chunk of t new tokens per row, k and v [B, heads, t, head_dim] float32 and positions
  [B, t] int32 (B = len(valid)): row b holds valid[b] tokens at positions offset[b]... at
  its end (left padding) when `left`, else at its start; the other slots are padding (-1)."""
  b_rows = len(valid)
  k = rng.normal(size=(b_rows, heads, t, head_dim)).astype(np.float32)
  v = rng.normal(size=(b_rows, heads, t, head_dim)).astype(np.float32)
  pos = np.full((b_rows, t), -1, np.int32)
  for b in range(b_rows):
    sl = slice(t - valid[b], t) if left else slice(0, valid[b])
    pos[b, sl] = offset[b] + np.arange(valid[b])
  return k, v, pos
