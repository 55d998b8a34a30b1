"""The grain training pipeline on small in-memory sources (no raw data needed)."""

import numpy as np
import pytest

from epi_jax import data as epi_data
from epi_jax.data import pipeline


class CharTokenizer:
  """A hand-checkable ChatML stand-in: one token per byte, specials 256-258."""
  START, END, PAD = 257, 258, 256
  pad_id = PAD
  eos_id = END
  vocab_size = 259

  def encode(self, text):
    return list(text.encode("utf-8"))

  def apply_chat_template(self, messages, add_generation_prompt=False):
    ids, mask = [], []
    for m in messages:
      a = m["role"] == "assistant"
      head = [self.START] + self.encode(m["role"] + "\n")
      body = self.encode(m["content"]) + [self.END]
      ids += head + body + self.encode("\n")
      mask += [False] * len(head) + [a] * len(body) + [False]
    if add_generation_prompt:
      head = [self.START] + self.encode("assistant\n")
      ids += head
      mask += [False] * len(head)
    return ids, mask


def _conv(task, i, n_user=5, n_asst=3):
  return {"task": task, "messages": [
      {"role": "user", "content": f"{task[0]}{i}" + "u" * (i % n_user)},
      {"role": "assistant", "content": "a" * (1 + i % n_asst)}]}


@pytest.fixture(scope="module")
def sources():
  return {t: [_conv(t, i) for i in range(40 + 7 * k)] for k, t in enumerate(epi_data.TASKS)}


@pytest.fixture(scope="module")
def tok():
  return CharTokenizer()


def _make(tok, sources, **kw):
  args = dict(mixture={t: 1.0 for t in epi_data.TASKS}, batch_size=4, seq_len=64, seed=3,
              sources=sources)
  args.update(kw)
  return pipeline.make_train_iterator(tok, **args)


def test_loss_mask_hand_checked(tok):
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  ids, mask = tok.apply_chat_template(msgs)
  rows = [[(0, np.asarray(ids, np.int32), np.asarray(mask))]]
  b = pipeline.pack_rows(rows, seq_len=28, pad_id=tok.PAD)
  # <s>user\nhi</e>\n (10 tokens) <s>assistant\nyo</e>\n (15): 24 input/target pairs.
  assert len(ids) == 25
  targets = b["targets"][0]
  trained = [int(t) for t, m in zip(targets, b["loss_mask"][0]) if m]
  assert trained == [ord("y"), ord("o"), tok.END]  # assistant content + its end token only
  assert np.flatnonzero(b["loss_mask"][0]).tolist() == [20, 21, 22]
  np.testing.assert_array_equal(b["inputs"][0, :24], ids[:-1])
  np.testing.assert_array_equal(b["targets"][0, :24], ids[1:])
  assert b["segment_ids"][0].tolist() == [1] * 24 + [0] * 4
  assert b["positions"][0].tolist() == list(range(24)) + [0] * 4
  assert b["task_ids"][0].tolist() == [0] * 24 + [-1] * 4
  assert b["loss_mask"][0, 24:].sum() == 0 and (b["targets"][0, 24:] == tok.PAD).all()


def test_packed_segments(tok, sources):
  it = _make(tok, sources, batch_size=4, seq_len=64)
  for _ in range(5):
    b = next(it)
    assert {k: v.shape for k, v in b.items()} == {k: (4, 64) for k in b}
    assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    for r in range(4):
      seg, pos, task = b["segment_ids"][r], b["positions"][r], b["task_ids"][r]
      n_seg = seg.max()
      assert n_seg >= 2  # short examples get packed
      # segments are contiguous, numbered 1.. from the left, padding (0) at the end
      valid = seg > 0
      assert (np.diff(seg[valid]) >= 0).all() and set(seg[valid]) == set(range(1, n_seg + 1))
      assert not valid[valid.argmin():].any() or valid.all()
      for s in range(1, n_seg + 1):
        idx = np.flatnonzero(seg == s)
        assert (pos[idx] == np.arange(len(idx))).all()
        assert len(set(task[idx])) == 1 and task[idx][0] >= 0
        # each segment starts at <|im_start|> and its mask covers only assistant targets
        assert b["inputs"][r, idx[0]] == tok.START
        assert b["loss_mask"][r, idx].sum() > 0
        # the target of a segment's last token is still inside that example
        assert b["targets"][r, idx[-1]] == ord("\n")
      assert (task[~valid] == -1).all() and (b["loss_mask"][r, ~valid] == 0).all()
      # packed sequences never attend across examples: causal + same-segment mask
      attend = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
      for s in range(1, n_seg + 1):
        idx = np.flatnonzero(seg == s)
        assert attend[np.ix_(idx, np.flatnonzero((seg != s)))].sum() == 0


