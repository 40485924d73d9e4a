"""HF checkpoint loading and saving (config.json + safetensors), no torch needed.

    model = models.from_pretrained("path/to/hf_dir", dtype="float32")
    models.save_pretrained(model, "out_dir")

Reads a single `model.safetensors` or sharded `model-*.safetensors` with
`model.safetensors.index.json`. Tensors are read with our own small safetensors reader
(`kvjax.safetensors_io`: an 8-byte header length, a JSON header, raw little-endian bytes),
which handles bfloat16 through `ml_dtypes`, validates every header against the file's size
and memory-maps the files. Missing or unexpected tensors raise a ValueError naming them.

Files are data (SECURITY.md): the config is validated before anything is allocated
(`ModelConfig`), index entries and symlinks may not leave the model folder, and every weight
must be floating point and finite; errors name the file and the tensor.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import safetensors_io as st_io
from models.config import ModelConfig
from models.transformer import Transformer

# The reader/writer live in kvjax (kvjax.persist saves caches with them); re-exported here.
_ST_DTYPES, _ST_NAMES = st_io.DTYPES, st_io.NAMES
read_safetensors = st_io.read_safetensors
write_safetensors = st_io.write_safetensors
_MAX_JSON_BYTES = 64 << 20  # config.json / index files (real ones are kilobytes)


def _read_json(path: str):
  """A JSON file's content; ValueError naming the file if it is not valid JSON."""
  if os.path.getsize(path) > _MAX_JSON_BYTES:
    raise ValueError(f"{path}: {os.path.getsize(path)} bytes; JSON files here are at most "
                     f"{_MAX_JSON_BYTES}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e


def _inside(folder: str, name, what: str) -> str:
  """folder/name, refusing names that leave the folder.

  A name must be a relative path without `..`; once symlinks are resolved the file must lie
  inside the folder -- or, for a Hugging Face hub snapshot (`<repo>/snapshots/<rev>`), in
  that repo's `blobs` folder, where the hub's own symlinks point.

  Args:
    folder: the model directory.
    name: the file name read from the directory or an index file.
    what: what names it (for the error), e.g. "weight_map entry for 'lm_head.weight'".
  """
  if (not isinstance(name, str) or not name or os.path.isabs(name) or "\0" in name
      or ".." in name.replace("\\", "/").split("/")):
    raise ValueError(f"{what}: file name {str(name)[:200]!r} is not allowed (a relative path "
                     f"inside {folder!r}: no absolute paths, no '..')")
  full = os.path.join(folder, name)
  real, root = os.path.realpath(full), os.path.realpath(folder)
  roots = [root]
  if os.path.basename(os.path.dirname(root)) == "snapshots":
    roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
  if not any(os.path.commonpath([real, r]) == r for r in roots):
    raise ValueError(f"{what}: {name!r} resolves to {real!r}, outside the model folder "
                     f"{root!r} (symlinks may not leave it)")
  return full


def load_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of an HF directory (single file or sharded with an index).

  Every file read must lie inside `path` (`_inside`); every safetensors header is validated
  before a tensor is touched (`kvjax.safetensors_io`); a tensor stored twice is an error.
  """
  if not os.path.isdir(path):
    raise ValueError(f"model path {path!r} is not a directory")
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    index = _inside(path, "model.safetensors.index.json", "index file")
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
      raise ValueError(f"{index}: 'weight_map' must map tensor names to file names")
    for tensor, fn in weight_map.items():
      _inside(path, fn, f"{index}: weight_map entry for {tensor!r}")
    files = sorted(set(weight_map.values()))
  elif os.path.exists(single):
    files = ["model.safetensors"]
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"no *.safetensors files in {path!r} (found: {sorted(os.listdir(path))}); "
                     "convert .bin checkpoints with transformers' save_pretrained("
                     "safe_serialization=True)")
  tensors, origin = {}, {}
  for fn in files:
    fp = _inside(path, fn, f"shard {fn!r}")
    if not os.path.exists(fp):
      raise ValueError(f"shard {fn!r} listed in the index is missing from {path!r}")
    for name, arr in read_safetensors(fp).items():
      if name in origin:
        raise ValueError(f"tensor {name!r} is stored twice: in {origin[name]!r} and {fn!r}")
      tensors[name], origin[name] = arr, fn
  return tensors


# --- name mapping -----------------------------------------------------------------------
# our stacked param -> (HF per-layer name template, transpose?)
_LAYER_MAP = {
    "wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "bq": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "bk": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "bv": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "bo": ("model.layers.{i}.self_attn.o_proj.bias", False),
    "w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
    "b_gate": ("model.layers.{i}.mlp.gate_proj.bias", False),
    "b_up": ("model.layers.{i}.mlp.up_proj.bias", False),
    "b_down": ("model.layers.{i}.mlp.down_proj.bias", False),
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", False),
}
# Gemma's sandwich norms: HF's post_attention_layernorm normalises the attention output,
# and the MLP input norm is pre_feedforward_layernorm (tests/fixtures/hf/NOTES.md §4).
_SANDWICH_MAP = {
    "post_attn_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "mlp_norm": ("model.layers.{i}.pre_feedforward_layernorm.weight", False),
    "post_mlp_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", False),
}
_TOP_MAP = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
# Buffers some checkpoints carry that hold no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_map(config: ModelConfig) -> dict:
  return {**_LAYER_MAP, **_SANDWICH_MAP} if config.sandwich_norms else _LAYER_MAP


def _expected_names(model: Transformer) -> dict:
  names = {}
  L = model.config.num_layers
  for ours, (tmpl, tr) in _layer_map(model.config).items():
    if hasattr(model, ours):
      names[ours] = ([tmpl.format(i=i) for i in range(L)], tr)
  for ours, (name, tr) in _TOP_MAP.items():
    if hasattr(model, ours):
      names[ours] = ([name], tr)
  return names


def load_config(path: str, dtype: Optional[str] = None) -> ModelConfig:
  """The ModelConfig of an HF directory's config.json (validated; errors name the file)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise ValueError(f"model path {path!r} is not a directory")
  if not os.path.exists(cfg_path):
    raise ValueError(f"{path!r} has no config.json")
  d = _read_json(_inside(path, "config.json", "config file"))
  try:
    return ModelConfig.from_hf_dict(d, dtype=dtype)
  except ValueError as e:
    raise ValueError(f"{cfg_path}: {e}") from e


def from_pretrained(path: str, dtype=None) -> Transformer:
  """Loads an HF directory, a GGUF file or a named real model into a Transformer.

  Args:
    path: local directory with config.json and *.safetensors; a `.gguf` file, or a directory
      holding one and no config.json (read by `models.gguf`); or a named model from
      `models.fetch.MODELS` (e.g. "smollm2-135m"), fetched once into the cache directory.
    dtype: parameter dtype ("float32" | "bfloat16" | "float16", or the numpy / jnp dtype);
      default from config.json (float32 for GGUF).
  """
  path = os.fspath(path)
  from models import fetch, gguf  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path) and path in fetch.MODELS:
    path = fetch.ensure(path)
  if gguf.is_gguf_path(path):
    return gguf.from_pretrained(path, dtype=dtype)
  dtype = gguf.dtype_name(dtype)
  return from_tensors(load_config(path, dtype), load_tensors(path), path)


