"""Adaptive pipelines (kvjax.policy.pipeline), the calibration profiler (calibrate) and
recommend(): budgets in exact bytes, per-layer stages vs hand-applied presses/quantizers,
profiled KL vs a hand computation, the knapsack vs brute force, scenario verification."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import memory, mixed, policy, presses, quant
from kvjax.cache import ModelCache
from kvjax.policy import calibrate
from kvjax.policy.pipeline import AdaptivePipeline, Stage, single_at_budget
from models import transformer as tfm

CFG = models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
T, ROOM = 96, 8


@functools.lru_cache(maxsize=None)
def _setup():
  """Model, bf16 prefill cache of 2 x 96 tokens with SnapKV + EA observations, next tokens."""
  m = models.Transformer(CFG, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(5), (2, T + ROOM), 0, 256, dtype=jnp.int32)
  need = AdaptivePipeline(("snapkv@0.5", "expected_attention@0.5")).observe
  _, cache, obs = models.prefill(m, tok[:, :T], cache_dtype="bfloat16", observe=need)
  return m, tok, cache, obs


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _next_logits(m, tok):
  def fn(cache):
    lg, _ = models.decode(m, tok[:, T:], cache, check_capacity=True)
    return np.asarray(lg, np.float32).reshape(-1, lg.shape[-1])
  return fn


def _kl(p, q):   # numpy reference
  p = p.astype(np.float64)
  q = q.astype(np.float64)
  lp = p - p.max(-1, keepdims=True)
  lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
  lq = q - q.max(-1, keepdims=True)
  lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def test_stage_names_round_trip_and_errors_name_the_argument():
  for name in ("full", "snapkv@0.75", "int4", "knorm@0.5+int8"):
    assert Stage.parse(name).label == name
  assert Stage.parse("snapkv@0.5+int8").family == "snapkv+int8"
  with pytest.raises(ValueError, match=r"press='snap'; allowed: \('adakv', .*'snapkv'"):
    Stage(press="snap", ratio=0.5)
  with pytest.raises(ValueError, match=r"quant='int3'; allowed"):
    Stage.parse("int3")
  with pytest.raises(ValueError, match=r"ratio=1.5; a press needs a fraction removed in \(0, 1\)"):
    Stage.parse("knorm@1.5")
  with pytest.raises(ValueError, match=r"memory_budget=0; must be in \(0, 1\]"):
    single_at_budget("knorm", 0, 16)
  with pytest.raises(ValueError, match=r"family='nope'; allowed: 'full'"):
    single_at_budget("nope", 0.5, 16)
  with pytest.raises(ValueError, match="pipeline has 3 stages; the cache holds 2 layers"):
    _, _, cache, obs = _setup()
    AdaptivePipeline(("full",) * 3).compress_model(cache, obs, CFG)


@pytest.mark.parametrize("family,budget,exact", [
    ("snapkv", 0.3, False), ("int4", 0.5, False), ("knorm+int8", 0.3, False),
    ("expected_attention+int4", 0.2, False), ("knorm+int8", 0.3, True),
    ("snapkv+int4", 0.25, True)])
def test_single_at_budget_fits_the_budget_in_exact_bytes(family, budget, exact):
  """Given a budget b, the technique configured for it holds at most b of the bf16 full
  cache's bytes (kvjax.memory, scales and positions included) and, when it evicts, not
  much less (the budget is used, not wasted); exact=True sizes it by the layer bytes at
  the prompt's length (fixed costs included)."""
  _, _, cache, obs = _setup()
  st = single_at_budget(family, budget, CFG.head_dim, tokens=T if exact else None)
  assert st is not None and st.family == family
  out = AdaptivePipeline.uniform(st, CFG.num_layers).compress_model(_copy(cache), obs, CFG)
  rep = memory.report(out, tokens=[T, T])
  share = (rep.total - 8) / (rep.reference - 8)          # next_position aside
  assert share <= budget + 1e-9
  if st.press is not None:
    assert share >= budget - 2 / T                        # token rounding only
  assert single_at_budget("int8", 0.5, CFG.head_dim) is None   # 76/132 bytes: does not fit


