"""Checkpoints with orbax `CheckpointManager`: train state, data-iterator state, metadata.

A checkpoint step holds three items:
  * `state`: {"step", "params", "opt_state", "rng"} (orbax StandardSave; restored straight
    into the live shardings, so resuming on another mesh works),
  * `data`: the data mixture's state, a small dict of ints (JSON),
  * `meta`: the model family, its constructor settings and every parameter's shape (JSON).

Restoring reads `meta` first and refuses, with a message that names the differences, a
checkpoint written for another architecture; an unreadable step raises `CheckpointError`
naming the directory. Both happen before training starts, so nothing is overwritten.
Saves are asynchronous (the device-to-host copy is synchronous, so the train step may
donate the state right after `save` returns); `max_to_keep` keeps the last N.

Integrity: once a save has completed (orbax has finalized the step directory), process 0
writes `<step>/checksums.json`, the sha256 of every file of the step (the arrays' chunk
files and orbax's metadata), then renames it into place. `latest_intact_step` checks the
newest steps against their manifests and falls back, with a warning, to the newest step
whose bytes still match: a flipped byte in an array file is caught before restore rather
than restored silently. A step without a manifest (killed between finalize and the
manifest, or written before manifests existed) is used as is, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from absl import logging

from train.sharding import path_str

FORMAT = "kvjax.train/1"
MANIFEST = "checksums.json"
MANIFEST_FORMAT = "kvjax.checksums/1"
_CHUNK = 1 << 20


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: unreadable, or written for another model."""


def param_signature(params) -> dict:
  """{path: [shape..., dtype]} of a params pytree (arrays or ShapeDtypeStructs)."""
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    out[path_str(p)] = [*map(int, x.shape), str(x.dtype)]
  return out


def make_meta(family: str, model_kwargs: Mapping, params, data_sources) -> dict:
  return {"format": FORMAT, "family": family,
          "model_config": {k: _jsonable(v) for k, v in sorted(model_kwargs.items())},
          "params": param_signature(params), "data_sources": sorted(data_sources)}


def _jsonable(v):
  if isinstance(v, (list, tuple)):
    return [_jsonable(x) for x in v]
  return v


def compare_meta(saved: Mapping, current: Mapping) -> list[str]:
  """Human-readable differences that make a checkpoint unusable for the current run."""
  diffs = []
  if saved.get("format") != FORMAT:
    return [f"format {saved.get('format')!r} (expected {FORMAT!r})"]
  if saved["family"] != current["family"]:
    diffs.append(f"model.family: checkpoint {saved['family']!r}, config {current['family']!r}")
  sc, cc = saved["model_config"], current["model_config"]
  for k in sorted(set(sc) | set(cc)):
    if sc.get(k, "<unset>") != cc.get(k, "<unset>") and k != "dtype":
      diffs.append(f"model.config.{k}: checkpoint {sc.get(k, '<unset>')!r}, "
                   f"config {cc.get(k, '<unset>')!r}")
  sp, cp = saved["params"], current["params"]
  for k in sorted(set(sp) | set(cp)):
    if sp.get(k) != cp.get(k):
      diffs.append(f"param {k}: checkpoint {sp.get(k)}, model {cp.get(k)}")
  if saved.get("data_sources") != current.get("data_sources"):
    diffs.append(f"data sources: checkpoint {saved.get('data_sources')}, config "
                 f"{current.get('data_sources')}")
  return diffs


def _file_digests(step_dir: str) -> dict:
  """{relative path: sha256 hex} of every file under step_dir except the manifest."""
  out = {}
  for d, dirs, files in os.walk(step_dir):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(d, f)
      rel = os.path.relpath(p, step_dir)
      if rel == MANIFEST:
        continue
      h = hashlib.sha256()
      with open(p, "rb") as fh:
        for block in iter(lambda fh=fh: fh.read(_CHUNK), b""):
          h.update(block)
      out[rel] = h.hexdigest()
  return out


