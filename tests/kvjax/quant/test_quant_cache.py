"""Quantized cache kinds beyond the protocol: KIVI vs per-token, conversion, memory report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention as A
from kvjax import memory, quant
from kvjax.cache import DenseKVCache, ModelCache, tree_nbytes

_attend = jax.jit(lambda c, q, k, v, p: c.attend(q, k, v, p, A.AttentionSpec(backend="xla")))
_quantize = jax.jit(quant.quantize, static_argnames=("spec", "capacity", "dtype"))
_append = jax.jit(lambda c, k, v, p: c.append(k, v, p))
_to_dense = jax.jit(lambda c: c.to_dense())
_dense_k = jax.jit(lambda c: c.to_dense().k)   # decompressed keys, packed in token order
_append_dense_k = jax.jit(lambda c, k, v, p: c.append(k, v, p).to_dense().k)
_append_to_dense = jax.jit(lambda c, k, v, p: c.append(k, v, p).to_dense())


def outlier_keys(rng, b, h, n, d):
  """Keys like real models' (KIVI, Fig. 2): a few channels hold large magnitudes across tokens."""
  k = rng.normal(size=(b, h, n, d)).astype(np.float32)
  for c, offset in ((3, 12.0), (9, -9.0), (17, 15.0), (26, -11.0)):
    k[..., c] = offset + 1.5 * k[..., c]
  return k


def test_kivi4_beats_per_token_int4_at_the_same_bytes():
  # Given keys with outlier channels, and two INT4 caches with the same group size and
  # residual window (so the same bytes: codes, one scale + zero per 8 numbers, residual)
  rng = np.random.default_rng(0)
  b, h, n, d, g, r = 1, 2, 64, 32, 8, 8
  k = outlier_keys(rng, b, h, n, d)
  v = rng.normal(size=(b, h, n, d)).astype(np.float32)
  pos = jnp.arange(n, dtype=jnp.int32)[None]
  kivi = quant.QuantizedKVCache.init(b, h, n + r, d, quant.kivi(4, group_size=g, residual=r))
  naive = quant.QuantizedKVCache.init(b, h, n + r, d,
                                      quant.per_token(4, group_size=g, residual=r))
  assert kivi.nbytes == naive.nbytes
  assert memory.report(kivi).total == memory.report(naive).total
  # When both hold the tokens (read back decompressed, in token order) and a query attends
  back = {nm: _append_to_dense(c, jnp.asarray(k), jnp.asarray(v), pos)
          for nm, c in (("kivi", kivi), ("naive", naive))}
  back["exact"] = _append(DenseKVCache.init(b, h, n + r, d), jnp.asarray(k), jnp.asarray(v), pos)
  q = jnp.asarray(rng.normal(size=(b, 4, 1, d)).astype(np.float32)) * 0.5
  z = jnp.zeros((b, h, 1, d))
  qp = jnp.full((b, 1), n, jnp.int32)
  outs = {nm: np.asarray(_attend(c, q, z, z, qp)[0].out) for nm, c in back.items()}
  err = {nm: np.linalg.norm(outs[nm] - outs["exact"]) / np.linalg.norm(outs["exact"])
         for nm in ("kivi", "naive")}
  kerr = {nm: float(np.mean((np.asarray(back[nm].k)[:, :, :n] - k) ** 2))
          for nm in ("kivi", "naive")}
  # Then per-channel keys are much closer, in keys and in attention output
  assert kerr["kivi"] < 0.1 * kerr["naive"], kerr
  assert err["kivi"] < 0.6 * err["naive"], err


