"""The command line's rule: ``--help``/``-h`` for every subcommand, and every bad flag,
value or path one line on stderr naming it, exit 2 (no traceback, no usage dump).

The cheap commands of a test run one after the other in one fresh subprocess (starting
Python and importing JAX takes seconds), each with its own stdout and stderr; one tiny
training run (stopped, then resumed) gives the run directory that ``generate --model
RUN_DIR`` takes.
"""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epi_jax import cli
from epi_jax.training import checkpoint as ckpt_lib
from epi_jax.training.step import TrainState

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.py")
FAST = ["--config.data.seq_len=128", "--config.data.mixture.logiqa=0.0",
        "--config.progress_bar=False", "--config.mesh.data=1",
        "--config.async_checkpointing=False", "--config.method=full",
        "--config.total_steps=2", "--config.optimizer.warmup_steps=1"]
# What JAX, XLA or absl may print at start-up whatever the command line.
_NOISE = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} |"
                    r"An NVIDIA GPU may be present|Platform '\w+' is experimental)")
MISSING_MODEL = "no_such_model_dir"  # never loaded: the flags are checked first


def _env():
  return dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1",
              PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cli(*args, cwd=ROOT, timeout=300):
  return subprocess.run([sys.executable, "-m", "epi_jax.cli", *map(str, args)], env=_env(),
                        cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _lines(stderr: str) -> list[str]:
  return [ln for ln in stderr.splitlines() if ln.strip() and not _NOISE.match(ln)]


def _main(argv) -> int:
  """``epi-jax ARGV`` in process: its exit status (argparse exits for help and errors)."""
  try:
    return cli.main(argv)
  except SystemExit as e:
    return e.code


# Runs each command of a JSON {name: argv} through epi_jax.cli.main with fds 1 and 2 on
# files of its own: what a start-up prints lands in the first command that imports it.
_CHILD = """
import json, os, sys, tempfile
from epi_jax import cli
results = {}
for name, argv in json.loads(sys.argv[1]).items():
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    try:
      try:
        code = cli.main(argv)
      except SystemExit as e:
        code = e.code
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
    out.seek(0)
    err.seek(0)
    results[name] = (code, out.read(), err.read())
print(json.dumps(results))
"""


def _run_all(cases: dict) -> dict:
  """``{name: CompletedProcess}`` of ``{name: argv}``, all in one fresh process."""
  argv = {name: [str(a) for a in args] for name, args in cases.items()}
  proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argv)], env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not _lines(proc.stderr), proc.stderr[-3000:]  # nothing printed between commands
  results = json.loads(proc.stdout.splitlines()[-1])
  return {name: subprocess.CompletedProcess(argv[name], 0 if code is None else code, out, err)
          for name, (code, out, err) in results.items()}


# ----------------------------------------------------------------------------- --help

HELP = {"": [], "generate": ["generate"], "data": ["data"], "data prepare": ["data", "prepare"],
        "data stats": ["data", "stats"], "train": ["train"], "compare": ["compare"],
        "evaluate": ["evaluate"], "verdicts": ["verdicts"], "export": ["export"],
        "plan": ["plan"]}


def test_help_for_every_subcommand():
  results = _run_all({name: [*argv, "--help"] for name, argv in HELP.items()})
  for name, out in results.items():
    assert out.returncode == 0, (name, out.stderr[-2000:])
    assert "usage" in out.stdout.lower(), (name, out.stdout[:500])
    assert not _lines(out.stderr), (name, out.stderr[-2000:])


