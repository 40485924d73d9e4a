"""Llama-family Transformer -> `models.decoder.Decoder` families: configs and weights.

The starting point of conversion fine-tuning (`train/convert.py`): a full-attention
Llama-family model (`models.Transformer`, e.g. trained by `train/` or loaded by
`models.hf.from_pretrained`) becomes a sliding-window, linear-attention or hybrid Decoder
whose every layer keeps the teacher's embedding, norms and MLP, and whose mixers take what
of the teacher's attention fits them:

  * `AttentionMixer` (sliding, dilated or global; "own" K/V): W_q, W_k, W_v, W_o as they are.
  * `GLAMixer` (GLA / RetNet / Mamba-2 decay): W_q, W_o as they are, W_k and W_v with each
    KV head repeated over its query group (linear attention has one K/V per head). This is
    the LoLCATs / Hedgehog starting point (Zhang et al., 2024): keep the softmax
    attention's projections, learn what replaces the softmax (here the decay gate, output
    gate and norm). Its output gate and norm are new.
  * `RGLRUMixer` (Griffin's recurrent block): nothing; the whole block is new.

`teacher_decoder_config(cfg)` is the all-global-attention Decoder that computes exactly what
the Transformer computes (tested), so teacher and student run the same layer code and
their per-layer mixer inputs/outputs line up (`decoder.forward(taps=True)`).
Shapes: L layers, H hidden, Hq / Hkv heads, D head_dim, F mlp.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from models import decoder as dec
from models import hybrid
from models import linear_attention as la_lib
from models import local
from models.config import ModelConfig

CONVERTIBLE_MIXERS = ("AttentionMixer(share='own')", "GLAMixer", "RGLRUMixer")
# The Llama-family switches a converted model cannot express (each must be off / default).
_UNSUPPORTED = (("attention_bias", False), ("o_bias", False), ("mlp_bias", False),
                ("hidden_act", "silu"), ("norm_unit_offset", False), ("embed_scale", False),
                ("sandwich_norms", False), ("qk_norm", False), ("query_pre_attn_scalar", None),
                ("attn_logit_softcapping", None), ("final_logit_softcapping", None),
                ("rope_scaling", None), ("partial_rotary_factor", 1.0),
                ("local_rope_theta", None), ("local_rope_scaling", None))


def check_teacher(config, *, full_attention: bool = True) -> ModelConfig:
  """Raises ValueError unless `config` is a Llama-family config a Decoder can reproduce.

  Args:
    config: the teacher's `models.config.ModelConfig`.
    full_attention: also require every layer to be full (global) attention.
  """
  if not isinstance(config, ModelConfig):
    raise ValueError(f"teacher must be a Llama-family models.Transformer (ModelConfig); got a "
                     f"{type(config).__name__}: conversion starts from full attention")
  bad = [f"{k}={getattr(config, k)!r} (needs {v!r})" for k, v in _UNSUPPORTED
         if getattr(config, k) != v]
  if bad:
    raise ValueError(f"teacher {config.architecture} uses settings the Decoder families do "
                     f"not have: {', '.join(bad)}")
  if full_attention:
    windows = [config.layer_window(i) for i in range(config.num_layers)]
    if any(w is not None for w in windows):
      raise ValueError(f"teacher must be full attention in every layer; its layer windows are "
                       f"{windows} (sliding_window={config.sliding_window}, layer_types="
                       f"{config.layer_types})")
  return config


def _shared_fields(t: ModelConfig) -> dict:
  return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_layers=t.num_layers,
              rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings,
              dtype=t.dtype)


def teacher_decoder_config(config: ModelConfig) -> local.LocalAttentionConfig:
  """The all-global-attention Decoder config that equals the Transformer of `config`."""
  check_teacher(config)
  return local.LocalAttentionConfig(**_shared_fields(config), num_heads=config.num_heads,
                                    num_kv_heads=config.num_kv_heads,
                                    head_dim=config.head_dim, rope_theta=config.rope_theta,
                                    local_per_global=0)


def student_config(config_class, teacher: ModelConfig, **overrides):
  """A Decoder config of `config_class` with the teacher's sizes, then `overrides`.

  Attention-shaped fields the class has (num_heads, num_kv_heads, head_dim, rope_theta,
  key_dim / value_dim for GLA, gla_heads for a GLA hybrid) default to the teacher's so
  its weights fit. Raises ValueError when an override contradicts the teacher.
  """
  fields = {f.name for f in dataclasses.fields(config_class)}
  kw = _shared_fields(teacher)
  attn = dict(num_heads=teacher.num_heads, num_kv_heads=teacher.num_kv_heads,
              head_dim=teacher.head_dim, rope_theta=teacher.rope_theta,
              key_dim=teacher.head_dim, value_dim=teacher.head_dim, gla_heads=teacher.num_heads)
  kw.update({k: v for k, v in attn.items() if k in fields})
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"student overrides {unknown} are not {config_class.__name__} fields; "
                     f"fields: {sorted(fields)}")
  kw.update(overrides)
  cfg = config_class(**kw)
  check_student(cfg, teacher)
  return cfg


def check_student(student, teacher: ModelConfig) -> None:
  """Raises ValueError naming every field where `student` cannot take `teacher`'s weights."""
  if not isinstance(student, dec.DecoderConfig):
    raise ValueError(f"student config must be a models.decoder.DecoderConfig; got "
                     f"{type(student).__name__}")
  check_teacher(teacher, full_attention=False)
  diffs = [f"{k}: student {getattr(student, k)!r}, teacher {v!r}"
           for k, v in _shared_fields(teacher).items()
           if k != "dtype" and getattr(student, k) != v]
  for i, m in enumerate(student.layer_mixers()):
    diffs += [f"layer {i} ({type(m).__name__}) {d}" for d in _mixer_diffs(m, teacher)]
  if diffs:
    raise ValueError(f"student {type(student).__name__} does not fit the teacher "
                     f"({teacher.architecture}): " + "; ".join(diffs))


