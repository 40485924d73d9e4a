"""Recipe: a 2-layer Llama-family byte model learns MQAR (Arora et al., 2023) on CPU.

    python -m train.main --config=train/configs/mqar_tiny.py --workdir=/tmp/mqar_tiny

Sequences of 32 tokens hold 4 key-value pairs (keys from 128 byte ids, values from 128
others), then 12 queries drawn with replacement; only the 12 answers count in the loss.
Queries with replacement matter: with each key asked once (Zoology's form), a small model
first learns to answer "a value of this context not asked for yet", which scores
1/4, 1/3, 1/2, 1 on the four queries, and in our CPU runs stayed on that plateau for 3000
steps (token accuracy 0.55, exact match 0.05); asking keys repeatedly removes the shortcut
and the induction-head circuit (Olsson et al., 2022) forms within ~500 steps.

Measured (one run, 2-core CPU shared with other jobs, 1000 steps, 2m50s wall including a
26s compile): held-out exact match (all 12 answers right) 0.959, token accuracy 0.995.
The exported model scores exact match 0.965 on standard MQAR (4 pairs, each key asked
once; `evaluate.task_accuracy`) and 0.71 at twice the trained length (T=64).
"""

import ml_collections

from train.configs import default


def get_config() -> ml_collections.ConfigDict:
  return default.recipe(
      steps=1000, batch_size=32, seq_len=32,
      model=dict(config=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=4, head_dim=16, max_position_embeddings=128)),
      opt=dict(lr=3e-3, warmup_steps=100, weight_decay=0.1),
      sources=dict(mqar=dict(kind="mqar", weight=1.0, num_pairs=4, key_vocab=128,
                             value_vocab=128, num_queries=12, query_replacement=True)),
      log_every=50, eval_every=250, eval_examples=512, eval_batch_size=128,
      checkpoint_every=500, export=True)
