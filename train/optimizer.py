"""AdamW with linear warmup + cosine decay and global-norm clipping (optax).

Weight decay skips 0/1-d tensors and parameters whose name matches `no_decay_regex`
(norm gains, biases): the usual practice since "Decoupled Weight Decay Regularization"
(Loshchilov & Hutter, 2019) was applied to transformers. The step count lives in the
optimizer state, so the schedule resumes with it.
"""

from __future__ import annotations

import math
import re

import jax
import optax

from train.sharding import path_str


def _real(name, v, lo, hi=math.inf, lo_open=False, hi_open=False):
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  if not ok:
    rng = (f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
           if hi != math.inf else f"{'>' if lo_open else '>='} {lo}")
    raise ValueError(f"opt.{name}={v!r}; must be a finite number {'in ' if hi != math.inf else ''}"
                     f"{rng}")


def check_config(c) -> None:
  """ValueError naming the first setting of config.opt that cannot train (NaN lr, ...)."""
  _real("lr", c.lr, 0.0, lo_open=True)
  _real("min_lr_ratio", c.min_lr_ratio, 0.0, 1.0)
  _real("weight_decay", c.weight_decay, 0.0)
  _real("b1", c.b1, 0.0, 1.0, hi_open=True)
  _real("b2", c.b2, 0.0, 1.0, hi_open=True)
  _real("eps", c.eps, 0.0, lo_open=True)
  _real("clip_norm", c.clip_norm, 0.0)
  for name in ("warmup_steps", "decay_steps"):
    v = getattr(c, name)
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"opt.{name}={v!r}; must be an int")


def learning_rate_schedule(c) -> optax.Schedule:
  """c: config.opt (lr, warmup_steps, decay_steps, min_lr_ratio)."""
  check_config(c)
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
