"""Logits parity with transformers on tiny committed checkpoints (tests/fixtures/hf).

The fixtures (checkpoints + expected logits) were written by
tests/fixtures/make_hf_fixtures.py with torch + transformers (see tests/fixtures/README.md);
these tests need neither. Tolerance: max |diff| <= 1e-4 in float32.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import models
from tests.models.hf_fixtures import FIXTURES, TOL, check_full_forward, check_left_padded, load

LLAMA_FAMILY = ["llama_gqa2_llama3rope_tied", "llama_mha_untied", "llama_linear_rope",
                "llama_dynamic_rope", "qwen2_bias_gqa4", "mistral_sliding", "llama_sharded"]


def test_fixture_set_is_complete():
  with open(os.path.join(FIXTURES, "MANIFEST.json")) as f:
    cases = json.load(f)["cases"]
  assert set(LLAMA_FAMILY) <= set(cases)


@pytest.mark.parametrize("case", LLAMA_FAMILY)
def test_full_forward(case):
  check_full_forward(*load(case))


@pytest.mark.parametrize("case", LLAMA_FAMILY)
def test_left_padded_batch(case):
  check_left_padded(*load(case))


# Dynamic-NTK picks its base from the longest position of each call (as transformers does):
# the 24-token fixture forward uses the grown base at *every* position, while decode steps
# grow it step by step. So for that case decode is checked, within max_position_embeddings,
# against the full forward of the same prefix (whose rope is the HF-verified formula).
@pytest.mark.parametrize("case", LLAMA_FAMILY)
def test_prefill_then_token_by_token_decode(case):
  model, exp = load(case)
  ids = jnp.asarray(exp["input_ids"], jnp.int32)
  t = ids.shape[1]
  if case == "llama_dynamic_rope":
    t = model.config.max_position_embeddings
  split = 6
  lg, cache = models.prefill(model, ids[:, :split], capacity=t)
  outs = [np.asarray(lg)]
  for i in range(split, t):
    lg, cache = models.decode(model, ids[:, i:i + 1], cache)
    outs.append(np.asarray(lg))
  want = exp["logits"][:, :t]
  if case == "llama_dynamic_rope":
    want = np.asarray(model(ids[:, :t]))
  np.testing.assert_allclose(np.concatenate(outs, 1), want, atol=TOL, rtol=0)
