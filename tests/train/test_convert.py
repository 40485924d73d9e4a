"""Conversion fine-tuning (train/convert.py): a tiny full-attention Llama becomes a GLA model
by attention transfer then LM fine-tuning, through the train loop.

The teacher's per-layer attention inputs/outputs come from the float64 numpy Llama of
tests/models/test_from_llama.py, not from the code under test."""

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import kvjax
from models import decoder as dec
from models import decoder_io
from models import from_llama
from models import hf
from models import linear_attention as la_lib
from models.config import ModelConfig
from models.transformer import Transformer
from tests.models.test_from_llama import numpy_llama_taps
from tests.train.helpers import apply_overrides
from tests.train.helpers import tiny_config
from train import convert
from train import data as data_lib
from train import train as train_lib

TEACHER = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
STUDENT = from_llama.student_config(la_lib.GLAConfig, TEACHER, chunk_size=8)
TRANSFER_STEPS = 12


def make_teacher(path):
  """A random Llama with sharp attention (q/k scaled up) so transfer has something to fit."""
  model = Transformer(TEACHER, rngs=nnx.Rngs(3))
  for name, scale in (("wq", 6.0), ("wk", 6.0), ("wv", 4.0), ("wo", 4.0)):
    var = getattr(model, name)
    var.value = var.value * scale
  hf.save_pretrained(model, path)
  return model


