"""The training loop: any NNX language model, AdamW, sharded jit, orbax checkpoints.

    summary = train.train.train_and_evaluate(config, workdir)

The model is built from `config.model.family` (see `train.registry`) and kept functional:
`nnx.split` gives a static graph definition and a pure dict of parameters; the train step
merges them back (in the compute dtype) to call `model(tokens) -> logits`. The state
{"step", "params", "opt_state", "rng"} lives on a (data, model) mesh with explicit
shardings, is initialised by a jit whose out_shardings place it, and is donated to every
train step. A step accumulates gradients over `grad_accum_steps` micro-batches with
`lax.scan` and normalises by the number of loss tokens of the whole batch, so accumulation
changes memory, not the update.

Data is generated on the host, deterministically from (seed, index); the iterator's state
is checkpointed beside the train state, so a run stopped at any checkpoint and resumed
reproduces the uninterrupted loss curve bit for bit (same mesh, same device kind).

Shapes: A accumulation steps, B global batch, M = B / A micro-batch, T seq_len, V vocab.

One file on purpose (about 800 lines): the step, checkpointing, resumption and metrics are
one loop whose bit-for-bit resumption guarantee is easiest to check in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import time
import types
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from models.tokenizer import ByteTokenizer
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import evaluate as eval_lib
from train import metrics as metrics_lib
from train import optimizer as opt_lib
from train import registry
from train import sharding as shard_lib

PyTree = Any
DTYPES = ("float32", "bfloat16", "float16")
OBJECTIVES = ("lm", "attention_transfer")  # next-token loss | per-layer transfer (convert.py)
EVAL_SEED_OFFSET = 1_000_003  # eval examples of tasks use seed + this: disjoint from training


# --- model plumbing -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelParts:
  """A model split for functional use: graph definition + abstract params + other state."""
  family_name: str
  family: registry.Family
  kwargs: dict
  graphdef: Any
  abstract_state: Any            # nnx.State of Params (ShapeDtypeStruct leaves)
  abstract_params: Any           # pure dict of ShapeDtypeStruct
  rest: Any                      # non-Param variables (usually empty)

  def merge(self, params: PyTree, dtype=None) -> nnx.Module:
    """The module with `params` (a pure dict), cast to `dtype` if given."""
    if dtype is not None:
      params = cast_floating(params, dtype)
    st = jax.tree.map(lambda x: x, self.abstract_state)
    nnx.replace_by_pure_dict(st, params)
    return nnx.merge(self.graphdef, st, self.rest)

  def abstract_model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.abstract_state, self.rest)


def cast_floating(tree, dtype):
  dtype = jnp.dtype(dtype)
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, tree)


def model_kwargs(c) -> dict:
  return _to_dict(c.model.config)


def build_parts(c) -> ModelParts:
  """Builds the model abstractly (no FLOPs, no memory) and splits it."""
  family = registry.get(c.model.family)
  kw = model_kwargs(c)
  abstract = nnx.eval_shape(lambda: family.build(kw, rngs=nnx.Rngs(c.seed)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    rest = jax.jit(lambda: nnx.split(family.build(kw, rngs=nnx.Rngs(c.seed)), nnx.Param,
                                     ...)[2])()
  pdt = jnp.dtype(c.model.param_dtype)
  abstract_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, pdt if jnp.issubdtype(x.dtype, jnp.floating)
                                     else x.dtype), params.to_pure_dict())
  return ModelParts(c.model.family, family, kw, graphdef, params, abstract_params, rest)


# --- config checks ------------------------------------------------------------------------
def check_config(c, parts: ModelParts, mesh: Mesh):
  """Raises ValueError naming the setting when the config cannot work."""
  def need(ok, msg):
    if not ok:
      raise ValueError(msg)
  def need_int(name, v, lo):
    need(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
         f"{name}={v!r}; must be an int >= {lo}")
  need_int("steps", c.steps, 1)
  need_int("batch_size", c.batch_size, 1)
  need_int("eval_batch_size", c.eval_batch_size, 1)
  need_int("eval_examples", c.eval_examples, 0)
  need_int("log_every", c.log_every, 1)
  need_int("eval_every", c.eval_every, 0)
  need_int("checkpoint_every", c.checkpoint_every, -1)
  need_int("keep_checkpoints", c.keep_checkpoints, 1)
  opt_lib.check_config(c.opt)
  need(c.seq_len >= 2, f"seq_len={c.seq_len}; must be >= 2")
  need(c.grad_accum_steps >= 1, f"grad_accum_steps={c.grad_accum_steps}; must be >= 1")
  need(c.model.param_dtype in DTYPES and c.model.compute_dtype in DTYPES,
       f"model.param_dtype={c.model.param_dtype!r}, model.compute_dtype="
       f"{c.model.compute_dtype!r}; allowed: {DTYPES}")
  n_data = mesh.shape["data"]
  need(c.batch_size % c.grad_accum_steps == 0,
       f"batch_size={c.batch_size} is not divisible by grad_accum_steps={c.grad_accum_steps}")
  micro = c.batch_size // c.grad_accum_steps
  need(micro % n_data == 0, f"micro-batch batch_size/grad_accum_steps={micro} is not "
       f"divisible by the mesh's data axis ({n_data} devices)")
  need(c.eval_batch_size % n_data == 0, f"eval_batch_size={c.eval_batch_size} is not "
       f"divisible by the mesh's data axis ({n_data})")
  kw = parts.kwargs
  if "dtype" in kw:
    need(kw["dtype"] == c.model.param_dtype,
         f"model.config.dtype={kw['dtype']!r} differs from model.param_dtype="
         f"{c.model.param_dtype!r}; set both to the parameter dtype (compute dtype is "
         "model.compute_dtype)")
  mpe = kw.get("max_position_embeddings")
  need(mpe is None or c.seq_len <= mpe,
       f"seq_len={c.seq_len} exceeds model.config.max_position_embeddings={mpe}")
  # The module contract: tokens [B, T] -> logits [B, T, V] with V >= the byte vocabulary.
  tokens = jax.ShapeDtypeStruct((1, c.seq_len), jnp.int32)
  try:
    out = jax.eval_shape(lambda p, t: parts.merge(p)(t), parts.abstract_params, tokens)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"model.family={c.model.family!r} with model.config={kw} fails on "
                     f"tokens [1, {c.seq_len}]: {e}") from e
  need(hasattr(out, "shape") and tuple(out.shape[:2]) == (1, c.seq_len) and out.ndim == 3,
       f"model(tokens [1, {c.seq_len}]) must return logits [1, {c.seq_len}, V]; got "
       f"{getattr(out, 'shape', type(out))}")
  need(out.shape[-1] >= ByteTokenizer.vocab_size,
       f"the model's vocabulary ({out.shape[-1]}) is smaller than the byte tokenizer's "
       f"({ByteTokenizer.vocab_size}); set model.config.vocab_size >= "
       f"{ByteTokenizer.vocab_size}")
  need(not (c.export and parts.family.export is None),
       f"export=True but model.family={c.model.family!r} registers no exporter")
  if c.export:
    trained_tokenizer(c)   # sources that disagree on the tokenizer fail now, not at the end
  need(c.distributed in ("auto", "true", "false"),
       f"distributed={c.distributed!r}; allowed: 'auto', 'true', 'false'")
  need(c.objective in OBJECTIVES, f"objective={c.objective!r}; allowed: {OBJECTIVES}")
  need(c.objective == "attention_transfer" or not c.teacher,
       f"teacher={c.teacher!r} is only read by objective='attention_transfer' (objective="
       f"{c.objective!r})")
  trainable_mask(parts.abstract_params, c.trainable)  # raises on a bad regex


# --- steps -----------------------------------------------------------------------------------
def _loss_and_stats(params, batch, extra, parts: ModelParts, compute_dtype):
  """Next-token loss: (sum of NLL over loss tokens, {"count", "correct"})."""
  del extra
  model = parts.merge(params, compute_dtype)
  logits = model(batch["inputs"])
  s = eval_lib.token_stats(logits, batch["targets"], batch["weights"])
  return jnp.sum(s["nll"]), {"count": jnp.sum(s["count"]), "correct": jnp.sum(s["correct"])}


def trainable_mask(params, regex: str):
  """Per-parameter bool pytree: True where the path ("a/b/c") matches `regex` ("" = all).

  Raises ValueError when the regex does not compile or matches no parameter.
  """
  if not regex:
    return jax.tree.map(lambda _: True, params)
  try:
    pat = re.compile(regex)
  except re.error as e:
    raise ValueError(f"trainable={regex!r} is not a regular expression ({e})") from e
  mask = jax.tree_util.tree_map_with_path(
      lambda p, _: bool(pat.search(shard_lib.path_str(p))), params)
  if not any(jax.tree.leaves(mask)):
    names = [shard_lib.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(f"trainable={regex!r} matches no parameter; parameters: {names[:12]}...")
  return mask


def train_step(state, batch, extra=None, *, parts: ModelParts, tx, schedule, compute_dtype,
               loss_fn=_loss_and_stats, mask=None):
  """One optimizer step over a batch shaped [A, M, T]; returns (state, metrics).

  loss_fn(params, micro_batch, extra, parts, compute_dtype) -> (loss sum, {"count",
  "correct"}); `extra` is the objective's other input (a teacher's parameters). With
  `mask` (a bool per parameter), the others get no gradient and stay bit-identical.
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, parts=parts,
                                                 compute_dtype=compute_dtype), has_aux=True)
  params = state["params"]

  def micro_step(carry, mb):
    g_acc, l_acc, a_acc = carry
    (l, a), g = grad_fn(params, mb, extra)
    return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, a_acc, a)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  init = (zeros, jnp.zeros((), jnp.float32),
          {"count": jnp.zeros((), jnp.float32), "correct": jnp.zeros((), jnp.float32)})
  (grads, loss_sum, aux), _ = jax.lax.scan(micro_step, init, batch)
  n = jnp.maximum(aux["count"], 1.0)
  grads = jax.tree.map(lambda g: g / n, grads)
  if mask is not None:  # frozen: no gradient (so none in the clip norm), no update
    grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  if mask is not None:
    new_params = jax.tree.map(lambda new, old, m: new if m else old, new_params, params, mask)
  rng, _ = jax.random.split(state["rng"])
  new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state,
               "rng": rng}
  metrics = {"loss": loss_sum / n, "token_accuracy": aux["correct"] / n,
             "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"]),
             "param_norm": optax.global_norm(new_params), "loss_tokens": aux["count"]}
  return new_state, metrics


