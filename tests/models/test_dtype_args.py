"""dtype arguments take a string, a numpy dtype or a jnp dtype at every entry point, and a
bad one is a ValueError naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from models import config as config_lib
from models import decoder as dec
from models import decoder_io
from models import local
from models import pipeline
from models import presets
from models import tokenizer as tok_lib

DTYPES = [("bfloat16", "bfloat16"), (np.float32, "float32"), (jnp.bfloat16, "bfloat16"),
          (np.dtype("float16"), "float16")]
CFG = models.ModelConfig(vocab_size=260, hidden_size=16, intermediate_size=32, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=8)
TOKENS = np.arange(1, 7, dtype=np.int32)[None]


def _dtypes_of(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("dt,name", DTYPES)
def test_model_config_and_presets(dt, name):
  assert config_lib.dtype_name(dt) == name
  assert models.ModelConfig(dtype=dt).dtype == name
  m, _ = presets.load_model_and_tokenizer("tiny", dtype=dt)
  assert m.config.dtype == name and _dtypes_of(nnx.state(m, nnx.Param)) == {name}


@pytest.mark.parametrize("dt,name", DTYPES)
def test_from_pretrained_and_decoder_load(dt, name, tmp_path):
  models.save_pretrained(models.Transformer(CFG, rngs=nnx.Rngs(0)), str(tmp_path / "hf"))
  m = models.from_pretrained(str(tmp_path / "hf"), dtype=dt)
  assert _dtypes_of(nnx.state(m, nnx.Param)) == {name}
  d = local.SlidingConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=8, intermediate_size=32, window=4)
  decoder_io.save(dec.Decoder(d, rngs=nnx.Rngs(0)), str(tmp_path / "dec"))
  back = decoder_io.load(str(tmp_path / "dec"), dtype=dt)
  assert back.config.dtype == name and _dtypes_of(nnx.state(back, nnx.Param)) == {name}


@pytest.mark.parametrize("dt,name", DTYPES)
def test_cache_dtype_in_prefill_init_cache_generate_pipeline(dt, name):
  m = models.Transformer(CFG, rngs=nnx.Rngs(0))
  _, cache = models.prefill(m, TOKENS, capacity=8, cache_dtype=dt)
  assert _dtypes_of(cache) == {name}
  assert _dtypes_of(models.init_cache(CFG, 1, 4, dtype=dt)) == {name}
  out = kvjax.generate(m, TOKENS, max_new_tokens=1, cache_dtype=dt)
  assert _dtypes_of(out.cache) == {name}
  res = pipeline.run(m, tok_lib.ByteTokenizer(), "abcdef", ["q"], max_new_tokens=1,
                     cache_dtype=dt)
  assert res.full_cache_nbytes > 0


@pytest.mark.parametrize("bad", ["int8", np.int32, "float", 3, True, "f32x"])
def test_bad_dtypes_are_named(bad):
  with pytest.raises(ValueError, match="dtype="):
    models.ModelConfig(dtype=bad)
  with pytest.raises(ValueError, match="dtype="):
    presets.load_model_and_tokenizer("tiny", dtype=bad)
  if bad == "float":   # float64: a floating dtype, which kvjax.checks.float_dtype accepts
    return
  m = models.Transformer(CFG, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="cache_dtype="):
    models.prefill(m, TOKENS, cache_dtype=bad)
