"""Recipe: a 2-layer Llama-family byte model learns MQAR (Arora et al., 2023) on CPU.

    python -m train.main --config=train/configs/mqar_tiny.py --workdir=/tmp/mqar_tiny

Sequences of 64 tokens hold 8 key-value pairs, then 8 queries at random slots; only the 8
answers count in the loss. Two attention layers can solve it with an induction-head
circuit (Olsson et al., 2022), so held-out exact match (all 8 answers right) climbs close
to 1.0; see the numbers this recipe was run with in the train/ README section of the
report.
"""

import ml_collections

from train.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  c.steps = 1500
  c.batch_size = 32
  c.seq_len = 64
  c.model.config.hidden_size = 64
  c.model.config.intermediate_size = 128
  c.model.config.num_layers = 2
  c.model.config.num_heads = 4
  c.model.config.num_kv_heads = 4
  c.model.config.head_dim = 16
  c.model.config.max_position_embeddings = 128
  c.opt.lr = 3e-3
  c.opt.warmup_steps = 100
  c.opt.weight_decay = 0.1
  c.data.sources = ml_collections.ConfigDict(dict(
      mqar=ml_collections.ConfigDict(dict(kind="mqar", weight=1.0, num_pairs=8,
                                          key_vocab=128, value_vocab=128,
                                          num_queries=ml_collections.config_dict.placeholder(int),
                                          query_replacement=False)),
  ))
  c.log_every = 50
  c.eval_every = 250
  c.eval_examples = 512
  c.eval_batch_size = 128
  c.checkpoint_every = 500
  c.export = True
  return c
