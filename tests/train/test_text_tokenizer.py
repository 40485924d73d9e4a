"""Training on text with the checkpoint's own tokenizer (train/data.py `tokenizer`, the
train/configs/finetune_text.py recipe): a tiny HF directory with a tokenizer.json written
here fine-tunes a few steps on a repeated text."""

import json
import os

import numpy as np
import pytest
from flax import nnx

import models
from models import tokenizer as tok_lib
from train import data as data_lib
from train import train as train_lib
from train.configs import finetune_text

WORDS = ["the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "park", ".", ","]
TEXT = "the cat sat on the mat , and the dog ran to the park . " * 12


def _tokenizer_json(path):
  """A WordLevel tokenizer.json: [UNK]=0, words 1.., <eos> last; whitespace split."""
  from tokenizers import Tokenizer, pre_tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import models as tm  # pylint: disable=import-outside-toplevel
  vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, "<eos>": len(WORDS) + 1}
  tok = Tokenizer(tm.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(path)
  return vocab


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_hf")
  vocab = _tokenizer_json(str(d / "tokenizer.json"))
  # vocab 264: train.check_config wants room for the byte tokenizer's 260 ids too
  cfg = models.ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128,
                           eos_token_id=vocab["<eos>"])
  models.save_pretrained(models.Transformer(cfg, rngs=nnx.Rngs(0)), str(d))
  with open(d / "generation_config.json", "w") as f:
    json.dump({"eos_token_id": [vocab["<eos>"], vocab["."]], "temperature": 0.7,
               "top_p": 0.9, "do_sample": True}, f)
  with open(d / "tokenizer_config.json", "w") as f:
    json.dump({"chat_template": "{{ messages }}", "add_bos_token": False}, f)
  (d / "text.txt").write_text(TEXT)
  return str(d), vocab


def test_tokenizer_reads_hf_side_files(hf_dir):
  path, vocab = hf_dir
  tok = tok_lib.load(path)
  assert tok.eos_id == vocab["<eos>"] and tok.eos_ids == (vocab["<eos>"], vocab["."])
  assert tok.generation == {"temperature": 0.7, "top_p": 0.9}
  assert tok.chat_template == "{{ messages }}" and tok.add_bos is False
  assert tok.encode("the cat .") == [vocab["the"], vocab["cat"], vocab["."]]


def test_text_stream_uses_the_tokenizer(hf_dir):
  path, vocab = hf_dir
  src = data_lib.make_source("text", dict(kind="files", paths=os.path.join(path, "text.txt"),
                                          tokenizer=path), 9)
  # by hand: whitespace words -> ids, then the EOS after the document
  want = [vocab[w] for w in TEXT.split()] + [vocab["<eos>"]]
  assert src.num_chunks == len(want) // 9
  np.testing.assert_array_equal(src.read(0, len(want)), want)
  ex = src.example(0, 0)
  assert ex.tokens.shape == (9,) and set(ex.tokens.tolist()) <= set(vocab.values())


@pytest.mark.parametrize("spec,match", [
    ("/nonexistent/tok", "neither an existing path"),
    (3, "must be a string"),
])
def test_bad_tokenizer_setting(spec, match):
  with pytest.raises(ValueError, match=match):
    data_lib.load_tokenizer(spec)


def test_tokenizer_refused_on_byte_tasks(hf_dir):
  with pytest.raises(ValueError, match="byte-level task"):
    data_lib.make_source("m", dict(kind="mqar", tokenizer=hf_dir[0]), 32)


def test_finetune_recipe_trains_on_tokenised_text(hf_dir, tmp_path):
  path, _ = hf_dir
  c = finetune_text.get_config(path)
  assert c.init_from == path and c.model.config.vocab_size == 264
  c.data.sources.text.paths = os.path.join(path, "text.txt")
  c.steps, c.batch_size, c.seq_len = 8, 4, 16
  c.opt.lr, c.opt.warmup_steps = 3e-3, 1
  c.mesh.data = 1
  c.progress_bar = c.tensorboard = False
  out = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
  assert out["step"] == 8
  rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r and r.get("split", "train") == "train"]
  assert len(losses) >= 4 and np.isfinite(losses).all()
  assert losses[-1] < losses[0] - 0.5, losses   # the repeated text is being learned


def test_hf_tokenizer_save_round_trip(hf_dir, tmp_path):
  path, vocab = hf_dir
  tok = tok_lib.load(path)
  tok.save(str(tmp_path / "copy"))
  back = tok_lib.load(str(tmp_path / "copy"))
  assert back.encode(TEXT) == tok.encode(TEXT) == [vocab[w] for w in TEXT.split()]
  assert back.eos_ids == (vocab["<eos>"], vocab["."]) and back.eos_id == vocab["<eos>"]
  assert back.generation == {"temperature": 0.7, "top_p": 0.9}
  assert back.chat_template == "{{ messages }}" and back.add_bos is False


def test_export_writes_the_tokenizer_the_text_was_trained_with(hf_dir, tmp_path):
  path, vocab = hf_dir
  c = finetune_text.get_config(path)
  c.data.sources.text.paths = os.path.join(path, "text.txt")
  c.steps, c.batch_size, c.seq_len = 1, 2, 16
  c.mesh.data = 1
  c.progress_bar = c.tensorboard = False
  c.export = True
  out = train_lib.train_and_evaluate(c, str(tmp_path / "run"))
  exp = out["export_dir"]
  assert not os.path.exists(os.path.join(exp, "kvjax_tokenizer.json"))   # not the bytes
  tok = tok_lib.load(exp)
  assert tok.encode("the dog ran .") == [vocab["the"], vocab["dog"], vocab["ran"], vocab["."]]
  assert tok.eos_ids == (vocab["<eos>"], vocab["."]) and tok.chat_template == "{{ messages }}"
  with open(os.path.join(exp, "config.json")) as f:
    assert json.load(f)["eos_token_id"] == vocab["<eos>"]
  # two sources on different tokenizers: refused before training starts
  c.data.sources.other = dict(kind="stdlib", weight=1.0, tokenizer="bytes")
  c.data.sources.text.tokenizer = path
  with pytest.raises(ValueError, match="different tokenizers"):
    train_lib.trained_tokenizer(c)
