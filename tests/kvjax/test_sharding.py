"""Sharded caches: placement rules, and 8 simulated CPU devices give the same logits as 1.

The multi-device check runs in a subprocess, since XLA_FLAGS must be set before jax is
imported and the rest of the suite runs on one device.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import models
from kvjax import paged, sharding
from kvjax.cache import DenseKVCache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _abstract_mesh(data, model):
  """A mesh over repeated CPU devices is enough to read placement rules (no device_put)."""
  dev = np.asarray([jax.devices()[0]] * (data * model)).reshape(data, model)
  return jax.sharding.Mesh(dev, ("data", "model"))


def test_placement_rules():
  mesh = _abstract_mesh(2, 4)
  cfg = models.ModelConfig(num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
  dense = models.init_cache(cfg, 4, 8)
  sh = sharding.cache_sharding(dense, mesh)
  seg = sh.segments[0]
  assert seg.k.spec == P(None, "data", "model", None, None)        # [L, B, Hkv, S, D]
  assert seg.positions.spec == P(None, "data", "model", None)
  assert seg.lengths.spec == P(None, "data", "model")
  assert sh.next_position.spec == P("data")
  fac = paged.layer_factory(4, 4, 8, num_pages=6, page_size=4)
  pc = sharding.cache_sharding(models.init_cache(cfg, 4, 8, layer_factory=fac), mesh).segments[0]
  assert pc.k_pages.spec == P(None, None, "model", None, None)     # [L, N, Hkv, P, D]
  assert pc.page_table.spec == P(None, "data", None)
  assert pc.refcount.spec == P(None, None) and pc.num_free.spec == P(None)
  # a pool in 2 partitions puts one on each data shard (pages, refcounts, free lists);
  # 3 partitions do not split over 2 data shards: the pool stays replicated over data
  fac2 = paged.layer_factory(4, 4, 8, num_pages=6, page_size=4, partitions=2)
  p2 = sharding.cache_sharding(models.init_cache(cfg, 4, 8, layer_factory=fac2), mesh)
  p2 = p2.segments[0]
  assert p2.k_pages.spec == P(None, "data", "model", None, None)
  assert p2.refcount.spec == P(None, "data") and p2.part_free.spec == P(None, "data")
  assert p2.page_table.spec == P(None, "data", None)
  fac3 = paged.layer_factory(6, 4, 8, num_pages=6, page_size=4, partitions=3)
  p3 = sharding.cache_sharding(models.init_cache(cfg, 6, 8, layer_factory=fac3), mesh)
  assert p3.segments[0].k_pages.spec == P(None, None, "model", None, None)
  # a lone layer cache has no layer axis; 3 kv heads do not split 4 ways -> replicated
  one = sharding.cache_sharding(DenseKVCache.init(4, 3, 8, 8), mesh)
  assert one.k.spec == P("data", None, None, None)
  with pytest.raises(ValueError, match="size 3 cannot be split over mesh axis 'model'"):
    sharding.cache_sharding(DenseKVCache.init(4, 3, 8, 8), mesh, strict=True)


SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    import models
    from kvjax import paged, quant, sharding

    cfg = models.ModelConfig(num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                             hidden_size=32, intermediate_size=64)
    B, T0, T = 4, 5, 8
    tok = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size, dtype=jnp.int32)

    def fac(b, **kw):
      return paged.layer_factory(b, cfg.num_kv_heads, cfg.head_dim, num_pages=12, page_size=4,
                                 **kw)
    kivi = dict(partitions=2, quant=quant.kivi(bits=4, group_size=2, residual=2))

    def run(m, cache, tokens):
      lg, cache = models.prefill(m, tokens[:, :T0], cache=cache)
      outs = [lg]
      for i in range(T0, T):
        lg, cache = models.decode(m, tokens[:, i:i + 1], cache)
        outs.append(lg)
      return np.asarray(jnp.concatenate(outs, 1)), cache

    model = models.Transformer(cfg, rngs=nnx.Rngs(0))
    # one device, dense cache: the reference for both sharded runs (paged == dense on one
    # device is tests/kvjax/test_paged.py's business)
    ref = run(model, models.init_cache(cfg, B, T), tok)[0]
    # KIVI pages are lossy: their reference is the same partitioned pool on one device
    ref_kivi = run(model, models.init_cache(cfg, B, T, layer_factory=fac(B, **kivi)), tok)[0]

    mesh = sharding.make_mesh(data=2, model=4)
    tp = {"wq": P(None, None, "model"), "wk": P(None, None, "model"),
          "wv": P(None, None, "model"), "wo": P(None, "model", None),
          "w_gate": P(None, None, "model"), "w_up": P(None, None, "model"),
          "w_down": P(None, "model", None)}
    state = nnx.state(model)
    def place(path, x):
      name = str(path[0].key)
      return jax.device_put(x, NamedSharding(mesh, tp.get(name, P())))
    nnx.update(model, jax.tree_util.tree_map_with_path(place, state))
    tok_s = jax.device_put(tok, sharding.batch_sharding(mesh))
    out = {"devices": len(jax.devices())}
    for k, f, want in (("dense", None, ref), ("paged", fac(B), ref),
                       ("paged_parts", fac(B, partitions=2), ref),
                       ("kivi_parts", fac(B, **kivi), ref_kivi)):
      cache = sharding.shard(models.init_cache(cfg, B, T, layer_factory=f), mesh, strict=True)
      lg, cache = run(model, cache, tok_s)
      seg = cache.segments[0]
      leaf = seg.k if k == "dense" else seg.k_pages
      out[k] = {"maxdiff": float(np.abs(lg - want).max()),
                "scale": float(np.abs(want).max()),
                "shards": len(leaf.sharding.device_set),
                "shard_shape": list(leaf.addressable_shards[0].data.shape),
                "shape": list(leaf.shape)}
      if k != "dense":
        paged.check_invariants(jax.device_get(seg))
      if k == "kivi_parts":
        out[k]["res_shard_shape"] = list(seg.k_res.addressable_shards[0].data.shape)
        out[k]["pages_in_use"] = paged.pages_in_use(cache).tolist()
    out["wq_shard"] = list(model.wq.value.addressable_shards[0].data.shape)
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_match_one():
  """Given a 2x4 (data x model) mesh of simulated CPUs, params sharded over heads and caches
  over kv heads / rows, prefill + decode logits equal the single-device run."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
  out = json.loads(line[len("RESULT"):])
  assert out["devices"] == 8
  assert out["wq_shard"] == [2, 32, 16]                 # q heads split 4 ways
  for kind in ("dense", "paged", "paged_parts", "kivi_parts"):
    r = out[kind]
    assert r["maxdiff"] <= 1e-4 * max(1.0, r["scale"]), (kind, r)
    assert r["shards"] == 8, (kind, r)
  # kv heads split over model (4 -> 1), rows over data (4 -> 2) for the dense cache;
  # a one-partition page pool keeps all its pages on every data shard (heads split only);
  # a two-partition pool puts one partition (6 of 12 pages) on each data shard
  assert out["dense"]["shard_shape"] == [2, 2, 1, 8, 8], out["dense"]
  assert out["paged"]["shard_shape"] == [2, 12, 1, 4, 8], out["paged"]
  assert out["paged_parts"]["shard_shape"] == [2, 6, 1, 4, 8], out["paged_parts"]
  kv = out["kivi_parts"]
  assert kv["shard_shape"] == [2, 6, 1, 4, 4], kv        # int4 codes: 8 dims in 4 bytes
  assert kv["res_shard_shape"] == [2, 2, 1, 2, 8], kv    # residual window: rows and heads
  # 8 tokens per row, R = 2, G = 2: 6 flushed = 2 pages per row
  assert kv["pages_in_use"] == [8, 8], kv
