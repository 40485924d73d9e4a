r"""Adaptive pipeline vs every single technique, at equal memory budgets, on one model.

    python -m experiments.bench_policy                       # models/default, default grid
    python -m experiments.bench_policy --budgets=0.5,0.25,0.125 --lengths=2048 --n=32 \
        --families=streaming_llm,knorm,snapkv,expected_attention,int8,int4,kivi2,snapkv+int8
    python -m experiments.bench_policy --scenarios=all --scenario_budget=0.3   # recommend()
    python -m experiments.bench_policy --model=tiny --lengths=256 --n=2 --calib_n=2 \
        --budgets=0.5 --families=knorm,int4 --tasks=passkey,perplexity     # smoke

The claim under test, after the adaptive multi-stage pipelines that "KV Cache Optimization
Strategies for Scalable and Efficient LLM Inference" (arXiv:2603.20397) argues for: the
adaptive pipeline should dominate each single technique on the default model's frontier;
where it does not, the report says so.

1. Singles: every --families family is configured for every --budgets value (a fraction
   of the bf16 full cache; kvjax.policy.single_at_budget sized by exact layer bytes at the
   calibration context length: presses keep the tokens that fit, press+kind keeps what fits
   after quantization, a kind alone only where its bytes fit, fixed costs such as KIVI's
   residual window included). Infeasible pairs are listed as such.
2. Calibration (kvjax.policy.calibrate): samples of the same tasks with a different seed
   (--calib_seed; held-out text windows differ too) are prefilled once; every single stage
   (also those sized for --pool_budgets) is applied to one layer at a time and scored by
   the KL of the teacher-forced answer / continuation logits against the full cache
   (--heads: per kv head too). Per budget the
   adaptive pipeline is the best, by measured calibration KL, of the optimal per-layer plan
   and every uniform plan that fits (so it never loses on calibration data).
3. Evaluation: experiments.compare's harness (query-agnostic protocol, exact bytes from
   kvjax.memory) on the evaluation samples, one row per technique; the table gives each
   budget's singles and the adaptive pipeline side by side.
4. Verdict, per budget and task: the adaptive pipeline dominates a single technique when
   its score is at least as good (accuracy >=, perplexity <=) with no more bytes (within
   --byte_slack); every pair where it does not is printed with the margin. A frontier
   check lists single points that no adaptive point dominates at all.

With --scenarios, `kvjax.policy.recommend` is run for those deployment scenarios at
--scenario_budget on the same model, its candidates verified by this harness
(`harness_verify`), and the recommendation printed.

Outputs in --out_dir: results.jsonl/csv (compare's schema; family "adaptive" for the
pipelines), verdicts.json, profile.txt, run.json, frontier.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags

from experiments import compare
from experiments import flagcheck

FLAGS = flags.FLAGS

DEFAULT_TECHNIQUES = ("streaming_llm", "knorm", "snapkv", "expected_attention", "int8", "int4",
                      "kivi2", "snapkv+int8")

# Shared with experiments.compare (imported above, which defines them): --model, --tasks,
# --lengths, --n, --ppl_continuation, --batch_size, --cache_dtype, --backend, --seed,
# --out_dir, --plots, --progress, --compilation_cache. This launcher changes the defaults of
# some of them (POLICY_DEFAULTS) and ignores compare's --techniques, --ratios and --mode.
POLICY_DEFAULTS = {"tasks": ["passkey", "kv_retrieval", "perplexity"], "lengths": ["1024"],
                   "out_dir": "policy_results"}

flags.DEFINE_list("families", list(DEFAULT_TECHNIQUES), "Single-technique families: a press "
                  "(any of kvjax.policy.pipeline.press_names(), read from the press registry), "
                  "a kind (int8, int4, int2, kivi4, kivi2, fp8_e4m3, fp8_e5m2) or press+kind; "
                  "each is configured for every --budgets value.")
flags.DEFINE_list("budgets", ["0.5", "0.3", "0.15"], "Memory budgets: KV bytes as fractions of "
                  "the bf16 full cache of the same tokens, each in (0, 1].")
flags.DEFINE_list("pool_budgets", ["0.1", "0.75"], "Extra budgets whose sized techniques the "
                  "adaptive pipelines may also pick per layer (not evaluated as singles).")
flags.DEFINE_integer("calib_n", 4, "Calibration samples per task.")
flags.DEFINE_integer("calib_length", 0, "Calibration context length (0: the first --lengths).")
flags.DEFINE_integer("calib_seed", 1000, "Seed of the calibration samples (evaluation uses "
                     "--seed); different seeds give different keys and text windows.")
flags.DEFINE_bool("heads", False, "Also profile every kv head (C x L x H extra passes); the "
                  "per-head table goes to profile.txt.")
flags.DEFINE_float("byte_slack", 0.02, "Verdict: the adaptive pipeline may hold this fraction "
                   "more bytes than a single technique and still count as 'no more bytes'.")
flags.DEFINE_list("scenarios", [], "kvjax.policy.recommend scenarios to run and verify "
                  "('all' = the seven), at --scenario_budget.")
flags.DEFINE_float("scenario_budget", 0.3, "Memory budget of the --scenarios recommendations.")
# (compare's shared flags carry compare's validators)
flagcheck.float_lists("budgets", lo=0.0, hi=1.0, lo_open=True)
flagcheck.float_lists("pool_budgets", lo=0.0, hi=1.0, lo_open=True, nonempty=False)
flagcheck.ints("calib_n", lo=1)
flagcheck.ints("calib_length", "calib_seed", lo=0)
flagcheck.floats("byte_slack", lo=0.0)
flagcheck.floats("scenario_budget", lo=0.0, hi=1.0, lo_open=True)


# --- calibration on a model -------------------------------------------------------------------
@dataclasses.dataclass
class Calibration:
  """One prefilled calibration batch and the functions the kvjax profiler needs.

  Attributes:
    model, cache (full-precision ModelCache of the contexts), obs (per-layer observations),
    chunk / chunk_mask ([B, Tq] question + answer[:-1], or the continuation), scored
    ([B, Tq] bool: positions whose logits predict an answer / continuation token), room
    (free slots a compressed cache keeps for the chunk), prompt_length.
  """

  model: Any
  cache: Any
  obs: Any
  chunk: Any
  chunk_mask: Any
  scored: Any
  room: int
  prompt_length: int
  _base: Any = None

  def next_logits(self, cache):
    """Teacher-forced logits [N, V] at the scored positions (the cache is donated)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import models  # pylint: disable=import-outside-toplevel
    logits, _ = models.decode(self.model, self.chunk, cache, attention_mask=self.chunk_mask,
                              check_capacity=False)
    return np.asarray(logits, np.float32)[self.scored]

  def compress(self, pipeline, room=None):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    return pipeline.compress_model(jax.tree.map(jnp.copy, self.cache), self.obs,
                                   self.model.config, room=self.room if room is None else room,
                                   prompt_length=self.prompt_length)

  def evaluate(self, pipeline) -> float:
    """KL(full || pipeline) on the scored positions."""
    from kvjax.policy import calibrate  # pylint: disable=import-outside-toplevel
    from kvjax.policy import pipeline as pl  # pylint: disable=import-outside-toplevel
    if self._base is None:
      full = pl.AdaptivePipeline.uniform(pl.Stage(), self.cache.num_layers)
      self._base = self.next_logits(self.compress(full))
    return calibrate.kl_divergence(self._base, self.next_logits(self.compress(pipeline)))

  def profile(self, candidates, *, heads=False):
    from kvjax.policy import calibrate  # pylint: disable=import-outside-toplevel
    return calibrate.profile(self.next_logits, self.cache, candidates, obs_list=self.obs,
                             config=self.model.config, room=self.room,
                             prompt_length=self.prompt_length, heads=heads)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def calibrate_on(model, tokenizer, samples: Sequence, *, observe, cache_dtype="bfloat16",
                 backend="auto") -> Calibration:
  """Prefills every calibration sample in one batch (contexts left-padded, chunks right-
  padded) with the observations `observe` that the candidate presses need."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  if not samples:
    raise ValueError("calibration needs at least one sample")
  pad = getattr(tokenizer, "pad_id", None) or 0
  ctxs, chunks, spans = [], [], []
  for s in samples:
    c, q = s.prompt_tokens(tokenizer)
    if s.metric == "nll":            # predict q[1:] from q[:-1]
      ch, start, n = q[:-1], 0, len(q) - 1
    else:                            # question, then the answer teacher-forced
      ans = tokenizer.encode(s.answers[0])
      ch, start, n = q + ans[:-1], len(q) - 1, len(ans)
    ctxs.append(c)
    chunks.append(ch)
    spans.append((start, n))
  b = len(samples)
  tc, tq = max(map(len, ctxs)), _round_up(max(map(len, chunks)), 16)
  ctx = np.full((b, tc), pad, np.int32)
  cmask = np.zeros((b, tc), np.int32)
  chunk = np.full((b, tq), pad, np.int32)
  qmask = np.zeros((b, tq), np.int32)
  scored = np.zeros((b, tq), bool)
  for i, (c, ch, (start, n)) in enumerate(zip(ctxs, chunks, spans)):
    ctx[i, tc - len(c):] = c
    cmask[i, tc - len(c):] = 1
    chunk[i, :len(ch)] = ch
    qmask[i, :len(ch)] = 1
    scored[i, start:start + n] = True
  _, cache, obs = models.prefill(model, jnp.asarray(ctx), attention_mask=jnp.asarray(cmask),
                                 logits="last", cache_dtype=cache_dtype, backend=backend,
                                 observe=observe)
  return Calibration(model, cache, obs, jnp.asarray(chunk), jnp.asarray(qmask), scored, tq, tc)


# --- verification through experiments.compare ---------------------------------------------------
def quality_drop(scores: dict, full: dict) -> float:
  """Largest loss over tasks: relative perplexity increase, absolute accuracy drop."""
  drops = []
  for task, f in full.items():
    if task not in scores or f is None or scores[task] is None:
      continue
    drops.append((scores[task] - f) / f if task == "perplexity" else f - scores[task])
  return max(drops) if drops else float("nan")


def harness_verify(model, tokenizer, samples, *, batch_size=8, cache_dtype="bfloat16",
                   backend="auto", model_name=""):
  """fn(plan) -> {"quality_drop", "kv_factor", per-task scores}: a kvjax.policy.Plan (or a
  bare pipeline) against the full cache on `samples`, through experiments.compare (the
  full cache is run once). The plan runs whole: its pipeline compresses, an offloaded plan
  decodes from host memory (kv_factor: the bf16 full cache over the bytes the device holds
  during a step), and "runtime_policy" records the serving policy it comes with."""
  from experiments import results  # pylint: disable=import-outside-toplevel
  memo = {}

  def scores_of(tech):
    rows, _ = compare.run(model, tokenizer, [tech], samples, batch_size=batch_size,
                          cache_dtype=cache_dtype, backend=backend, decode_steps=0,
                          progress=False, model_name=model_name)
    return results.summary(rows)[0]

  def verify(plan):
    if "full" not in memo:
      memo["full"] = scores_of(compare.Technique("full", "full"))
    s = scores_of(compare.Technique(plan.label, "adaptive", custom=plan))
    out = {"quality_drop": quality_drop(s["scores"], memo["full"]["scores"]),
           "kv_factor": s["kv_factor"]}
    if getattr(plan, "runtime_policy", None) is not None:
      out["runtime_policy"] = plan.runtime_policy
    out.update({f"{t}": v for t, v in s["scores"].items()})
    out.update({f"full_{t}": v for t, v in memo["full"]["scores"].items()})
    return out

  return verify


def recommend_on_model(model, tokenizer, scenario: str, memory_budget: float, *,
                       eval_samples, calib_samples, batch_size=8, cache_dtype="bfloat16",
                       backend="auto", max_tries=3):
  """kvjax.policy.recommend for `scenario`, calibrated and verified on this model."""
  from kvjax import policy  # pylint: disable=import-outside-toplevel
  cfg = model.config
  tokens = max(len(s.prompt_tokens(tokenizer)[0]) for s in calib_samples)
  stages = policy.scenario_stages(memory_budget, cfg.head_dim, [scenario], tokens=tokens)
  cal = calibrate_on(model, tokenizer, calib_samples, observe=_merged_observe(stages),
                     cache_dtype=cache_dtype, backend=backend)
  prof = cal.profile(stages)
  verify = harness_verify(model, tokenizer, eval_samples, batch_size=batch_size,
                          cache_dtype=cache_dtype, backend=backend)
  return policy.recommend(scenario, memory_budget, num_layers=cfg.num_layers,
                          head_dim=cfg.head_dim, profile=prof, evaluate=cal.evaluate,
                          verify=verify, max_tries=max_tries, tokens=tokens)


def _merged_observe(stage_labels):
  from kvjax.observation import Observe  # pylint: disable=import-outside-toplevel
  from kvjax.policy.pipeline import Stage  # pylint: disable=import-outside-toplevel
  need = Observe()
  for label in stage_labels:
    p = Stage.parse(label).build_press()
    if p is not None:
      need = need.merge(p.observe)
  return need


# --- verdicts -----------------------------------------------------------------------------------
def better_or_equal(task: str, a: float, b: float) -> bool:
  """a at least as good as b (perplexity: lower is better; accuracies: higher)."""
  return a <= b if task == "perplexity" else a >= b


def verdicts(summary: dict, plan: dict, adaptive: dict, byte_slack: float = 0.02) -> list:
  """Adaptive vs each single technique, per budget and task.

  Args:
    summary: technique label -> {"scores": {task: score}, "kv_bytes": bytes}.
    plan: budget -> [(family, single label or None if infeasible)].
    adaptive: budget -> adaptive label.

  Returns: dicts (budget, family, single, task, adaptive_score, single_score,
    adaptive_bytes, single_bytes, dominates, why).
  """
  out = []
  for b, fams in plan.items():
    a = summary[adaptive[b]]
    for fam, label in fams:
      if label is None:
        continue
      s = summary[label]
      more_bytes = a["kv_bytes"] > s["kv_bytes"] * (1 + byte_slack)
      for task, sv in s["scores"].items():
        av = a["scores"].get(task)
        worse = av is None or not better_or_equal(task, av, sv)
        why = []
        if worse:
          why.append(f"{task} {av:.4g} vs {sv:.4g}")
        if more_bytes:
          why.append(f"bytes {a['kv_bytes']:,.0f} vs {s['kv_bytes']:,.0f}")
        out.append(dict(budget=b, family=fam, single=label, task=task, adaptive=adaptive[b],
                        adaptive_score=av, single_score=sv, adaptive_bytes=a["kv_bytes"],
                        single_bytes=s["kv_bytes"], dominates=not (worse or more_bytes),
                        why="; ".join(why)))
  return out


def frontier_gaps(summary: dict, singles: Sequence[str], adaptives: Sequence[str],
                  byte_slack: float = 0.02) -> list:
  """(single, task) points that no adaptive point dominates (<= bytes, >= quality)."""
  out = []
  for s in singles:
    for task, sv in summary[s]["scores"].items():
      ok = any(summary[a]["kv_bytes"] <= summary[s]["kv_bytes"] * (1 + byte_slack)
               and task in summary[a]["scores"]
               and better_or_equal(task, summary[a]["scores"][task], sv) for a in adaptives)
      if not ok:
        out.append((s, task))
  return out


def _technique(label, stage, pipeline):
  fam = "press+quant" if stage.press and stage.quant else ("press" if stage.press else "quant")
  return compare.Technique(label, fam, press=stage.press, ratio=stage.ratio or None,
                           quant=stage.quant, custom=pipeline)


def run(model, tokenizer, *, budgets: Sequence[float], families: Sequence[str],
        eval_samples, calib_samples, pool_budgets: Sequence[float] = (), heads=False,
        byte_slack=0.02, batch_size=8, cache_dtype="bfloat16", backend="auto",
        progress=True, model_name=""):
  """The whole benchmark; returns a dict (rows, summary, plan, adaptive, verdicts, ...).

  The adaptive pipelines choose per layer among the families sized for every budget in
  `budgets` and `pool_budgets` (the latter only widen the choice: e.g. an insensitive
  layer at 0.1 pays for a sensitive one at 0.75); singles are evaluated at `budgets`.
  """
  from experiments import results  # pylint: disable=import-outside-toplevel
  from kvjax.policy import calibrate  # pylint: disable=import-outside-toplevel
  from kvjax.policy import pipeline as pl  # pylint: disable=import-outside-toplevel
  cfg = model.config
  # Singles are sized by exact bytes at the calibration context length (= the first
  # evaluation length by default): fixed costs such as KIVI's residual window count.
  tokens = max(len(s.prompt_tokens(tokenizer)[0]) for s in calib_samples)
  for name, bs in (("budgets", budgets), ("pool_budgets", pool_budgets)):
    for b in bs:
      if not 0 < b <= 1:
        raise ValueError(f"--{name}: {b} is not in (0, 1]")
  plan, stages, pool = {}, {}, {}
  for b in list(budgets) + [b for b in pool_budgets if b not in budgets]:
    evaluated = b in budgets
    if evaluated:
      plan[b] = []
    for fam in families:
      try:
        st = pl.single_at_budget(fam, b, cfg.head_dim, tokens=tokens, dtype=cache_dtype)
      except ValueError as e:
        raise ValueError(f"--families: {fam!r} does not apply to this model "
                         f"(head_dim={cfg.head_dim}): {e}") from e
      if evaluated:
        plan[b].append((fam, None if st is None else st.label))
      if st is not None:
        pool.setdefault(st.label, st)
        if evaluated:
          stages.setdefault(st.label, st)
  if not stages:
    raise ValueError(f"no technique of {list(families)} fits any budget of {list(budgets)}")
  candidates = ["full"] + [l for l in pool if l != "full"]
  t0 = time.time()
  cal = calibrate_on(model, tokenizer, calib_samples, observe=_merged_observe(candidates),
                     cache_dtype=cache_dtype, backend=backend)
  prof = cal.profile(candidates, heads=heads)
  adaptive, choice_kls = {}, {}
  for b in budgets:
    pipe, kls = calibrate.choose(prof, b, cal.evaluate, name=f"adaptive@{b:g}")
    adaptive[b] = pipe
    choice_kls[b] = kls
  calib_s = time.time() - t0
  techs = [compare.Technique("full", "full")]
  for label, st in stages.items():
    if label != "full":
      techs.append(_technique(label, st, pl.AdaptivePipeline.uniform(st, cfg.num_layers,
                                                                     name=label)))
  for b, pipe in adaptive.items():
    techs.append(compare.Technique(pipe.name, "adaptive", custom=pipe))
  rows, info = compare.run(model, tokenizer, techs, eval_samples, batch_size=batch_size,
                           cache_dtype=cache_dtype, backend=backend, decode_steps=0,
                           progress=progress, model_name=model_name)
  by_name = {p.name: p for p in adaptive.values()}
  for r in rows:
    if r["family"] == "adaptive":
      r["stages"] = [s.label for s in by_name[r["technique"]].stages]
  lengths = sorted({r["length"] for r in rows})
  by_length = {}
  for length in lengths:
    summ = {s["technique"]: s for s in results.summary(rows, length=length)}
    adaptive_labels = {b: p.name for b, p in adaptive.items()}
    single_labels = [l for l in stages if l != "full"]
    by_length[length] = dict(
        summary=summ,
        verdicts=verdicts(summ, plan, adaptive_labels, byte_slack),
        gaps=frontier_gaps(summ, single_labels, list(adaptive_labels.values()), byte_slack))
  return dict(rows=rows, info=info, plan=plan, adaptive=adaptive, choice_kls=choice_kls,
              profile=prof, by_length=by_length, calib_seconds=calib_s)


def _fmt_score(task, v):
  if v is None:
    return "-"
  return f"{v:.2f}" if task == "perplexity" else f"{100 * v:.1f}"


def report(out: dict, byte_slack: float) -> str:
  """The text the launcher prints: per budget, singles and the adaptive pipeline; verdicts."""
  lines = []
  for length, res in out["by_length"].items():
    summ = res["summary"]
    tasks = list(summ["full"]["scores"]) if "full" in summ else []
    head = (f"{'budget':>6}  {'technique':<34} {'KV bytes/seq':>12} {'x bf16':>7}  "
            + "  ".join(f"{t[:12]:>12}" for t in tasks))
    lines += [f"context length {length} (accuracy % / perplexity; query-agnostic)", head,
              "-" * len(head)]

    def row(bud, label, name=None):
      s = summ[label]
      return (f"{bud:>6}  {(name or label)[:34]:<34} {s['kv_bytes'] or 0:>12,.0f} "
              f"{s['kv_factor'] or 0:>7.2f}  "
              + "  ".join(f"{_fmt_score(t, s['scores'].get(t)):>12}" for t in tasks))

    if "full" in summ:
      lines.append(row("1", "full"))
    for b, fams in out["plan"].items():
      for fam, label in fams:
        if label is None:
          lines.append(f"{b:>6g}  {fam:<34} {'(does not fit this budget)':>12}")
        else:
          lines.append(row(f"{b:g}", label))
      pipe = out["adaptive"][b]
      lines.append(row(f"{b:g}", pipe.name,
                       f"{pipe.name} [{', '.join(s.label for s in pipe.stages)}]"))
    full_acc = [v for t, v in summ.get("full", {"scores": {}})["scores"].items()
                if t != "perplexity"]
    lines.append("")
    bad = [v for v in res["verdicts"] if not v["dominates"]]
    n_all = len(res["verdicts"])
    lines.append(f"verdict: the adaptive pipeline dominates {n_all - len(bad)} of {n_all} "
                 f"(budget, single technique, task) comparisons (no more bytes, +{byte_slack:.0%}"
                 " slack, and at least the same score)")
    if full_acc and max(full_acc) < 0.5:
      lines.append("  note: the full cache itself is below 50% on every accuracy task; accuracy"
                   " comparisons are at chance level here, perplexity is the informative one")
    if bad:
      lines.append("where it does not:")
      for v in bad:
        lines.append(f"  budget {v['budget']:g}: {v['adaptive']} vs {v['single']} on "
                     f"{v['task']}: {v['why']}")
    else:
      lines.append("  it dominates every single technique at every budget")
    gaps = res["gaps"]
    lines.append("frontier: " + ("every single-technique point is dominated by some adaptive "
                                 "point" if not gaps else
                                 "single-technique points no adaptive point dominates: "
                                 + ", ".join(f"{s} ({t})" for s, t in gaps)))
    lines.append("")
  return "\n".join(lines)


def _flag(name):
  """A shared flag's value, with this launcher's default where the command line has none
  (FLAGS.set_default would change compare's defaults for the whole process)."""
  if name in POLICY_DEFAULTS and not FLAGS[name].present:
    return POLICY_DEFAULTS[name]
  return FLAGS[name].value


def _floats(xs, name):
  try:
    return [float(x) for x in xs]
  except ValueError as e:
    raise app.UsageError(f"--{name}: {e}") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.compilation_cache:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import plots  # pylint: disable=import-outside-toplevel
  from experiments import results  # pylint: disable=import-outside-toplevel
  from kvjax import policy  # pylint: disable=import-outside-toplevel

  budgets = _floats(FLAGS.budgets, "budgets")
  lengths = [int(x) for x in _floats(_flag("lengths"), "lengths")]
  scenarios = list(policy.SCENARIOS) if FLAGS.scenarios == ["all"] else FLAGS.scenarios
  for s in scenarios:
    if s not in policy.SCENARIOS:
      raise app.UsageError(f"--scenarios: {s!r}; allowed: {tuple(policy.SCENARIOS)} or 'all'")
  try:
    model, tok = compare.load_model(FLAGS.model)
    calib_len = FLAGS.calib_length or lengths[0]
    eval_samples = compare.build_samples(_flag("tasks"), lengths, FLAGS.n, [], [], 0, FLAGS.seed,
                                         FLAGS.ppl_continuation, 0, 0)
    calib_samples = compare.build_samples(_flag("tasks"), [calib_len], FLAGS.calib_n, [], [], 0,
                                          FLAGS.calib_seed, FLAGS.ppl_continuation, 0, 0)
    name = "models/default" if FLAGS.model == "default" else FLAGS.model
    t0 = time.time()
    out = run(model, tok, budgets=budgets, families=FLAGS.families,
              pool_budgets=_floats(FLAGS.pool_budgets, "pool_budgets"),
              eval_samples=eval_samples, calib_samples=calib_samples, heads=FLAGS.heads,
              byte_slack=FLAGS.byte_slack, batch_size=FLAGS.batch_size,
              cache_dtype=FLAGS.cache_dtype, backend=FLAGS.backend, progress=FLAGS.progress,
              model_name=name)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  title = (f"kvjax bench_policy: {name}, {jax.devices()[0].platform}, budgets {budgets}, "
           f"{len(eval_samples)} eval / {len(calib_samples)} calibration samples")
  print(title)
  print(report(out, FLAGS.byte_slack))
  out_dir = _flag("out_dir")
  os.makedirs(out_dir, exist_ok=True)
  own = FLAGS.get_key_flags_for_module(sys.modules[__name__])
  shared = ("model", "tasks", "lengths", "n", "ppl_continuation", "batch_size", "cache_dtype",
            "backend", "seed")
  meta = {"flags": {**{f.name: f.value for f in own}, **{n: _flag(n) for n in shared}},
          "model": name, "calibration_seconds": out["calib_seconds"],
          "adaptive": {str(b): [s.label for s in p.stages] for b, p in out["adaptive"].items()},
          "choice_kl": {str(b): k for b, k in out["choice_kls"].items()},
          "wall_seconds": time.time() - t0}
  paths = results.write(out["rows"], out_dir, meta)
  vpath = os.path.join(out_dir, "verdicts.json")
  with open(vpath, "w") as f:
    json.dump({str(l): {"verdicts": r["verdicts"], "frontier_gaps": r["gaps"]}
               for l, r in out["by_length"].items()}, f, indent=1, default=str)
  ppath = os.path.join(out_dir, "profile.txt")
  with open(ppath, "w") as f:
    f.write(out["profile"].table() + "\n")
  paths.update(verdicts=vpath, profile=ppath)
  if FLAGS.plots:
    p = plots.frontier(out["rows"], os.path.join(out_dir, "frontier.png"), title)
    if p:
      paths["frontier"] = p
  if scenarios:
    print(f"recommendations at budget {FLAGS.scenario_budget:g} (verified on {name}):")
    for s in scenarios:
      rec = recommend_on_model(model, tok, s, FLAGS.scenario_budget, eval_samples=eval_samples,
                               calib_samples=calib_samples, batch_size=FLAGS.batch_size,
                               cache_dtype=FLAGS.cache_dtype, backend=FLAGS.backend)
      print(rec)
  print(f"\nwrote {', '.join(sorted(paths.values()))} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
  app.run(main)