def eval_step(params, batch, *, parts: ModelParts, compute_dtype):
  """Next-token statistics of the model (whatever the training objective)."""
  model = parts.merge(params, compute_dtype)
  return eval_lib.token_stats(model(batch["inputs"]), batch["targets"], batch["weights"])


# --- the trainer ------------------------------------------------------------------------------
_PROGRAMS: dict = {}
# Config keys that never change a compiled program (left out of the program cache key).
_HOST_ONLY_KEYS = ("log_every", "eval_every", "eval_examples", "checkpoint_every",
                   "keep_checkpoints", "async_checkpoint", "export", "export_dir",
                   "tensorboard", "progress_bar", "peak_flops_per_device",
                   "compilation_cache_dir", "distributed", "init_from")


def _program_key(c) -> str:
  d = {k: v for k, v in _to_dict(c).items() if k not in _HOST_ONLY_KEYS}
  return json.dumps(d, sort_keys=True, default=str)


def _init_state(c, parts: ModelParts, tx):
  model = parts.family.build(parts.kwargs, rngs=nnx.Rngs(c.seed))
  params = cast_floating(nnx.state(model, nnx.Param).to_pure_dict(), c.model.param_dtype)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "rng": jax.random.key_data(jax.random.key(c.seed + 1))}


def _build_programs(c, mesh: Mesh) -> dict:
  """Model parts, optimizer, shardings and the jitted init / train / eval functions."""
  parts = build_parts(c)
  check_config(c, parts, mesh)
  opt_c = types.SimpleNamespace(**_to_dict(c.opt))
  if opt_c.decay_steps <= 0:
    opt_c.decay_steps = c.steps
  schedule = opt_lib.learning_rate_schedule(opt_c)
  tx = opt_lib.make_optimizer(opt_c)
  param_sh = shard_lib.param_shardings(parts.abstract_params, mesh, fsdp=c.mesh.fsdp,
                                       fsdp_min_size=c.mesh.fsdp_min_size,
                                       tp_rules=parts.family.tp_rules)
  abstract_opt = jax.eval_shape(tx.init, parts.abstract_params)
  rep = shard_lib.replicated(mesh)
  state_sh = {"step": rep, "params": param_sh,
              "opt_state": shard_lib.opt_state_shardings(tx, abstract_opt, param_sh, mesh),
              "rng": rep}
  init = functools.partial(_init_state, c, parts, tx)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init), state_sh)
  batch_sh = shard_lib.batch_sharding(mesh, 3, batch_axis=1)   # [A, M, T]
  eval_sh = shard_lib.batch_sharding(mesh, 2, batch_axis=0)    # [B, T]
  cd = jnp.dtype(c.model.compute_dtype)
  loss_fn, extra = _loss_and_stats, None
  if c.objective == "attention_transfer":
    from train import convert  # pylint: disable=import-outside-toplevel
    objective = convert.AttentionTransfer.from_config(c, parts.abstract_model().config)
    loss_fn = objective.loss
    extra = jax.device_put(objective.teacher_params, rep)
  mask = trainable_mask(parts.abstract_params, c.trainable) if c.trainable else None
  step = jax.jit(
      functools.partial(train_step, parts=parts, tx=tx, schedule=schedule, compute_dtype=cd,
                        loss_fn=loss_fn, mask=mask),
      in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep),
      donate_argnames=("state",))
  return dict(
      parts=parts, schedule=schedule, tx=tx, param_sh=param_sh, state_sh=state_sh,
      abstract_state=abstract_state, batch_sh=batch_sh, eval_sh=eval_sh,
      init_fn=jax.jit(init, out_shardings=state_sh),
      step_fn=lambda state, batch: step(state, batch, extra),
      eval_fn=jax.jit(functools.partial(eval_step, parts=parts, compute_dtype=cd),
                      in_shardings=(param_sh, eval_sh), out_shardings=rep),
      meta=ckpt_lib.make_meta(c.model.family, parts.kwargs, parts.abstract_params,
                              list(active_sources(c))))


