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

import os
import tempfile

import ml_collections
import numpy as np

from train.configs import default

REPEATS_VERSION = 2


def repeats_corpus(path: str = "", size: int = 4_000_000, seed: int = 0) -> str:
  """Writes (once) a synthetic text corpus that only induction can predict; returns its path.

  Each line is random lower-case letters and digits in which random spans (4-24
  characters) reappear 0-100 characters later, so the only predictable characters are
  the second occurrences, and the only way to predict them is to find the first occurrence
  by content and copy what followed it (an induction head; Olsson et al., 2022). Fixed
  offsets do not work, unlike a copy task of fixed length. Deterministic in `seed`.
  """
  path = path or os.path.join(tempfile.gettempdir(),
                              f"kvjax_default_model_repeats_v{REPEATS_VERSION}_{seed}.txt")
  if os.path.exists(path) and os.path.getsize(path) >= size:
    return path
  rng = np.random.default_rng(seed)
  alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8)
  lines, total = [], 0
  while total < size:
    line = list(alphabet[rng.integers(0, len(alphabet), int(rng.integers(200, 1500)))])
    for _ in range(len(line) // 40):   # spans copied a little further on in the line
      n = int(rng.integers(4, 25))
      src = int(rng.integers(0, len(line) - n))
      dst = min(len(line), src + n + int(rng.integers(0, 101)))
      line[dst:dst] = line[src:src + n]
    text = bytes(line).decode("ascii")
    lines.append(text)
    total += len(text) + 1
  tmp = path + f".{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)
  return path


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
      # random strings repeated once: dense targets that teach the copy (induction) circuit
      # retrieval needs; three lengths, so that no fixed offset solves them
      copy12=ml_collections.ConfigDict(dict(kind="copy", weight=0.0, num_tokens=12)),
      # random text with repeated spans at random distances (repeats_corpus)
      repeats=ml_collections.ConfigDict(dict(kind="files", weight=0.0,
                                             paths=repeats_corpus())),
      copy30=ml_collections.ConfigDict(dict(kind="copy", weight=0.0, num_tokens=30)),
      copy60=ml_collections.ConfigDict(dict(kind="copy", weight=0.0, num_tokens=60)),
  ))


# Curriculum: (seq_len, steps, batch_size, peak lr, mixture weights). The first stage has
# no text and mostly copying, to grow the copy (induction) circuit that retrieval needs; the
# later stages mix text with pass-key / key-value retrieval at growing lengths. A text
# sequence carries ~50x the loss tokens of a retrieval example, so text is a minority of
# the sequences. (With this budget the model learns to copy at the copy tasks' fixed
# distances but not to retrieve by content; see models/default/README.md.)
COPY_FIRST = dict(stdlib=0.0, passkey=0.25, kv=0.1, mqar=0.1, copy12=0.2, copy30=0.2,
                  copy60=0.15, repeats=0.0)
MIXED = dict(stdlib=0.35, passkey=0.4, kv=0.15, mqar=0.05, copy12=0.0, copy30=0.0,
             copy60=0.0, repeats=0.05)
STAGES = (
    dict(seq_len=128, steps=350, batch_size=16, lr=4e-3, warmup_steps=30, weights=COPY_FIRST),
    dict(seq_len=256, steps=80, batch_size=16, lr=2e-3, warmup_steps=10, weights=MIXED),
    dict(seq_len=512, steps=40, batch_size=8, lr=1e-3, warmup_steps=5, weights=MIXED,
         eval_examples=16),
    dict(seq_len=1024, steps=30, batch_size=4, lr=7e-4, warmup_steps=5, weights=MIXED,
         eval_examples=8),
    dict(seq_len=2048, steps=20, batch_size=2, lr=5e-4, warmup_steps=3, weights=MIXED,
         eval_examples=8),
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
