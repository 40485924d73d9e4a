"""PNG plots of a comparison (matplotlib), sized and labelled for a paper.

  frontier(rows, path)    memory-accuracy frontier: mean accuracy vs KV bytes per sequence
                          (and memory-perplexity beside it when the run scored perplexity)
  needle_heatmaps(rows, path)   one depth x length heatmap per technique (accuracy %)
  throughput(rows, path)  decode tokens/s vs context length, one line per technique

Every technique keeps one colour and every technique family ("full", "press", "quant",
"press+quant") one marker across the plots (`technique_styles`); techniques are named in a
legend outside the data, never by annotations that overlap. Accuracy carries a 95% Wilson
score interval ("Probable Inference, the Law of Succession, and Statistical Inference",
Wilson, 1927) over the samples behind it, since a comparison often scores a handful per
cell; decode speed carries the min-max over repeated timings when the rows record them.
Byte axes read in plain KiB/MiB/GiB numbers.

Every plot is saved as a PNG. With `show=True` it is also shown where a figure can be shown
(a notebook's inline backend, a desktop window); launchers and scripts run on the Agg
backend (set here unless an IPython kernel chose a backend) and never open windows.

Re-plot a finished run without re-running it:

    python -m experiments.plots --results=compare_results/results.jsonl
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Iterable, Mapping, Optional, Sequence

from absl import app, flags

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
  fig.savefig(path, dpi=150, bbox_inches="tight")
  if show and can_show():
    plt.show()
  plt.close(fig)
  return path


def _suptitle(fig, title: str, width_in: float):
  """A figure title wrapped to the figure's width (about 13 characters per inch at 9 pt)."""
  if title:
    width = max(40, int(13 * width_in))
    fig.suptitle("\n".join(textwrap.fill(l, width) for l in title.splitlines()), fontsize=9)


FAMILY_MARKERS = {"full": "*", "press": "o", "quant": "s", "press+quant": "^"}


def technique_styles(rows: Iterable[Mapping]) -> dict:
  """{technique: {"color", "marker", "family"}}: one colour per technique (in order of first
  appearance; tab10, or tab20 beyond ten), one marker per family (FAMILY_MARKERS)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  fams: dict = {}
  for r in rows:
    fams.setdefault(r["technique"], r.get("family", "press"))
  cmap = matplotlib.colormaps["tab10" if len(fams) <= 10 else "tab20"]
  return {t: {"color": cmap(i % cmap.N), "marker": FAMILY_MARKERS.get(f, "o"), "family": f}
          for i, (t, f) in enumerate(fams.items())}


def wilson_interval(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
  """(low, high) Wilson score interval of a proportion p measured on n samples (z=1.96:
  95%). Unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"p={p!r}; must be in [0, 1]")
  if n <= 0:
    raise ValueError(f"n={n!r}; must be > 0")
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, centre - half), min(1.0, centre + half)