class Trainer:
  """Owns the mesh, shardings, jitted functions and the live state."""

  def __init__(self, c, mesh: Optional[Mesh] = None):
    self.c = c
    self.mesh = mesh or shard_lib.make_mesh(c.mesh.data, c.mesh.model)
    # Compiled programs are reused by later Trainers with the same config and mesh (a
    # notebook re-run, or a resumed loop in the same process): the jit caches are per
    # function object, so without this each Trainer would compile again.
    key = (_program_key(c),
           tuple(d.id for d in self.mesh.devices.flat), self.mesh.devices.shape,
           id(registry.get(c.model.family)))
    built = _PROGRAMS.get(key)
    if built is None:
      built = _build_programs(c, self.mesh)
      if len(_PROGRAMS) >= 8:
        _PROGRAMS.clear()
      _PROGRAMS[key] = built
    else:   # the host-only keys are not in the cache key: check this config's own values
      check_config(c, built["parts"], self.mesh)
    for k, v in built.items():
      setattr(self, k, v)
    self.state = None

  def init_state(self):
    self.state = self.init_fn()
    return self.state

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state["step"]))

  # host data -> global arrays (each process builds only its rows)
  def _local_rows(self, sharding: NamedSharding, shape, axis: int) -> list[int]:
    idx = sharding.addressable_devices_indices_map(shape)
    rows = set()
    for sl in idx.values():
      s = sl[axis]
      rows.update(range(*s.indices(shape[axis])))
    return sorted(rows)

  def train_batch(self, mixture: data_lib.Mixture):
    c = self.c
    a, m = c.grad_accum_steps, c.batch_size // c.grad_accum_steps
    shape = (a, m, c.seq_len)
    local_m = self._local_rows(self.batch_sh, shape, 1)
    rows = [i * m + r for i in range(a) for r in local_m]
    b = mixture.next_batch(c.batch_size, rows)
    out = {}
    for k in ("inputs", "targets", "weights"):
      x = b[k].reshape(a, len(local_m), c.seq_len)
      out[k] = jax.make_array_from_process_local_data(self.batch_sh, x, shape)
    return out

  def eval_arrays(self, batch: dict):
    """Pads an eval batch to eval_batch_size with zero-weight rows and places it."""
    bsz = self.c.eval_batch_size
    n = batch["inputs"].shape[0]
    out = {}
    for k in ("inputs", "targets", "weights"):
      x = batch[k]
      if n < bsz:
        pad = np.repeat(x[:1], bsz - n, axis=0)
        if k == "weights":
          pad = np.zeros_like(pad)
        x = np.concatenate([x, pad])
      shape = x.shape
      rows = self._local_rows(self.eval_sh, shape, 0)
      out[k] = jax.make_array_from_process_local_data(self.eval_sh, x[rows], shape)
    return out, n

  def evaluate(self, eval_sets: dict) -> dict:
    """{"eval/<source>/loss", .../token_accuracy, .../exact_match (tasks only)}."""
    out = {}
    for name, (batches, is_task) in eval_sets.items():
      stats = []
      for b in batches:
        arrs, n = self.eval_arrays(b)
        s = jax.device_get(self.eval_fn(self.state["params"], arrs))
        stats.append({k: v[:n] for k, v in s.items()})
      for k, v in eval_lib.summarize(stats).items():
        if k != "examples" and (is_task or k != "exact_match"):
          out[f"eval/{name}/{k}"] = v
    return out

  def model(self) -> nnx.Module:
    """The current model (params gathered to host-addressable arrays, param dtype)."""
    return self.parts.merge(self.state["params"])


