"""The press registry: one table that compare, the benches, the policies and flags read.

A throwaway press defined here, registered once, must show up in every consumer with no
other edit; built-in names must build the presses the consumers used to hard-code, with
metadata that matches what the press really asks of the forward pass.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_presses, compare
from kvjax import policy
from kvjax import presses as P
from kvjax.policy import pipeline
from kvjax.presses import base, registry
from tests.kvjax.presses import helpers


@registry.register("test_last_slots", query_agnostic=True)
@dataclasses.dataclass(frozen=True)
class LastSlotsPress(base.ScorerPress):
  """Keeps the most recent slots (a throwaway press defined by a test module)."""

  def score(self, cache, obs, ctx):
    del obs, ctx
    return jnp.broadcast_to(jnp.arange(cache.positions.shape[-1], dtype=jnp.float32),
                            cache.positions.shape)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
  yield
  registry.unregister("test_last_slots")


def test_a_press_registered_in_a_test_module_reaches_every_consumer():
  # compare: listed, parsed, built (alone and evict-then-quantize)
  assert "test_last_slots" in compare.known_techniques()
  ts = compare.parse_techniques(["test_last_slots", "test_last_slots+int8"], [0.5])
  assert [t.label for t in ts] == ["test_last_slots@0.5", "test_last_slots@0.5+int8"]
  built = ts[0].build()
  assert isinstance(built, LastSlotsPress) and built.compression_ratio == 0.5
  # policies: the runtime lookup (query-agnostic, no observations) and the pipeline stages
  assert "test_last_slots" in policy.press_names() and "test_last_slots" in policy.PRESSES
  assert isinstance(policy.make_press("test_last_slots", 0.25), LastSlotsPress)
  assert isinstance(policy.from_name("compress", press="test_last_slots").press, LastSlotsPress)
  stage = pipeline.Stage.parse("test_last_slots@0.5+int8")
  assert isinstance(stage.build_press(), LastSlotsPress)
  # the bench's name list and factory
  assert "test_last_slots" in bench_presses.press_names()
  made = bench_presses.make_presses(0.5, 2, 2, names=["test_last_slots"])
  assert isinstance(made["test_last_slots"], LastSlotsPress)
  # and it really runs: the most recent half of each row survives
  cache = helpers.make_cache(b=1, h=1, s=8)
  out = made["test_last_slots"](cache)
  assert helpers.kept_positions(out) == [[[4, 5, 6, 7]]]


def test_builtin_names_build_the_presses_the_consumers_hard_coded():
  expect = {
      "streaming_llm": P.StreamingLLMPress(compression_ratio=0.5),
      "snapkv": P.SnapKVPress(compression_ratio=0.5),
      "h2o": P.H2OPress(compression_ratio=0.5),
      "tova": P.TOVAPress(compression_ratio=0.5),
      "knorm": P.KnormPress(compression_ratio=0.5),
      "expected_attention": P.ExpectedAttentionPress(compression_ratio=0.5),
      "keydiff": P.KeyDiffPress(compression_ratio=0.5),
      "lagkv": P.LagKVPress(compression_ratio=0.5),
      "random": P.RandomPress(compression_ratio=0.5),
      "pyramidkv": P.PyramidKVPress(compression_ratio=0.5),
      "adakv": P.AdaKVPress(press=P.SnapKVPress(compression_ratio=0.5)),
      "chunkkv": P.ChunkKVPress(press=P.SnapKVPress(compression_ratio=0.5)),
      "snapkv_cam": P.SnapKVPress(compression_ratio=0.5, merge="cam"),
      "streaming_rerotate": P.StreamingLLMPress(compression_ratio=0.5, rerotate=True),
  }
  for name, press in expect.items():
    assert registry.make(name, 0.5) == press, name
  pattern = np.arange(6.0).reshape(3, 2)
  duo = registry.make("duo_attention", 0.5, head_scores=pattern)
  assert duo == P.DuoAttentionPress(head_compression_ratio=0.5, head_scores=pattern)
  # the bench supplies DuoAttention's pattern and the random press's seed itself
  made = bench_presses.make_presses(0.5, 3, 2, seed=7, names=["duo_attention", "random"])
  assert made["random"].seed == 7 and made["duo_attention"].head_compression_ratio == 0.5


def test_declared_needs_match_what_each_press_asks_of_the_forward_pass():
  pattern = np.ones((2, 2))
  for e in registry.entries():
    press = registry.make(e.name, 0.5, **({"head_scores": pattern}
                                          if "head_scores" in e.needs else {}))
    obs = press.observe
    assert ("colsum" in e.needs) == bool(obs.colsum), e.name
    assert ("queries" in e.needs) == bool(obs.queries), e.name
    assert ("reconstruction" in e.needs) == bool(getattr(obs, "reconstruction", 0)), e.name
    assert ("o_proj" in e.needs) == bool(getattr(obs, "o_proj", False)), e.name


def test_filters_and_consumer_views():
  agnostic_plain = set(registry.names(query_agnostic=True, provides=()))
  assert {"knorm", "streaming_llm", "keydiff", "random", "lagkv"} <= agnostic_plain
  assert not {"snapkv", "adakv", "expected_attention", "duo_attention"} & agnostic_plain
  # a wrapper inherits its inner press's needs and question-sensitivity
  ada = registry.get("adakv")
  assert ada.needs == {"colsum"} and not ada.query_agnostic
  # compare lists everything a prefill can feed: not DuoAttention (calibrated pattern)
  assert "duo_attention" not in compare.known_techniques()
  assert {"snapkv", "expected_attention", "adakv", "pyramidkv"} <= set(compare.known_techniques())
  assert set(bench_presses.press_names()) == set(registry.names())
  assert "duo_attention" not in pipeline.press_names()


def test_errors_name_the_argument_and_the_allowed_values():
  with pytest.raises(ValueError, match=r"unknown press 'snapkvv'; registered: adakv, "):
    registry.make("snapkvv", 0.5)
  with pytest.raises(ValueError, match=r"compression_ratio=1.5; must be a float in \[0, 1\)"):
    registry.make("knorm", 1.5)
  with pytest.raises(ValueError, match=r"has no option\(s\) \['windw'\]; allowed: .*window_size"):
    registry.make("snapkv", 0.5, windw=3)
  with pytest.raises(ValueError, match=r"needs=\['gpu'\]: unknown \['gpu'\]; allowed"):
    registry.register("x_press", query_agnostic=True, needs=("gpu",))
  with pytest.raises(ValueError, match="lowercase letters"):
    registry.register("Bad-Name", query_agnostic=True)
  with pytest.raises(TypeError, match="query_agnostic"):
    registry.register("x_press", query_agnostic="yes")

  class Other(base.ScorerPress):
    pass

  with pytest.raises(ValueError, match="'knorm' is already registered to KnormPress"):
    registry.register("knorm", query_agnostic=True)(Other)
  with pytest.raises(ValueError, match=r"press='snapkv'; allowed: \("):
    policy.make_press("snapkv", 0.5)   # needs observations a runtime policy lacks
