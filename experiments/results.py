"""Results of a comparison: rows -> results.jsonl, results.csv and a text table.

A row is one (technique, task, length[, depth]) cell:

  mode            "query_agnostic" | "question_aware" (docs/EVALUATION.md)
  technique       label, e.g. "full", "snapkv@0.75", "int4", "snapkv@0.5+kivi2"
  family          "full" | "press" | "quant" | "press+quant"
  press, ratio, quant   the parts (ratio = kvpress compression_ratio, fraction removed)
  task, metric, length, depth, n    what was measured and on how many samples
  score           mean metric (accuracy in [0, 1]); for perplexity: exp(mean NLL)
  kv_bytes        exact bytes of the cache per sequence (kvjax.memory.report(...).total / batch)
                  when the question is answered: the compressed context plus the room
                  for question and answer
  kv_factor       kvjax.memory's factor: a bf16 full cache of the same tokens / kv_bytes
  prefill_tok_s   context tokens / (prefill + compression) seconds
  decode_tok_s    batch / seconds of one single-token decode step, the median over the
                  timed steps; decode_tok_s_min / decode_tok_s_max / decode_repeats (when
                  present) give their spread and count; the table prints
                  "median (min-max)"

`write` appends nothing: it rewrites both files from the rows it is given. Its `run.json`
(when given `meta`) also records `environment()`: backend and device kind, device and
process counts, jax / jaxlib / flax versions, Python, platform and the git commit, so a
number always says which machine and code made it. `device_label()` is the short form the
printed tables carry in their header.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
from typing import Iterable, Mapping, Optional, Sequence

FIELDS = ("mode", "technique", "family", "press", "ratio", "quant", "task", "metric", "length",
          "depth", "n", "score", "kv_bytes", "kv_factor", "prefill_tok_s", "decode_tok_s",
          "model")


def _clean(v):
  if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
    return None
  if hasattr(v, "item"):
    return v.item()
  return v


def device_label() -> str:
  """Backend, device kind and count, e.g. "gpu NVIDIA H100 80GB HBM3 x8" or "cpu x1"."""
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  kind = str(getattr(dev, "device_kind", "") or "")
  name = jax.default_backend()
  if kind and kind.lower() != name.lower():
    name += " " + kind
  return f"{name} x{jax.device_count()}"


def _version(dist: str) -> Optional[str]:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return None


def git_commit(path: Optional[str] = None) -> Optional[str]:
  """The commit checked out at `path` (default: this repository), with "+dirty" when the
  tracked files differ from it; None when it is not a git checkout or git is missing."""
  import subprocess  # pylint: disable=import-outside-toplevel
  path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                         text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=path, capture_output=True, text=True, timeout=30,
                           check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return sha + ("+dirty" if dirty else "") if sha else None


def environment() -> dict:
  """What made a result: backend, devices, library versions, Python, platform, commit."""
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {
      "backend": jax.default_backend(), "device_kind": str(getattr(dev, "device_kind", "")),
      "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
      "process_count": jax.process_count(), "device": device_label(),
      "jax": jax.__version__, "jaxlib": _version("jaxlib"), "flax": _version("flax"),
      "python": sys.version.split()[0], "platform": platform.platform(),
      "git_commit": git_commit(),
  }


def write(rows: Sequence[Mapping], out_dir: str, meta: Optional[Mapping] = None) -> dict:
  """Writes results.jsonl + results.csv (+ run.json with `meta`); returns their paths.

  run.json holds `meta` (flags, model, timings, ...) plus `"environment": environment()`
  unless `meta` already has one.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {"jsonl": os.path.join(out_dir, "results.jsonl"),
           "csv": os.path.join(out_dir, "results.csv")}
  extra = sorted({k for r in rows for k in r} - set(FIELDS))
  with open(paths["jsonl"], "w") as f:
    for r in rows:
      f.write(json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=True) + "\n")
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(FIELDS) + extra, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if _clean(r.get(k)) is None else _clean(r.get(k)))
                  for k in list(FIELDS) + extra})
  if meta is not None:
    paths["run"] = os.path.join(out_dir, "run.json")
    meta = dict(meta)
    meta.setdefault("environment", environment())
    with open(paths["run"], "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True, default=str)
  return paths


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def is_perplexity(task: str) -> bool:
  """Perplexity tasks ("perplexity", "perplexity_en", ...) score lower-is-better NLL, not
  accuracy."""
  return task.startswith("perplexity")


def perplexity_task(scores: Mapping) -> Optional[str]:
  """The perplexity task among a summary's scores (None if there is none)."""
  return next((t for t in scores if is_perplexity(t)), None)


def _fmt_bytes(n) -> str:
  if n is None:
    return "-"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
    n /= 1024


def _fmt_rate(median, lo=None, hi=None) -> str:
  """Tokens/s with three significant digits where it is small: "5.12", "(4.80-5.31)"."""
  if median is None:
    return "-"

  def f(v):
    return f"{v:,.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")
  return f(median) + (f" ({f(lo)}-{f(hi)})" if lo is not None and hi is not None else "")


