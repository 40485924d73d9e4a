r"""Cache compression benchmark: bytes per token, decode step time and logit drift per kind.

    python -m experiments.bench_compression                      # all kinds, CPU: minutes
    python -m experiments.bench_compression --kinds=bf16,int8,kivi2 --prompt_len=1024

Every kind is measured in the same run against the bf16 full cache (`bf16`): the prompt is
prefilled once into a bf16 dense cache, each kind converts that cache (quantize, prune,
project, or evict then quantize), then `--decode_steps` teacher-forced one-token decode
steps run with the bf16 run's greedy tokens. Reported per kind:

  bytes/token   kvjax.memory.report(cache).total / tokens of the sequence (all layers;
                codes, scales, zeros, outliers, residual windows, positions, lengths)
  x bf16        compression factor: bf16 cache bytes / kind bytes
  step ms       fastest wall time of one jitted decode step over the steps; kinds' steps
                are interleaved and the min taken, the robust choice on a shared machine
                (the median is in the JSON). Reference
                XLA path: the cache is decompressed every step, so compressed kinds pay
                for dequantization here; the fused kernel is timed by
                `python -m pallas_kernels.bench --kernels=quantized`
  step / bf16   that time relative to the bf16 cache's, measured in the same run
  KL            mean KL(bf16 || kind) of next-token distributions over the decode steps

The model is random-init (the config below; no weights are downloaded), with sharpened
attention so cache errors show in the logits; KL values rank kinds, they are not quality
numbers of a trained model. Results: JSON + CSV + PNG in --out_dir.
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
flags.DEFINE_list("kinds", ["bf16", "int8", "fp8_e4m3", "fp8_e5m2", "int4", "int2", "kivi4",
                            "kivi2", "kvquant4", "think50", "lowrank50", "snapkv50+int4"],
                  "Kinds to run: bf16 (baseline, always run first), preset names of "
                  "kvjax.quant (int8, fp8_e4m3, fp8_e5m2, int4, int2, kivi4, kivi2, kvquant4, "
                  "kvquant2), think50 (ThinK, half the key channels), lowrank50 (keys at "
                  "half rank, basis calibrated on the prompt), snapkv50+int4 (SnapKV keeps "
                  "half the tokens, then KIVI-4).")
flags.DEFINE_integer("batch", 2, "Rows.")
flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per row (random ids).")
flags.DEFINE_integer("decode_steps", 24, "Timed, teacher-forced one-token decode steps.")
flags.DEFINE_integer("num_layers", 4, "Model layers.")
flags.DEFINE_integer("hidden", 256, "Model hidden size.")
flags.DEFINE_integer("num_heads", 4, "Query heads.")
flags.DEFINE_integer("num_kv_heads", 2, "KV heads.")
flags.DEFINE_integer("head_dim", 64, "Head dim (real models use 64-128; overheads of scales "
                     "and positions shrink as it grows).")
flags.DEFINE_integer("group_size", 32, "KIVI / KVQuant group size.")
flags.DEFINE_integer("residual", 128, "KIVI / KVQuant full-precision residual window.")
flags.DEFINE_integer("seed", 0, "PRNG seed for weights and prompts.")
flags.DEFINE_string("out_dir", "results/bench_compression", "Where JSON/CSV/PNG go.")
flagcheck.ints("batch", "prompt_len", "decode_steps", "num_layers", "hidden", "num_heads",
               "num_kv_heads", "head_dim", "group_size", lo=1)
flagcheck.ints("residual", "seed", lo=0)
flagcheck.writable_dir("out_dir", allow_empty=False)


def _model():
  import models  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = models.ModelConfig(vocab_size=260, hidden_size=FLAGS.hidden,
                           intermediate_size=2 * FLAGS.hidden, num_layers=FLAGS.num_layers,
                           num_heads=FLAGS.num_heads, num_kv_heads=FLAGS.num_kv_heads,
                           head_dim=FLAGS.head_dim, max_position_embeddings=1 << 16)
  m = models.Transformer(cfg, rngs=nnx.Rngs(FLAGS.seed))
  # random init is near-uniform attention; sharpen it so cache errors reach the logits
  m.wq[...] = m.wq[...] * 4.0
  m.wk[...] = m.wk[...] * 4.0
  m.lm_head[...] = m.lm_head[...] * 10.0
  return cfg, m


def _convert(name, cache, obs, cfg):
  """The bf16 prefill cache converted to kind `name`."""
  from kvjax import lowrank, mixed, quant  # pylint: disable=import-outside-toplevel
  from kvjax.cache import ModelCache  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  g, r = FLAGS.group_size, FLAGS.residual
  if name == "bf16":
    return cache
  if name in quant.NAMES:
    kw = dict(group_size=g, residual=r) if name.startswith(("kivi", "kvquant")) else {}
    return quant.quantize_model(cache, quant.from_name(name, **kw), config=cfg)
  if name == "think50":
    keep = cfg.head_dim // 2
    layers = [lowrank._think_prune_jit(c, o["queries"], keep)  # pylint: disable=protected-access
              for c, o in zip(cache.layers(), obs)]
    return ModelCache.from_layers(layers, cache.next_position)
  if name == "lowrank50":
    conv = jax.jit(lowrank.lowrank_from_dense, static_argnums=1)
    layers = [conv(c, cfg.head_dim // 2) for c in cache.layers()]
    return ModelCache.from_layers(layers, cache.next_position)
  if name == "snapkv50+int4":
    from kvjax import presses  # pylint: disable=import-outside-toplevel
    etq = mixed.EvictThenQuantize(presses.SnapKVPress(compression_ratio=0.5, window_size=32),
                                  quant.kivi(4, group_size=g, residual=r))
    return etq.compress_model(cache, obs, cfg, room=FLAGS.decode_steps + 1)
  raise app.UsageError(f"unknown kind {name!r}")


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from kvjax import memory  # pylint: disable=import-outside-toplevel
  from kvjax.observation import Observe  # pylint: disable=import-outside-toplevel

  kinds = list(FLAGS.kinds)
  if "bf16" in kinds:
    kinds.remove("bf16")
  kinds = ["bf16"] + kinds
  cfg, model = _model()
  rng = np.random.default_rng(FLAGS.seed)
  b, t, n = FLAGS.batch, FLAGS.prompt_len, FLAGS.decode_steps
  prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(b, t)), jnp.int32)
  observe = Observe(colsum=True, colsum_window=32, queries=32)
  _, dense, obs = models.prefill(model, prompt, capacity=t + n + 1, cache_dtype=jnp.bfloat16,
                                 logits="last", observe=observe)
  jax.block_until_ready(dense)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (decode donates caches)

  # Convert and compile every kind first, then interleave their decode steps (step i of
  # every kind, then step i + 1 ...) so load on a shared machine hits all kinds alike.
  caches, reports = {}, {}
  for name in tqdm(kinds, desc="convert + compile"):
    caches[name] = _convert(name, copy(dense), obs, cfg)
    reports[name] = memory.report(caches[name])
    models.decode(model, prompt[:, -1:], copy(caches[name]), logits="last")[0].block_until_ready()
  times = {k: [] for k in kinds}
  logits_all = {k: [] for k in kinds}
  tok = prompt[:, -1:]
  for _ in tqdm(range(n), desc="decode steps"):
    for name in kinds:
      t0 = time.perf_counter()
      logits, caches[name] = models.decode(model, tok, caches[name], logits="last",
                                           check_capacity=False)
      logits.block_until_ready()
      times[name].append(time.perf_counter() - t0)
      logits_all[name].append(np.asarray(logits[:, -1], np.float32))
    # teacher forcing: every kind is fed the bf16 cache's greedy token
    tok = jnp.asarray(np.argmax(logits_all["bf16"][-1], -1), jnp.int32)[:, None]
  ref_logits = np.stack(logits_all["bf16"], 1)
  rows = []
  for name in kinds:
    lp = jax.nn.log_softmax(ref_logits, -1)
    lq = jax.nn.log_softmax(np.stack(logits_all[name], 1), -1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    rep = reports[name]
    seq_tokens = b * (t + 1)            # bytes counted once the prompt + first step are held
    rows.append(dict(kind=name, bytes=rep.total, bytes_per_token=rep.total / seq_tokens,
                     step_ms=1e3 * min(times[name]),
                     step_ms_median=1e3 * statistics.median(times[name]), kl=kl,
                     layers=[l.kind for l in rep.layers], components=rep.by_component()))
  base = rows[0]
  for r in rows:
    r["x_bf16"] = base["bytes"] / r["bytes"]
    r["step_vs_bf16"] = r["step_ms"] / base["step_ms"]

  device = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
  head = (f"model: {cfg.num_layers} layers, {cfg.num_kv_heads} kv heads x head_dim "
          f"{cfg.head_dim}; batch {b}, prompt {t}, {n} decode steps; device {device}")
  print(head)
  print(f"{'kind':<16}{'bytes/token':>12}{'x bf16':>9}{'step ms':>10}{'step/bf16':>11}"
        f"{'KL':>11}")
  for r in rows:
    print(f"{r['kind']:<16}{r['bytes_per_token']:>12.1f}{r['x_bf16']:>9.2f}"
          f"{r['step_ms']:>10.2f}{r['step_vs_bf16']:>11.2f}{r['kl']:>11.2e}")

  os.makedirs(FLAGS.out_dir, exist_ok=True)
  with open(os.path.join(FLAGS.out_dir, "results.json"), "w") as f:
    json.dump({"setup": head, "flags": {k: FLAGS[k].value for k in (
        "batch", "prompt_len", "decode_steps", "num_layers", "hidden", "num_heads",
        "num_kv_heads", "head_dim", "group_size", "residual", "seed")}, "rows": rows}, f,
              indent=1)
  with open(os.path.join(FLAGS.out_dir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["kind", "bytes", "bytes_per_token", "x_bf16", "step_ms", "step_vs_bf16", "kl"])
    for r in rows:
      w.writerow([r[k] for k in ("kind", "bytes", "bytes_per_token", "x_bf16", "step_ms",
                                 "step_vs_bf16", "kl")])
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["kind"] for r in rows]
    ax[0].bar(names, [r["x_bf16"] for r in rows])
    ax[0].set_ylabel("compression vs bf16 cache (x)")
    ax[0].tick_params(axis="x", rotation=60)
    ax[1].scatter([r["bytes_per_token"] for r in rows], [max(r["kl"], 1e-9) for r in rows])
    for r in rows:
      ax[1].annotate(r["kind"], (r["bytes_per_token"], max(r["kl"], 1e-9)), fontsize=7)
    ax[1].set_xlabel("bytes / token (all layers)")
    ax[1].set_ylabel("KL(bf16 || kind)")
    ax[1].set_yscale("log")
    fig.suptitle(head, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(FLAGS.out_dir, "results.png"), dpi=120)
  except ImportError:
    pass
  print(f"wrote {FLAGS.out_dir}/results.{{json,csv,png}}")


if __name__ == "__main__":
  app.run(main)
