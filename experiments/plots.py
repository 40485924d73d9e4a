"""PNG plots of a comparison (matplotlib).

  frontier(rows, path)    memory-accuracy frontier: mean accuracy vs KV bytes per sequence,
                          one marker per technique, one colour per family, the full cache
                          as a reference line
  needle_heatmaps(rows, path)   one depth x length heatmap per technique (accuracy %)
  throughput(rows, path)  decode tokens/s vs context length, one line per technique

Every plot is saved as a PNG. With `show=True` it is also shown where a figure can be shown
(a notebook's inline backend, a desktop window); launchers and scripts run on the Agg
backend (set here unless an IPython kernel chose a backend) and never open windows.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Mapping, Optional

from experiments import results as results_lib


def _plt():
  import sys  # pylint: disable=import-outside-toplevel
  import matplotlib  # pylint: disable=import-outside-toplevel
  if "ipykernel" not in sys.modules:   # a notebook keeps its inline backend
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def can_show() -> bool:
  """Whether plt.show() displays anything (not on Agg and other file-only backends)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  backend = matplotlib.get_backend().lower()
  return backend not in ("agg", "pdf", "ps", "svg", "cairo", "pgf", "template")


def _finish(plt, fig, path: str, show: bool) -> str:
  fig.savefig(path, dpi=110)
  if show and can_show():
    plt.show()
  plt.close(fig)
  return path


FAMILY_MARKERS = {"full": "*", "press": "o", "quant": "s", "press+quant": "^"}


