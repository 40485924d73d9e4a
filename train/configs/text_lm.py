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
  return default.recipe(
      steps=2000, batch_size=16, seq_len=256,
      model=dict(config=dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=32)),
      opt=dict(lr=2e-3),
      sources=dict(
          stdlib=dict(kind="stdlib", weight=1.0, heldout_percent=2),
          files=dict(kind="files", weight=0.0, paths="", eval_paths="", jsonl_field="text")),
      eval_every=500, eval_examples=64, eval_batch_size=16, checkpoint_every=500)