def test_padding_mode_one_example_per_row(tok, sources):
  b = next(_make(tok, sources, packing=False))
  assert (b["segment_ids"].max(axis=1) == 1).all()


def test_resume_gives_identical_batches(tok, sources):
  it = _make(tok, sources)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]
  restored = _make(tok, sources)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # and a different seed gives a different order
  other = _make(tok, sources, seed=4)
  assert not np.array_equal(next(other)["inputs"], next(_make(tok, sources))["inputs"])


def test_deterministic(tok, sources):
  a, b = _make(tok, sources), _make(tok, sources)
  for _ in range(5):
    np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])


def test_mixture_proportions(tok, sources):
  weights = {"gsm8k": 0.5, "code_alpaca": 0.3, "logiqa": 0.2}
  it = _make(tok, sources, mixture=weights, batch_size=8)
  counts = np.zeros(len(epi_data.ALL_CONFIGS))
  for _ in range(40):
    b = next(it)
    starts = b["positions"] == 0
    starts &= b["segment_ids"] > 0
    np.add.at(counts, b["task_ids"][starts], 1)
  share = counts / counts.sum()
  assert counts.sum() > 500
  for t, w in weights.items():
    assert abs(share[epi_data.TASKS.index(t)] - w) < 0.02, (t, share)
  assert share[epi_data.TASKS.index("alpaca")] == 0


def test_stage_switching(tok, sources):
  stages = [{"mixture": {"gsm8k": 1.0}, "steps": 3},
            {"mixture": {"logiqa": 1.0, "chat": 1.0}, "steps": 2}]
  it = _make(tok, sources, stages=stages, mixture=None)
  batches = list(it)  # every stage has a step count: the iterator ends
  assert len(batches) == 5
  gsm, logiqa, chat = (epi_data.TASKS.index(t) for t in ("gsm8k", "logiqa", "chat"))
  for b in batches[:3]:
    assert set(np.unique(b["task_ids"])) <= {-1, gsm}
  for b in batches[3:]:
    assert set(np.unique(b["task_ids"])) <= {-1, logiqa, chat}
  assert {logiqa, chat} <= set(np.unique(batches[3]["task_ids"]))
  # resuming inside stage 1 continues in stage 1 and then stage 2
  it2 = _make(tok, sources, stages=stages, mixture=None)
  next(it2), next(it2)
  it3 = _make(tok, sources, stages=stages, mixture=None)
  it3.set_state(it2.get_state())
  rest = list(it3)
  assert len(rest) == 3
  np.testing.assert_array_equal(rest[-1]["inputs"], batches[-1]["inputs"])


def test_shards_concatenate_to_global_batch(tok, sources):
  full = _make(tok, sources, batch_size=8)
  shards = [_make(tok, sources, batch_size=8, shard_index=i, shard_count=4) for i in range(4)]
  for _ in range(4):
    want = next(full)
    parts = [next(s) for s in shards]
    assert parts[0]["inputs"].shape == (2, 64)
    for k in want:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k], err_msg=k)


def test_too_long_examples_truncated_or_dropped(tok):
  long_user = {"task": "gsm8k", "messages": [
      {"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "ok"}]}
  long_answer = {"task": "gsm8k", "messages": [
      {"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * 100}]}
  it = _make(tok, {"gsm8k": [long_user, long_answer]}, mixture={"gsm8k": 1.0}, batch_size=2,
             seq_len=32, packing=False)
  b = next(it)
  # the long prompt leaves no assistant target in the window: dropped and counted
  assert it.drops["no_assistant_target"] >= 1
  # the long answer is truncated to the window and kept
  assert (b["segment_ids"] == 1).all() and b["loss_mask"].sum() > 0


def test_bad_arguments(tok, sources):
  with pytest.raises(ValueError, match="unknown task"):
    _make(tok, sources, mixture={"nope": 1.0})
  with pytest.raises(ValueError, match="divisible"):
    _make(tok, sources, batch_size=6, shard_count=4)
  with pytest.raises(ValueError, match="no positive weight"):
    _make(tok, sources, mixture={"gsm8k": 0.0})
