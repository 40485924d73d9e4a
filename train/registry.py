"""Model families the trainer can build, by name.

A family is a constructor `build(model_kwargs: dict, *, rngs: nnx.Rngs) -> nnx.Module`
whose module maps `tokens [B, T] int32 -> logits [B, T, V]`, plus optional extras that
make training nicer: tensor-parallel partition rules, a FLOPs-per-token count for MFU, and
an exporter. Everything else (data, optimizer, checkpoints, sharding) is family-agnostic.

Plugging in an architecture from `models/` needs no edit here:

    # in your own module, imported before training starts
    from train import registry
    registry.register("mamba2", lambda kw, *, rngs: Mamba2(Mamba2Config(**kw), rngs=rngs))

or name it directly in a config: `config.model.family = "models.mamba2:build"` (a
"module:callable" path, imported lazily, called as `build(model_kwargs, rngs=rngs)`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional, Sequence

from flax import nnx

Build = Callable[..., nnx.Module]


@dataclasses.dataclass(frozen=True)
class Family:
  """How to build and describe one model family.

  Attributes:
    build: (model_kwargs dict, *, rngs) -> nnx.Module with `module(tokens) -> logits`.
    tp_rules: (regex on the parameter path "a/b/c", per-dim axis tuple) pairs; the first
      match gives the tensor-parallel ("model" axis) placement of that parameter. Unmatched
      parameters are only FSDP-sharded (or replicated).
    flops_per_token: (module, seq_len) -> training FLOPs per token (forward + backward).
      Default: 6 x (parameters outside the embedding table).
    export: (module, path) -> None, writes an HF-style directory.
    vocab_size: (module) -> the vocabulary size of the logits (for config checks).
  """
  build: Build
  tp_rules: Sequence[tuple[str, tuple]] = ()
  flops_per_token: Optional[Callable[[Any, int], float]] = None
  export: Optional[Callable[[Any, str], None]] = None
  vocab_size: Optional[Callable[[Any], int]] = None


_FAMILIES: dict[str, Family] = {}
_RESOLVED: dict[str, Family] = {}   # "module:callable" names, resolved once


def register(name: str, build: Build | Family, **extras) -> Family:
  """Registers a family (re-registering a name replaces it)."""
  fam = build if isinstance(build, Family) else Family(build=build, **extras)
  _FAMILIES[name] = fam
  return fam


def get(name: str) -> Family:
  """The family called `name`, or a "module:callable" constructor path."""
  if name in _FAMILIES:
    return _FAMILIES[name]
  if name in _RESOLVED:
    return _RESOLVED[name]
  if ":" in name:
    mod, _, attr = name.partition(":")
    try:
      obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"model.family={name!r}: cannot import {attr!r} from {mod!r} ({e})"
                       ) from e
    _RESOLVED[name] = obj if isinstance(obj, Family) else Family(build=obj)
    return _RESOLVED[name]
  raise ValueError(f"unknown model.family={name!r}; registered: {sorted(_FAMILIES)}, or give "
                   "a 'module:callable' path")


def names() -> list[str]:
  return sorted(_FAMILIES)


def _make_config(config_cls, kw: dict):
  """config_cls(**kw), lists as tuples (a ConfigDict holds lists); a key the class lacks
  raises a ValueError naming the known ones."""
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
  fields = {f.name for f in dataclasses.fields(config_cls)}
  bad = sorted(set(kw) - fields)
  if bad:
    raise ValueError(f"model.config has key(s) {bad} that {config_cls.__name__} does not "
                     f"know; known: {sorted(fields)}")
  return config_cls(**kw)


# --- the Llama family (models.Transformer) ----------------------------------------------
def _llama_config(kw: dict):
  from models.config import ModelConfig  # pylint: disable=import-outside-toplevel
  return _make_config(ModelConfig, kw)


def _llama_build(kw: dict, *, rngs: nnx.Rngs):
  from models.transformer import Transformer  # pylint: disable=import-outside-toplevel
  return Transformer(_llama_config(kw), rngs=rngs)


def _llama_flops(model, seq_len: int) -> float:
  """PaLM (Chowdhery et al., 2022, App. B): 6 N + 12 L Hq D T per token, N without embed."""
  c = model.config
  params = nnx.state(model, nnx.Param).to_pure_dict()
  n = sum(v.size for k, v in params.items() if k != "embed" or c.tie_word_embeddings)
  return 6.0 * n + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len


def _llama_export(model, path: str):
  from models.hf import save_pretrained  # pylint: disable=import-outside-toplevel
  save_pretrained(model, path)


# Megatron-style: column-parallel in-projections, row-parallel out-projections.
LLAMA_TP_RULES = (
    (r"^(wq|wk|wv|w_gate|w_up)$", (None, None, "model")),
    (r"^(bq|bk|bv|b_gate|b_up)$", (None, "model")),
    (r"^(wo|w_down)$", (None, "model", None)),
    (r"^lm_head$", (None, "model")),
    (r"^embed$", ("model", None)),
)

def _decoder_export(model, path: str):
  from models import decoder_io  # pylint: disable=import-outside-toplevel
  decoder_io.save(model, path)


def decoder_family(config_class: str, **extras) -> Family:
  """A family of `models.decoder.Decoder` built from a config class ("module:Class").

  The class is imported when the family is first built, so registering costs nothing and
  names stay valid while the class's module is absent. Exports use `models.decoder_io`.
  """
  def build(kw: dict, *, rngs: nnx.Rngs):
    mod, _, cls = config_class.partition(":")
    try:
      config_cls = getattr(importlib.import_module(mod), cls)
      decoder = importlib.import_module("models.decoder").Decoder
    except (ImportError, AttributeError) as e:
      raise ValueError(f"model family needs {config_class} and models.decoder.Decoder: {e}"
                       ) from e
    return decoder(_make_config(config_cls, kw), rngs=rngs)
  extras.setdefault("vocab_size", lambda m: m.config.vocab_size)
  extras.setdefault("export", _decoder_export)
  return Family(build=build, **extras)


register("llama", _llama_build, tp_rules=LLAMA_TP_RULES, flops_per_token=_llama_flops,
         export=_llama_export, vocab_size=lambda m: m.config.vocab_size)

# The retrained families of models/ (models.decoder.Decoder + a config class each).
for _name, _cls in {
    "sliding": "models.local:SlidingConfig", "dilated": "models.local:DilatedConfig",
    "local_global": "models.local:LocalAttentionConfig",
    "linear_attention": "models.linear_attention:LinearAttentionConfig",
    "gla": "models.linear_attention:GLAConfig", "retnet": "models.linear_attention:RetNetConfig",
    "mamba2": "models.ssm:Mamba2Config", "hybrid": "models.hybrid:HybridConfig",
    "cla": "models.kv_sharing:CLAConfig", "mla": "models.kv_sharing:MLAConfig"}.items():
  register(_name, decoder_family(_cls))
