r"""Serving benchmark: static batching on dense caches vs continuous batching on paged ones.

    python -m experiments.bench_serving --model=tiny --num_requests=16 --out_dir=/tmp/serving
    python -m experiments.bench_serving --model=small --num_requests=64 --max_batch=16 \
        --prompt_len=64,512 --system_len=256 --max_new_tokens=64 --page_size=16

One synthetic workload (random token prompts with lengths uniform in --prompt_len, all
starting with the same --system_len-token system prompt, all arriving at t = 0) is served by

  static        kvjax.generate in fixed batches of --max_batch rows, every row padded to the
                longest request (dense caches sized prompt + max_new_tokens for all rows);
  paged         kvjax.engine continuous batching, the system prompt prepended to every
                request (no sharing), a pool of --num_pages pages;
  paged+prefix  the same with the system prompt prefilled once and shared (kvjax.paged.fork);
  paged+prefix+small  a pool of --small_pages pages: memory pressure handled by --policy.

Reported per configuration (after an identical warm-up run that compiles every shape): wall seconds,
generated tokens/s, mean and p95 time-to-first-token and latency (engine steps and
seconds), peak KV bytes actually in use (pages in use x bytes per page over all layers;
for static: the dense caches' nbytes), swaps and compressions. Writes results.json,
results.csv and serving.png to --out_dir. CPU timings are dominated by per-step overhead;
compare configurations within one run, on one machine.
"""

from __future__ import annotations

import csv
import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny", "Preset name or HF directory (models.presets).")
flags.DEFINE_integer("num_requests", 16, "Requests in the workload.")
flags.DEFINE_list("prompt_len", ["8", "48"], "Min,max own-prompt tokens (uniform).")
flags.DEFINE_integer("system_len", 32, "Shared system-prompt tokens (0 = none).")
flags.DEFINE_integer("max_new_tokens", 16, "Generated tokens per request.")
flags.DEFINE_integer("max_batch", 4, "Rows: static batch size and engine rows.")
flags.DEFINE_integer("page_size", 8, "Tokens per page.")
flags.DEFINE_integer("num_pages", 0, "Pool pages (0 = enough for max_batch full requests).")
flags.DEFINE_integer("small_pages", 0, "Pool of the pressure run (0 = half of num_pages).")
flags.DEFINE_integer("chunk", 32, "Prefill chunk of the engine.")
flags.DEFINE_enum("policy", "compress", ["none", "swap", "swap_int8", "compress", "length"],
                  "Pressure policy of the small-pool run (see experiments.serve).")
