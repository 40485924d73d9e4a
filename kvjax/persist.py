"""Compress once, ask many: save a (compressed) cache to disk, load it back bit-exactly.

    kvjax.persist.save("ctx.safetensors", cache, fingerprint=config.fingerprint())
    cache, info = kvjax.persist.load("ctx.safetensors", fingerprint=config.fingerprint())
    caches = kvjax.fork(cache, 8)             # 8 questions over one prefilled context

(`models.save_cache(model, cache, path)` / `models.load_cache(model, path)` pass the model's
config and name the mismatching fields when a cache meets the wrong model.)

File format: one safetensors file. Every array of the cache is a tensor stored with its
exact dtype and bytes (bfloat16, float8, packed uint8 codes, int32 positions ...), so a
round trip is bit-exact. The `__metadata__` holds JSON:
  format       "kvjax.cache/1"
  fingerprint  the model-config fingerprint the cache belongs to (kvjax never imports a
               model: the caller passes the string in)
  tree         the pytree structure: for every node its kind (`module:QualName` of a
               dataclass cache kind, or tuple/list/dict/None), its static fields (window,
               sink, QuantSpec, head dims, scan groups ...) and the tensor name of each array
  summary      human-readable facts: per layer kind, static fields, capacity, nbytes and
               lengths; next_position (original sequence length per row); batch
  user         any JSON-able metadata of the caller
Kinds are rebuilt only from classes in `kvjax.*` modules or ones passed to `register_kind`;
a file never makes this module import anything else.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax import safetensors_io as st_io

FORMAT = "kvjax.cache/1"
_REGISTRY: dict[str, type] = {}


def register_kind(cls: type) -> type:
  """Allows `load` to rebuild a cache kind defined outside kvjax (usable as a decorator)."""
  _REGISTRY[_kind_name(cls)] = cls
  return cls


def _kind_name(cls) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(kind: str) -> type:
  if kind in _REGISTRY:
    return _REGISTRY[kind]
  module, _, qual = kind.partition(":")
  if not (module == "kvjax" or module.startswith("kvjax.")):
    raise ValueError(f"saved cache kind {kind!r} is not a kvjax kind; call "
                     "kvjax.persist.register_kind(cls) before loading it")
  try:
    obj = importlib.import_module(module)
    for part in qual.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"saved cache kind {kind!r} does not exist in this kvjax ({e})") from e
  return obj


# -- static (non-array) field values <-> JSON ---------------------------------------------
def _static_to_json(v, where: str):
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, np.integer):
    return int(v)
  if isinstance(v, np.floating):
    return float(v)
  if isinstance(v, tuple):
    return {"__tuple__": [_static_to_json(x, where) for x in v]}
  if isinstance(v, list):
    return [_static_to_json(x, where) for x in v]
  if isinstance(v, dict):
    return {"__dict__": [[_static_to_json(k, where), _static_to_json(x, where)]
                         for k, x in v.items()]}
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
    return {"__dtype__": np.dtype(v).name}
  if dataclasses.is_dataclass(v) and not isinstance(v, type):
    return {"__dataclass__": _kind_name(type(v)),
            "fields": {f.name: _static_to_json(getattr(v, f.name), f"{where}.{f.name}")
                       for f in dataclasses.fields(v) if f.init}}
  raise ValueError(f"static field {where} = {v!r} ({type(v).__name__}) cannot be saved")


def _static_from_json(v):
  if isinstance(v, list):
    return [_static_from_json(x) for x in v]
  if not isinstance(v, dict):
    return v
  if "__tuple__" in v:
    return tuple(_static_from_json(x) for x in v["__tuple__"])
  if "__dict__" in v:
    return {_static_from_json(k): _static_from_json(x) for k, x in v["__dict__"]}
  if "__dtype__" in v:
    return jnp.dtype(v["__dtype__"])
  if "__dataclass__" in v:
    cls = _resolve(v["__dataclass__"])
    return cls(**{k: _static_from_json(x) for k, x in v["fields"].items()})
  raise ValueError(f"corrupt static value {v!r}")


# -- the pytree <-> (JSON tree, tensors) ---------------------------------------------------
def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray))


def _encode(node, tensors: dict, name: str):
  if node is None:
    return None
  if _is_array(node):
    if isinstance(node, jax.core.Tracer):
      raise ValueError("kvjax.persist.save needs concrete arrays (call it outside jit)")
    tensors[name] = np.asarray(node)
    return {"tensor": name}
  if isinstance(node, (tuple, list)):
    return {"tuple" if isinstance(node, tuple) else "list":
            [_encode(x, tensors, f"{name}.{i}") for i, x in enumerate(node)]}
  if isinstance(node, dict):
    return {"dict": {str(k): _encode(x, tensors, f"{name}.{k}") for k, x in node.items()}}
  if dataclasses.is_dataclass(node) and not isinstance(node, type):
    data, static = {}, {}
    for f in dataclasses.fields(node):
      val = getattr(node, f.name)
      if f.metadata.get("pytree_node", True):
        data[f.name] = _encode(val, tensors, f"{name}.{f.name}")
      else:
        static[f.name] = _static_to_json(val, f"{type(node).__name__}.{f.name}")
    return {"kind": _kind_name(type(node)), "data": data, "static": static}
  raise ValueError(f"cache node {name} of type {type(node).__name__} cannot be saved "
                   "(caches are dataclasses, tuples, lists, dicts, arrays and None)")


def _decode(node, tensors: dict):
  if node is None:
    return None
  if "tensor" in node:
    name = node["tensor"]
    if name not in tensors:
      raise ValueError(f"saved cache is missing tensor {name!r}")
    return jnp.asarray(tensors[name])
  if "tuple" in node:
    return tuple(_decode(x, tensors) for x in node["tuple"])
  if "list" in node:
    return [_decode(x, tensors) for x in node["list"]]
  if "dict" in node:
    return {k: _decode(x, tensors) for k, x in node["dict"].items()}
  cls = _resolve(node["kind"])
  kw = {k: _decode(x, tensors) for k, x in node["data"].items()}
  kw.update({k: _static_from_json(x) for k, x in node["static"].items()})
  return cls(**kw)


def _static_fields(cache) -> dict:
  if not dataclasses.is_dataclass(cache):
    return {}
  return {f.name: _static_to_json(getattr(cache, f.name), f.name)
          for f in dataclasses.fields(cache) if not f.metadata.get("pytree_node", True)}


def summary(cache) -> dict:
  """JSON-able facts about a cache: per-layer kind, static fields, capacity, bytes, lengths."""
  if isinstance(cache, cache_lib.ModelCache):
    layers = cache.layers()
    return {
        "num_layers": len(layers), "batch": cache.batch, "nbytes": cache.nbytes,
        "next_position": np.asarray(cache.next_position).tolist(),
        "grouping": [list(g) for g in cache.grouping],
        "layers": [{"layer": i, "kind": type(c).__name__, "static": _static_fields(c),
                    "capacity": int(c.capacity), "nbytes": int(c.nbytes),
                    "lengths": np.asarray(c.length).tolist()} for i, c in enumerate(layers)],
    }
  return {"kind": type(cache).__name__, "static": _static_fields(cache),
          "capacity": int(cache.capacity), "nbytes": int(cache.nbytes),
          "lengths": np.asarray(cache.length).tolist()}


def save(path: str, cache, *, fingerprint: str, metadata: Optional[dict] = None) -> dict:
  """Writes a ModelCache (or one layer cache) of any kind to a safetensors file.

  Args:
    path: file to write (conventionally *.safetensors).
    cache: concrete cache pytree (not traced).
    fingerprint: the model-config fingerprint (`models.ModelConfig.fingerprint()`).
    metadata: extra JSON-able facts stored under "user".

  Returns: the summary written into the file.
  """
  if not isinstance(fingerprint, str) or not fingerprint:
    raise ValueError(f"fingerprint={fingerprint!r}; pass the model config's fingerprint "
                     "string (models.ModelConfig.fingerprint())")
  tensors: dict = {}
  tree = _encode(cache, tensors, "cache")
  info = summary(cache)
  try:
    user = json.dumps(metadata or {})
  except TypeError as e:
    raise ValueError(f"metadata must be JSON-able ({e})") from e
  st_io.write_safetensors(path, tensors, {
      "format": FORMAT, "fingerprint": fingerprint, "tree": json.dumps(tree),
      "summary": json.dumps(info), "user": user})
  return info


def inspect(path: str) -> dict:
  """The metadata of a saved cache without loading its arrays:
  {"format", "fingerprint", "summary", "user"}."""
  meta = st_io.read_metadata(path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: not a saved kvjax cache (format={meta.get('format')!r}, "
                     f"expected {FORMAT!r})")
  return {"format": meta["format"], "fingerprint": meta["fingerprint"],
          "summary": json.loads(meta["summary"]), "user": json.loads(meta.get("user", "{}"))}


def load(path: str, *, fingerprint: Optional[str] = None) -> tuple[Any, dict]:
  """Reads a cache written by `save`; returns (cache, info) with info as in `inspect`.

  Args:
    path: the file.
    fingerprint: if given, the model-config fingerprint the cache must belong to; a
      mismatch raises ValueError naming both (models.load_cache also names the fields).
  """
  info = inspect(path)
  if fingerprint is not None and info["fingerprint"] != fingerprint:
    raise ValueError(f"{path}: the cache was saved for model config {info['fingerprint']} "
                     f"but this model's config is {fingerprint}")
  tree = json.loads(st_io.read_metadata(path)["tree"])
  return _decode(tree, st_io.read_safetensors(path)), info
