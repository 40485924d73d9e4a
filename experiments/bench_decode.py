r"""Decode step time vs context length for the full (dense) cache: the baseline to beat.

    python -m experiments.bench_decode                       # 1K..16K on the "small" preset
    python -m experiments.bench_decode --contexts=1024,4096 --batch=4 --model=tiny

For each context length L the cache is filled to L tokens (capacity L + steps) and the
jitted single-token decode step is timed (median of --steps runs after a warm-up). Prints
time per step (median, and min-max over the --steps runs), tokens/s and the ratio to the
shortest context measured in the same run;
writes results as JSON when --out is set.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

from experiments import flagcheck

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "small", "Preset name or HF directory.")
flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192", "16384"], "Context lengths.")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("steps", 10, "Timed decode steps per context.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model and cache dtype.")
flags.DEFINE_enum("backend", "auto", ["auto", "xla", "pallas"], "Attention backend.")
flags.DEFINE_string("out", None, "Optional JSON output path.")
flagcheck.int_lists("contexts", lo=1)
flagcheck.ints("batch", "steps", lo=1)
flagcheck.writable_file("out")


def fill_cache(model, batch, length, capacity, dtype):
  """A cache holding `length` tokens, built without running an O(L^2) prefill."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  cfg = model.config
  cache = models.init_cache(cfg, batch, capacity, dtype=dtype)
  key = jax.random.key(0)

  def fill(layer):
    k = jax.random.normal(key, layer.k.shape, layer.k.dtype) * 0.5
    pos = jnp.broadcast_to(jnp.arange(layer.capacity, dtype=jnp.int32), layer.positions.shape)
    pos = jnp.where(pos < length, pos, -1)
    return layer.replace(k=k, v=k * 0.5, positions=pos,
                         lengths=jnp.full(layer.lengths.shape, length, jnp.int32))

  segs = tuple(fill(s) for s in cache.segments)
  return cache.replace(segments=segs, next_position=jnp.full((batch,), length, jnp.int32))


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel

  model, _ = presets.load_model_and_tokenizer(FLAGS.model, dtype=FLAGS.dtype)
  rows = []
  base = None
  print(f"device={jax.devices()[0].platform} model={FLAGS.model} batch={FLAGS.batch} "
        f"dtype={FLAGS.dtype}")
  print(f"{'context':>8} {'ms/step':>9} {'min-max ms':>15} {'tok/s':>9} {'KV MB':>8} "
        f"{'vs first':>8}")
  for ctx in [int(c) for c in FLAGS.contexts]:
    cache = fill_cache(model, FLAGS.batch, ctx, ctx + FLAGS.steps + 2, FLAGS.dtype)
    tok = jnp.ones((FLAGS.batch, 1), jnp.int32)
    logits, cache = models.decode(model, tok, cache, logits="last", backend=FLAGS.backend,
                                  check_capacity=False)
    jax.block_until_ready(logits)
    times = []
    for _ in range(FLAGS.steps):
      t0 = time.perf_counter()
      logits, cache = models.decode(model, tok, cache, logits="last", backend=FLAGS.backend,
                                    check_capacity=False)
      jax.block_until_ready(logits)
      times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    base = base or ms
    lo, hi = min(times) * 1e3, max(times) * 1e3
    row = dict(context=ctx, ms_per_step=ms, ms_per_step_min=lo, ms_per_step_max=hi,
               tokens_per_s=FLAGS.batch / (ms / 1e3), kv_bytes=cache.nbytes,
               ratio_vs_first=ms / base)
    rows.append(row)
    spread = f"{lo:.2f}-{hi:.2f}"
    print(f"{ctx:>8} {ms:>9.2f} {spread:>15} {row['tokens_per_s']:>9.1f} "
          f"{cache.nbytes / 2**20:>8.1f} {ms / base:>8.2f}x")
  if FLAGS.out and jax.process_index() == 0:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)