def test_pipeline_equals_presses_and_quantizers_applied_by_hand():
  """Layer 0 SnapKV@0.5, layer 1 int4: the pipeline's cache decodes exactly like a cache built
  by calling the press and the quantizer on each layer directly."""
  m, tok, cache, obs = _setup()
  pipe = AdaptivePipeline((Stage(press="knorm", ratio=0.5), Stage(quant="int4")))
  got = pipe.compress_model(_copy(cache), obs, CFG, room=ROOM, prompt_length=T)
  l0, l1 = cache.layers()
  o0 = dict(obs[0], next_position=cache.next_position)
  ref0 = presses.KnormPress(compression_ratio=0.5)(l0, o0, layer_idx=0, num_layers=2,
                                                      rope=CFG.rope, room=ROOM)
  ref1 = quant.convert_layer(l1, "int4", room=ROOM)
  ref = ModelCache.from_layers([ref0, ref1], jnp.copy(cache.next_position),
                               keys=tfm.layer_keys(CFG))
  assert got.nbytes == ref.nbytes
  a = _next_logits(m, tok)(got)
  b = _next_logits(m, tok)(ref)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_profile_kl_and_bytes_match_a_hand_computation():
  """KL of 'int4' at layer l (and at kv head h of layer l) equals a numpy KL of logits from a
  cache quantized by hand (mixed.split_heads for one head); byte fractions equal the hand-
  quantized layer's nbytes over a bf16 full layer of the prompt."""
  m, tok, cache, obs = _setup()
  fn = _next_logits(m, tok)
  prof = calibrate.profile(fn, cache, ["full", "int4"], obs_list=obs, config=CFG, room=ROOM,
                           prompt_length=T, heads=True)
  assert prof.names == ("full", "int4")
  np.testing.assert_array_equal(prof.kl[0], [0.0, 0.0])
  padded = presses.compress_model([None, None], _copy(cache), None, CFG, rooms=ROOM)
  base = fn(_copy(padded))
  keys = tfm.layer_keys(CFG)
  for li in range(2):
    layers = list(padded.layers())
    layers[li] = quant.convert_layer(cache.layers()[li], "int4", room=ROOM)
    mc = ModelCache.from_layers(layers, jnp.copy(cache.next_position), keys=keys)
    bf16 = memory.dense_bf16_bytes(2, 2, T, 16, 16)
    assert prof.fraction[1, li] == pytest.approx(
        quant.convert_layer(cache.layers()[li], "int4").nbytes / bf16)
    assert prof.fraction[0, li] == pytest.approx(cache.layers()[li].nbytes / bf16)   # bf16
    assert prof.kl[1, li] == pytest.approx(_kl(base, fn(mc)), rel=1e-3, abs=1e-7)
    for h in range(2):
      groups = ((1, "int4"), (1, None)) if h == 0 else ((1, None), (1, "int4"))
      split = mixed.split_heads(padded.layers()[li], groups)
      layers = list(padded.layers())
      layers[li] = split
      mc = ModelCache.from_layers([_copy(c) for c in layers], jnp.copy(cache.next_position))
      assert prof.head_kl[1, li, h] == pytest.approx(_kl(base, fn(mc)), rel=1e-3, abs=1e-7)
  assert prof.kl[1].max() > 0
  assert calibrate.head_scores(prof, "int4")[1][0] == prof.head_kl[1, 1, 0]


def _brute(prof, budget):
  c, n = prof.kl.shape
  best = None
  for combo in itertools.product(range(c), repeat=n):
    if sum(prof.fraction[j, l] for l, j in enumerate(combo)) <= budget * n + 1e-9:
      kl = sum(prof.kl[j, l] for l, j in enumerate(combo))
      best = kl if best is None else min(best, kl)
  return best