def summary(rows: Iterable[Mapping], length: Optional[int] = None) -> list[dict]:
  """One dict per technique: bytes/factor/throughput at `length`, a score per task.

  Needle rows (task "needle") are averaged over depths and lengths; other tasks are taken
  at `length` (default: the longest length present).
  """
  rows = list(rows)
  if length is None:
    length = max((r["length"] for r in rows if r["task"] != "needle"), default=None)
  order, out = [], {}
  for r in rows:
    t = r["technique"]
    if t not in out:
      order.append(t)
      out[t] = {"technique": t, "family": r["family"], "mode": r["mode"], "scores": {},
                "_needle": [], "kv_bytes": None, "kv_factor": None, "prefill_tok_s": None,
                "decode_tok_s": None, "decode_tok_s_min": None, "decode_tok_s_max": None}
    o = out[t]
    if r["task"] == "needle":
      o["_needle"].append((r["score"], r["n"]))
    elif r["length"] == length:
      o["scores"][r["task"]] = r["score"]
    if r["length"] == length and r.get("kv_bytes") is not None and o["kv_bytes"] is None:
      for k in ("kv_bytes", "kv_factor", "prefill_tok_s", "decode_tok_s", "decode_tok_s_min",
                "decode_tok_s_max"):
        o[k] = r.get(k)
  for o in out.values():
    nd = o.pop("_needle")
    if nd:
      o["scores"]["needle"] = sum(s * n for s, n in nd) / max(sum(n for _, n in nd), 1)
  return [out[t] for t in order]


def table(rows: Iterable[Mapping], length: Optional[int] = None, title: str = "") -> str:
  """The comparison as a fixed-width text table (one line per technique)."""
  rows = list(rows)
  if not rows:
    return "(no results)"
  if length is None:
    length = max((r["length"] for r in rows if r["task"] != "needle"), default=None)
  summ = summary(rows, length)
  tasks = []
  for s in summ:
    for t in s["scores"]:
      if t not in tasks:
        tasks.append(t)
  tasks.sort(key=lambda t: (is_perplexity(t), t == "needle", t))
  head = ["technique", "KV bytes/seq", "x vs bf16"] + \
      [(t.replace("perplexity", "ppl") if is_perplexity(t) else t) for t in tasks] + ["prefill tok/s", "decode tok/s (min-max)"]
  lines = []
  for s in summ:
    cells = [s["technique"], _fmt_bytes(s["kv_bytes"]),
             "-" if s["kv_factor"] is None else f"{s['kv_factor']:.2f}"]
    for t in tasks:
      v = s["scores"].get(t)
      cells.append("-" if v is None else (f"{v:.2f}" if is_perplexity(t) else f"{100 * v:.1f}"))
    v = s["prefill_tok_s"]
    cells.append("-" if v is None else f"{v:,.0f}")
    cells.append(_fmt_rate(s["decode_tok_s"], s["decode_tok_s_min"], s["decode_tok_s_max"]))
    lines.append(cells)
  widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
  fmt = lambda c: "  ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                            for i, (x, w) in enumerate(zip(c, widths)))
  mode = rows[0]["mode"]
  out = []
  if title:
    out.append(title)
  out.append(f"mode: {mode} | task scores: accuracy % at {length} tokens "
             f"(needle: mean over the depth x length grid); ppl: held-out perplexity")
  out += [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines]
  return "\n".join(out)


def _largest_passing_factor(summ: Sequence[Mapping], passes) -> dict:
  """{family: (largest kv_factor, its technique)} over the compressed rows of `summ` for
  which passes(row) holds; (None, None) for a family where none does."""
  best: dict = {}
  for s in summ:
    if s["technique"] == "full":
      continue
    fam = _family_key(s["technique"])
    best.setdefault(fam, (None, None))
    if s["kv_factor"] is not None and passes(s):
      if best[fam][0] is None or s["kv_factor"] > best[fam][0]:
        best[fam] = (s["kv_factor"], s["technique"])
  return best


