"""experiments.generate's text mode (--context_file / --question / --press / --ratio) and its
prompt mode, run in-process on the random "tiny" preset (byte tokenizer)."""

import pytest
from absl import app, flags

from experiments import generate
from kvjax.presses import registry
from models import pipeline, presets

CONTEXT = "Alice keeps the red key in the blue box; Bob keeps the green key under the mat."


def _run(*args):
  # a private FlagValues: other launchers imported by the suite define flags of the same names
  fv = generate.define_flags(flags.FlagValues())
  fv(["generate", *args])
  return generate.main(["generate"])


def test_text_mode_answers_like_the_pipeline(tmp_path, capsys):
  ctx = tmp_path / "ctx.txt"
  ctx.write_text(CONTEXT)
  _run("--model=tiny", f"--context_file={ctx}", "--question=Where is the red key?",
       "--question=Who has green?", "--press=knorm", "--ratio=0.5", "--max_new_tokens=4")
  out = capsys.readouterr().out
  model, tok = presets.load_model_and_tokenizer("tiny")
  want = pipeline.run(model, tok, CONTEXT, ["Where is the red key?", "Who has green?"],
                      registry.make("knorm", 0.5), max_new_tokens=4)
  assert f"context: {want.context_tokens} tokens; KV cache {want.cache_nbytes:,} bytes" in out
  for q, a in zip(["Where is the red key?", "Who has green?"], want.answers):
    assert f"Q: {q}\nA: {a}\n" in out
  assert "KnormPress(compression_ratio=0.5" in out


def test_inline_context_without_press_keeps_the_full_cache(capsys):
  _run("--model=tiny", f"--context={CONTEXT}", "--question=Who?", "--max_new_tokens=2")
  out = capsys.readouterr().out
  assert "press: none (full cache)" in out and "1.00x" in out


@pytest.mark.parametrize("args,match", [
    (["--press=nope", "--question=q", f"--context={CONTEXT}"], "--press='nope' is not a "
     "registered press; allowed: .*snapkv"),
    (["--question=q"], "needs --context_file=<path> or --context=<text>"),
    (["--context_file=/nonexistent/ctx.txt", "--question=q"], "does not exist"),
    ([f"--context={CONTEXT}"], "at least one --question"),
    (["--context=   ", "--question=q"], "context is empty"),
    ([f"--context={CONTEXT}", "--context_file=x", "--question=q"], "not both"),
])
def test_bad_text_flags_are_usage_errors(args, match):
  with pytest.raises(app.UsageError, match=match):
    _run("--model=tiny", *args)


def test_bad_ratio_fails_at_parse_time():
  with pytest.raises(flags.IllegalFlagValueError, match=r"--ratio=1.0"):
    _run("--model=tiny", "--press=knorm", "--ratio=1.0", "--question=q")


def test_non_utf8_context_file(tmp_path):
  ctx = tmp_path / "bin.txt"
  ctx.write_bytes(b"\xff\xfe\x00abc")
  with pytest.raises(app.UsageError, match="is not UTF-8 text"):
    _run("--model=tiny", f"--context_file={ctx}", "--question=q")


def test_prompt_mode_still_works(capsys):
  _run("--model=tiny", "--prompt=abc", "--max_new_tokens=3")
  out = capsys.readouterr().out
  assert "model: tiny" in out and "decode:" in out and "KV cache:" in out


def test_sampling_flags_default_to_the_generation_config():
  fv = generate.define_flags(flags.FlagValues())
  fv(["generate", "--top_p=0.5"])
  gen = {"max_new_tokens": 7, "temperature": 0.3, "top_p": 0.9, "top_k": 4}
  # flags left unset take the model's generation_config.json values; set ones win
  assert generate.sampling_settings(gen) == {"max_new_tokens": 7, "temperature": 0.3,
                                             "top_p": 0.5, "top_k": 4}
  fv(["generate", "--top_p=0.5", "--max_new_tokens=2", "--temperature=0", "--top_k=0"])
  assert generate.sampling_settings(gen) == {"max_new_tokens": 2, "temperature": 0.0,
                                             "top_p": 0.5, "top_k": 0}