def frontier(rows: Iterable[Mapping], path: str, title: str = "",
             show: bool = False) -> Optional[str]:
  """Mean accuracy over the accuracy tasks vs KV bytes per sequence; None if no data."""
  summ = results_lib.summary(list(rows))
  pts = []
  for s in summ:
    accs = [v for t, v in s["scores"].items() if not results_lib.is_perplexity(t)]
    if accs and s["kv_bytes"]:
      pts.append((s["kv_bytes"], 100 * sum(accs) / len(accs), s["technique"], s["family"]))
  if not pts:
    return None
  plt = _plt()
  ppl = {s["technique"]: s["scores"][results_lib.perplexity_task(s["scores"])] for s in summ
         if results_lib.perplexity_task(s["scores"]) and s["kv_bytes"]}
  fig, axes = plt.subplots(1, 2 if ppl else 1, figsize=(14 if ppl else 8, 5), squeeze=False)
  ax = axes[0][0]
  names = sorted({p[2].split("@")[0].split("+")[0] if p[3] != "quant" else p[2] for p in pts})
  cmap = plt.get_cmap("tab20")
  colour = {n: cmap(i % 20) for i, n in enumerate(names)}
  for b, a, t, fam in pts:
    key = t.split("@")[0].split("+")[0] if fam != "quant" else t
    ax.scatter(b / 1024, a, marker=FAMILY_MARKERS.get(fam, "o"), color=colour[key],
               s=90 if fam == "full" else 45, edgecolor="k", linewidth=0.4, zorder=3)
    ax.annotate(t, (b / 1024, a), fontsize=6, xytext=(3, 2), textcoords="offset points")
  full = [p for p in pts if p[2] == "full"]
  if full:
    ax.axhline(full[0][1], color="grey", ls="--", lw=0.8, label="full cache")
    ax.axhline(full[0][1] - 1, color="grey", ls=":", lw=0.8, label="full - 1 point")
  # Pareto frontier: most accuracy for at most this many bytes.
  best, front = -1.0, []
  for b, a, t, _ in sorted(pts):
    if a > best:
      front.append((b / 1024, a))
      best = a
  ax.plot(*zip(*front), color="k", lw=1, alpha=0.5, label="Pareto frontier")
  ax.set_xscale("log")
  ax.set_ylim(-3, 103)
  ax.set_xlabel("KV cache KiB per sequence (exact nbytes, log scale)")
  ax.set_ylabel("mean accuracy (%)")
  ax.set_title("memory-accuracy frontier")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  if ppl:
    bx = axes[0][1]
    for b, _, t, fam in pts:
      if t in ppl:
        key = t.split("@")[0].split("+")[0] if fam != "quant" else t
        bx.scatter(b / 1024, ppl[t], marker=FAMILY_MARKERS.get(fam, "o"), color=colour[key],
                   s=90 if fam == "full" else 45, edgecolor="k", linewidth=0.4, zorder=3)
        bx.annotate(t, (b / 1024, ppl[t]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    if "full" in ppl:
      bx.axhline(ppl["full"], color="grey", ls="--", lw=0.8, label="full cache")
      bx.axhline(ppl["full"] * 1.01, color="grey", ls=":", lw=0.8, label="full + 1%")
    bx.set_xscale("log")
    bx.set_xlabel("KV cache KiB per sequence (exact nbytes, log scale)")
    bx.set_ylabel("held-out perplexity (lower is better)")
    bx.set_title("memory-perplexity frontier")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return _finish(plt, fig, path, show)


def needle_heatmaps(rows: Iterable[Mapping], path: str, title: str = "",
                    show: bool = False) -> Optional[str]:
  """Depth x length accuracy heatmaps, one panel per technique; None without needle rows."""
  rows = [r for r in rows if r["task"] == "needle"]
  if not rows:
    return None
  techs = list(dict.fromkeys(r["technique"] for r in rows))
  depths = sorted({r["depth"] for r in rows})
  lengths = sorted({r["length"] for r in rows})
  plt = _plt()
  cols = min(6, len(techs))
  nrows = math.ceil(len(techs) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(2.3 * cols, 2.1 * nrows + 0.6), squeeze=False)
  im = None
  for i, t in enumerate(techs):
    ax = axes[i // cols][i % cols]
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for r in rows:
      if r["technique"] == t:
        grid[depths.index(r["depth"])][lengths.index(r["length"])] = 100 * r["score"]
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_title(t, fontsize=7)
    ax.set_xticks(range(len(lengths)), [str(l) for l in lengths], fontsize=6)
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=6)
    if i % cols == 0:
      ax.set_ylabel("needle depth", fontsize=7)
    if i // cols == nrows - 1:
      ax.set_xlabel("context tokens", fontsize=7)
  for j in range(len(techs), nrows * cols):
    axes[j // cols][j % cols].axis("off")
  fig.suptitle(title or "needle in a haystack: accuracy % (depth x length)", fontsize=9)
  if im is not None:
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy %")
  return _finish(plt, fig, path, show)


def throughput(rows: Iterable[Mapping], path: str, title: str = "",
               show: bool = False) -> Optional[str]:
  """Decode tokens/s vs context length per technique; None without decode timings."""
  pts: dict = {}
  for r in rows:
    if r.get("decode_tok_s"):
      pts.setdefault(r["technique"], {})[r["length"]] = r["decode_tok_s"]
  if not pts:
    return None
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for t, d in pts.items():
    xs = sorted(d)
    ax.plot(xs, [d[x] for x in xs], marker="o", lw=1, ms=3, label=t)
  ax.set_xlabel("context tokens")
  ax.set_ylabel("decode tokens / s (batch x steps / s)")
  ax.set_xscale("log", base=2)
  ax.set_title(title or "decode throughput vs context")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  return _finish(plt, fig, path, show)


def all_plots(rows, out_dir: str, title: str = "", show: bool = False) -> dict:
  """Every plot that has data, as PNGs in `out_dir` (and shown with `show`); {name: path}."""
  os.makedirs(out_dir, exist_ok=True)
  rows = list(rows)
  got = {"frontier": frontier(rows, os.path.join(out_dir, "frontier.png"), title, show),
         "needle": needle_heatmaps(rows, os.path.join(out_dir, "needle_heatmap.png"), title,
                                   show),
         "throughput": throughput(rows, os.path.join(out_dir, "throughput.png"), title,
                                  show)}
  return {k: v for k, v in got.items() if v}
