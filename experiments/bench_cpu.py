r"""CPU prefill and decode speed, each as a fraction of a limit measured in the same run.

    python -m experiments.bench_cpu                                 # SmolLM2-135M shape, 1K..8K
    python -m experiments.bench_cpu --model=smollm2-135m --lengths=1024,4096
    python -m experiments.bench_cpu --model=tiny --lengths=64 --reps=1 --out=/tmp/b.json

For each prompt length L:
  * prefill: tokens/s of `models.prefill(..., logits="last")` (optionally with each press of
    --presses, reported as its extra cost over plain prefill), and the fraction of this CPU's
    matmul peak it reaches: the model's FLOPs (the layer GEMMs + causal attention) per second
    divided by the FLOPs/s of plain jitted `jnp.dot`s of exactly the layer GEMM shapes, timed
    in the same process, alternating with the prefill (median of --reps each).
  * decode: ms per `models.decode` step on a cache holding L tokens, and the fraction of
    measured memory bandwidth it reaches: (weight + cache bytes) / step time, divided by the
    bandwidth of a plain jitted streaming update (read + write) of the same number of bytes,
    timed alternating with the decode steps.
Every number comes with the 1-minute load average (`os.getloadavg`) seen while it was taken:
on a shared machine a number taken beside another heavy job is not a number.

`--model` takes any name `models.presets.load_model_and_tokenizer` accepts, plus
"smollm2-135m-random": a random model of SmolLM2-135M's shape (30 layers, hidden 576,
MLP 1536, 9 query / 3 kv heads, head_dim 64, vocab 49152, tied embeddings, RoPE base 1e5),
for when the real checkpoint is not available.

A torch implementation is benched beside kvjax only when torch is importable; it is not a
dependency of this project, so without it that part is skipped with a message.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
  """Defines this launcher's flags (only when run as a program: other experiment modules
  define flags of the same names and tests import the helpers below)."""
  flags.DEFINE_string("model", "smollm2-135m-random",
                      "Model: any name models.presets.load_model_and_tokenizer accepts (a "
                      "preset, 'default', an HF directory, the real 'smollm2-135m' once "
                      "available), or 'smollm2-135m-random' (random weights, SmolLM2-135M's "
                      "shape).")
  flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192"],
                    "Prompt / context lengths (tokens) to measure.")
  flags.DEFINE_integer("batch", 1, "Rows per prefill / decode step.")
  flags.DEFINE_integer("reps", 3, "Timed prefill repetitions per length (median reported; "
                       "each alternates with the matmul-peak reference).")
  flags.DEFINE_integer("decode_steps", 10, "Timed decode steps per length (median reported; "
                       "each alternates with the bandwidth reference).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and cache dtype.")
  flags.DEFINE_list("presses", [], "Presses to time at prefill, by kvjax.presses class name "
                    "without 'Press' in lower case (e.g. snapkv,streaming_llm,knorm); each row "
                    "reports its cost over plain prefill.")
  flags.DEFINE_float("compression_ratio", 0.75,
                     "compression_ratio of every press in --presses.")
  flags.DEFINE_integer("seed", 0, "Seed of random weights and tokens.")
  flags.DEFINE_string("out", "bench_cpu.json", "JSON output path ('' = do not write).")
  flags.DEFINE_bool("skip_decode", False, "Measure prefill only.")


SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
                     rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)


def load_model(name: str, dtype: str, seed: int):
  """The model to bench (see --model)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel
  from models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  from models.transformer import Transformer  # pylint: disable=import-outside-toplevel
  if name == "smollm2-135m-random":
    return Transformer(ModelConfig(dtype=dtype, **SMOLLM2_SHAPE), rngs=nnx.Rngs(seed))
  model, _ = presets.load_model_and_tokenizer(name, dtype=dtype, seed=seed)
  return model


def layer_gemms(config, tokens: int) -> list:
  """(M, K, N) of every matmul of one decoder layer on `tokens` rows (q, k, v, o, MLP)."""
  c = config
  h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  f = c.intermediate_size
  return [(tokens, h, q), (tokens, h, kv), (tokens, h, kv), (tokens, q, h),
          (tokens, h, f), (tokens, h, f), (tokens, f, h)]


