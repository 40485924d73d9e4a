r"""Prefill memory: one-shot prefill-then-press vs chunked prefill (press after every chunk).

    python -m experiments.bench_prefill_memory                           # 4K..64K, tiny model
    python -m experiments.bench_prefill_memory --lengths=4096,8192 --out=/tmp/prefill.json

For each prompt length T, with a press of fixed budget `--capacity` (default 1024 slots per
kv head and layer):

* peak KV bytes: the largest cache held during prefill. One-shot: the T-slot cache the
  prompt is written into before the press (exact nbytes of that cache). Chunked: measured,
  the largest cache passed to any chunk's forward (budget + chunk_size slots once the press
  fits), recorded by wrapping `models.api._run` while `models.prefill(chunk_size=...)` runs
  for real.
* peak device memory: XLA's compiled memory analysis (argument + output + temp - aliased
  bytes) of one jitted forward + press at that shape: the whole prompt for one-shot, the
  steady-state chunk (cache of budget + chunk_size slots, `chunk_size` tokens) for chunked.
  Only compiled, never run, so 64K one-shot costs no memory here. "n/a" when the backend
  gives no analysis.
* accuracy: pass-key retrieval (train.tasks.Passkey) at `--acc_length` tokens, teacher-forced
  digits (digit accuracy and exact match): the full cache (no press, the model's ceiling),
  one-shot prefill-then-press, and chunked prefill with the same press. The
  model is `models/default/` when shipped, else the random-weight "tiny" preset, whose
  accuracy is meaningless (reported as such).

One-shot prefill at 64K is not *run* on CPU (its O(T^2) attention would take far too long);
its KV bytes are exact from the cache shape and its device memory from the compiled program.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from absl import app, flags

from experiments import flagcheck

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768", "65536"], "Prompt lengths.")
flags.DEFINE_integer("capacity", 1024, "Press budget: slots kept per kv head and layer.")
flags.DEFINE_integer("chunk_size", 1024, "Chunk size of chunked prefill.")


def press_names() -> tuple:
  """Presses chunked prefill can run (kvjax.presses.registry): those needing only the
  chunk's observations and RoPE (not KVzip's reconstruction or a head pattern)."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  return registry.names(provides=("colsum", "queries", "rope"))


flags.DEFINE_enum("press", "snapkv", press_names(), "Press (kvjax.presses.registry), run with "
                  "an absolute budget of --capacity slots.")
flags.DEFINE_integer("window_size", 64, "Observation window of presses that have one (SnapKV).")
flags.DEFINE_string("model", "default", "'default' (models/default or tiny), a preset, or a dir.")
flags.DEFINE_integer("acc_length", 2048, "Pass-key prompt length for accuracy (0 = skip).")
flags.DEFINE_integer("acc_examples", 2, "Pass-key examples.")
flags.DEFINE_bool("run_chunked", True, "Run chunked prefill for real to measure its peak KV.")
flags.DEFINE_bool("memory_analysis", True, "Compile forward + press to read XLA memory stats.")
flags.DEFINE_string("out", None, "Optional JSON output path.")
flagcheck.int_lists("lengths", lo=1)
flagcheck.ints("capacity", "chunk_size", "window_size", "acc_examples", lo=1)
flagcheck.ints("acc_length", lo=0)
flagcheck.writable_file("out")


def make_press(name, budget, window_size):
  """Press `name` from the registry with an absolute per-head budget of `budget` slots."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  options = {"window_size": window_size} if registry.accepts(name, "window_size") else {}
  return registry.make(name, 0.0, **options).with_budget(budget)


def load_model(name, longest):
  """(model, tokenizer, random_weights)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel
  shipped = name == "default" and os.path.exists(os.path.join(presets.DEFAULT_DIR,
                                                              "config.json"))
  model, tok = presets.load_model_and_tokenizer(name)
  random_weights = not shipped and not os.path.isdir(name)
  if random_weights and model.config.max_position_embeddings < longest:
    # random weights: widen the position range (plain RoPE does not depend on it)
    cfg = model.config.replace(max_position_embeddings=longest)
    model = models.Transformer(cfg, rngs=nnx.Rngs(0))
  return model, tok, random_weights


def cache_nbytes(cache) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(cache))


