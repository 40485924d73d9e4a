"""kvjax models: Flax NNX decoders, HF loading, and the inference API."""

from models.api import decode, init_cache, prefill
from models.cache_io import load_cache, save_cache
from models.config import SUPPORTED_ARCHITECTURES, ModelConfig
from models.transformer import Observe, Transformer

__all__ = ["ModelConfig", "Transformer", "Observe", "prefill", "decode", "init_cache",
           "SUPPORTED_ARCHITECTURES", "save_cache", "load_cache"]

try:  # HF loading lives in models.hf
  from models.hf import from_pretrained, save_pretrained  # noqa: F401
  __all__ += ["from_pretrained", "save_pretrained"]
except ImportError:  # pragma: no cover - during bootstrap
  pass