def write_manifest(step_dir: str) -> None:
  """Writes step_dir/checksums.json (atomically: a temp file renamed into place)."""
  body = {"format": MANIFEST_FORMAT, "sha256": _file_digests(step_dir)}
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(body, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> Optional[list[str]]:
  """None if step_dir has no manifest; else the problems found ([] = intact)."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    if os.path.getsize(path) > 64 << 20:
      return [f"{MANIFEST} is {os.path.getsize(path)} bytes (not a manifest)"]
    with open(path) as f:
      body = json.load(f)
    want = body["sha256"]
    if body.get("format") != MANIFEST_FORMAT or not isinstance(want, dict):
      raise ValueError(f"format {body.get('format')!r}")
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f"{MANIFEST} is unreadable ({e})"]
  got = _file_digests(step_dir)
  problems = [f"{k}: missing" for k in sorted(set(want) - set(got))]
  problems += [f"{k}: sha256 differs" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
  problems += [f"{k}: not in the manifest" for k in sorted(set(got) - set(want))
               if not k.endswith(MANIFEST + ".tmp")]
  return problems


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with validation on restore."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise CheckpointError(f"checkpoint path {self.directory!r} exists and is not a directory")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=False)
    try:
      self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "meta"))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot open checkpoint directory {self.directory!r}: {e}") from e
    self._unsealed: list[int] = []   # saved steps whose manifest is not written yet
    self._read_only = read_only

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def latest_intact_step(self) -> Optional[int]:
    """The newest step whose files match its manifest (or that has none), else None.

    Newer steps that fail are reported with a warning and left in place under a new name,
    `<step>.corrupt` (for inspection; training then saves those steps again). If every
    step fails, raises CheckpointError listing the damage and changes nothing.
    """
    steps = sorted(self.all_steps(), reverse=True)
    bad = []
    for step in steps:
      problems = verify_manifest(self.step_dir(step))
      if problems is None:
        logging.warning("checkpoint step %d in %s has no %s (saved before manifests, or "
                        "stopped before it was written); using it unverified", step,
                        self.directory, MANIFEST)
      if not problems:
        break
      bad.append((step, problems))
    else:
      if bad:
        self.read_meta(bad[0][0])   # its own error first when the metadata is what is gone
        raise CheckpointError(
            f"checkpoint step {bad[0][0]} in {self.directory!r} could not be restored: its "
            "files do not match the checksums written after it was saved, and no earlier "
            "step is intact:\n  " + "\n  ".join(f"step {s}: {'; '.join(p[:5])}"
                                                 for s, p in bad) +
            "\nNothing was changed: move the step directories away to start afresh")
      return None
    for s, problems in bad:
      logging.warning("checkpoint step %d in %s is damaged (%s); falling back to step %d",
                      s, self.directory, "; ".join(problems[:5]), step)
    if bad and jax.process_index() == 0 and not self._read_only:
      for s, _ in bad:
        dst = self.step_dir(s) + ".corrupt"
        n = 1
        while os.path.exists(dst):
          n += 1
          dst = f"{self.step_dir(s)}.corrupt{n}"
        os.rename(self.step_dir(s), dst)
    if bad:
      _sync("kvjax_ckpt_fallback")
      self._mngr.reload()
    return step

  def _seal(self) -> None:
    """Writes the manifests of saves that have completed (call after waiting for them)."""
    if jax.process_index() == 0:
      for step in self._unsealed:
        if os.path.isdir(self.step_dir(step)):
          write_manifest(self.step_dir(step))
    self._unsealed = []

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_state: Mapping[str, int], meta: Mapping,
           force: bool = True) -> bool:
    if self._unsealed:   # orbax waits for the previous save anyway before starting one
      self._mngr.wait_until_finished()
      self._seal()
    saved = self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(dict(meta))), force=force)
    if saved:
      self._unsealed.append(step)
    return saved

  def read_meta(self, step: int) -> dict:
    step_dir = os.path.join(self.directory, str(step))
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
          "meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory!r} has no readable metadata ({e!r:.300}); "
          f"it is not a kvjax train checkpoint or it is corrupt. Nothing was changed: move "
          f"{step_dir!r} away (or pick another workdir) to continue") from e

  def restore(self, step: int, abstract_state: Any, current_meta: Mapping):
    """Returns (state, data_state) of `step`, or raises CheckpointError."""
    meta = self.read_meta(step)
    diffs = compare_meta(meta, current_meta)
    if diffs:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory!r} was written for a different model "
          f"or data setup; refusing to load it (nothing was changed):\n  " + "\n  ".join(
              diffs[:20]) + ("\n  ..." if len(diffs) > 20 else ""))
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory!r} could not be restored ({e!r:.500}); "
          "it is probably corrupt or incomplete. Nothing was changed: move that step "
          "directory away to resume from an earlier one") from e
    return out["state"], out["data"]

  def wait(self):
    self._mngr.wait_until_finished()
    self._seal()

  def close(self):
    self._mngr.wait_until_finished()
    self._seal()
    self._mngr.close()


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
