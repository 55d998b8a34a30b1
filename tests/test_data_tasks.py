"""The task registry: the tables derived from it, and a sixth task added in one place."""

import importlib
import json
import math
import pathlib
import re

import jax
import pytest

from epi_jax.data import builder, download, sources, tasks
from epi_jax.experiments import compare
from epi_jax.scoring import metrics
from epi_jax.training import config as cfg_lib
from epi_jax.training import load_run, train
from epi_jax.utils.files import read_jsonl

ev = importlib.import_module("epi_jax.scoring.evaluate")
REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARK = ("gsm8k", "code_alpaca", "logiqa", "alpaca", "chat")


def test_derived_tables_agree_with_the_registry():
  specs = tasks.specs()
  # Task ids are registry positions: the five benchmark tasks, then lima.
  assert tasks.ALL_CONFIGS == tuple(s.name for s in specs) == BENCHMARK + ("lima",)
  assert tasks.TASKS == BENCHMARK == tuple(s.name for s in specs if s.benchmark)
  assert [tasks.task_id(t) for t in tasks.ALL_CONFIGS] == list(range(len(specs)))
  # The TFDS builder: one config per task, features = common fields + the spec's.
  assert [c.name for c in builder.EpiSft.BUILDER_CONFIGS] == list(tasks.ALL_CONFIGS)
  for s in specs:
    assert set(builder.features(s.name).keys()) == set(tasks.COMMON_FIELDS) | set(s.fields)
    for path in s.raw_paths:
      assert path in builder.MANUAL_DOWNLOAD_INSTRUCTIONS, path
  # Downloads: every raw file is pinned.
  all_raw = {p for s in specs for p in s.raw_paths}
  assert set(download.RAW_FILE_PINS) == all_raw
  assert all_raw == {p for paths in tasks.RAW_FILES.values() for p in paths}
  # Evaluation.
  evaluated = [s for s in specs if s.eval_kind is not None]
  assert dict(metrics.PRIMARY_METRIC) == {s.name: (s.metric, s.higher_is_better) for s in evaluated}
  assert dict(metrics.SECONDARY_METRIC) == {"gsm8k": "accuracy"}
  assert dict(ev.DEFAULT_NUM_EXAMPLES) == {s.name: s.eval_examples for s in evaluated}
  assert ev.TASKS == BENCHMARK and ev.EVAL_TASKS == BENCHMARK
  assert ev.LOSS_TASKS == ("code_alpaca", "alpaca", "chat")
  assert dict(metrics.PRIMARY_METRIC)["logiqa"] == ("accuracy", True)
  # Training defaults: every benchmark task in the mixture and in exactly one stage.
  c = cfg_lib.default_config()
  assert set(c.data.mixture) == set(BENCHMARK)
  staged = [t for st in c.data.stages for t in st["mixture"]]
  assert sorted(staged) == sorted(BENCHMARK)
  assert set(c.data.stages[0]["mixture"]) == {"gsm8k", "code_alpaca"}
  # One definition of the methods.
  assert compare.METHODS is cfg_lib.METHODS


def test_readme_lists_every_task():
  text = (REPO / "README.md").read_text()
  line = re.search(r"`epi_sft` \(configs ([^)]*)\)", text)
  assert line, "README: the Data section names the epi_sft configs"
  assert tuple(re.findall(r"`(\w+)`", line.group(1))) == tasks.ALL_CONFIGS


