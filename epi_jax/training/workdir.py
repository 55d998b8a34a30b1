"""One run per workdir: the writer's lock, and the config the checkpoints belong to.

**Lock.** ``WORKDIR/LOCK`` holds the writer's process id, host, start time and
command; it is created atomically (``O_EXCL``) before anything in the workdir
is written and removed when the run ends. A second run on the workdir refuses
with a message naming the holder. A lock whose process is gone (same host, pid
dead or reused) is taken over with a notice; a lock from another host cannot be
checked from here, so it refuses and says how to remove it by hand.

Multi-process runs: process 0 alone takes the lock and its verdict is broadcast,
so every process starts or every process refuses. Process 0 is the only writer
of ``config.json``, metrics and ``DONE``, and a second run has its own
process 0, so on a shared filesystem the two collide on ``LOCK``. (Checkpoint
shards written by the other processes are coordinated by orbax and land in the
same directory tree: guarded by the same lock when the workdir is shared, which
multi-host checkpointing needs anyway.)

**Binding.** A resumed run must mean the same as the one that wrote the
checkpoints: :func:`config_changes` compares the saved ``config.json`` with the
new config. Fields in :data:`FREE_FIELDS` never matter (display, where data is
read from, evaluation settings); :data:`SAFE_FIELDS` may change with
``allow_config_change`` (they change how long or how often, not what the state
means); any other difference (method, model, dtypes, optimizer, EPI layout,
data mixture, seed...) refuses: such a run needs a new workdir.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time
from typing import Any

LOCK_NAME = "LOCK"

# Never matter for what a checkpoint means.
FREE_FIELDS = ("progress_bar", "async_checkpointing", "data.data_dir", "data.raw_dir",
               "eval")
# May change on resume with allow_config_change=True.
SAFE_FIELDS = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints",
               "snapshot_steps", "model.remat", "mesh")


class RunRefused(ValueError):
  """The run did not start; nothing in the workdir was changed."""


class WorkdirLocked(RunRefused):
  """Another run holds the workdir's lock."""


class ConfigChanged(RunRefused):
  """The config differs from the one the workdir's checkpoints were written with."""


# ----------------------------------------------------------------------------- lock


def is_run_dir(path) -> bool:
  """Whether ``path`` is a training run directory: its ``config.json`` is the trainer's
  (a ``model`` group; a Hugging Face checkpoint's has ``model_type`` instead)."""
  try:
    cfg = json.loads((pathlib.Path(path) / "config.json").read_text())
  except (OSError, ValueError):
    return False
  return isinstance(cfg, dict) and "model" in cfg and "model_type" not in cfg


def make_workdir(workdir) -> pathlib.Path:
  """Creates ``workdir`` (and its parents) unless it is a directory already.

  Raises:
    RunRefused: naming the path, when it is a file or cannot be created (a
      missing or read-only parent, no permission): a bad ``--workdir``, not a
      crash.
  """
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise RunRefused(f"--workdir {str(workdir)!r} is not a directory (a file of that name "
                     "exists): choose another --workdir")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise RunRefused(f"--workdir {str(workdir)!r} cannot be created "
                     f"({e.strerror or type(e).__name__}: {e.filename or workdir})") from None
  return workdir



def _proc_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), to detect pid reuse."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


def _describe(holder: dict[str, Any]) -> str:
  started = holder.get("started")
  when = (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
          if isinstance(started, (int, float)) else "?")
  return f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {when}"


def _is_stale(holder: dict[str, Any]) -> bool:
  if holder.get("host") != socket.gethostname():
    return False
  pid = holder.get("pid")
  if not isinstance(pid, int) or not _alive(pid):
    return True
  start = holder.get("proc_start")
  return start is not None and _proc_start(pid) not in (None, start)


class WorkdirLock:
  """``WORKDIR/LOCK`` held from :meth:`acquire` to :meth:`release` (see module doc)."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self._held = False

  def holder(self) -> dict[str, Any] | None:
    """The lock file's content, None when there is none; ``{}`` when unreadable."""
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    """Takes the lock (the workdir must exist).

    Raises:
      WorkdirLocked: when a live run (or one on another host) holds it.
      RunRefused: when the lock file cannot be written (a read-only workdir).
    """
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "proc_start": _proc_start(os.getpid()), "command": " ".join(sys.argv)}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        fd = None
      except OSError as e:  # a read-only or otherwise unwritable workdir
        raise RunRefused(f"--workdir {str(self.path.parent)!r} is not writable "
                         f"({e.strerror or type(e).__name__})") from None
      if fd is None:
        holder = self.holder()
        if holder is None:
          continue  # released meanwhile
        if holder and not _is_stale(holder):
          raise WorkdirLocked(
              f"{self.path.parent} is in use by another run ({_describe(holder)}). "
              "Wait for it to finish or use another --workdir; if that run is gone "
              f"(e.g. its host died), delete {self.path}.")
        print(f"[epi_jax] taking over the stale lock {self.path} "
              f"({_describe(holder) if holder else 'unreadable'}: no such process)",
              file=sys.stderr)
        try:  # the rename is atomic: of two runs taking over, one wins
          os.rename(self.path, self.path.with_name(f"{LOCK_NAME}.stale"))
        except FileNotFoundError:
          pass
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f, indent=1)
      self._held = True
      return
    raise WorkdirLocked(f"could not take the lock {self.path}: other runs keep taking it")

  def release(self) -> None:
    if not self._held:
      return
    holder = self.holder()
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      self.path.unlink(missing_ok=True)
    self._held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


# ----------------------------------------------------------------------------- binding


def _flatten(d, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict) and v and name not in ("data.mixture",):
      out.update(_flatten(v, name + "."))
    else:
      out[name] = v
  return out


def _under(name: str, groups) -> bool:
  return any(name == g or name.startswith(g + ".") for g in groups)


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{field: (saved value, new value)}`` of the fields that differ, free fields left out.

  Both configs as plain dicts (``json.loads(to_json(config))``), defaults filled in.
  """
  a, b = _flatten(saved), _flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k) and not _under(k, FREE_FIELDS)}


def check_resume(saved: dict[str, Any], new: dict[str, Any], *, workdir,
                 allow_config_change: bool) -> dict[str, tuple[Any, Any]]:
  """The allowed changes, or :class:`ConfigChanged` listing the refused ones."""
  changes = config_changes(saved, new)
  unsafe = {k: v for k, v in changes.items() if not _under(k, SAFE_FIELDS)}
  if unsafe or (changes and not allow_config_change):
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in (unsafe or changes).items())
    if unsafe:
      how = ("these change what its checkpoints mean: train into a new --workdir "
             "(or restore the old values)")
    else:
      how = ("pass --allow_config_change (train(..., allow_config_change=True)) to "
             "continue with them, or use a new --workdir")
    raise ConfigChanged(f"{workdir} holds a run with a different config ({listed}); "
                        f"{how}. Nothing was changed.")
  return changes
