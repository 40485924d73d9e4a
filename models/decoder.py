"""A decoder built from a repeating pattern of token mixers (the retrained families).

    x = embed(tokens)
    for each layer:  x += mixer(rms_norm(x));  x += swiglu(rms_norm(x))   (MLP optional)
    logits = rms_norm(x) @ W_out

A family is a config whose `pattern()` names its mixers in order, e.g. Gemma-3-like local /
global attention `(sliding,)*5 + (global,)`, Griffin `(rglru, rglru, local)`, CLA
`(own-KV attention, reuse-KV attention)`. The layers are `num_layers // len(pattern)`
repeats of the pattern (plus the first `num_layers % len(pattern)` mixers once more). Each
pattern slot's parameters are stacked over repeats ([R, ...]) and one `lax.scan` runs the
whole group, so compile time stays flat in depth while layers differ in kind and cache.

A mixer is a frozen dataclass (static, hashable) with
    init(rand, config) -> {name: array}           one layer's parameters (rand: Draws)
    init_cache(config, batch, capacity, dtype)    one layer's cache (or None: no cache)
    __call__(p, x, positions, cache, shared, ctx) -> (y, cache', shared')
`cache` is None in the cache-free forward (training): the mixer runs its parallel form.
`shared` is threaded through the mixers of one pattern repeat (CLA passes its KV).

Caches: `ModelCache.segments` holds one stacked segment per (group, pattern slot with a
cache), in that order, each stacked over the group's repeats; `segment_sizes` are the
repeat counts and `segment_periods` the number of cache slots of each group, so
`cache.layers()` lists the layers that hold a cache in depth order (kvjax's scan-group
layout). Presses (`kvjax.presses`) compress the dense-KV layers (global attention, CLA
owners); window rings, recurrent states and latent caches are left as they are.

Inference: `prefill` / `decode` follow `models.api` (the `kvjax.generate` protocol).
Rows are packed to right padding at the boundary (valid tokens first, order kept) because
convolutions need contiguous inputs; logits are unpacked back. Padding never touches a cache.

Shapes: B batch, T tokens, H hidden, F mlp, V vocab, R repeats of the pattern.

One file on purpose (about 630 lines): the retrained families share this decoder's layer
scan, packing and cache plumbing; their mixers live in their own files.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import cache as cache_lib
from kvjax import checks
from kvjax.observation import Observe
from kvjax.presses import base as press_base
from models import protocol
from models import transformer as tfm

Array = jax.Array
DTYPES = ("float32", "bfloat16", "float16")


def require_int(name, value, lo=1):
  """Raises ValueError unless value is an int >= lo (the message names field and value)."""
  checks.require_int(name, value, lo)


def require_choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name}={value!r}; allowed: {tuple(allowed)}")


class Draws:
  """Hands out parameter initialisations sliced from two pre-drawn buffers.

  Every random op costs compile time (threefry is inlined per call), so a model's whole
  init draws one standard-normal and one uniform [0, 1) buffer and slices them. A pass with
  no buffers only counts how much each needs (`n_normal`, `n_uniform`) and returns zeros.
  """

  def __init__(self, normal_buf=None, uniform_buf=None):
    self._nb, self._ub = normal_buf, uniform_buf
    self.n_normal = 0
    self.n_uniform = 0

  def _take(self, buf, start, shape):
    size = int(np.prod(shape))
    if buf is None:
      return jnp.zeros(shape, jnp.float32), size
    return buf[start:start + size].reshape(shape), size

  def normal(self, shape, dtype, std):
    x, n = self._take(self._nb, self.n_normal, shape)
    self.n_normal += n
    return (x * std).astype(dtype)

  def uniform(self, shape, lo=0.0, hi=1.0):
    """float32 U[lo, hi)."""
    x, n = self._take(self._ub, self.n_uniform, shape)
    self.n_uniform += n
    return lo + (hi - lo) * x


class Ctx(NamedTuple):
  """What a mixer may read besides its parameters (static)."""
  config: Any
  backend: str
  cached: bool  # True when running against a cache (prefill/decode)
  observe: Observe = Observe()  # press observations a dense-KV layer should report


class Mixer:
  """Base of the static mixer descriptions (subclasses are frozen dataclasses)."""

  has_cache = False      # holds a per-layer cache
  bounded_by_capacity = False  # its cache grows with the sequence up to `capacity`

  def init(self, rand: "Draws", config) -> dict:
    raise NotImplementedError

  def init_cache(self, config, batch: int, capacity: int, dtype):
    return None

  def __call__(self, p, x, positions, cache, shared, ctx: Ctx):
    raise NotImplementedError

  def observed(self, p, x, positions, cache, shared, ctx: Ctx):
    """__call__ plus this layer's press observations (a dict; {} unless it has any)."""
    y, cache, shared = self(p, x, positions, cache, shared, ctx)
    return y, cache, shared, {}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Fields every family shares. Subclasses add theirs and implement `pattern()`.

  Attributes:
    vocab_size, hidden_size, num_layers: sizes.
    intermediate_size: SwiGLU MLP width after every mixer; 0 = no MLP (pure Mamba-2).
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: LM head = embedding^T.
    dtype: parameter dtype.
    init_std: std of the normal init of projections and embeddings.
    remat: rematerialise each pattern repeat in the cache-free forward (training memory).
  """

  vocab_size: int = 260
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 4
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  dtype: str = "float32"
  init_std: float = 0.02
  remat: bool = False

  def __post_init__(self):
    self.validate()

  def validate(self):
    for name in ("vocab_size", "hidden_size", "num_layers"):
      require_int(name, getattr(self, name))
    require_int("intermediate_size", self.intermediate_size, lo=0)
    require_choice("dtype", self.dtype, DTYPES)
    if not self.rms_norm_eps > 0:
      raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r}; must be > 0")

  def pattern(self) -> tuple:
    raise NotImplementedError

  def groups(self) -> list:
    """[(mixers, repeats)]: the pattern repeated, then its first num_layers % P mixers."""
    pat = tuple(self.pattern())
    reps, rem = divmod(self.num_layers, len(pat))
    out = []
    if reps:
      out.append((pat, reps))
    if rem:
      out.append((pat[:rem], 1))
    return out

  def layer_mixers(self) -> list:
    """Mixer of each layer in depth order."""
    out = []
    for mixers, reps in self.groups():
      out += list(mixers) * reps
    return out

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


# --- parameters -----------------------------------------------------------------------------
def _to_nnx(tree):
  if isinstance(tree, dict):
    return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
  return nnx.Param(tree)


def _values(node):
  if isinstance(node, nnx.Variable):
    return node[...]
  return {k: _values(v) for k, v in node.items()}


def _layer_init(mixer, rand, config):
  dt = jnp.dtype(config.dtype)
  h, f = config.hidden_size, config.intermediate_size
  p = {"mixer_norm": jnp.ones((h,), dt), "mixer": mixer.init(rand, config)}
  if f:
    s = config.init_std
    p.update(mlp_norm=jnp.ones((h,), dt), w_gate=rand.normal((h, f), dt, s),
             w_up=rand.normal((h, f), dt, s), w_down=rand.normal((f, h), dt, s))
  return p


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config, key):
  """All parameters as a nested dict: one compiled init with two random ops."""
  c = config
  dt = jnp.dtype(c.dtype)
  slots = [(m, reps) for mixers, reps in c.groups() for m in mixers]
  counts = []
  for m, _ in slots:  # counting pass (traced, then dead code)
    probe = Draws()
    _layer_init(m, probe, c)
    counts.append((max(probe.n_normal, 1), max(probe.n_uniform, 1)))
  head = 0 if c.tie_word_embeddings else c.hidden_size * c.vocab_size
  n_norm = c.vocab_size * c.hidden_size + head + sum(r * n for (_, r), (n, _) in zip(slots, counts))
  n_unif = sum(r * u for (_, r), (_, u) in zip(slots, counts))
  k_n, k_u = jax.random.split(key)
  top = Draws(jax.random.normal(k_n, (n_norm,), jnp.float32),
              jax.random.uniform(k_u, (n_unif,), jnp.float32))
  out = {"embed": top.normal((c.vocab_size, c.hidden_size), dt, c.init_std),
         "final_norm": jnp.ones((c.hidden_size,), dt), "groups": []}
  if not c.tie_word_embeddings:
    out["lm_head"] = top.normal((c.hidden_size, c.vocab_size), dt, c.init_std)
  stacked = []
  for (m, reps), (nn_, nu) in zip(slots, counts):
    nb = top.normal((reps, nn_), jnp.float32, 1.0)
    ub = top.uniform((reps, nu))
    stacked.append(jax.vmap(lambda a, b, m=m: _layer_init(m, Draws(a, b), c))(nb, ub))
  it = iter(stacked)
  for mixers, _ in c.groups():
    out["groups"].append([next(it) for _ in mixers])
  return out


def swiglu(p, x):
  g = jnp.einsum("bth,hf->btf", x, p["w_gate"])
  u = jnp.einsum("bth,hf->btf", x, p["w_up"])
  return jnp.einsum("btf,fh->bth", jax.nn.silu(g) * u, p["w_down"])


class Decoder(nnx.Module):
  """The decoder for every pattern family. `model(tokens)` -> logits [B, T, V] float32."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, DecoderConfig):
      raise ValueError(f"config must be a DecoderConfig subclass; got {type(config).__name__}")
    self.config = config
    params = _init_params(config, rngs.params())
    self.embed = nnx.Param(params["embed"])
    self.final_norm = nnx.Param(params["final_norm"])
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Param(params["lm_head"])
    self.groups = nnx.List([nnx.List([_to_nnx(slot) for slot in group])
                            for group in params["groups"]])

  def __call__(self, tokens: Array, *, attention_mask: Optional[Array] = None,
               positions: Optional[Array] = None) -> Array:
    """Cache-free forward (the parallel forms): tokens int [B, T] -> logits [B, T, V] f32.

    attention_mask [B, T] (1 = token) gives real tokens positions 0, 1, ...; padding is
    allowed anywhere (rows are packed to valid-first for the convolutions, then unpacked).
    """
    tokens = tfm.check_tokens(tokens, self.config)
    if positions is None and attention_mask is None:
      return forward(self, tokens, tfm.positions_from_mask(tokens), None)[0]
    if positions is None:
      positions = tfm.positions_from_mask(tokens, attention_mask)
    return _forward_packed(self, tokens, positions, None, backend="auto", logits_mode="all")[0]

  # kvjax.generate protocol
  def prefill(self, tokens, **kw):
    return prefill(self, tokens, **kw)

  def decode(self, tokens, cache, **kw):
    return decode(self, tokens, cache, **kw)

  def init_cache(self, batch: int, capacity: int, *, dtype=None) -> cache_lib.ModelCache:
    return init_cache(self.config, batch, capacity, dtype=dtype)


