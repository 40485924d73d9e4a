"""Checkpoints, configs and index files are data: reads are bounded by the file, names may
not leave the model folder, configs and weights are validated with errors naming the file,
field or tensor.

Every checkpoint here is written by the test itself (a tiny Llama) and then damaged the way
a crafted or broken download would be. The `safetensors` package (pinned in requirements)
is the independent reference for what a well-formed file is: it must agree with
`kvjax.safetensors_io` on every file built here, good or bad.
"""

import json
import os
import shutil
import struct
import time

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx

import models
from kvjax import safetensors_io as st_io
from models import hf, presets

CFG = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A sharded tiny checkpoint (index + 3 shards) and its reference logits."""
  root = tmp_path_factory.mktemp("ckpt")
  model = models.Transformer(CFG, rngs=nnx.Rngs(0))
  path = str(root / "sharded")
  hf.save_pretrained(model, path, max_shard_bytes=20_000)
  tok = np.arange(6, dtype=np.int32)[None]
  return path, np.asarray(model(tok)), tok


@pytest.fixture
def work(ckpt, tmp_path):
  """A fresh copy of the checkpoint to damage: (model dir, index dict)."""
  path = str(tmp_path / "model")
  shutil.copytree(ckpt[0], path)
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    return path, json.load(f)


def _write_index(path, index):
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)


def _shard_of(index, tensor):
  return index["weight_map"][tensor]


def _rewrite_tensor(path, index, tensor, value):
  fp = os.path.join(path, _shard_of(index, tensor))
  tensors = {k: np.array(v) for k, v in st_io.read_safetensors(fp).items()}
  tensors[tensor] = value
  st_io.write_safetensors(fp, tensors, {"format": "pt"})


def test_the_untouched_checkpoint_loads(ckpt):
  path, ref, tok = ckpt
  np.testing.assert_allclose(np.asarray(models.from_pretrained(path)(tok)), ref, atol=1e-6)


# -- index entries may not leave the model folder ----------------------------------------
def test_index_path_escape_is_refused(work, tmp_path):
  path, index = work
  name = "model.embed_tokens.weight"
  # A real shard outside the folder, so only the path check can stop it being read.
  outside = tmp_path / "outside"
  outside.mkdir()
  shutil.copy(os.path.join(path, _shard_of(index, name)), outside / "x.safetensors")
  for bad in ("../outside/x.safetensors", str(outside / "x.safetensors"),
              "sub/../../outside/x.safetensors"):
    index["weight_map"][name] = bad
    _write_index(path, index)
    with pytest.raises(ValueError, match=r"weight_map entry for 'model\.embed_tokens\.weight'"
                       r": file name .* is not allowed.*no absolute paths, no '\.\.'"):
      models.from_pretrained(path)


def test_symlinks_may_not_leave_the_folder(work, tmp_path):
  path, index = work
  shard = _shard_of(index, "model.norm.weight")
  outside = tmp_path / "elsewhere.safetensors"
  shutil.move(os.path.join(path, shard), outside)
  os.symlink(outside, os.path.join(path, shard))
  with pytest.raises(ValueError, match=r"resolves to .*elsewhere\.safetensors.*outside the "
                     r"model folder"):
    models.from_pretrained(path)


def test_hub_snapshot_symlinks_into_blobs_are_allowed(ckpt, tmp_path):
  # The Hugging Face hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>.
  path, ref, tok = ckpt
  repo = tmp_path / "models--x--tiny"
  snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
  snap.mkdir(parents=True)
  blobs.mkdir()
  for i, fn in enumerate(sorted(os.listdir(path))):
    shutil.copy(os.path.join(path, fn), blobs / f"blob{i}")
    os.symlink(os.path.join("..", "..", "blobs", f"blob{i}"), snap / fn)
  np.testing.assert_allclose(np.asarray(models.from_pretrained(str(snap))(tok)), ref,
                             atol=1e-6)


def test_a_tensor_stored_twice_is_refused(work):
  path, index = work
  first, second = sorted(set(index["weight_map"].values()))[:2]
  fp = os.path.join(path, second)
  tensors = {k: np.array(v) for k, v in st_io.read_safetensors(fp).items()}
  dup = next(iter(st_io.read_safetensors(os.path.join(path, first))))
  tensors[dup] = np.zeros((1,), np.float32)
  st_io.write_safetensors(fp, tensors, {"format": "pt"})
  with pytest.raises(ValueError, match=f"tensor '{dup}' is stored twice"):
    hf.load_tensors(path)


def test_json_errors_name_the_file(work):
  path, _ = work
  index = os.path.join(path, "model.safetensors.index.json")
  with open(index, "w") as f:
    f.write('{"weight_map": {"a": ')
  with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not valid JSON"):
    models.from_pretrained(path)
  with open(index, "w") as f:
    json.dump({"weight_map": ["model.safetensors"]}, f)
  with pytest.raises(ValueError, match=r"index\.json: 'weight_map' must map tensor names"):
    models.from_pretrained(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write("{oops")
  with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
    models.from_pretrained(path)


# -- configs ------------------------------------------------------------------------------
def _edit_config(path, **kw):
  with open(os.path.join(path, "config.json")) as f:
    d = json.load(f)
  d.update(kw)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(d, f)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM",
                                  "Qwen2ForCausalLM"])
def test_huge_num_hidden_layers_is_refused_at_once(work, arch):
  path, _ = work
  _edit_config(path, num_hidden_layers=10**7, architectures=[arch], use_sliding_window=True,
               sliding_window=4)
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=r"config\.json: num_hidden_layers=10000000; must be "
                     r"an int in \[1, 1024\]"):
    models.from_pretrained(path)
  assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("field,value,match", [
    ("rms_norm_eps", -1, r"rms_norm_eps=-1; must be a finite number in \(0\.0, 1\.0\)"),
    ("rms_norm_eps", 0.0, r"rms_norm_eps=0\.0; must be a finite number"),
    ("rope_theta", -1, r"rope_theta=-1; must be a finite number > 0\.0"),
    ("rope_theta", float("nan"), r"rope_theta=nan; must be a finite number > 0\.0"),
    ("hidden_size", 0, r"hidden_size=0; must be an int in \[1, 65536\]"),
    ("num_attention_heads", 0, r"num_attention_heads=0; must be an int in \[1, 1024\]"),
    ("vocab_size", 1 << 30, r"vocab_size=1073741824; must be an int in \[1, 4194304\]"),
    ("intermediate_size", "64", r"intermediate_size='64'; must be an int"),
    ("num_key_value_heads", 3, r"num_heads=4 must be a multiple of num_kv_heads=3"),
    ("rope_scaling", {"rope_type": "linear", "factor": -2.0},
     r"rope\.factor=-2\.0; must be a finite number > 0\.0"),
])
def test_bad_config_values_name_the_field(work, field, value, match):
  path, _ = work
  _edit_config(path, **{field: value})
  with pytest.raises(ValueError, match=r"config\.json: " + match):
    models.from_pretrained(path)


def test_config_limits_apply_to_every_source():
  with pytest.raises(ValueError, match=r"num_layers=2000; must be an int in \[1, 1024\]"):
    CFG.replace(num_layers=2000)
  with pytest.raises(ValueError, match="num_layers=True"):
    CFG.replace(num_layers=True)
  with pytest.raises(ValueError, match=r"head_dim=4096; must be an int in \[1, 1024\]"):
    CFG.replace(head_dim=4096)
  with pytest.raises(ValueError, match=r"final_logit_softcapping=inf"):
    CFG.replace(final_logit_softcapping=float("inf"))
  with pytest.raises(ValueError, match=r"dtype='int8'; allowed"):
    CFG.replace(dtype="int8")
  for preset in presets.PRESETS.values():
    assert preset.replace() == preset  # the shipped presets satisfy the limits


# -- weights ------------------------------------------------------------------------------
def test_nan_weight_is_named(work):
  path, index = work
  name = "model.layers.1.mlp.up_proj.weight"
  w = np.array(st_io.read_safetensors(os.path.join(path, _shard_of(index, name)))[name])
  w[3, 5] = np.nan
  _rewrite_tensor(path, index, name, w)
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' "
                     "holds NaN or infinite values"):
    models.from_pretrained(path)
  w[3, 5] = np.inf
  _rewrite_tensor(path, index, name, w)
  with pytest.raises(ValueError, match="up_proj.weight' holds NaN or infinite"):
    models.from_pretrained(path)


def test_int32_embedding_is_refused(work):
  path, index = work
  name = "model.embed_tokens.weight"
  _rewrite_tensor(path, index, name, np.ones((64, 32), np.int32))
  with pytest.raises(ValueError, match=r"tensor 'model\.embed_tokens\.weight' has dtype "
                     "int32; weights must be floating point"):
    models.from_pretrained(path)


# -- the safetensors files themselves -----------------------------------------------------
def _agrees_with_safetensors(path, ours_ok: bool):
  """The `safetensors` package accepts the file iff `ours_ok`."""
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      for k in f.keys():
        f.get_tensor(k)
    theirs_ok = True
  except Exception:  # pylint: disable=broad-except
    theirs_ok = False
  assert theirs_ok == ours_ok, (path, ours_ok)


def _header_dtype(header):
  return header.get("w", {}).get("dtype") if isinstance(header, dict) else None


def _raw_file(path, header: dict, data: bytes, n=None):
  hb = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
  return str(path)


def test_header_length_claim_of_8_gib_is_refused_fast(work):
  path, index = work
  shard = os.path.join(path, _shard_of(index, "model.norm.weight"))
  raw = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(struct.pack("<Q", 8 << 30) + raw[8:])
  t0 = time.perf_counter()
  with pytest.raises(ValueError, match=r"model-\d+-of-\d+\.safetensors: header length "
                     r"8589934592 is impossible"):
    models.from_pretrained(path)
  assert time.perf_counter() - t0 < 0.5
  _agrees_with_safetensors(shard, False)


@pytest.mark.parametrize("header,data,match", [
    # offsets past the end of the file
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8,
     r"tensor 'w': .*truncated file|tensors end at data byte 16 but the data section holds 8"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [1 << 40, (1 << 40) + 8]}},
     b"\0" * 8, r"tensor 'w': data_offsets \[1099511627776, 1099511627784\] leaves a gap"),
    # dtype x shape != byte count
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8,
     r"tensor 'w': dtype F32 x shape \[2, 2\] is 16 bytes but data_offsets \[0, 8\] span 8"),
    # overlapping tensors
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12,
     r"tensor 'b': data_offsets \[4, 12\] overlaps the previous tensor"),
    # trailing bytes nobody owns
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12,
     r"tensors end at data byte 8 but the data section holds 12 bytes \(trailing bytes\)"),
    # unknown dtype, negative shape, non-object header
    ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8,
     r"tensor 'w': dtype='C64' is not supported"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8,
     r"tensor 'w': shape=\[-2\] must be a list"),
    ([1, 2], b"", r"corrupt safetensors header: a JSON object is required, got list"),
])
def test_malformed_safetensors_name_file_and_tensor(tmp_path, header, data, match):
  fp = _raw_file(tmp_path / "bad.safetensors", header, data)
  with pytest.raises(ValueError, match=r"bad\.safetensors: " + match):
    st_io.read_safetensors(fp)
  # C64 is well-formed for the safetensors package; our reader has no use for complex weights
  _agrees_with_safetensors(fp, _header_dtype(header) == "C64")


def test_truncated_and_random_files(work, tmp_path):
  path, index = work
  shard = os.path.join(path, _shard_of(index, "model.norm.weight"))
  raw = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(raw[:-3])
  with pytest.raises(ValueError, match=r"\.safetensors: tensors end at data byte \d+ but the "
                     r"data section holds \d+ bytes \(truncated file\)"):
    models.from_pretrained(path)
  rng = np.random.default_rng(0)
  fp = str(tmp_path / "rand.safetensors")
  for n in (0, 5, 8, 64, 1000):
    for _ in range(4):
      with open(fp, "wb") as f:
        f.write(rng.bytes(n))
      with pytest.raises(ValueError, match=r"rand\.safetensors: "):
        st_io.read_safetensors(fp)
      _agrees_with_safetensors(fp, False)
  # a plausible header length followed by random bytes
  with open(fp, "wb") as f:
    f.write(struct.pack("<Q", 40) + rng.bytes(60))
  with pytest.raises(ValueError, match=r"rand\.safetensors: corrupt safetensors header"):
    st_io.read_safetensors(fp)


def test_files_of_the_safetensors_package_read_back_exactly(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),
             "b": rng.integers(-9, 9, (4,)).astype(np.int64),
             "c": np.zeros((0, 3), np.float16), "d": np.array(True)}
  fp = str(tmp_path / "theirs.safetensors")
  safetensors.numpy.save_file(tensors, fp, metadata={"k": "v"})
  back = st_io.read_safetensors(fp)
  assert st_io.read_metadata(fp) == {"k": "v"} and set(back) == set(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape
    np.testing.assert_array_equal(back[k], v)
  _agrees_with_safetensors(fp, True)
  ours = str(tmp_path / "ours.safetensors")
  st_io.write_safetensors(ours, tensors)
  theirs = safetensors.numpy.load_file(ours)
  for k, v in tensors.items():
    np.testing.assert_array_equal(theirs[k], v)
