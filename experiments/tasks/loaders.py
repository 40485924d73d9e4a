"""Loaders for LongBench, InfiniteBench and RULER JSONL files that users bring.

No file is downloaded: pass the path of a `.jsonl` file (or a directory of them). Each
line is one JSON object; a line that is not valid JSON, or lacks the fields the format
needs, is reported with its line number (`LoadResult.errors`, and a warning in the log)
and skipped, and the rest of the file is used.

Formats (field names as the benchmarks publish them):

  LongBench (Bai et al., 2023, arXiv 2308.14508)  {"input", "context", "answers": [...],
      "dataset", "all_classes", "length", "_id"}. The dataset name (the record's "dataset",
      else the file name; LongBench-E's "<name>_e" too) picks LongBench's own prompt
      template, max generation length and metric (`experiments.tasks.longbench`); the
      template is split at its context, so the instruction and the context are compressed
      and the question comes after them. A dataset LongBench does not name gets the prompt
      "<context>\\n\\nQuestion: <input>\\nAnswer:", qa_f1 and 32 new tokens.
  InfiniteBench (Zhang et al., 2024)  {"id", "context", "input", "answer": str | [...],
      "options": [...]}. The task is the file name (passkey.jsonl, kv_retrieval.jsonl,
      longbook_qa_eng.jsonl, ...) or `task=`; metric per task (exact digits for passkey /
      number_string, substring for kv_retrieval, qa_f1 for QA, choice for multiple choice,
      rouge_l for summaries).
  RULER (Hsieh et al., 2024)  {"index", "input", "outputs": [...], "length",
      "answer_prefix"?}, as RULER's prepare.py writes them. `input` holds the whole
      prompt; its last line (the query) plus `answer_prefix` becomes the question and the
      rest the context. Metric: string_match_part for qa tasks, else string_match_all.

Contexts longer than `max_context_tokens` (byte tokens, BOS included) are truncated in
the middle, as LongBench does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

from absl import logging

from experiments.tasks import base, longbench

FORMATS = ("longbench", "infinitebench", "ruler")

INFINITEBENCH_METRICS = {
    "passkey": "prefix_match", "number_string": "prefix_match", "kv_retrieval": "substring",
    "longbook_qa_eng": "qa_f1", "longbook_qa_chn": "qa_f1", "longdialogue_qa_eng": "substring",
    "longbook_choice_eng": "choice", "code_debug": "choice", "math_find": "exact_match",
    "math_calc": "exact_match", "code_run": "exact_match", "longbook_sum_eng": "rouge_l",
}


@dataclasses.dataclass
class LoadResult:
  samples: list
  errors: list            # [(line number, message)]
  path: str

  def __len__(self):
    return len(self.samples)


def truncate_middle(text: str, max_bytes: Optional[int]) -> str:
  """Keeps the first and last max_bytes / 2 bytes (LongBench's truncation)."""
  raw = text.encode("utf-8")
  if max_bytes is None or len(raw) <= max_bytes:
    return text
  half = max_bytes // 2
  return (raw[:half] + raw[len(raw) - (max_bytes - half):]).decode("utf-8", errors="ignore")


def _as_list(x) -> list:
  if x is None:
    return []
  return [str(a) for a in x] if isinstance(x, (list, tuple)) else [str(x)]


def _need(rec: dict, *fields):
  missing = [f for f in fields if f not in rec]
  if missing:
    raise ValueError(f"missing field(s) {missing}; has {sorted(rec)}")


def _budget(max_context_tokens, question: str) -> Optional[int]:
  if max_context_tokens is None:
    return None
  room = max_context_tokens - 1 - base.byte_len(question)
  if room < 1:
    raise ValueError(f"max_context_tokens={max_context_tokens} leaves no room for the "
                     f"context (question is {base.byte_len(question)} bytes)")
  return room


def _longbench(rec, lineno, task, max_ctx):
  _need(rec, "input", "context", "answers")
  ds = rec.get("dataset") or task or "longbench"
  ctx, q, run = longbench.prompt_parts(ds, str(rec["context"]), str(rec["input"]))
  ctx = truncate_middle(ctx, _budget(max_ctx, q))
  answers = _as_list(rec["answers"])
  if not answers:
    raise ValueError("answers is empty")
  meta = {"line": lineno, "id": rec.get("_id"), "dataset": ds, "template": run["template"]}
  meta.update({k: run[k] for k in ("chat_form", "first_line") if k in run})
  if rec.get("all_classes"):
    meta["all_classes"] = list(rec["all_classes"])
  return base.Sample(f"longbench/{ds}", ctx, q, tuple(answers), run["metric"],
                     run["max_new_tokens"], meta)


def _infinitebench(rec, lineno, task, max_ctx):
  _need(rec, "context", "input", "answer")
  task = task or "infinitebench"
  metric = INFINITEBENCH_METRICS.get(task, "substring")
  q = str(rec["input"])
  opts = rec.get("options") or []
  if opts:
    q += "\n" + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(opts[:4]))
  q = f"\n\n{q}\nAnswer:"
  ctx = truncate_middle(str(rec["context"]), _budget(max_ctx, q))
  answers = _as_list(rec["answer"])
  if not answers:
    raise ValueError("answer is empty")
  meta = {"line": lineno, "id": rec.get("id")}
  if opts:
    meta["options"] = [str(o) for o in opts]
  longest = max(base.byte_len(a) for a in answers)
  return base.Sample(f"infinitebench/{task}", ctx, q, tuple(answers), metric,
                     min(max(longest + 4, 8), 128), meta)


