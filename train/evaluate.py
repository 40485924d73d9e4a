"""Evaluation: loss and exact-match accuracy of answer tokens under greedy argmax.

Accuracy is computed teacher-forced from one forward pass: a row is correct when the argmax
of the logits equals the target at every answer position. For a greedy decoder this is the
same verdict as generating the answer token by token, because greedy decoding leaves the
teacher-forced path exactly at the first wrong token.

Shapes: B batch, T tokens, V vocab.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib


def token_stats(logits_BxTxV, targets_BxT, weights_BxT) -> dict:
  """Per-row sums: nll, weight (answer tokens), correct tokens, and exact match.

  Returns {"nll", "count", "correct", "exact"} each [B] float32; `exact` is 1 when every
  weighted token is predicted (rows without weighted tokens get 0).
  """
  logits = logits_BxTxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  w = weights_BxT.astype(jnp.float32)
  hit = (jnp.argmax(logits, axis=-1) == targets_BxT)
  count = jnp.sum(w, axis=-1)
  correct = jnp.sum(hit * w, axis=-1)
  exact = jnp.all(hit | (w == 0), axis=-1) & (count > 0)
  return {"nll": jnp.sum((lse - tgt) * w, axis=-1), "count": count, "correct": correct,
          "exact": exact.astype(jnp.float32)}


def summarize(stats: Sequence[dict]) -> dict:
  """Aggregates per-row stats (host numpy) into loss, token_accuracy, exact_match."""
  cat = {k: np.concatenate([np.asarray(s[k]) for s in stats]) for k in stats[0]}
  n_tok = max(float(cat["count"].sum()), 1.0)
  rows = cat["count"] > 0
  return {"loss": float(cat["nll"].sum()) / n_tok,
          "token_accuracy": float(cat["correct"].sum()) / n_tok,
          "exact_match": float(cat["exact"][rows].mean()) if rows.any() else 0.0,
          "examples": int(rows.sum())}


def task_accuracy(apply_fn: Callable, source, num_examples: int = 256, batch_size: int = 32,
                  seed: int = 12345) -> dict:
  """Loss / token accuracy / exact match of `apply_fn(tokens [B,T]) -> logits` on a source.

  Example: `task_accuracy(model, tasks.MQAR(length=129, num_pairs=8))` (an NNX module is a
  valid apply_fn). Uses examples 0..num_examples-1 of `source` under `seed`.
  """
  fn = jax.jit(lambda b: token_stats(apply_fn(b["inputs"]), b["targets"], b["weights"]))
  stats = [jax.device_get(fn(b)) for b in data_lib.eval_batches(source, num_examples,
                                                                batch_size, seed)]
  return summarize(stats)
