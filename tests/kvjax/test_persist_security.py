"""Saved caches are data: loading one never imports or calls what the file names, and every
field is validated (names the file and the field) before any array is used.

Files here are crafted by editing real saved caches (their JSON tree and tensors) the way an
attacker would. "Nothing ran" is proven by markers: a shell command that would create a
file, and a module on sys.path that would create a file when imported.
"""

import json
import os
import struct
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from kvjax import persist, quant
from kvjax import safetensors_io as st_io
from kvjax.cache import DenseKVCache, ModelCache
from kvjax.window import WindowKVCache

B, H, D, CAP = 2, 2, 8, 6
CFG = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=H, head_dim=D)


def _filled_dense(h=H, cap=CAP, n=4):
  k = jax.random.normal(jax.random.key(0), (B, h, n, D))
  pos = jnp.tile(jnp.arange(n, dtype=jnp.int32), (B, 1))
  return DenseKVCache.init(B, h, cap, D).append(k, -k, pos)


def _model_cache(h=H):
  layers = [_filled_dense(h), WindowKVCache.init(B, h, 3, D)]
  return ModelCache.from_layers(layers, jnp.array([4, 4], jnp.int32))


def _saved(tmp_path, cache=None, name="c.safetensors"):
  path = str(tmp_path / name)
  models.save_cache(CFG, _model_cache() if cache is None else cache, path)
  return path


def _edit(path, tree_fn=None, tensors_fn=None):
  """Rewrites a saved cache with an edited JSON tree and/or tensors (same fingerprint)."""
  meta = st_io.read_metadata(path)
  tensors = {k: np.array(v) for k, v in st_io.read_safetensors(path).items()}
  if tree_fn is not None:
    tree = json.loads(meta["tree"])
    tree = tree_fn(tree) or tree
    meta["tree"] = json.dumps(tree)
  if tensors_fn is not None:
    tensors = tensors_fn(tensors) or tensors
  st_io.write_safetensors(path, tensors, meta)
  return path


def _layer_node(tree, i=0):
  return tree["data"]["segments"]["tuple"][i]


# -- nothing named by the file is imported or called --------------------------------------
def test_os_system_kind_runs_nothing(tmp_path):
  marker = tmp_path / "pwned"
  path = _saved(tmp_path)

  def evil(tree):
    _layer_node(tree)["kind"] = "kvjax.persist:importlib._bootstrap_external._os.system"
    _layer_node(tree)["data"] = {}
    _layer_node(tree)["static"] = {"command": f"touch {marker}"}
  _edit(path, evil)
  with pytest.raises(ValueError, match=r"c\.safetensors.*segments\.0.*not a kvjax kind"):
    models.load_cache(CFG, path)
  with pytest.raises(ValueError, match="not a kvjax kind"):
    persist.load(path)
  assert not marker.exists()


