r"""Memory vs recall across model families: each learns MQAR, then one table.

    python -m experiments.mqar_families --workdir=/tmp/mqar_families
    python -m experiments.mqar_families --workdir=/tmp/mqar_families --families=llama,gla \
        --steps=400

For every family in `train/configs/mqar_families.py` this trains the recipe's model
(`train.train.train_and_evaluate`, resumable per family in <workdir>/<family>), then
measures:
  params                 parameters of the model
  cache_bytes_per_token  exact `nbytes` of the cache after a 4096-token prefill, batch 1,
                         divided by 4096 (`models.registry.prefill_cache_nbytes`)
  mqar_acc               per-query accuracy on standard MQAR (4 pairs, every key asked once,
                         held-out seed; `train.evaluate.task_accuracy`)
  mqar_em                fraction of sequences with every answer right (same examples)
  train_acc / train_em   the loop's held-out eval on the training form (12 queries with
                         replacement)
and writes results.jsonl, results.csv, table.md and mqar_families.png (accuracy vs cache
bytes per token) to --out_dir (default: the workdir).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging

from experiments import flagcheck

FLAGS = flags.FLAGS


def define_flags():
  """The launcher's flags, defined only when it runs as a program: its names (workdir,
  steps, out_dir, ...) are common, and other absl apps imported in the same process
  (tests, notebooks) define them too."""
  flags.DEFINE_string("workdir", None, "Per-family training dirs (resumable) and, by default, "
                      "the results.")
  flags.DEFINE_list("families", [], "Families to run (default: every family of "
                    "train/configs/mqar_families.py).")
  flags.DEFINE_integer("steps", 0, "Training steps per family (0: the recipe's).")
  flags.DEFINE_integer("context", 4096, "Context length at which cache bytes per token are "
                       "measured.")
  flags.DEFINE_integer("eval_examples", 512, "Standard-MQAR examples per family.")
  flags.DEFINE_string("out_dir", "", "Where results go (default: --workdir).")
  flags.mark_flags_as_required(["workdir"])
  flagcheck.ints("steps", lo=0)
  flagcheck.ints("context", "eval_examples", lo=1)
  flagcheck.writable_dir("workdir", allow_empty=False)
  flagcheck.writable_dir("out_dir")


FIELDS = ("family", "params", "cache_bytes_per_token", "mqar_acc", "mqar_em", "train_acc",
          "train_em", "steps", "train_seconds")


def run_family(family: str, workdir: str, steps: int, context: int, eval_examples: int) -> dict:
  """Trains (or resumes) one family and measures its row of the table."""
  from models import registry  # pylint: disable=import-outside-toplevel
  from train import evaluate as eval_lib  # pylint: disable=import-outside-toplevel
  from train import tasks  # pylint: disable=import-outside-toplevel
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  from train.configs import mqar_families as recipe  # pylint: disable=import-outside-toplevel
  c = recipe.get_config(family)
  if steps:
    c.steps = steps
  c.progress_bar = False
  summary = train_lib.train_and_evaluate(c, os.path.join(workdir, family))
  model = summary["trainer"].model()
  mq = c.data.sources.mqar
  std = tasks.MQAR(length=c.seq_len + 1, num_pairs=mq.num_pairs, key_vocab=mq.key_vocab,
                   value_vocab=mq.value_vocab)
  acc = eval_lib.task_accuracy(model, std, num_examples=eval_examples, batch_size=128)
  ev = summary["eval"]
  return {"family": family, "params": registry.count_params(model),
          "cache_bytes_per_token": registry.prefill_cache_nbytes(model, context) / context,
          "mqar_acc": acc["token_accuracy"], "mqar_em": acc["exact_match"],
          "train_acc": ev.get("eval/mqar/token_accuracy"),
          "train_em": ev.get("eval/mqar/exact_match"), "steps": summary["step"],
          "train_seconds": summary["train_seconds"]}


def markdown(rows, context: int) -> str:
  head = (f"| family | params | cache B/token @{context} | MQAR acc | MQAR EM | "
          "train-form acc | steps |")
  lines = [head, "|" + "---|" * 7]
  for r in rows:
    lines.append(f"| {r['family']} | {r['params']:,} | {r['cache_bytes_per_token']:.1f} | "
                 f"{r['mqar_acc']:.3f} | {r['mqar_em']:.3f} | {r['train_acc']:.3f} | "
                 f"{r['steps']} |")
  return "\n".join(lines)


def plot(rows, path: str, context: int):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ax.scatter(r["cache_bytes_per_token"], r["mqar_acc"])
    ax.annotate(r["family"], (r["cache_bytes_per_token"], r["mqar_acc"]), fontsize=8,
                xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel(f"cache bytes per token at {context} tokens (log)")
  ax.set_ylabel("MQAR per-query accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(rows, out_dir: str, context: int) -> dict:
  import csv  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, n) for k, n in (
      ("jsonl", "results.jsonl"), ("csv", "results.csv"), ("md", "table.md"),
      ("png", "mqar_families.png"))}
  with open(paths["jsonl"], "w") as f:
    f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    w.writerows(rows)
  with open(paths["md"], "w") as f:
    f.write(markdown(rows, context) + "\n")
  plot(rows, paths["png"], context)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from train.configs import mqar_families as recipe  # pylint: disable=import-outside-toplevel
  families = FLAGS.families or list(recipe.FAMILIES)
  for f in families:
    recipe.model_settings(f)  # unknown names fail before any training
  out_dir = FLAGS.out_dir or FLAGS.workdir
  rows = []
  for f in families:
    rows.append(run_family(f, FLAGS.workdir, FLAGS.steps, FLAGS.context, FLAGS.eval_examples))
    logging.info("%s", rows[-1])
    write(rows, out_dir, FLAGS.context)  # the table so far survives an interrupted run
  print(markdown(rows, FLAGS.context))


if __name__ == "__main__":
  define_flags()
  app.run(main)
