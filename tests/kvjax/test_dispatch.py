"""The dispatch rule (kvjax.attention.kernel_backend), the same for every cache kind.

Dense K/V, a quantized cache and a page pool each ask `kernel_backend`: "xla" always
takes the reference path, "auto" takes a kernel only on GPU/TPU when it supports the
request, "pallas" takes the kernel or raises (on CPU always), "interpret" runs the kernel
in Pallas interpret mode or raises naming what is unsupported. The interpret-mode results
of each kind against its XLA path are in tests/kvjax/test_attention.py (dense) and
tests/pallas_kernels/test_{quantized,paged}_decode.py (`test_kvjax_attend_*`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention as A
from kvjax import cache as cache_lib
from kvjax import paged as paged_lib
from kvjax.quant import cache as quant_cache
from kvjax.quant import spec as quant_spec

F32 = jnp.float32


def _step(b=1, hq=2, hkv=1, t=1, d=16, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, hq, t, d)), F32)
  kv = jnp.asarray(rng.standard_normal((b, hkv, t, d)), F32)
  return q, kv, kv, jnp.full((b, t), 8, jnp.int32)


def _dense(b=1, hkv=1, s=8, d=16):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((b, hkv, s, d)), F32)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, hkv, s))
  return cache_lib.DenseKVCache(k=x, v=x, positions=pos, lengths=jnp.full((b, hkv), s))


def _kinds():
  """One cache of each kind holding the same 8 tokens, with room for a step."""
  dense = _dense()
  grown = cache_lib.DenseKVCache(
      k=jnp.pad(dense.k, ((0, 0), (0, 0), (0, 8), (0, 0))),
      v=jnp.pad(dense.v, ((0, 0), (0, 0), (0, 8), (0, 0))),
      positions=jnp.pad(dense.positions, ((0, 0), (0, 0), (0, 8)), constant_values=-1),
      lengths=dense.lengths)
  quant = quant_cache.quantize(grown, quant_spec.int8())
  pool = paged_lib.PagedKVCache.init(1, 1, 16, num_pages=4, page_size=8, max_pages=2)
  pool = pool.append(dense.k, dense.v, dense.positions[:, 0])
  return {"dense": grown, "quantized": quant, "paged": pool}


@pytest.mark.parametrize("kind", ["dense", "quantized", "paged"])
def test_pallas_on_cpu_raises_for_every_kind(kind):
  # Given a cache of each kind on a CPU-only machine
  cache = _kinds()[kind]
  q, k_new, v_new, qpos = _step()
  # When a step asks for backend="pallas", Then it raises (no silent interpret or XLA)
  with pytest.raises(ValueError, match="backend='pallas' runs Pallas kernels on GPU/TPU"):
    cache.attend(q, k_new, v_new, qpos, A.AttentionSpec(backend="pallas"))


@pytest.mark.parametrize("kind", ["dense", "quantized", "paged"])
def test_auto_and_xla_agree_on_cpu_for_every_kind(kind):
  # "auto" on CPU is the XLA path, for every kind
  cache = _kinds()[kind]
  q, k_new, v_new, qpos = _step()
  got, _ = cache.attend(q, k_new, v_new, qpos, A.AttentionSpec(backend="auto"),
                        return_lse=True)
  want, _ = cache.attend(q, k_new, v_new, qpos, A.AttentionSpec(backend="xla"),
                         return_lse=True)
  np.testing.assert_array_equal(got.out, want.out)
  np.testing.assert_array_equal(got.lse, want.lse)


def test_interpret_names_what_each_kernel_does_not_support():
  kinds = _kinds()
  q, k_new, v_new, qpos = _step()
  spec = A.AttentionSpec(backend="interpret")
  # The quantized and paged decode kernels return no colsum
  for kind in ("quantized", "paged"):
    with pytest.raises(ValueError, match=f"the Pallas {kind} kernel does not support "
                                         "return_colsum"):
      kinds[kind].attend(q, k_new, v_new, qpos, spec, return_colsum=True)
  # The paged kernel reads neither a residual window nor per-channel (KIVI) scales
  for quant, says in ((quant_spec.per_token(4, residual=8), "residual=True"),
                      (quant_spec.kivi(bits=4, group_size=8, residual=8), "k_axis='channel'")):
    pool = paged_lib.PagedKVCache.init(1, 1, 16, num_pages=4, page_size=8, max_pages=2,
                                       quant=quant)
    with pytest.raises(ValueError, match=says):
      pool.attend(q, k_new, v_new, qpos, spec)
  # The dense kernel needs head dims that are multiples of 8
  q12, kv12 = q[..., :12], kinds["dense"].k[..., :12]
  with pytest.raises(ValueError, match="head_dim=12"):
    A.attention(q12, kv12, kv12, kinds["dense"].lengths, q_positions=qpos,
                k_positions=kinds["dense"].positions, spec=spec)


def test_the_rule_on_an_accelerator(monkeypatch):
  # Given a machine that reports a GPU (the rule only; no kernel runs here)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q = jnp.zeros((1, 4, 1, 64), jnp.bfloat16)
  kw = dict(num_kv_heads=2, head_dim_v=64)
  mode = lambda backend, **extra: A.kernel_backend(A.AttentionSpec(backend=backend), q,
                                                   **kw, **extra)
  int4 = quant_spec.per_token(4)
  # Then "auto" takes each kernel when it supports the request, XLA otherwise
  assert mode("auto") == "pallas"
  assert mode("auto", layout="quantized", quant=int4) == "pallas"
  assert mode("auto", layout="paged", quant=int4) == "pallas"
  assert mode("auto", layout="quantized", quant=int4, return_colsum=True) == "xla"
  assert mode("auto", layout="paged", partitions=2) == "xla"
  # "pallas" takes the kernel or names what it does not support
  assert mode("pallas", layout="quantized", quant=int4) == "pallas"
  with pytest.raises(ValueError, match="partitions=2"):
    mode("pallas", layout="paged", partitions=2)
  # "interpret", and the older spelling interpret=True with "pallas", interpret everywhere
  assert mode("interpret", layout="paged") == "interpret"
  assert mode("pallas", interpret=True) == "interpret"
  assert mode("xla", interpret=True) == "xla"


def test_bad_backend_names_the_allowed_values():
  with pytest.raises(ValueError, match=r"backend='triton'; allowed: \('auto', 'xla', "
                                       r"'pallas', 'interpret'\)"):
    A.AttentionSpec(backend="triton")
