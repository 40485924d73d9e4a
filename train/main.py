r"""Trains a model from an ml_collections config file.

    python -m train.main --config=train/configs/mqar_tiny.py --workdir=/tmp/mqar \
        --config.steps=100 --config.mesh.fsdp=True

Re-running with the same --workdir resumes from its latest checkpoint. Flags:
  --config      the config file (its keys, overridable as --config.<key>=value, are
                documented in train/configs/default.py)
  --workdir     checkpoints, metrics.jsonl, tensorboard/ and export/ are written here
"""

import logging as py_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from train import launch

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    "config", None, "Path to a training config file (train/configs/*.py); override its "
    "keys with --config.<key>=<value>.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard "
                    "event files and the exported model; an existing one is resumed.")
flags.mark_flags_as_required(["config", "workdir"])

launch.writable_dirs("workdir")


class _QuietOrbax(py_logging.Filter):
  """Drops orbax's per-save INFO lines (warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if FLAGS.config.compilation_cache_dir:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", FLAGS.config.compilation_cache_dir)
  # jax.distributed must be initialised before anything touches the devices.
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  train_lib.maybe_initialize_distributed(FLAGS.config.distributed)
  import jax  # pylint: disable=import-outside-toplevel
  logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  with launch.exit_on_error("train.main"):   # a bad setting or a diverged run: status 1
    summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  summary.pop("trainer", None)
  logging.info("done: %s", summary)
  if jax.process_index() == 0:
    last = summary["last"]
    print(f"step {summary['step']}: loss {last.get('loss', float('nan')):.4f}, "
          f"{summary['train_seconds']:.1f}s")
    for k, v in sorted(summary["eval"].items()):
      print(f"  {k} = {v:.4f}")
    if summary["export_dir"]:
      print(f"exported to {summary['export_dir']}")


if __name__ == "__main__":
  app.run(main)