@contextlib.contextmanager
def track_chunk_caches(sizes):
  """Records the nbytes of the cache every forward call of models.prefill receives."""
  from models import api  # pylint: disable=import-outside-toplevel
  run = api._run  # pylint: disable=protected-access

  def spy(graphdef, state, tokens, positions, cache, **kw):
    sizes.append(cache_nbytes(cache))
    return run(graphdef, state, tokens, positions, cache, **kw)

  api._run = spy  # pylint: disable=protected-access
  try:
    yield
  finally:
    api._run = run  # pylint: disable=protected-access


def compiled_peak(model, press, tokens_len, cache_slots, room, prompt_length):
  """argument + output + temp - alias bytes of jit(forward + press), compiled only."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from models import transformer as tfm  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)
  cfg = model.config
  need = press.observe

  def step(state, tokens, positions, cache):
    m = nnx.merge(graphdef, state)
    logits, cache, obs = tfm.forward(m, tokens, positions, cache, need, "auto", last_only=True)
    cache = press.compress_model(cache, obs, cfg, room=room, prompt_length=prompt_length)
    return logits, cache

  cache = jax.eval_shape(lambda: models.init_cache(cfg, 1, cache_slots))
  toks = jax.ShapeDtypeStruct((1, tokens_len), jnp.int32)
  try:
    compiled = jax.jit(step, donate_argnums=(3,)).lower(state, toks, toks, cache).compile()
    ma = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return None, f"n/a ({type(e).__name__}: {str(e)[:120]})"
  if ma is None:
    return None, "n/a (no memory analysis on this backend)"
  total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
           - ma.alias_size_in_bytes)
  return {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
          "temp": ma.temp_size_in_bytes, "alias": ma.alias_size_in_bytes,
          "total": total}, None


def passkey_accuracy(model, press, length, n, chunk_size):
  """Teacher-forced digit accuracy and exact match: no press, one-shot + press, chunked."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from train import tasks  # pylint: disable=import-outside-toplevel
  task = tasks.Passkey(length=length)
  res = {}
  for mode, cs in (("full_cache", None), ("one_shot", None), ("chunked", chunk_size)):
    digits, exact = [], []
    for i in range(n):
      ex = task.example(0, i)
      a0 = int(ex.answer_positions[0])
      prompt = jnp.asarray(ex.tokens[None, :a0])
      if mode == "full_cache":  # no press: the model's own ceiling
        lg, cache = models.prefill(model, prompt, capacity=a0 + len(ex.answer), logits="last")
      else:
        lg, cache = models.prefill(model, prompt, press=press, decode_room=len(ex.answer),
                                   logits="last", chunk_size=cs)
      lg2, _ = models.decode(model, jnp.asarray(ex.answer[None, :-1]), cache)
      pred = np.concatenate([np.asarray(lg[0]).argmax(-1), np.asarray(lg2[0]).argmax(-1)])
      ok = pred == ex.answer
      digits.append(ok.mean())
      exact.append(ok.all())
    res[mode] = {"digit_acc": float(np.mean(digits)), "exact_match": float(np.mean(exact))}
  return res


