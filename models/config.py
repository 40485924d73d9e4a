"""One config dataclass for the decoder family (Llama 2/3.x, Qwen2, Mistral, Gemma 2/3 text).

`ModelConfig` is frozen and hashable so it can be a static jit argument. `from_hf_dict` /
`to_hf_dict` translate HF `config.json` files; unknown architectures raise with the list of
supported ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Optional

from kvjax.rope import RopeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM",
                           "Gemma2ForCausalLM", "Gemma3ForCausalLM")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                "MistralForCausalLM": "mistral", "Gemma2ForCausalLM": "gemma2",
                "Gemma3ForCausalLM": "gemma3_text"}
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(dtype, name: str = "dtype") -> Optional[str]:
  """A parameter dtype's name ("float32" | "bfloat16" | "float16"), or None for None.

  The one place every model-level dtype argument is read (ModelConfig, from_pretrained,
  presets, Decoder loading): accepts a string, a numpy dtype or type (np.float32) or a jnp
  one (jnp.bfloat16); anything else is a ValueError naming `name` and the allowed values.
  """
  if dtype is None:
    return None
  import numpy as np  # pylint: disable=import-outside-toplevel
  try:
    if isinstance(dtype, str):
      import ml_dtypes  # pylint: disable=import-outside-toplevel,unused-import
    dt = np.dtype(dtype)
  except (TypeError, ValueError):
    dt = None
  if dt is None or dt.name not in DTYPES or isinstance(dtype, bool):
    raise ValueError(f"{name}={dtype!r}; allowed: {DTYPES} (as strings, numpy or jnp dtypes)")
  return dt.name
# Bounds on sizes, checked before anything is allocated: (min, max) per field. Generous for
# real models (Llama 3.1 405B: 126 layers, hidden 16384, vocab 128K; Gemma 3: vocab 262K).
MAX_POSITIONS = 1 << 24
LIMITS = {
    "vocab_size": (1, 1 << 22), "hidden_size": (1, 65536), "intermediate_size": (1, 1 << 20),
    "num_layers": (1, 1024), "num_heads": (1, 1024), "num_kv_heads": (1, 1024),
    "head_dim": (1, 1024), "max_position_embeddings": (1, MAX_POSITIONS),
}


def check_int(name: str, val, lo: int, hi: Optional[int]) -> int:
  """Raises ValueError unless val is an int (not a bool) in [lo, hi]."""
  if not isinstance(val, int) or isinstance(val, bool) or val < lo or (
      hi is not None and val > hi):
    allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{name}={val!r}; must be an int in {allowed}")
  return val


def check_float(name: str, val, lo: float, hi: Optional[float]) -> float:
  """Raises ValueError unless val is a finite number with lo < val (< hi)."""
  ok = isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)
  if not ok or not val > lo or (hi is not None and not val < hi):
    allowed = f"in ({lo}, {hi})" if hi is not None else f"> {lo}"
    raise ValueError(f"{name}={val!r}; must be a finite number {allowed}")
  return float(val)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder-only transformer.

  Layer kinds are given per layer by `layer_types`; a sliding layer attends to exactly
  `sliding_window` tokens (itself included).

  Gemma switches (all off for the Llama family; see tests/fixtures/hf/NOTES.md):
    norm_unit_offset: RMSNorm scales by (1 + w), multiplying in float32 and casting after.
    embed_scale: embeddings are multiplied by sqrt(hidden_size), rounded to the param dtype.
    sandwich_norms: extra RMSNorms on the attention and MLP outputs (before the residual add).
    qk_norm: per-head RMSNorm of q and k over head_dim, before RoPE (Gemma 3).
    query_pre_attn_scalar: attention scale is query_pre_attn_scalar ** -0.5 (else head_dim).
    attn_logit_softcapping / final_logit_softcapping: c * tanh(x / c) on attention logits
      (before the mask) / on the LM-head logits.
    local_rope_theta / local_rope_scaling: RoPE of sliding layers when it differs from the
      global layers' (Gemma 3); None = same RoPE for every layer.
  """

  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple] = None       # HF rope_scaling dict as sorted items
  partial_rotary_factor: float = 1.0
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False               # q/k/v bias (Qwen2)
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: Optional[int] = None
  layer_types: Optional[tuple] = None        # per layer: "full_attention" | "sliding_attention"
  hidden_act: str = "silu"
  architecture: str = "LlamaForCausalLM"
  dtype: str = "float32"                     # parameter dtype
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  norm_unit_offset: bool = False
  embed_scale: bool = False
  sandwich_norms: bool = False
  qk_norm: bool = False
  query_pre_attn_scalar: Optional[float] = None
  attn_logit_softcapping: Optional[float] = None
  final_logit_softcapping: Optional[float] = None
  local_rope_theta: Optional[float] = None
  local_rope_scaling: Optional[tuple] = None

  def __post_init__(self):
    # Every source (presets, HF config.json, GGUF metadata) passes here before anything is
    # allocated: sizes are ints within LIMITS, floats finite, names from known sets.
    for name, (lo, hi) in LIMITS.items():
      check_int(name, getattr(self, name), lo, hi)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    check_float("rms_norm_eps", self.rms_norm_eps, 0.0, 1.0)
    check_float("rope_theta", self.rope_theta, 0.0, None)
    if self.local_rope_theta is not None:
      check_float("local_rope_theta", self.local_rope_theta, 0.0, None)
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"architecture={self.architecture!r}; supported: "
                       f"{SUPPORTED_ARCHITECTURES}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r}; allowed: {ACTIVATIONS}")
    if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
      # np.float32 / jnp.bfloat16 / np.dtype(...) become their name (hashable, static)
      object.__setattr__(self, "dtype", dtype_name(self.dtype))
    if self.sliding_window is not None:
      check_int("sliding_window", self.sliding_window, 1, MAX_POSITIONS)
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(f"layer_types has {len(self.layer_types)} entries; "
                         f"num_layers={self.num_layers}")
      for t in self.layer_types:
        if t not in LAYER_TYPES:
          raise ValueError(f"unknown layer_types entry {t!r}; allowed: {LAYER_TYPES}")
      if "sliding_attention" in self.layer_types and self.sliding_window is None:
        raise ValueError("layer_types has 'sliding_attention' but sliding_window is None")
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
      val = getattr(self, name)
      if val is not None:
        check_float(name, val, 0.0, None)
    for name in ("rope", "local_rope"):  # validates rope settings
      rope = getattr(self, name)
      for field in ("factor", "low_freq_factor", "high_freq_factor"):
        check_float(f"{name}.{field}", getattr(rope, field), 0.0, None)

  @property
  def rope(self) -> RopeConfig:
    return RopeConfig.from_hf(self.head_dim, self.rope_theta,
                              dict(self.rope_scaling) if self.rope_scaling else None,
                              self.max_position_embeddings, self.partial_rotary_factor)

  @property
  def local_rope(self) -> RopeConfig:
    """RoPE of sliding-window layers (Gemma 3's local base); the global one otherwise."""
    if self.local_rope_theta is None and self.local_rope_scaling is None:
      return self.rope
    theta = self.rope_theta if self.local_rope_theta is None else self.local_rope_theta
    return RopeConfig.from_hf(self.head_dim, theta,
                              dict(self.local_rope_scaling) if self.local_rope_scaling else None,
                              self.max_position_embeddings, self.partial_rotary_factor)

  def layer_rope(self, i: int) -> RopeConfig:
    """RoPE of layer i."""
    return self.local_rope if self.layer_window(i) is not None else self.rope

  @property
  def attention_scale(self) -> Optional[float]:
    """Attention logit scale (None = head_dim ** -0.5)."""
    if self.query_pre_attn_scalar is None:
      return None
    return float(self.query_pre_attn_scalar) ** -0.5

  def layer_window(self, i: int) -> Optional[int]:
    """Sliding window of layer i (None = full attention)."""
    if self.layer_types is None:
      return self.sliding_window
    return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

  @property
  def num_queries_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def fingerprint(self) -> str:
    """Stable hash of the config (used to check saved caches against a model)."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  # --- HF translation -------------------------------------------------------------------
  @classmethod
  def from_hf_dict(cls, d: dict, dtype: Optional[str] = None) -> "ModelConfig":
    if not isinstance(d, dict):
      raise ValueError(f"config.json must hold a JSON object; got {type(d).__name__}")
    archs = d.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
      raise ValueError(f"unknown architecture {str(arch)[:80]!r} in config.json; supported: "
                       f"{SUPPORTED_ARCHITECTURES}")
    gemma = arch in _GEMMA
    # Sizes first, before any per-layer list is built from them.
    hf_limits = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                 "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
                 "num_attention_heads": "num_heads"}
    for key, ours in hf_limits.items():
      if key not in d:
        raise ValueError(f"config.json has no {key!r} (required for {arch})")
      check_int(key, d[key], *LIMITS[ours])
    for key in ("sliding_window_pattern", "max_window_layers"):
      if d.get(key) is not None:
        check_int(key, d[key], 1 if key == "sliding_window_pattern" else 0, None)
    for key in ("rope_scaling", "rope_parameters"):
      if d.get(key) is not None and not isinstance(d[key], dict):
        raise ValueError(f"{key}={str(d[key])[:80]}; must be a JSON object or null")
    n_heads = d["num_attention_heads"]
    n_layers = d["num_hidden_layers"]
    head_dim = d.get("head_dim") or (256 if gemma else d["hidden_size"] // n_heads)
    rope_scaling = d.get("rope_scaling")
    rope_theta = d.get("rope_theta", 1e6 if arch == "Gemma3ForCausalLM" else 10000.0)
    local_theta = local_scaling = None
    rp = d.get("rope_parameters")
    if arch == "Gemma3ForCausalLM":
      # Per-layer-type RoPE. v5: rope_parameters = {layer_type: {...}}; legacy keys:
      # rope_theta / rope_scaling -> full_attention, rope_local_base_freq -> sliding.
      if rope_scaling is None and isinstance(rp, dict) and "full_attention" in rp:
        rope_theta, rope_scaling = _split_rope(rp["full_attention"], rope_theta)
        local_theta, local_scaling = _split_rope(rp.get("sliding_attention", {}), 10000.0)
      else:
        local_theta = d.get("rope_local_base_freq", 10000.0)
    elif rope_scaling is None and isinstance(rp, dict):
      rope_theta, rope_scaling = _split_rope(rp, rope_theta)
    sliding = None
    layer_types = d.get("layer_types")
    if arch == "MistralForCausalLM":
      sliding = d.get("sliding_window", 4096)  # transformers' MistralConfig default
    elif arch == "Qwen2ForCausalLM" and d.get("use_sliding_window"):
      sliding = d.get("sliding_window")
      if layer_types is None:
        mwl = d.get("max_window_layers", n_layers)
        layer_types = ["sliding_attention" if i >= mwl else "full_attention"
                       for i in range(n_layers)]
    elif gemma:
      if d.get("use_bidirectional_attention"):
        raise ValueError(f"{arch}: use_bidirectional_attention=True is not supported")
      sliding = d.get("sliding_window", 4096)
      if layer_types is None:  # transformers' defaults (configuration_gemma{2,3}.py)
        period = 2 if arch == "Gemma2ForCausalLM" else d.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % period else "full_attention"
                       for i in range(n_layers)]
    if sliding is None:
      layer_types = None
    elif layer_types is not None and all(t == "sliding_attention" for t in layer_types):
      layer_types = None
    if local_theta is not None and (local_theta, local_scaling or None) == (rope_theta,
                                                                            rope_scaling or None):
      local_theta = local_scaling = None  # same RoPE on every layer
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    if gemma:
      # v5 reads `hidden_activation`; a Hub config's `hidden_act` is ignored
      # (tests/fixtures/hf/NOTES.md §4).
      act = d.get("hidden_activation") or "gelu_pytorch_tanh"
      gemma2 = arch == "Gemma2ForCausalLM"
      extra = dict(
          norm_unit_offset=True, embed_scale=True, sandwich_norms=True,
          qk_norm=not gemma2,
          query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
          # Gemma 3 stores attn_logit_softcapping but never applies it.
          attn_logit_softcapping=(d.get("attn_logit_softcapping", 50.0) if gemma2 else None),
          final_logit_softcapping=d.get("final_logit_softcapping", 30.0 if gemma2 else None),
          local_rope_theta=local_theta,
          local_rope_scaling=tuple(sorted(local_scaling.items())) if local_scaling else None)
    else:
      act = d.get("hidden_act", "silu")
      extra = {}
    return cls(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=n_layers,
        num_heads=n_heads, num_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=head_dim, rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
        partial_rotary_factor=d.get("partial_rotary_factor", 1.0),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=d.get("tie_word_embeddings", gemma),
        attention_bias=(True if arch == "Qwen2ForCausalLM" else d.get("attention_bias", False)),
        o_bias=(d.get("attention_bias", False) if arch == "LlamaForCausalLM" or gemma
                else False),
        mlp_bias=d.get("mlp_bias", False), sliding_window=sliding,
        layer_types=tuple(layer_types) if layer_types else None,
        hidden_act=act, architecture=arch,
        dtype=dtype or _hf_dtype(d.get("torch_dtype") or d.get("dtype")),
        bos_token_id=d.get("bos_token_id"), eos_token_id=eos, pad_token_id=d.get("pad_token_id"),
        **extra)

  def to_hf_dict(self) -> dict:
    gemma = self.architecture in _GEMMA
    d = {
        "architectures": [self.architecture],
        "model_type": _MODEL_TYPES[self.architecture],
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": self.hidden_act,
        "mlp_bias": self.mlp_bias, "torch_dtype": self.dtype,
        "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }
    if self.partial_rotary_factor != 1.0:
      d["partial_rotary_factor"] = self.partial_rotary_factor
    if self.architecture == "LlamaForCausalLM":
      d["attention_bias"] = self.attention_bias
    if self.architecture == "MistralForCausalLM":
      d["sliding_window"] = self.sliding_window
    if self.architecture == "Qwen2ForCausalLM":
      d["use_sliding_window"] = self.sliding_window is not None
      d["sliding_window"] = self.sliding_window
      d["max_window_layers"] = self.num_layers
    if self.layer_types is not None:
      d["layer_types"] = list(self.layer_types)
    if gemma:
      d.update(
          hidden_activation=self.hidden_act, attention_bias=self.attention_bias,
          query_pre_attn_scalar=self.query_pre_attn_scalar,
          attn_logit_softcapping=self.attn_logit_softcapping,
          final_logit_softcapping=self.final_logit_softcapping,
          sliding_window=self.sliding_window, use_bidirectional_attention=False,
          layer_types=["sliding_attention" if self.layer_window(i) is not None
                       else "full_attention" for i in range(self.num_layers)])
      if self.architecture == "Gemma3ForCausalLM":
        del d["rope_theta"], d["rope_scaling"]
        local = self.local_rope
        d["rope_parameters"] = {
            "full_attention": _join_rope(self.rope_theta, self.rope_scaling),
            "sliding_attention": _join_rope(local.theta, self.local_rope_scaling if
                                            self.local_rope_theta is not None or
                                            self.local_rope_scaling else self.rope_scaling)}
    return d


def _split_rope(rp: dict, default_theta: float):
  """HF rope dict -> (theta, scaling dict or None)."""
  theta = rp.get("rope_theta", default_theta)
  if rp.get("rope_type", rp.get("type", "default")) == "default":
    return theta, None
  return theta, {k: v for k, v in rp.items() if k != "rope_theta"}


def _join_rope(theta, scaling) -> dict:
  out = {"rope_type": "default"}
  if scaling:
    out.update(dict(scaling))
  out["rope_theta"] = theta
  return out


def _hf_dtype(name) -> str:
  return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
      name or "float32", "float32")