def from_tensors(config: ModelConfig, tensors: dict, source: str) -> Transformer:
  """Builds a Transformer from tensors named and shaped as in HF checkpoints.

  Shared by the safetensors loader above and the GGUF loader (`models.gguf`), which maps
  llama.cpp's names to these first.

  Args:
    config: the model's config (its dtype is the parameter dtype).
    tensors: HF name -> array ([out, in] for linear weights, as HF stores them).
    source: the file or directory the tensors came from (named in errors).
  """
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  expected = _expected_names(model)
  present = set(tensors)  # names only: `tensors` may decode lazily (models.gguf)
  if config.tie_word_embeddings:
    present.discard("lm_head.weight")
  wanted = {n for names, _ in expected.values() for n in names}
  extra = sorted(n for n in present if n not in wanted and not n.endswith(_IGNORED_SUFFIXES))
  missing = sorted(n for n in wanted if n not in present)
  if missing or extra:
    raise ValueError(f"checkpoint {source!r} does not match {config.architecture}: "
                     f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                     f"unexpected tensors {extra[:8]}{'...' if len(extra) > 8 else ''}")
  dt = jnp.dtype(config.dtype)
  for ours, (names, tr) in expected.items():
    arrs = [np.asarray(tensors[n]) for n in names]
    for n, a in zip(names, arrs):  # weights are data: float and finite, or an error
      if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{source}: tensor {n!r} has dtype {a.dtype}; weights must be "
                         "floating point (float32, bfloat16, float16, float64, float8)")
      if not np.isfinite(a).all():
        raise ValueError(f"{source}: tensor {n!r} holds NaN or infinite values")
    arrs = [a.T if tr else a for a in arrs]
    val = np.stack(arrs) if ours in Transformer.LAYER_PARAMS else arrs[0]
    param = getattr(model, ours)
    if tuple(param.value.shape) != val.shape:
      raise ValueError(f"tensor for {ours} ({names[0]}...) has shape {val.shape}; "
                       f"config implies {tuple(param.value.shape)}")
    param.value = jnp.asarray(val.astype(np.float32) if val.dtype != dt else val, dtype=dt)
  return model


def save_pretrained(model: Transformer, path: str, *, max_shard_bytes: Optional[int] = None,
                    extra_files: Optional[dict] = None):
  """Writes config.json + safetensors (sharded with an index if max_shard_bytes is set)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(model.config.to_hf_dict(), f, indent=2)
  tensors = {}
  for ours, (names, tr) in _expected_names(model).items():
    val = np.asarray(getattr(model, ours).value)
    if ours in Transformer.LAYER_PARAMS:
      for i, n in enumerate(names):
        tensors[n] = val[i].T if tr else val[i]
    else:
      tensors[names[0]] = val.T if tr else val
  if max_shard_bytes is None:
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
  else:
    shards, cur, size = [], {}, 0
    for n in sorted(tensors):
      nb = tensors[n].nbytes
      if cur and size + nb > max_shard_bytes:
        shards.append(cur)
        cur, size = {}, 0
      cur[n] = tensors[n]
      size += nb
    shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
      fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(path, fn), shard, {"format": "pt"})
      weight_map.update({n: fn for n in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  for name, content in (extra_files or {}).items():
    with open(os.path.join(path, name), "w") as f:
      f.write(content)
