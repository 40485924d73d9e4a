"""compare composes every technique: the memory notes beside the measured bytes."""

import types

from experiments import compare

CFG = types.SimpleNamespace(num_layers=2, head_dim=16)


def test_memory_notes_name_presses_above_their_promise():
  ts = compare.parse_techniques(["snapkv", "adakv", "think", "int4"], [0.5])
  notes = compare.memory_notes(ts, CFG, 1024)
  # AdaKV pads heads to 1.5 x 512 = 768 of 1024 slots; ThinK keeps half the key channels
  # and every value: (8 + 16) / 32 of the K + V bytes; SnapKV keeps its 512
  assert notes == ["  adakv@0.5: keeps 0.75 of the dense bytes at 1024 tokens (the ratio "
                   "alone: 0.5)",
                   "  think@0.5: keeps 0.75 of the dense bytes at 1024 tokens (the ratio "
                   "alone: 0.5)"]


def test_fit_model_leaves_out_kinds_the_head_dim_cannot_take():
  ts = compare.parse_techniques(["full", "kivi2", "snapkv+kivi4", "int4"], [0.5])
  ok, skipped = compare.fit_model(ts, types.SimpleNamespace(head_dim=16, rope=None))
  assert [t.label for t in ok] == ["full", "int4"]
  assert [l for l, _ in skipped] == ["kivi2", "snapkv@0.5+kivi4"]
  assert all("must divide" in why for _, why in skipped)
  ok, skipped = compare.fit_model(ts, types.SimpleNamespace(head_dim=64, rope=None))
  assert len(ok) == 4 and not skipped


def test_cache_options_keep_the_full_cache_answers(tmp_path):
  """Chunked prefill, a paged pool and host offload hold the same tokens as the dense
  one-shot cache, so the full cache's predictions are unchanged; a decode-time target at
  the cache's own size never compresses, so the press's are unchanged too."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from experiments import tasks as T  # pylint: disable=import-outside-toplevel
  from tests.experiments.test_compare import CFG, TOK
  model = models.Transformer(CFG, rngs=nnx.Rngs(3))
  samples = T.make("passkey").samples(128, 2)
  techs = compare.parse_techniques(["full", "knorm"], [0.5])

  def preds(**opts):
    _, info = compare.run(model, TOK, techs, samples, batch_size=2, cache_dtype="float32",
                          decode_steps=0, progress=False,
                          options=compare.CacheOptions(**opts))
    return info["predictions"]

  dense = preds()
  for opts in (dict(cache="paged"), dict(cache="offload"), dict(decode_target=10_000)):
    assert preds(**opts) == dense, opts
  chunked = preds(chunk_size=64)
  assert {k: v for k, v in chunked.items() if k.startswith("full|")} == \
      {k: v for k, v in dense.items() if k.startswith("full|")}
