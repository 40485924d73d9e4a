"""Evaluation tasks: synthetic retrieval, a RULER-style suite, perplexity, JSONL loaders.

    from experiments import tasks
    suite = tasks.build(["passkey", "kv_retrieval", "niah_single"])   # name -> Task
    samples = suite["passkey"].samples(length=2048, n=16)
    tasks.metrics.score("prefix_match", "12345", ["12345"])           # 1.0

Names: passkey, kv_retrieval, perplexity (stdlib source, byte models), perplexity_en
(English prose, subword models), the RULER-style tasks (niah_single,
niah_multikey, niah_multivalue, vt, cwe, qa, or "ruler" for all six), and "needle" (the
depth x length grid, built by `synthetic.needle_grid`). User files:
"longbench:<path>", "infinitebench:<path>", "ruler_jsonl:<path>" (a .jsonl file or a
directory of them; see `loaders`; LongBench files use LongBench's own prompts, see
`longbench`).
"""

from __future__ import annotations

from experiments.tasks import base, loaders, longbench, metrics, perplexity, ruler, synthetic
from experiments.tasks.base import Sample, Task

SYNTHETIC = {"passkey": synthetic.Passkey, "kv_retrieval": synthetic.KVRetrieval,
             "perplexity": perplexity.HeldOutPerplexity,
             "perplexity_en": perplexity.EnglishPerplexity}
FILE_FORMATS = {"longbench": "longbench", "infinitebench": "infinitebench",
                "ruler_jsonl": "ruler"}
KNOWN = sorted(SYNTHETIC) + sorted(ruler.RULER_TASKS) + ["ruler", "needle"] + \
    [f"{k}:<path>" for k in FILE_FORMATS]


def make(name: str) -> Task:
  """A generated task by name (not "needle" or file tasks; see module docstring)."""
  if name in SYNTHETIC:
    return SYNTHETIC[name]()
  if name in ruler.RULER_TASKS:
    return ruler.make(name)
  raise ValueError(f"unknown task {name!r}; known: {KNOWN}")


def expand(names) -> list[str]:
  """Task names with "ruler" expanded to its six tasks; unknown names raise."""
  out = []
  for n in names:
    if n == "ruler":
      out += sorted(ruler.RULER_TASKS)
    elif n in SYNTHETIC or n in ruler.RULER_TASKS or n == "needle":
      out.append(n)
    elif n.split(":", 1)[0] in FILE_FORMATS and ":" in n:
      out.append(n)
    else:
      raise ValueError(f"unknown task {n!r}; known: {KNOWN}")
  return out


def load_file_task(spec: str, max_context_tokens=None, limit=None) -> loaders.LoadResult:
  """Samples of "longbench:<path>" / "infinitebench:<path>" / "ruler_jsonl:<path>"."""
  kind, path = spec.split(":", 1)
  return loaders.load(path, FILE_FORMATS[kind], max_context_tokens=max_context_tokens,
                      limit=limit)


__all__ = ["Sample", "Task", "base", "loaders", "longbench", "metrics", "perplexity", "ruler",
           "synthetic", "make", "expand", "load_file_task", "KNOWN"]