def forward(model: Decoder, tokens, positions, cache: Optional[cache_lib.ModelCache], *,
            backend: str = "auto", last_only: bool = False, observe: Optional[Observe] = None,
            taps: bool = False):
  """Runs all layers. Returns (logits [B, T|1, V] f32, new ModelCache | None, extras).

  With a cache, rows must be right-padded (valid tokens first); last_only takes each row's
  last valid token. `extras` holds what was asked for:
    "obs": with `observe`, one press-observation dict per cache layer, in depth order
      (non-empty only for dense-KV layers; see `kvjax.observation`).
    "taps": with `taps`, (mixer inputs, mixer outputs), each [L, B, T, H] in depth order:
      the normalised residual each layer's mixer reads and what it adds back (the
      per-layer signals attention transfer matches).
  """
  c = model.config
  x = jnp.take(model.embed[...], tokens, axis=0)
  ctx = Ctx(c, backend, cache is not None, observe or Observe())
  seg_iter = iter(cache.segments) if cache is not None else None
  new_segments, obs_slots, tap_slots = [], [], []
  for gi, (mixers, reps) in enumerate(c.groups()):
    params = [_values(model.groups[gi][j]) for j in range(len(mixers))]
    caches = [next(seg_iter) if (cache is not None and m.has_cache) else None for m in mixers]

    def body(x, xs, mixers=mixers):
      ps, cs = xs
      shared, outs, obs, tp = None, [], [], []
      for m, p, cl in zip(mixers, ps, cs):
        h = tfm.rms_norm(x, p["mixer_norm"], c.rms_norm_eps)
        y, cl, shared, o = m.observed(p["mixer"], h, positions, cl, shared, ctx)
        x = x + y.astype(x.dtype)
        if c.intermediate_size:
          x = x + swiglu(p, tfm.rms_norm(x, p["mlp_norm"], c.rms_norm_eps)).astype(x.dtype)
        outs.append(cl)
        obs.append(o if observe is not None and m.has_cache else None)
        tp.append((h, y) if taps else None)
      return x, (outs, obs, tp)

    if c.remat and cache is None:
      body = jax.checkpoint(body)
    x, (outs, obs, tp) = jax.lax.scan(body, x, (params, caches))
    if cache is not None:
      new_segments += [o for o, m in zip(outs, mixers) if m.has_cache]
    obs_slots.append((reps, [o for o, m in zip(obs, mixers) if m.has_cache]))
    tap_slots.append((reps, tp))
  extras = {}
  if observe is not None:
    extras["obs"] = protocol.depth_order(obs_slots)
  if taps:
    layers = protocol.depth_order(tap_slots)
    extras["taps"] = tuple(jnp.stack([t[i] for t in layers]) for i in (0, 1))
  if last_only:
    x = protocol.last_token(x, positions)
  x = tfm.rms_norm(x, model.final_norm[...], c.rms_norm_eps)
  w = model.embed[...].T if c.tie_word_embeddings else model.lm_head[...]
  logits = jnp.einsum("bth,hv->btv", x, w, preferred_element_type=jnp.float32)
  new_cache = None if cache is None else protocol.advance(cache, new_segments, positions)
  return logits, new_cache, extras


