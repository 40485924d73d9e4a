"""ExpectedAttention's query statistics as its paper and kvpress estimate them: mean and
covariance of the pre-RoPE queries of every prompt position from n_sink on, rotated by the
RoPE rotation averaged over the next n_future_positions positions.

The reference is a numpy transcription of kvpress's ExpectedAttentionPress
(get_query_statistics + score), fed the model's own queries of the whole prompt
(Observe(queries=T)) de-rotated with a numpy RoPE.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import models
from kvjax.observation import Observe
from kvjax.presses import ExpectedAttentionPress
from kvjax.presses import base
from tests.kvjax.presses import helpers

T, N_SINK, FUTURE = 40, 4, 16


def np_rope_cos_sin(theta, d, positions):
  inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  f = np.asarray(positions, np.float64)[..., None] * inv
  emb = np.concatenate([f, f], -1)
  return np.cos(emb), np.sin(emb)


def np_rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], -1)


def kvpress_scores(q_pre, keys, values, n_sink, n_future, theta):
  """kvpress's estimate, in numpy. q_pre [Hq, T, D] (one row), keys/values [Hkv, S, D];
  returns scores [Hkv, S - n_sink] of the non-sink slots."""
  hq, t, d = q_pre.shape
  hkv = keys.shape[0]
  q = q_pre[:, n_sink:]
  mu = q.mean(1)                                                   # [Hq, D]
  c = q - mu[:, None]
  cov = np.einsum("hti,htj->hij", c, c) / q.shape[1]
  cos, sin = np_rope_cos_sin(theta, d, np.arange(t, t + n_future))  # [F, D]
  eye = np.eye(d)
  p = np.zeros((d, d))
  p[d // 2:, :d // 2], p[:d // 2, d // 2:] = np.eye(d // 2), -np.eye(d // 2)
  r = (cos[:, None] * eye + sin[:, None] * p).mean(0)
  mu = mu @ r.T
  cov = r @ cov @ r.T
  k = np.repeat(keys[:, n_sink:], hq // hkv, axis=0)               # repeat_kv
  s = np.einsum("hd,hnd->hn", mu, k) / np.sqrt(d)
  s = s + np.einsum("hni,hij,hnj->hn", k, cov, k) / d / 2
  s = np.exp(s - s.max(-1, keepdims=True))
  s = s / s.sum(-1, keepdims=True)
  s = s.reshape(hkv, hq // hkv, -1).mean(1)
  return s * np.linalg.norm(values[:, n_sink:], axis=-1)


@pytest.fixture(scope="module")
def setup():
  model = helpers.tiny_model()
  tokens = jnp.asarray(np.random.default_rng(5).integers(1, 64, (2, T)), jnp.int32)
  # an 8-query window, shorter than the prompt: the statistics must still cover it all
  press = ExpectedAttentionPress(compression_ratio=0.5, n_sink=N_SINK,
                                 n_future_positions=FUTURE, query_window=8)
  _, cache, obs = models.prefill(model, tokens,
                                 observe=press.observe.merge(Observe(queries=T)))
  return model, tokens, press, cache, obs


def test_scores_match_kvpress_estimate(setup):
  model, _, press, cache, obs = setup
  cfg = model.config
  cos, sin = np_rope_cos_sin(cfg.rope.theta, cfg.head_dim, np.arange(T))
  for i, (layer, o) in enumerate(zip(cache.layers(), obs)):
    ctx = base.LayerContext(layer_idx=i, num_layers=cfg.num_layers, rope=cfg.rope)
    got = np.asarray(press.score(layer, dict(o), ctx))
    q_post = np.asarray(o["queries"], np.float64)[:, :, -T:]      # [B, Hq, T, D]
    q_pre = q_post * cos - np_rotate_half(q_post) * sin            # inverse rotation
    for b in range(2):
      want = kvpress_scores(q_pre[b], np.asarray(layer.k[b], np.float64),
                            np.asarray(layer.v[b], np.float64), N_SINK, FUTURE,
                            cfg.rope.theta)
      np.testing.assert_allclose(got[b, :, N_SINK:], want, rtol=2e-4, atol=1e-7)


def test_statistics_use_every_prompt_query_not_a_window(setup):
  """With a 4-query window the old estimate differs; the prompt's moments do not care."""
  model, _, press, cache, obs = setup
  cfg = model.config
  ctx = base.LayerContext(layer_idx=0, num_layers=cfg.num_layers, rope=cfg.rope)
  layer, o = cache.layers()[0], dict(obs[0])
  small = ExpectedAttentionPress(compression_ratio=0.5, n_sink=N_SINK,
                                 n_future_positions=FUTURE, query_window=4)
  np.testing.assert_allclose(np.asarray(small.score(layer, o, ctx)),
                             np.asarray(press.score(layer, o, ctx)), rtol=1e-6)
  window_only = {k: v for k, v in o.items() if not k.startswith("query_")}
  assert not np.allclose(np.asarray(small.score(layer, window_only, ctx)),
                         np.asarray(press.score(layer, o, ctx)), rtol=1e-3)


def test_chunked_prefill_gives_the_same_moments(setup):
  model, tokens, press, _, obs = setup
  _, _, chunked = models.prefill(model, tokens, observe=Observe(query_moments=N_SINK),
                                 chunk_size=16)
  for one, ch in zip(obs, chunked):
    np.testing.assert_allclose(np.asarray(ch["query_count"]), [T - N_SINK] * 2)
    for k in ("query_sum", "query_outer"):
      np.testing.assert_allclose(np.asarray(ch[k]), np.asarray(one[k]), rtol=1e-4, atol=1e-4)


def test_prefill_keeps_the_kvpress_top_slots(setup):
  model, tokens, press, cache, obs = setup
  cfg = model.config
  _, pressed = models.prefill(model, tokens, press=press)
  cos, sin = np_rope_cos_sin(cfg.rope.theta, cfg.head_dim, np.arange(T))
  for layer, full, o in zip(pressed.layers(), cache.layers(), obs):
    q_post = np.asarray(o["queries"], np.float64)[:, :, -T:]
    q_pre = q_post * cos - np_rotate_half(q_post) * sin
    for b in range(2):
      want = kvpress_scores(q_pre[b], np.asarray(full.k[b], np.float64),
                            np.asarray(full.v[b], np.float64), N_SINK, FUTURE, cfg.rope.theta)
      keep = T // 2 - N_SINK                                       # sinks are kept first
      for h in range(cfg.num_kv_heads):
        top = np.sort(np.argsort(-want[h], kind="stable")[:keep] + N_SINK)
        expect = list(range(N_SINK)) + top.tolist()
        got = np.asarray(layer.positions[b, h, :int(layer.lengths[b, h])]).tolist()
        assert got == expect