def test_bad_specs_are_clear_errors():
  ok = dict(name="x", description="d", reader=sources.read_instructions,
            fields={"instruction": "text", "input": "text", "output": "text"}, benchmark=False)
  tasks.TaskSpec(**ok)
  with pytest.raises(ValueError, match="kind 'float'"):
    tasks.TaskSpec(**{**ok, "fields": {"score": "float"}})
  with pytest.raises(ValueError, match=r"'choice' needs the field\(s\) \['options', 'answer'\]"):
    tasks.TaskSpec(**{**ok, "eval_kind": "choice", "metric": "accuracy"})
  with pytest.raises(ValueError, match="reports .* not 'accuracy'"):
    tasks.TaskSpec(**{**ok, "metric": "accuracy"})
  with pytest.raises(ValueError, match="needs its stage"):
    tasks.TaskSpec(**{**ok, "benchmark": True})
  with pytest.raises(ValueError, match="common to every task"):
    tasks.TaskSpec(**{**ok, "fields": {"messages": "text"}})
  with pytest.raises(ValueError, match="lower-case"):
    tasks.TaskSpec(**{**ok, "name": "Bad-Name"})
  with pytest.raises(ValueError, match="already registered"):
    tasks.register_task(tasks.get("gsm8k"))
  with pytest.raises(ValueError, match="built in"):
    tasks.unregister_task("gsm8k")
  with pytest.raises(ValueError, match=r"Unknown task 'nope'; known: \['gsm8k'"):
    tasks.get("nope")


# ----------------------------------------------------------------------------- a sixth task


def _echo_records(n=160):
  words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light"]
  return [{"instruction": f"Repeat after me: {words[i % 8]} {i}.", "input": "",
           "output": f"{words[i % 8]} {i}."} for i in range(n)]


@pytest.fixture
def echo_task(tmp_path):
  """A tiny alpaca-format task, registered for this test only; its raw file in tmp_path."""
  raw = tmp_path / "raw"
  (raw / "echo").mkdir(parents=True)
  (raw / "echo" / "echo.json").write_text(json.dumps(_echo_records()))
  spec = tasks.register_task(tasks.TaskSpec(
      name="echo", description="Repeat a short phrase.", reader=sources.read_instructions,
      raw_files=(tasks.RawFile("echo/echo.json"),), source="written by the test",
      fields={"instruction": "text", "input": "text", "output": "text"},
      benchmark=False, eval_kind="loss", eval_examples=4))
  try:
    yield spec, raw
  finally:
    tasks.unregister_task("echo")
  assert "echo" not in tasks.ALL_CONFIGS


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_registered_task_trains_and_evaluates_end_to_end(echo_task, tmp_path):
  spec, raw = echo_task
  # The views follow the registry.
  assert tasks.ALL_CONFIGS[-1] == "echo" and tasks.task_id("echo") == 6
  assert "echo" not in tasks.TASKS and ev.LOSS_TASKS[-1] == "echo"
  assert metrics.PRIMARY_METRIC["echo"] == ("loss", False)

  from configs_loader import load_config  # pylint: disable=g-import-not-at-top
  c = load_config("tiny")
  c.method = "full"
  c.total_steps = 4
  c.log_every = 2
  c.checkpoint_every = 4
  c.snapshot_steps = ()
  c.progress_bar = False
  c.async_checkpointing = False
  c.data.mixture = {"echo": 1.0}
  c.data.seq_len = 64
  c.data.raw_dir = str(raw)
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.allow_standin = False  # the registered task's own data, built by the trainer
  c.optimizer.warmup_steps = 1
  result = train(c, tmp_path / "run")

  # The trainer prepared epi_sft/echo from the raw file and logged the task's loss.
  recs = read_jsonl(result.workdir / "metrics.jsonl")
  assert len(recs) == 2 and all(math.isfinite(r["loss/echo"]) for r in recs)
  assert not any(k.startswith("loss/") and k != "loss/echo" for r in recs for k in r)
  from epi_jax import data as epi_data  # pylint: disable=g-import-not-at-top
  test = epi_data.load_examples("echo", "test", c.data.data_dir)
  assert len(test) >= 4 and set(test[0]) == {"task", "id", "messages", "instruction", "input",
                                             "output"}
  assert test[0]["task"] == "echo" and test[0]["messages"][-1]["content"] == test[0]["output"]

  model, tok, _ = load_run(result.workdir)
  res = ev.evaluate(model, tok, tasks=("echo",), data_dir=c.data.data_dir, batch_size=2,
                    seq_len=64)
  assert res["echo"]["n"] == spec.eval_examples  # the spec's default count
  assert 0 < res["echo"]["loss"] < 8.0 and res["echo"]["tokens"] > 0