def apply_mixers(model: Decoder, inputs, positions, *, backend: str = "auto"):
  """Each layer's mixer on given inputs, cache-free: the layer-local half of attention
  transfer (the student reads the teacher's per-layer mixer inputs).

  Args:
    model: a Decoder whose mixers need no `shared` state (no CLA "reuse" layers).
    inputs: [L, B, T, H] mixer inputs in depth order (e.g. a teacher's `taps`).
    positions: [B, T] int positions (-1 = padding).

  Returns:
    [L, B, T, H] mixer outputs in depth order.
  """
  c = model.config
  n = c.num_layers
  if inputs.shape[0] != n:
    raise ValueError(f"inputs hold {inputs.shape[0]} layers; the model has num_layers={n}")
  ctx = Ctx(c, backend, False)
  outs, a = [None] * n, 0
  for gi, (mixers, reps) in enumerate(c.groups()):
    period = len(mixers)
    for j, m in enumerate(mixers):
      idx = [a + r * period + j for r in range(reps)]
      p = _values(model.groups[gi][j])["mixer"]
      y = jax.vmap(lambda pp, h, m=m: m(pp, h, positions, None, None, ctx)[0])(
          p, inputs[jnp.asarray(idx)])
      for r, i in enumerate(idx):
        outs[i] = y[r]
    a += period * reps
  return jnp.stack(outs)


