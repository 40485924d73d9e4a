"""Text streams, the mixture's checkpointable state, batching."""

import json

import numpy as np
import pytest

from train import data
from train import tasks


def test_stdlib_corpus_is_deterministic_with_disjoint_splits():
  tr, va = data.stdlib_corpus("train"), data.stdlib_corpus("validation")
  assert len(tr) > 100 and len(va) > 5
  assert not set(tr.names) & set(va.names)
  assert tr.names == sorted(tr.names) == data.stdlib_corpus("train").names
  assert all(n.endswith(".py") and "site-packages" not in n for n in tr.names)
  s = data.TextStream(va, length=65)
  ex = s.example(0, 3)
  assert ex.tokens.shape == (65,) and ex.loss_mask[0] == 0 and ex.loss_mask[1:].all()
  np.testing.assert_array_equal(ex.tokens, data.TextStream(va, 65).example(0, 3).tokens)


def test_text_stream_reads_across_documents(tmp_path):
  docs = ["hello world", "", "second doc é", "x" * 30]
  paths = []
  for i, d in enumerate(docs):
    p = tmp_path / f"{i}.txt"
    p.write_text(d, encoding="utf-8")
    paths.append(str(p))
  stream = b"".join(d.encode() + bytes([0]) for d in docs)   # 0 marks EOS below
  want = [tasks.EOS if (i < len(stream) and stream[i] == 0 and _is_sep(docs, i)) else stream[i]
          for i in range(len(stream))]
  s = data.TextStream(data.file_corpus(paths), length=7, shuffle=False)
  got = np.concatenate([s.example(0, k).tokens for k in range(s.num_chunks)])
  np.testing.assert_array_equal(got, want[:len(got)])
  assert s.num_chunks == len(stream) // 7
  # shuffled epochs visit every chunk once
  sh = data.TextStream(data.file_corpus(paths), length=7)
  seen = sorted(tuple(sh.example(1, k).tokens) for k in range(sh.num_chunks))
  assert seen == sorted(tuple(s.example(0, k).tokens) for k in range(s.num_chunks))


def _is_sep(docs, i):
  ends = np.cumsum([len(d.encode()) + 1 for d in docs]) - 1
  return i in set(ends.tolist())


def test_jsonl_loader_and_errors(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text(json.dumps({"text": "abc"}) + "\n\n" + json.dumps({"text": "de"}) + "\n")
  c = data.file_corpus([str(p)])
  assert len(c) == 2 and c.doc(1) == b"de"
  bad = tmp_path / "b.jsonl"
  bad.write_text('{"text": "ok"}\n{not json\n')
  with pytest.raises(ValueError, match=r"b.jsonl:2: not valid JSON"):
    data.file_corpus([str(bad)])
  with pytest.raises(ValueError, match="does not exist"):
    data.file_corpus([str(tmp_path / "missing.txt")])
  with pytest.raises(ValueError, match="string field 'body'"):
    data.file_corpus([str(p)], jsonl_field="body")


def _mixture(seed=0):
  srcs = {"mqar": tasks.MQAR(length=33, num_pairs=4), "copy": tasks.Copy(length=33),
          "text": data.TextStream(data.stdlib_corpus("validation"), 33)}
  return data.Mixture(srcs, {"mqar": 2.0, "copy": 1.0, "text": 1.0}, seed)


def test_mixture_state_resumes_exactly():
  m = _mixture()
  for _ in range(3):
    m.next_batch(8)
  state = m.state()
  assert set(state) == {"index", "mqar", "copy", "text"} and state["index"] == 24
  assert all(isinstance(v, int) for v in state.values())
  json.dumps(state)
  want = [m.next_batch(8) for _ in range(2)]
  m2 = _mixture()
  m2.restore(state)
  got = [m2.next_batch(8) for _ in range(2)]
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  with pytest.raises(ValueError, match="data sources"):
    m2.restore({"index": 0, "mqar": 0})


def test_mixture_rows_subset_and_weights():
  full = _mixture().next_batch(16)
  part = _mixture().next_batch(16, rows=[1, 5, 6, 15])
  for k in ("inputs", "targets", "weights", "source"):
    np.testing.assert_array_equal(part[k], full[k][[1, 5, 6, 15]])
  assert full["inputs"].shape == (16, 32) and full["weights"].dtype == np.float32
  m = _mixture()
  src = np.concatenate([m.next_batch(100)["source"] for _ in range(4)])
  frac = np.bincount(src, minlength=3) / len(src)   # names sorted: copy, mqar, text
  np.testing.assert_allclose(frac, [0.25, 0.5, 0.25], atol=0.07)


def test_make_source_errors():
  with pytest.raises(ValueError, match="unknown task"):
    data.make_source("x", {"kind": "nope"}, 33)
  with pytest.raises(ValueError, match="needs paths"):
    data.make_source("mine", {"kind": "files"}, 33)


def test_configs_load_and_user_files_switch_on(tmp_path):
  from train import train as train_lib  # pylint: disable=import-outside-toplevel
  from train.configs import default, mqar_tiny, text_lm  # pylint: disable=import-outside-toplevel
  for mod in (default, mqar_tiny, text_lm):
    c = mod.get_config()
    assert c.steps > 0 and c.model.family == "llama"
  p = tmp_path / "docs.jsonl"
  p.write_text("".join(json.dumps({"text": f"document number {i} " * 5}) + "\n"
                       for i in range(20)))
  c = text_lm.get_config()
  c.seq_len = 32
  c.eval_examples = 4
  c.data.sources.stdlib.weight = 0.0
  c.data.sources.files.weight = 1.0
  c.data.sources.files.paths = str(p)
  c.data.sources.files.eval_paths = str(p)
  assert list(train_lib.active_sources(c)) == ["files"]
  b = train_lib.make_mixture(c).next_batch(4)
  assert b["inputs"].shape == (4, 32) and bytes(b["inputs"][0][:8].tolist()).isascii()
  assert list(train_lib.make_eval_sets(c)) == ["files"]
  c.data.sources.files.weight = 0.0
  with pytest.raises(ValueError, match="no data source has a positive weight"):
    train_lib.active_sources(c)


def test_recipe_merges_sections_replaces_sources_and_refuses_unknown_keys():
  from train.configs import default  # pylint: disable=import-outside-toplevel
  base = default.get_config()
  c = default.recipe(steps=7, opt=dict(lr=0.5), model=dict(config=dict(num_layers=5)),
                     sources=dict(m=dict(kind="mqar", weight=1.0)))
  # Given keys change; every other key of a merged section keeps get_config()'s value
  assert (c.steps, c.opt.lr, c.model.config.num_layers) == (7, 0.5, 5)
  assert c.opt.warmup_steps == base.opt.warmup_steps
  assert c.model.config.hidden_size == base.model.config.hidden_size
  assert c.model.family == base.model.family
  # data.sources and model.config are replaced whole, not merged
  assert list(c.data.sources) == ["m"] and c.data.sources.m.kind == "mqar"
  assert dict(default.recipe(model_config=dict(x=1)).model.config) == {"x": 1}
  # The result stays open to overrides (train.main locks it when it loads the file)
  c.extra = 1
  for bad, key in ((dict(stepz=1), "stepz"), (dict(opt=dict(lrr=1.0)), "lrr")):
    with pytest.raises(ValueError, match=f"lacks: Key \"{key}\" does not exist"):
      default.recipe(**bad)
