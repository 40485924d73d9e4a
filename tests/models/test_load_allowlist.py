"""Files are data: a Decoder directory's config_class comes from an allowlist (nothing a file
names is imported), its weights must be float and finite, and tokenizer JSON reads are
bounded by size with errors that name the file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from kvjax import safetensors_io as st_io
from models import decoder as dec
from models import decoder_io
from models import local
from models import registry
from models import tokenizer as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = local.SlidingConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=8, intermediate_size=32, window=4)


def _saved(tmp_path):
  path = str(tmp_path / "m")
  decoder_io.save(dec.Decoder(CFG, rngs=nnx.Rngs(0)), path)
  return path


def _edit_config(path, **changes):
  fp = os.path.join(path, "config.json")
  with open(fp) as f:
    d = json.load(f)
  d.update(changes)
  with open(fp, "w") as f:
    json.dump(d, f)


def test_allowlist_holds_every_registered_decoder_family():
  names = decoder_io.config_classes()
  for fam in registry.FAMILIES.values():
    if issubclass(fam.config, dec.DecoderConfig):
      assert f"{fam.config.__module__}:{fam.config.__qualname__}" in names
  assert all(issubclass(c, dec.DecoderConfig) for c in names.values())


def test_a_config_saved_with_a_renamed_field_still_loads(tmp_path):
  # Given a model saved when the sinks of local attention were called sink_tokens
  path = _saved(tmp_path)
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)["config"]
  cfg["sink_tokens"] = cfg.pop("n_sink") + 3
  _edit_config(path, config=cfg)
  # Then the config loads with the value under its current name
  assert decoder_io.load_config(path).n_sink == CFG.n_sink + 3


def test_round_trip_still_loads(tmp_path):
  path = _saved(tmp_path)
  assert decoder_io.load_config(path) == CFG
  assert decoder_io.load_config(path, dtype=np.float16).dtype == "float16"


@pytest.mark.parametrize("name", [
    "kvjax_evil_module_xyz:Config",       # an importable-looking module that does not exist
    "models.kvjax_not_a_module:Config",   # under models.*, as the old check allowed
    "os:system", "json.decoder:JSONDecoder", "models.config:ModelConfig", 7, None])
def test_config_class_outside_allowlist_is_refused(tmp_path, name):
  path = _saved(tmp_path)
  _edit_config(path, config_class=name)
  with pytest.raises(ValueError, match="is not a known Decoder config; allowed"):
    decoder_io.load(path)


def test_refused_name_is_never_imported(tmp_path):
  # A fresh interpreter: after the refused load, the named modules are not in sys.modules.
  path = _saved(tmp_path)
  _edit_config(path, config_class="kvjax_probe_mod_q1:Config")
  code = (
      "import sys\n"
      "from models import decoder_io\n"
      f"path = {path!r}\n"
      "try:\n"
      "  decoder_io.load(path)\n"
      "except ValueError as e:\n"
      "  assert 'not a known Decoder config' in str(e), e\n"
      "else:\n"
      "  raise SystemExit('loaded')\n"
      "assert 'kvjax_probe_mod_q1' not in sys.modules\n"
      "print('ok')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path))
  # a module with that name exists on the path: importing it would write a marker file
  (tmp_path / "kvjax_probe_mod_q1.py").write_text(
      f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass Config: pass\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
  assert not (tmp_path / "imported").exists()


@pytest.mark.parametrize("bad,match", [
    (np.nan, "holds NaN or infinite values"),
    (np.inf, "holds NaN or infinite values"),
    ("int", r"has dtype int32; weights must be floating point"),
])
def test_weights_must_be_float_and_finite(tmp_path, bad, match):
  path = _saved(tmp_path)
  fp = os.path.join(path, decoder_io.WEIGHTS)
  tensors = {k: np.array(v) for k, v in st_io.read_safetensors(fp).items()}
  if bad == "int":
    tensors["embed"] = tensors["embed"].astype(np.int32)
  else:
    tensors["embed"][1, 2] = bad
  st_io.write_safetensors(fp, tensors)
  with pytest.raises(ValueError, match=f"tensor 'embed' {match}"):
    decoder_io.load(path)


def test_config_json_size_bound_and_shape(tmp_path):
  path = _saved(tmp_path)
  fp = os.path.join(path, "config.json")
  with open(fp, "a") as f:
    f.write(" " * (decoder_io.MAX_CONFIG_BYTES + 1))
  with pytest.raises(ValueError, match="a Decoder config.json is at most"):
    decoder_io.load_config(path)
  assert not decoder_io.is_decoder_dir(path)
  with open(fp, "w") as f:
    f.write("[1, 2]")
  with pytest.raises(ValueError, match="expected a JSON object"):
    decoder_io.load_config(path)


def test_bad_field_values_are_named(tmp_path):
  path = _saved(tmp_path)
  _edit_config(path, config=dict(json.load(open(os.path.join(path, "config.json")))["config"],
                                 num_layers=-3))
  with pytest.raises(ValueError, match=r"invalid SlidingConfig: .*num_layers"):
    decoder_io.load_config(path)


def test_save_refuses_a_class_load_would_refuse(tmp_path):
  import dataclasses  # pylint: disable=import-outside-toplevel

  @dataclasses.dataclass(frozen=True)
  class Elsewhere(local.SlidingConfig):
    pass

  model = nnx.eval_shape(lambda: dec.Decoder(Elsewhere(**{
      f.name: getattr(CFG, f.name) for f in dataclasses.fields(CFG)}), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="is not one `load` accepts"):
    decoder_io.save(model, str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()


# --- tokenizer JSON files ---------------------------------------------------------------
def test_tokenizer_json_reads_are_bounded(tmp_path, monkeypatch):
  fp = tmp_path / "tokenizer_config.json"
  fp.write_text(json.dumps({"chat_template": "x"}) + " " * 100)
  monkeypatch.setattr(tok_lib, "MAX_JSON_BYTES", 64)
  with pytest.raises(ValueError, match=f"{fp}: 1.. bytes, more than the 64 bytes"):
    tok_lib._read_json(str(fp))  # pylint: disable=protected-access
  monkeypatch.setattr(tok_lib, "MAX_JSON_BYTES", 64 << 20)
  assert tok_lib._read_json(str(fp)) == {"chat_template": "x"}  # pylint: disable=protected-access
  fp.write_bytes(b"{\xff}")
  with pytest.raises(ValueError, match=f"{fp}: not valid JSON"):
    tok_lib._read_json(str(fp))  # pylint: disable=protected-access
  assert tok_lib._read_json(str(tmp_path / "absent.json")) == {}  # pylint: disable=protected-access


def test_tokenizer_json_file_size_bound(tmp_path, monkeypatch):
  fp = tmp_path / "tokenizer.json"
  fp.write_text("{}" + " " * 200)
  monkeypatch.setattr(tok_lib, "MAX_TOKENIZER_BYTES", 100)
  with pytest.raises(ValueError, match="more than the 100 bytes"):
    tok_lib.load(str(tmp_path))