# --- inference API ---------------------------------------------------------------------------
def init_cache(config: DecoderConfig, batch: int, capacity: int, *,
               dtype=None) -> cache_lib.ModelCache:
  """An empty ModelCache: one stacked segment per (group, slot with a cache).

  `capacity` bounds the caches that grow with the sequence (global attention, CLA, MLA);
  window and recurrent layers have fixed sizes whatever it is.
  """
  require_int("batch", batch)
  require_int("capacity", capacity)
  dt = checks.float_dtype("dtype", config.dtype if dtype is None else dtype)
  segs, sizes, periods = [], [], []
  for mixers, reps in config.groups():
    period = sum(m.has_cache for m in mixers)  # kvjax's layout: entry j of a group of
    for m in mixers:                            # period p stacks cache layers j, j+p, ...
      if m.has_cache:
        one = m.init_cache(config, batch, int(capacity), dt)
        segs.append(jax.tree.map(lambda z, r=reps: jnp.broadcast_to(z, (r,) + z.shape), one))
        sizes.append(reps)
        periods.append(period)
  return cache_lib.ModelCache(segments=tuple(segs), next_position=jnp.zeros((batch,), jnp.int32),
                              segment_sizes=tuple(sizes),
                              segment_periods=tuple(periods) if any(
                                  q != 1 for q in periods) else ())


