"""Model families by name: (config dataclass, module constructor), and their cost table.

    cfg_cls, ctor = FAMILIES["gla"]
    model = ctor(cfg_cls(num_layers=6), rngs=nnx.Rngs(0))
    logits = model(tokens)                       # [B, T, V] float32, every family
    logits, cache = model.prefill(tokens, capacity=N); model.decode(next_ids, cache)

or `build("gla", num_layers=6, seed=0)`. Every default config is a small byte-level model
(vocab 260 = `models.tokenizer.ByteTokenizer`) for the synthetic tasks in `train.tasks`.

    python -m models.registry --table [--context 4096] [--families gla,mla]

prints family, parameters, and cache bytes per token at the given context (the cache's
exact `nbytes` after a prefill of that many tokens, batch 1, divided by the context; for
fixed-size states that is state bytes / context).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Callable, NamedTuple

import jax
from flax import nnx

from kvjax import cache as cache_lib
from models import api
from models import decoder as dec
from models import hybrid, kv_sharing, linear_attention, local, ssm
from models.config import ModelConfig
from models.transformer import Transformer


class Family(NamedTuple):
  config: type          # frozen config dataclass; its defaults are the small default model
  build: Callable       # build(config, *, rngs: nnx.Rngs) -> nnx.Module


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
  """The GQA baseline (`models.Transformer`) with the same small defaults as the others."""

  vocab_size: int = 260
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 8192


FAMILIES: dict[str, Family] = {
    "llama": Family(LlamaConfig, Transformer),
    "sliding": Family(local.SlidingConfig, dec.Decoder),
    "dilated": Family(local.DilatedConfig, dec.Decoder),
    "gla": Family(linear_attention.GLAConfig, dec.Decoder),
    "retnet": Family(linear_attention.RetNetConfig, dec.Decoder),
    "mamba2": Family(ssm.Mamba2Config, dec.Decoder),
    "hybrid": Family(hybrid.HybridConfig, dec.Decoder),
    "cla": Family(kv_sharing.CLAConfig, dec.Decoder),
    "mla": Family(kv_sharing.MLAConfig, dec.Decoder),
}


def get(family: str) -> Family:
  if family not in FAMILIES:
    raise ValueError(f"family={family!r}; known: {sorted(FAMILIES)}")
  return FAMILIES[family]


def make_config(family: str, **overrides):
  """The family's default config with `overrides` (unknown fields raise ValueError)."""
  cls = get(family).config
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; fields: {sorted(names)}")
  return cls(**overrides)


def build(family: str, config=None, *, seed: int = 0, **overrides):
  """A model of `family` from `config` (or its default config with overrides)."""
  fam = get(family)
  if config is None:
    config = make_config(family, **overrides)
  elif overrides:
    config = dataclasses.replace(config, **overrides)
  if not isinstance(config, fam.config):
    raise ValueError(f"config is a {type(config).__name__}; family {family!r} takes "
                     f"{fam.config.__name__}")
  return fam.build(config, rngs=nnx.Rngs(seed))


def count_params(model) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(family: str, config=None):
  """The model with ShapeDtypeStruct parameters (no init compute)."""
  fam = get(family)
  config = config if config is not None else fam.config()
  return nnx.eval_shape(lambda: fam.build(config, rngs=nnx.Rngs(0)))


def prefill_cache_nbytes(model, length: int, batch: int = 1) -> int:
  """Exact `nbytes` of the cache a prefill of `length` tokens returns (abstract evaluation:
  the same jitted computation, traced for shapes only)."""
  if isinstance(model, Transformer):  # its prefill returns init_cache(capacity=length), filled
    return cache_lib.tree_nbytes(jax.eval_shape(
        lambda: api.init_cache(model.config, batch, length)))
  return cache_lib.tree_nbytes(dec.prefill_cache_shape(model, length, batch))


def table(families=None, context: int = 4096) -> list[dict]:
  """Rows {family, params, cache_bytes_per_token, cache_bytes} for default configs."""
  rows = []
  for name in families or FAMILIES:
    model = abstract_model(name)
    nbytes = prefill_cache_nbytes(model, context)
    rows.append({"family": name, "params": count_params(model),
                 "cache_bytes": nbytes, "cache_bytes_per_token": nbytes / context})
  return rows


def format_table(rows, context: int) -> str:
  head = f"{'family':<9} {'params':>10} {'cache B/token @' + str(context):>20} {'cache bytes':>12}"
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['family']:<9} {r['params']:>10,} {r['cache_bytes_per_token']:>20.1f} "
                 f"{r['cache_bytes']:>12,}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--table", action="store_true",
                      help="print family / params / cache bytes per token for default configs")
  parser.add_argument("--context", type=int, default=4096,
                      help="context length (tokens) at which cache bytes are measured")
  parser.add_argument("--families", default="",
                      help=f"comma-separated subset of {sorted(FAMILIES)} (default: all)")
  args = parser.parse_args(argv)
  if not args.table:
    parser.print_help()
    return 0
  fams = [f for f in args.families.split(",") if f] or None
  print(format_table(table(fams, args.context), args.context))
  return 0


if __name__ == "__main__":
  sys.exit(main())