def convert_config(teacher_dir, **overrides):
  c = tiny_config(steps=TRANSFER_STEPS, seq_len=32, batch_size=8)
  with c.unlocked():
    c.model.family = "gla"
    c.model.config = ml_collections.ConfigDict(
        {f.name: getattr(STUDENT, f.name) for f in dataclasses.fields(STUDENT)})
    c.data.sources = ml_collections.ConfigDict(dict(stdlib=dict(kind="stdlib", weight=1.0)))
    c.objective = "attention_transfer"
    c.teacher = teacher_dir
    c.trainable = convert.DEFAULT_TRAINABLE
    c.opt.lr = 2e-2
    c.convert = ml_collections.ConfigDict(dict(finetune_steps=4, finetune_lr=1e-3,
                                               finetune_warmup_steps=1, finetune_trainable=""))
  return apply_overrides(c, overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("convert")
  teacher = make_teacher(str(root / "teacher"))
  c = convert_config(str(root / "teacher"))
  out = convert.convert(c, str(root / "work"))
  return dict(root=root, teacher=teacher, config=c, out=out)


def _losses(path):
  with open(path) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _reference_errors(student, teacher, tokens):
  """Per-layer MSE of the student's mixers against the numpy teacher, on its inputs."""
  h, y, _ = numpy_llama_taps(teacher, tokens)
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  got = np.asarray(dec.apply_mixers(student, jnp.asarray(h, jnp.float32), pos), np.float64)
  return np.mean((got - y) ** 2, axis=(1, 2, 3))


def _held_out_tokens():
  """4 rows of held-out Python source (files the training split never reads)."""
  src = data_lib.make_source("stdlib", {"kind": "stdlib"}, 33, "validation")
  batch = next(iter(data_lib.eval_batches(src, 4, 4, seed=7)))
  return jnp.asarray(batch["inputs"], jnp.int32)


def test_transfer_loss_decreases(run):
  losses = _losses(os.path.join(run["root"], "work", "transfer", "metrics.jsonl"))
  assert len(losses) == TRANSFER_STEPS
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_transfer_brings_every_layer_closer_to_the_teacher(run):
  # Given the student at init (teacher weights mapped in) and after stage 1
  init, _ = from_llama.decoder_from_transformer(run["teacher"], STUDENT,
                                                seed=run["config"].seed)
  after = decoder_io.load(run["out"]["transfer"]["export_dir"])
  tok = _held_out_tokens()
  # Then on held-out tokens each layer's mixer output is closer to the teacher's attention
  before_err = _reference_errors(init, run["teacher"], tok)
  after_err = _reference_errors(after, run["teacher"], tok)
  assert np.all(after_err < 0.9 * before_err), (before_err, after_err)


def test_frozen_weights_are_bit_identical_after_stage_one(run):
  init, _ = from_llama.decoder_from_transformer(run["teacher"], STUDENT,
                                                seed=run["config"].seed)
  after = decoder_io.flat_params(decoder_io.load(run["out"]["transfer"]["export_dir"]))
  before = decoder_io.flat_params(init)
  pat = re.compile(convert.DEFAULT_TRAINABLE)
  frozen = [k for k in before if not pat.search(k)]
  trained = [k for k in before if pat.search(k)]
  assert {"embed", "lm_head", "groups/0/0/w_up", "groups/0/0/mixer/wv",
          "groups/0/0/mixer/wo"} <= set(frozen)
  assert {"groups/0/0/mixer/wq", "groups/0/0/mixer/wg"} <= set(trained)
  for k in frozen:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  assert all(not np.array_equal(after[k], before[k]) for k in trained)


def test_finetune_trains_all_weights_from_the_transfer_export(run):
  fin = run["out"]["finetune"]
  assert fin["step"] == 4
  before = decoder_io.flat_params(decoder_io.load(run["out"]["transfer"]["export_dir"]))
  after = decoder_io.flat_params(decoder_io.load(run["out"]["export_dir"]))
  assert not np.array_equal(after["embed"], before["embed"])  # frozen in stage 1, not here


def test_converted_model_exports_reloads_and_generates(run):
  # Given the exported converted model, reloaded from disk
  model = decoder_io.load(run["out"]["export_dir"])
  trained = run["out"]["finetune"]["trainer"].model()
  for k, v in decoder_io.flat_params(trained).items():  # the export holds the trained params
    np.testing.assert_array_equal(decoder_io.flat_params(model)[k], v, err_msg=k)
  # When kvjax.generate decodes greedily (chunked prefill + recurrent decode steps)
  prompt = _held_out_tokens()[:2, :9]
  out = kvjax.generate(model, prompt, max_new_tokens=5)
  # Then each token is the argmax of the parallel (chunkwise) forward over the sequence
  seq = np.concatenate([np.asarray(prompt), out.tokens], axis=1)
  logits = np.asarray(model(jnp.asarray(seq)))
  np.testing.assert_array_equal(out.tokens, logits[:, 8:-1].argmax(-1))
  assert isinstance(out.cache.layers()[0], kvjax.recurrent.LinearAttentionState)


@pytest.mark.parametrize("overrides, match", [
    (dict(objective="distill"), "objective='distill'; allowed"),
    (dict(trainable="no_such_param"), "trainable='no_such_param' matches no parameter"),
    (dict(teacher="/nonexistent/dir"), "teacher='/nonexistent/dir' is not a directory"),
    (dict(objective="lm"), "is only read by objective='attention_transfer'"),
    (dict(teacher=""), "needs teacher="),
])
def test_bad_conversion_settings_are_named(run, overrides, match):
  c = convert_config(str(run["root"] / "teacher"), **overrides)
  with pytest.raises(ValueError, match=re.escape(match) if "'" in match else match):
    train_lib.Trainer(c)


def test_teacher_of_another_architecture_or_size_is_refused(run):
  # a converted (GLA) model is not a full-attention teacher
  c = convert_config(run["out"]["export_dir"])
  with pytest.raises(ValueError, match="holds a kvjax GLAConfig"):
    train_lib.Trainer(c)
  # a student whose dims differ from the teacher's
  c = convert_config(str(run["root"] / "teacher"))
  with c.unlocked():
    c.model.config.hidden_size = 48
    c.model.config.num_heads = 4
  with pytest.raises(ValueError, match="hidden_size: student 48, teacher 32"):
    train_lib.Trainer(c)
  # a student family that is not a Decoder
  c = convert_config(str(run["root"] / "teacher"), trainable="", **{"model.family": "llama"})
  with c.unlocked():
    c.model.config = tiny_config().model.config
  with pytest.raises(ValueError, match="needs a models.decoder.Decoder student"):
    train_lib.Trainer(c)


def test_recipe_config_sizes_students_from_the_shipped_teacher():
  from models import registry  # pylint: disable=import-outside-toplevel
  from train.configs import convert as recipe  # pylint: disable=import-outside-toplevel
  teacher = hf.load_config(recipe.get_config("gla").teacher)
  for student in recipe.STUDENTS:
    c = recipe.get_config(student)
    cls = registry.get(c.model.family).config
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in c.model.config.items()}
    from_llama.check_student(cls(**kw), teacher)  # the shipped teacher's weights fit
    assert (kw["hidden_size"], kw["num_layers"]) == (teacher.hidden_size, teacher.num_layers)
  with pytest.raises(ValueError, match="student='mamba'; allowed"):
    recipe.get_config("mamba")