def pack_right(tokens, positions):
  """Moves each row's valid tokens to the front (stable). Returns tokens, positions, order."""
  order = jnp.argsort(positions < 0, axis=-1, stable=True)
  return (jnp.take_along_axis(tokens, order, axis=-1),
          jnp.take_along_axis(positions, order, axis=-1), order)


def _forward_packed(model, tokens, positions, cache, *, backend, logits_mode, observe=None):
  """forward() on rows packed valid-first; "all" logits come back in the caller's order.

  Returns (logits, cache, per-cache-layer observations or None).
  """
  tok_p, pos_p, order = pack_right(tokens, positions)
  logits, cache, extras = forward(model, tok_p, pos_p, cache, backend=backend,
                                  last_only=logits_mode == "last", observe=observe)
  if logits_mode == "all":  # unpack to the caller's token order
    bi = jnp.arange(tokens.shape[0])[:, None]
    logits = jnp.zeros_like(logits).at[bi, order].set(logits)
  return logits, cache, extras.get("obs")


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "logits_mode", "observe"),
                   donate_argnames=("cache",))
def _run(graphdef, state, tokens, positions, cache, *, backend, logits_mode, observe=None):
  model = nnx.merge(graphdef, state)
  return _forward_packed(model, tokens, positions, cache, backend=backend,
                         logits_mode=logits_mode, observe=observe)


def prefill_cache_shape(model: Decoder, length: int, batch: int = 1,
                        capacity: Optional[int] = None):
  """The cache (as ShapeDtypeStructs) that prefilling `length` tokens returns.

  Abstract evaluation of the same computation `prefill` runs: exact shapes, no FLOPs.
  """
  cache = jax.eval_shape(lambda: init_cache(model.config, batch, capacity or length))
  graphdef, state = nnx.split(model)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

  def run(s, t, c):
    return _forward_packed(nnx.merge(graphdef, s), t, jnp.broadcast_to(
        jnp.arange(length, dtype=jnp.int32), t.shape), c, backend="xla", logits_mode="last")

  return jax.eval_shape(run, state, tokens, cache)[1]


class PressConfig(NamedTuple):
  """What `press.compress_model` reads of a model config, for the dense-KV layers only."""
  num_layers: int
  rope: Any


def _press_layers(model, press, cache, prompt_length=None) -> list:
  """The dense-KV layers `press` will compress; validates it against each (before any FLOP)."""
  if not callable(getattr(press, "compress_model", None)):
    raise ValueError(f"press={press!r} is not a kvjax press: it has no compress_model(cache, "
                     "observations, config) (see kvjax.presses)")
  idx = list(cache.pressable_layers())
  if not idx:
    raise ValueError(
        f"press={type(press).__name__}: {type(model.config).__name__} has no dense-KV layer to "
        f"compress (its caches: {sorted(set(cache.layer_kinds))}). Presses act on the "
        "DenseKVCache of global-attention layers (local/global and hybrid models with global "
        "attention, CLA); window rings, recurrent states and MLA latents are fixed-size or "
        "not per-head KV, so a press has nothing to do here")
  validate = getattr(press, "validate", None)
  if validate is not None:
    structs = cache.layer_structs()
    for i in idx:
      validate(capacity=structs[i].capacity, prompt_length=prompt_length, num_layers=len(idx))
  return idx