def _evil_module(tmp_path, monkeypatch):
  """A module on sys.path that leaves a marker file when imported."""
  marker = tmp_path / "imported"
  (tmp_path / "kvjax_evil_mod.py").write_text(
      f"open({str(marker)!r}, 'w').write('x')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  return marker


def test_import_module_kind_imports_nothing(tmp_path, monkeypatch):
  marker = _evil_module(tmp_path, monkeypatch)
  path = _saved(tmp_path)

  def evil(tree):
    node = _layer_node(tree)
    node.update(kind="kvjax.persist:importlib.import_module", data={},
                static={"name": "kvjax_evil_mod"})
  _edit(path, evil)
  before = set(sys.modules)
  with pytest.raises(ValueError, match="not a kvjax kind"):
    models.load_cache(CFG, path)
  assert "kvjax_evil_mod" not in sys.modules and set(sys.modules) <= before | {
      m for m in sys.modules if m.startswith(("kvjax.", "jax", "ml_dtypes"))}
  assert not marker.exists()


def test_static_dataclass_values_come_only_from_the_allowlist(tmp_path, monkeypatch):
  marker = tmp_path / "pwned"
  imported = _evil_module(tmp_path, monkeypatch)
  c = quant.QuantizedKVCache.init(B, H, 4, D, quant.int8())
  path = _saved(tmp_path, ModelCache.from_layers([c, c], jnp.array([0, 0], jnp.int32)))
  good = st_io.read_metadata(path)["tree"]
  attempts = [
      ("kvjax.persist:importlib._bootstrap_external._os.system",
       {"command": f"touch {marker}"}),
      ("kvjax.persist:importlib.import_module", {"name": "kvjax_evil_mod"}),
      ("kvjax.offload:OffloadSpec", {"mode": "layers"}),  # a real kvjax class, not allowed
  ]
  for name, fields in attempts:
    def evil(tree, name=name, fields=fields):
      _layer_node(tree)["static"]["spec"] = {"__dataclass__": name, "fields": fields}
    _edit(path, lambda t: json.loads(good))
    _edit(path, evil)
    with pytest.raises(ValueError, match=r"segments\.0\.spec.*static dataclass .* is not "
                       r"allowed here.*QuantSpec"):
      models.load_cache(CFG, path)
  # a QuantSpec whose nested RopeConfig slot names something else is refused the same way
  def evil_rope(tree):
    _layer_node(tree)["static"]["spec"]["fields"]["rope"] = {
        "__dataclass__": "kvjax.persist:importlib.import_module",
        "fields": {"name": "kvjax_evil_mod"}}
  _edit(path, lambda t: json.loads(good))
  _edit(path, evil_rope)
  with pytest.raises(ValueError, match=r"spec\.rope.*not allowed here"):
    persist.load(path)
  assert not marker.exists() and not imported.exists()
  assert "kvjax_evil_mod" not in sys.modules


def test_register_kind_is_the_opt_in_for_user_kinds(tmp_path):
  import flax.struct  # pylint: disable=import-outside-toplevel

  @flax.struct.dataclass
  class Counter:  # a (minimal) cache kind defined outside kvjax
    count: jax.Array
    label: str = flax.struct.field(pytree_node=False, default="a")
    capacity = 0
    nbytes = property(lambda self: self.count.nbytes)
    length = property(lambda self: self.count[:, None])

  path = str(tmp_path / "u.safetensors")
  c = Counter(count=jnp.arange(3, dtype=jnp.int32), label="hello")
  persist.save(path, c, fingerprint="fp")
  with pytest.raises(ValueError, match="not a kvjax kind"):
    persist.load(path)
  persist.register_kind(Counter, fields={"count": persist.Array(("B",), "int32")},
                        static={"label": persist.Str()})
  back, _ = persist.load(path)
  assert type(back) is Counter and back.label == "hello"
  np.testing.assert_array_equal(back.count, [0, 1, 2])
  _edit(path, lambda t: t["static"].update(label=7))
  with pytest.raises(ValueError, match=r"cache\.label.*not a string"):
    persist.load(path)


# -- every field validated ------------------------------------------------------------
def test_negative_next_position_is_refused(tmp_path):
  path = _edit(_saved(tmp_path), tensors_fn=lambda t: t.update(
      {"cache.next_position": np.array([-50, 4], np.int32)}))
  with pytest.raises(ValueError, match=r"c\.safetensors: cache\.next_position: min -50"):
    models.load_cache(CFG, path)


def test_reshaped_arrays_are_refused(tmp_path):
  path = _saved(tmp_path)
  name = "cache.segments.0.k"  # stacked Dense keys [1, B, H, S, D]
  good = np.array(st_io.read_safetensors(path)[name])
  reshapes = [good.reshape(1, B, H, CAP * 2, D // 2),   # same rank, other sizes
              good.reshape(1, B, H, CAP * D),            # other rank
              good.reshape(1, B, H, D, CAP)]             # slots / head_dim swapped
  for bad in reshapes:
    _edit(path, tensors_fn=lambda t, bad=bad: t.update({name: bad}))
    with pytest.raises(ValueError, match=r"c\.safetensors: cache\.segments\.0\.(k|v|"
                       r"positions|lengths): .*shape|batch"):
      models.load_cache(CFG, path)
    _edit(path, tensors_fn=lambda t: t.update({name: good}))
  assert models.load_cache(CFG, path).batch == B  # the untouched file still loads


@pytest.mark.parametrize("field,value,match", [
    ("lengths", lambda x: x + CAP, r"segments\.0\.lengths: values in .*allowed \[0, "
     r"capacity=6\]"),
    ("lengths", lambda x: x - 5, r"segments\.0\.lengths: values in \[-1"),
    ("positions", lambda x: x - 7, r"segments\.0\.positions: min -8"),
    ("k", lambda x: np.where(x > 0, np.nan, x).astype(x.dtype), r"segments\.0\.k: holds NaN"),
    ("positions", lambda x: x.astype(np.int64), r"segments\.0\.positions: dtype int64; "
     "allowed: int32"),
])
def test_slot_fields_are_range_checked(tmp_path, field, value, match):
  name = f"cache.segments.0.{field}"
  path = _edit(_saved(tmp_path), tensors_fn=lambda t: t.update({name: value(t[name])}))
  with pytest.raises(ValueError, match=match):
    models.load_cache(CFG, path)


def test_window_and_scan_group_invariants(tmp_path):
  path = _saved(tmp_path)
  good = st_io.read_metadata(path)["tree"]
  # ring bookkeeping: lengths must be min(total, capacity)
  _edit(path, tensors_fn=lambda t: t.update({"cache.segments.1.total": np.full(
      (1, B, H), 2, np.int32)}))
  with pytest.raises(ValueError, match=r"segments\.1\.lengths: must equal min\(total"):
    models.load_cache(CFG, path)
  _edit(path, tensors_fn=lambda t: t.update({"cache.segments.1.total": np.zeros(
      (1, B, H), np.int32)}))
  # a ring written before its sinks were named n_sink (and rings could dilate) still loads
  _edit(path, lambda t: _layer_node(t, 1).update(static={"sink": 0}))
  old = models.load_cache(CFG, path).layers()[1]
  assert type(old).__name__ == "WindowKVCache" and (old.n_sink, old.dilation) == (0, 1)
  # sink must leave a window of >= 1 slot
  _edit(path, lambda t: _layer_node(t, 1).update(static={"n_sink": 3, "dilation": 1}))
  with pytest.raises(ValueError, match=r"segments\.1\.n_sink: 3; must be < capacity=3"):
    models.load_cache(CFG, path)
  # segment sizes that disagree with the stacked arrays
  _edit(path, lambda t: json.loads(good))
  _edit(path, lambda t: t["static"].update(segment_sizes={"__tuple__": [2, 1]}))
  with pytest.raises(ValueError, match=r"segments\.0\.k: .*leading \(stacked layer\) axes "
                     r"must be \[2\]"):
    models.load_cache(CFG, path)
  _edit(path, lambda t: json.loads(good))
  _edit(path, lambda t: t["static"].update(segment_periods={"__tuple__": [2, 3]}))
  with pytest.raises(ValueError, match=r"cache\.segment_periods: entries 0\.\.1 must form"):
    models.load_cache(CFG, path)


def test_cache_must_fit_the_model(tmp_path):
  # Same config fingerprint, but one kv head per layer: caught by the shape checks.
  path = _saved(tmp_path)
  _edit(path, tensors_fn=lambda t: {k: (v[:, :, :1] if v.ndim >= 4 or k.endswith(
      ("lengths", "total")) else v) for k, v in t.items()})
  with pytest.raises(ValueError, match=r"segments\.0: DenseKVCache has kv heads=1; the "
                     "model has 2"):
    models.load_cache(CFG, path)
  assert persist.load(path)[0].layers()[0].k.shape[1] == 1  # valid on its own
  # a cache of another depth
  other = ModelCache.from_layers([_filled_dense()] * 3, jnp.array([4, 4], jnp.int32))
  path = _saved(tmp_path, other, "deep.safetensors")
  with pytest.raises(ValueError, match="holds 3 layers; the model has 2"):
    models.load_cache(CFG, path)


def test_batch_must_agree_across_layers(tmp_path):
  path = _saved(tmp_path)
  _edit(path, tensors_fn=lambda t: t.update({"cache.next_position": np.array([4, 4, 4],
                                                                             np.int32)}))
  with pytest.raises(ValueError, match=r"cache\.next_position: batch 3; the rest of the "
                     "cache has batch 2"):
    models.load_cache(CFG, path)


def test_quantized_layout_is_rebuilt_from_the_spec(tmp_path):
  spec = quant.kivi(2, group_size=4, residual=4)
  c = quant.QuantizedKVCache.init(B, H, 12, D, spec)
  path = _saved(tmp_path, ModelCache.from_layers([c, c], jnp.array([0, 0], jnp.int32)))
  assert models.load_cache(CFG, path).layers()[0].spec == spec
  # a spec claiming 4-bit codes over 2-bit storage
  _edit(path, lambda t: _layer_node(t)["static"]["spec"]["fields"].update(k_bits=4))
  with pytest.raises(ValueError, match=r"segments\.0\.k_codes: uint8\[2, 2, 2, 8, 2\]; the "
                     r"spec .* implies uint8\[2, 2, 8, 4\]"):
    models.load_cache(CFG, path)
  _edit(path, lambda t: _layer_node(t)["static"]["spec"]["fields"].update(k_bits=3))
  with pytest.raises(ValueError, match=r"segments\.0\.spec: invalid QuantSpec: k_bits=3"):
    models.load_cache(CFG, path)


def test_tree_and_tensor_bookkeeping(tmp_path):
  path = _saved(tmp_path)
  good = st_io.read_metadata(path)["tree"]
  _edit(path, tensors_fn=lambda t: t.update({"extra": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"tensors \['extra'\] are not part of the cache tree"):
    persist.load(path)
  _edit(path, tensors_fn=lambda t: {k: v for k, v in t.items() if k != "extra"})
  _edit(path, lambda t: _layer_node(t)["data"]["v"].update(tensor="cache.segments.0.k"))
  with pytest.raises(ValueError, match=r"segments\.0\.v: tensor 'cache.segments.0.k' is "
                     "used by two fields"):
    persist.load(path)
  _edit(path, lambda t: json.loads(good))
  _edit(path, lambda t: _layer_node(t)["data"].__delitem__("positions"))
  with pytest.raises(ValueError, match=r"segments\.0: DenseKVCache data fields"):
    persist.load(path)
  meta = st_io.read_metadata(path)
  meta["tree"] = "{not json"
  tensors = {k: np.array(v) for k, v in st_io.read_safetensors(path).items()}
  st_io.write_safetensors(path, tensors, meta)
  with pytest.raises(ValueError, match=r"c\.safetensors: metadata 'tree': is not valid JSON"):
    persist.load(path)


def test_all_kinds_round_trip_bit_exactly(tmp_path):
  from kvjax import lowrank, mixed, recurrent  # pylint: disable=import-outside-toplevel
  from kvjax.rope import RopeConfig  # pylint: disable=import-outside-toplevel
  basis = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (H, D, 4)))[0]
  kvq = quant.kvquant(4, group_size=4, residual=4, outlier_frac=0.25, rope=RopeConfig(D))
  kinds = [
      _filled_dense(), WindowKVCache.init(B, H, 3, D, n_sink=1),
      WindowKVCache.init(B, H, 3, D, n_sink=1, dilation=2),
      quant.QuantizedKVCache.init(B, H, 8, D, quant.int8()),
      quant.QuantizedKVCache.init(B, H, 8, D, kvq),
      lowrank.PrunedKeyCache.init(B, H, 8, D, keep=4),
      lowrank.LowRankKVCache.init(B, 8, basis, basis),
      mixed.HeadSplitCache.from_parts([DenseKVCache.init(B, 1, 8, D),
                                       quant.QuantizedKVCache.init(B, 1, 8, D, quant.int8())]),
      recurrent.LatentKVCache.init(B, 8, 6, 4),
      recurrent.ConvRecurrentState(conv=recurrent.ConvState.init(B, 4, 6),
                                   rec=recurrent.LinearAttentionState.init(B, 2, 4, 4)),
  ]
  for i, c in enumerate(kinds):
    path = str(tmp_path / f"{i}.safetensors")
    persist.save(path, c, fingerprint="fp")
    back, _ = persist.load(path)
    la, ta = jax.tree.flatten(c)
    lb, tb = jax.tree.flatten(back)
    assert ta == tb, type(c).__name__
    for x, y in zip(la, lb):
      assert (x.dtype, x.shape) == (y.dtype, y.shape)
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


# -- the file itself ---------------------------------------------------------------------
def test_huge_header_claim_is_refused_fast(tmp_path):
  path = str(tmp_path / "big.safetensors")
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", 8 << 30) + b"{}" + b" " * 30)
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=r"big\.safetensors: header length 8589934592 is "
                     r"impossible.*file size - 8 = 32"):
    persist.load(path)
  assert time.perf_counter() - t0 < 0.5


def test_truncated_and_random_files_give_named_errors(tmp_path):
  path = _saved(tmp_path)
  raw = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(raw[:-5])
  with pytest.raises(ValueError, match=r"c\.safetensors: .*truncated file"):
    models.load_cache(CFG, path)
  rng = np.random.default_rng(0)
  rand = str(tmp_path / "rand.safetensors")
  for n in (0, 3, 8, 9, 64, 4096):
    for _ in range(5):
      with open(rand, "wb") as f:
        f.write(rng.bytes(n))
      with pytest.raises(ValueError, match=r"rand\.safetensors: "):
        persist.load(rand)
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    persist.load(str(tmp_path / "nope.safetensors"))
