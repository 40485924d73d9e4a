"""Quantized / mixed / evicted+quantized caches inside a tiny model (2 layers, hidden 64).

Model compiles dominate CPU time, so every run here shares shapes: prefill [2, 12] with
logits="last" and 1-token decode steps, exactly what kvjax.generate calls. Prefill through a
compressed cache is exact by construction (the chunk attends to itself in full precision,
kvjax.quant.base), so accuracy is measured on the decode steps, where the quantized past
is read.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import memory, mixed, quant
from kvjax.cache import DenseKVCache
from kvjax.observation import Observe

T, N, CAP = 12, 3, 16   # prompt, decoded tokens, capacity (>= T + N)

CFG = models.ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def model():
  m = models.Transformer(CFG, rngs=nnx.Rngs(0))
  # Sharpen attention and logits (a random init is near-uniform, which hides cache errors).
  m.wq[...] = m.wq[...] * 6.0
  m.wk[...] = m.wk[...] * 6.0
  m.embed[...] = m.embed[...] * 20.0
  m.lm_head[...] = m.lm_head[...] * 20.0
  return m


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  long = rng.integers(0, 64, size=T)
  short = rng.integers(0, 64, size=8)
  cont = rng.integers(0, 64, size=(2, N))          # teacher-forced continuation per row
  return long, short, cont


def _run(model, tokens, mask, cont, kinds):
  """Dense prefill -> convert to `kinds` -> N one-token decode steps. Returns logits [B, N+1, V]."""
  logits, cache = models.prefill(model, jnp.asarray(tokens, jnp.int32), attention_mask=mask,
                                 capacity=CAP, logits="last")
  if kinds is not None:
    cache = quant.quantize_model(cache, kinds, config=CFG)
  out = [np.asarray(logits[:, -1])]
  for i in range(N):
    logits, cache = models.decode(model, jnp.asarray(cont[:, i:i + 1], jnp.int32), cache,
                                  logits="last")
    out.append(np.asarray(logits[:, -1]))
  return np.stack(out, 1), cache


def _batch(long, short):
  toks = np.stack([long, np.r_[np.zeros(T - len(short), int), short]])
  mask = np.stack([np.ones(T, int), np.r_[np.zeros(T - len(short), int), np.ones(len(short), int)]])
  return toks, mask


# Every quantizer: INT8, FP8 (e4m3, e5m2), KIVI-2, KVQuant-4 (pre-RoPE + outliers), packed
# per-token INT2 with a residual window. Two layers: two formats per run where possible
# (each distinct cache structure costs a model compile).
KINDS = {
    "int8": "int8",
    "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2+kivi2": (quant.fp8("fp8_e5m2"), quant.kivi(2, group_size=4, residual=4)),
    "kvquant4+int2r": (quant.kvquant(4, group_size=4, residual=4, outlier_frac=0.1),
                       quant.per_token(2, group_size=8, residual=4)),
}
# Stated tolerance on next-token logits with every layer in the format (max |logit| here
# is ~10): INT8 0.01 (0.1%), FP8-e4m3 0.05 (0.5%).
LOGIT_TOL = {"int8": 0.01, "fp8_e4m3": 0.05}


@pytest.fixture(scope="module")
def dense_runs(model, prompts):
  long, short, cont = prompts
  toks, mask = _batch(long, short)
  batch, _ = _run(model, toks, mask, cont, None)
  return batch


@pytest.mark.parametrize("name", list(KINDS))
def test_left_padded_batch_matches_each_prompt_alone_and_stays_close(model, prompts,
                                                                     dense_runs, name):
  long, short, cont = prompts
  kinds = KINDS[name]
  toks, mask = _batch(long, short)
  batch, cache = _run(model, toks, mask, cont, kinds)
  assert all(isinstance(c, quant.QuantizedKVCache) for c in cache.layers())
  # "Alone": each prompt without padding (duplicated to fill the batch: same compiles).
  alone_long, _ = _run(model, np.stack([long, long]), None, np.stack([cont[0]] * 2), kinds)
  alone_short, _ = _run(model, np.stack([short, short]), None, np.stack([cont[1]] * 2), kinds)
  np.testing.assert_allclose(batch[0], alone_long[0], atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(batch[1], alone_short[0], atol=1e-4, rtol=1e-5)
  # Prefill is exact; decode reads the quantized past.
  np.testing.assert_allclose(batch[:, 0], dense_runs[:, 0], atol=1e-4)
  err = np.abs(batch - dense_runs).max()
  if name in LOGIT_TOL:
    assert err <= LOGIT_TOL[name], (name, err)
  assert np.isfinite(batch).all()


def test_quantize_on_append_equals_convert_after_prefill(model, prompts):
  long, short, cont = prompts
  toks, mask = _batch(long, short)
  spec = quant.kivi(2, group_size=4, residual=4)
  cache = quant.init_model_cache(CFG, 2, CAP, spec)
  via_models = models.init_cache(CFG, 2, CAP, layer_factory=quant.layer_factory(CFG, 2, spec))
  assert jax.tree.structure(via_models) == jax.tree.structure(cache)
  assert [x.shape for x in jax.tree.leaves(via_models)] == [x.shape for x in jax.tree.leaves(cache)]
  la, ca = models.prefill(model, jnp.asarray(toks, jnp.int32), attention_mask=mask, cache=cache,
                          logits="last")
  lb, cb = models.prefill(model, jnp.asarray(toks, jnp.int32), attention_mask=mask,
                          capacity=CAP, logits="last")
  cb = quant.quantize_model(cb, spec)
  np.testing.assert_allclose(np.asarray(la), np.asarray(lb), atol=1e-5)
  for x, y in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=1e-5)


def test_generate_with_a_quantizing_press(model, prompts):
  long, short, _ = prompts
  toks, mask = _batch(long, short)
  out = kvjax.generate(model, jnp.asarray(toks, jnp.int32), attention_mask=jnp.asarray(mask),
                       max_new_tokens=N + 1, capacity=CAP,
                       press=quant.QuantizePress(quant.int8()))
  assert out.tokens.shape == (2, N + 1)
  layers = out.cache.layers()
  assert all(isinstance(c, quant.QuantizedKVCache) for c in layers)
  dense = kvjax.generate(model, jnp.asarray(toks, jnp.int32), attention_mask=jnp.asarray(mask),
                         max_new_tokens=N + 1, capacity=CAP)
  assert memory.report(out.cache).total < memory.report(dense.cache).total
  np.testing.assert_array_equal(out.tokens[:, 0], dense.tokens[:, 0])   # prefill is exact


# -- evict-then-quantize ---------------------------------------------------------------------
class KeepRecent:
  """A trivial per-layer press: keep each row's last `keep` tokens (+ `room` free slots)."""

  observe = Observe()

  def __init__(self, keep):
    self.keep = keep

  def __call__(self, layer, obs, layer_idx=0, room=0):
    del obs, layer_idx
    b, h, s, d = layer.k.shape
    start = jnp.maximum(layer.lengths - self.keep, 0)                      # [B, H]
    idx = start[..., None] + jnp.arange(self.keep)                          # [B, H, keep]
    ok = idx < layer.lengths[..., None]
    take = lambda x: jnp.take_along_axis(x, jnp.minimum(idx, s - 1).reshape(  # noqa: E731
        idx.shape + (1,) * (x.ndim - 3)), axis=2)
    new = DenseKVCache.init(b, h, self.keep + room, d, layer.k.dtype)
    pos = jnp.where(ok, take(layer.positions), -1)
    pad = lambda x, v=0: jnp.pad(x, ((0, 0), (0, 0), (0, room)) + ((0, 0),) * (x.ndim - 3),  # noqa: E731
                                 constant_values=v)
    return new.replace(k=pad(take(layer.k)), v=pad(take(layer.v)), positions=pad(pos, -1),
                       lengths=jnp.sum(ok, -1).astype(jnp.int32))