def _ruler(rec, lineno, task, max_ctx):
  _need(rec, "input", "outputs")
  text = str(rec["input"])
  cut = text.rstrip("\n").rfind("\n")
  ctx, q = (text[:cut], text[cut:]) if cut > 0 else ("", text)
  q = q + str(rec.get("answer_prefix", ""))
  ctx = truncate_middle(ctx, _budget(max_ctx, q))
  answers = _as_list(rec["outputs"])
  if not answers:
    raise ValueError("outputs is empty")
  task = task or "ruler"
  metric = "string_match_part" if "qa" in task else "string_match_all"
  longest = sum(base.byte_len(a) + 2 for a in answers)
  return base.Sample(f"ruler/{task}", ctx, q, tuple(answers), metric, min(longest + 4, 128),
                     {"line": lineno, "index": rec.get("index"), "length": rec.get("length")})


_PARSERS: dict[str, Callable] = {"longbench": _longbench, "infinitebench": _infinitebench,
                                 "ruler": _ruler}


def load_jsonl(path: str, fmt: str, *, task: Optional[str] = None,
               max_context_tokens: Optional[int] = None, limit: Optional[int] = None
               ) -> LoadResult:
  """Samples of one JSONL file (see the module docstring for the formats).

  Args:
    path: the .jsonl file.
    fmt: "longbench" | "infinitebench" | "ruler".
    task: task/dataset name (default: the file name without .jsonl).
    max_context_tokens: truncate contexts in the middle so BOS + context + question fit.
    limit: keep at most this many samples.
  """
  if fmt not in _PARSERS:
    raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
  if not os.path.isfile(path):
    raise ValueError(f"{fmt} file {path!r} does not exist")
  task = task or os.path.splitext(os.path.basename(path))[0]
  samples, errors = [], []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{fmt} file {path!r}, line {lineno}: not UTF-8 text (byte "
                         f"{e.start} of the line is 0x{raw[e.start]:02x}); a {fmt} task "
                         "file is UTF-8 JSON lines, is this the right file?") from e
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        if not isinstance(rec, dict):
          raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        samples.append(_PARSERS[fmt](rec, lineno, task, max_context_tokens))
      except (ValueError, TypeError) as e:   # json.JSONDecodeError is a ValueError
        msg = f"{path}:{lineno}: skipped malformed line: {e}"
        errors.append((lineno, str(e)))
        logging.warning(msg)
      if limit is not None and len(samples) >= limit:
        break
  return LoadResult(samples, errors, path)


def load(path: str, fmt: str, **kw) -> LoadResult:
  """A .jsonl file, or every .jsonl file of a directory (sorted), merged."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".jsonl"))
    if not files:
      raise ValueError(f"directory {path!r} holds no .jsonl files")
    out = LoadResult([], [], path)
    for p in files:
      r = load_jsonl(p, fmt, **kw)
      out.samples += r.samples
      out.errors += [(f"{os.path.basename(p)}:{ln}", m) for ln, m in r.errors]
    return out
  return load_jsonl(path, fmt, **kw)
