"""models.registry: every family builds from its config, plugs into `model(tokens)`, and the
cost table reports exact cache bytes."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from models import registry

FAMILIES = ["llama", "sliding", "dilated", "gla", "retnet", "mamba2", "hybrid", "cla", "mla"]


def test_registry_names_every_family():
  assert sorted(registry.FAMILIES) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_config_gives_logits_b_t_v(family):
  # abstract build and forward: shapes only, no compile
  model = registry.abstract_model(family)
  graphdef, state = nnx.split(model)
  tokens = jax.ShapeDtypeStruct((2, 33), jnp.int32)
  out = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
  assert out.shape == (2, 33, 260) and out.dtype == jnp.float32
  assert hasattr(model, "prefill") and hasattr(model, "decode")


def test_table_bytes_are_exact_and_fixed_for_recurrent_families():
  rows = {r["family"]: r for r in registry.table(["llama", "gla", "cla", "mla"], context=512)}
  # llama: 4 layers x (k + v: 2 x 2 heads x 32 x 4 B + positions 2 x 4 B) per token
  assert rows["llama"]["cache_bytes"] == 512 * 4 * (2 * 2 * 32 * 4 + 2 * 4) + 4 * 4 * 2 + 4
  # gla: 4 layers x state [1, 4, 16, 32] float32, whatever the context
  assert rows["gla"]["cache_bytes"] == 4 * 4 * 16 * 32 * 4 + 4
  assert registry.table(["gla"], context=64)[0]["cache_bytes"] == rows["gla"]["cache_bytes"]
  ratio = rows["llama"]["cache_bytes_per_token"] / rows["cla"]["cache_bytes_per_token"]
  assert ratio == pytest.approx(2.0, rel=1e-3)
  # mla: (r + d_r) = 48 float32 + one int32 position per layer and token
  assert rows["mla"]["cache_bytes"] == 4 * 512 * (48 * 4 + 4) + 4 * 4 + 4
  assert rows["llama"]["params"] > 0


def test_build_and_make_config_validate():
  with pytest.raises(ValueError, match="family='transformerxl'"):
    registry.get("transformerxl")
  with pytest.raises(ValueError, match=r"unknown GLAConfig field\(s\) \['window'\]"):
    registry.make_config("gla", window=4)
  with pytest.raises(ValueError, match="takes MLAConfig"):
    registry.build("mla", registry.make_config("cla"))


def test_cli_prints_the_table(capsys):
  assert registry.main(["--table", "--families", "retnet,hybrid", "--context", "128"]) == 0
  out = capsys.readouterr().out
  assert "retnet" in out and "hybrid" in out and "cache B/token @128" in out