def _to_dict(cfg) -> dict:
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


# --- data from config -------------------------------------------------------------------------
def active_sources(c) -> dict:
  """Data sources with a positive weight (weight 0 switches a declared source off)."""
  out = {n: _to_dict(s) for n, s in c.data.sources.items()
         if _to_dict(s).get("weight", 1.0) > 0}
  if not out:
    raise ValueError(f"no data source has a positive weight: {_to_dict(c.data.sources)}")
  return out


def make_mixture(c) -> data_lib.Mixture:
  srcs, weights = {}, {}
  for name, spec in active_sources(c).items():
    weights[name] = spec.get("weight", 1.0)
    srcs[name] = data_lib.make_source(name, spec, c.seq_len + 1, "train")
  return data_lib.Mixture(srcs, weights, c.seed)


def make_eval_sets(c) -> dict:
  sets = {}
  if c.eval_examples <= 0:
    return sets
  for name, spec in active_sources(c).items():
    if spec.get("kind", name) == "files" and not spec.get("eval_paths"):
      continue
    src = data_lib.make_source(name, spec, c.seq_len + 1, "validation")
    sets[name] = (data_lib.eval_batches(src, c.eval_examples, c.eval_batch_size,
                                        c.seed + EVAL_SEED_OFFSET), data_lib.is_task(src))
  return sets


