r"""Press cost vs prefill, and decode step time on compressed caches, in one run.

    python -m experiments.bench_presses                      # 8K context, "small" preset
    python -m experiments.bench_presses --context=2048 --presses=snapkv,knorm --batch=2

For every press (kvpress defaults, --ratio fraction removed):
  * press time: `press.compress_model` on the prefilled cache (jitted; compile excluded),
    as a fraction of the prefill time of the same context without observations
    (target <= 5%). Attention statistics are computed inside the prefill; the extra prefill
    time they cost is reported separately (obs_overhead).
  * decode step time on the compressed cache, relative to the full cache measured in the
    same run.
Decode step time at 25% and 50% budgets (compression_ratio 0.75 / 0.5) vs the full cache
is measured on KnormPress caches (any uniform press gives the same shapes); target <= 0.35x
at 25%. Decode is timed at the prefill batch and at --decode_batch (the pressed caches'
rows replicated with kvjax.cache.fork: a single row leaves a fixed per-step cost, weights
and dispatch, that no cache size removes).

Times are the minimum over --repeats runs after a warm-up (robust on shared CPUs); the
median is recorded too. Decode steps of all caches are timed round-robin, so load from
other processes hits every cache alike. Results: <out_dir>/bench_presses.json, .csv, .png.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time

from absl import app, flags

from experiments import flagcheck

FLAGS = flags.FLAGS


def press_names() -> tuple:
  """Every press in kvjax.presses.registry (the bench supplies DuoAttention's head pattern)."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  return registry.names()


def define_flags():
  """The launcher's flags, defined only when it runs as a program: its names (model,
  context, presses, ...) would collide with other absl launchers imported in one process
  (tests import experiments.compare and this module's press table together)."""
  flags.DEFINE_string("model", "small", "Preset name (models.presets.PRESETS) or HF directory.")
  flags.DEFINE_integer("context", 8192, "Prompt tokens per row.")
  flags.DEFINE_integer("batch", 1, "Rows (the same for prefill and decode).")
  flags.DEFINE_list("presses", ["all"], "Presses to time: 'all' or names from "
                    "kvjax.presses.registry (--presses=help lists them).")
  flags.DEFINE_float("ratio", 0.5, "compression_ratio (fraction removed) for the press "
                     "timings.")
  flags.DEFINE_list("budgets", ["0.25", "0.5"], "Kept fractions for the decode-step "
                    "comparison.")
  flags.DEFINE_integer("room", 64, "Free slots left for decoding after each press.")
  flags.DEFINE_integer("repeats", 2, "Timed runs per measurement (after one warm-up run).")
  flags.DEFINE_integer("decode_steps", 20, "Timed decode steps per cache.")
  flags.DEFINE_integer("decode_batch", 8, "Second decode batch size (rows replicated).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model and cache dtype.")
  flags.DEFINE_enum("backend", "auto", ["auto", "xla", "pallas"], "Attention backend.")
  flags.DEFINE_integer("seed", 0, "Seed of the random prompt.")
  flags.DEFINE_string("out_dir", "/tmp/kvjax_bench_presses", "Where JSON/CSV/PNG results go.")
  flagcheck.ints("context", "batch", "repeats", "decode_steps", "decode_batch", lo=1)
  flagcheck.ints("room", "seed", lo=0)
  flagcheck.floats("ratio", lo=0.0, hi=1.0, hi_open=True)
  flagcheck.float_lists("budgets", lo=0.0, hi=1.0, lo_open=True)
  flagcheck.writable_dir("out_dir", allow_empty=False)


def make_presses(ratio, num_layers, num_kv_heads, seed=0, names=None):
  """{name: press} for `names` (default: every registered press), kvpress defaults.

  Presses that need a calibrated head pattern (DuoAttention) get a random one of the
  model's shape; presses with a `seed` field get `seed`.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  pattern = np.random.default_rng(seed).random((num_layers, num_kv_heads))
  out = {}
  for name in (press_names() if names is None else names):
    options = {}
    if "head_scores" in registry.get(name).needs:
      options["head_scores"] = pattern
    if registry.accepts(name, "seed"):
      options["seed"] = seed
    out[name] = registry.make(name, ratio, **options)
  return out


def _time(fn, repeats):
  """(min seconds, median seconds, last result) of fn() over `repeats` runs after a warm-up."""
  import jax  # pylint: disable=import-outside-toplevel
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times), statistics.median(times), out


def decode_step_seconds(model, caches, steps, backend):
  """{key: (min, median) seconds} of one jitted single-token decode step per cache.

  All caches are stepped round-robin (one step each per round), so a burst of load from
  other processes lands on every cache, not on whichever was measured then.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from models import api  # pylint: disable=import-outside-toplevel
  from models import transformer as tfm  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)

  # The jitted step of models.decode, called directly: no per-call host work is timed.
  def step(c):
    tok = jnp.ones((c.batch, 1), jnp.int32)
    pos = c.next_position[:, None]
    return api._run(graphdef, state, tok, pos, c, observe=tfm.Observe(), backend=backend,  # pylint: disable=protected-access
                    logits_mode="last")

  live = {}
  for key, cache in caches.items():
    logits, live[key], _ = step(jax.tree.map(jnp.copy, cache))  # _run donates its cache
    jax.block_until_ready(logits)
  times = {key: [] for key in caches}
  for _ in range(steps):
    for key in caches:
      t0 = time.perf_counter()
      logits, live[key], _ = step(live[key])
      jax.block_until_ready(logits)
      times[key].append(time.perf_counter() - t0)
  return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def plot(rows, decode_rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  names = [r["press"] for r in rows]
  a.barh(names, [100 * r["press_frac_of_prefill"] for r in rows], color="tab:blue")
  a.axvline(5, color="red", ls="--", label="target 5%")
  a.set_xlabel("press time, % of prefill time")
  a.legend()
  labels = [f"{d['label']}" for d in decode_rows]
  b.bar(labels, [d["ratio_vs_full"] for d in decode_rows], color="tab:green")
  b.axhline(0.35, color="red", ls="--", label="target 0.35x at 25%")
  b.set_ylabel("decode step time / full cache (same batch)")
  b.legend()
  fig.suptitle(f"presses at {FLAGS.context} tokens, model={FLAGS.model}, batch={FLAGS.batch}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from kvjax import presses as P  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  if FLAGS.decode_batch < 1 or FLAGS.decode_batch % FLAGS.batch:
    raise app.UsageError(f"--decode_batch={FLAGS.decode_batch} must be a positive multiple of "
                         f"--batch={FLAGS.batch}")
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  if FLAGS.presses == ["help"]:
    print(registry.help_text())
    return
  names = press_names() if FLAGS.presses == ["all"] else tuple(FLAGS.presses)
  unknown = [p for p in names if p not in press_names()]
  if unknown:
    raise app.UsageError(f"--presses: unknown {unknown}; allowed: all, {press_names()}")
  model, _ = presets.load_model_and_tokenizer(FLAGS.model, dtype=FLAGS.dtype)
  cfg = model.config
  b, t = FLAGS.batch, FLAGS.context
  tokens = jax.random.randint(jax.random.key(FLAGS.seed), (b, t), 0, cfg.vocab_size,
                              dtype=jnp.int32)
  kw = dict(logits="last", backend=FLAGS.backend)
  print(f"device={jax.devices()[0].platform} model={FLAGS.model} context={t} batch={b} "
        f"dtype={FLAGS.dtype} ratio={FLAGS.ratio} room={FLAGS.room}")

  # Prefill baseline (no observations), and one prefill per distinct observation request.
  prefill_s, prefill_med, (_, cache0) = _time(lambda: models.prefill(model, tokens, **kw),
                                               FLAGS.repeats)
  print(f"prefill (no observations): {prefill_s * 1e3:.1f} ms")
  presses = make_presses(FLAGS.ratio, cfg.num_layers, cfg.num_kv_heads, FLAGS.seed, names)
  observed = {}
  for obs_req in dict.fromkeys(p.observe for p in presses.values()):
    if obs_req == models.Observe():
      observed[obs_req] = (cache0, None, prefill_s)
      continue
    secs, _, (_, cache, obs) = _time(
        lambda o=obs_req: models.prefill(model, tokens, observe=o, **kw), 1)
    observed[obs_req] = (cache, obs, secs)

  # Full-cache decode reference: the prompt plus the same room (no eviction).
  full = P.compress_model([None] * cfg.num_layers, cache0, rooms=FLAGS.room)
  full_bytes = full.nbytes
  decode_caches = {"full": full}

  rows = []
  for name, press in tqdm(presses.items(), desc="presses"):
    cache, obs, obs_secs = observed[press.observe]
    fn = lambda p=press, c=cache, o=obs: p.compress_model(c, o, cfg, room=FLAGS.room,
                                                          prompt_length=t)
    secs, med, pressed = _time(fn, FLAGS.repeats)
    decode_caches.setdefault(pressed.capacity, pressed)
    rows.append(dict(
        press=name, context=t, batch=b, ratio=FLAGS.ratio, press_ms=secs * 1e3,
        press_ms_median=med * 1e3, prefill_ms=prefill_s * 1e3,
        press_frac_of_prefill=secs / prefill_s,
        obs_overhead_frac=max(obs_secs - prefill_s, 0.0) / prefill_s,
        kv_bytes=pressed.nbytes, kv_frac_of_full=pressed.nbytes / full_bytes,
        capacity=list(pressed.capacity)))
    del pressed
  budgets = sorted({float(x) for x in FLAGS.budgets})
  for frac in budgets:
    decode_caches[f"{int(round(frac * 100))}%"] = P.KnormPress(
        compression_ratio=1 - frac).compress_model(cache0, None, cfg, room=FLAGS.room)
  del observed, cache0

  from kvjax import cache as cache_lib  # pylint: disable=import-outside-toplevel
  timed = {}
  for db in sorted({b, FLAGS.decode_batch}):
    caches = {k: (c if db == b else cache_lib.fork(c, db // b)) for k, c in
              decode_caches.items()}
    print(f"timing decode steps at batch {db} ({len(caches)} caches, round-robin)")
    for k, v in decode_step_seconds(model, caches, FLAGS.decode_steps, FLAGS.backend).items():
      timed[(db, k)] = v
  dbs = sorted({b, FLAGS.decode_batch})
  for r in rows:
    key = tuple(r["capacity"])
    for db in dbs:
      r[f"decode_ratio_b{db}"] = timed[(db, key)][0] / timed[(db, "full")][0]
  decode_rows = []
  for db in dbs:
    full_step, full_med = timed[(db, "full")]
    for label in ["full"] + [f"{int(round(f * 100))}%" for f in budgets]:
      step, med = timed[(db, label)]
      c = decode_caches[label]
      decode_rows.append(dict(label=label if db == b else f"{label} b{db}", batch=db,
                              budget=1.0 if label == "full" else float(label[:-1]) / 100,
                              capacity=c.capacity[0], step_ms=step * 1e3,
                              step_ms_median=med * 1e3, ratio_vs_full=step / full_step,
                              kv_bytes=c.nbytes * db // b))

  print(f"\n{'press':<20} {'press ms':>9} {'% prefill':>9} {'obs +%':>7} {'KV frac':>8} "
        + " ".join(f"{'dec b' + str(db):>8}" for db in dbs))
  for r in rows:
    print(f"{r['press']:<20} {r['press_ms']:>9.1f} {100 * r['press_frac_of_prefill']:>8.2f}% "
          f"{100 * r['obs_overhead_frac']:>6.1f}% {r['kv_frac_of_full']:>8.3f} "
          + " ".join(f"{r[f'decode_ratio_b{db}']:>7.2f}x" for db in dbs))
  print(f"\n{'budget':<10} {'batch':>5} {'slots':>7} {'ms/step':>9} {'vs full':>8}")
  for d in decode_rows:
    print(f"{d['label']:<10} {d['batch']:>5} {d['capacity']:>7} {d['step_ms']:>9.2f} "
          f"{d['ratio_vs_full']:>7.2f}x")

  if jax.process_index() == 0:
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    base = os.path.join(FLAGS.out_dir, "bench_presses")
    meta = dict(device=jax.devices()[0].platform, model=FLAGS.model, context=t, batch=b,
                dtype=FLAGS.dtype, ratio=FLAGS.ratio, room=FLAGS.room,
                prefill_ms=prefill_s * 1e3, prefill_ms_median=prefill_med * 1e3)
    with open(base + ".json", "w") as f:
      json.dump(dict(meta=meta, presses=rows, decode=decode_rows), f, indent=2)
    with open(base + ".csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["press"])
      w.writeheader()
      for r in rows:
        w.writerow({**r, "capacity": " ".join(map(str, r["capacity"]))})
    if rows:
      plot(rows, decode_rows, base + ".png")
    print(f"\nwrote {base}.json, .csv, .png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
