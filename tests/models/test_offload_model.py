"""Host offload on the decoder: streamed layers vs the on-device cache, int8 swapping bound,
Quest decoding vs full attention and vs a reference that sees only the selected pages."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import offload
from kvjax.cache import ModelCache
from models import offload as model_offload
from models import transformer as tfm

# Layers 0 and 2 slide (ring caches), layer 1 is global: both cache kinds get streamed.
MIXED = models.ModelConfig(num_layers=3, sliding_window=6,
                           layer_types=("sliding_attention", "full_attention",
                                        "sliding_attention"))
LLAMA = models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2)
HOST = offload.host_memory_kind()


@functools.lru_cache(maxsize=None)
def _model(cfg):
  return models.Transformer(cfg, rngs=nnx.Rngs(0))


def _tokens(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 256, dtype=jnp.int32)


def test_streamed_cache_equals_device_cache_and_prefetches(monkeypatch):
  """Given a left-padded batch, when prefill + decode run with every layer's cache on the
  host (streamed in one layer ahead), then every logit equals the on-device run up to float32 rounding,
  the caches sit in host memory between steps and layer l+1 is fetched before l runs."""
  m = _model(MIXED)
  tok = _tokens(2, 14)
  mask = np.ones((2, 10), np.int32)
  mask[1, :3] = 0
  ref, dev = models.prefill(m, tok[:, :10], capacity=16, attention_mask=mask)
  out, host = models.prefill(m, tok[:, :10], capacity=16, attention_mask=mask,
                             offload=offload.OffloadSpec(prefetch=1))
  assert isinstance(host, offload.HostCache)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)   # see the decode steps below
  assert host.nbytes == dev.nbytes
  log = []
  real_in, real_step = offload.swap_in, model_offload._layer_step

  def spy_in(copy):
    log.append(("fetch", next(i for i, c in enumerate(host.layers) if c is copy)))
    return real_in(copy)

  def spy_step(params, i, *a, **kw):
    log.append(("step", int(i)))
    return real_step(params, i, *a, **kw)

  monkeypatch.setattr(offload.stream, "swap_in", spy_in)
  monkeypatch.setattr(model_offload, "_layer_step", spy_step)
  steps = [(10, 12), (12, 13), (13, 14)]         # a 2-token chunk, then single tokens
  for a, b in steps:
    ref, dev = models.decode(m, tok[:, a:b], dev)
    log.clear()
    out, host = models.decode(m, tok[:, a:b], host)
    assert log == [("fetch", 0), ("fetch", 1), ("step", 0), ("fetch", 2), ("step", 1),
                   ("step", 2)]
    # float32 rounding only: the on-device step reads its stacked cache in place while the
    # streamed step attends one fetched layer, so XLA may order the sums differently
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for layer in host.layers:
      assert {offload.memory_kind(x) for x in jax.tree.leaves(layer.tree)} == {HOST}
  np.testing.assert_array_equal(host.next_position, dev.next_position)
  for a, b in zip(host.to_model_cache().layers(), dev.layers()):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      if np.issubdtype(np.asarray(x).dtype, np.integer):
        np.testing.assert_array_equal(x, y)           # positions, lengths: exact
      else:                                           # K/V: from logits' float32 path
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_int8_stream_error_within_bound_and_decode_reads_the_dequantized_cache():
  """Given an int8-compressed host cache, then every key/value is within max|x| / 254 of the
  exact prefill's (per token vector), the host holds ~1/4 of the bytes, and a streamed
  decode step equals an on-device decode over the dequantized cache."""
  m = _model(LLAMA)
  tok = _tokens(2, 12, seed=2)
  _, dev = models.prefill(m, tok[:, :11], capacity=12, cache_dtype="float32")
  _, host = models.prefill(m, tok[:, :11], capacity=12, cache_dtype="float32",
                           offload=offload.OffloadSpec(compress="int8"))
  assert host.compress == "int8"
  for hl, dl in zip(host.layers, dev.layers()):
    assert isinstance(hl.tree.k, offload.Int8Tensor)
    back = offload.swap_in(hl)
    np.testing.assert_array_equal(back.positions, dl.positions)
    np.testing.assert_array_equal(back.lengths, dl.lengths)
    for name in ("k", "v"):
      x, y = np.asarray(getattr(dl, name)), np.asarray(getattr(back, name))
      bound = np.abs(x).max(-1, keepdims=True) / 127 / 2
      assert (np.abs(y - x) <= bound * (1 + 1e-6) + 1e-12).all()
  kv = sum(2 * dl.k.size for dl in dev.layers())            # k + v entries, f32
  vectors = kv // LLAMA.head_dim
  exact = sum(dl.nbytes for dl in dev.layers())
  assert host.host_nbytes == exact - 4 * kv + kv + 4 * vectors    # codes + f32 scales
  deq = ModelCache.from_layers([offload.swap_in(c) for c in host.layers],
                               jnp.copy(host.next_position),
                               keys=tfm.layer_keys(LLAMA))
  ref, _ = models.decode(m, tok[:, 11:12], deq)
  out, host = models.decode(m, tok[:, 11:12], host)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_quest_with_every_page_equals_full_attention():
  m = _model(LLAMA)
  tok = _tokens(2, 30, seed=3)
  _, dev = models.prefill(m, tok[:, :24], capacity=30)
  spec = offload.OffloadSpec(mode="quest", page_size=4, top_k=6, room=6)
  _, qc = models.prefill(m, tok[:, :24], offload=spec)
  assert isinstance(qc, offload.QuestCache)
  assert offload.memory_kind(qc.stores[0].k_pages) == HOST
  assert qc.device_nbytes < dev.nbytes < qc.nbytes
  for a, b in [(24, 27), (27, 28)]:
    ref, dev = models.decode(m, tok[:, a:b], dev)
    out, qc = models.decode(m, tok[:, a:b], qc)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(qc.next_position, [28, 28])


def _quest_bound_top_k(q, k, page_size, top_k, last_page):
  """numpy: pages with the largest sum_d max(q_d min_d, q_d max_d) per (row, kv head)."""
  b, hq, _, d = q.shape
  h = k.shape[1]
  g = hq // h
  kp = k.reshape(b, h, -1, page_size, d)
  lo, hi = kp.min(3), kp.max(3)                                  # [B, H, M, D]
  qg = q[:, :, 0].reshape(b, h, g, 1, d)
  ub = np.maximum(qg * lo[:, :, None], qg * hi[:, :, None]).sum(-1).max(2)   # [B, H, M]
  ub[..., last_page] = np.inf
  return np.sort(np.argsort(-ub, axis=-1)[..., :top_k], -1)


def _mask_pages(cache, selected, ctx, page_size):
  """The dense cache with prompt slots outside the selected pages made invalid."""
  layers = []
  for layer, sel in zip(cache.layers(), selected):
    pos = np.asarray(layer.positions).copy()
    keep = np.zeros(pos.shape, bool)
    keep[..., ctx:] = True
    page = np.arange(pos.shape[-1]) // page_size
    for bi in range(pos.shape[0]):
      for hi in range(pos.shape[1]):
        keep[bi, hi, :ctx] = np.isin(page[:ctx], sel[bi, hi])
    layers.append(layer.replace(positions=jnp.asarray(np.where(keep, pos, -1))))
  return ModelCache.from_layers(layers, cache.next_position, keys=tfm.layer_keys(LLAMA))


def test_quest_top_k_matches_a_reference_that_sees_only_the_selected_pages():
  """Given top_k=3 of 8 pages, when Quest decodes, then (a) each layer picks the pages a
  numpy Quest bound of that layer's queries ranks highest (the last page forced in), and
  (b) the logits equal an ordinary on-device decode whose cache hides every other prompt
  page, step after step (the reference appends its own decoded keys)."""
  m = _model(LLAMA)
  ctx, p, k = 32, 4, 3
  tok = _tokens(2, ctx + 3, seed=4)
  _, ref = models.prefill(m, tok[:, :ctx], capacity=ctx + 3)
  _, full = models.prefill(m, tok[:, :ctx], capacity=ctx + 3)
  spec = offload.OffloadSpec(mode="quest", page_size=p, top_k=k, room=3)
  _, qc = models.prefill(m, tok[:, :ctx], offload=spec)
  prompt_pos = [np.asarray(layer.positions)[..., :ctx] for layer in ref.layers()]
  for i in range(ctx, ctx + 3):
    out, qc = models.decode(m, tok[:, i:i + 1], qc)
    sel = [np.asarray(s) for s in qc.selected]
    masked = _mask_pages(ref, sel, ctx, p)
    want, new, obs = models.decode(m, tok[:, i:i + 1], masked, observe=models.Observe(queries=1))
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
    for li, layer in enumerate(ref.layers()):
      q = np.asarray(obs[li]["queries"])
      keys = np.asarray(layer.k)[:, :, :ctx]
      np.testing.assert_array_equal(sel[li], _quest_bound_top_k(q, keys, p, k, ctx // p - 1))
    # the reference keeps its own decoded token; prompt slots are restored for the next step
    layers = [l.replace(positions=l.positions.at[..., :ctx].set(pp))
              for l, pp in zip(new.layers(), prompt_pos)]
    ref = ModelCache.from_layers(layers, new.next_position, keys=tfm.layer_keys(LLAMA))
    exact, full = models.decode(m, tok[:, i:i + 1], full)
  assert float(jnp.abs(out - exact).max()) > 1e-4     # 3 of 8 pages is not full attention


def test_offload_errors_name_the_argument():
  m = _model(LLAMA)
  tok = _tokens(1, 8)
  with pytest.raises(ValueError, match=r"mode='disk'; allowed: \('stream', 'quest'\)"):
    offload.OffloadSpec(mode="disk")
  with pytest.raises(ValueError, match=r"compress='int4'; allowed"):
    offload.OffloadSpec(compress="int4")
  with pytest.raises(ValueError, match=r"prefetch=-1; must be an int >= 0"):
    offload.OffloadSpec(prefetch=-1)
  with pytest.raises(ValueError, match=r"top_k=0; must be an int >= 1"):
    offload.OffloadSpec(mode="quest", top_k=0)
  with pytest.raises(ValueError, match=r"offload=OffloadSpec\(mode='quest'.* does not combine "
                                       r"with press"):
    from kvjax import presses
    models.prefill(m, tok, offload=offload.OffloadSpec(mode="quest"),
                   press=presses.KnormPress(compression_ratio=0.5))
  with pytest.raises(ValueError, match=r"capacity=4; with offload it must be an int >= the "
                                       r"longest prompt \(8 tokens\)"):
    models.prefill(m, tok, capacity=4, offload=offload.OffloadSpec())
  _, qc = models.prefill(m, tok, offload=offload.OffloadSpec(mode="quest", page_size=4,
                                                              top_k=2, room=1))
  with pytest.raises(ValueError, match=r"exceed OffloadSpec.room=1"):
    models.decode(m, _tokens(1, 2), qc)


def test_generate_with_offload_equals_on_device_generation():
  """kvjax.generate(offload=...): streamed layers, and Quest with every page selected, give
  the greedy tokens of the on-device cache."""
  import kvjax
  m = _model(LLAMA)
  tok = _tokens(2, 12, seed=6)
  ref = kvjax.generate(m, tok, max_new_tokens=4).tokens
  got = kvjax.generate(m, tok, max_new_tokens=4, offload=offload.OffloadSpec()).tokens
  np.testing.assert_array_equal(got, ref)
  quest = offload.OffloadSpec(mode="quest", page_size=4, top_k=3, room=4)
  np.testing.assert_array_equal(
      kvjax.generate(m, tok, max_new_tokens=4, offload=quest).tokens, ref)
  with pytest.raises(ValueError, match=r"OffloadSpec.room=4 < max_new_tokens=5"):
    kvjax.generate(m, tok, max_new_tokens=5, offload=quest)
