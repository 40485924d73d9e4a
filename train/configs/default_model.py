"""Recipe of the shipped default model (`models/default/`): a byte-level Llama that retrieves.

    python -m train.curriculum --config=train/configs/default_model.py \
        --workdir=/tmp/default_model --out=models/default

A 3-layer, hidden-128 Llama (GQA 4 query / 2 KV heads, head_dim 32, RoPE theta 5e5) trained
on Python standard-library source (language modelling) mixed with synthetic retrieval tasks
(`train/tasks.py`): pass keys hidden in filler text, key-value lookup in a JSON object and
MQAR. Sequences grow stage by stage (`STAGES` below); each stage warm-starts from the
previous stage's exported parameters (`init_from`) with a fresh optimizer and a short
warmup. The whole run fits a shared 2-core CPU in well under an hour and a half.

`get_config()` is the base (every key of train/configs/default.py); `STAGES` holds each
stage's overrides, applied by `train.curriculum`. Running this file directly with
`python -m train.main --config=train/configs/default_model.py` trains the first stage only.
"""

import ml_collections

from train.configs import default


def model_config() -> ml_collections.ConfigDict:
  """models.ModelConfig settings of the default model."""
  return ml_collections.ConfigDict(dict(
      vocab_size=260, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4,
      num_kv_heads=2, head_dim=32, max_position_embeddings=8192, rope_theta=500000.0,
      tie_word_embeddings=False, dtype="float32", bos_token_id=256, eos_token_id=257,
      pad_token_id=258))


def sources(kv_pairs=None) -> ml_collections.ConfigDict:
  """The data mixture: weights are fractions of sequences, not of loss tokens."""
  return ml_collections.ConfigDict(dict(
      stdlib=ml_collections.ConfigDict(dict(kind="stdlib", weight=0.15)),
      passkey=ml_collections.ConfigDict(dict(kind="passkey", weight=0.4, digits=5)),
      kv=ml_collections.ConfigDict(dict(kind="kv_retrieval", weight=0.3, key_chars=6,
                                        value_chars=6, num_pairs=kv_pairs)),
      mqar=ml_collections.ConfigDict(dict(kind="mqar", weight=0.15, num_pairs=8)),
  ))


# Curriculum: (seq_len, steps, batch_size, peak lr). Short sequences carry most of the
# steps (the retrieval circuit forms there, cheaply); the long stages teach the model to
# find the needle among thousands of positions.
STAGES = (
    dict(seq_len=128, steps=500, batch_size=16, lr=3e-3, warmup_steps=30),
    dict(seq_len=256, steps=200, batch_size=16, lr=2e-3, warmup_steps=20),
    dict(seq_len=512, steps=100, batch_size=8, lr=1e-3, warmup_steps=10),
    dict(seq_len=1024, steps=60, batch_size=4, lr=7e-4, warmup_steps=10),
    dict(seq_len=2048, steps=40, batch_size=2, lr=5e-4, warmup_steps=5),
)


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.seed = 0
  c.model.config = model_config()
  c.data.sources = sources()
  s = STAGES[0]
  c.seq_len, c.steps, c.batch_size, c.opt.lr = s["seq_len"], s["steps"], s["batch_size"], s["lr"]
  c.opt.warmup_steps = 50
  c.opt.weight_decay = 0.05
  c.log_every = 10
  c.eval_every = 100
  c.eval_examples = 32
  c.eval_batch_size = 8
  c.checkpoint_every = 100
  c.keep_checkpoints = 1
  c.export = True
  c.tensorboard = False
  c.progress_bar = False
  return c