def apply_press(model: Decoder, press, cache: cache_lib.ModelCache, obs=None, *, room: int = 0,
                prompt_length: Optional[int] = None) -> cache_lib.ModelCache:
  """Compresses the dense-KV layers of a Decoder cache with a kvjax press.

  The dense layers are gathered (in depth order) into a ModelCache of their own, pressed
  with `press.compress_model` (layer index / count and per-layer budgets such as PyramidKV
  refer to the dense layers only), and put back; every other layer is left as it is.
  Layers of one scan segment must share a shape, so a per-layer budget pads each segment's
  layers to the largest budget among them (empty slots, position -1).

  Args:
    model: the Decoder that built `cache`.
    press: a kvjax press (e.g. `kvjax.presses.SnapKVPress(compression_ratio=0.5)`).
    cache: its ModelCache after the prompt.
    obs: per-cache-layer observations from the forward pass (`forward(observe=...)`).
    room: empty slots per dense layer after compression, for decode.
    prompt_length: tokens just run (static), for the presses' window checks.
  """
  idx = _press_layers(model, press, cache, prompt_length)
  fn = press.compress_model
  layers = cache.layers()
  mixers = [m for m in model.config.layer_mixers() if m.has_cache]
  sub = cache_lib.ModelCache.from_layers([layers[i] for i in idx], cache.next_position)
  obs = obs if obs is not None else [{}] * len(layers)
  sub = fn(sub, [obs[i] for i in idx], PressConfig(len(idx), getattr(mixers[idx[0]], "rope",
                                                                       None)),
           room=room, prompt_length=prompt_length)
  for i, layer in zip(idx, sub.layers()):
    layers[i] = layer
  segments = []
  for entry in cache.entry_layers():
    group = [layers[i] for i in entry]
    caps = [c.capacity for c in group if cache_lib.caps(c).pressable]
    if caps and len(set(caps)) > 1:
      group = [press_base.pad_room(c, max(caps) - c.capacity) for c in group]
    segments.append(cache_lib.stack(group))
  return cache.replace(segments=tuple(segments))


def decode(model: Decoder, tokens, cache: cache_lib.ModelCache, *, attention_mask=None,
           logits: str = "all", backend: str = "auto", check_capacity: bool = True,
           press=None, decode_room: int = 0):
  """Appends T' >= 1 tokens per row and returns (logits, cache); the cache is donated.

  T' == 1 runs the recurrent forms; longer chunks the chunkwise-parallel forms.
  attention_mask [B, T'] marks padding inside the chunk (rows that add fewer tokens).
  With `press`, the dense-KV layers are compressed after the step (this step's
  observations; see `apply_press`) and get `decode_room` free slots each.
  """
  tokens = checks.token_ids(tokens, model.config.vocab_size)
  cache_lib.require_model_cache(cache)
  checks.live_cache(cache)
  if attention_mask is not None:
    checks.attention_mask(attention_mask, tokens.shape)
  protocol.check_logits(logits)
  protocol.check_decode_room(decode_room)
  protocol.check_batch(tokens, cache)
  positions = tfm.positions_from_mask(tokens, attention_mask, start=cache.next_position)
  if check_capacity:
    protocol.check_room(cache, positions)
  observe = None
  if press is not None:
    _press_layers(model, press, cache)
    observe = getattr(press, "observe", None) or Observe()
  graphdef, state = nnx.split(model)
  out, cache, obs = _run(graphdef, state, tokens, positions, cache, backend=backend,
                         logits_mode=logits, observe=observe)
  if press is not None:
    cache = apply_press(model, press, cache, obs, room=decode_room)
  return out, cache


