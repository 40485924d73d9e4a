"""`QuantSpec`: the static description of a quantized cache format (hashable, jit-static).

Presets (all return a QuantSpec):
  int8()                         per-token INT8 (symmetric absmax), Dettmers-style.
  fp8("fp8_e4m3" | "fp8_e5m2")   per-token FP8 with a scale per token.
  per_token(bits, group_size)    naive per-token INT{2,4,8}, asymmetric (scale + zero).
  kivi(bits, group_size, residual)   KIVI (Liu et al., 2024): keys per-channel in groups of
                                 `group_size` tokens, values per-token in groups of
                                 `group_size` channels, a full-precision residual window.
  kvquant(bits, ...)             KVQuant-style (Hooper et al., 2024): pre-RoPE per-channel
                                 keys, dense-and-sparse outliers.
  from_name("int8" | "fp8_e4m3" | "fp8_e5m2" | "int4" | "int2" | "kivi4" | "kivi2" |
            "kvquant4" | "kvquant2")
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.quant import formats
from kvjax.rope import RopeConfig

FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")
AXES = ("token", "channel")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """Static quantized-cache format.

  Attributes:
    fmt: "int" | "fp8_e4m3" | "fp8_e5m2".
    k_bits, v_bits: integer bit widths (2, 4, 8); must be 8 for FP8.
    k_axis, v_axis: "token" (a scale per token and channel group) or "channel" (a scale
      per channel and token group; KIVI keys). FP8 supports "token" only.
    group_size: for the token axis, channels per scale (None = all of head_dim; must divide
      head_dim); for the channel axis, tokens per scale (required).
    residual: full-precision window of recent tokens (KIVI's R). With a channel axis it must
      be a positive multiple of group_size: tokens leave it in whole groups.
    symmetric: integer codes without a zero point (absmax scaling).
    pre_rope: store keys before RoPE and re-apply it at attend time (KVQuant); needs `rope`.
    rope: RopeConfig of the layer (filled by `init_model_cache` from the model config).
    outlier_frac: fraction of each token vector kept exactly (dense-and-sparse); 0 = off.
    scale_dtype: dtype of stored scales and zeros ("float16" | "bfloat16" | "float32").
    name: label used in memory reports and tables.
  """

  fmt: str = "int"
  k_bits: int = 8
  v_bits: int = 8
  k_axis: str = "token"
  v_axis: str = "token"
  group_size: Optional[int] = None
  residual: int = 0
  symmetric: bool = False
  pre_rope: bool = False
  rope: Optional[RopeConfig] = None
  outlier_frac: float = 0.0
  scale_dtype: str = "float16"
  name: Optional[str] = None

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ValueError(f"fmt={self.fmt!r}; allowed: {FORMATS}")
    for nm in ("k_axis", "v_axis"):
      if getattr(self, nm) not in AXES:
        raise ValueError(f"{nm}={getattr(self, nm)!r}; allowed: {AXES}")
    if self.fmt == "int":
      for nm in ("k_bits", "v_bits"):
        if getattr(self, nm) not in formats.INT_BITS:
          raise ValueError(f"{nm}={getattr(self, nm)!r} is not a supported bit width; "
                           f"allowed: {formats.INT_BITS}")
    else:
      if self.k_bits != 8 or self.v_bits != 8:
        raise ValueError(f"fmt={self.fmt!r} stores 8-bit codes; got k_bits={self.k_bits}, "
                         f"v_bits={self.v_bits} (allowed: 8)")
      if self.k_axis != "token" or self.v_axis != "token":
        raise ValueError(f"fmt={self.fmt!r} supports k_axis/v_axis='token' only; got "
                         f"{self.k_axis!r}/{self.v_axis!r}")
      if self.symmetric is False:
        object.__setattr__(self, "symmetric", True)  # FP8 is symmetric by construction
    if self.group_size is not None and (not isinstance(self.group_size, int)
                                        or self.group_size < 1):
      raise ValueError(f"group_size={self.group_size!r}; must be a positive int or None")
    if not isinstance(self.residual, int) or self.residual < 0:
      raise ValueError(f"residual={self.residual!r}; must be an int >= 0")
    if self.has_channel_axis:
      if self.group_size is None:
        raise ValueError("a 'channel' axis needs group_size (tokens per scale); got None")
      if self.residual < self.group_size or self.residual % self.group_size:
        raise ValueError(f"residual={self.residual} must be a positive multiple of "
                         f"group_size={self.group_size} with a 'channel' axis (tokens are "
                         "quantized a whole group at a time)")
    if not 0.0 <= self.outlier_frac < 1.0:
      raise ValueError(f"outlier_frac={self.outlier_frac}; must be in [0, 1)")
    if self.scale_dtype not in formats.SCALE_DTYPES:
      raise ValueError(f"scale_dtype={self.scale_dtype!r}; allowed: {formats.SCALE_DTYPES}")
    if self.rope is not None and self.rope.rope_type == "dynamic":
      raise ValueError("pre_rope needs a position-independent RoPE; rope_type='dynamic' "
                       "(allowed: 'default', 'linear', 'llama3')")

  @property
  def has_channel_axis(self) -> bool:
    return "channel" in (self.k_axis, self.v_axis)

  @property
  def token_group(self) -> int:
    """Tokens quantized together (1 unless an axis is per-channel)."""
    return self.group_size if self.has_channel_axis else 1

  def channel_group(self, axis: str, d: int) -> int:
    """Group size along the grouped axis of a tensor with `axis` and head_dim d."""
    if axis == "channel":
      return self.group_size
    return d if self.group_size is None else self.group_size

  @property
  def label(self) -> str:
    if self.name:
      return self.name
    if self.fmt != "int":
      return self.fmt
    s = f"int{self.k_bits}" if self.k_bits == self.v_bits else f"k{self.k_bits}v{self.v_bits}"
    if self.k_axis == "channel":
      s = "kivi-" + s
    if self.group_size:
      s += f"-g{self.group_size}"
    if self.residual:
      s += f"-r{self.residual}"
    if self.pre_rope:
      s += "-prerope"
    if self.outlier_frac:
      s += f"-o{self.outlier_frac:g}"
    return s

  def check_dims(self, head_dim: int, v_head_dim: int):
    """Raises ValueError if the format cannot hold head_dim / v_head_dim."""
    for what, d, axis, bits in (("head_dim", head_dim, self.k_axis, self.k_bits),
                                ("v_head_dim", v_head_dim, self.v_axis, self.v_bits)):
      if axis == "token" and self.group_size is not None and d % self.group_size:
        raise ValueError(f"group_size={self.group_size} must divide {what}={d}")
      if self.fmt == "int" and bits < 8 and d % (8 // bits):
        raise ValueError(f"{what}={d} cannot be packed at {bits} bits (needs a multiple of "
                         f"{8 // bits})")
    if self.pre_rope:
      if self.rope is None:
        raise ValueError("pre_rope=True needs spec.rope (a kvjax.rope.RopeConfig); pass "
                         "rope=config.rope or build caches with kvjax.quant.init_model_cache")
      if self.rope.head_dim != head_dim:
        raise ValueError(f"rope.head_dim={self.rope.head_dim} != head_dim={head_dim}")

  def replace(self, **kw) -> "QuantSpec":
    return dataclasses.replace(self, **kw)


@functools.lru_cache(maxsize=None)
def _fp8_probe(backend: str, fmt: str) -> bool:
  dt = formats.fp8_dtype(fmt)
  try:  # compile only (no execution), so probing from inside a jit trace is safe
    f = jax.jit(lambda x: x.astype(dt).astype(jnp.float32), backend=backend)
    f.lower(jax.ShapeDtypeStruct((8,), jnp.float32)).compile()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def fp8_supported(fmt: str, backend: Optional[str] = None) -> bool:
  """Whether the backend can store and convert `fmt` (probed once per backend)."""
  return _fp8_probe(backend or jax.default_backend(), fmt)


def check_backend(spec: QuantSpec, backend: Optional[str] = None):
  """Raises ValueError if spec needs FP8 and the backend cannot convert it."""
  if spec.fmt != "int" and not fp8_supported(spec.fmt, backend):
    b = backend or jax.default_backend()
    allowed = [f for f in FORMATS if f == "int" or fp8_supported(f, backend)]
    raise ValueError(f"fmt={spec.fmt!r} is not supported on backend {b!r}; allowed here: "
                     f"{tuple(allowed)}")


# -- presets --------------------------------------------------------------------------------
def int8(**kw) -> QuantSpec:
  return QuantSpec(fmt="int", k_bits=8, v_bits=8, symmetric=True, **kw)


def fp8(fmt: str = "fp8_e4m3", **kw) -> QuantSpec:
  return QuantSpec(fmt=fmt, k_bits=8, v_bits=8, symmetric=True, **kw)


def per_token(bits: int = 4, group_size: Optional[int] = None, residual: int = 0,
              **kw) -> QuantSpec:
  return QuantSpec(fmt="int", k_bits=bits, v_bits=bits, group_size=group_size,
                   residual=residual, **kw)


def kivi(bits: int = 4, group_size: int = 32, residual: int = 128, **kw) -> QuantSpec:
  return QuantSpec(fmt="int", k_bits=bits, v_bits=bits, k_axis="channel", v_axis="token",
                   group_size=group_size, residual=residual, **kw)


def kvquant(bits: int = 4, group_size: int = 32, residual: int = 32, outlier_frac: float = 0.01,
            rope: Optional[RopeConfig] = None, **kw) -> QuantSpec:
  return QuantSpec(fmt="int", k_bits=bits, v_bits=bits, k_axis="channel", v_axis="token",
                   group_size=group_size, residual=residual, pre_rope=True, rope=rope,
                   outlier_frac=outlier_frac, **kw)


NAMES = ("int8", "fp8_e4m3", "fp8_e5m2", "int4", "int2", "kivi4", "kivi2", "kvquant4",
         "kvquant2")


def from_name(name: str, **kw) -> QuantSpec:
  """A preset by name (see NAMES); keyword arguments override the preset's defaults."""
  if name == "int8":
    return int8(**kw)
  if name in ("fp8_e4m3", "fp8_e5m2"):
    return fp8(name, **kw)
  if name in ("int4", "int2"):
    return per_token(int(name[3:]), **kw)
  if name in ("kivi4", "kivi2"):
    return kivi(int(name[4:]), **kw)
  if name in ("kvquant4", "kvquant2"):
    return kvquant(int(name[7:]), **kw)
  raise ValueError(f"unknown quantizer name {name!r}; allowed: {NAMES}")