_UNITS = (("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30))


def byte_unit(values: Sequence[float]) -> tuple[str, int]:
  """The largest binary unit in which the smallest value is still >= 1 ("MiB", 2**20)."""
  lo = min(v for v in values if v > 0)
  name, scale = _UNITS[0]
  for n, s in _UNITS:
    if lo >= s:
      name, scale = n, s
  return name, scale


def _plain_log_axis(axis, base: int = 10):
  """Log-scale ticks labelled as plain numbers (1, 2, 5, 10, 20, ...; not 2x10^1)."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  subs = (1.0, 2.0, 5.0) if base == 10 else (1.0,)
  axis.set_major_locator(ticker.LogLocator(base=base, subs=subs))
  axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.10g}"))
  axis.set_minor_formatter(ticker.NullFormatter())


def _spread(xs: list) -> list:
  """x values with points that share an x spread sideways by 3% per neighbour (a log axis),
  so every marker and error bar stays visible; the spread is symmetric around the true x."""
  groups: dict = {}
  for i, x in enumerate(xs):
    groups.setdefault(round(x, 9), []).append(i)
  out = list(xs)
  for idx in groups.values():
    for j, i in enumerate(idx):
      out[i] = xs[i] * 1.03 ** (j - (len(idx) - 1) / 2)
  return out


def _accuracy_samples(rows: list, technique: str, length) -> float:
  """Samples behind a technique's mean accuracy in `results.summary`: the accuracy tasks at
  `length` plus every needle cell."""
  return float(sum(r.get("n") or 0 for r in rows if r["technique"] == technique
                   and not results_lib.is_perplexity(r["task"])
                   and (r["task"] == "needle" or r["length"] == length)))


def _legend_outside(fig, styles: Mapping, techniques: Sequence[str]):
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
  handles = [Line2D([], [], ls="", marker=styles[t]["marker"], color=styles[t]["color"],
                    markeredgecolor="k", markeredgewidth=0.4,
                    ms=10 if styles[t]["family"] == "full" else 7, label=t)
             for t in techniques]
  fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="technique",
             title_fontsize=8, frameon=False)


def frontier(rows: Iterable[Mapping], path: str, title: str = "",
             show: bool = False) -> Optional[str]:
  """Mean accuracy over the accuracy tasks vs KV bytes per sequence; None if no data.

  Points are `results.summary` at the longest length (needle: every cell). Error bars:
  95% Wilson intervals over the samples behind each mean. The perplexity panel has no
  error bars (rows hold one pooled perplexity, not per-sample losses).
  """
  rows = list(rows)
  summ = results_lib.summary(rows)
  length = max((r["length"] for r in rows if r["task"] != "needle"), default=None)
  pts = []
  for s in summ:
    accs = [v for t, v in s["scores"].items() if not results_lib.is_perplexity(t)]
    if accs and s["kv_bytes"]:
      pts.append((s["kv_bytes"], sum(accs) / len(accs), s["technique"],
                  _accuracy_samples(rows, s["technique"], length)))
  if not pts:
    return None
  plt = _plt()
  styles = technique_styles(rows)
  ppl = {s["technique"]: s["scores"][results_lib.perplexity_task(s["scores"])] for s in summ
         if results_lib.perplexity_task(s["scores"]) and s["kv_bytes"]}
  width = 13.0 if ppl else 8.5
  fig, axes = plt.subplots(1, 2 if ppl else 1, figsize=(width, 4.6), squeeze=False,
                           layout="constrained")
  unit, scale = byte_unit([p[0] for p in pts])
  xlabel = f"KV cache per sequence ({unit}, exact nbytes, log scale)"

  ax = axes[0][0]
  xs = _spread([b / scale for b, *_ in pts])
  for x, (_, a, t, n) in zip(xs, pts):
    st = styles[t]
    err = None
    if n > 0:
      lo, hi = wilson_interval(min(max(a, 0.0), 1.0), n)
      err = [[100 * (a - lo)], [100 * (hi - a)]]
    ax.errorbar(x, 100 * a, yerr=err, fmt=st["marker"], color=st["color"],
                ms=11 if st["family"] == "full" else 7, mec="k", mew=0.4, ecolor=st["color"],
                elinewidth=1, capsize=2, alpha=0.95, zorder=3)
  full = [p for p in pts if p[2] == "full"]
  if full:
    ax.axhline(100 * full[0][1], color="grey", ls="--", lw=0.8, label="full cache")
    ax.axhline(100 * full[0][1] - 1, color="grey", ls=":", lw=0.8, label="full - 1 point")
  best, front = -1.0, []
  for b, a, _, _ in sorted(pts):    # most accuracy for at most this many bytes
    if a > best:
      front.append((b / scale, 100 * a))
      best = a
  ax.plot(*zip(*front), color="k", lw=1, alpha=0.4, label="Pareto frontier", zorder=2)
  ax.set_xscale("log")
  _plain_log_axis(ax.xaxis)
  ax.set_ylim(-3, 103)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("mean accuracy (%), 95% Wilson interval")
  ax.set_title(f"accuracy vs memory at {length} tokens" if length else "accuracy vs memory",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  if ppl:
    bx = axes[0][1]
    pp = [(b, t) for b, _, t, _ in pts if t in ppl]
    xs = _spread([b / scale for b, _ in pp])
    for x, (_, t) in zip(xs, pp):
      st = styles[t]
      bx.plot(x, ppl[t], st["marker"], color=st["color"], mec="k", mew=0.4,
              ms=11 if st["family"] == "full" else 7, zorder=3)
    if "full" in ppl:
      bx.axhline(ppl["full"], color="grey", ls="--", lw=0.8, label="full cache")
      bx.axhline(ppl["full"] * 1.01, color="grey", ls=":", lw=0.8, label="full + 1%")
    bx.set_xscale("log")
    _plain_log_axis(bx.xaxis)
    bx.set_xlabel(xlabel)
    bx.set_ylabel("held-out perplexity (lower is better)")
    bx.set_title("perplexity vs memory", fontsize=10)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7, loc="best")
  _legend_outside(fig, styles, [p[2] for p in pts])
  _suptitle(fig, title, width)
  return _finish(plt, fig, path, show)


def needle_heatmaps(rows: Iterable[Mapping], path: str, title: str = "",
                    show: bool = False) -> Optional[str]:
  """Depth x length accuracy heatmaps, one panel per technique; None without needle rows.

  Each cell is written out as a percentage; the samples per cell are in the title.
  """
  rows = [r for r in rows if r["task"] == "needle"]
  if not rows:
    return None
  techs = list(dict.fromkeys(r["technique"] for r in rows))
  depths = sorted({r["depth"] for r in rows})
  lengths = sorted({r["length"] for r in rows})
  ns = sorted({r.get("n") for r in rows if r.get("n")})
  plt = _plt()
  cols = min(5, len(techs))
  nrows = math.ceil(len(techs) / cols)
  width = 2.5 * cols + 1.2
  fig, axes = plt.subplots(nrows, cols, figsize=(width, 2.3 * nrows + 0.8), squeeze=False,
                           sharex=True, sharey=True, layout="constrained")
  im = None
  for i, t in enumerate(techs):
    ax = axes[i // cols][i % cols]
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for r in rows:
      if r["technique"] == t:
        grid[depths.index(r["depth"])][lengths.index(r["length"])] = 100 * r["score"]
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
    for di, row in enumerate(grid):
      for li, v in enumerate(row):
        if not math.isnan(v):
          ax.text(li, di, f"{v:.0f}", ha="center", va="center", fontsize=7,
                  color="white" if v < 20 or v > 80 else "black")
    ax.set_title(t, fontsize=8, pad=4)
    ax.set_xticks(range(len(lengths)), [str(l) for l in lengths], fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
    ax.tick_params(labelleft=i % cols == 0, labelbottom=True, length=2)
    if i % cols == 0:
      ax.set_ylabel("needle depth", fontsize=8)
    if i // cols == nrows - 1 or i + cols >= len(techs):
      ax.set_xlabel("context tokens", fontsize=8)
  for j in range(len(techs), nrows * cols):
    axes[j // cols][j % cols].axis("off")
  per_cell = f"n = {ns[0]} per cell" if len(ns) == 1 else (
      f"n = {ns[0]}-{ns[-1]} per cell" if ns else "")
  head = f"needle in a haystack: accuracy % by depth and length ({per_cell})"
  _suptitle(fig, f"{title}\n{head}" if title else head, width)
  if im is not None:
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy %")
  return _finish(plt, fig, path, show)


def throughput(rows: Iterable[Mapping], path: str, title: str = "",
               show: bool = False) -> Optional[str]:
  """Decode tokens/s vs context length per technique; None without decode timings.

  Rows with `decode_tok_s_min` / `decode_tok_s_max` (repeated timings) get min-max bars
  around the median `decode_tok_s`.
  """
  rows = list(rows)
  pts: dict = {}
  for r in rows:
    if r.get("decode_tok_s"):
      pts.setdefault(r["technique"], {})[r["length"]] = (
          r["decode_tok_s"], r.get("decode_tok_s_min"), r.get("decode_tok_s_max"))
  if not pts:
    return None
  plt = _plt()
  styles = technique_styles(rows)
  fig, ax = plt.subplots(figsize=(8.5, 4.6), layout="constrained")
  lengths = sorted({x for d in pts.values() for x in d})
  for t, d in pts.items():
    xs = sorted(d)
    ys = [d[x][0] for x in xs]
    err = None
    if all(d[x][1] is not None and d[x][2] is not None for x in xs):
      err = [[y - d[x][1] for x, y in zip(xs, ys)], [d[x][2] - y for x, y in zip(xs, ys)]]
    st = styles[t]
    ax.errorbar(xs, ys, yerr=err, marker=st["marker"], color=st["color"], lw=1.2,
                ms=9 if st["family"] == "full" else 6, mec="k", mew=0.4, capsize=2,
                label=t)
  ax.set_xscale("log", base=2)
  ax.set_xticks(lengths, [str(l) for l in lengths])
  ax.xaxis.set_minor_formatter(plt.NullFormatter())
  ax.set_xlabel("context tokens (log scale)")
  ax.set_ylabel("decode tokens / s (batch x steps / s)")
  head = "decode throughput vs context" + (
      " (median, min-max over repeats)" if any(
          v[1] is not None for d in pts.values() for v in d.values()) else "")
  # the run's title goes over the axes, not the figure, so it never meets the legend
  ax.set_title("\n".join(textwrap.fill(l, 80) for l in (title, head) if l), fontsize=9)
  ys = [v[0] for d in pts.values() for v in d.values()]
  if max(ys) > 10 * min(ys):   # a wide range: a log axis keeps the slow lines apart
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    ax.set_ylabel("decode tokens / s (batch x steps / s, log scale)")
  else:
    ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  fig.legend(loc="outside right upper", fontsize=8, title="technique", title_fontsize=8,
             frameon=False)
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


def run_title(run: Mapping) -> str:
  """The title `experiments.compare` gave its plots: run.json's "title", else rebuilt from
  its model, parameter count, devices and mode."""
  if run.get("title"):
    return str(run["title"])
  fl = run.get("flags", {})
  params = f" ({run['params']:,} params)" if isinstance(run.get("params"), int) else ""
  parts = [f"kvjax compare: {run.get('model', fl.get('model', '?'))}{params}",
           str(run.get("devices", run.get("environment", {}).get("device", "")))]
  if fl.get("mode"):
    parts.append(f"mode={fl['mode']}")
  return ", ".join(p for p in parts if p)


FLAGS = flags.FLAGS   # rebound by define_flags


def define_flags(fv=flags.FLAGS):
  """Defines the re-plotting flags on `fv` (absl's global FlagValues when run as a program,
  a private one in tests) and makes them the ones `main` reads."""
  global FLAGS  # pylint: disable=global-statement
  FLAGS = fv
  flags.DEFINE_string("results", None, "results.jsonl of a finished comparison.",
                      flag_values=fv)
  flags.DEFINE_string("out_dir", None, "Where the PNGs go (default: beside --results).",
                      flag_values=fv)
  flags.DEFINE_string("title", None, "Plot title (default: from the run.json beside "
                      "--results).", flag_values=fv)
  return fv


def replot(path: str, out_dir: Optional[str] = None, title: Optional[str] = None) -> dict:
  """Every plot of a finished run's results.jsonl at `path`, into `out_dir` (default beside
  it), titled `title` (default: from the run.json beside it). {plot name: path}."""
  if not path or not os.path.isfile(path):
    raise ValueError(f"results={path!r}: must name a results.jsonl file")
  here = os.path.dirname(os.path.abspath(path))
  if title is None and os.path.isfile(os.path.join(here, "run.json")):
    with open(os.path.join(here, "run.json")) as f:
      title = run_title(json.load(f))
  return all_plots(results_lib.read_jsonl(path), out_dir or here, title or "")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    got = replot(FLAGS.results, FLAGS.out_dir, FLAGS.title)
  except ValueError as e:
    raise app.UsageError(f"--{e}") from None
  for name, p in sorted(got.items()):
    print(f"{name}: {p}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
