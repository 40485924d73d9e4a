r"""Staged training: one config, a list of stages, each warm-started from the last.

    python -m train.curriculum --config=train/configs/default_model.py \
        --workdir=/tmp/default_model --out=models/default

The config file defines `get_config()` (a train/configs/default.py-style config) and
`STAGES`, a sequence of dicts of overrides (`seq_len`, `steps`, `batch_size`, `lr`, and
optionally `warmup_steps`, `eval_examples`, and `weights`: {source name: mixture weight}). Stage i trains in `<workdir>/stage<i>` with
`init_from` = stage i-1's export (parameters copied, fresh optimizer and LR schedule), the
usual curriculum for long context (short sequences first). A stage whose export exists is
skipped, and an interrupted stage resumes from its checkpoint, so re-running the same
command continues where it stopped.

At the end the last stage's export is copied to `--out` with `loss_curve.csv` (global step,
stage, seq_len, loss, token accuracy), `loss_curve.png` and `training_summary.json`
(per-stage held-out metrics, seconds, the recipe).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import time
from typing import Mapping, Sequence

from absl import app
from absl import flags
from absl import logging

from train import launch

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Python file with get_config() and STAGES (e.g. "
                    "train/configs/default_model.py).")
flags.DEFINE_string("workdir", None, "Per-stage checkpoints and exports go in "
                    "<workdir>/stage<i>; an existing workdir is resumed.")
flags.DEFINE_string("out", "", "Copy the final model, its loss curve (CSV + PNG) and a "
                    "summary here (e.g. models/default); empty: <workdir>/final.")
flags.DEFINE_integer("max_stages", 0, "Run only the first N stages (0: all).")
flags.mark_flags_as_required(["config", "workdir"])
flags.register_validator("max_stages", lambda v: isinstance(v, int) and v >= 0,
                         message="--max_stages must be an int >= 0 (0: all stages)")
launch.writable_dirs("workdir", "out")

STAGE_KEYS = ("seq_len", "steps", "batch_size", "lr", "warmup_steps", "eval_examples",
              "weights")


def load_recipe(path: str):
  """(get_config(), STAGES) of a config file."""
  if not os.path.exists(path):
    raise ValueError(f"--config={path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_curriculum_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "STAGES"):
    raise ValueError(f"{path} defines no STAGES (a sequence of dicts of {STAGE_KEYS})")
  return mod.get_config(), tuple(mod.STAGES)


def stage_config(base, stage: Mapping, index: int, workdir: str, init_from: str):
  """The config of one stage: `base` with the stage's overrides."""
  bad = sorted(set(stage) - set(STAGE_KEYS))
  if bad:
    raise ValueError(f"stage {index} has unknown key(s) {bad}; allowed: {STAGE_KEYS}")
  c = base.copy_and_resolve_references()
  c.seq_len = int(stage["seq_len"])
  c.steps = int(stage["steps"])
  c.batch_size = int(stage.get("batch_size", c.batch_size))
  c.opt.lr = float(stage.get("lr", c.opt.lr))
  c.opt.warmup_steps = int(stage.get("warmup_steps", min(c.opt.warmup_steps, c.steps // 4)))
  c.eval_examples = int(stage.get("eval_examples", c.eval_examples))
  for name, w in dict(stage.get("weights") or {}).items():
    if name not in c.data.sources:
      raise ValueError(f"stage {index}: weights names source {name!r}; sources: "
                       f"{sorted(c.data.sources.keys())}")
    c.data.sources[name].weight = float(w)
  c.init_from = init_from
  c.export = True
  c.export_dir = os.path.join(workdir, f"stage{index}", "export")
  return c


def run(base, stages: Sequence[Mapping], workdir: str, out: str = "") -> dict:
  """Trains every stage in order; returns the summary written to training_summary.json."""
  from train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  if not stages:
    raise ValueError("no stages to train")
  os.makedirs(workdir, exist_ok=True)
  init_from, rows, summary_stages, offset = "", [], [], 0
  for i, stage in enumerate(stages):
    c = stage_config(base, stage, i, workdir, init_from)
    sdir = os.path.join(workdir, f"stage{i}")
    done_file = os.path.join(sdir, "stage_summary.json")
    if os.path.exists(done_file):
      with open(done_file) as f:
        s = json.load(f)
      logging.info("stage %d already trained (%s); skipping", i, done_file)
    else:
      t0 = time.time()
      r = train_lib.train_and_evaluate(c, sdir)
      if r["step"] < c.steps:   # preempted (SIGTERM): checkpointed; re-run to resume
        raise SystemExit(f"stage {i} stopped at step {r['step']} of {c.steps}; run the same "
                         "command again to resume")
      s = {"stage": i, **{k: stage.get(k) for k in STAGE_KEYS if k in stage},
           "final_step": r["step"], "eval": r["eval"], "last": r["last"],
           "seconds": time.time() - t0, "compile_seconds": r.get("compile_seconds")}
      with open(done_file, "w") as f:
        json.dump(s, f, indent=1)
      print(f"stage {i} (seq_len {c.seq_len}): {s['seconds']:.0f}s, eval "
            + ", ".join(f"{k}={v:.3f}" for k, v in sorted(r["eval"].items())), flush=True)
    summary_stages.append(s)
    for m in metrics_lib.read_jsonl(os.path.join(sdir, "metrics.jsonl")):
      if "loss" in m:
        rows.append({"step": offset + m["step"], "stage": i, "seq_len": c.seq_len,
                     "loss": m["loss"], "token_accuracy": m.get("token_accuracy", "")})
    offset += c.steps
    init_from = c.export_dir
  out = out or os.path.join(workdir, "final")
  if os.path.abspath(out) != os.path.abspath(init_from):
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(init_from):
      shutil.copy2(os.path.join(init_from, name), os.path.join(out, name))
  write_curve(rows, out)
  summary = {"stages": summary_stages,
             "total_seconds": sum(s["seconds"] for s in summary_stages),
             "recipe": {"stages": [dict(s) for s in stages],
                        "base": json.loads(base.to_json_best_effort())}}
  with open(os.path.join(out, "training_summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=str)
  return summary


def write_curve(rows: Sequence[Mapping], out: str):
  """loss_curve.csv and loss_curve.png (loss vs global step, one colour per stage)."""
  with open(os.path.join(out, "loss_curve.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["step", "stage", "seq_len", "loss", "token_accuracy"])
    w.writeheader()
    w.writerows(rows)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4))
  for stage in sorted({r["stage"] for r in rows}):
    pts = [r for r in rows if r["stage"] == stage]
    ax.plot([r["step"] for r in pts], [r["loss"] for r in pts],
            label=f"stage {stage}: seq_len {pts[0]['seq_len']}")
  ax.set_xlabel("optimizer step (all stages)")
  ax.set_ylabel("train loss (nats / loss token)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_curve.png"), dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  base, stages = load_recipe(FLAGS.config)
  train_lib.maybe_initialize_distributed(base.distributed)
  if FLAGS.max_stages:
    stages = stages[:FLAGS.max_stages]
  with launch.exit_on_error("train.curriculum"):
    s = run(base, stages, FLAGS.workdir, FLAGS.out)
  print(f"trained {len(stages)} stage(s) in {s['total_seconds']:.0f}s")


if __name__ == "__main__":
  app.run(main)