def prefill_flops(config, batch: int, length: int) -> dict:
  """FLOPs of one prefill: layer GEMMs, causal attention (QK^T and PV over the visible
  half), and the last-token LM head."""
  c = config
  gemm = c.num_layers * sum(2 * m * k * n for m, k, n in layer_gemms(c, batch * length))
  visible = length * (length + 1) // 2  # causal (query, key) pairs
  attn = c.num_layers * batch * c.num_heads * 2 * 2 * visible * c.head_dim
  head = 2 * batch * c.hidden_size * c.vocab_size
  return dict(gemm=gemm, attention=attn, lm_head=head, total=gemm + attn + head)


def weight_bytes(model) -> int:
  """Bytes of every parameter (a decode step reads each once)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _timed(fn):
  import jax  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def _press(name: str, ratio: float):
  from kvjax import presses  # pylint: disable=import-outside-toplevel
  table = {n[:-len("Press")].lower(): getattr(presses, n) for n in presses.__all__
           if n.endswith("Press") and n not in ("Press", "ScorerPress")}
  table.update({"streaming_llm": presses.StreamingLLMPress})
  if name not in table:
    raise ValueError(f"--presses entry {name!r}; allowed: {sorted(table)}")
  return table[name](compression_ratio=ratio)


def bench_prefill(model, batch: int, length: int, reps: int, press_names, ratio, seed):
  """Prefill tokens/s (+ press costs) and the fraction of measured matmul peak."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  c = model.config
  dt = jnp.dtype(c.dtype)
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, c.vocab_size, jnp.int32)
  shapes = layer_gemms(c, batch * length)
  key = jax.random.key(seed + 1)
  mats = [(jax.random.normal(key, (m, k), dt), jax.random.normal(key, (k, n), dt) * 0.02)
          for m, k, n in shapes]

  @jax.jit
  def gemms(mats):
    return [jnp.dot(a, b) for a, b in mats]

  runs = {"none": None}
  runs.update({p: _press(p, ratio) for p in press_names})

  def prefill(press):
    return lambda: models.prefill(model, tokens, logits="last", press=press)

  for press in runs.values():  # compile every shape before timing
    jax.block_until_ready(prefill(press)())
  jax.block_until_ready(gemms(mats))
  times = {name: [] for name in runs}
  ref = []
  loads = []
  for _ in range(reps):
    for name, press in runs.items():
      times[name].append(_timed(prefill(press)))
      ref.append(_timed(lambda: gemms(mats)) * c.num_layers)  # one layer's GEMMs x layers
      loads.append(os.getloadavg()[0])
  fl = prefill_flops(c, batch, length)
  t = statistics.median(times["none"])
  peak = fl["gemm"] / statistics.median(ref)
  row = dict(length=length, batch=batch, prefill_s=t, tokens_per_s=batch * length / t,
             flops=fl, achieved_flops_per_s=fl["total"] / t, matmul_peak_flops_per_s=peak,
             fraction_of_matmul_peak=fl["total"] / t / peak,
             load1_min=min(loads), load1_max=max(loads))
  for name in runs:
    if name != "none":
      tp = statistics.median(times[name])
      row[f"press_{name}_s"] = tp
      row[f"press_{name}_overhead"] = tp / t - 1.0
  return row