def test_kvquant_outliers_and_pre_rope_reduce_key_error():
  from kvjax.rope import RopeConfig, apply_rope  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  b, h, n, d, g = 1, 2, 48, 32, 8
  rope = RopeConfig(head_dim=d)
  pre = outlier_keys(rng, b, h, n, d)
  pre[..., 5] += rng.standard_t(1.5, size=(b, h, n)) * 4  # heavy-tailed entries
  pos = jnp.arange(n, dtype=jnp.int32)[None]
  k = apply_rope(jnp.asarray(pre), pos, rope)   # the model hands post-RoPE keys to the cache
  v = jnp.asarray(rng.normal(size=(b, h, n, d)).astype(np.float32))
  errs = {}
  for name, spec in {"kivi": quant.kivi(2, group_size=g, residual=g),
                     "prerope": quant.kvquant(2, group_size=g, residual=g, outlier_frac=0.0,
                                              rope=rope),
                     "prerope+outliers": quant.kvquant(2, group_size=g, residual=g,
                                                       outlier_frac=0.07, rope=rope)}.items():
    back = _append_dense_k(quant.QuantizedKVCache.init(b, h, n + g, d, spec), k, v, pos)
    errs[name] = float(jnp.mean((back[:, :, :n] - k) ** 2))
  assert errs["prerope"] < errs["kivi"], errs
  assert errs["prerope+outliers"] < 0.7 * errs["prerope"], errs


def _headwise_dense(rng):
  """A dense cache after head-wise eviction: different lengths and position gaps per head."""
  b, h, s, d = 2, 2, 12, 16
  dense = DenseKVCache.init(b, h, s, d)
  k = rng.normal(size=(b, h, s, d)).astype(np.float32)
  v = rng.normal(size=(b, h, s, d)).astype(np.float32)
  lengths = np.array([[9, 5], [12, 3]], np.int32)
  pos = np.full((b, h, s), -1, np.int32)
  for i in range(b):
    for j in range(h):
      pos[i, j, :lengths[i, j]] = np.sort(rng.choice(30, lengths[i, j], replace=False))
  return dense.replace(k=jnp.asarray(k), v=jnp.asarray(v), positions=jnp.asarray(pos),
                       lengths=jnp.asarray(lengths))


@pytest.mark.parametrize("spec", [quant.int8(), quant.kivi(4, group_size=4, residual=4)],
                         ids=["int8", "kivi4"])
def test_quantize_keeps_headwise_tokens_and_positions(spec):
  dense = _headwise_dense(np.random.default_rng(2))
  q = _quantize(dense, spec=spec)
  np.testing.assert_array_equal(np.asarray(q.length), np.asarray(dense.lengths))
  back = _to_dense(q)
  np.testing.assert_array_equal(np.asarray(back.positions), np.asarray(dense.positions))
  valid = np.asarray(dense.valid_mask())
  err = np.abs(np.asarray(back.k) - np.asarray(dense.k))[valid]
  assert err.max() < (0.05 if spec.k_bits == 8 else 1.0)


def test_quantize_equals_quantize_on_append():
  rng = np.random.default_rng(3)
  spec = quant.kivi(2, group_size=4, residual=8)
  k = jnp.asarray(rng.normal(size=(2, 2, 11, 16)).astype(np.float32))
  pos = jnp.asarray(np.array([np.arange(11), np.r_[np.arange(8), [-1] * 3]], np.int32))
  dense = _append(DenseKVCache.init(2, 2, 16, 16), k, k * 2, pos)
  a = _quantize(dense, spec=spec)
  b = _append(quant.QuantizedKVCache.init(2, 2, 16, 16, spec), k, k * 2, pos)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_quantize_rejects_too_small_capacity_and_stacked_caches():
  dense = _headwise_dense(np.random.default_rng(4))
  with pytest.raises(ValueError, match="capacity=6 is smaller than the 12 tokens held"):
    quant.quantize(dense, quant.int8(), capacity=6)
  stacked = ModelCache.from_layers([dense, dense], jnp.zeros(2, jnp.int32)).segments[0]
  with pytest.raises(ValueError, match="one layer's cache"):
    quant.quantize(stacked, quant.int8())


