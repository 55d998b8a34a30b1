"""Checkpoints of the full train state and the data iterator (orbax).

Layout: ``WORKDIR/checkpoints/<step>/{state,data}`` managed by an orbax
``CheckpointManager`` (saves are atomic: written to a temporary directory
and renamed when complete; the last ``keep`` are kept, older ones removed
only after a newer save has completed). ``state`` holds params, optimizer
state (EPI state included) and step (checkpoints written before the unused
train-state RNG was removed also hold ``rng``: restored with the rest, so
their checksums verify, then dropped); ``data`` holds the iterator state
as JSON (with several processes: every process's state, gathered and written
by process 0 as ``{"process_count": n, "per_process": [...]}``). Every
process calls save and restore (orbax writes each process's shards of the
global arrays and coordinates the commit). Params-only snapshots for evaluation live in
``WORKDIR/snapshots/<step>``.

Integrity: orbax checks only its own index and metadata, not the array
bytes, so every save also writes an ``integrity`` item (JSON): two 32-bit
checksums of each array (the sum of its bit patterns, and a position-weighted
sum), computed on the devices by one jitted global reduction (integer sums
are exact, so the result does not depend on the mesh or the process count).
A restore recomputes them and compares. A checkpoint that fails to restore,
whose checksums differ, or whose params are not all finite is reported,
moved to ``WORKDIR/checkpoints_corrupt/`` (never deleted) and the previous
one is tried. Checkpoints written without checksums restore with a notice.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from epi_jax.method import all_finite, compact
from epi_jax.training.step import TrainState
from epi_jax.utils import files

INTEGRITY_VERSION = 1
# Top-level keys of the stored state that older versions wrote and this one does not.
RETIRED_KEYS = ("rng",)


_PER_LAYER_KEY = re.compile(r"layers\.\d+\.")


def _pkey(k: str) -> str:
  return k.replace("/", ".")


def to_storable(state: TrainState) -> dict[str, Any]:
  """The train state as the stored tree: nested dicts of arrays with plain string keys.

  A dict, not the ``TrainState``, so that the layout on disk stays the one
  checkpoints always had (:func:`from_storable` reads it back).
  """
  opt_leaves = jax.tree.leaves(state.opt_state)
  return {"step": state.step,
          "params": {_pkey(k): v for k, v in state.params.items()},
          "opt_state": {f"{i:05d}": v for i, v in enumerate(opt_leaves)}}


def from_storable(stored: dict[str, Any], like: TrainState) -> TrainState:
  """Inverse of :func:`to_storable`, with the structure of ``like`` (leaves of
  ``RETIRED_KEYS`` in ``stored`` are dropped)."""
  treedef = jax.tree.structure(like.opt_state)
  n = treedef.num_leaves
  if len(stored["opt_state"]) != n:
    raise ValueError(f"checkpoint has {len(stored['opt_state'])} optimizer leaves, "
                     f"this optimizer has {n} (different method or options?)")
  opt = jax.tree.unflatten(treedef, [stored["opt_state"][f"{i:05d}"] for i in range(n)])
  return TrainState(step=stored["step"], opt_state=opt,
                    params={k: stored["params"][_pkey(k)] for k in like.params})


def _repack_legacy_masks(opt_state: dict[str, Any], legacy, target_shardings) -> None:
  """Converts, in place, the packed masks of ``legacy`` (see
  ``Checkpointer._legacy_packed_masks``) to this version's layout, on the
  shardings of ``target_shardings`` (the stored tree of the abstract state)."""
  shapes = {k: shape for k, (_, shape) in legacy.items()}
  repack = jax.jit(
      lambda masks: {k: compact.pack(compact.unpack_last_axis(m, shapes[k]))
                     for k, m in masks.items()},
      out_shardings={k: target_shardings[k].sharding for k in legacy})
  opt_state.update(repack({k: opt_state[k] for k in legacy}))


def _as_uint32(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32 (64-bit values become two words)."""
  if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _array_checksums(x: jax.Array) -> jax.Array:
  """``[sum of words, sum of words * odd position weight]`` mod 2**32 (uint32)."""
  bits = _as_uint32(x)
  index = jnp.zeros(bits.shape, jnp.uint32)  # row-major position, built without a reshape
  stride = 1
  for d in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride)
    stride = (stride * bits.shape[d]) % 2**32
  weight = index * jnp.uint32(0x9E3779B9) * jnp.uint32(2) + jnp.uint32(1)  # odd: no word unseen
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


