"""Recipe: byte-level LM on local text (the Python standard library, or your files).

    python -m train.main --config=train/configs/text_lm.py --workdir=/tmp/text_lm
    # your own text / JSONL ({"text": ...} per line) instead of the stdlib:
    python -m train.main --config=train/configs/text_lm.py --workdir=/tmp/mine \
        --config.data.sources.stdlib.weight=0 --config.data.sources.files.weight=1 \
        --config.data.sources.files.paths=a.txt,b.jsonl \
        --config.data.sources.files.eval_paths=heldout.jsonl

A source with weight 0 is switched off. Held-out loss is reported per source (stdlib:
about 2% of its files; files: eval_paths).
"""

import ml_collections

from train.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.steps = 2000
  c.batch_size = 16
  c.seq_len = 256
  c.model.config.hidden_size = 128
  c.model.config.intermediate_size = 384
  c.model.config.num_layers = 4
  c.model.config.num_heads = 4
  c.model.config.num_kv_heads = 2
  c.model.config.head_dim = 32
  c.opt.lr = 2e-3
  c.data.sources = ml_collections.ConfigDict(dict(
      stdlib=ml_collections.ConfigDict(dict(kind="stdlib", weight=1.0, heldout_percent=2)),
      files=ml_collections.ConfigDict(dict(kind="files", weight=0.0, paths="",
                                           eval_paths="", jsonl_field="text")),
  ))
  c.eval_every = 500
  c.eval_examples = 64
  c.eval_batch_size = 16
  c.checkpoint_every = 500
  return c
