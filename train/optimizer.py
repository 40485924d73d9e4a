"""AdamW with linear warmup + cosine decay and global-norm clipping (optax).

Weight decay skips 0/1-d tensors and parameters whose name matches `no_decay_regex`
(norm gains, biases): the usual practice since "Decoupled Weight Decay Regularization"
(Loshchilov & Hutter, 2019) was applied to transformers. The step count lives in the
optimizer state, so the schedule resumes with it.
"""

from __future__ import annotations

import re

import jax
import optax

from train.sharding import path_str


def learning_rate_schedule(c) -> optax.Schedule:
  """c: config.opt (lr, warmup_steps, decay_steps, min_lr_ratio)."""
  if c.lr <= 0:
    raise ValueError(f"opt.lr={c.lr}; must be > 0")
  if c.warmup_steps < 0 or c.decay_steps < 1:
    raise ValueError(f"opt.warmup_steps={c.warmup_steps}, opt.decay_steps={c.decay_steps}; "
                     "need warmup >= 0 and decay >= 1")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.lr, warmup_steps=c.warmup_steps,
      decay_steps=max(c.decay_steps, c.warmup_steps + 1), end_value=c.lr * c.min_lr_ratio)


def decay_mask(params, no_decay_regex: str):
  pat = re.compile(no_decay_regex) if no_decay_regex else None
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim >= 2 and not (pat and pat.search(path_str(p).split("/")[-1])),
      params)


def make_optimizer(c) -> optax.GradientTransformation:
  """c: config.opt. Clipping runs on the accumulated (full-batch) gradient."""
  tx = optax.adamw(learning_rate_schedule(c), b1=c.b1, b2=c.b2, eps=c.eps,
                   weight_decay=c.weight_decay,
                   mask=lambda p: decay_mask(p, c.no_decay_regex))
  if c.clip_norm and c.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm), tx)
  return tx