@pytest.mark.parametrize("order", ["evict_first", "quantize_first"])
def test_evict_then_quantize_with_any_press(model, prompts, order):
  long, short, cont = prompts
  toks, mask = _batch(long, short)
  press = mixed.EvictThenQuantize(KeepRecent(8), quant.int8(), order=order)
  logits, cache = models.prefill(model, jnp.asarray(toks, jnp.int32), attention_mask=mask,
                                 capacity=CAP, logits="last")
  small = press.compress_model(cache, None, CFG)
  layers = small.layers()
  assert all(isinstance(c, quant.QuantizedKVCache) for c in layers)
  # each row keeps its last 8 tokens (the short row has exactly 8), in order
  for c in layers:
    pos = np.asarray(c.to_dense().positions)
    np.testing.assert_array_equal(pos[0, 0, :8], np.arange(4, 12))
    np.testing.assert_array_equal(pos[1, 0, :8], np.arange(8))
  assert memory.report(small).total < memory.report(cache).total / 2
  del logits


def test_evict_then_quantize_with_a_kvjax_press_and_memory_budget(model, prompts):
  presses = pytest.importorskip("kvjax.presses")
  long, short, cont = prompts
  toks, mask = _batch(long, short)
  etq = mixed.EvictThenQuantize(presses.KnormPress(), quant.int8(), memory_budget=0.25)
  planned = etq.planned_press(CFG.head_dim)
  keep = 1 - planned.compression_ratio
  # int8 costs (16+16 codes + 2+2 scales + 4 position) = 40 B/token/head vs 68 for bf16
  assert keep == pytest.approx(0.25 * 68 / 40)
  logits, cache = models.prefill(model, jnp.asarray(toks, jnp.int32), attention_mask=mask,
                                 capacity=CAP, logits="last")
  small = etq.compress_model(cache, [{} for _ in range(CFG.num_layers)], CFG)
  rep = memory.report(small)
  assert all(isinstance(c, quant.QuantizedKVCache) for c in small.layers())
  held = np.asarray(small.layers()[0].length)
  assert (held[0] == int(T * keep)).all() and (held[1] == int(8 * keep)).all()
  assert rep.factor > 2.0
  del logits, cont


