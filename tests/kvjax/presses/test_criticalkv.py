"""CriticalKV (kvjax/presses/criticalkv.py) against a numpy reimplementation.

Given SnapKV-style attention scores and a random output projection, the press keeps the
first-stage half of its budget by attention alone and the rest by attention x ||W_o^h v||_1
(mean over the kv group's query heads), exactly as numpy computes it; through
models.prefill it reads the real layer's o_proj and halves nbytes.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax.presses import SnapKVPress, registry
from kvjax.presses.criticalkv import CriticalKVPress, projected_value_norm
from models.config import ModelConfig
from tests.kvjax.presses import helpers

CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4, max_position_embeddings=128,
                  rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def np_proj_norm(v, wo):
  b, hkv, s, d = v.shape
  g = wo.shape[0] // (hkv * d)
  out = np.zeros((b, hkv, s))
  for j in range(hkv):
    for gi in range(g):
      h = j * g + gi
      out[:, j] += np.abs(v[:, j].astype(np.float64) @ wo[h * d:(h + 1) * d]).sum(-1) / g
  return out


def np_snap(col, length, window, kernel=5):
  s = col.shape[-1]
  x = np.where(np.arange(s) < length - window, col, 0.0)
  pad = kernel // 2
  xp = np.pad(x, (pad, pad))
  return np.array([xp[i:i + kernel].sum() / kernel for i in range(s)])


def np_critical_keep(col, v, wo, lengths, ratio, window, eps=1e-4, first=0.5):
  """numpy: kept slot lists per (b, kv head) of CriticalKV(SnapKV)."""
  b, h, s = col.shape
  vn = np_proj_norm(v, wo)
  out = []
  for bi in range(b):
    row = []
    for j in range(h):
      n = int(lengths[bi, j])
      keep = int(n * (1 - ratio))
      sc = np_snap(col[bi, j], n, window)
      slots = np.arange(n)
      tier = np.where(slots >= n - window, 1, 0)            # the window is protected
      order = sorted(slots, key=lambda i: (-tier[i], -sc[i], i))
      stage1 = set(order[:int(keep * first)])
      final = (sc + eps) * vn[bi, j]
      order2 = sorted(slots, key=lambda i: (-tier[i], -(np.inf if i in stage1 else final[i]), i))
      row.append(sorted(int(i) for i in order2[:keep]))
    out.append(row)
  return out


def test_projected_value_norm_matches_numpy():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(2, 2, 5, 3)).astype(np.float32)
  wo = rng.normal(size=(2 * 2 * 3, 7)).astype(np.float32)     # 4 query heads, hidden 7
  np.testing.assert_allclose(np.asarray(projected_value_norm(jnp.asarray(v), jnp.asarray(wo))),
                             np_proj_norm(v, wo), rtol=1e-5)


def test_two_stage_selection_matches_numpy():
  cache = helpers.make_cache(b=2, h=2, s=16, d=4, lengths=[16, 12], seed=3)
  obs = helpers.make_obs(cache, seed=4)
  wo = np.random.default_rng(5).normal(size=(4 * 4, 8)).astype(np.float32)
  # scale value rows so the value norm really reorders the attention ranking
  v = np.asarray(cache.v) * np.random.default_rng(6).uniform(0.1, 3, size=(2, 2, 16, 1))
  cache = cache.replace(v=jnp.asarray(v, jnp.float32))
  obs["o_proj"] = jnp.asarray(wo)
  press = CriticalKVPress(press=SnapKVPress(compression_ratio=0.5, window_size=2))
  got = helpers.kept_positions(press(cache, obs))
  want = np_critical_keep(np.asarray(obs["colsum"]), np.asarray(cache.v), wo,
                          np.asarray(cache.lengths), 0.5, 2)
  assert got == want
  # attention alone (SnapKV) keeps a different set: the value term matters here
  assert helpers.kept_positions(SnapKVPress(compression_ratio=0.5, window_size=2)(
      cache, obs)) != want


def test_wrapper_budget_and_errors():
  inner = SnapKVPress(compression_ratio=0.25, window_size=2)
  p = CriticalKVPress(press=inner)
  assert p.compression_ratio == 0.25 and p.observe.o_proj and p.observe.colsum
  b = p.with_budget(5)
  assert b.press.budget == 5 and b.budget == 5
  assert registry.make("critical_snapkv", 0.5) == CriticalKVPress(
      press=SnapKVPress(compression_ratio=0.5))
  with pytest.raises(ValueError, match=r"needs a ScorerPress; got None"):
    CriticalKVPress()
  with pytest.raises(ValueError, match=r"first_stage_ratio=1.5; must be in \[0, 1\]"):
    CriticalKVPress(press=inner, first_stage_ratio=1.5)
  cache = helpers.make_cache(s=8)
  with pytest.raises(ValueError, match=r"needs the layer's output projection"):
    p(cache, helpers.make_obs(cache))
  obs = dict(helpers.make_obs(cache), o_proj=jnp.ones((5, 3)))
  with pytest.raises(ValueError, match=r"obs\['o_proj'\] has shape \(5, 3\)"):
    p(cache, obs)


def test_prefill_reads_the_layer_o_proj_and_halves_nbytes():
  model = models.Transformer(CFG, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 24)), jnp.int32)
  press = CriticalKVPress(press=SnapKVPress(compression_ratio=0.5, window_size=4))
  _, full, obs = models.prefill(model, tokens, observe=press.observe)
  _, pressed = models.prefill(model, tokens, press=press)
  assert pressed.nbytes == pytest.approx(full.nbytes / 2, rel=0.02)
  for i, (layer, out) in enumerate(zip(full.layers(), pressed.layers())):
    np.testing.assert_array_equal(np.asarray(obs[i]["o_proj"]), np.asarray(model.wo.value[i]))
    want = np_critical_keep(np.asarray(obs[i]["colsum"]), np.asarray(layer.v),
                            np.asarray(model.wo.value[i]), np.asarray(layer.lengths), 0.5, 4)
    assert helpers.kept_positions(out) == want
