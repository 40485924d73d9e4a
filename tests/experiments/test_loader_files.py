"""Task files that are not UTF-8 JSON lines fail with an error naming the file and line."""

import json

import pytest

from experiments.tasks import loaders

REC = {"input": "Q?", "context": "Passage", "answers": ["Oslo"], "dataset": "hotpotqa"}


@pytest.mark.parametrize("fmt", ["longbench", "infinitebench", "ruler"])
def test_binary_file_names_the_file(tmp_path, fmt):
  # Given a binary file (gzip magic bytes) where a task file was expected
  p = tmp_path / "hotpotqa.jsonl"
  p.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))
  # Then the loader names the file, the line and the offending byte, not a raw codec error
  with pytest.raises(ValueError, match=rf"{fmt} file '.*hotpotqa.jsonl', line 1: not UTF-8 "
                     r"text \(byte 1 of the line is 0x8b\)"):
    loaders.load(str(p), fmt)


def test_a_bad_byte_after_good_lines_names_its_line(tmp_path):
  p = tmp_path / "t.jsonl"
  p.write_bytes((json.dumps(REC) + "\n").encode() * 2 + b"{\"input\": \"\xff\"}\n")
  with pytest.raises(ValueError, match=r"t.jsonl', line 3: not UTF-8 text \(byte 11 "):
    loaders.load_jsonl(str(p), "longbench")


def test_crlf_and_non_ascii_utf8_still_load(tmp_path):
  rec = dict(REC, context="Passage über Oslo")
  p = tmp_path / "t.jsonl"
  p.write_bytes((json.dumps(rec, ensure_ascii=False) + "\r\n").encode() * 2)
  r = loaders.load_jsonl(str(p), "longbench")
  assert len(r.samples) == 2 and not r.errors
  assert r.samples[0].context.endswith("given passages.\nPassage über Oslo")