@jax.jit
def _tree_checksums(tree):
  return jax.tree.map(_array_checksums, tree)


def checksums(storable: dict[str, Any]) -> dict[str, list[int]]:
  """``{leaf path: [sum, weighted sum]}`` of a :func:`to_storable` state (collective)."""
  sums = jax.device_get(_tree_checksums(storable))
  flat, _ = jax.tree_util.tree_flatten_with_path(sums)
  return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(val)] for path, val in flat}


@jax.jit
def _params_finite(params) -> jax.Array:
  return all_finite(params)


def verify(stored, integrity: dict[str, Any] | None, params) -> str | None:
  """Why a restored tree must not be used (checksums differ from ``integrity``,
  ``params`` not finite), or None."""
  if integrity is not None:
    saved, got = integrity.get("arrays", {}), checksums(stored)
    bad = sorted(k for k in set(saved) | set(got) if saved.get(k) != got.get(k))
    if bad:
      return (f"checksum mismatch in {len(bad)} of {len(got)} arrays "
              f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
  if not bool(_params_finite(params)):
    return "its params hold inf or nan"
  return None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_processes_agree(flag: bool) -> bool:
  """Process 0's ``flag`` on every process (decisions that must not diverge)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.array(flag)))


def gather_json(obj) -> list[Any]:
  """Every process's JSON-able ``obj``, in process order (collective)."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  n = int(np.max(multihost_utils.process_allgather(np.array([raw.size], np.int32))))
  padded = np.zeros([n], np.uint8)
  padded[:raw.size] = raw
  got = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in got.reshape(-1, n)]


def data_for_save(data_state: dict[str, Any]) -> dict[str, Any]:
  """The ``data`` item: the state itself (one process) or all processes' (collective)."""
  states = gather_json(data_state)
  if len(states) == 1:
    return data_state
  return {"process_count": len(states), "per_process": states}


def data_for_process(stored: dict[str, Any]) -> dict[str, Any]:
  """This process's iterator state out of the ``data`` item.

  Resuming with a different process count is allowed when all saved states
  are equal (the pipeline's state is global: it counts whole global batches).

  Raises:
    ValueError: when the process count changed and the states differ.
  """
  if "per_process" not in stored:
    return stored
  states, n = stored["per_process"], int(stored["process_count"])
  if n == jax.process_count():
    return states[jax.process_index()]
  if any(s != states[0] for s in states):
    raise ValueError(f"checkpoint was written by {n} processes with different data "
                     f"iterator states; resume it with {n} processes, not "
                     f"{jax.process_count()}")
  return states[0]