# -- memory accounting ----------------------------------------------------------------------
def test_report_agrees_with_the_arrays_held_and_counts_every_component():
  b, h, cap, d = 2, 2, 24, 16
  spec = quant.kivi(4, group_size=4, residual=8)
  qc = quant.QuantizedKVCache.init(b, h, cap, d, spec, dtype=jnp.bfloat16)
  i8 = quant.QuantizedKVCache.init(b, h, cap, d, quant.int8())
  dense = DenseKVCache.init(b, h, cap, d, jnp.bfloat16)
  mc = ModelCache.from_layers([dense, qc, qc, i8], jnp.array([24, 20], jnp.int32))
  rep = memory.report(mc)
  held = sum(np.asarray(x).nbytes for x in jax.tree.leaves(mc))
  assert rep.total == mc.nbytes == held
  assert [l.total for l in rep.layers] == [dense.nbytes, qc.nbytes, qc.nbytes, i8.nbytes]
  assert rep.by_kind() == {"DenseKVCache": dense.nbytes, spec.label: 2 * qc.nbytes,
                           "int8": i8.nbytes}
  sq = cap - 8
  c = rep.layers[1].components
  assert c["codes"] == b * h * sq * d // 2 * 2            # k and v, 4 bits
  assert c["scales"] == c["zeros"] == b * h * sq * d // 4 * 2 * 2   # fp16, g=4
  assert c["residual"] == b * h * 8 * (2 * d * 2 + 4)       # bf16 k, v + int32 positions
  assert c["index"] == b * h * sq * 4 + 2 * b * h * 4       # positions, lengths, res_lengths
  assert rep.layers[3].components["scales"] == b * h * cap * 2 * 2   # one per token, k and v
  # the bf16 reference is a dense bf16 cache of the 24 original tokens, like layer 0
  assert rep.layers[0].reference == dense.nbytes and rep.layers[0].factor == 1.0
  assert rep.layers[3].factor > 1.5
  text = str(rep)
  assert "kivi-int4-g4-r8" in text and f"{rep.total:,}" in text and "next_position" in text


def test_report_of_a_layer_cache_and_a_bf16_reference():
  dense = DenseKVCache.init(1, 2, 8, 16, jnp.bfloat16)
  dense = dense.replace(positions=jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (1, 2, 8)),
                        lengths=jnp.full((1, 2), 8, jnp.int32))
  rep = memory.report(dense)
  assert rep.total == dense.nbytes == rep.reference and rep.layers[0].tokens == 8
  assert memory.dense_bf16_bytes(1, 2, 8, 16, 16) == tree_nbytes(dense)


def test_per_head_split_converts_reports_and_reads_back():
  from kvjax import mixed  # pylint: disable=import-outside-toplevel
  dense = _headwise_dense(np.random.default_rng(6))
  split = mixed.split_heads(dense, ((1, None), (1, quant.per_token(2, group_size=8))))
  assert split.heads == (1, 1) and isinstance(split.parts[0], DenseKVCache)
  np.testing.assert_array_equal(np.asarray(split.length), np.asarray(dense.lengths))
  rep = memory.report(split)
  assert rep.total == split.nbytes == split.parts[0].nbytes + split.parts[1].nbytes
  assert rep.layers[0].kind == "heads[1:DenseKVCache,1:int2-g8]"
  assert rep.layers[0].components["codes"] == 2 * 12 * 16 // 4 * 2
  back = _to_dense(split)
  np.testing.assert_array_equal(np.asarray(back.positions), np.asarray(dense.positions))
  valid = np.asarray(dense.valid_mask())[:, 0]
  np.testing.assert_array_equal(np.asarray(back.k)[:, 0][valid], np.asarray(dense.k)[:, 0][valid])
  with pytest.raises(ValueError, match="groups cover 3 kv heads; the cache has 2"):
    mixed.split_heads(dense, ((1, None), (2, "int8")))
