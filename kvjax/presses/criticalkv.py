"""CriticalKV: value-aware selection from the output-perturbation view (Feng et al., 2025,
"Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective",
arXiv:2502.03805; kvpress's CriticalKVPress / CriticalAdaKVPress).

Evicting slot j perturbs the attention output by about a_j * ||W_o^h v_j||: its attention
weight times the norm of its value after the head's output projection. Attention alone
(SnapKV, ExpectedAttention, ...) ignores the second factor. CriticalKV wraps any
attention-score press and selects in two stages:

  1. the best `first_stage_ratio` of the row's budget by the inner press's score alone;
  2. the rest by (score + epsilon) * ||W_o^h v||_1, the L1 norm over the hidden size of the
     value projected by each query head's slice of the output projection, averaged over
     the query heads of the slot's kv group.

W_o is the layer's attention output projection, [Hq * D, H] (query head h owns rows
h*D .. (h+1)*D). kvjax never sees the model, so the press asks for it with
`Observe(o_proj=True)` and models.prefill / models.decode hand each layer's slice over as
obs["o_proj"] (models/press_inputs.py).

Head-wise budgets (CriticalAdaKV): `AdaKVPress(press=CriticalKVPress(...))`, registered as
"critical_adakv". Difference from kvpress's CriticalAdaKVPress: there the first stage is
sized from each head's adaptive budget; here from the uniform budget, then AdaKV spreads
the layer's total across heads by the two-stage scores.

Registered names: "criticalkv" wraps ExpectedAttention with use_vnorm=False (a
query-agnostic scorer, and the projected value norm replaces its plain value norm, as
kvpress advises), "critical_snapkv" wraps SnapKV, "critical_adakv" is AdaKV over
critical_snapkv.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.observation import Observe
from kvjax.presses import base, registry
from kvjax.presses.adakv import AdaKVPress
from kvjax.presses.expected_attention import ExpectedAttentionPress

_MAX = float(jnp.finfo(jnp.float32).max)


def projected_value_norm(v, o_proj):
  """[B, Hkv, S] float32: mean over each kv group's query heads h of ||v W_o^h||_1.

  Args:
    v: [B, Hkv, S, Dv] values.
    o_proj: [Hq * Dv, H] the layer's attention output projection.
  """
  b, hkv, s, dv = v.shape
  if o_proj.ndim != 2 or o_proj.shape[0] % (hkv * dv):
    raise ValueError(f"obs['o_proj'] has shape {tuple(o_proj.shape)}; expected "
                     f"[Hq * {dv}, hidden] with Hq a multiple of {hkv} kv heads")
  g = o_proj.shape[0] // (hkv * dv)
  w = o_proj.astype(jnp.float32).reshape(hkv, g, dv, -1)
  vf = v.astype(jnp.float32)

  def head(xs):  # one query head at a time: [B, S, H] is the largest intermediate
    kv, gi = xs
    vh = jnp.take(vf, kv, axis=1)                                # [B, S, Dv]
    return jnp.sum(jnp.abs(vh @ w[kv, gi]), axis=-1)             # [B, S]

  kv_idx = jnp.repeat(jnp.arange(hkv), g)
  g_idx = jnp.tile(jnp.arange(g), hkv)
  norms = jax.lax.map(head, (kv_idx, g_idx))                     # [Hq, B, S]
  return jnp.mean(norms.reshape(hkv, g, b, s), axis=1).transpose(1, 0, 2)


def _critical_factory(cls, compression_ratio, **options):
  """Registry factory of "criticalkv": ExpectedAttention without its own value norm."""
  inner = ExpectedAttentionPress(compression_ratio=compression_ratio, use_vnorm=False)
  return cls(press=inner, **options)


def _critical_adakv_factory(cls, compression_ratio, **options):
  del cls
  return AdaKVPress(press=CriticalKVPress(press=registry.make("snapkv", compression_ratio)),
                    **options)


@registry.register("criticalkv", query_agnostic=True,
                   needs=("queries", "rope", "o_proj"), factory=_critical_factory,
                   summary="CriticalKV two-stage value-aware selection over ExpectedAttention")
@registry.register("critical_snapkv", query_agnostic=True, needs=("o_proj",), wraps="snapkv",
                   summary="CriticalKV two-stage value-aware selection over SnapKV")
@dataclasses.dataclass(frozen=True)
class CriticalKVPress(base.ScorerPress):
  """Two-stage selection: attention first, then attention x projected value norm.

  Attributes:
    press: the attention-score press (a ScorerPress); its budget rule, protected slots and
      observations apply. The wrapper's compression_ratio / budget, when given, replace
      the inner press's (left unset, they mirror it).
    epsilon: added to the inner score before the value-norm rescale. 1e-4 (kvpress).
    first_stage_ratio: fraction of each row's budget chosen by attention alone. 0.5.
  """

  compression_ratio: Optional[float] = None
  press: base.ScorerPress = None
  epsilon: float = 1e-4
  first_stage_ratio: float = 0.5

  def __post_init__(self):
    if not isinstance(self.press, base.ScorerPress):
      raise ValueError(f"CriticalKVPress(press=...) needs a ScorerPress; got {self.press!r}")
    inner = self.press
    if self.compression_ratio is None and self.budget is None:
      object.__setattr__(self, "compression_ratio", inner.compression_ratio)
      object.__setattr__(self, "budget", inner.budget)
    else:   # the wrapper's budget wins (dataclasses.replace / with_budget on the wrapper)
      base.check_ratio("compression_ratio", self.compression_ratio or 0.0)
      inner = dataclasses.replace(inner, compression_ratio=self.compression_ratio or 0.0,
                                  budget=self.budget)
      object.__setattr__(self, "press", inner)
      object.__setattr__(self, "compression_ratio", inner.compression_ratio)
    super().__post_init__()
    if not 0 <= self.first_stage_ratio <= 1:
      raise ValueError(f"first_stage_ratio={self.first_stage_ratio}; must be in [0, 1]")
    if not self.epsilon >= 0:
      raise ValueError(f"epsilon={self.epsilon}; must be >= 0")

  @property
  def observe(self) -> Observe:
    return self.press.observe.merge(Observe(o_proj=True))

  @property
  def layer_invariant(self) -> bool:
    return self.press.layer_invariant

  def protected(self):
    return self.press.protected()

  def keep_table(self, capacity, ctx):
    return self.press.keep_table(capacity, ctx)

  def validate(self, *, capacity, prompt_length=None, num_layers=None):
    self.press.validate(capacity=capacity, prompt_length=prompt_length, num_layers=num_layers)

  def score(self, cache, obs, ctx):
    w = obs.get("o_proj")
    if w is None:
      raise ValueError("CriticalKVPress needs the layer's output projection (obs['o_proj'], "
                       "Observe(o_proj=True)); run it through models.prefill(press=...) or "
                       "prefill with observe=press.observe")
    s = cache.positions.shape[-1]
    inner = self.press.score(cache, obs, ctx).astype(jnp.float32)
    valid = base.valid_slots(cache)
    n_sink, n_recent = self.protected()
    tiers = base.protection_tiers(cache.lengths, s, n_sink, n_recent)
    order = base.rank_slots(inner, valid, tiers)
    rank = jnp.argsort(order, axis=-1)                       # rank of each slot
    keep = jnp.asarray(self.keep_table(s, ctx))[cache.lengths]
    first = (keep.astype(jnp.float32) * self.first_stage_ratio).astype(jnp.int32)
    in_first = valid & (rank < first[..., None])
    scores = (inner + self.epsilon) * projected_value_norm(cache.v, w)
    return jnp.where(in_first, _MAX, scores)


registry.register("critical_adakv", query_agnostic=False, needs=("colsum", "o_proj"),
                  factory=_critical_adakv_factory,
                  summary="AdaKV head-wise budgets over CriticalKV(SnapKV) (CriticalAdaKV)")(
                      AdaKVPress)
