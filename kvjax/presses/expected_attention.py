"""ExpectedAttention: score keys by the attention future queries are expected to pay them
(Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention
from Future Queries Distribution", arXiv:2510.00636; kvpress's ExpectedAttentionPress).

1. Mean mu and covariance Sigma of the pre-RoPE queries of every prompt position from
   `n_sink` on (the paper's and kvpress's estimate from the prompt's hidden states; the
   forward reports them as moment sums, `Observe(query_moments=n_sink)`, so a chunked
   prefill gives the same statistics).
2. Average RoPE rotation R over the next `n_future_positions` positions; apply it:
   mu <- R mu, Sigma <- R Sigma R^T.
3. For a Gaussian query, E[exp(q.k / sqrt(d))] = exp(k.mu / sqrt(d) + k^T Sigma k / (2 d));
   softmax over the non-sink slots of each query head, mean over the kv group.
4. Rescale by the value norm: (score + epsilon) * ||v||.
The first `n_sink` slots are protected.

Where the moments are not observed (decode-time compression, whose DecodingPress keeps
only the last queries; model families that report only `Observe.queries`), the statistics
come from the last `query_window` queries, de-rotated to pre-RoPE with
`kvjax.rope.rerotate`. kvpress computes mu from the projection of the mean hidden state,
so a query bias (Qwen2) is left out of its mean; here it is part of the query, as
attention sees it. Needs the model's RoPE config (compress_model passes config.rope);
rope_type="dynamic" is not supported (its rotation depends on the sequence length).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import rope as rope_lib
from kvjax.observation import Observe
from kvjax.presses import base, registry


def average_rope_matrix(rope: rope_lib.RopeConfig, start, n_future: int, head_dim: int):
  """[B, D, D] mean over positions start .. start + n_future - 1 of the RoPE rotation."""
  pos = start[:, None] + jnp.arange(n_future, dtype=jnp.int32)[None, :]
  cos, sin = rope_lib.cos_sin(rope, pos)  # [B, F, rd]
  c, s = jnp.mean(cos, axis=1), jnp.mean(sin, axis=1)
  b, rd = c.shape
  h = rd // 2
  rest = head_dim - rd
  c_full = jnp.concatenate([c, jnp.ones((b, rest), c.dtype)], axis=-1)
  s_full = jnp.concatenate([s, jnp.zeros((b, rest), s.dtype)], axis=-1)
  p = jnp.zeros((head_dim, head_dim), jnp.float32)
  i = jnp.arange(h)
  p = p.at[i, i + h].set(-1.0).at[i + h, i].set(1.0)  # rotate_half as a matrix
  eye = jnp.eye(head_dim, dtype=jnp.float32)
  return c_full[:, :, None] * eye + s_full[:, :, None] * p


@registry.register("expected_attention", query_agnostic=True, needs=("queries", "rope"))
@dataclasses.dataclass(frozen=True)
class ExpectedAttentionPress(base.ScorerPress):
  """Expected attention of future queries (kvpress defaults).

  Attributes:
    n_future_positions: future positions the RoPE rotation is averaged over. 512.
    n_sink: initial slots kept and excluded from statistics. 4.
    use_covariance: include the query covariance term. True.
    use_vnorm: multiply by ||v||. True.
    epsilon: added to scores before the value-norm rescale. 0.
    query_window: without the prompt's moments (decode time), the last queries the
      statistics come from. 128.
  """

  n_future_positions: int = 512
  n_sink: int = 4
  use_covariance: bool = True
  use_vnorm: bool = True
  epsilon: float = 0.0
  query_window: int = 128

  def __post_init__(self):
    super().__post_init__()
    base.check_nonneg_int("n_future_positions", self.n_future_positions, 1)
    base.check_nonneg_int("n_sink", self.n_sink)
    base.check_nonneg_int("query_window", self.query_window, 1)

  @property
  def observe(self) -> Observe:
    return Observe(queries=self.query_window, query_moments=self.n_sink)

  def protected(self):
    return self.n_sink, self.protect_recent

  def query_statistics(self, obs, next_position, rope):
    """mu [B, Hq, D], cov [B, Hq, D, D] | None of pre-RoPE queries, RoPE-averaged: from the
    prompt's moment sums when obs has them, else from the last `query_window` queries."""
    if obs.get("query_sum") is not None:
      n = jnp.maximum(obs["query_count"].astype(jnp.float32), 1.0)[:, None, None]
      mu = obs["query_sum"].astype(jnp.float32) / n
      cov = None
      if self.use_covariance:
        cov = (obs["query_outer"].astype(jnp.float32) / n[..., None]
               - mu[..., :, None] * mu[..., None, :])
      return self._rotate(mu, cov, next_position, rope)
    queries = obs["queries"]
    w = self.query_window
    q = queries[:, :, -w:].astype(jnp.float32)
    b, hq, _, d = q.shape
    qpos = next_position[:, None] - w + jnp.arange(w, dtype=jnp.int32)[None, :]  # [B, W]
    present = jnp.any(q != 0, axis=(1, 3))  # zero rows are padding of short prompts
    valid = (present & (qpos >= self.n_sink)).astype(jnp.float32)[:, None, :, None]
    qpos_b = jnp.broadcast_to(qpos[:, None, :], (b, hq, w))
    q_pre = rope_lib.rerotate(q, qpos_b, jnp.zeros_like(qpos_b), rope)
    n = jnp.maximum(jnp.sum(valid, axis=2), 1.0)  # [B, 1, 1]
    mu = jnp.sum(q_pre * valid, axis=2) / n
    cov = None
    if self.use_covariance:
      centered = (q_pre - mu[:, :, None]) * valid
      cov = jnp.einsum("bhwi,bhwj->bhij", centered, centered) / n[..., None]
    return self._rotate(mu, cov, next_position, rope)

  def _rotate(self, mu, cov, next_position, rope):
    """mu <- R mu, cov <- R cov R^T with R the RoPE rotation averaged over the next
    n_future_positions positions."""
    a = average_rope_matrix(rope, next_position, self.n_future_positions, mu.shape[-1])
    if cov is not None:
      cov = jnp.einsum("bij,bhjk,blk->bhil", a, cov, a)
    return jnp.einsum("bij,bhj->bhi", a, mu), cov

  def score(self, cache, obs, ctx):
    if ctx.rope is None:
      raise ValueError("ExpectedAttentionPress needs the model's RoPE config: pass "
                       "rope=config.rope, or use compress_model(..., config)")
    k = cache.k.astype(jnp.float32)
    b, hkv, s, d = k.shape
    mu, cov = self.query_statistics(obs, base.next_positions(cache, obs), ctx.rope)
    g = mu.shape[1] // hkv
    mu = mu.reshape(b, hkv, g, d)
    logits = jnp.einsum("bhsd,bhgd->bhgs", k, mu) / jnp.sqrt(d)
    if cov is not None:
      cov = cov.reshape(b, hkv, g, d, d)
      kc = jnp.einsum("bhsi,bhgij->bhgsj", k, cov)
      logits = logits + jnp.einsum("bhgsj,bhsj->bhgs", kc, k) / d / 2
    slot = jnp.arange(s, dtype=jnp.int32)
    scored = base.valid_slots(cache) & (slot >= self.n_sink)
    logits = jnp.where(scored[:, :, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1, where=scored[:, :, None])
    probs = jnp.where(scored[:, :, None], probs, 0.0)
    scores = jnp.mean(probs, axis=2)
    if self.use_vnorm:
      vn = jnp.linalg.norm(cache.v.astype(jnp.float32), axis=-1)
      scores = (scores + self.epsilon) * vn
    return scores