def prefill(model: Decoder, tokens, *, capacity: Optional[int] = None, attention_mask=None,
            prompt_lengths=None, cache: Optional[cache_lib.ModelCache] = None, cache_dtype=None,
            press=None, decode_room: Optional[int] = None, logits: str = "all",
            backend: str = "auto", chunk_size: Optional[int] = None):
  """Runs the prompt and returns (logits, cache).

  Args:
    model: a Decoder.
    tokens: int [B, T] prompts (padding anywhere, marked by attention_mask).
    capacity: slots of the caches that grow (global attention, CLA, MLA); default T.
      Window and recurrent caches have fixed sizes.
    attention_mask: [B, T] 1 = token, 0 = padding (left padding supported).
    prompt_lengths: [B] valid tokens per row when rows are right-padded.
    cache: an existing ModelCache to continue instead of building one.
    cache_dtype: dtype of KV / latent / conv caches (recurrent states stay float32).
    press: a kvjax press applied to the dense-KV layers after the prompt (`apply_press`);
      a model without dense-KV layers raises ValueError. As in `models.prefill`, with an
      int `capacity` and no `decode_room` the prompt is cached in T slots and the press
      leaves capacity - T free slots; `decode_room=N` sets the room explicitly.
    decode_room: empty slots per dense layer after the press (only with press).
    logits: "all" -> [B, T, V]; "last" -> [B, 1, V] at each row's last token.
    backend: attention backend ("auto" | "xla" | "pallas").
    chunk_size: run the prompt in chunks of this many tokens (bounded activation memory);
      the result equals the one-shot prefill. Not combined with a press.
  """
  tokens = checks.token_ids(tokens, model.config.vocab_size)
  protocol.check_logits(logits)
  protocol.check_decode_room(decode_room)
  b, t = tokens.shape
  if attention_mask is not None:
    checks.attention_mask(attention_mask, (b, t))
  if prompt_lengths is not None:
    checks.prompt_lengths(prompt_lengths, b, t)
  if capacity is not None:
    require_int("capacity", capacity)
  if cache_dtype is not None:
    checks.float_dtype("cache_dtype", cache_dtype)
  if cache is not None:
    checks.live_cache(cache)
  if chunk_size is not None:
    require_int("chunk_size", chunk_size)
  if press is not None and chunk_size is not None and chunk_size < t:
    raise ValueError(f"chunk_size={chunk_size} with press={type(press).__name__}: "
                     f"{type(model.config).__name__} presses run once after a one-shot "
                     "prefill; pass chunk_size=None")
  capacity, room = protocol.press_room(press, cache, capacity, decode_room, t)
  attention_mask = protocol.prompt_mask(attention_mask, prompt_lengths, t)
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  attention_mask = jnp.asarray(attention_mask)
  if attention_mask.shape != (b, t):
    raise ValueError(f"attention_mask shape {attention_mask.shape}; expected {(b, t)}")
  if cache is None:
    cap = t if capacity is None else capacity
    require_int("capacity", cap)
    longest = int(np.asarray(attention_mask).astype(bool).sum(axis=-1).max())
    if cap < longest and any(m.bounded_by_capacity for m in model.config.layer_mixers()):
      raise ValueError(f"capacity={cap} is smaller than the prompt ({longest} tokens)")
    cache = init_cache(model.config, b, cap, dtype=cache_dtype)
  if press is not None:
    _press_layers(model, press, cache, t)  # fail before the prompt runs, not after it
    protocol.check_batch(tokens, cache)
    positions = tfm.positions_from_mask(tokens, attention_mask, start=cache.next_position)
    protocol.check_room(cache, positions)
    graphdef, state = nnx.split(model)
    observe = getattr(press, "observe", None) or Observe()
    out, cache, obs = _run(graphdef, state, tokens, positions, cache, backend=backend,
                           logits_mode=logits, observe=observe)
    return out, apply_press(model, press, cache, obs, room=room, prompt_length=t)
  if chunk_size is None:
    return decode(model, tokens, cache, attention_mask=attention_mask, logits=logits,
                  backend=backend)
  require_int("chunk_size", chunk_size)
  outs, last = [], None
  for s in range(0, t, chunk_size):
    m = attention_mask[:, s:s + chunk_size]
    lg, cache = decode(model, tokens[:, s:s + chunk_size], cache, attention_mask=m,
                       logits=logits, backend=backend)
    if logits == "all":
      outs.append(lg)
    else:  # a row whose chunk is all padding keeps its earlier last logit
      has = jnp.any(m > 0, axis=-1)[:, None, None]
      last = lg if last is None else jnp.where(has, lg, last)
  return (jnp.concatenate(outs, axis=1) if logits == "all" else last), cache
