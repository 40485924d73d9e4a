"""What presses need from the model beyond one forward pass's attention statistics.

kvjax never imports a model, so a press that needs the model declares it in its `observe`
(kvjax.observation.Observe) and models.prefill / models.decode provide it here:

  reconstruction  KVzip (kvjax/presses/kvzip.py): after the prompt, the prompt is fed
                  again in chunks, each after a repeat instruction and on top of the
                  context alone (a working copy of the cache reset after every chunk);
                  each chunk's max attention onto the slots of the tokens it reproduces
                  is folded into the scores (kvzip.reconstruction_max_attention). The
                  prefilled cache itself is not changed.
  o_proj          CriticalKV (kvjax/presses/criticalkv.py): each layer's attention output
                  projection [Hq * D, H], a slice of the model's stacked `wo`.

Both become entries of the per-layer observation dicts the press receives.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax import cache as cache_lib
from kvjax import presses as press_lib
from kvjax.observation import Observe
from kvjax.presses import kvzip


def needs_extra(need: Optional[Observe]) -> bool:
  return need is not None and bool(need.reconstruction or need.o_proj)


def check_supported(need: Optional[Observe], where: str) -> None:
  """ValueError where the reconstruction pass cannot run (decode steps, chunked prefill)."""
  if need is not None and need.reconstruction:
    raise ValueError(f"KVzip's context reconstruction (Observe.reconstruction) runs only in "
                     f"one-shot models.prefill; not in {where}")


def add_o_proj(model, obs_list: list) -> list:
  """obs_list with each layer's output projection weight as obs['o_proj'] [Hq * D, H]."""
  wo = model.wo.value
  return [dict(o or {}, o_proj=wo[i]) for i, o in enumerate(obs_list)]


