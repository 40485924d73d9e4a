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
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from train.sharding import path_str

FORMAT = "kvjax.train/1"


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

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_state: Mapping[str, int], meta: Mapping,
           force: bool = True) -> bool:
    return self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(dict(meta))), force=force)

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

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()
