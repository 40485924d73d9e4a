"""Default training config: a tiny Llama-family byte model on MQAR + stdlib text.

    python -m train.main --config=train/configs/default.py --workdir=/tmp/run \
        --config.steps=200 --config.data.sources.mqar.num_pairs=4

Every key is documented where it is set; the config is locked, so a misspelt override
fails at once.
"""

import ml_collections


def llama_tiny() -> ml_collections.ConfigDict:
  """Constructor settings of models.ModelConfig (the "llama" family)."""
  return ml_collections.ConfigDict(dict(
      vocab_size=260, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=10000.0,
      tie_word_embeddings=False, dtype="float32", bos_token_id=256, eos_token_id=257,
      pad_token_id=258))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                       # model init, data order and task examples
  c.steps = 1000                   # optimizer steps
  c.batch_size = 32                # global sequences per optimizer step
  c.grad_accum_steps = 1           # micro-batches per step (batch_size / this per pass)
  c.seq_len = 256                  # model input length T (examples hold T + 1 tokens)

  c.model = ml_collections.ConfigDict()
  c.model.family = "llama"         # train.registry name or "module:callable"
  c.model.config = llama_tiny()    # keyword settings handed to the family's constructor
  c.model.param_dtype = "float32"  # parameters and optimizer state
  c.model.compute_dtype = "float32"  # forward/backward ("bfloat16" for mixed precision)

  c.opt = ml_collections.ConfigDict(dict(
      lr=3e-3,                     # peak learning rate
      warmup_steps=100,            # linear warmup from 0
      decay_steps=-1,              # cosine decay length; <= 0 means `steps`
      min_lr_ratio=0.1,            # final lr = lr * this
      weight_decay=0.1,
      b1=0.9, b2=0.95, eps=1e-8,
      clip_norm=1.0,               # global-norm clipping; 0 disables
      no_decay_regex=r"norm|bias|scale|^b_|^b[qkvo]$",  # param names without weight decay
  ))

  # Data: a mixture of named sources; each has a kind, a weight and the kind's settings.
  # kinds: mqar, passkey, kv_retrieval, copy (train/tasks.py), stdlib (Python sources),
  # files (paths="a.txt,b.jsonl", eval_paths=..., jsonl_field="text").
  c.data = ml_collections.ConfigDict()
  c.data.sources = ml_collections.ConfigDict(dict(
      mqar=ml_collections.ConfigDict(dict(kind="mqar", weight=1.0, num_pairs=8)),
      stdlib=ml_collections.ConfigDict(dict(kind="stdlib", weight=1.0)),
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                     # data-parallel devices (-1: all that `model` leaves)
      model=1,                     # tensor-parallel devices
      fsdp=False,                  # also shard large params / optimizer state over `data`
      fsdp_min_size=2 ** 14,       # params with fewer elements stay replicated
  ))
  c.distributed = "auto"           # jax.distributed.initialize(): auto | true | false

  c.log_every = 10                 # train metrics every N steps
  c.eval_every = 200               # eval every N steps (0: only at the end)
  c.eval_examples = 128            # per source (tasks: held-out seed; text: held-out files)
  c.eval_batch_size = 32
  c.checkpoint_every = 200         # N > 0: every N steps; 0: only at the end/preemption;
                                   # -1: never
  c.keep_checkpoints = 3           # keep the last N
  c.async_checkpoint = True
  c.init_from = ""                 # HF-format or kvjax Decoder model dir: copy matching
                                   # params into a fresh run (warm start; a Llama into a
                                   # Decoder family maps its weights, models/from_llama.py)
  c.objective = "lm"               # "lm": next-token loss | "attention_transfer": match
                                   # `teacher`'s per-layer attention outputs (train/convert.py)
  c.teacher = ""                   # attention_transfer: HF dir of a full-attention Llama
  c.trainable = ""                 # regex over param paths ("groups/0/1/mixer/wq"): only
                                   # matching params train, the rest stay bit-identical
                                   # ("" = all)
  c.export = False                 # write the final model (HF format) + tokenizer
  c.export_dir = ""                # default: <workdir>/export
  c.tensorboard = True             # event files in <workdir>/tensorboard
  c.progress_bar = True
  c.peak_flops_per_device = 0.0    # for MFU where the device kind is unknown (e.g. CPU)
  c.compilation_cache_dir = ""     # persistent XLA compilation cache (speeds up restarts)
  return c


def recipe(*, model_config=None, sources=None, **changes) -> ml_collections.ConfigDict:
  """get_config() with a recipe's changes.

  Args:
    model_config: replaces model.config (a family's constructor settings), if given.
    sources: replaces data.sources ({name: {"kind": ..., "weight": ..., ...}}), if given.
    **changes: top-level keys; a dict merges into the section it names
      (`opt=dict(lr=1e-3)`, `model=dict(config=dict(num_layers=4))`). Each key must
      already exist in get_config(), so a misspelt one fails at once.

  Returns:
    The config, unlocked (train.main locks it when it loads the file).
  """
  c = get_config()
  c.lock()
  try:
    c.update(changes)
  except KeyError as e:
    raise ValueError(f"recipe changes a key get_config() lacks: {e.args[0]}") from None
  c.unlock()
  if model_config is not None:
    c.model.config = ml_collections.ConfigDict(model_config)
  if sources is not None:
    c.data.sources = ml_collections.ConfigDict(sources)
  return c
