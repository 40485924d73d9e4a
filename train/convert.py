r"""Conversion fine-tuning: a full-attention Llama becomes a sliding-window, linear-attention
or hybrid model by attention transfer, then LM fine-tuning.

    python -m train.convert --config=train/configs/convert.py:gla --workdir=/tmp/conv

Stage 1, attention transfer (`objective="attention_transfer"`): the student Decoder starts
from the teacher's weights (`models.from_llama`: embeddings, norms, MLPs and whatever of each
attention layer fits the new mixer), and only the parameters matching `trainable` (by
default the mixers' new parts and their query/key projections) are trained, to make each
layer's mixer output match the teacher's attention output on the same input:

    L = mean over layers l, tokens, channels of (mixer_l^S(h_l^T) - attn_l^T(h_l^T))^2

where h_l^T is the teacher's normalised residual entering layer l (teacher frozen, one
teacher forward per batch; the student's layers run side by side on the teacher's inputs,
so no gradient crosses layers). This is LoLCATs' attention transfer (Zhang et al., 2024,
"LoLCATs: On Low-Rank Linearizing of Large Language Models"; after Hedgehog, Zhang et al.,
2024) and MOHAWK's matrix-orientation / hidden-state alignment stages (Bick et al., 2024,
"Transformers to SSMs: Distilling Quadratic Knowledge to Subquadratic Models").
Differences: LoLCATs trains feature maps phi(q), phi(k) inside a linear attention with a
sliding-window softmax part; our GLA/RetNet mixers have identity feature maps, so the
query/key projections play that role, together with the decay and output gates; MOHAWK
also aligns the mixing matrices themselves, which we do not.

Stage 2, LM fine-tuning: the usual next-token loss on all parameters (LoLCATs uses LoRA;
here all weights train), warm-started from stage 1's export. Both stages are
`train.train.train_and_evaluate` runs (same loop, checkpoints, data, resumption) in
`<workdir>/transfer` and `<workdir>/finetune`; the final model is exported to
`<workdir>/finetune/export` (`models.decoder_io.load` reads it back).

A single stage also runs from train.main: `python -m train.main --config=<convert config>`
runs stage 1 only (the convert configs set objective="attention_transfer").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from flax import nnx
from ml_collections import config_flags

from models import decoder as dec
from models import decoder_io
from models import from_llama
from train import launch

OBJECTIVES = ("lm", "attention_transfer")
# Stage-1 default: mixer parameters except the value / output projections copied from the
# teacher (query/key projections act as the feature maps; gates and norms are new).
DEFAULT_TRAINABLE = r"mixer/(?!(wv|wo)$)"


def find_teacher_dir(path: str) -> str:
  """An HF model directory: `path` itself, or the `export/` of a train/ workdir."""
  if not path:
    raise ValueError("teacher='' : objective='attention_transfer' needs teacher=<HF model "
                     "directory of a Llama-family full-attention model, or a train/ workdir "
                     "with an export/>")
  if not os.path.isdir(path):
    raise ValueError(f"teacher={path!r} is not a directory")
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  exported = os.path.join(path, "export")
  if os.path.exists(os.path.join(exported, "config.json")):
    return exported
  raise ValueError(f"teacher={path!r} has no config.json (nor export/config.json): pass an HF "
                   "model directory, e.g. the export/ of a train/ run with export=True")


def load_teacher(path: str, dtype: str = "float32"):
  """The teacher Transformer at `path`; ValueError unless it is Llama-family full attention."""
  d = find_teacher_dir(path)
  if decoder_io.is_decoder_dir(d):
    cfg = decoder_io.load_config(d)
    raise ValueError(f"teacher={path!r} holds a kvjax {type(cfg).__name__} (another "
                     "architecture); conversion starts from a Llama-family full-attention "
                     "model (an HF directory)")
  from models import hf  # pylint: disable=import-outside-toplevel
  model = hf.from_pretrained(d, dtype=dtype)
  from_llama.check_teacher(model.config)
  return model


@dataclasses.dataclass(frozen=True)
class AttentionTransfer:
  """The stage-1 objective: per-layer MSE to a frozen teacher's attention outputs.

  Attributes:
    teacher_graphdef: the teacher as an all-global Decoder (`from_llama`), graph part.
    teacher_state: its abstract parameter state (nnx.State of ShapeDtypeStructs).
    teacher_rest: its non-parameter variables (usually empty).
    teacher_params: its parameters (a pure dict, passed to the train step as an argument).
  """

  teacher_graphdef: Any
  teacher_state: Any
  teacher_rest: Any
  teacher_params: Any

  @classmethod
  def from_config(cls, c, student_config) -> "AttentionTransfer":
    """Loads `c.teacher` and checks that the student `student_config` can take it."""
    if not isinstance(student_config, dec.DecoderConfig):
      raise ValueError(f"objective='attention_transfer' needs a models.decoder.Decoder student "
                       f"(e.g. model.family='sliding' | 'gla' | 'retnet' | 'hybrid'); "
                       f"model.family={c.model.family!r} builds {type(student_config).__name__}")
    teacher = load_teacher(c.teacher, c.model.param_dtype)
    from_llama.check_student(student_config, teacher.config)
    tdec, _ = from_llama.decoder_from_transformer(teacher)
    graphdef, state, rest = nnx.split(tdec, nnx.Param, ...)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return cls(graphdef, abstract, rest, state.to_pure_dict())

  def teacher(self, params, dtype) -> dec.Decoder:
    """The teacher Decoder holding `params` (a pure dict) cast to `dtype`."""
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                          else x, params)
    st = jax.tree.map(lambda x: x, self.teacher_state)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(self.teacher_graphdef, st, self.teacher_rest)

  def loss(self, params, batch, teacher_params, parts, compute_dtype):
    """(sum over tokens of the per-token MSE, {"count": tokens, "correct": 0})."""
    tokens = batch["inputs"]
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    teacher = self.teacher(teacher_params, compute_dtype)
    h, y_t = dec.forward(teacher, tokens, positions, None, taps=True)[2]["taps"]
    h, y_t = jax.lax.stop_gradient(h), jax.lax.stop_gradient(y_t)
    student = parts.merge(params, compute_dtype)
    y_s = dec.apply_mixers(student, h, positions)
    per_token = jnp.mean(jnp.square(y_s.astype(jnp.float32) - y_t.astype(jnp.float32)),
                         axis=(0, 3))                                   # [B, T]
    n = jnp.asarray(b * t, jnp.float32)
    return jnp.sum(per_token), {"count": n, "correct": jnp.zeros((), jnp.float32)}


def layer_errors(student: dec.Decoder, teacher, tokens) -> np.ndarray:
  """Per-layer MSE [L] between the student's mixers and the teacher's attention outputs on
  the teacher's per-layer inputs (the quantity stage 1 minimises).

  Args:
    student: a Decoder.
    teacher: a Llama-family Transformer (or its all-global Decoder).
    tokens: int [B, T].
  """
  if not isinstance(teacher, dec.Decoder):
    teacher, _ = from_llama.decoder_from_transformer(teacher)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  h, y_t = dec.forward(teacher, tokens, positions, None, taps=True)[2]["taps"]
  y_s = dec.apply_mixers(student, h, positions)
  return np.asarray(jnp.mean(jnp.square(y_s - y_t), axis=(1, 2, 3)))


# --- the two-stage recipe -------------------------------------------------------------------
def stage_configs(c):
  """(transfer config, finetune config) from a convert config (see train/configs/convert_*)."""
  if "convert" not in c:
    raise ValueError("the config has no `convert` section (finetune steps / lr / trainable); "
                     "use a train/configs/convert_*.py config")
  if c.objective != "attention_transfer":
    raise ValueError(f"objective={c.objective!r}; a convert config's base is stage 1 "
                     "(objective='attention_transfer')")
  t = copy.deepcopy(c)
  f = copy.deepcopy(c)
  with f.unlocked():
    f.objective = "lm"
    f.teacher = ""
    f.trainable = c.convert.finetune_trainable
    f.steps = c.convert.finetune_steps
    f.opt.lr = c.convert.finetune_lr
    f.opt.warmup_steps = c.convert.finetune_warmup_steps
    f.export = True
  with t.unlocked():
    t.init_from = c.teacher
    t.export = True
  return t, f


def convert(c, workdir: str) -> dict:
  """Runs both stages; returns {"transfer": summary, "finetune": summary, "export_dir"}
  (summaries as `train_and_evaluate` returns them, trainers included)."""
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  t_cfg, f_cfg = stage_configs(c)
  t_dir, f_dir = os.path.join(workdir, "transfer"), os.path.join(workdir, "finetune")
  with t_cfg.unlocked():
    t_cfg.export_dir = os.path.join(t_dir, "export")
  with f_cfg.unlocked():
    f_cfg.init_from = t_cfg.export_dir
    f_cfg.export_dir = os.path.join(f_dir, "export")
  s1 = train_lib.train_and_evaluate(t_cfg, t_dir)
  s2 = train_lib.train_and_evaluate(f_cfg, f_dir)
  out = {"transfer": s1, "finetune": s2, "export_dir": f_cfg.export_dir}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "convert_summary.json"), "w") as fh:
      json.dump({k: ({kk: vv for kk, vv in v.items() if kk != "trainer"}
                     if isinstance(v, dict) else v) for k, v in out.items()},
                fh, indent=2, default=str)
  return out


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  train_lib.maybe_initialize_distributed(FLAGS.config.distributed)
  with launch.exit_on_error("train.convert"):
    out = convert(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    for stage in ("transfer", "finetune"):
      s = out[stage]
      print(f"{stage}: step {s['step']}, train loss {s['last'].get('loss', float('nan')):.4f}")
      for k, v in sorted(s["eval"].items()):
        print(f"  {k} = {v:.4f}")
    print(f"exported to {out['export_dir']}")
  logging.info("done")


if __name__ == "__main__":
  config_flags.DEFINE_config_file(
      "config", None, "A conversion config (train/configs/convert_*.py): a stage-1 train "
      "config (objective='attention_transfer', teacher=...) with a `convert` section for "
      "stage 2; override keys with --config.<key>=<value>.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Stage workdirs transfer/ and finetune/ (each resumable "
                      "like train.main's) and convert_summary.json are written here.")
  flags.mark_flags_as_required(["config", "workdir"])
  launch.writable_dirs("workdir")
  app.run(main)