def _mixer_diffs(m, t: ModelConfig) -> list:
  if isinstance(m, local.AttentionMixer) and m.share == "own":
    want = dict(num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, head_dim=t.head_dim,
                rope_theta=t.rope_theta)
  elif isinstance(m, la_lib.GLAMixer):
    want = dict(num_heads=t.num_heads, key_dim=t.head_dim, value_dim=t.head_dim)
    if m.use_rope:
      want["rope_theta"] = t.rope_theta
  elif isinstance(m, hybrid.RGLRUMixer):
    want = {}
  else:
    return [f"cannot be converted from attention; convertible mixers: {CONVERTIBLE_MIXERS}"]
  return [f"{k}: student {getattr(m, k)!r}, teacher {v!r}" for k, v in want.items()
          if getattr(m, k) != v]


def _repeat_kv(w, t: ModelConfig):
  """[L, H, Hkv * D] -> [L, H, Hq * D]: each KV head repeated over its query group."""
  L, h, _ = w.shape
  w = w.reshape(L, h, t.num_kv_heads, 1, t.head_dim)
  w = np.broadcast_to(w, (L, h, t.num_kv_heads, t.num_queries_per_kv, t.head_dim))
  return w.reshape(L, h, t.num_heads * t.head_dim)


def _mixer_weights(m, tp: dict, t: ModelConfig) -> dict:
  """{mixer param name: [L, ...]} of the teacher weights mixer `m` takes (all layers)."""
  if isinstance(m, local.AttentionMixer):
    return {k: tp[k] for k in ("wq", "wk", "wv", "wo")}
  if isinstance(m, la_lib.GLAMixer):
    return {"wq": tp["wq"], "wk": _repeat_kv(tp["wk"], t), "wv": _repeat_kv(tp["wv"], t),
            "wo": tp["wo"]}
  return {}


def transfer_weights(teacher_params: dict, teacher: ModelConfig, student) -> dict:
  """The student's parameters that come from the teacher, keyed by Decoder param path.

  Args:
    teacher_params: the Transformer's parameters as a pure dict
      (`nnx.state(model, nnx.Param).to_pure_dict()`), arrays or numpy.
    teacher: its config.
    student: the student Decoder config (checked with `check_student`).

  Returns:
    {"embed" | "final_norm" | "lm_head" | "groups/<g>/<slot>/<name>[/<name>]": np.ndarray},
    each shaped like the student's parameter (slots stacked over the group's repeats).
  """
  check_student(student, teacher)
  tp = {k: np.asarray(v) for k, v in teacher_params.items()}
  out = {"embed": tp["embed"], "final_norm": tp["final_norm"]}
  if not teacher.tie_word_embeddings:
    out["lm_head"] = tp["lm_head"]
  a = 0
  for gi, (mixers, reps) in enumerate(student.groups()):
    period = len(mixers)
    for j, m in enumerate(mixers):
      idx = np.asarray([a + r * period + j for r in range(reps)])
      pre = f"groups/{gi}/{j}"
      out[f"{pre}/mixer_norm"] = tp["attn_norm"][idx]
      for name in ("mlp_norm", "w_gate", "w_up", "w_down"):
        out[f"{pre}/{name}"] = tp[name][idx]
      for name, w in _mixer_weights(m, tp, teacher).items():
        out[f"{pre}/mixer/{name}"] = np.ascontiguousarray(w[idx])
    a += period * reps
  return out


def load_into(model: dec.Decoder, weights: dict, *, strict: bool = True) -> list:
  """Writes `weights` ({param path: array}) into a Decoder; returns the paths left as they were.

  strict: every path in `weights` must exist with the parameter's shape (else ValueError).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  by_path = {"/".join(str(k) for k in path): (path, var) for path, var in flat.items()}
  missing = sorted(set(weights) - set(by_path))
  if missing and strict:
    raise ValueError(f"weights for {missing[:8]} have no parameter in "
                     f"{type(model.config).__name__}")
  for name, w in weights.items():
    if name not in by_path:
      continue
    _, var = by_path[name]
    if tuple(var.shape) != tuple(np.shape(w)):
      raise ValueError(f"parameter {name}: shape {tuple(var.shape)}, weight {np.shape(w)}")
    var.value = jnp.asarray(w, var.value.dtype)
  return sorted(set(by_path) - set(weights))


def decoder_from_transformer(model, student=None, *, seed: int = 0):
  """A Decoder holding `model`'s weights (default: the all-global equal of `model`).

  Args:
    model: a Llama-family `models.Transformer`.
    student: a Decoder config (default `teacher_decoder_config(model.config)`); parameters
      the teacher has nothing for keep their fresh initialisation from `seed`.

  Returns:
    (decoder, fresh parameter paths).
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  cfg = model.config
  student = student if student is not None else teacher_decoder_config(cfg)
  weights = transfer_weights(nnx.state(model, nnx.Param).to_pure_dict(), cfg, student)
  out = dec.Decoder(student, rngs=nnx.Rngs(seed))
  return out, load_into(out, weights)


def describe(student, fresh: Optional[list] = None) -> str:
  """One line: the student's layer kinds and how many parameters start fresh."""
  kinds = [type(m).__name__ + (f"(window={m.window})" if getattr(m, "window", None) else "")
           for m in student.layer_mixers()]
  tail = f", {len(fresh)} fresh tensors" if fresh is not None else ""
  return f"{type(student).__name__}: layers {kinds}{tail}"
