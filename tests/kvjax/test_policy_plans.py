"""recommend()'s plans run end to end: every scenario's pipeline, its cache placement
(offload) and its runtime policy, through kvjax.generate and the compare harness."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from experiments import compare
from kvjax import cache as cache_lib
from kvjax import memory
from kvjax import policy
from tests.kvjax.presses import helpers

T, NEW = 64, 3


@pytest.fixture(scope="module")
def model():
  return helpers.tiny_model()


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(2).integers(1, 64, (2, T)), jnp.int32)


@pytest.mark.parametrize("scenario", sorted(policy.SCENARIOS))
def test_recommended_plan_generates(model, tokens, scenario):
  cfg = model.config
  rec = policy.recommend(scenario, 0.25, num_layers=cfg.num_layers, head_dim=cfg.head_dim,
                         tokens=T)
  plan = rec.plan
  # every press of the plan accepts a 64-token prompt (no SnapKV window of 64)
  plan.validate(capacity=T, prompt_length=T, num_layers=cfg.num_layers)
  out = kvjax.generate(model, tokens, max_new_tokens=NEW, **plan.generate_kwargs())
  assert out.tokens.shape == (2, NEW)
  assert cache_lib.caps(out.cache).offloaded == (plan.offload is not None)
  if plan.offload is not None:
    # streaming is exact: the same tokens as the pipeline on the device
    ref = kvjax.generate(model, tokens, max_new_tokens=NEW, press=plan.pipeline)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  assert isinstance(plan.runtime(), policy.Policy)


def test_recommend_at_64_tokens_skips_a_window_as_long_as_the_prompt():
  rec = policy.recommend("long_context", 0.2, num_layers=2, head_dim=16, tokens=T)
  assert [s.label for s in rec.pipeline.stages] == ["expected_attention@0.53125+int4"] * 2
  # at 256 tokens SnapKV's 64-token window fits, and it is the scenario's first choice
  rec = policy.recommend("long_context", 0.2, num_layers=2, head_dim=16, tokens=256)
  assert rec.pipeline.stages[0].family == "snapkv+int4"


def test_verification_runs_the_offloaded_plan(model):
  """The compare harness runs a streamed plan: its answers equal the on-device pipeline's,
  and its bytes are what the device holds (prefetch + 1 = 2 of 2 layers here)."""
  from experiments import tasks as T_
  from models.tokenizer import ByteTokenizer
  rec = policy.recommend("accuracy_critical", 0.5, num_layers=2, head_dim=16, tokens=128)
  plan = rec.plan
  samples = T_.make("passkey").samples(128, 2)
  tok = ByteTokenizer()
  m = helpers.tiny_model(vocab_size=260)
  got, _ = compare.run(m, tok, [compare.Technique(plan.label, "adaptive", custom=plan)],
                       samples, batch_size=2, cache_dtype="float32", decode_steps=0,
                       progress=False)
  ref, _ = compare.run(m, tok, [compare.Technique("p", "adaptive", custom=plan.pipeline)],
                       samples, batch_size=2, cache_dtype="float32", decode_steps=0,
                       progress=False)
  assert [r["score"] for r in got] == [r["score"] for r in ref]
  # 2 layers, prefetch 1: the device holds both; the factor is the full cache over them
  assert got[0]["kv_bytes"] == pytest.approx(ref[0]["kv_bytes"], rel=0.02)