# -- mixed precision -------------------------------------------------------------------------
def test_mixed_precision_plan_under_a_budget(model, prompts):
  long, short, cont = prompts
  toks, mask = _batch(long, short)
  _, cache = models.prefill(model, jnp.asarray(toks, jnp.int32), attention_mask=mask,
                            capacity=CAP, logits="last")
  probe = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 1, 16)).astype(np.float32))
  attend = jax.jit(lambda c: c.attend(probe * 4, probe[:, :2] * 0, probe[:, :2] * 0,
                                      jnp.full((2, 1), T, jnp.int32),
                                      kvjax.AttentionSpec(backend="xla"))[0].out)

  def next_logits(mc):   # a cheap stand-in for a model: attention read-outs of every layer
    return jnp.concatenate([attend(c).reshape(2, -1) for c in mc.layers()], -1) * 10

  cands = {"full": None, "int8": quant.int8(), "int2": quant.per_token(2)}
  sens = mixed.layer_sensitivity(next_logits, cache, cands, config=CFG)
  assert sens.kl.shape == (3, 2) and (sens.kl[0] == 0).all()
  assert (sens.kl[1] < sens.kl[2]).all()                  # 8 bits hurt less than 2 bits
  assert (sens.nbytes[2] < sens.nbytes[1]).all() and (sens.nbytes[1] < sens.nbytes[0]).all()
  budget = int(sens.nbytes[2, 0] + sens.nbytes[1, 1])     # room for int8 in one layer only
  plan = mixed.assign_budget(sens, budget)
  assert sorted(plan) == ["int2", "int8"]
  hi = int(np.argmax(sens.kl[2] - sens.kl[1]))            # the layer int8 helps most
  assert plan[hi] == "int8"
  mc = mixed.apply_plan(cache, plan, cands, config=CFG)
  # layers of different kinds form separate segments (mixed caches run in the model in
  # test_left_padded_batch_matches_each_prompt_alone_and_stays_close)
  assert len(mc.segments) == 2 and sum(c.nbytes for c in mc.layers()) <= budget
  with pytest.raises(ValueError, match="below the smallest plan"):
    mixed.assign_budget(sens, 100)


def test_assign_budget_picks_the_sensitive_layer():
  sens = mixed.Sensitivity(("hi", "lo"), np.array([[0.0, 0.0, 0.0], [0.1, 5.0, 0.2]]),
                           np.array([[100, 100, 100], [30, 30, 30]]))
  assert mixed.assign_budget(sens, 90) == ("lo", "lo", "lo")
  assert mixed.assign_budget(sens, 160) == ("lo", "hi", "lo")
  assert mixed.assign_budget(sens, 300) == ("hi", "hi", "hi")
