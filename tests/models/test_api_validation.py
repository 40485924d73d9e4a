"""Bad input at the public inference API gives a clear error naming the argument.

Each case here once produced a silent wrong result (NaN logits, a wrapped id, a dropped
prompt, an int8 cache) or a raw exception deep inside jit; the good spellings next to them
must keep working.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import paged
from kvjax import presses
from tests.models import family_checks

CFG = models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2)  # vocab 256


@functools.lru_cache(maxsize=None)
def _model():
  return models.Transformer(CFG, rngs=nnx.Rngs(0))


_decoder = family_checks.tiny_hybrid


def _toks(b=2, t=6, vocab=256):
  return (np.arange(b * t, dtype=np.int32).reshape(b, t) * 7) % vocab


@pytest.mark.parametrize("bad,where", [(256, "256"), (-1, "-1"), (2 ** 40, str(2 ** 40))])
def test_out_of_vocab_ids_are_refused_everywhere(bad, where):
  # Given a prompt with one id outside [0, vocab) (int64, so 2**40 is not pre-wrapped)
  tok = _toks().astype(np.int64)
  tok[1, 3] = bad
  m = _model()
  # Then prefill, decode and generate name the id, its place and the vocab size
  msg = rf"tokens holds id {where} at \(1, 3\); ids must be in \[0, 256\)"
  with pytest.raises(ValueError, match=msg):
    models.prefill(m, tok)
  with pytest.raises(ValueError, match=msg):
    kvjax.generate(m, tok, max_new_tokens=2)
  _, cache = models.prefill(m, _toks(), capacity=8)
  with pytest.raises(ValueError, match=r"tokens holds id"):
    models.decode(m, tok[:, 3:4], cache)
  d = _decoder()
  with pytest.raises(ValueError, match=r"ids must be in \[0, 64\)"):
    d.prefill(np.where(tok >= 64, 64, tok))


def test_valid_int64_ids_equal_int32_ids():
  m = _model()
  a, _ = models.prefill(m, _toks().astype(np.int64))
  b, _ = models.prefill(m, _toks())
  np.testing.assert_array_equal(a, b)
  assert np.isfinite(np.asarray(a)).all()


def test_masks_must_be_zero_one_of_bool_or_int_dtype():
  m, tok = _model(), _toks()
  with pytest.raises(TypeError, match="attention_mask must be a bool or integer.*float32"):
    models.prefill(m, tok, attention_mask=np.full((2, 6), 0.5, np.float32))
  bad = np.ones((2, 6), np.int32)
  bad[0, 2] = 2
  with pytest.raises(ValueError, match=r"attention_mask holds the value 2; allowed values are 0"):
    models.prefill(m, tok, attention_mask=bad)
  with pytest.raises(ValueError, match="attention_mask holds the value -1"):
    kvjax.generate(m, tok, attention_mask=-np.ones((2, 6), np.int32), max_new_tokens=1)
  with pytest.raises(TypeError, match="attention_mask"):
    _decoder().prefill(tok % 64, attention_mask=np.ones((2, 6), np.float32))
  # a bool mask and the equal int mask give the same logits
  mask = np.ones((2, 6), np.int32)
  mask[1, :2] = 0
  a, _ = models.prefill(m, tok, attention_mask=mask)
  b, _ = models.prefill(m, tok, attention_mask=mask.astype(bool))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("lengths,match", [
    ([6, 7], r"prompt_lengths holds 7; each length must be in \[1, 6\]"),
    ([0, 3], r"prompt_lengths holds 0"),
    ([-2, 3], r"prompt_lengths holds -2"),
])
def test_prompt_lengths_out_of_range(lengths, match):
  with pytest.raises(ValueError, match=match):
    models.prefill(_model(), _toks(), prompt_lengths=np.asarray(lengths))
  with pytest.raises(ValueError, match=match):
    _decoder().prefill(_toks(vocab=64), prompt_lengths=np.asarray(lengths))


def test_fractional_prompt_lengths_are_refused():
  with pytest.raises(TypeError, match="prompt_lengths must be integers.*float"):
    models.prefill(_model(), _toks(), prompt_lengths=np.asarray([2.5, 3.0]))


def test_prompt_lengths_equal_the_mask_they_describe():
  m = _model()
  mask = np.zeros((2, 6), np.int32)
  mask[0, :4] = 1
  mask[1, :6] = 1
  a, _ = models.prefill(m, _toks(), prompt_lengths=np.asarray([4, 6]), logits="last")
  b, _ = models.prefill(m, _toks(), attention_mask=mask, logits="last")
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cap", [32.0, "32", True, 0, -4, [8, 8.0]])
def test_capacity_must_be_ints(cap):
  with pytest.raises(ValueError, match=r"capacity.*must be an int >= 1"):
    models.prefill(_model(), _toks(), capacity=cap)


def test_numpy_int_capacity_is_accepted():
  _, cache = models.prefill(_model(), _toks(), capacity=np.int64(9))
  assert cache.capacity == (9, 9)
  with pytest.raises(ValueError, match=r"capacity=32.0; must be an int >= 1"):
    kvjax.generate(_model(), _toks(), max_new_tokens=1, capacity=32.0)
  with pytest.raises(ValueError, match=r"capacity=2.0"):
    _decoder().prefill(_toks(vocab=64), capacity=2.0)


def test_cache_dtype_must_be_float():
  m = _model()
  for bad in ("int8", np.int8, jnp.int32, "nonsense"):
    with pytest.raises(ValueError, match="cache_dtype=.* floating dtype"):
      models.prefill(m, _toks(), cache_dtype=bad)
  with pytest.raises(ValueError, match="cache_dtype"):
    kvjax.generate(m, _toks(), max_new_tokens=1, cache_dtype="int8")
  with pytest.raises(ValueError, match="cache_dtype"):
    _decoder().prefill(_toks(vocab=64), cache_dtype="int8")
  with pytest.raises(ValueError, match="dtype='uint8'"):
    models.init_cache(CFG, 1, 4, dtype="uint8")
  # string, numpy and jnp spellings of a float dtype all work
  for good in ("bfloat16", np.float16, jnp.bfloat16):
    _, cache = models.prefill(m, _toks(), cache_dtype=good)
    assert cache.layers()[0].k.dtype == jnp.dtype(good)


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p=0.0; must be a finite number in \(0.0, 1.0\]"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p=nan"),
    (dict(temperature=1.0, top_k=-1), "top_k=-1; must be an int >= 0"),
    (dict(temperature=1.0, top_k=2.5), "top_k=2.5"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1; must be an int >= 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens=2.0"),
    (dict(seed=1.5), "seed=1.5"),
])
def test_sampling_parameters(kw, match):
  with pytest.raises(ValueError, match=match):
    kvjax.generate(_model(), _toks(), **{"max_new_tokens": 2, **kw})


def test_sample_refuses_nan_temperature_itself():
  logits = jnp.asarray([[0.0, 3.0, 1.0]])
  with pytest.raises(ValueError, match="temperature=nan"):
    kvjax.sample(logits, jax.random.key(0), temperature=float("nan"))
  assert int(kvjax.sample(logits, jax.random.key(0))[0]) == 1


def test_zero_new_tokens_returns_the_prompt_cache():
  m, tok = _model(), _toks()
  out = kvjax.generate(m, tok, max_new_tokens=0)
  assert out.tokens.shape == (2, 0) and out.steps == 0
  np.testing.assert_array_equal(out.lengths, [0, 0])
  np.testing.assert_array_equal(out.cache.next_position, [6, 6])


def test_reusing_a_donated_cache_names_the_donation():
  m = _model()
  _, cache = models.prefill(m, _toks(), capacity=9)
  _, new = models.decode(m, _toks(t=1), cache)
  with pytest.raises(ValueError, match="cache was donated to a previous call.*keep a copy"):
    models.decode(m, _toks(t=1), cache)
  with pytest.raises(ValueError, match="cache was donated"):
    models.prefill(m, _toks(), cache=cache)
  # the returned cache is live and keeps working; a copy taken before survives donation
  keep = jax.tree.map(jnp.copy, new)
  models.decode(m, _toks(t=1), new)
  lg, _ = models.decode(m, _toks(t=1), keep)
  assert np.isfinite(np.asarray(lg)).all()
  d = _decoder()
  _, dc = d.prefill(_toks(vocab=64), capacity=9)
  d.decode(_toks(t=1, vocab=64), dc)
  with pytest.raises(ValueError, match="cache was donated"):
    d.decode(_toks(t=1, vocab=64), dc)


def test_press_on_a_paged_cache_asks_for_paged_press():
  m = _model()
  fac = paged.layer_factory(2, CFG.num_kv_heads, CFG.head_dim, num_pages=16, page_size=4)
  pc = models.init_cache(CFG, 2, 16, layer_factory=fac)
  press = presses.SnapKVPress(compression_ratio=0.5, window_size=2)
  with pytest.raises(ValueError, match="SnapKVPress works on dense KV layers.*PagedPress"):
    models.prefill(m, _toks(), cache=pc, press=press)


@pytest.mark.parametrize("page_size", [0, -1, 2.0])
def test_page_size_must_be_positive_int(page_size):
  with pytest.raises(ValueError, match=r"page_size=.*must be an int >= 1"):
    paged.layer_factory(2, 2, 16, num_pages=8, page_size=page_size)
  with pytest.raises(ValueError, match=r"page_size=.*must be an int >= 1"):
    paged.pages_needed(10, page_size)


def test_numpy_float_ratio_is_the_python_float():
  a = presses.SnapKVPress(compression_ratio=np.float32(0.5))
  b = presses.SnapKVPress(compression_ratio=0.5)
  assert a == b and hash(a) == hash(b)
  assert type(a.compression_ratio) is float
  for bad in (np.float64(1.0), float("nan"), True, "0.5"):
    with pytest.raises(ValueError, match=r"compression_ratio=.*must be a float in \[0, 1\)"):
      presses.SnapKVPress(compression_ratio=bad)


def test_jit_reuse_survives_validation():
  """The checks run outside jit: decode still compiles once per shape."""
  m = _model()
  from models import api  # pylint: disable=import-outside-toplevel
  _, cache = models.prefill(m, _toks(), capacity=12)
  _, cache = models.decode(m, _toks(t=1), cache)
  before = api._run._cache_size()  # pylint: disable=protected-access
  for i in range(3):
    _, cache = models.decode(m, _toks(t=1) + i, cache)
  assert api._run._cache_size() == before  # pylint: disable=protected-access


def test_direct_forward_refuses_out_of_vocab_ids():
  from flax import nnx
  from models import presets
  from models.transformer import Transformer
  model = Transformer(presets.PRESETS["tiny"], rngs=nnx.Rngs(0))
  for bad in (260, -1, 2 ** 40):
    with pytest.raises(ValueError, match=r"ids must be in \[0, 260\)"):
      model(np.asarray([[1, bad]], np.int64))
  assert np.isfinite(np.asarray(model(np.asarray([[1, 259]], np.int32)))).all()
