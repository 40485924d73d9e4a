"""The committed HF parity fixtures (tests/fixtures/hf, see tests/fixtures/README.md) and
the two logits checks every case runs against transformers' outputs."""

import os

import jax.numpy as jnp
import numpy as np

import models

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
TOL = 1e-4   # max |logit diff| in float32


def load(case):
  """(the case's checkpoint loaded by kvjax in float32, its expected.npz arrays)."""
  path = os.path.join(FIXTURES, case)
  assert os.path.exists(os.path.join(path, "expected.npz")), f"fixture {case} missing"
  return (models.from_pretrained(path, dtype="float32"),
          dict(np.load(os.path.join(path, "expected.npz"))))


def check_full_forward(model, exp):
  """model(input_ids) equals transformers' logits."""
  logits = model(jnp.asarray(exp["input_ids"], jnp.int32))
  np.testing.assert_allclose(logits, exp["logits"], atol=TOL, rtol=0)


def check_left_padded(model, exp):
  """The left-padded batch with its attention mask equals transformers' logits at the real
  tokens (its outputs at padding queries are an artefact of its additive mask)."""
  mask = exp["attention_mask"]
  logits = np.asarray(model(jnp.asarray(exp["input_ids_leftpad"], jnp.int32),
                            attention_mask=jnp.asarray(mask)))
  sel = mask.astype(bool)
  np.testing.assert_allclose(logits[sel], exp["logits_leftpad"][sel], atol=TOL, rtol=0)