def test_plan_is_the_brute_force_optimum():
  """The knapsack DP vs brute force over every combination (random KLs, fractions on a 0.01
  grid so the DP's discretisation is exact): same least KL, always within the budget."""
  rng = np.random.default_rng(0)
  names = ("full", "a", "b", "c")
  for _ in range(30):
    kl = rng.uniform(0, 1, (4, 3))
    kl[0] = 0.0
    fr = np.round(rng.uniform(0.1, 1, (4, 3)), 2)
    fr[0] = 1.0
    prof = calibrate.Profile(names, kl, fr)
    for budget in (0.3, 0.5, 0.8):
      best = _brute(prof, budget)
      if best is None:
        with pytest.raises(ValueError, match=f"memory_budget={budget} is below the cheapest"):
          calibrate.plan(prof, budget)
        continue
      idx = [names.index(s) for s in calibrate.plan(prof, budget)]
      assert sum(fr[j, l] for l, j in enumerate(idx)) <= budget * 3 + 1e-9
      assert sum(kl[j, l] for l, j in enumerate(idx)) == pytest.approx(best)


def test_choose_returns_the_lowest_measured_plan():
  """choose() measures the planned pipeline and every uniform plan that fits, and returns the
  minimum of an evaluation with an interaction the per-layer profile cannot see."""
  fr = np.array([[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]])
  kl = np.array([[0.0, 0.0], [0.1, 0.35], [0.4, 0.5]])
  prof = calibrate.Profile(("full", "knorm@0.5", "int4"), kl, fr)
  # budget 0.625 (1.25 of 2 layers): the plan is (int4, full) at KL 0.4; uniform knorm
  # (1.0) and uniform int4 (0.5) fit too; uniform full (2.0) does not.
  assert calibrate.plan(prof, 0.625) == ("int4", "full")
  calls = []

  def evaluate(p):            # uniform int4 is secretly best (e.g. errors that cancel)
    calls.append(tuple(s.label for s in p.stages))
    return {("int4", "int4"): 0.05}.get(calls[-1], 1.0)

  pipe, kls = calibrate.choose(prof, 0.625, evaluate, name="adaptive")
  assert set(calls) == {("int4", "full"), ("knorm@0.5", "knorm@0.5"), ("int4", "int4")}
  assert [s.label for s in pipe.stages] == ["int4", "int4"] and pipe.name == "adaptive"
  assert min(kls.values()) == 0.05


def test_recommend_covers_the_seven_scenarios_and_verifies_in_order():
  assert len(policy.SCENARIOS) == 7
  for name, sc in policy.SCENARIOS.items():
    rec = policy.recommend(name, 0.3, num_layers=3, head_dim=32)
    fams = {single_at_budget(f, 0.3, 32) for f in sc.families} - {None}
    assert rec.pipeline.stages[0] in fams and len(rec.pipeline.stages) == 3
    assert (rec.offload is not None) == (name in ("long_context", "accuracy_critical"))
    assert rec.verification is None and rec.passed is None
    assert name in str(rec)
  with pytest.raises(ValueError, match=r"scenario='cloud'; allowed: \('long_context'"):
    policy.recommend("cloud", 0.3, num_layers=3, head_dim=32)
  with pytest.raises(ValueError, match=r"memory_budget=1.5; must be in \(0, 1\]"):
    policy.recommend("edge", 1.5, num_layers=3, head_dim=32)
  tiny = policy.recommend("streaming", 0.01, num_layers=3, head_dim=32)   # evicts 99%
  assert tiny.pipeline.stages[0].label == "streaming_llm@0.99"
  seen = []

  def verify(plan):           # the first candidate loses 20%, the second 0.5%
    seen.append(plan.pipeline.label)
    assert plan.offload is not None and plan.runtime_policy == "swap"   # the whole plan
    return {"quality_drop": 0.2 if len(seen) == 1 else 0.005}

  rec = policy.recommend("accuracy_critical", 0.5, num_layers=2, head_dim=32, verify=verify)
  assert len(seen) == 2 and rec.pipeline.label == seen[1] and rec.passed
  assert [t[0] for t in rec.tried] == seen and rec.verification["quality_drop"] == 0.005
  drops = iter([0.3, 0.5, 0.0])      # nothing passes within max_tries=2: best one tried
  rec = policy.recommend("accuracy_critical", 0.5, num_layers=2, head_dim=32, max_tries=2,
                         verify=lambda p: {"quality_drop": next(drops)})
  assert rec.passed is False and rec.verification["quality_drop"] == 0.3
  assert rec.pipeline.label == rec.tried[0][0] and len(rec.tried) == 2