def test_h_for_every_subcommand_in_process(capsys):
  """``-h`` as ``--help`` (in process: the same entry point, without the starts)."""
  for name, argv in HELP.items():
    assert _main([*argv, "-h"]) == 0, name
    out, err = capsys.readouterr()
    assert "usage" in out.lower() and not _lines(err), (name, err)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
  """``{case: (CompletedProcess, words the one line must contain)}``."""
  tmp = tmp_path_factory.mktemp("bad")
  a_file = tmp / "a_file"
  a_file.write_text("not a directory")
  cases = {
      "unknown command": (["nosuchcommand"], ["nosuchcommand"]),
      "eval task": (["evaluate", "--model", MISSING_MODEL, "--eval.tasks=nosuchtask"],
                    ["--eval.tasks", "nosuchtask"]),
      "eval num_examples -1": (["evaluate", "--model", MISSING_MODEL,
                                "--eval.num_examples=-1"], ["--eval.num_examples", "-1"]),
      "eval num_examples abc": (["evaluate", "--model", MISSING_MODEL,
                                 "--eval.num_examples=abc"], ["--eval.num_examples", "abc"]),
      "workdir is a file": (["train", "--config", TINY, "--workdir", a_file, *FAST],
                            ["--workdir", str(a_file)]),
      "workdir under a file": (["train", "--config", TINY, "--workdir", a_file / "run", *FAST],
                               ["--workdir", str(a_file / "run")]),
  }
  results = _run_all({name: argv for name, (argv, _) in cases.items()})
  return {name: (results[name], words) for name, (_, words) in cases.items()}


@pytest.mark.parametrize("case", [
    "unknown command", "eval task", "eval num_examples -1", "eval num_examples abc",
    "workdir is a file", "workdir under a file"])
def test_bad_input_is_one_line_naming_it_exit_2(bad_inputs, case):
  out, words = bad_inputs[case]
  lines = _lines(out.stderr)
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1, out.stderr[-2000:]
  assert lines[0].startswith("epi-jax") and "Traceback" not in out.stderr
  for word in words:
    assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("argv, words", [
    (["evaluate", "--model", MISSING_MODEL, "--eval.num_examples.gsm8k=0"],
     ["--eval.num_examples.gsm8k", "0"]),
    (["train", "--config", TINY], ["--workdir"]),
    (["generate", "--prompt", "hi", "--max_new_tokens", "abc"], ["--max_new_tokens", "abc"]),
    (["export", "--workdir", "some_run"], ["--out"]),
    (["verdicts"], ["verdicts"]),
    (["plan", "--config", TINY, "--topology", "v9-3"], ["--topology", "v9-3"]),
    (["plan", "--config", TINY, "--topology", "v5e-4", "--methods", "nope"], ["--methods"]),
    (["plan", "--config", TINY], ["--topology"]),
])
def test_more_bad_input_in_process(capsys, argv, words):
  """More bad flags (in process): argparse's errors and the missing ones, one line too."""
  status = _main(argv)
  lines = _lines(capsys.readouterr().err)
  assert status == 2 and len(lines) == 1, lines
  for word in words:
    assert word in lines[0], (word, lines[0])


