"""Paper-ready plots: intervals, units, styles, legends instead of annotations, re-plotting."""

import json
import math
import os

import pytest
from absl import app, flags

from experiments import plots, results


def _row(tech, fam, task, score, length=2048, depth=None, kvb=1000.0, n=4, tok_s=50.0,
         **extra):
  return dict(mode="query_agnostic", technique=tech, family=fam, press=None, ratio=None,
              quant=None, task=task, metric="prefix_match", length=length, depth=depth, n=n,
              score=score, kv_bytes=kvb, kv_factor=1.0, prefill_tok_s=100.0,
              decode_tok_s=tok_s, model="m", **extra)


MiB = 1 << 20
ROWS = [
    _row("full", "full", "passkey", 1.0, kvb=40 * MiB),
    _row("full", "full", "perplexity_en", 3.0, kvb=40 * MiB),
    _row("snapkv@0.75", "press", "passkey", 0.0, kvb=10 * MiB),
    _row("snapkv@0.75", "press", "perplexity_en", 3.3, kvb=10 * MiB),
    _row("knorm@0.75", "press", "passkey", 0.0, kvb=10 * MiB),
    _row("knorm@0.75", "press", "perplexity_en", 3.4, kvb=10 * MiB),
    _row("int4", "quant", "passkey", 0.5, kvb=12 * MiB),
    _row("int4", "quant", "perplexity_en", 3.1, kvb=12 * MiB),
    _row("full", "full", "needle", 1.0, length=2048, depth=0.0, n=1),
    _row("full", "full", "needle", 0.0, length=2048, depth=1.0, n=1),
]


@pytest.fixture
def figures(monkeypatch):
  """The figures plots draw, kept open instead of closed after saving."""
  import matplotlib.pyplot as plt
  kept = []
  monkeypatch.setattr(plots, "_finish",
                      lambda p, fig, path, show: (kept.append(fig), fig.savefig(path), path)[-1])
  yield kept
  for f in kept:
    plt.close(f)


