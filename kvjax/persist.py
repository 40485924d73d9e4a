"""Compress once, ask many: save a (compressed) cache to disk, load it back bit-exactly.

    kvjax.persist.save("ctx.safetensors", cache, fingerprint=config.fingerprint())
    cache, info = kvjax.persist.load("ctx.safetensors", fingerprint=config.fingerprint())
    caches = kvjax.fork(cache, 8)             # 8 questions over one prefilled context

(`models.save_cache(model, cache, path)` / `models.load_cache(model, path)` pass the model's
config, name the mismatching fields when a cache meets the wrong model, and check the
cache's layers, kv heads and head dims against the model.)

File format: one safetensors file. Every array of the cache is a tensor stored with its
exact dtype and bytes (bfloat16, float8, packed uint8 codes, int32 positions ...), so a
round trip is bit-exact. The `__metadata__` holds JSON:
  format       "kvjax.cache/1"
  fingerprint  the model-config fingerprint the cache belongs to (kvjax never imports a
               model: the caller passes the string in)
  tree         the pytree structure: for every node its kind (the `module:QualName` of a
               cache kind, or tuple/list/dict/None), its static fields (n_sink,
               QuantSpec, head dims, scan groups ...) and the tensor name of each array
  summary      human-readable facts: per layer kind, static fields, capacity, nbytes and
               lengths; next_position (original sequence length per row); batch
  user         any JSON-able metadata of the caller

A file is data (see SECURITY.md). Loading never imports, resolves or calls anything the file
names: a kind name is only a key into an explicit allowlist (`kinds()`: the cache kinds of
kvjax, each with its declared array fields -- dims and dtype -- nested fields and typed
static fields), static dataclass values (QuantSpec, RopeConfig) come only from an
allowlist of static structs, and the only code called is the registered class's constructor
after every field has been validated: tensors exist and are used once, dtypes and ranks match the
declaration, dims agree across fields (and with the model, through `expect`), batch is one
size across the file, lengths lie in [0, capacity], positions are >= -1 (-1 = empty slot),
next_position >= 0, float arrays are finite, and each kind's own invariants hold (ring
sizes, quantized layouts rebuilt from the spec, scan-group bookkeeping). Errors name the
file and the field (e.g. `cache.segments.0.lengths`). `register_kind` is the explicit
opt-in for cache kinds defined outside kvjax.

One file on purpose (about 900 lines): the allowlist of cache kinds and the validation of
every field are one security boundary, read and audited together.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax import safetensors_io as st_io

FORMAT = "kvjax.cache/1"
_MAX_DEPTH = 64          # nesting of the tree JSON
_MAX_ITEMS = 1 << 16     # items of one tuple/list/dict in the tree or a static value
_MAX_STR = 1 << 12       # length of a static string


class _Fail:
  """Raises ValueError("<file>: <where>: <msg>")."""

  def __init__(self, path: str):
    self.path = path

  def __call__(self, where: str, msg: str):
    raise ValueError(f"{self.path}: {where}: {msg}")


# -- field declarations -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Array:
  """An array field of a cache kind.

  Attributes:
    dims: one symbol (or fixed int) per axis, batch first. Symbols are bound per cache
      instance and must agree across its fields; "B" (batch) must agree across the file.
      A cache stacked into a ModelCache segment carries one extra leading layer axis.
    dtype: "float" (any floating dtype), "int32", "uint8", "int" (any integer) or "any".
    optional: the field may be None.
  """

  dims: tuple
  dtype: str = "float"
  optional: bool = False


@dataclasses.dataclass(frozen=True)
class Nested:
  """A field holding cache kind(s).

  Attributes:
    kinds: allowed classes; None = any registered layer kind (not ModelCache).
    many: a tuple of them.
    stacked_by: static tuple field giving each item's leading (stacked layer) axis size.
  """

  kinds: Optional[tuple] = None
  many: bool = False
  stacked_by: Optional[str] = None


# Static field types: each parses the JSON value saved by `_static_to_json` or fails.
class Int:
  def __init__(self, lo: int = 0, hi: Optional[int] = None):
    self.lo, self.hi = lo, hi

  def parse(self, v, where, fail):
    if not isinstance(v, int) or isinstance(v, bool) or v < self.lo or (
        self.hi is not None and v > self.hi):
      hi = "inf" if self.hi is None else self.hi
      fail(where, f"{str(v)[:80]} is not an int in [{self.lo}, {hi}]")
    return v


class Bool:
  def parse(self, v, where, fail):
    if not isinstance(v, bool):
      fail(where, f"{v!r} is not a bool")
    return v


class Float:
  def parse(self, v, where, fail):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      fail(where, f"{v!r} is not a finite number")
    return float(v)


class Str:
  def __init__(self, choices: Optional[tuple] = None):
    self.choices = choices

  def parse(self, v, where, fail):
    if not isinstance(v, str) or len(v) > _MAX_STR:
      fail(where, f"{str(v)[:80]!r} is not a string of at most {_MAX_STR} characters")
    if self.choices is not None and v not in self.choices:
      fail(where, f"{v!r}; allowed: {self.choices}")
    return v


class Opt:
  def __init__(self, inner):
    self.inner = inner

  def parse(self, v, where, fail):
    return None if v is None else self.inner.parse(v, where, fail)


class TupleOf:
  def __init__(self, inner):
    self.inner = inner

  def parse(self, v, where, fail):
    if not (isinstance(v, dict) and set(v) == {"__tuple__"} and isinstance(v["__tuple__"], list)
            and len(v["__tuple__"]) <= _MAX_ITEMS):
      fail(where, f"expected a saved tuple {{'__tuple__': [...]}}, got {str(v)[:80]}")
    return tuple(self.inner.parse(x, f"{where}.{i}", fail) for i, x in enumerate(v["__tuple__"]))


class Struct:
  """A static dataclass value (QuantSpec, RopeConfig): its class must be allowlisted."""

  def __init__(self, cls: Optional[type] = None):
    self.cls = cls  # None: any allowlisted struct

  def parse(self, v, where, fail):
    if not (isinstance(v, dict) and set(v) == {"__dataclass__", "fields"}
            and isinstance(v["fields"], dict)):
      fail(where, f"expected a saved dataclass {{'__dataclass__', 'fields'}}, got {str(v)[:80]}")
    name = v["__dataclass__"]
    entry = _structs().get(name) if isinstance(name, str) else None
    if entry is None or (self.cls is not None and entry[0] is not self.cls):
      allowed = ([_kind_name(self.cls)] if self.cls is not None else sorted(_structs()))
      fail(where, f"static dataclass {str(name)[:120]!r} is not allowed here "
           f"(allowed: {allowed}); nothing was imported or called")
    cls, types = entry
    fields = v["fields"]
    unknown = sorted(set(fields) - set(types))
    if unknown:
      fail(where, f"unknown fields {unknown[:8]} for {cls.__name__} (allowed: {sorted(types)})")
    kw = {k: types[k].parse(x, f"{where}.{k}", fail) for k, x in fields.items()}
    try:
      return cls(**kw)
    except (TypeError, ValueError) as e:
      fail(where, f"invalid {cls.__name__}: {e}")


class DType:
  def parse(self, v, where, fail):
    names = sorted(np.dtype(d).name for d in st_io.DTYPES.values())
    if not (isinstance(v, dict) and set(v) == {"__dtype__"} and v["__dtype__"] in names):
      fail(where, f"{str(v)[:80]} is not a saved dtype (allowed: {names})")
    return jnp.dtype(v["__dtype__"])


class AnyStatic:
  """Any static value `_static_to_json` writes (for kinds registered without types);
  dataclass values still come only from the allowlisted static structs."""

  def parse(self, v, where, fail, depth=0):
    if depth > _MAX_DEPTH:
      fail(where, "static value nested too deeply")
    if v is None or isinstance(v, (bool, int, str)):
      return Str().parse(v, where, fail) if isinstance(v, str) else v
    if isinstance(v, float):
      return Float().parse(v, where, fail)
    if isinstance(v, list):
      if len(v) > _MAX_ITEMS:
        fail(where, f"list of {len(v)} items (at most {_MAX_ITEMS})")
      return [self.parse(x, f"{where}.{i}", fail, depth + 1) for i, x in enumerate(v)]
    if isinstance(v, dict) and "__tuple__" in v:
      items = TupleOf(_Identity()).parse(v, where, fail)
      return tuple(self.parse(x, f"{where}.{i}", fail, depth + 1) for i, x in enumerate(items))
    if isinstance(v, dict) and set(v) == {"__dict__"} and isinstance(v["__dict__"], list):
      out = {}
      for i, kv in enumerate(v["__dict__"][:_MAX_ITEMS + 1]):
        if not (isinstance(kv, list) and len(kv) == 2):
          fail(f"{where}.{i}", "dict items are saved as [key, value]")
        key = self.parse(kv[0], f"{where}.{i}", fail, depth + 1)
        if isinstance(key, (list, dict)):
          fail(f"{where}.{i}", "dict keys must be hashable")
        out[key] = self.parse(kv[1], f"{where}.{i}", fail, depth + 1)
      return out
    if isinstance(v, dict) and "__dtype__" in v:
      return DType().parse(v, where, fail)
    if isinstance(v, dict) and "__dataclass__" in v:
      return Struct().parse(v, where, fail)
    fail(where, f"corrupt static value {str(v)[:80]}")


class _Identity:
  def parse(self, v, where, fail):
    return v


@dataclasses.dataclass(frozen=True)
class KindSpec:
  """An allowlisted cache kind.

  Attributes:
    cls: the class (rebuilt with `cls(**fields)` once every field is valid).
    fields: data field -> `Array` | `Nested` (None = a user kind's untyped subtree).
    static: static field -> type (`Int`, `Str`, `Struct` ...).
    dim_statics: static field -> the dim symbol it must equal (head_dim -> "D").
    check: check(values, statics, dims, fail, where) for the kind's own invariants.
    upgrade: upgrade(static JSON dict) -> static JSON dict, for files written before a
      static field was renamed or added (applied before the fields are checked).
    build: build(**fields) -> instance, used instead of `cls(**fields)` by a kind that
      older files name and that is now rebuilt as its successor.
  """

  cls: type
  fields: Mapping[str, Any]
  static: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dim_statics: Mapping[str, str] = dataclasses.field(default_factory=dict)
  check: Optional[Callable] = None
  upgrade: Optional[Callable] = None
  build: Optional[Callable] = None


_USER_KINDS: dict[str, KindSpec] = {}
_BUILTIN: dict[str, KindSpec] = {}
_STRUCTS_TABLE: dict[str, tuple] = {}


def _kind_name(cls) -> str:
  return f"{cls.__module__}:{cls.__qualname__}"


def register_kind(cls: type, *, fields: Optional[Mapping[str, Any]] = None,
                  static: Optional[Mapping[str, Any]] = None,
                  check: Optional[Callable] = None) -> type:
  """Allows `load` to rebuild a cache kind defined outside kvjax (usable as a decorator).

  Args:
    cls: a dataclass cache kind (flax.struct.dataclass).
    fields: data field -> `Array(dims, dtype)` / `Nested(...)`; default: every pytree
      field is an untyped subtree (arrays of any shape, None, containers, registered kinds).
    static: static field -> type (`Int()`, `Str(...)`, `Struct(QuantSpec)` ...); default:
      `AnyStatic()` (JSON values, tuples, dicts, dtypes, allowlisted dataclasses).
    check: optional check(values, statics, dims, fail, where) run before `cls` is called.

  Returns:
    cls (so it can decorate the class).
  """
  if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
    raise TypeError(f"register_kind needs a dataclass cache kind; got {cls!r}")
  fs = dataclasses.fields(cls)
  data = [f.name for f in fs if f.metadata.get("pytree_node", True)]
  stat = [f.name for f in fs if not f.metadata.get("pytree_node", True)]
  fields = {n: None for n in data} if fields is None else dict(fields)
  static = {n: AnyStatic() for n in stat} if static is None else dict(static)
  if set(fields) != set(data) or set(static) != set(stat):
    raise ValueError(f"register_kind({cls.__name__}): fields must name the pytree fields "
                     f"{data} and static the static fields {stat}")
  _USER_KINDS[_kind_name(cls)] = KindSpec(cls, fields, static, {}, check)
  return cls


# -- the allowlist of kvjax cache kinds -------------------------------------------------
def _check_slots(values, dims, fail, where, pos="positions", lengths="lengths", cap="S"):
  """lengths in [0, capacity], positions >= -1 (-1 marks an empty slot)."""
  if values.get(lengths) is not None:
    ln = values[lengths]
    if ln.size and (ln.min() < 0 or ln.max() > dims[cap]):
      fail(f"{where}.{lengths}", f"values in [{ln.min()}, {ln.max()}]; allowed "
           f"[0, capacity={dims[cap]}]")
  if values.get(pos) is not None:
    p = values[pos]
    if p.size and p.min() < -1:
      fail(f"{where}.{pos}", f"min {p.min()}; positions are >= 0 (-1 = empty slot)")


def _check_window(values, statics, dims, fail, where):
  _check_slots(values, dims, fail, where)
  if statics["n_sink"] >= dims["S"]:
    fail(f"{where}.n_sink", f"{statics['n_sink']}; must be < capacity={dims['S']} "
         "(window >= 1)")
  total, ln = values["total"], values["lengths"]
  if total.size and total.min() < 0:
    fail(f"{where}.total", f"min {total.min()}; must be >= 0")
  if not np.array_equal(ln, np.minimum(total, dims["S"])):
    fail(f"{where}.lengths", "must equal min(total, capacity)")


def _window_static_upgrade(static):
  """WindowKVCache files written before the sinks were named n_sink and rings dilated."""
  if set(static) == {"sink"}:
    return {"n_sink": static["sink"], "dilation": 1}
  return static


def _check_ring(values, statics, dims, fail, where):
  _check_slots(values, dims, fail, where)
  if dims["S"] != statics["sink_tokens"] + statics["window"]:
    fail(f"{where}.k", f"{dims['S']} slots; sink_tokens + window = "
         f"{statics['sink_tokens'] + statics['window']}")


def _ring_as_window(k, v, positions, window, sink_tokens, dilation):
  """A ring saved by the former RingKVCache (slot chosen by position) as a WindowKVCache.

  Each row's held tokens are packed into slots [0, n) in position order with total = n:
  the sinks (the smallest positions) come first, and the next write goes to slot
  n_sink + (n - n_sink) mod window, the oldest ring token's slot once the ring is full --
  what writing those n tokens in order gives. Works on stacked leaves ([..., B, H, S]).
  """
  from kvjax import window as window_lib  # pylint: disable=import-outside-toplevel
  del window
  valid = positions >= 0
  order = np.argsort(np.where(valid, positions, np.iinfo(np.int32).max), axis=-1,
                     kind="stable")
  held = np.take_along_axis(valid, order, axis=-1)
  take = lambda x: np.take_along_axis(x, order[..., None], axis=-2)  # noqa: E731
  n = valid.sum(axis=-1).astype(np.int32)
  return window_lib.WindowKVCache(
      k=np.where(held[..., None], take(k), np.zeros((), k.dtype)),
      v=np.where(held[..., None], take(v), np.zeros((), v.dtype)),
      positions=np.where(held, np.take_along_axis(positions, order, axis=-1),
                         -1).astype(np.int32),
      lengths=n, total=n, n_sink=sink_tokens, dilation=dilation)


def _check_index(values, name, hi, fail, where):
  x = values.get(name)
  if x is not None and x.size and (x.min() < 0 or x.max() >= hi):
    fail(f"{where}.{name}", f"values in [{x.min()}, {x.max()}]; allowed [0, {hi})")


def _check_pruned(values, statics, dims, fail, where):
  _check_slots(values, dims, fail, where)
  if dims["K"] > statics["head_dim"]:
    fail(f"{where}.k", f"keeps {dims['K']} channels; head_dim={statics['head_dim']}")
  _check_index(values, "channels", statics["head_dim"], fail, where)


def _check_lowrank(values, statics, dims, fail, where):
  _check_slots(values, dims, fail, where)
  if values["v_proj"] is None and dims["Rv"] != dims["Dv"]:
    fail(f"{where}.v", f"last dim {dims['Rv']}; without v_proj it must be "
         f"v_head_dim={dims['Dv']}")


def _check_plain(values, statics, dims, fail, where):
  _check_slots(values, dims, fail, where)


def _check_quantized(values, statics, dims, fail, where):
  from kvjax.quant.cache import QuantizedKVCache  # pylint: disable=import-outside-toplevel
  spec, d, dv = statics["spec"], statics["head_dim"], statics["v_head_dim"]
  try:
    spec.check_dims(d, dv)
  except ValueError as e:
    fail(f"{where}.spec", str(e))
  sq, g = dims["S"], spec.token_group
  if sq % g:
    fail(f"{where}.positions", f"{sq} quantized slots; must be a multiple of the spec's "
         f"token group {g}")
  if sq + spec.residual < 1:
    fail(f"{where}.positions", "the cache holds no slot")
  b, h = values["lengths"].shape[-2:]
  try:  # the layout, rebuilt from the spec by the kind's own constructor (no allocation)
    tmpl = jax.eval_shape(lambda: QuantizedKVCache.init(
        b, h, sq + spec.residual, d, spec, dtype=statics["dtype"], v_head_dim=dv))
  except ValueError as e:
    fail(f"{where}.spec", str(e))
  for f in dataclasses.fields(QuantizedKVCache):
    if not f.metadata.get("pytree_node", True):
      continue
    want, got = getattr(tmpl, f.name), values[f.name]
    if (want is None) != (got is None):
      fail(f"{where}.{f.name}", f"{'missing' if got is None else 'present'}; the spec "
           f"{spec.label} {'needs' if got is None else 'has no'} it")
    if want is not None and (tuple(got.shape[got.ndim - len(want.shape):]) != want.shape
                             or got.dtype != want.dtype):
      fail(f"{where}.{f.name}", f"{got.dtype}{list(got.shape)}; the spec {spec.label} "
           f"implies {want.dtype}{list(want.shape)} (after any stacked layer axis)")
  # lengths counts quantized + residual tokens: quantized ones fill [0, lengths - res_lengths)
  _check_slots(values, {"S": sq + spec.residual}, fail, where)
  if spec.residual:
    _check_slots(values, {"R": spec.residual}, fail, where, pos="res_positions",
                 lengths="res_lengths", cap="R")
    held = values["lengths"] - values["res_lengths"]
    if held.size and (held.min() < 0 or held.max() > sq):
      fail(f"{where}.lengths", f"lengths - res_lengths in [{held.min()}, {held.max()}]; "
           f"allowed [0, quantized slots={sq}]")
  _check_index(values, "k_out_idx", d, fail, where)
  _check_index(values, "v_out_idx", dv, fail, where)


def _check_head_split(values, statics, dims, fail, where):
  parts, heads = values["parts"], statics["heads"]
  if len(parts) != len(heads) or not parts:
    fail(f"{where}.heads", f"{len(heads)} entries for {len(parts)} parts (one per part, "
         "at least one)")
  for i, (sub_dims, n) in enumerate(zip(dims["parts"], heads)):
    if sub_dims.get("H") != n:
      fail(f"{where}.parts.{i}", f"holds {sub_dims.get('H')} kv heads; heads[{i}]={n}")
  dims["H"] = sum(heads)


def _check_model_cache(values, statics, dims, fail, where):
  sizes, periods = statics["segment_sizes"], statics["segment_periods"]
  n = len(values["segments"])
  if len(sizes) != n or not n:
    fail(f"{where}.segment_sizes", f"{len(sizes)} entries for {n} segments")
  if periods and len(periods) != n:
    fail(f"{where}.segment_periods", f"{len(periods)} entries for {n} segments")
  periods = periods or (1,) * n
  e = 0
  while e < n:  # the scan-group bookkeeping ModelCache.groups() walks
    p, r = periods[e], sizes[e]
    if e + p > n or any(periods[e + j] != p or sizes[e + j] != r for j in range(p)):
      fail(f"{where}.segment_periods", f"entries {e}..{e + p - 1} must form one group of "
           f"period {p} with {r} repetitions each")
    e += p
  nxt = values["next_position"]
  if nxt.size and nxt.min() < 0:
    fail(f"{where}.next_position", f"min {nxt.min()}; must be >= 0")
  dims["num_layers"] = sum(sizes)


def _builtin() -> dict[str, KindSpec]:
  """The kvjax cache kinds (imported here, on first use, to keep this module light)."""
  if _BUILTIN:
    return _BUILTIN
  # pylint: disable=import-outside-toplevel
  from kvjax import lowrank, mixed, recurrent, window
  from kvjax.quant import cache as qcache
  from kvjax.quant import spec as qspec
  from kvjax.quant import formats
  B, H, S = "B", "H", "S"
  i32 = "int32"
  slots = dict(positions=Array((B, H, S), i32), lengths=Array((B, H), i32))
  specs = [
      KindSpec(cache_lib.DenseKVCache, dict(k=Array((B, H, S, "D")), v=Array((B, H, S, "Dv")),
                                            **slots), check=_check_plain),
      KindSpec(window.WindowKVCache, dict(k=Array((B, H, S, "D")), v=Array((B, H, S, "Dv")),
                                          total=Array((B, H), i32), **slots),
               static=dict(n_sink=Int(0), dilation=Int(1)), check=_check_window,
               upgrade=_window_static_upgrade),
      KindSpec(qcache.QuantizedKVCache, dict(
          # layout of codes / scales / outliers: rebuilt from the spec in _check_quantized
          k_codes=Array((B, H, "kc", "kc2"), "any"), k_scale=Array((B, H, "ks", "ks2")),
          k_zero=Array((B, H, "kz", "kz2"), optional=True),
          k_out_val=Array((B, H, "ko", "ko2"), optional=True),
          k_out_idx=Array((B, H, "ki", "ki2"), "int", optional=True),
          v_codes=Array((B, H, "vc", "vc2"), "any"), v_scale=Array((B, H, "vs", "vs2")),
          v_zero=Array((B, H, "vz", "vz2"), optional=True),
          v_out_val=Array((B, H, "vo", "vo2"), optional=True),
          v_out_idx=Array((B, H, "vi", "vi2"), "int", optional=True),
          k_res=Array((B, H, "R", "D"), optional=True),
          v_res=Array((B, H, "R", "Dv"), optional=True),
          res_positions=Array((B, H, "R"), i32, optional=True),
          res_lengths=Array((B, H), i32, optional=True), **slots),
               static=dict(spec=Struct(qspec.QuantSpec), head_dim=Int(1), v_head_dim=Int(1),
                           dtype=Str(("float32", "bfloat16", "float16"))),
               dim_statics=dict(head_dim="D", v_head_dim="Dv"), check=_check_quantized),
      KindSpec(lowrank.PrunedKeyCache, dict(
          k=Array((B, H, S, "K")), v=Array((B, H, S, "Dv")), channels=Array((B, H, "K"), i32),
          **slots), static=dict(head_dim=Int(1)), dim_statics=dict(head_dim="D"),
               check=_check_pruned),
      KindSpec(lowrank.LowRankKVCache, dict(
          k=Array((B, H, S, "Rk")), v=Array((B, H, S, "Rv")), k_proj=Array((B, H, "D", "Rk")),
          v_proj=Array((B, H, "Dv", "Rv"), optional=True), **slots),
               static=dict(head_dim=Int(1), v_head_dim=Int(1)),
               dim_statics=dict(head_dim="D", v_head_dim="Dv"), check=_check_lowrank),
      KindSpec(mixed.HeadSplitCache, dict(parts=Nested(many=True)),
               static=dict(heads=TupleOf(Int(1))), check=_check_head_split),
      KindSpec(recurrent.LatentKVCache, dict(
          c_kv=Array((B, S, "latent")), k_rope=Array((B, S, "rope_dim")),
          positions=Array((B, S), i32), lengths=Array((B,), i32)), check=_check_plain),
      KindSpec(recurrent.LinearAttentionState,
               dict(state=Array((B, "heads", "key_dim", "value_dim")))),
      KindSpec(recurrent.DiagonalState, dict(h=Array((B, "width")))),
      KindSpec(recurrent.ConvState, dict(window=Array((B, "kernel_minus_1", "channels")))),
      KindSpec(recurrent.ConvRecurrentState, dict(
          conv=Nested((recurrent.ConvState,)),
          rec=Nested((recurrent.LinearAttentionState, recurrent.DiagonalState)))),
      KindSpec(cache_lib.ModelCache, dict(
          segments=Nested(many=True, stacked_by="segment_sizes"),
          next_position=Array((B,), i32)),
               static=dict(segment_sizes=TupleOf(Int(1)), segment_periods=TupleOf(Int(1))),
               check=_check_model_cache),
  ]
  from kvjax import rope as rope_lib
  _STRUCTS_TABLE.update({
      _kind_name(rope_lib.RopeConfig): (rope_lib.RopeConfig, dict(
          head_dim=Int(1), theta=Float(), rope_type=Str(rope_lib.ROPE_TYPES), factor=Float(),
          partial_rotary_factor=Float(), max_position_embeddings=Int(1),
          low_freq_factor=Float(), high_freq_factor=Float(),
          original_max_position_embeddings=Int(1))),
      _kind_name(qspec.QuantSpec): (qspec.QuantSpec, dict(
          fmt=Str(qspec.FORMATS), k_bits=Int(1, 8), v_bits=Int(1, 8), k_axis=Str(qspec.AXES),
          v_axis=Str(qspec.AXES), group_size=Opt(Int(1)), residual=Int(0),
          symmetric=Bool(), pre_rope=Bool(), rope=Opt(Struct(rope_lib.RopeConfig)),
          outlier_frac=Float(), scale_dtype=Str(formats.SCALE_DTYPES), name=Opt(Str()))),
  })
  _BUILTIN.update({_kind_name(s.cls): s for s in specs})
  # Files written when sliding-window rings of the retrained families had a kind of their
  # own: rebuilt as the one ring kind.
  _BUILTIN["kvjax.recurrent:RingKVCache"] = KindSpec(
      window.WindowKVCache, dict(k=Array((B, H, S, "D")), v=Array((B, H, S, "Dv")),
                                 positions=Array((B, H, S), i32)),
      static=dict(window=Int(1), sink_tokens=Int(0), dilation=Int(1)), check=_check_ring,
      build=_ring_as_window)
  return _BUILTIN


def _structs() -> dict[str, tuple]:
  _builtin()
  return _STRUCTS_TABLE


def kinds() -> dict[str, KindSpec]:
  """The allowlist: {kind name: KindSpec}, the built-in kvjax kinds and registered ones."""
  return {**_builtin(), **_USER_KINDS}


def _spec_of(kind, fail, where) -> KindSpec:
  table = _builtin()
  spec = _USER_KINDS.get(kind) if isinstance(kind, str) else None
  spec = spec or (table.get(kind) if isinstance(kind, str) else None)
  if spec is None:
    fail(where, f"cache kind {str(kind)[:120]!r} is not a kvjax kind on the allowlist (allowed: "
         f"{sorted(k.split(':')[1] for k in table)} and kinds passed to "
         "kvjax.persist.register_kind); nothing was imported or called")
  return spec


# -- static (non-array) field values -> JSON ------------------------------------------------
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


class _Reader:
  """State of one load: the file's tensors (each used once), the batch, the error helper."""

  def __init__(self, path: str, tensors: dict, fail: _Fail):
    self.path, self.tensors, self.fail = path, tensors, fail
    self.used: set = set()
    self.batch: Optional[int] = None

  def tensor(self, node, where: str) -> np.ndarray:
    if not (isinstance(node, dict) and set(node) == {"tensor"}
            and isinstance(node["tensor"], str)):
      self.fail(where, f"expected an array node {{'tensor': name}}, got {str(node)[:80]}")
    name = node["tensor"]
    if name not in self.tensors:
      self.fail(where, f"tensor {name[:120]!r} is missing from the file")
    if name in self.used:
      self.fail(where, f"tensor {name!r} is used by two fields")
    self.used.add(name)
    return self.tensors[name]

  def bind_batch(self, b: int, where: str):
    if self.batch is None:
      self.batch = b
    elif self.batch != b:
      self.fail(where, f"batch {b}; the rest of the cache has batch {self.batch}")


def _dtype_ok(dt: np.dtype, want: str) -> bool:
  if want == "any":
    return True
  if want == "float":
    return jnp.issubdtype(dt, jnp.floating)
  if want == "int":
    return jnp.issubdtype(dt, jnp.integer)
  return dt == np.dtype(want)


def _check_array(rd: _Reader, arr: np.ndarray, f: Array, lead: tuple, dims: dict,
                 where: str):
  if not _dtype_ok(arr.dtype, f.dtype):
    rd.fail(where, f"dtype {arr.dtype}; allowed: {f.dtype}")
  want_rank = len(lead) + len(f.dims)
  if arr.ndim != want_rank:
    rd.fail(where, f"shape {list(arr.shape)} has rank {arr.ndim}; expected {want_rank} "
            f"({'[layers] + ' if lead else ''}{list(f.dims)})")
  if tuple(arr.shape[:len(lead)]) != tuple(lead):
    rd.fail(where, f"shape {list(arr.shape)}: leading (stacked layer) axes must be "
            f"{list(lead)}")
  for sym, n in zip(f.dims, arr.shape[len(lead):]):
    if isinstance(sym, int):
      if n != sym:
        rd.fail(where, f"shape {list(arr.shape)}: an axis of size {n} must be {sym}")
    elif sym == "B":
      rd.bind_batch(n, where)
    elif dims.setdefault(sym, n) != n:
      rd.fail(where, f"shape {list(arr.shape)}: axis {sym}={n} disagrees with {sym}="
              f"{dims[sym]} of another field")
  if jnp.issubdtype(arr.dtype, jnp.floating) and arr.size and not np.isfinite(arr).all():
    rd.fail(where, "holds NaN or infinite values")


def _decode_kind(node, rd: _Reader, where: str, lead: tuple, expect: Mapping[str, int],
                 kinds: Optional[tuple] = None):
  """Validates one kind node; returns (instance with numpy leaves, its dims)."""
  fail = rd.fail
  if not (isinstance(node, dict) and set(node) == {"kind", "data", "static"}
          and isinstance(node["data"], dict) and isinstance(node["static"], dict)):
    fail(where, f"expected a cache kind node {{'kind', 'data', 'static'}}, got "
         f"{str(node)[:80]}")
  spec = _spec_of(node["kind"], fail, f"{where} (kind)")
  from kvjax.cache import ModelCache  # pylint: disable=import-outside-toplevel
  if kinds is not None and spec.cls not in kinds or kinds is None and spec.cls is ModelCache \
      and lead is not None:
    allowed = ([c.__name__ for c in kinds] if kinds is not None else "a layer cache kind")
    fail(where, f"kind {spec.cls.__name__} is not allowed here (allowed: {allowed})")
  lead = lead or ()
  if spec.upgrade is not None:
    node = dict(node, static=spec.upgrade(node["static"]))
  for part, want in (("data", spec.fields), ("static", spec.static)):
    got = set(node[part])
    if got != set(want):
      fail(where, f"{spec.cls.__name__} {part} fields {sorted(got)[:16]}; expected "
           f"{sorted(want)}")
  statics = {k: t.parse(node["static"][k], f"{where}.{k}", fail) for k, t in spec.static.items()}
  dims: dict = {}
  values = {}
  child_expect = {k: v for k, v in expect.items() if k != "H"} if any(
      isinstance(f, Nested) and f.many and f.stacked_by is None for f in spec.fields.values()
  ) else expect
  for name, f in spec.fields.items():
    sub, w = node["data"][name], f"{where}.{name}"
    if f is None:
      values[name] = _decode_any(sub, rd, w, lead, expect, depth=1)
    elif isinstance(f, Array):
      if sub is None:
        if not f.optional:
          fail(w, "is required (got None)")
        values[name] = None
        continue
      arr = rd.tensor(sub, w)
      _check_array(rd, arr, f, lead, dims, w)
      values[name] = arr
    else:
      if not f.many:
        values[name], dims[name] = _decode_kind(sub, rd, w, lead, child_expect, f.kinds)
        continue
      if not (isinstance(sub, dict) and set(sub) == {"tuple"} and isinstance(sub["tuple"], list)
              and len(sub["tuple"]) <= _MAX_ITEMS):
        fail(w, f"expected a tuple node, got {str(sub)[:80]}")
      items, sub_dims = [], []
      for i, item in enumerate(sub["tuple"]):
        extra = ()
        if f.stacked_by is not None:
          sizes = statics[f.stacked_by]
          if i >= len(sizes):
            fail(f"{where}.{f.stacked_by}", f"{len(sizes)} entries for "
                 f"{len(sub['tuple'])} items of {name}")
          extra = (sizes[i],)
        obj, d = _decode_kind(item, rd, f"{w}.{i}", lead + extra, child_expect, f.kinds)
        items.append(obj)
        sub_dims.append(d)
      values[name], dims[name] = tuple(items), sub_dims
  for sname, sym in spec.dim_statics.items():
    if dims.setdefault(sym, statics[sname]) != statics[sname]:
      fail(f"{where}.{sname}", f"{statics[sname]}; the arrays' {sym} axis is {dims[sym]}")
  if spec.check is not None:
    spec.check(values, statics, dims, fail, where)
  for sym, n in expect.items():
    if sym in dims and dims[sym] != n:
      fail(where, f"{spec.cls.__name__} has {_SYMBOL_NAMES.get(sym, sym)}={dims[sym]}; the "
           f"model has {n}")
  return (spec.build or spec.cls)(**values, **statics), dims


_SYMBOL_NAMES = {"H": "kv heads", "D": "head_dim", "Dv": "v_head_dim",
                 "num_layers": "layers"}


def _decode_any(node, rd: _Reader, where: str, lead, expect, depth: int = 0):
  """A top-level node: None, an array, a tuple/list/dict of nodes or a cache kind."""
  if depth > _MAX_DEPTH:
    rd.fail(where, "tree nested too deeply")
  if node is None:
    return None
  if not isinstance(node, dict) or len(node) not in (1, 3):
    rd.fail(where, f"corrupt tree node {str(node)[:80]}")
  if "tensor" in node:
    arr = rd.tensor(node, where)
    if arr.ndim:
      rd.bind_batch(arr.shape[0], where)
    return arr
  for key in ("tuple", "list"):
    if key in node:
      if not isinstance(node[key], list) or len(node[key]) > _MAX_ITEMS:
        rd.fail(where, f"corrupt {key} node")
      items = [_decode_any(x, rd, f"{where}.{i}", lead, expect, depth + 1)
               for i, x in enumerate(node[key])]
      return tuple(items) if key == "tuple" else items
  if "dict" in node:
    if not isinstance(node["dict"], dict) or len(node["dict"]) > _MAX_ITEMS:
      rd.fail(where, "corrupt dict node")
    return {k: _decode_any(x, rd, f"{where}.{k}", lead, expect, depth + 1)
            for k, x in node["dict"].items()}
  return _decode_kind(node, rd, where, lead, expect)[0]


def _decode(tree, tensors: dict, fail: _Fail, expect: Mapping[str, int]):
  rd = _Reader(fail.path, tensors, fail)
  top = expect.get("num_layers")
  out = _decode_any(tree, rd, "cache", None, {k: v for k, v in expect.items()
                                               if k != "num_layers"})
  unused = sorted(set(tensors) - rd.used)
  if unused:
    fail("cache", f"tensors {unused[:8]} are not part of the cache tree")
  if top is not None:
    if not cache_lib.is_model_cache(out):
      fail("cache", f"a {type(out).__name__}; the model needs a ModelCache")
    if out.num_layers != top:
      fail("cache.segment_sizes", f"the cache holds {out.num_layers} layers; the model has "
           f"{top}")
  return jax.tree.map(jnp.asarray, out)


def _static_fields(cache) -> dict:
  if not dataclasses.is_dataclass(cache):
    return {}
  return {f.name: _static_to_json(getattr(cache, f.name), f.name)
          for f in dataclasses.fields(cache) if not f.metadata.get("pytree_node", True)}


def summary(cache) -> dict:
  """JSON-able facts about a cache: per-layer kind, static fields, capacity, bytes, lengths."""
  if cache_lib.is_model_cache(cache):
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


def _json(meta: dict, key: str, fail: _Fail, default: Optional[str] = None):
  raw = meta.get(key, default)
  if not isinstance(raw, str):
    fail(f"metadata {key!r}", "is missing")
  try:
    return json.loads(raw)
  except (ValueError, RecursionError) as e:
    fail(f"metadata {key!r}", f"is not valid JSON ({type(e).__name__}: {str(e)[:200]})")


def inspect(path: str) -> dict:
  """The metadata of a saved cache without loading its arrays.

  Returns:
    {"format", "fingerprint", "summary", "user"}.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a well-formed saved cache (names the file and the field).
  """
  meta = st_io.read_metadata(path)
  fail = _Fail(str(path))
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: not a saved kvjax cache (format={str(meta.get('format'))[:80]!r}, "
                     f"expected {FORMAT!r})")
  fp = meta.get("fingerprint")
  if not isinstance(fp, str) or not fp:
    fail("metadata 'fingerprint'", "is missing")
  summ, user = _json(meta, "summary", fail), _json(meta, "user", fail, "{}")
  if not isinstance(summ, dict) or not isinstance(user, dict):
    fail("metadata 'summary'/'user'", "must be JSON objects")
  return {"format": FORMAT, "fingerprint": fp, "summary": summ, "user": user}


def load(path: str, *, fingerprint: Optional[str] = None,
         expect: Optional[Mapping[str, int]] = None) -> tuple[Any, dict]:
  """Reads a cache written by `save`; returns (cache, info) with info as in `inspect`.

  Every field is validated before any array reaches the device (module docstring); nothing
  the file names is imported or called.

  Args:
    path: the file.
    fingerprint: if given, the model-config fingerprint the cache must belong to; a
      mismatch raises ValueError naming both (models.load_cache also names the fields).
    expect: sizes the cache must have, checked in every layer cache that has them:
      {"num_layers": ..., "H": kv heads, "D": head_dim, "Dv": v head_dim} (any subset;
      "num_layers" also requires a ModelCache).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a valid saved cache, or does not match `fingerprint` /
      `expect`; the message names the file and the field.
  """
  info = inspect(path)
  if fingerprint is not None and info["fingerprint"] != fingerprint:
    raise ValueError(f"{path}: the cache was saved for model config {info['fingerprint']} "
                     f"but this model's config is {fingerprint}")
  fail = _Fail(str(path))
  tree = _json(st_io.read_metadata(path), "tree", fail)
  return _decode(tree, st_io.read_safetensors(path), fail, dict(expect or {})), info