def test_unwritable_workdir_is_one_line(tmp_path, monkeypatch, capsys):
  """A --workdir that cannot be created (here a read-only parent: mkdir's
  PermissionError, simulated since root writes anywhere): one line, exit 2."""
  target = tmp_path / "ro" / "run"
  real_mkdir = pathlib.Path.mkdir

  def mkdir(self, *args, **kwargs):
    if self == target:
      raise PermissionError(13, "Permission denied", str(self))
    return real_mkdir(self, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
  status = _main(["train", "--config", TINY, "--workdir", str(target), *FAST])
  lines = _lines(capsys.readouterr().err)
  assert status == 2 and len(lines) == 1, lines
  assert str(target) in lines[0] and "Permission denied" in lines[0]


# ----------------------------------------------------------------------------- a run dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny run stopped at step 1 (exit 3), then resumed to its end (step 2): its stderr."""
  run = tmp_path_factory.mktemp("run") / "run"
  first = _cli("train", "--config", TINY, "--workdir", run, *FAST, "--stop_after=1")
  assert first.returncode == 3, first.stderr[-3000:]
  resumed = _cli("train", "--config", TINY, "--workdir", run, *FAST)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return run, resumed.stderr


@pytest.mark.slow
def test_exact_resume_prints_no_orbax_warnings(run_dir):
  _, stderr = run_dir
  assert "resumed from step 1" in stderr
  assert "could not be restored" not in stderr and "WARNING" not in stderr, stderr


@pytest.mark.slow
def test_generate_from_a_run_dir_and_a_prompt_past_the_context(run_dir):
  run, _ = run_dir
  results = _run_all({
      "ok": ["generate", "--model", run, "--prompt", "hi", "--max_new_tokens", "2"],
      "long": ["generate", "--model", run, "--prompt", "x" * 600],
      "budget": ["generate", "--model", run, "--prompt", "hi", "--max_new_tokens", "600"],
  })
  assert results["ok"].returncode == 0, results["ok"].stderr[-3000:]
  for name in ("long", "budget"):
    out = results[name]
    lines = _lines(out.stderr)
    errors = [ln for ln in lines if ln.startswith("epi-jax generate:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert "512" in errors[0] and "Traceback" not in out.stderr  # the context, named
  long_error = [ln for ln in _lines(results["long"].stderr) if ln.startswith("epi-jax")][0]
  assert "--prompt takes 6" in long_error and "at most 0" not in long_error
  assert "at most 491 new tokens" in _lines(results["budget"].stderr)[-1]


# ----------------------------------------------------------------------------- in process


def test_fresh_checkpointer_restores_without_warnings_and_checks_the_layout(tmp_path, caplog):
  """What a resume does: a new manager (no save yet) reads the checkpoint's metadata."""
  params = {"layers.0.w": jnp.ones((2, 3)), "layers.1.w": jnp.zeros((2, 3))}
  state = TrainState(step=jnp.int32(1), params=params, opt_state=(jnp.ones(3),))
  saver = ckpt_lib.Checkpointer(tmp_path, 2, async_save=False)
  saver.save(1, state, {"step": 1})
  saver.close()
  abstract = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  with caplog.at_level(logging.WARNING):
    fresh = ckpt_lib.Checkpointer(tmp_path, 2, async_save=False)
    stacked = state._replace(params={"layers.w": jnp.ones((2, 2, 3))})
    with pytest.raises(ValueError, match="param layout"):  # refused, not quarantined
      fresh.restore_latest(abstract(stacked))
    _, _, step = fresh.restore_latest(abstract(state))
    fresh.close()
  assert step == 1 and not (tmp_path / "checkpoints_corrupt").exists()
  assert "could not be restored" not in caplog.text, caplog.text


def test_checkpoint_with_the_retired_rng_restores_verified(tmp_path, monkeypatch, capfd):
  """A checkpoint written while the train state still held its (unused) ``rng``
  restores: the rng is read with the rest, its checksums verify, and it is dropped."""
  params = {"layers.0.w": jnp.arange(6.0).reshape(2, 3)}
  state = TrainState(step=jnp.int32(3), params=params, opt_state=(jnp.ones(3),))
  current = ckpt_lib.to_storable
  monkeypatch.setattr(ckpt_lib, "to_storable",  # the layout before the rng was removed
                      lambda s: {**current(s), "rng": jnp.array([0, 42], jnp.uint32)})
  old = ckpt_lib.Checkpointer(tmp_path, 2, async_save=False)
  old.save(3, state, {"step": 3})
  old.close()
  monkeypatch.undo()
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  fresh = ckpt_lib.Checkpointer(tmp_path, 2, async_save=False)
  restored, data, step = fresh.restore_latest(abstract)
  fresh.close()
  assert step == 3 and data == {"step": 3} and isinstance(restored, TrainState)
  np.testing.assert_array_equal(restored.params["layers.0.w"], params["layers.0.w"])
  assert not (tmp_path / "checkpoints_corrupt").exists()
  assert "damaged" not in capfd.readouterr().err