def fill_cache(model, batch: int, length: int, capacity: int, seed: int):
  """A cache holding `length` random tokens (positions 0..length-1), built without an
  O(length^2) prefill: decode cost depends on the bytes held, not on their values."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  cache = models.init_cache(model.config, batch, capacity)
  key = jax.random.key(seed)

  def fill(layer):
    k = jax.random.normal(key, layer.k.shape, layer.k.dtype) * 0.5
    pos = jnp.broadcast_to(jnp.arange(layer.capacity, dtype=jnp.int32), layer.positions.shape)
    return layer.replace(k=k, v=k * 0.5, positions=jnp.where(pos < length, pos, -1),
                         lengths=jnp.full(layer.lengths.shape, length, jnp.int32))

  return cache.replace(segments=tuple(fill(s) for s in cache.segments),
                       next_position=jnp.full((batch,), length, jnp.int32))


def bench_decode(model, batch: int, length: int, steps: int, seed: int):
  """Decode ms/step with `length` cached tokens and the fraction of measured bandwidth."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  c = model.config
  cache = fill_cache(model, batch, length, length + steps + 2, seed)
  tok = jnp.full((batch, 1), seed % c.vocab_size, jnp.int32)
  nbytes = weight_bytes(model) + cache.nbytes
  buf = jnp.zeros((nbytes // 4,), jnp.float32)
  stream = jax.jit(lambda x: x + 1.0, donate_argnums=0)  # reads and writes nbytes in place
  logits, cache = models.decode(model, tok, cache, logits="last", check_capacity=False)
  buf = stream(buf)
  jax.block_until_ready((logits, buf))
  step_t, copy_t, loads = [], [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    logits, cache = models.decode(model, tok, cache, logits="last", check_capacity=False)
    jax.block_until_ready(logits)
    step_t.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    buf = jax.block_until_ready(stream(buf))
    copy_t.append(time.perf_counter() - t0)
    loads.append(os.getloadavg()[0])
  t = statistics.median(step_t)
  bw = 2 * buf.nbytes / statistics.median(copy_t)
  return dict(length=length, batch=batch, decode_ms=t * 1e3, bytes_read=nbytes,
              weight_bytes=weight_bytes(model), cache_bytes=cache.nbytes,
              achieved_bytes_per_s=nbytes / t, measured_bandwidth_bytes_per_s=bw,
              fraction_of_bandwidth=nbytes / t / bw, load1_min=min(loads), load1_max=max(loads))


def torch_available() -> bool:
  try:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  lengths = [int(x) for x in FLAGS.lengths]
  if not lengths or min(lengths) < 1:
    raise app.UsageError(f"--lengths={FLAGS.lengths}; need positive integers")
  for name, value, low in (("batch", FLAGS.batch, 1), ("reps", FLAGS.reps, 1),
                           ("decode_steps", FLAGS.decode_steps, 1)):
    if value < low:
      raise app.UsageError(f"--{name}={value}; must be >= {low}")
  if not 0.0 < FLAGS.compression_ratio < 1.0:
    raise app.UsageError(f"--compression_ratio={FLAGS.compression_ratio}; must be in (0, 1)")
  try:
    model = load_model(FLAGS.model, FLAGS.dtype, FLAGS.seed)
    for p in FLAGS.presses:
      _press(p, FLAGS.compression_ratio)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  c = model.config
  print(f"device={jax.devices()[0].platform} cpus={os.cpu_count()} model={FLAGS.model} "
        f"layers={c.num_layers} hidden={c.hidden_size} dtype={FLAGS.dtype} batch={FLAGS.batch} "
        f"load1={os.getloadavg()[0]:.1f}")
  rows = []
  for length in lengths:
    row = dict(impl="kvjax", **bench_prefill(model, FLAGS.batch, length, FLAGS.reps,
                                             FLAGS.presses, FLAGS.compression_ratio,
                                             FLAGS.seed))
    if not FLAGS.skip_decode:
      dec = bench_decode(model, FLAGS.batch, length, FLAGS.decode_steps, FLAGS.seed)
      row.update({f"decode_{k}" if k in ("load1_min", "load1_max") else k: v
                  for k, v in dec.items() if k not in ("length", "batch")})
    rows.append(row)
    print(f"measured length {length}: prefill {row['prefill_s']:.3f} s"
          + (f", decode {row['decode_ms']:.2f} ms" if "decode_ms" in row else "")
          + f" (load1 {row['load1_min']:.1f}-{row['load1_max']:.1f})", flush=True)
  header = (f"{'impl':>6} {'length':>7} {'prefill s':>10} {'tok/s':>9} {'%matmul':>8} "
            f"{'decode ms':>10} {'%bandw':>7} {'load1':>11}")
  print(header)
  for r in rows:
    dec = (f"{r['decode_ms']:10.2f} {100 * r['fraction_of_bandwidth']:6.1f}%"
           if "decode_ms" in r else f"{'-':>10} {'-':>7}")
    print(f"{r['impl']:>6} {r['length']:7d} {r['prefill_s']:10.3f} {r['tokens_per_s']:9.1f} "
          f"{100 * r['fraction_of_matmul_peak']:7.1f}% {dec} "
          f"{r['load1_min']:5.1f}-{r['load1_max']:<5.1f}")
    for p in FLAGS.presses:
      print(f"{'':>6} {'':>7} + {p}: {r[f'press_{p}_s']:.3f} s "
            f"({100 * r[f'press_{p}_overhead']:+.1f}% over plain prefill)")
  if torch_available():
    print("torch is importable, but this launcher has no torch implementation yet: "
          "torch rows skipped")
  else:
    print("torch not importable: torch rows skipped (torch is not a dependency of kvjax)")
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w", encoding="utf-8") as f:
      json.dump(dict(model=FLAGS.model, dtype=FLAGS.dtype, cpus=os.cpu_count(), rows=rows), f,
                indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
