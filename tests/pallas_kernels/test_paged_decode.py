"""Paged decode kernel (TPU + GPU variants, interpret mode on CPU) against the reference.

The reference gathers each row's pages into a dense view and runs reference attention.
Pools are written by kvjax.paged itself where possible, and the GPU kernel is checked
through kvjax's own dispatch (PagedKVCache.attend(layer=...) with backend="interpret" vs
"xla", which reads `kvjax.paged.dense_view`), so the kernels read the real layout.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import paged as paged_lib
from kvjax.quant import spec as quant_spec
from pallas_kernels import paged_decode as pd
from tests.pallas_kernels._util import (FAST_COMPILE, assert_close, call_fast,
                                        check_backends_agree, lower_for, mask_kwargs, queries)

F32, BF16 = jnp.float32, jnp.bfloat16


@functools.partial(jax.jit, static_argnames=("kv_heads", "page_size", "num_pages",
                                             "max_pages", "quant"),
                   compiler_options=FAST_COMPILE if jax.default_backend() == "cpu" else None)
def _kvjax_pool(k, v, positions, *, kv_heads, page_size, num_pages, max_pages, quant):
  c = paged_lib.PagedKVCache.init(k.shape[0], kv_heads, k.shape[-1], num_pages=num_pages,
                                  page_size=page_size, max_pages=max_pages, quant=quant)
  return c.append(k, v, positions)


def _kvjax_problem(*, quant, batch, kv_heads, head_dim, page_size, num_pages, max_pages,
                   tokens, head_lengths, seed=0):
  """A pool written by kvjax.paged (rows get `tokens[b]` tokens), then head-wise lengths."""
  rng = np.random.default_rng(seed)
  t = max(tokens)
  k = jnp.asarray(rng.standard_normal((batch, kv_heads, t, head_dim)), F32)
  v = jnp.asarray(rng.standard_normal((batch, kv_heads, t, head_dim)), F32)
  pos = np.where(np.arange(t)[None] < np.asarray(tokens)[:, None], np.arange(t)[None], -1)
  c = _kvjax_pool(k, v, jnp.asarray(pos, jnp.int32), kv_heads=kv_heads, page_size=page_size,
                  num_pages=num_pages, max_pages=max_pages, quant=quant)
  # Head-wise ragged lengths (as presses leave them): slots past them are stale.
  c = c.replace(lengths=jnp.minimum(c.lengths, jnp.asarray(head_lengths, jnp.int32)))
  arrays = dict(k_pages=c.k_pages, v_pages=c.v_pages, page_table=c.page_table,
                lengths=c.lengths, pos_pages=c.pos_pages, k_scale=c.k_scale,
                k_zero=c.k_zero, v_scale=c.v_scale, v_zero=c.v_zero)
  static = dict(fmt="float") if quant is None else dict(
      fmt=quant.fmt, k_bits=quant.k_bits, v_bits=quant.v_bits, group_size=quant.group_size)
  return c, arrays, static


def _raw_problem(*, batch, kv_heads, head_dim, page_size, num_pages, max_pages, lengths,
                 dtype, with_positions, seed=0):
  """A float pool with a shuffled page table; unallocated table entries are -1."""
  rng = np.random.default_rng(seed)
  shape = (num_pages, kv_heads, page_size, head_dim)
  k = rng.standard_normal(shape).astype(np.float32)
  v = rng.standard_normal(shape).astype(np.float32)
  lengths = np.asarray(lengths, np.int32).reshape(batch, kv_heads)
  table = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages)
  held = -(-lengths.max(axis=1) // page_size)
  table = np.where(np.arange(max_pages)[None] < held[:, None], table, -1).astype(np.int32)
  # Pages nobody holds are garbage (NaN): they must never be read.
  used = np.zeros(num_pages, bool)
  used[table[table >= 0]] = True
  k[~used] = np.nan
  v[~used] = np.nan
  arrays = dict(k_pages=jnp.asarray(k, dtype), v_pages=jnp.asarray(v, dtype),
                page_table=jnp.asarray(table), lengths=jnp.asarray(lengths))
  if with_positions:
    arrays["pos_pages"] = jnp.asarray(rng.integers(0, max_pages * page_size, shape[:3]),
                                      jnp.int32)
  return arrays, dict(fmt="float")


def _split(arrays):
  pos = tuple(arrays[k] for k in ("k_pages", "v_pages", "page_table", "lengths"))
  kw = {k: v for k, v in arrays.items() if k not in ("k_pages", "v_pages", "page_table",
                                                     "lengths")}
  return pos, kw


def _check(platform, arrays, static, q, qpos, kkw, dtype, sink_logits=None, interpret=True):
  pos, kw = _split(arrays)
  out, lse = call_fast(pd.paged_decode_attention, q, *pos, q_positions=qpos,
                       sink_logits=sink_logits, **kw,
                       static=dict(platform=platform, interpret=interpret, **static, **kkw))
  mask_kw = mask_kwargs(kkw)
  ref_out, ref_lse = pd.paged_decode_reference(q.astype(F32), *pos, q_positions=qpos,
                                               sink_logits=sink_logits, **kw, **static,
                                               **mask_kw)
  assert out.dtype == dtype and out.shape == ref_out.shape and lse.dtype == F32
  assert_close("out", out, ref_out, dtype)
  assert_close("lse", lse, ref_lse, dtype)
  return ref_out, ref_lse, mask_kw


def test_tpu_fp8_pool_from_kvjax_matches_reference_interpret():
  # FP8 (e4m3, one scale per token), GQA 1, head_dim 64, two pages per grid step.
  quant = quant_spec.fp8("fp8_e4m3")
  _, arrays, static = _kvjax_problem(quant=quant, batch=2, kv_heads=2, head_dim=64,
                                     page_size=16, num_pages=12, max_pages=5,
                                     tokens=[70, 37], head_lengths=[[70, 1], [0, 37]])
  q, qpos = queries(2, 2, 1, 64, F32, 69)
  _check("tpu", arrays, static, q, qpos,
         dict(pages_per_block=2, num_splits=2, window=30, n_sink=2), F32)


def test_tpu_bf16_pool_matches_reference_interpret():
  # A plain bf16 pool, shuffled table, positions = logical slots (no pos_pages), GQA 8,
  # head_dim 128, lengths 0 / 1 / 70 (not a multiple of the 2-page block).
  arrays, static = _raw_problem(batch=3, kv_heads=1, head_dim=128, page_size=16,
                                num_pages=16, max_pages=5, lengths=[[0], [1], [70]],
                                dtype=BF16, with_positions=False)
  q, qpos = queries(3, 8, 1, 128, BF16, 69)
  _check("tpu", arrays, static, q, qpos, dict(pages_per_block=2), BF16)


def _small(**over):
  arrays, static = _raw_problem(batch=1, kv_heads=1, head_dim=16, page_size=8, num_pages=4,
                                max_pages=2, lengths=[[10]], dtype=F32, with_positions=True)
  arrays.update(over)
  q, qpos = queries(1, 2, 1, 16, F32, 10)
  pos, kw = _split(arrays)
  return q, pos, dict(kw, q_positions=qpos), static


@pytest.mark.parametrize("over,static,match", [
    ({}, dict(platform="gpu", block_k=24), "block_k=24"),
    ({}, dict(platform="tpu", pages_per_block=0), "pages_per_block=0"),
    ({}, dict(platform="gpu", fmt="int"), "fmt='int' stores uint8"),
    (dict(page_table=jnp.zeros((2, 2), jnp.int32)), dict(platform="gpu"),
     r"page_table shape \(2, 2\)"),
    (dict(pos_pages=jnp.zeros((4, 1, 4), jnp.int32)), dict(platform="gpu"),
     r"pos_pages shape \(4, 1, 4\)"),
])
def test_invalid_inputs_raise(over, static, match):
  q, pos, kw, base = _small(**over)
  with pytest.raises(ValueError, match=match):
    pd.paged_decode_attention(q, *pos, **kw, **{**base, "interpret": True, **static})


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_native_lowering_on_cpu(platform, lowering):
  # The real kernels lowered to Triton / Mosaic IR without a device (INT4 pool, groups).
  b, hq, hkv, t, n, p, m, d = 2, 16, 2, 1, 64, 16, 32, 128
  sds = jax.ShapeDtypeStruct
  i32 = lambda *shape: sds(shape, jnp.int32)
  pages, sc = sds((n, hkv, p, d // 2), jnp.uint8), sds((n, hkv, p, d // 32), jnp.float16)
  fn = jax.jit(functools.partial(pd.paged_decode_attention, platform=platform, fmt="int",
                                 k_bits=4, v_bits=4, group_size=32, window=256,
                                 n_sink=4))
  text = lower_for(fn, (sds((b, hq, t, d), BF16), pages, pages, i32(b, m), i32(b, hkv)),
                   dict(q_positions=i32(b, t), pos_pages=i32(n, hkv, p), k_scale=sc,
                        k_zero=sc, v_scale=sc, v_zero=sc), lowering)
  assert "paged_decode_attention" in text


def test_native(native_platform):
  arrays, static = _raw_problem(batch=3, kv_heads=2, head_dim=128, page_size=16,
                                num_pages=40, max_pages=12, lengths=[[0, 1], [70, 191],
                                                                     [100, 5]],
                                dtype=BF16, with_positions=True)
  q, qpos = queries(3, 8, 2, 128, BF16, 191)
  _check(native_platform, arrays, static, q, qpos, dict(window=64, n_sink=4), BF16,
         interpret=False)


def test_support_of_paged_requests():
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  ok = pallas_kernels.KernelRequest(layout="paged", head_dim=128, dtype="bfloat16",
                                    num_q_heads=32, num_kv_heads=8, num_queries=1,
                                    window=4096, n_sink=4)
  assert pallas_kernels.support(ok)
  for fmt in (dict(fmt="int", k_bits=4, v_bits=4, group_size=32), dict(fmt="fp8_e4m3")):
    assert pallas_kernels.support(dataclasses.replace(ok, **fmt))
  for bad, says in ((dict(fmt="int", k_axis="channel", group_size=32), "k_axis='channel'"),
                    (dict(return_colsum=True), "return_colsum"),
                    (dict(num_queries=17), "num_queries=17"),
                    (dict(fmt="int", k_bits=3), "bits=3"), (dict(residual=True), "residual"),
                    (dict(partitions=2), "partitions=2")):
    verdict = pallas_kernels.support(dataclasses.replace(ok, **bad))
    assert not verdict and says in verdict.reason, (bad, verdict)


def test_entry_point_resolves_platform(monkeypatch):
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  seen = {}
  monkeypatch.setattr(pd, "paged_decode_attention", lambda *a, **kw: seen.update(kw) or "ran")
  q, pos, kw, static = _small()
  assert pallas_kernels.paged_attention(q, *pos, **kw, **static, platform="cuda") == "ran"
  assert seen["platform"] == "gpu" and seen["fmt"] == "float"


def test_kvjax_attend_on_a_stacked_layer_dispatches_to_the_fused_kernel():
  # Given a two-layer stacked pool (a ModelCache segment) of per-token INT4 codes
  # (asymmetric, channel groups of 16) written by kvjax.paged, one row holding 1 token,
  # head-wise lengths 1 / 0 / 90 / 57, GQA 4
  quant = quant_spec.per_token(4, group_size=16)
  layers = [_kvjax_problem(quant=quant, batch=2, kv_heads=2, head_dim=64, page_size=16,
                           num_pages=14, max_pages=6, tokens=[1, 90],
                           head_lengths=[[1, 0], [90, 57]], seed=i)[0] for i in range(2)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *layers)
  # When layer 1 attends a two-token step (one padding query) with backend="interpret"
  # (the paged kernel gathers pages in Pallas interpret mode) and with "xla"
  # Then they agree (the step's own tokens are attended exactly on both paths)
  check_backends_agree(stacked, jnp.asarray([[1, 2], [90, -1]], jnp.int32), q_heads=8,
                       head_dim=64, layer=1)