flags.DEFINE_float("ratio", 0.5, "Press compression_ratio for compress/length policies.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("out_dir", None, "Directory for results.json/.csv and serving.png.")


def workload(n, lo, hi, system_len, vocab, seed):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  system = rng.integers(0, vocab, size=system_len).tolist()
  prompts = [rng.integers(0, vocab, size=int(rng.integers(lo, hi + 1))).tolist()
             for _ in range(n)]
  return system, prompts


def _pct(xs, q):
  import numpy as np  # pylint: disable=import-outside-toplevel
  return float(np.percentile(np.asarray(xs, float), q)) if xs else float("nan")


def run_static(model, system, prompts, new, batch):
  """kvjax.generate over fixed batches, left-padded to the longest request."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import kvjax  # pylint: disable=import-outside-toplevel
  seqs = [system + p for p in prompts]
  t = max(map(len, seqs))
  t0 = time.perf_counter()
  peak, ttft, lat, steps = 0, [], [], 0
  for i in range(0, len(seqs), batch):
    group = seqs[i:i + batch]
    group = group + [group[-1]] * (batch - len(group))   # keep one compiled shape
    toks = np.zeros((batch, t), np.int32)
    mask = np.zeros((batch, t), np.int32)
    for r, s in enumerate(group):
      toks[r, t - len(s):] = s
      mask[r, t - len(s):] = 1
    start = time.perf_counter()
    out = kvjax.generate(model, jnp.asarray(toks), attention_mask=jnp.asarray(mask),
                         max_new_tokens=new)
    peak = max(peak, out.cache.nbytes)
    n_real = min(batch, len(seqs) - i)
    ttft += [start - t0 + out.prefill_seconds] * n_real
    lat += [time.perf_counter() - t0] * n_real
    steps += new
  wall = time.perf_counter() - t0
  return dict(config="static", wall_s=wall, tokens=len(seqs) * new,
              ttft_mean_s=sum(ttft) / len(ttft), ttft_p95_s=_pct(ttft, 95),
              latency_mean_s=sum(lat) / len(lat), latency_p95_s=_pct(lat, 95),
              peak_kv_bytes=peak, steps=steps, swaps=0, compressions=0)


def run_engine(model, system, prompts, new, *, batch, num_pages, page_size, chunk, share,
               policy, label, max_tokens):
  import models  # pylint: disable=import-outside-toplevel
  from kvjax import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from kvjax import paged  # pylint: disable=import-outside-toplevel
  make = paged.model_cache_fn(models.init_cache, model.config, num_pages=num_pages,
                              page_size=page_size, max_tokens=max_tokens)
  eng = engine_lib.Engine(model, make, max_batch=batch + int(share and bool(system)),
                          chunk=chunk, policy=policy)
  t0 = time.perf_counter()
  pid = eng.register_prefix(system) if share and system else None
  reqs = [eng.submit(p if pid is not None else system + p, new, prefix=pid) for p in prompts]
  eng.run()
  wall = time.perf_counter() - t0
  page_bytes = sum(s.page_nbytes * (s.page_table.shape[0] if s.stacked else 1)
                   for s in eng.cache.segments if hasattr(s, "page_nbytes"))
  ttft = [r.first_token_time - t0 for r in reqs]
  lat = [r.finish_time - t0 for r in reqs]
  st = eng.stats
  return dict(config=label, wall_s=wall, tokens=st["tokens_generated"],
              ttft_mean_s=sum(ttft) / len(ttft), ttft_p95_s=_pct(ttft, 95),
              latency_mean_s=sum(lat) / len(lat), latency_p95_s=_pct(lat, 95),
              peak_kv_bytes=st["peak_pages"] * page_bytes, steps=st["steps"],
              swaps=st["swaps_out"], compressions=st["compressions"],
              ttft_mean_steps=sum(r.first_token_step for r in reqs) / len(reqs),
              pool_pages=num_pages)


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = [r["config"] for r in rows]
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
  ax[0].bar(names, [r["tokens_per_s"] for r in rows], color="tab:blue")
  ax[0].set_ylabel("generated tokens / s")
  ax[1].bar(names, [r["peak_kv_bytes"] / 1024 for r in rows], color="tab:orange")
  ax[1].set_ylabel("peak KV in use (KiB)")
  for a in ax:
    a.tick_params(axis="x", rotation=20)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv):
  del argv
  from kvjax import paged, policy  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel

  lo, hi = (int(x) for x in FLAGS.prompt_len)
  if not 1 <= lo <= hi:
    raise app.UsageError(f"--prompt_len={FLAGS.prompt_len}: need 1 <= min <= max")
  model, _ = presets.load_model_and_tokenizer(FLAGS.model)
  vocab = model.config.vocab_size
  system, prompts = workload(FLAGS.num_requests, lo, hi, FLAGS.system_len, vocab, FLAGS.seed)
  new, b, p = FLAGS.max_new_tokens, FLAGS.max_batch, FLAGS.page_size
  full = paged.pages_needed(FLAGS.system_len + hi + new, p)
  num_pages = FLAGS.num_pages or b * full + 2
  small = FLAGS.small_pages or max(full + paged.pages_needed(FLAGS.system_len, p) + 1,
                                   num_pages // 2)
  pol = policy.from_name(FLAGS.policy, ratio=FLAGS.ratio, threshold=2 * hi)
  max_tokens = FLAGS.system_len + hi + new   # fixed, so warm-up compiles the timed shapes
  kw = dict(batch=b, page_size=p, chunk=FLAGS.chunk, max_tokens=max_tokens)
  configs = [
      ("static", lambda s, ps: run_static(model, s, ps, new, b)),
      ("paged", lambda s, ps: run_engine(model, s, ps, new, num_pages=num_pages, share=False,
                                         policy=None, label="paged", **kw)),
      ("paged+prefix", lambda s, ps: run_engine(model, s, ps, new, num_pages=num_pages,
                                                share=True, policy=None, label="p", **kw)),
      (f"paged+prefix+{FLAGS.policy}@{small}p", lambda s, ps: run_engine(
          model, s, ps, new, num_pages=small, share=True, policy=pol, label="s", **kw)),
  ]
  rows = []
  for name, fn in configs:
    fn(system, prompts)   # warm-up on the same workload: every shape and pressure path compiles
    r = fn(system, prompts)
    r["config"] = name
    r["tokens_per_s"] = r["tokens"] / max(r["wall_s"], 1e-9)
    rows.append(r)
    print(f"{name:28s} {r['tokens_per_s']:9.1f} tok/s  wall {r['wall_s']:7.2f}s  "
          f"ttft {r['ttft_mean_s']:6.2f}s  peak KV {r['peak_kv_bytes'] / 1024:9.1f} KiB  "
          f"swaps {r['swaps']}  compressions {r['compressions']}", flush=True)
  if FLAGS.out_dir:
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    meta = dict(flags={k: str(v) for k, v in FLAGS.flag_values_dict().items()},
                num_pages=num_pages, small_pages=small)
    with open(os.path.join(FLAGS.out_dir, "results.json"), "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(os.path.join(FLAGS.out_dir, "results.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=keys)
      w.writeheader()
      w.writerows(rows)
    print("wrote", plot(rows, os.path.join(FLAGS.out_dir, "serving.png")))


if __name__ == "__main__":
  app.run(main)