def fmt_bytes(n):
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
    n /= 1024


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel

  lengths = sorted(int(x) for x in FLAGS.lengths)
  budget, c = FLAGS.capacity, FLAGS.chunk_size
  model, _, random_weights = load_model(FLAGS.model, max(lengths + [FLAGS.acc_length]))
  cfg = model.config
  press = make_press(FLAGS.press, budget, FLAGS.window_size)
  print(f"model={FLAGS.model}{' (random-weight tiny preset)' if random_weights else ''} "
        f"layers={cfg.num_layers} kv_heads={cfg.num_kv_heads} head_dim={cfg.head_dim} "
        f"dtype={cfg.dtype}; press={press!r}; chunk_size={c}; backend={jax.default_backend()}")
  rows = []
  for t in lengths:
    t0 = time.perf_counter()
    row = {"length": t}
    one_cache = jax.eval_shape(lambda t=t: models.init_cache(cfg, 1, t))
    row["one_shot_peak_kv_bytes"] = cache_nbytes(one_cache)
    final = None
    if FLAGS.run_chunked and c < t:
      sizes = []
      tokens = jax.random.randint(jax.random.key(t), (1, t), 0, cfg.vocab_size, jnp.int32)
      with track_chunk_caches(sizes):
        _, final = models.prefill(model, tokens, press=press, decode_room=0, chunk_size=c,
                                  logits="last")
      jax.block_until_ready(final)
      row["chunked_peak_kv_bytes"] = max(sizes + [cache_nbytes(final)])
      row["chunked_chunks"] = len(sizes)
      row["final_kv_bytes"] = cache_nbytes(final)
    else:
      row["chunked_peak_kv_bytes"] = None
    row["chunked_seconds"] = time.perf_counter() - t0
    if FLAGS.memory_analysis:
      one, why1 = compiled_peak(model, press, t, t, 0, t)
      steady = budget + c
      ch, why2 = compiled_peak(model, press, c, steady, c, c)
      row["one_shot_device"] = one if one else why1
      row["chunked_device"] = ch if ch else why2
    rows.append(row)
    print(f"  T={t}: done in {time.perf_counter() - t0:.1f}s", flush=True)

  def dev(r, k):
    v = r.get(k)
    return v["total"] if isinstance(v, dict) else None

  base = rows[0]
  hdr = (f"{'prompt':>7} | {'one-shot KV':>11} {'x':>5} | {'chunked KV':>11} {'x':>5} | "
         f"{'one-shot dev':>12} {'x':>5} | {'chunked dev':>11} {'x':>5} | {'1shot/chunk KV':>14}")
  print("\n" + hdr + "\n" + "-" * len(hdr))
  for r in rows:
    def ratio(v, b):
      return f"{v / b:5.2f}" if v and b else "  n/a"
    o, ck = r["one_shot_peak_kv_bytes"], r["chunked_peak_kv_bytes"]
    od, cd = dev(r, "one_shot_device"), dev(r, "chunked_device")
    print(f"{r['length']:>7} | {fmt_bytes(o):>11} {ratio(o, base['one_shot_peak_kv_bytes'])} | "
          f"{fmt_bytes(ck):>11} {ratio(ck, base['chunked_peak_kv_bytes'])} | "
          f"{fmt_bytes(od):>12} {ratio(od, dev(base, 'one_shot_device'))} | "
          f"{fmt_bytes(cd):>11} {ratio(cd, dev(base, 'chunked_device'))} | "
          f"{(o / ck if ck else float('nan')):14.1f}")
  lo, hi = rows[0], rows[-1]
  summary = {}
  if lo["chunked_peak_kv_bytes"] and hi["chunked_peak_kv_bytes"]:
    summary["chunked_kv_growth"] = hi["chunked_peak_kv_bytes"] / lo["chunked_peak_kv_bytes"]
    summary["one_shot_kv_growth"] = hi["one_shot_peak_kv_bytes"] / lo["one_shot_peak_kv_bytes"]
    summary["length_growth"] = hi["length"] / lo["length"]
    summary["chunked_flat_within_1.2x"] = summary["chunked_kv_growth"] <= 1.2
    print(f"\n{lo['length']} -> {hi['length']} tokens ({summary['length_growth']:.0f}x): "
          f"chunked peak KV x{summary['chunked_kv_growth']:.2f} "
          f"(target <= 1.2: {'PASS' if summary['chunked_flat_within_1.2x'] else 'FAIL'}), "
          f"one-shot peak KV x{summary['one_shot_kv_growth']:.2f}")
  for r in rows:
    for k in ("one_shot_device", "chunked_device"):
      if isinstance(r.get(k), str):
        print(f"  T={r['length']} {k}: {r[k]}")
  acc = None
  if FLAGS.acc_length:
    t0 = time.perf_counter()
    acc = passkey_accuracy(model, press, FLAGS.acc_length, FLAGS.acc_examples, c)
    note = (" (random weights: accuracy is meaningless, only shows both paths run)"
            if random_weights else "")
    print(f"\npass-key @ {FLAGS.acc_length} tokens, {FLAGS.acc_examples} examples, "
          f"budget {budget}{note}:")
    for mode, v in acc.items():
      print(f"  {mode:>10}: digit acc {v['digit_acc']:.3f}  exact match {v['exact_match']:.3f}")
    print(f"  ({time.perf_counter() - t0:.1f}s)")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"model": FLAGS.model, "random_weights": random_weights,
                 "press": repr(press), "capacity": budget, "chunk_size": c,
                 "backend": jax.default_backend(), "rows": rows, "summary": summary,
                 "accuracy": acc, "acc_length": FLAGS.acc_length}, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
