"""Saving and loading `models.decoder.Decoder` models (the retrained / converted families).

    decoder_io.save(model, "out_dir")       # config.json + model.safetensors
    model = decoder_io.load("out_dir")      # the same Decoder, any family
    model = decoder_io.load_any("dir")      # a Decoder dir, or an HF Llama-family dir

The directory mirrors an HF one so the two sit side by side (`train/` exports both): a
`config.json` with {"format": "kvjax.decoder/1", "config_class": "models.local:SlidingConfig",
"config": {field: value}}, and one safetensors file whose tensor names are the parameter
paths ("groups/0/1/mixer/wq", "embed", ...; pattern slots stacked over repeats).
Loading checks every tensor's name and shape against the config and names any mismatch.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import safetensors_io as st_io
from models import decoder as dec

FORMAT = "kvjax.decoder/1"
WEIGHTS = "model.safetensors"


def _config_class_name(config) -> str:
  cls = type(config)
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
  os.makedirs(path, exist_ok=True)
  cfg = {f.name: _jsonable(getattr(model.config, f.name))
         for f in dataclasses.fields(model.config)}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"format": FORMAT, "config_class": _config_class_name(model.config),
               "config": cfg}, f, indent=2)
  st_io.write_safetensors(os.path.join(path, WEIGHTS), flat_params(model), {"format": FORMAT})
  return path


def is_decoder_dir(path: str) -> bool:
  """Whether `path` holds a model written by `save`."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def load_config(path: str, dtype: Optional[str] = None) -> dec.DecoderConfig:
  """The DecoderConfig saved in `path` (dtype overrides the parameter dtype)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise ValueError(f"model path {path!r} is not a directory")
  try:
    with open(cfg_path) as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path!r} has no readable config.json ({e})") from e
  if d.get("format") != FORMAT:
    raise ValueError(f"{cfg_path!r} is not a kvjax Decoder config (format "
                     f"{d.get('format')!r}, expected {FORMAT!r})")
  name = d.get("config_class", "")
  mod, _, cls_name = name.partition(":")
  if not mod.startswith("models."):
    raise ValueError(f"config_class={name!r} in {cfg_path!r}: must be a models.* class")
  try:
    cls = getattr(importlib.import_module(mod), cls_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"config_class={name!r} in {cfg_path!r} cannot be imported ({e})") from e
  if not (isinstance(cls, type) and issubclass(cls, dec.DecoderConfig)):
    raise ValueError(f"config_class={name!r} in {cfg_path!r} is not a DecoderConfig")
  fields = {f.name for f in dataclasses.fields(cls)}
  kw = d.get("config", {})
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"{cfg_path!r}: fields {unknown} unknown to {cls_name}")
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
  if dtype is not None:
    kw["dtype"] = dtype
  return cls(**kw)


def load(path: str, dtype: Optional[str] = None) -> dec.Decoder:
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
    var.value = jnp.asarray(np.asarray(x), dt)
  return model


def load_any(path: str, dtype: Optional[str] = None):
  """A Decoder (`save`'s format) or a Llama-family Transformer (an HF directory)."""
  if is_decoder_dir(path):
    return load(path, dtype)
  from models import hf  # pylint: disable=import-outside-toplevel
  return hf.from_pretrained(path, dtype=dtype)
