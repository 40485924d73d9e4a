"""Saving and loading a model's cache, checked against the model's config.

    models.save_cache(model, cache, "ctx.safetensors")      # after prefill (+ press)
    cache = models.load_cache(model, "ctx.safetensors")     # ValueError names any config
                                                            # field that differs
The file format is kvjax.persist's (safetensors + JSON metadata; cache kinds only from its
allowlist, every field validated before use); this module adds the model config, so a
mismatch names the fields instead of only two fingerprints, and checks the cache's number
of layers, kv heads and head dims against the model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

from kvjax import persist
from models.config import ModelConfig


def _config_of(model_or_config) -> ModelConfig:
  cfg = getattr(model_or_config, "config", model_or_config)
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f"expected a models.Transformer or ModelConfig; got "
                     f"{type(model_or_config).__name__}")
  return cfg


def _config_json(cfg: ModelConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_cache(model_or_config, cache, path: str, *, metadata: Optional[dict] = None) -> dict:
  """Writes `cache` (any kind, compressed or not) with the model config's fingerprint."""
  cfg = _config_of(model_or_config)
  meta = dict(metadata or {})
  meta["model_config"] = _config_json(cfg)
  return persist.save(path, cache, fingerprint=cfg.fingerprint(), metadata=meta)


def load_cache(model_or_config, path: str, *, return_info: bool = False):
  """Reads a cache saved by `save_cache`, validated against the model.

  Args:
    model_or_config: a models.Transformer or its ModelConfig.
    path: the file.
    return_info: also return the file's info (`kvjax.persist.inspect`).

  Returns:
    The ModelCache (and info if return_info).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a valid saved cache (names the file and field), belongs to
      another config (names the differing fields), or its layers / kv heads / head dims
      differ from the model's.
  """
  cfg = _config_of(model_or_config)
  info = persist.inspect(path)
  fp = cfg.fingerprint()
  if info["fingerprint"] != fp:
    saved = info["user"].get("model_config") or {}
    now = _config_json(cfg)
    diffs = [f"{k}: saved {saved.get(k)!r}, model {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    detail = "; ".join(diffs) if diffs else "config fields unknown (saved without them)"
    raise ValueError(f"{path}: the cache was saved for a different model config "
                     f"(fingerprint {info['fingerprint']} vs {fp}): {detail}")
  # Beyond the fingerprint, every layer cache must have the model's shape: the file is data.
  expect = {"num_layers": cfg.num_layers, "H": cfg.num_kv_heads, "D": cfg.head_dim,
            "Dv": cfg.head_dim}
  cache, info = persist.load(path, fingerprint=fp, expect=expect)
  return (cache, info) if return_info else cache
