r"""Learn DuoAttention's retrieval-head gates on a pretrained model (only the gates train).

DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads", arXiv:2410.10819) gives every (layer, kv head) a gate
alpha in [0, 1] and mixes, per head,

    attn = alpha * full_causal_attention + (1 - alpha) * streaming_attention

where streaming attention sees only the first `n_sink` tokens and the last `recent` ones.
The model's weights stay frozen; the gates are optimised on synthetic pass-key data to
keep the final hidden states of the answer region close to the full model's, with an L1
penalty pushing gates to 0 (streaming):

    loss = mean_{last n_tail positions} ||h_full - h_alpha||^2 / H  +  lam * mean(alpha)

Heads whose gate stays high are retrieval heads. `DuoAttentionPress(head_scores=gates)`
then keeps the full cache only for them (kvjax/presses/duo_attention.py).

    python -m train.duo_gates --model=smollm2-135m --steps=200 \
        --out=models/smollm2_135m/duo_gates.json

Differences from the paper: shorter contexts (CPU budget; the paper trains on 32K-token
multi-pass-key sequences with sink 64 / recent 256), n_sink and recent scaled down with them,
and the loss over the last `n_tail` positions (question and answer) rather than the
paper's pass-key spans.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import transformer as tf_lib

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """Static settings of the gate optimisation."""
  n_sink: int = 16
  recent: int = 64
  length: int = 384          # tokens per training sequence
  batch: int = 2
  steps: int = 200
  lr: float = 0.02
  lam: float = 0.05          # L1 weight on the gates
  n_tail: int = 24           # loss positions at the end (question + answer)
  seed: int = 0

  def __post_init__(self):
    for name in ("n_sink", "recent", "length", "batch", "n_tail"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"GateConfig.{name}={v!r}; must be an int >= 1")
    if not isinstance(self.steps, (int, np.integer)) or self.steps < 0:
      raise ValueError(f"GateConfig.steps={self.steps!r}; must be an int >= 0")
    if self.n_sink + self.recent >= self.length:
      raise ValueError(f"GateConfig: n_sink + recent = {self.n_sink + self.recent} must be below "
                       f"length={self.length}, or every head sees everything")
    if self.n_tail >= self.length:
      raise ValueError(f"GateConfig.n_tail={self.n_tail} must be below length={self.length}")
    for name in ("lr", "lam"):
      v = float(getattr(self, name))
      if not np.isfinite(v) or v < 0 or (name == "lr" and v == 0):
        raise ValueError(f"GateConfig.{name}={v!r}; must be finite and > 0"
                         + (" (or = 0)" if name == "lam" else ""))


def gated_attention(q, k, v, alpha, *, n_sink: int, recent: int, scale: float):
  """alpha-mixed full / streaming causal attention over one contiguous sequence.

  Args:
    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (RoPE applied); alpha: [Hkv] in [0, 1].
    n_sink, recent: streaming heads see key j from query i when j < n_sink or i - j < recent.
    scale: logit scale.

  Returns: [B, Hq, T, D] float32.
  """
  b, hq, t, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  qg = q.reshape(b, hkv, g, t, d).astype(jnp.float32)
  s = jnp.einsum("bhgqd,bhkd->bhgqk", qg, k.astype(jnp.float32)) * scale
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  causal = j <= i
  stream = causal & ((j < n_sink) | (i - j < recent))
  neg = jnp.finfo(jnp.float32).min
  vf = v.astype(jnp.float32)
  full = jnp.einsum("bhgqk,bhkd->bhgqd", jax.nn.softmax(jnp.where(causal, s, neg), -1), vf)
  strm = jnp.einsum("bhgqk,bhkd->bhgqd", jax.nn.softmax(jnp.where(stream, s, neg), -1), vf)
  a = alpha.astype(jnp.float32)[None, :, None, None, None]
  return (a * full + (1 - a) * strm).reshape(b, hq, t, d)


def _check_model(model):
  c = model.config
  specs = tf_lib.layer_specs(c)
  if any(s != specs[0] for s in specs):
    raise ValueError("train.duo_gates needs a model whose layers share one attention setting "
                     "(Llama / Qwen2 / full-attention Mistral); this one mixes layer kinds")
  if specs[0].attn.window is not None or specs[0].attn.softcap is not None:
    raise ValueError("train.duo_gates supports full-attention layers without soft-capping")
  return specs[0]


def hidden_states(model, tokens, alphas, gc: GateConfig):
  """Final hidden states [B, T, H] (after the final norm) with gates alphas [L, Hkv]."""
  c = model.config
  spec = _check_model(model)
  scale = spec.attn.scale if spec.attn.scale is not None else c.head_dim ** -0.5
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x = model.embed_tokens(tokens)
  params = model.layer_params()

  def body(x, layer):
    p, alpha = layer
    q, k, v = tf_lib.layer_qkv(p, x, positions, spec, c)
    o = gated_attention(q, k, v, alpha, n_sink=gc.n_sink, recent=gc.recent, scale=scale)
    return tf_lib.layer_finish(p, x, o.astype(x.dtype), c), None

  x, _ = jax.lax.scan(body, x, (params, alphas))
  return tf_lib.rms_norm(x, model.final_norm.value, c.rms_norm_eps, c.norm_unit_offset)


def passkey_batch(tokenizer, gc: GateConfig, step: int) -> np.ndarray:
  """[batch, length] token ids: filler with a 5-digit pass key at a random depth, then the
  question and the answer, the answer ending the sequence (the loss region)."""
  rng = np.random.default_rng([gc.seed, step])
  fill_ids = tokenizer.encode(FILLER * 8)
  rows = []
  for _ in range(gc.batch):
    key = str(int(rng.integers(10_000, 100_000)))
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    tail = tokenizer.encode(f" What is the pass key? The pass key is {key}.")
    room = gc.length - len(needle) - len(tail)
    if room < 2:
      raise ValueError(f"GateConfig.length={gc.length} is too short for the pass-key text")
    body = (fill_ids * (room // len(fill_ids) + 1))[:room]
    at = int(rng.integers(0, room - 1))
    rows.append(body[:at] + needle + body[at:] + tail)
  return np.asarray(rows, np.int32)


def train_gates(model, tokenizer, gc: GateConfig = GateConfig(), *, log=None):
  """Optimises the gates; returns (gates [L, Hkv] float64 in [0, 1], history of losses)."""
  c = model.config
  _check_model(model)
  alphas = jnp.ones((c.num_layers, c.num_kv_heads), jnp.float32)
  opt = optax.adam(gc.lr)
  state = opt.init(alphas)

  def loss_fn(alphas, tokens, target):
    h = hidden_states(model, tokens, alphas, gc)[:, -gc.n_tail:].astype(jnp.float32)
    distill = jnp.mean(jnp.sum((h - target) ** 2, -1)) / c.hidden_size
    return distill + gc.lam * jnp.mean(alphas), distill

  @jax.jit
  def step(alphas, state, tokens):
    full = jnp.ones_like(alphas)
    target = jax.lax.stop_gradient(
        hidden_states(model, tokens, full, gc)[:, -gc.n_tail:].astype(jnp.float32))
    (loss, distill), grad = jax.value_and_grad(loss_fn, has_aux=True)(alphas, tokens, target)
    upd, state = opt.update(grad, state, alphas)
    alphas = jnp.clip(optax.apply_updates(alphas, upd), 0.0, 1.0)
    return alphas, state, loss, distill

  history = []
  t0 = time.time()
  for i in range(gc.steps):
    tokens = jnp.asarray(passkey_batch(tokenizer, gc, i))
    alphas, state, loss, distill = step(alphas, state, tokens)
    loss, distill = float(loss), float(distill)
    if not np.isfinite(loss):
      raise FloatingPointError(f"train.duo_gates: non-finite loss {loss} at step {i}")
    history.append({"step": i, "loss": loss, "distill": distill,
                    "mean_gate": float(jnp.mean(alphas))})
    if log is not None and (i % 10 == 0 or i == gc.steps - 1):
      log(f"step {i:4d}  loss {loss:.4f}  distill {distill:.4f}  "
          f"mean gate {float(jnp.mean(alphas)):.3f}  ({time.time() - t0:.0f}s)")
  return np.asarray(alphas, np.float64), history


def save_gates(path: str, gates: np.ndarray, gc: GateConfig, model_name: str,
               history: Sequence[dict]):
  """Gates as JSON (plain numbers: loading them runs nothing)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"model": model_name, "gates": np.asarray(gates).tolist(),
               "config": dataclasses.asdict(gc), "history": list(history)}, f, indent=1)


