"""KV-cache compression: quantized cache kinds, conversion, presets.

    spec = kvjax.quant.kivi(bits=4, group_size=32, residual=128)
    cache = kvjax.quant.init_model_cache(config, batch, capacity, spec)   # quantize on append
    logits, cache = models.prefill(model, tokens, cache=cache)
    # or convert after a full-precision prefill (works with kvjax.generate unchanged):
    kvjax.generate(model, tokens, press=kvjax.quant.QuantizePress(spec))
"""

from kvjax.quant import formats, packing
from kvjax.quant.base import CompressedCache, KVView
from kvjax.quant.cache import QuantizedKVCache, quantize
from kvjax.quant.model import (QuantizePress, convert_layer, init_model_cache, layer_factory,
                               quantize_model)
from kvjax.quant.spec import (NAMES, QuantSpec, fp8, fp8_supported, from_name, int8, kivi,
                              kvquant, per_token)

__all__ = ["formats", "packing", "CompressedCache", "KVView", "QuantizedKVCache", "quantize",
           "QuantSpec", "NAMES", "fp8", "fp8_supported", "from_name", "int8", "kivi", "kvquant",
           "per_token", "QuantizePress", "convert_layer", "init_model_cache", "layer_factory",
           "quantize_model"]