class Checkpointer:
  """Saves and restores train state + data iterator state under ``workdir``."""

  def __init__(self, workdir, keep: int, async_save: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.directory = self.workdir / "checkpoints"
    self._keep, self._async = keep, async_save
    self._mngr = self._manager()

  def _manager(self):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._keep, create=True, enable_async_checkpointing=self._async)
    # Each item's handler given up front (not only learnt from the first save's or
    # restore's args): a manager that has not saved yet (every resume) can then read
    # item_metadata, which the layout check needs, instead of logging one "Item ... was
    # found in the checkpoint, but could not be restored" warning per item and returning
    # None for it.
    return ocp.CheckpointManager(self.directory.absolute(), options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "data": ocp.JsonCheckpointHandler(),
                                                "integrity": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict[str, Any]) -> None:
    """Saves (asynchronously when enabled); a failed save raises, nothing is deleted."""
    if step in self._mngr.all_steps():
      return
    storable = to_storable(state)
    integrity = {"version": INTEGRITY_VERSION, "arrays": checksums(storable)}
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(storable),
        data=ocp.args.JsonSave(data_for_save(data_state)),
        integrity=ocp.args.JsonSave(integrity)), force=True)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def restore_latest(self, abstract_state: TrainState
                     ) -> tuple[TrainState, dict[str, Any], int] | None:
    """``(state, data_state, step)`` of the newest restorable checkpoint, or None.

    ``abstract_state``: the train state as ``jax.ShapeDtypeStruct`` with shardings.
    """
    want = to_storable(abstract_state)
    for step in sorted(self._mngr.all_steps(), reverse=True):
      stored = self._stored_state(step)  # None: unreadable, restore reports and quarantines
      target = {**want, "opt_state": dict(want["opt_state"]),
                **self._retired_leaves(stored, abstract_state.step.sharding)}
      self._check_layer_layout(step, stored, target["params"])
      legacy = self._legacy_packed_masks(stored, abstract_state)
      for key, (stored_shape, _) in legacy.items():
        target["opt_state"][key] = jax.ShapeDtypeStruct(
            stored_shape, jnp.uint8, sharding=abstract_state.step.sharding)
      has_sums = all_processes_agree((self.directory / str(step) / "integrity").exists())
      items = {"state": ocp.args.StandardRestore(target), "data": ocp.args.JsonRestore()}
      if has_sums:
        items["integrity"] = ocp.args.JsonRestore()
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        problem = verify(out["state"], dict(out["integrity"]) if has_sums else None,
                         out["state"]["params"])
      except Exception as e:  # pylint: disable=broad-except
        problem = f"failed to restore ({type(e).__name__}: {str(e)[:300]})"
      if problem is None:
        if legacy:
          _repack_legacy_masks(out["state"]["opt_state"], legacy, want["opt_state"])
          if jax.process_index() == 0:
            print(f"[epi_jax] checkpoint {self.directory / str(step)} stores {len(legacy)} "
                  "packed masks in the earlier last-axis layout: converted to 8 rows per "
                  "byte", file=sys.stderr)
        if not has_sums and jax.process_index() == 0:
          print(f"[epi_jax] checkpoint {self.directory / str(step)} has no checksums "
                "(written by an older version): restored unverified", file=sys.stderr)
        return (from_storable(out["state"], abstract_state),
                data_for_process(dict(out["data"])), step)
      if jax.process_index() == 0:
        print(f"[epi_jax] checkpoint {self.directory / str(step)} is damaged: {problem}; "
              f"moving it to {self.workdir / 'checkpoints_corrupt'} and trying the "
              "previous one", file=sys.stderr)
      self._quarantine(step)
    if jax.process_index() == 0 and self.workdir.joinpath("checkpoints_corrupt").exists():
      print(f"[epi_jax] no checkpoint in {self.directory} could be restored (the damaged "
            f"ones are in {self.workdir / 'checkpoints_corrupt'}): starting from step 0",
            file=sys.stderr)
    return None

  def _stored_state(self, step: int):
    """The stored state's metadata (shapes and dtypes by key), or None when unreadable."""
    try:
      return self._mngr.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return None

  @staticmethod
  def _retired_leaves(stored, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """Targets for the leaves a checkpoint of an older layout holds beyond this one's:
    ``rng``, the train state's RNG until it was removed (never used). Restored (on
    ``sharding``, replicated) so that the checksums cover the whole checkpoint, then
    dropped by :func:`from_storable`."""
    if stored is None:
      return {}
    return {k: jax.ShapeDtypeStruct(tuple(stored[k].shape), stored[k].dtype, sharding=sharding)
            for k in RETIRED_KEYS if k in stored}

  @staticmethod
  def _legacy_packed_masks(stored, abstract_state: TrainState
                           ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{opt_state key: (stored shape, mask shape)}`` of the packed masks that a
    checkpoint holds in the earlier last-axis layout (``compact.unpack_last_axis``)."""
    stored = stored["opt_state"] if stored is not None and "opt_state" in stored else {}
    legacy = {}
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state.opt_state)[0]
    for i, (path, leaf) in enumerate(leaves):
      key, names = f"{i:05d}", [getattr(k, "key", None) for k in path]
      param = next((abstract_state.params[n] for n in reversed(names)
                    if isinstance(n, str) and n in abstract_state.params), None)
      if key not in stored or param is None or leaf.dtype != jnp.uint8:
        continue
      have = tuple(stored[key].shape)
      if (have != tuple(leaf.shape)
          and have == compact.legacy_packed_shape(tuple(param.shape))):
        legacy[key] = (have, tuple(param.shape))
    return legacy

  def _check_layer_layout(self, step: int, stored, params: dict[str, Any]) -> None:
    """Refuses (never quarantines) a checkpoint of the other ``model.scan_layers`` layout."""
    if stored is None or "params" not in stored:
      return
    stored = set(stored["params"].keys())
    per_layer = lambda keys: any(_PER_LAYER_KEY.match(k) for k in keys)
    if stored != set(params) and per_layer(stored) != per_layer(params):
      have, want = [("scan_layers=False (layers.<i>.*)" if per_layer(k) else
                     "scan_layers=True (stacked layers.*)") for k in (stored, params)]
      raise ValueError(
          f"checkpoint {self.directory / str(step)} has the {have} param layout, this "
          f"model has {want}: resume with the checkpoint's config.model.scan_layers, "
          "or start a new workdir")

  def _quarantine(self, step: int) -> None:
    if jax.process_index() == 0:
      dest = self.workdir / "checkpoints_corrupt"
      dest.mkdir(exist_ok=True)
      src = self.directory / str(step)
      if src.exists():
        shutil.move(str(src), str(dest / f"{step}-{int(time.time())}"))
    _sync(f"epi_jax:quarantine:{step}")
    self._mngr.close()
    self._mngr = self._manager()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _snapshot_sums_path(workdir, step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / "snapshots" / f"{step}.checksums.json"


def save_snapshot(workdir, step: int, params: dict[str, Any]) -> None:
  """Params-only snapshot ``WORKDIR/snapshots/<step>`` (synchronous, atomic), and
  its checksums beside it (``<step>.checksums.json``)."""
  path = (pathlib.Path(workdir) / "snapshots" / str(step)).absolute()
  if all_processes_agree(path.exists()):  # every process must take part, or none
    return
  stored = {_pkey(k): v for k, v in params.items()}
  sums = {"version": INTEGRITY_VERSION, "arrays": checksums(stored)}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, stored)
  if jax.process_index() == 0:
    files.write_json_atomic(_snapshot_sums_path(workdir, step), sums, indent=None)


def load_snapshot(workdir, step: int, shapes: dict[str, Any]) -> dict[str, Any]:
  """The params of snapshot ``step`` on the default device, verified.

  Raises:
    ValueError: when its checksums differ or its params are not finite.
  """
  path = (pathlib.Path(workdir) / "snapshots" / str(step)).absolute()
  if not path.exists():
    raise FileNotFoundError(f"No snapshot {path}")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {_pkey(k): jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev)
            for k, v in shapes.items()}
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.restore(path, target)
  sums_path = _snapshot_sums_path(workdir, step)
  integrity = json.loads(sums_path.read_text()) if sums_path.exists() else None
  problem = verify(stored, integrity, stored)
  if problem:
    raise ValueError(f"snapshot {path} is damaged: {problem}")
  return {k: stored[_pkey(k)] for k in shapes}


def list_snapshots(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "snapshots"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())
