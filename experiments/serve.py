r"""Serve a batch of prompts with continuous batching on a paged KV cache (kvjax.engine).

    python -m experiments.serve --model=tiny --num_requests=8
    python -m experiments.serve --prompts_file=prompts.txt --system_prompt="You are terse." \
        --max_batch=8 --num_pages=256 --page_size=16 --policy=compress --press=knorm \
        --ratio=0.5 --out=/tmp/serve.json

Prompts come from --prompts_file (one per line; a .jsonl file takes each line's "prompt"
field) or are --num_requests synthetic ones. A --system_prompt is prefilled once and shared
by every request (its pages are stored once). --policy picks what happens when the page
pool runs short: "swap" (preempt to host memory), "swap_int8" (int8 on the way out),
"compress" (evict with --press, then swap), "length" (compress prompts longer than
--length_threshold right after prefill, swap on pressure). Prints each completion and the
engine's statistics; --out writes them as JSON.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from experiments import flagcheck

FLAGS = flags.FLAGS   # rebound by define_flags


def _policy_presses() -> tuple:
  from kvjax import policy  # pylint: disable=import-outside-toplevel
  return policy.press_names()


def define_flags(fv=flags.FLAGS):
  """Defines this launcher's flags on `fv` (absl's global FlagValues when run as a
  program; a private one where other launchers' flags of the same names live in the
  same process) and makes them the ones `main` reads."""
  global FLAGS  # pylint: disable=global-statement
  FLAGS = fv
  flags.DEFINE_string("model", "default", "HF model directory or preset name (models.presets).",
                      flag_values=fv)
  flags.DEFINE_string("prompts_file", None, "Text file, one prompt per line (or .jsonl).",
                      flag_values=fv)
  flags.DEFINE_integer("num_requests", 8, "Synthetic prompts when no --prompts_file is given.",
                       flag_values=fv)
  flags.DEFINE_string("system_prompt", "", "Shared prefix, prefilled once for all requests.",
                      flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per request.", flag_values=fv)
  flags.DEFINE_integer("max_batch", 4, "Engine rows (concurrent requests + prefix rows).",
                       flag_values=fv)
  flags.DEFINE_integer("num_pages", 64, "Pages in each layer's pool.", flag_values=fv)
  flags.DEFINE_integer("page_size", 16, "Tokens per page.", flag_values=fv)
  flags.DEFINE_integer("max_tokens", 1024, "Max tokens per request (prefix + prompt + new).",
                       flag_values=fv)
  flags.DEFINE_integer("chunk", 32, "Prompt tokens fed per step while prefilling.", flag_values=fv)
  flags.DEFINE_integer("watermark", 1, "Free pages kept in reserve when admitting requests.",
                       flag_values=fv)
  flags.DEFINE_enum("policy", "swap", ["none", "swap", "swap_int8", "compress", "length"],
                    "What to do under memory pressure (see module docstring).", flag_values=fv)
  flags.DEFINE_enum("press", "knorm", _policy_presses(),
                    "Query-agnostic press used by --policy=compress/length "
                    "(kvjax.policy.press_names(), from the press registry).", flag_values=fv)
  flags.DEFINE_float("ratio", 0.5, "Press compression_ratio (fraction of tokens removed).",
                     flag_values=fv)
  flags.DEFINE_integer("length_threshold", 256, "--policy=length: compress longer prompts.",
                       flag_values=fv)
  flags.DEFINE_enum("quant", "none", ["none", "int8", "fp8_e4m3", "int4", "kivi4", "kivi2"],
                    "Store pages quantized (kvjax.quant per-token formats, or KIVI pages: "
                    "per-channel key groups of --kivi_group tokens and an exact window).",
                    flag_values=fv)
  flags.DEFINE_integer("kivi_group", 16, "KIVI key group (must divide --page_size).",
                       flag_values=fv)
  flags.DEFINE_integer("kivi_residual", 32, "KIVI exact window (a multiple of --kivi_group).",
                       flag_values=fv)
  flags.DEFINE_integer("prefill_batch", 0, "Rows prefilled per step on a sub-batch while the "
                       "others decode (0 = every row takes the chunk step).", flag_values=fv)
  flags.DEFINE_integer("table_buckets", 1, "Page-table widths the engine narrows to (1 = off).",
                       flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "PRNG seed (sampling and synthetic prompts).", flag_values=fv)
  flags.DEFINE_enum("backend", "auto", ["auto", "xla", "pallas"], "Attention backend.",
                    flag_values=fv)
  flags.DEFINE_string("out", None, "Optional JSON output path.", flag_values=fv)
  flagcheck.ints("num_requests", "max_new_tokens", "max_batch", "num_pages", "page_size",
                 "max_tokens", "chunk", "kivi_group", "table_buckets", lo=1, flag_values=fv)
  flagcheck.ints("watermark", "length_threshold", "kivi_residual", "prefill_batch", "seed", lo=0,
                 flag_values=fv)
  flagcheck.floats("ratio", lo=0.0, hi=1.0, hi_open=True, flag_values=fv)
  flagcheck.floats("temperature", lo=0.0, flag_values=fv)
  flagcheck.existing_file("prompts_file", flag_values=fv)
  flagcheck.writable_file("out", flag_values=fv)
  return fv


def load_prompts(path, n, tokenizer, seed):
  if path:
    with open(path) as f:
      lines = [l.rstrip("\n") for l in f if l.strip()]
    if path.endswith(".jsonl"):
      lines = [json.loads(l)["prompt"] for l in lines]
    return lines
  import random  # pylint: disable=import-outside-toplevel
  rnd = random.Random(seed)
  words = ["def", "return", "for", "in", "range", "import", "class", "self", "if", "else",
           "print", "list", "dict", "yield", "while", "lambda"]
  del tokenizer
  return [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 24))) for _ in range(n)]


def main(argv):
  del argv
  import models  # pylint: disable=import-outside-toplevel
  from kvjax import engine as engine_lib  # pylint: disable=import-outside-toplevel
  from kvjax import paged, policy  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel

  model, tok = presets.load_model_and_tokenizer(FLAGS.model)
  prompts = load_prompts(FLAGS.prompts_file, FLAGS.num_requests, tok, FLAGS.seed)
  if not prompts:
    raise app.UsageError("no prompts")
  spec = None
  if FLAGS.quant != "none":
    from kvjax import quant  # pylint: disable=import-outside-toplevel
    kw = {}
    if FLAGS.quant.startswith("kivi"):
      kw = dict(group_size=FLAGS.kivi_group, residual=FLAGS.kivi_residual)
    spec = quant.from_name(FLAGS.quant, **kw)
  make = paged.model_cache_fn(models.init_cache, model.config, num_pages=FLAGS.num_pages,
                              page_size=FLAGS.page_size, max_tokens=FLAGS.max_tokens,
                              quant=spec)
  eng = engine_lib.Engine(
      model, make, max_batch=FLAGS.max_batch, chunk=FLAGS.chunk,
      policy=policy.from_name(FLAGS.policy, press=FLAGS.press, ratio=FLAGS.ratio,
                              threshold=FLAGS.length_threshold),
      eos_id=getattr(tok, "eos_id", None), temperature=FLAGS.temperature, seed=FLAGS.seed,
      watermark=FLAGS.watermark, backend=FLAGS.backend,
      prefill_batch=min(FLAGS.prefill_batch, FLAGS.max_batch) or None,
      table_buckets=FLAGS.table_buckets)
  prefix = None
  if FLAGS.system_prompt:
    prefix = eng.register_prefix(tok.encode(FLAGS.system_prompt))
  reqs = []
  for p in prompts:
    ids = tok.encode(p) or [0]
    try:
      reqs.append(eng.submit(ids, FLAGS.max_new_tokens, prefix=prefix))
    except ValueError as e:
      print(f"rejected: {p[:40]!r}: {e}")
  t0 = time.perf_counter()
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(reqs), desc="requests", unit="req")
    seen = [0]

    def progress(e):
      bar.update(len(e.done) - seen[0])
      seen[0] = len(e.done)
  except ImportError:
    bar, progress = None, None
  eng.run(callback=progress)
  if bar is not None:
    bar.close()
  wall = time.perf_counter() - t0
  page_bytes = sum(s.page_nbytes * (s.page_table.shape[0] if s.stacked else 1)
                   for s in eng.cache.segments if hasattr(s, "page_nbytes"))
  stats = dict(eng.stats, wall_seconds=wall,
               tokens_per_second=eng.stats["tokens_generated"] / max(wall, 1e-9),
               peak_kv_bytes=eng.stats["peak_pages"] * page_bytes,
               pool_kv_bytes=eng.num_pages * page_bytes)
  out = []
  for r, p in zip(reqs, prompts):
    text = tok.decode(r.output)
    out.append(dict(id=r.id, prompt=p, completion=text, tokens=len(r.output),
                    first_token_step=r.first_token_step, finish_step=r.finish_step,
                    preemptions=r.preemptions, compressions=r.compressions))
    print(f"[{r.id}] {p!r} -> {text!r}")
  print(json.dumps(stats, indent=1, default=float))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(dict(stats=stats, requests=out, flags=FLAGS.flag_values_dict()), f, indent=1,
                default=str)
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
