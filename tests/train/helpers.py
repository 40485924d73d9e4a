"""A tiny config shared by the train tests (fast on CPU)."""

import ml_collections

from train.configs import default


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = default.recipe(
      steps=8, batch_size=8, seq_len=32,
      model=dict(config=dict(hidden_size=32, intermediate_size=64, num_layers=1,
                             max_position_embeddings=64)),
      opt=dict(lr=1e-2, warmup_steps=2),
      sources=dict(mqar=dict(kind="mqar", weight=1.0, num_pairs=4),
                   stdlib=dict(kind="stdlib", weight=1.0)),
      log_every=1, eval_every=0, eval_examples=8, eval_batch_size=8, checkpoint_every=0,
      progress_bar=False)
  return apply_overrides(c, overrides)


def apply_overrides(c: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Sets each dotted key of `overrides` ("opt.lr": 1e-3) in `c`; returns `c`."""
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c
