"""pallas_kernels.attention dispatch and pallas_kernels.supports."""

import dataclasses

import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels import decode_attention as decode_mod
from pallas_kernels import flash_prefill as prefill_mod
from tests.pallas_kernels._util import call_fast, check_against_reference, problem


def _call(p, **kw):
  return pallas_kernels.attention(p["q"], p["k"], p["v"], p["k_lengths"],
                                  q_positions=p["q_positions"],
                                  k_positions=p["k_positions"], **kw)


@pytest.mark.parametrize("queries,kernel", [(1, "decode"), (16, "decode"), (17, "prefill")])
def test_dispatch_by_query_count(monkeypatch, queries, kernel):
  calls = []

  def fake(name):
    def run(q, k, v, k_lengths, **kw):
      calls.append((name, kw["platform"]))
      b, hq, t, _ = q.shape
      return (jnp.zeros((b, hq, t, v.shape[-1]), q.dtype), jnp.zeros((b, hq, t)),
              jnp.zeros(k.shape[:3]))
    return run

  monkeypatch.setattr(decode_mod, "decode_attention", fake("decode"))
  monkeypatch.setattr(prefill_mod, "flash_prefill", fake("prefill"))
  p = problem(batch=1, q_heads=2, kv_heads=1, queries=queries, slots=32, head_dim=16)
  out, lse, colsum = _call(p, platform="tpu", return_colsum=True)
  assert calls == [(kernel, "tpu")]
  assert lse is None and colsum is not None and out.shape == p["q"].shape
  _call(p, platform="cuda")
  assert calls[-1] == (kernel, "gpu")


def test_cpu_needs_interpret():
  p = problem(batch=1, q_heads=2, kv_heads=1, slots=8, head_dim=16)
  with pytest.raises(ValueError, match="interpret=True"):
    _call(p, platform="cpu")
  with pytest.raises(ValueError, match="platform='vulkan'"):
    _call(p, platform="vulkan", interpret=True)


def test_end_to_end_on_cpu_interpret():
  p = problem(batch=2, q_heads=4, kv_heads=2, queries=3, slots=40, head_dim=16,
              lengths=[[0, 40], [1, 23]])
  result = call_fast(pallas_kernels.attention, p["q"], p["k"], p["v"], p["k_lengths"],
                     q_positions=p["q_positions"], k_positions=p["k_positions"],
                     static=dict(platform="cpu", interpret=True, return_lse=True,
                                 return_colsum=True, window=8, block_k=16))
  check_against_reference(result, p, dtype=jnp.float32, window=8)


def test_support_of_dense_requests():
  ok = pallas_kernels.KernelRequest(head_dim=128, dtype="bfloat16", num_q_heads=32,
                                    num_kv_heads=8, window=4096, n_sink=4,
                                    softcap=50.0, return_colsum=True, colsum_window=64)
  assert pallas_kernels.support(ok)
  assert pallas_kernels.support(pallas_kernels.KernelRequest(causal=False))
  for bad, says in ((dict(head_dim=12), "head_dim=12"), (dict(head_dim=512), "head_dim=512"),
                    (dict(dtype="int8"), "dtype=int8"),
                    (dict(num_q_heads=6, num_kv_heads=4), "num_q_heads=6"),
                    (dict(window=0), "window=0"), (dict(softcap=-2.0), "softcap=-2.0"),
                    (dict(colsum_window=0), "colsum_window=0"), (dict(fmt="int"), "fmt='int'"),
                    (dict(layout="sparse"), "layout='sparse'")):
    verdict = pallas_kernels.support(dataclasses.replace(ok, **bad))
    assert not verdict and says in verdict.reason, (bad, verdict)