def frontier_verdict(rows: Iterable[Mapping], tolerance: float = 0.01,
                     tasks: Optional[Sequence[str]] = None) -> dict:
  """Per family (press name, quant kind, combination): the largest compression factor whose
  mean accuracy over `tasks` (default: every accuracy task) is within `tolerance`
  (absolute) of the full cache's. Returns {family: (factor or None, technique or None)}.
  """
  summ = summary(rows)
  full = next((s for s in summ if s["technique"] == "full"), None)
  if full is None:
    return {}
  acc_tasks = [t for t in (tasks or full["scores"]) if not is_perplexity(t) and t in full["scores"]]
  if not acc_tasks:
    return {}
  ref = sum(full["scores"][t] for t in acc_tasks) / len(acc_tasks)

  def passes(s):
    return (all(t in s["scores"] for t in acc_tasks) and
            sum(s["scores"][t] for t in acc_tasks) / len(acc_tasks) >= ref - tolerance)
  return _largest_passing_factor(summ, passes)


def perplexity_verdict(rows: Iterable[Mapping], tolerance: float = 0.01) -> dict:
  """Per family: the largest compression factor whose held-out perplexity is within
  `tolerance` (relative) of the full cache's. {family: (factor or None, technique or None)}.
  """
  summ = summary(rows)
  full = next((s for s in summ if s["technique"] == "full"), None)
  task = perplexity_task(full["scores"]) if full is not None else None
  if task is None:
    return {}
  ref = full["scores"][task]
  return _largest_passing_factor(
      summ, lambda s: s["scores"].get(task) is not None and
      s["scores"][task] <= ref * (1 + tolerance))


def overall_verdict(rows: Iterable[Mapping], acc_tolerance: float = 0.01,
                    ppl_tolerance: float = 0.01) -> Optional[dict]:
  """The largest compression whose mean accuracy is within `acc_tolerance` (absolute) of the
  full cache's AND whose perplexity (when the run scored one) is within `ppl_tolerance`
  (relative) of it, over every technique. None without a full-cache row.

  Returns {"factor", "technique", "accuracy", "perplexity", "full_accuracy",
  "full_perplexity"}; factor/technique are None when no technique qualifies.
  """
  summ = summary(rows)
  full = next((s for s in summ if s["technique"] == "full"), None)
  if full is None:
    return None
  acc_tasks = [t for t in full["scores"] if not is_perplexity(t)]
  ppl_task = perplexity_task(full["scores"])

  def acc(s):
    if not acc_tasks or any(t not in s["scores"] for t in acc_tasks):
      return None
    return sum(s["scores"][t] for t in acc_tasks) / len(acc_tasks)

  ref_acc, ref_ppl = acc(full), full["scores"].get(ppl_task) if ppl_task else None
  out = {"factor": None, "technique": None, "accuracy": None, "perplexity": None,
         "full_accuracy": ref_acc, "full_perplexity": ref_ppl}
  for s in summ:
    if s["technique"] == "full" or s["kv_factor"] is None:
      continue
    a, p = acc(s), s["scores"].get(ppl_task) if ppl_task else None
    if ref_acc is not None and (a is None or a < ref_acc - acc_tolerance):
      continue
    if ref_ppl is not None and (p is None or p > ref_ppl * (1 + ppl_tolerance)):
      continue
    if out["factor"] is None or s["kv_factor"] > out["factor"]:
      out.update(factor=s["kv_factor"], technique=s["technique"], accuracy=a, perplexity=p)
  return out


def _family_key(technique: str) -> str:
  """"snapkv@0.5" -> "snapkv"; "snapkv@0.5+int8" -> "snapkv+int8"; "int4" -> "int4"."""
  if "+" in technique:
    return technique.split("@")[0] + "+" + technique.split("+")[-1]
  return technique.split("@")[0]


def full_accuracy(rows: Iterable[Mapping]) -> Optional[float]:
  """Mean accuracy of the full cache over the accuracy tasks (None without a full row)."""
  full = next((s for s in summary(rows) if s["technique"] == "full"), None)
  if full is None:
    return None
  accs = [v for t, v in full["scores"].items() if not is_perplexity(t)]
  return sum(accs) / len(accs) if accs else None
