r"""Generate text from a model and report prefill / decode throughput.

    python -m experiments.generate                         # built-in default model
    python -m experiments.generate --model=path/to/hf_dir --prompt="def fib(n):" \
        --max_new_tokens=64 --capacity=4096 --dtype=bfloat16

`--model` is an HF directory (config.json + safetensors [+ tokenizer.json]) or the name
of a built-in preset (see models.presets).
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import flagcheck

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "default",
                    "HF model directory, or a built-in preset name (models.presets.PRESETS).")
flags.DEFINE_string("prompt", "def fibonacci(n):\n    ", "Prompt text.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
flags.DEFINE_integer("capacity", None,
                     "KV cache slots per layer; default prompt length + max_new_tokens.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "Parameter and cache dtype; default the checkpoint's.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("batch", 1, "Copies of the prompt to run as a batch.")
flags.DEFINE_enum("backend", "auto", ["auto", "xla", "pallas"], "Attention backend.")
flagcheck.ints("max_new_tokens", "capacity", "batch", lo=1)
flagcheck.ints("seed", lo=0)
flagcheck.floats("temperature", lo=0.0)
flagcheck.floats("top_p", lo=0.0, hi=1.0, lo_open=True)


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import kvjax  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel

  model, tok = presets.load_model_and_tokenizer(FLAGS.model, dtype=FLAGS.dtype)
  ids = tok.encode(FLAGS.prompt)
  if not ids:
    raise app.UsageError("--prompt encodes to no tokens")
  tokens = jnp.asarray([ids] * FLAGS.batch, jnp.int32)
  eos = getattr(tok, "eos_id", None)
  # Warm-up run compiles prefill/decode so the timed run measures steady-state speed.
  kvjax.generate(model, tokens, max_new_tokens=2, capacity=FLAGS.capacity or
                 len(ids) + FLAGS.max_new_tokens, backend=FLAGS.backend)
  out = kvjax.generate(model, tokens, max_new_tokens=FLAGS.max_new_tokens,
                       temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
                       capacity=FLAGS.capacity, eos_id=eos, backend=FLAGS.backend)
  if jax.process_index() != 0:
    return
  text = tok.decode(out.tokens[0, :out.lengths[0]])
  print(f"model: {FLAGS.model}  params: {presets.count_params(model):,}  "
        f"devices: {jax.devices()[0].platform} x{jax.device_count()}")
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
  app.run(main)