# --- the loop ----------------------------------------------------------------------------------
def maybe_initialize_distributed(mode: str = "auto") -> bool:
  """Calls jax.distributed.initialize() when asked, or ("auto") when the env is multi-host."""
  if mode == "false":
    return False
  env = os.environ
  multi = any(k in env for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS",
                                 "MEGASCALE_COORDINATOR_ADDRESS"))
  multi |= int(env.get("SLURM_NTASKS", "1") or 1) > 1
  multi |= int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
  multi |= "," in env.get("TPU_WORKER_HOSTNAMES", "")
  if mode == "true" or multi:
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d of %d", jax.process_index(),
                 jax.process_count())
    return True
  return False


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN / inf loss; raised at the first such step, before it is saved."""

  def __init__(self, step: int, value: float, last_checkpoint: Optional[int], lr: float):
    self.step, self.value = step, value
    saved = (f"the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None
             else "no checkpoint was written")
    super().__init__(
        f"loss is {value} at step {step} (the first non-finite loss); training stopped "
        f"without saving that state ({saved}). Lower opt.lr (now {lr}), raise "
        "opt.warmup_steps or set opt.clip_norm, or check the data, then resume")


def _check_losses(pending: list, host: list, last_checkpoint, lr) -> None:
  """NonFiniteLossError at the first step of `pending` [(step, metrics)] whose loss is not
  finite (`host`: the same metrics fetched to the host)."""
  for (st, _), h in zip(pending, host):
    v = float(h["loss"])
    if not np.isfinite(v):
      raise NonFiniteLossError(st, v, last_checkpoint, lr)


@contextlib.contextmanager
def _close_on_error(ckpt, writer, pbar):
  """On an exception in the loop: finish pending saves (and their manifests), close files."""
  try:
    yield
  except BaseException:
    if pbar is not None:
      pbar.close()
    if ckpt is not None:
      ckpt.close()
    writer.close()
    raise


def _preempted(flag: bool, step: int, every: int) -> bool:
  """Whether to checkpoint and stop now. One process: as soon as its SIGTERM arrived.

  Several processes must stop at the same step (the save is collective), and the notice
  reaches them at different times: every `every` steps they agree on it, any process's
  flag stopping all (orbax-style preemption sync, over jax.distributed).
  """
  if jax.process_count() == 1:
    return flag
  if step % every:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


class _Preemption:
  """Turns SIGTERM into a flag checked between steps (checkpoint, then stop)."""

  def __init__(self):
    self.flag = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, *_):
    logging.warning("SIGTERM: will checkpoint and stop after this step")
    self.flag = True

  def __exit__(self, *a):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
    return False


def train_and_evaluate(c, workdir: str, *, stop_after_steps: Optional[int] = None,
                       mesh: Optional[Mesh] = None) -> dict:
  """Trains per config `c` in `workdir`, resuming from its latest checkpoint if any.

  Args:
    c: the ml_collections config (see train/configs/default.py).
    workdir: checkpoints, metrics.jsonl, tensorboard/ and export/ go here.
    stop_after_steps: stop (with a checkpoint) after this many steps of this call,
      as a preemption would; None trains to `c.steps`.
    mesh: a (data, model) mesh; default from c.mesh over all devices.

  Returns:
    {"step", "last": last logged train metrics, "eval": last eval metrics,
     "train_seconds", "export_dir"}.
  """
  if not workdir:
    raise ValueError("workdir is empty; pass --workdir")
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(c, mesh)
  mixture = make_mixture(c)
  ckpt = None
  if c.checkpoint_every >= 0:
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 max_to_keep=c.keep_checkpoints,
                                 async_save=c.async_checkpoint)
  latest = ckpt.latest_intact_step() if ckpt else None
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if latest is not None:
    state, data_state = ckpt.restore(latest, trainer.abstract_state, trainer.meta)
    trainer.state = state
    mixture.restore(data_state)
    logging.info("resumed from %s step %d", ckpt.directory, latest)
    if jax.process_index() == 0:
      _truncate_metrics(metrics_path, latest)
  else:
    if jax.process_index() == 0:  # rows of a run that never checkpointed are redone
      _truncate_metrics(metrics_path, 0)
    trainer.init_state()
    if c.init_from:
      warm_start(trainer, c.init_from)
  eval_sets = make_eval_sets(c)
  is_main = jax.process_index() == 0
  writer = metrics_lib.MetricWriter(workdir, tensorboard=c.tensorboard, enabled=is_main)
  fam = trainer.parts.family
  abstract_model = trainer.parts.abstract_model()
  flops_tok = (fam.flops_per_token(abstract_model, c.seq_len) if fam.flops_per_token else
               6.0 * sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(
                   trainer.parts.abstract_params)[0]
                         if shard_lib.path_str(p).split("/")[-1] != "embed"))
  peak = metrics_lib.peak_flops_per_device(c.peak_flops_per_device)
  n_dev = len(trainer.mesh.devices.flat)

  step = trainer.step
  start_step = step
  summary = {"step": step, "last": {}, "eval": {}, "export_dir": None}
  pbar = None
  if c.progress_bar and is_main:
    from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel
    pbar = tqdm.tqdm(total=c.steps, initial=step, desc="train", dynamic_ncols=True)
  pending = []
  t_last, step_last = time.time(), step
  t_start = time.time()
  compile_s = None

  saved_step = [latest]

  def check_pending():
    """Raises NonFiniteLossError before a non-finite state is logged as fine or saved."""
    if pending:
      _check_losses(pending, jax.device_get([m for _, m in pending]), saved_step[0],
                    c.opt.lr)

  def save(step):
    check_pending()
    if ckpt is not None:
      ckpt.save(step, trainer.state, mixture.state(), trainer.meta)
      saved_step[0] = step

  with _Preemption() as preempt, _close_on_error(ckpt, writer, pbar):
    while step < c.steps:
      batch = trainer.train_batch(mixture)
      t0 = time.time()
      trainer.state, m = trainer.step_fn(trainer.state, batch)
      if compile_s is None:
        jax.block_until_ready(m)
        compile_s = time.time() - t0
        t_last, step_last = time.time(), step + 1
        logging.info("first step (compile + run): %.2fs", compile_s)
      step += 1
      pending.append((step, m))
      if pbar is not None:
        pbar.update(1)
      if step % c.log_every == 0 or step == c.steps:
        host = jax.device_get([m for _, m in pending])
        _check_losses(pending, host, saved_step[0], c.opt.lr)
        pending = []
        now = time.time()
        dt, dsteps = now - t_last, step - step_last
        scalars = {k: float(np.mean([h[k] for h in host])) for k in host[-1]}
        scalars["loss_tokens"] = float(sum(h["loss_tokens"] for h in host))
        if dsteps > 0 and dt > 0:
          tps = dsteps * c.batch_size * c.seq_len / dt
          scalars["tokens_per_sec"] = tps
          scalars["steps_per_sec"] = dsteps / dt
          if peak:
            scalars["mfu"] = flops_tok * tps / (peak * n_dev)
        t_last, step_last = now, step
        writer.write(step, scalars, log=pbar is None)
        if pbar is not None:
          pbar.set_postfix(loss=f"{scalars['loss']:.4f}")
          pbar.write(f"step {step}: " + metrics_lib.format_scalars(scalars))
        summary["last"] = scalars
      if c.eval_every > 0 and step % c.eval_every == 0 and step != c.steps and eval_sets:
        ev = trainer.evaluate(eval_sets)
        writer.write(step, ev, log=True)
        summary["eval"] = ev
        t_last, step_last = time.time(), step   # keep eval time out of tokens/s
      stop = _preempted(preempt.flag, step, c.log_every) or (
          stop_after_steps is not None and step - start_step >= stop_after_steps)
      if (c.checkpoint_every > 0 and step % c.checkpoint_every == 0) or step == c.steps \
          or stop:
        save(step)
        t_last, step_last = time.time(), step   # and the blocking part of saving
      if stop:
        logging.warning("stopping at step %d (%s)", step,
                        "SIGTERM" if preempt.flag else "stop_after_steps")
        break
  if pbar is not None:
    pbar.close()
  summary["train_seconds"] = time.time() - t_start
  summary["compile_seconds"] = compile_s
  summary["step"] = step
  if step == c.steps and eval_sets:
    ev = trainer.evaluate(eval_sets)
    writer.write(step, ev, log=True)
    summary["eval"] = ev
  if ckpt is not None:
    ckpt.close()
  if step == c.steps and c.export:
    summary["export_dir"] = export(trainer, c.export_dir or os.path.join(workdir, "export"))
  writer.close()
  summary["trainer"] = trainer
  return summary


def _truncate_metrics(path: str, step: int):
  """Drops rows logged after `step` (a crash after the checkpoint); they will be redone.

  A torn last line (the process was killed while writing it) is dropped with a warning;
  the file is rewritten atomically (temp file + rename), so a kill during the rewrite
  leaves either the old file or the new one.
  """
  if not os.path.exists(path):
    return
  rows, torn = metrics_lib.read_jsonl(path, drop_torn_tail=True)
  if torn:
    logging.warning("%s: dropped a torn last line (%d bytes, not JSON: the run was killed "
                    "while writing it); its step is redone", path, len(torn))
  keep = [r for r in rows if r.get("step", 0) <= step]
  if len(keep) != len(rows) or torn:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)


def warm_start(trainer: Trainer, path: str) -> dict:
  """Copies the parameters of the model saved at `path` into a fresh state.

  `path` is an HF Llama-family directory or a `models.decoder_io` Decoder directory (what
  `export` writes). Parameters whose path and shape match are copied (e.g. Llama -> the
  same Llama with sliding-window layers, or a longer max_position_embeddings); the others
  keep their fresh initialisation. A Llama into a Decoder family goes through
  `models.from_llama.transfer_weights` (embeddings, norms, MLPs, and the attention weights
  each mixer can take): the weight-transfer step of conversion fine-tuning
  (`train/convert.py`). Raises ValueError when nothing matches.

  Returns:
    {"copied": [...], "fresh": [...]} parameter paths.
  """
  from models import decoder as dec  # pylint: disable=import-outside-toplevel
  from models import decoder_io  # pylint: disable=import-outside-toplevel
  from models import from_llama  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(path):
    raise ValueError(f"init_from={path!r} is not a directory")
  src_model = decoder_io.load_any(path, dtype=trainer.c.model.param_dtype)
  src_params = nnx.state(src_model, nnx.Param).to_pure_dict()
  dst_config = trainer.parts.abstract_model().config
  if isinstance(dst_config, dec.DecoderConfig) and not isinstance(src_model, dec.Decoder):
    src = from_llama.transfer_weights(src_params, src_model.config, dst_config)
  else:
    src = {shard_lib.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        src_params)[0]}
  copied, fresh = [], []

  def take(p, x, sh):
    name = shard_lib.path_str(p)
    y = src.get(name)
    if y is not None and tuple(y.shape) == tuple(x.shape):
      copied.append(name)
      return jax.device_put(np.asarray(y, dtype=x.dtype), sh)
    fresh.append(name)
    return x

  params = jax.tree_util.tree_map_with_path(take, trainer.state["params"], trainer.param_sh)
  if not copied:
    raise ValueError(f"init_from={path!r}: no parameter of that model matches this one by "
                     f"path and shape (this model has {sorted(fresh)[:8]}...)")
  trainer.state = dict(trainer.state, params=params)
  logging.info("warm start from %s: copied %d tensors, %d fresh: %s", path, len(copied),
               len(fresh), fresh)
  return {"copied": copied, "fresh": fresh}


def trained_tokenizer(c) -> str:
  """The `tokenizer` setting the active text sources share ("" = UTF-8 bytes).

  ValueError when they name different tokenizers: such a model has no one tokenizer to
  export.
  """
  specs = {str(s.get("tokenizer", "")) for s in active_sources(c).values()}
  specs = {"" if s in data_lib.BYTES else s for s in specs}
  if len(specs) > 1:
    raise ValueError(f"data sources use different tokenizers {sorted(specs)}; export "
                     "writes one tokenizer, so train with one")
  return specs.pop() if specs else ""


def export(trainer: Trainer, path: str) -> str:
  """Writes the trained model (family exporter, e.g. HF safetensors) + its tokenizer.

  The tokenizer is the one the text sources were tokenised with (`trained_tokenizer`):
  its tokenizer.json, tokenizer_config.json and generation_config.json, with the special
  ids of config.json set to its own; the byte tokenizer's file otherwise. Every process
  must call it (parameters sharded across hosts are all-gathered); process 0 writes.
  """
  spec = trained_tokenizer(trainer.c)
  params = trainer.state["params"]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    params = multihost_utils.process_allgather(params, tiled=True)
  params = jax.device_get(params)
  if jax.process_index() == 0:
    trainer.parts.family.export(trainer.parts.merge(params), path)
    if spec:
      tok = data_lib.load_tokenizer(spec)
      tok.save(path)
      _set_special_ids(os.path.join(path, "config.json"), tok)
    else:
      ByteTokenizer().save(path)
    logging.info("exported model to %s", path)
  return path


def _set_special_ids(config_path: str, tok) -> None:
  """config.json's bos/eos/pad ids made the tokenizer's (a byte-model preset names 256..)."""
  if not os.path.isfile(config_path):
    return
  with open(config_path) as f:
    cfg = json.load(f)
  for key, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id),
                 ("pad_token_id", tok.pad_id)):
    if key in cfg or v is not None:
      cfg[key] = v
  with open(config_path, "w") as f:
    json.dump(cfg, f, indent=1)
