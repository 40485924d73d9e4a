"""What presses need from the model beyond one forward pass's attention statistics.

kvjax never imports a model, so a press that needs the model declares it in its `observe`
(kvjax.observation.Observe) and models.prefill / models.decode provide it here:

  reconstruction  KVzip (kvjax/presses/kvzip.py): after the prompt, `reconstruction_prefix`
                  + the prompt are fed again through a copy of the prefilled cache,
                  `reconstruction` tokens at a time; per chunk, every dense layer's max
                  attention per cache slot is folded into a running max
                  (kvzip.reconstruction_max_attention). The prefilled cache itself is not
                  changed: the copy (with room for the reconstruction) is dropped after.
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


def reconstruction_scores(model, run, tokens, positions, cache, need: Observe, *,
                          backend: str) -> list:
  """Per-layer [B, Hkv, S] KVzip scores of the prefilled `cache` (None for ring layers).

  Args:
    model: the Transformer.
    run: models.api._run (the jitted forward; passed in to avoid an import cycle).
    tokens: [B, T] the prompt that filled `cache`; positions [B, T] its positions
      (-1 = padding), so the reconstruction repeats exactly each row's own tokens.
    cache: the ModelCache after the prompt (left unchanged).
    need: Observe with reconstruction = chunk size and reconstruction_prefix.
    backend: attention backend of the reconstruction forward.
  """
  from models import transformer as tfm  # pylint: disable=import-outside-toplevel
  b, t = tokens.shape
  chunk = int(need.reconstruction)
  prefix = jnp.asarray(need.reconstruction_prefix, jnp.int32).reshape(1, -1)
  if prefix.shape[1]:
    vocab = model.config.vocab_size
    bad = [int(x) for x in need.reconstruction_prefix if not 0 <= int(x) < vocab]
    if bad:
      raise ValueError(f"reconstruction_prefix / repeat_ids hold ids {bad} outside the "
                       f"vocabulary 0..{vocab - 1}")
  rec = jnp.concatenate([jnp.broadcast_to(prefix, (b, prefix.shape[1])), tokens], axis=1)
  mask = jnp.concatenate([jnp.ones((b, prefix.shape[1]), bool), positions >= 0], axis=1)
  rec_pos = tfm.positions_from_mask(rec, mask, start=cache.next_position)
  n_rec = rec.shape[1]
  n = -(-n_rec // chunk)
  pad = n * chunk - n_rec
  rec = jnp.pad(rec, ((0, 0), (0, pad)))
  rec_pos = jnp.pad(rec_pos, ((0, 0), (0, pad)), constant_values=-1)
  layers = cache.layer_structs()
  for i, layer in enumerate(layers):
    kind = cache_lib.caps(layer)
    if not (kind.pressable or kind.fixed_size):
      raise ValueError(f"KVzip's reconstruction needs dense layer caches; layer {i} is a "
                       f"{type(layer).__name__}")
  # A copy with room for the reconstruction (rings are copied: _run donates its cache).
  work = press_lib.compress_model([None] * cache.num_layers, cache, rooms=n_rec)
  work = work.replace(next_position=jnp.copy(work.next_position), segments=tuple(
      s if cache_lib.caps(s).pressable else jax.tree.map(jnp.copy, s)
      for s in work.segments))
  ring = [not cache_lib.caps(layer).pressable for layer in layers]
  held = cache.layers()
  scores = [None if r else jnp.zeros(layer.positions.shape, jnp.float32)
            for layer, r in zip(held, ring)]
  ctx_lengths = [None if r else layer.lengths for layer, r in zip(held, ring)]
  specs = tuple(s.attn for s in tfm.layer_specs(model.config, backend))
  graphdef, state = nnx.split(model)
  for c in range(n):
    sl = slice(c * chunk, (c + 1) * chunk)
    _, work, obs = run(graphdef, state, rec[:, sl], rec_pos[:, sl], work,
                       observe=Observe(queries=chunk), backend=backend, logits_mode="last")
    scores = kvzip.reconstruction_max_attention(
        scores, work, [o["queries"] for o in obs], rec_pos[:, sl], ctx_lengths, specs)
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