def test_wilson_interval_hand_values():
  # 50 of 100: the textbook (0.4038, 0.5962)
  lo, hi = plots.wilson_interval(0.5, 100)
  assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
  # 0 of 10: [0, z^2 / (n + z^2)], never the empty interval p +- 0 of the normal approximation
  z2 = 1.96 ** 2
  assert plots.wilson_interval(0.0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
  assert plots.wilson_interval(1.0, 10) == pytest.approx((10 / (10 + z2), 1.0))
  with pytest.raises(ValueError, match="n=0"):
    plots.wilson_interval(0.5, 0)
  with pytest.raises(ValueError, match="p=1.5"):
    plots.wilson_interval(1.5, 3)


def test_byte_unit_picks_a_plain_scale():
  assert plots.byte_unit([7.0 * MiB, 91.0 * MiB]) == ("MiB", MiB)
  assert plots.byte_unit([300.0, 5000.0]) == ("B", 1)
  assert plots.byte_unit([3000.0, 5 * MiB]) == ("KiB", 1024)


def test_styles_one_colour_per_technique_one_marker_per_family():
  rows = [_row(f"p{i}@0.5", "press", "passkey", 1.0) for i in range(12)] + \
      [_row("int8", "quant", "passkey", 1.0), _row("full", "full", "passkey", 1.0)]
  st = plots.technique_styles(rows)
  assert len({v["color"] for v in st.values()}) == 14        # tab20 past ten techniques
  assert {st[f"p{i}@0.5"]["marker"] for i in range(12)} == {"o"}
  assert st["int8"]["marker"] == "s" and st["full"]["marker"] == "*"


def test_frontier_legend_not_annotations_and_wilson_bars(tmp_path, figures):
  plots.frontier(ROWS, str(tmp_path / "f.png"), title="t")
  fig = figures[0]
  acc, ppl = fig.axes[:2]
  assert not acc.texts and not ppl.texts                     # no overlapping labels
  names = [t.get_text() for t in fig.legends[0].get_texts()]
  assert names == ["full", "snapkv@0.75", "knorm@0.75", "int4"]
  # tick labels are plain numbers in MiB, no 10^k
  fig.canvas.draw()
  ticks = [t.get_text() for t in acc.get_xticklabels() if t.get_text()]
  assert ticks and all(t.replace(",", "").replace(".", "").isdigit() for t in ticks), ticks
  assert "MiB" in acc.get_xlabel()
  # int4: 0.5 on 4 samples -> Wilson 95% bar
  lo, hi = plots.wilson_interval(0.5, 4)
  bars = [c for c in acc.containers if c.lines[0].get_ydata()[0] == pytest.approx(50.0)]
  seg = bars[0].lines[2][0].get_segments()[0]
  assert sorted(y for _, y in seg) == pytest.approx([100 * lo, 100 * hi])
  # full: passkey (n=4) + two needle cells (n=1 each) -> 6 samples behind its mean 0.75
  lo, hi = plots.wilson_interval(0.75, 6)
  bars = [c for c in acc.containers if c.lines[0].get_ydata()[0] == pytest.approx(75.0)]
  assert sorted(y for _, y in bars[0].lines[2][0].get_segments()[0]) == pytest.approx(
      [100 * lo, 100 * hi])
  # snapkv and knorm share (10 MiB, 0%): spread sideways, symmetric around 10
  xs = sorted(c.lines[0].get_xdata()[0] for c in acc.containers
              if c.lines[0].get_ydata()[0] == 0.0)
  assert len(xs) == 2 and xs[0] < 10 < xs[1] and math.isclose(xs[0] * xs[1], 100)


def test_heatmap_titles_clear_of_tick_labels(tmp_path, figures):
  rows = [_row(t, "press", "needle", s, length=L, depth=d, n=2)
          for t in ("full", "snapkv@0.75", "a_long_technique_name@0.75+kivi2")
          for L in (1024, 2048) for d in (0.0, 0.5, 1.0) for s in (1.0,)]
  plots.needle_heatmaps(rows, str(tmp_path / "h.png"))
  fig = figures[0]
  fig.canvas.draw()
  r = fig.canvas.get_renderer()
  panels = [a for a in fig.axes if a.get_title()]
  assert [a.get_title() for a in panels] == ["full", "snapkv@0.75",
                                              "a_long_technique_name@0.75+kivi2"]
  boxes = [a.title.get_window_extent(r) for a in panels]
  for a in panels:
    for t in a.get_yticklabels() + a.get_xticklabels():
      if t.get_visible() and t.get_text():
        bb = t.get_window_extent(r)
        assert not any(bb.overlaps(b) for b in boxes), t.get_text()
  # only the first column labels its depths; every cell is written out
  assert [any(t.get_visible() and t.get_text() for t in a.get_yticklabels())
          for a in panels] == [True, False, False]
  assert all(len(a.texts) == 6 for a in panels)
  assert "n = 2 per cell" in fig._suptitle.get_text()


def test_throughput_legend_outside_with_repeat_bars(tmp_path, figures):
  rows = [_row(f"t{i}", "press", "passkey", 1.0, length=L, tok_s=10.0 + i,
               decode_tok_s_min=9.0 + i, decode_tok_s_max=12.0 + i)
          for i in range(12) for L in (2048, 4096)]
  plots.throughput(rows, str(tmp_path / "t.png"), title="run")
  fig = figures[0]
  ax = fig.axes[0]
  assert ax.get_legend() is None and len(fig.legends) == 1   # outside the axes
  fig.canvas.draw()
  r = fig.canvas.get_renderer()
  assert not fig.legends[0].get_window_extent(r).overlaps(ax.get_window_extent(r))
  assert len({c.lines[0].get_color() for c in ax.containers}) == 12
  seg = ax.containers[0].lines[2][0].get_segments()[0]
  assert sorted(y for _, y in seg) == [9.0, 12.0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["2048", "4096"]
  assert "min-max over repeats" in ax.get_title()


def test_replot_from_results_file(tmp_path):
  paths = results.write(ROWS, str(tmp_path), meta={"title": "kvjax compare: m, cpu x1"})
  fv = plots.define_flags(flags.FlagValues())
  fv(["plots", f"--results={paths['jsonl']}", f"--out_dir={tmp_path / 'png'}"])
  assert plots.main(["plots"]) is None               # app.run exits 0
  got = {n: str(tmp_path / "png" / n) for n in ("frontier.png", "needle_heatmap.png",
                                                "throughput.png")}
  assert all(os.path.getsize(p) > 1000 for p in got.values())
  fv(["plots", "--results=/nonexistent/results.jsonl"])
  with pytest.raises(app.UsageError, match="--results='/nonexistent"):
    plots.main(["plots"])
  with open(paths["run"]) as f:
    assert plots.run_title(json.load(f)) == "kvjax compare: m, cpu x1"
  assert plots.run_title({"model": "m", "params": 1234, "devices": "cpu x1",
                          "flags": {"mode": "query_agnostic"}}) == \
      "kvjax compare: m (1,234 params), cpu x1, mode=query_agnostic"