def load_gates(path: str, num_layers: Optional[int] = None,
               num_kv_heads: Optional[int] = None) -> np.ndarray:
  """Gates [L, Hkv] from `save_gates`' JSON, checked for shape and range."""
  size = os.path.getsize(path)
  if size > 16 << 20:
    raise ValueError(f"{path}: {size} bytes is too large for a gate file")
  with open(path) as f:
    try:
      obj = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not JSON ({e})") from e
  g = np.asarray(obj.get("gates") if isinstance(obj, dict) else None, np.float64)
  if g.ndim != 2 or not np.isfinite(g).all() or (g < 0).any() or (g > 1).any():
    raise ValueError(f"{path}: 'gates' must be a finite [layers, kv_heads] list in [0, 1]")
  if num_layers is not None and g.shape != (num_layers, num_kv_heads):
    raise ValueError(f"{path}: gates of shape {g.shape}; the model has "
                     f"({num_layers}, {num_kv_heads}) (layers, kv heads)")
  return g


def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel
  from models import presets  # pylint: disable=import-outside-toplevel
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="smollm2-135m",
                  help="model name or directory (models/presets.py names, e.g. smollm2-135m)")
  ap.add_argument("--out", required=True, help="JSON file for the learned gates")
  for f in dataclasses.fields(GateConfig):
    ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                    help=f"GateConfig.{f.name} (default {f.default})")
  ap.add_argument("--dtype", default="float32", help="model dtype (float32 or bfloat16)")
  args = ap.parse_args(argv)
  gc = GateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GateConfig)})
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  if not os.access(out_dir, os.W_OK):
    raise SystemExit(f"--out={args.out}: directory {out_dir} is not writable")
  model, tok = presets.load_model_and_tokenizer(args.model, dtype=args.dtype)
  gates, hist = train_gates(model, tok, gc, log=lambda m: print(m, file=sys.stderr, flush=True))
  save_gates(args.out, gates, gc, args.model, hist)
  order = np.argsort(-gates, axis=None)
  top = [(int(i // gates.shape[1]), int(i % gates.shape[1]), round(float(gates.flat[i]), 3))
         for i in order[:10]]
  print(f"wrote {args.out}; mean gate {gates.mean():.3f}; "
        f"heads with gate > 0.5: {int((gates > 0.5).sum())} of {gates.size}; "
        f"top (layer, kv head, gate): {top}")


if __name__ == "__main__":
  main()
