"""Saving and loading `models.decoder.Decoder` models (the retrained / converted families).

    decoder_io.save(model, "out_dir")       # config.json + model.safetensors
    model = decoder_io.load("out_dir")      # the same Decoder, any family
    model = decoder_io.load_any("dir")      # a Decoder dir, or an HF Llama-family dir

The directory mirrors an HF one so the two sit side by side (`train/` exports both): a
`config.json` with {"format": "kvjax.decoder/1", "config_class": "models.local:SlidingConfig",
"config": {field: value}}, and one safetensors file whose tensor names are the parameter
paths ("groups/0/1/mixer/wq", "embed", ...; pattern slots stacked over repeats).

Files are data (SECURITY.md): `config_class` is looked up in an explicit allowlist of the
Decoder config classes (`config_classes()`: the families of models/registry.py), never
imported by the name the file gives; config.json is read only up to a size bound; every
tensor's name and shape is checked against the config, and every weight must be floating
point and finite. Errors name the file, the field or the tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import safetensors_io as st_io
from models import config as config_lib
from models import decoder as dec

FORMAT = "kvjax.decoder/1"
WEIGHTS = "model.safetensors"
MAX_CONFIG_BYTES = 1 << 20   # a Decoder config.json is a few kilobytes


@functools.lru_cache(maxsize=1)
def _allowlist() -> dict:
  # pylint: disable=import-outside-toplevel
  from models import hybrid, kv_sharing, linear_attention, local, registry, ssm
  # pylint: enable=import-outside-toplevel
  classes = [local.LocalAttentionConfig, local.SlidingConfig, local.DilatedConfig,
             linear_attention.LinearAttentionConfig, linear_attention.GLAConfig,
             linear_attention.RetNetConfig, ssm.Mamba2Config, hybrid.HybridConfig,
             kv_sharing.CLAConfig, kv_sharing.MLAConfig]
  classes += [f.config for f in registry.FAMILIES.values()
              if isinstance(f.config, type) and issubclass(f.config, dec.DecoderConfig)]
  return {_class_name(c): c for c in classes}


def config_classes() -> dict:
  """{"module:Class": class} of every Decoder config a saved directory may name."""
  return dict(_allowlist())


def _class_name(cls) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def _jsonable(v):
  return [_jsonable(x) for x in v] if isinstance(v, (tuple, list)) else v


def flat_params(model: dec.Decoder) -> dict:
  """{param path: np.ndarray} ("groups/<g>/<slot>/mixer/wq", ...)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(str(k) for k in path): np.asarray(var.value) for path, var in flat}


def save(model: dec.Decoder, path: str) -> str:
  """Writes config.json + model.safetensors for `model` into directory `path`."""
  if not isinstance(model, dec.Decoder):
    raise ValueError(f"model must be a models.decoder.Decoder; got {type(model).__name__} "
                     "(Llama-family Transformers are saved by models.hf.save_pretrained)")
  name = _class_name(type(model.config))
  if name not in _allowlist():
    raise ValueError(f"config class {name} is not one `load` accepts (models.decoder_io."
                     f"config_classes(): {sorted(_allowlist())}); add it to the allowlist "
                     "in models/decoder_io.py or register its family in models/registry.py")
  os.makedirs(path, exist_ok=True)
  cfg = {f.name: _jsonable(getattr(model.config, f.name))
         for f in dataclasses.fields(model.config)}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"format": FORMAT, "config_class": name,
               "config": cfg}, f, indent=2)
  st_io.write_safetensors(os.path.join(path, WEIGHTS), flat_params(model), {"format": FORMAT})
  return path


def _read_config(cfg_path: str) -> dict:
  """config.json as a dict, read only if it is at most MAX_CONFIG_BYTES."""
  size = os.path.getsize(cfg_path)
  if size > MAX_CONFIG_BYTES:
    raise ValueError(f"{cfg_path}: {size} bytes; a Decoder config.json is at most "
                     f"{MAX_CONFIG_BYTES} bytes")
  with open(cfg_path, "rb") as f:
    raw = f.read(MAX_CONFIG_BYTES + 1)
  try:
    d = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise ValueError(f"{cfg_path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})"
                     ) from None
  if not isinstance(d, dict):
    raise ValueError(f"{cfg_path}: expected a JSON object, got {type(d).__name__}")
  return d


