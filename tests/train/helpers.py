"""A tiny config shared by the train tests (fast on CPU)."""

import ml_collections

from train.configs import default


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = default.get_config()
  c.steps = 8
  c.batch_size = 8
  c.seq_len = 32
  c.model.config.hidden_size = 32
  c.model.config.intermediate_size = 64
  c.model.config.num_layers = 1
  c.model.config.max_position_embeddings = 64
  c.opt.lr = 1e-2
  c.opt.warmup_steps = 2
  c.data.sources = ml_collections.ConfigDict(dict(
      mqar=dict(kind="mqar", weight=1.0, num_pairs=4),
      stdlib=dict(kind="stdlib", weight=1.0)))
  c.log_every = 1
  c.eval_every = 0
  c.eval_examples = 8
  c.eval_batch_size = 8
  c.checkpoint_every = 0
  c.progress_bar = False
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