def reconstruction_inputs(tokens, positions, need: Observe, vocab_size: int):
  """KVzip's chunked reconstruction inputs, built on the host.

  Each row's valid prompt tokens are cut into chunks of `need.reconstruction`; chunk c of
  a row is fed as  instruction + chunk, where, with `need.reconstruction_prompt` =
  (prefix, continue, overlap, suffix), the instruction is `prefix` for the first chunk and
  `continue` + the previous chunk's last `overlap` tokens after it (`prefix` again when
  `continue` is empty), followed by `suffix`.

  Returns (ids [n, B, W] int32, mask [n, B, W] bool, lo [n, B], hi [n, B]): per chunk, the
  inputs right-padded to one width W and the range of original positions the chunk
  reproduces (lo > hi where a row has no tokens left).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  prefix, cont, overlap, suffix = need.reconstruction_prompt or ((), (), 0, ())
  for name, ids in (("repeat_ids", prefix), ("continue_ids", cont),
                    ("answer_ids", suffix)):
    bad = [int(x) for x in ids if not 0 <= int(x) < vocab_size]
    if bad:
      raise ValueError(f"{name} hold ids {bad} outside the vocabulary 0..{vocab_size - 1}")
  chunk = int(need.reconstruction)
  tokens = np.asarray(tokens)
  positions = np.asarray(positions)
  b = tokens.shape[0]
  rows = [np.flatnonzero(positions[r] >= 0) for r in range(b)]
  n = max(1, max(-(-len(idx) // chunk) for idx in rows))
  pieces = [[None] * b for _ in range(n)]
  ranges = np.zeros((2, n, b), np.int64)
  ranges[0] = 1
  for r, idx in enumerate(rows):
    for c in range(n):
      part = idx[c * chunk:(c + 1) * chunk]
      if c == 0 or not cont:
        head = list(prefix)
      else:
        head = list(cont) + tokens[r, idx[max(0, c * chunk - overlap):c * chunk]].tolist()
      pieces[c][r] = head + list(suffix) + tokens[r, part].tolist()
      if len(part):
        ranges[:, c, r] = positions[r, part[0]], positions[r, part[-1]]
  w = max(len(p) for row in pieces for p in row)
  ids = np.zeros((n, b, w), np.int32)
  mask = np.zeros((n, b, w), bool)
  for c in range(n):
    for r in range(b):
      ids[c, r, :len(pieces[c][r])] = pieces[c][r]
      mask[c, r, :len(pieces[c][r])] = True
  return ids, mask, ranges[0], ranges[1]


def reconstruction_scores(model, run, tokens, positions, cache, need: Observe, *,
                          backend: str) -> list:
  """Per-layer [B, Hkv, S] KVzip scores of the prefilled `cache` (None for ring layers).

  Every chunk (see `reconstruction_inputs`) runs on top of the context alone, as in
  KVzip's reference implementation: one working copy of the cache with room for a chunk is
  reset to the context after each chunk, so a chunk never sees another's tokens and the
  cost is about one more pass over the prompt. Chunk c's queries score only the slots of
  the tokens it reproduces; a slot's score is that max attention.

  Args:
    model: the Transformer.
    run: models.api._run (the jitted forward; passed in to avoid an import cycle).
    tokens: [B, T] the prompt that filled `cache`; positions [B, T] its positions
      (-1 = padding), so each row reproduces exactly its own tokens.
    cache: the ModelCache after the prompt (left unchanged).
    need: Observe with reconstruction = chunk size and the reconstruction prompt.
    backend: attention backend of the reconstruction forward.
  """
  from models import transformer as tfm  # pylint: disable=import-outside-toplevel
  ids, mask, lo, hi = reconstruction_inputs(tokens, positions, need, model.config.vocab_size)
  width = ids.shape[-1]
  layers = cache.layer_structs()
  for i, layer in enumerate(layers):
    kind = cache_lib.caps(layer)
    if not (kind.pressable or kind.fixed_size):
      raise ValueError(f"KVzip's reconstruction needs dense layer caches; layer {i} is a "
                       f"{type(layer).__name__}")
  # One working copy with room for a chunk; after every chunk its lengths, positions,
  # rings and next_position go back to the context's (stale slots past the lengths are
  # invisible and overwritten by the next chunk). Copies: _run donates its cache.
  work = press_lib.compress_model([None] * cache.num_layers, cache, rooms=width)
  kept = tuple((s.positions, s.lengths) if cache_lib.caps(s).pressable else s
               for s in work.segments)
  start = work.next_position

  def reset(w):
    segs = tuple(s.replace(positions=jnp.copy(k[0]), lengths=jnp.copy(k[1]))
                 if cache_lib.caps(s).pressable else jax.tree.map(jnp.copy, k)
                 for s, k in zip(w.segments, kept))
    return w.replace(next_position=jnp.copy(start), segments=segs)

  ring = [not cache_lib.caps(layer).pressable for layer in layers]
  scores = [None if r else jnp.zeros(layer.positions.shape, jnp.float32)
            for layer, r in zip(cache.layers(), ring)]
  specs = tuple(s.attn for s in tfm.layer_specs(model.config, backend))
  graphdef, state = nnx.split(model)
  for c in range(ids.shape[0]):
    chunk_ids = jnp.asarray(ids[c])
    chunk_pos = tfm.positions_from_mask(chunk_ids, jnp.asarray(mask[c]), start=start)
    _, work, obs = run(graphdef, state, chunk_ids, chunk_pos, reset(work),
                       observe=Observe(queries=width, lse=True), backend=backend,
                       logits_mode="last")
    scores = kvzip.reconstruction_max_attention(
        scores, work, [o["queries"] for o in obs], [o.get("lse") for o in obs], chunk_pos,
        jnp.asarray(lo[c]), jnp.asarray(hi[c]), specs, int(need.reconstruction))
  del work
  return scores


def add_observations(model, run, tokens, positions, cache, obs_list: list,
                     need: Optional[Observe], *, backend: str) -> list:
  """obs_list plus what `need` asks beyond the forward pass (see the module docstring)."""
  if not needs_extra(need):
    return obs_list
  obs_list = [dict(o or {}) for o in obs_list]
  if need.reconstruction:
    rec = reconstruction_scores(model, run, tokens, positions, cache, need, backend=backend)
    for i, r in enumerate(rec):
      if r is not None:
        obs_list[i]["reconstruction"] = r
  if need.o_proj:
    obs_list = add_o_proj(model, obs_list)
  return obs_list