# Config fields renamed since models were first saved: old name -> current name.
RENAMED_FIELDS = {"sink_tokens": "n_sink"}


def is_decoder_dir(path: str) -> bool:
  """Whether `path` holds a model written by `save`."""
  try:
    return _read_config(os.path.join(path, "config.json")).get("format") == FORMAT
  except (OSError, ValueError):
    return False


def load_config(path: str, dtype=None) -> dec.DecoderConfig:
  """The DecoderConfig saved in `path`.

  Args:
    path: a directory written by `save`.
    dtype: parameter dtype overriding the saved one ("float32" | "bfloat16" | "float16",
      numpy or jnp dtype); None keeps the saved one.
  """
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise ValueError(f"model path {path!r} is not a directory")
  if not os.path.isfile(cfg_path):
    raise ValueError(f"{path!r} has no config.json")
  d = _read_config(cfg_path)
  if d.get("format") != FORMAT:
    raise ValueError(f"{cfg_path!r} is not a kvjax Decoder config (format "
                     f"{d.get('format')!r}, expected {FORMAT!r})")
  name = d.get("config_class")
  allowed = _allowlist()
  if not isinstance(name, str) or name not in allowed:
    raise ValueError(f"config_class={name!r} in {cfg_path!r} is not a known Decoder config; "
                     f"allowed: {sorted(allowed)}")
  cls = allowed[name]
  cls_name = cls.__name__
  fields = {f.name for f in dataclasses.fields(cls)}
  kw = d.get("config", {})
  if not isinstance(kw, dict):
    raise ValueError(f"{cfg_path!r}: 'config' must be an object of {cls_name} fields")
  kw = {RENAMED_FIELDS.get(k, k): v for k, v in kw.items()}
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"{cfg_path!r}: fields {unknown} unknown to {cls_name}")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
  if dtype is not None:
    kw["dtype"] = config_lib.dtype_name(dtype)
  try:
    return cls(**kw)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{cfg_path!r}: invalid {cls_name}: {e}") from e


def load(path: str, dtype=None) -> dec.Decoder:
  """Loads a Decoder saved by `save`; ValueError names missing / unexpected / misshapen
  tensors."""
  config = load_config(path, dtype)
  fp = os.path.join(path, WEIGHTS)
  if not os.path.exists(fp):
    raise ValueError(f"{path!r} has no {WEIGHTS}")
  tensors = st_io.read_safetensors(fp)
  model = nnx.eval_shape(lambda: dec.Decoder(config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  want = {"/".join(str(k) for k in p): var for p, var in flat}
  missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
  if missing or extra:
    raise ValueError(f"{fp!r} does not match {type(config).__name__}: missing tensors "
                     f"{missing[:8]}, unexpected tensors {extra[:8]}")
  dt = jnp.dtype(config.dtype)
  for name, var in want.items():
    x = tensors[name]
    if tuple(x.shape) != tuple(var.value.shape):
      raise ValueError(f"tensor {name} in {fp!r} has shape {tuple(x.shape)}; "
                       f"{type(config).__name__} implies {tuple(var.value.shape)}")
    x = np.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{fp}: tensor {name!r} has dtype {x.dtype}; weights must be floating "
                       "point (float32, bfloat16, float16, float64)")
    if not np.isfinite(x).all():
      raise ValueError(f"{fp}: tensor {name!r} holds NaN or infinite values")
    var.value = jnp.asarray(x, dt)
  return model


def load_any(path: str, dtype=None):
  """A Decoder (`save`'s format) or a Llama-family Transformer (an HF directory)."""
  if is_decoder_dir(path):
    return load(path, dtype)
  from models import hf  # pylint: disable=import-outside-toplevel
  return hf.from_pretrained(path, dtype=dtype)
