"""The trainer on 8 fake CPU devices (conftest.py): sharding, exact resume, checkpoints."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from epi_jax.method.inspection import epi_state
from epi_jax.model import config as model_cfg
from epi_jax.model.config import train_flops_per_token
from epi_jax.training import checkpoint as ckpt_lib
from epi_jax.training import config as cfg_lib
from epi_jax.training import train, load_run, list_snapshots, is_finished
from epi_jax.utils.files import read_jsonl

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

STEPS = 6


def small_config(**mesh):
  """configs/tiny.py shrunk: 6 steps of 8 x 128 tokens (LogiQA needs longer rows)."""
  from configs_loader import load_config
  c = load_config("tiny")
  c.total_steps = STEPS
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.snapshot_steps = (2,)
  c.progress_bar = False
  c.async_checkpointing = False
  c.data.seq_len = 128
  c.data.mixture = {"gsm8k": 1.0, "code_alpaca": 1.0, "alpaca": 1.0, "chat": 1.0}
  c.optimizer.warmup_steps = 2
  c.epi.update_interval = 2
  c.epi.isolation_ratio = 0.1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (mesh.get(a, 1) for a in ("data", "fsdp", "tensor"))
  return c


def losses(workdir):
  return [r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sharded")
  return train(small_config(data=2, fsdp=2, tensor=2), workdir)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("single")
  return train(small_config(), workdir)


def test_sharded_equals_single_device(sharded_run, single_run):
  a, b = losses(single_run.workdir), losses(sharded_run.workdir)
  assert len(a) == len(b) == STEPS
  assert a[-1] < a[0]  # it learns
  np.testing.assert_allclose(a, b, rtol=2e-4)
  recs = read_jsonl(sharded_run.workdir / "metrics.jsonl")
  assert recs[-1]["num_refreshes"] == 3 and recs[-1]["isolated_fraction"] > 0.09
  for k in ("loss/gsm8k", "lr", "grad_norm", "tokens_per_s", "jaccard_first", "num_flipped"):
    assert k in recs[-1], k
  cfg = small_config()
  flops = train_flops_per_token(model_cfg.get_config(cfg.model.name), cfg.data.seq_len)
  assert recs[-1]["gflops"] == pytest.approx(flops * recs[-1]["tokens_per_s"] / 1e9)
  refreshes = read_jsonl(sharded_run.workdir / "refreshes.jsonl")
  assert [r["step"] for r in refreshes] == [2, 4, 6]
  assert refreshes[-1]["per_layer"]["layers/0/attn_norm/scale"] == 0.0  # excluded
  assert any(v > 0 for v in refreshes[-1]["per_layer"].values())
  # Lock-in counts at each refresh (epi_jax.method.lock_in), from an empty mask on.
  li = [r["lock_in"] for r in refreshes]
  assert li[0]["prev_isolated"] == li[0]["released"] == 0 and li[0]["entered"] == li[0]["isolated"]
  for before, after in zip(li, li[1:]):
    assert after["prev_isolated"] == before["isolated"]
    assert after["isolated"] == after["prev_isolated"] - after["released"] + after["entered"]
  # Eligible entries only (norm scales excluded): the isolated fraction is the logged one.
  assert li[-1]["isolated"] / li[-1]["entries"] == pytest.approx(
      refreshes[-1]["isolated_fraction"], rel=1e-4)
  for k in sharded_run.params:
    np.testing.assert_allclose(np.asarray(sharded_run.params[k]),
                               np.asarray(single_run.params[k]), atol=2e-4, rtol=1e-3)


def test_every_state_leaf_sharded_like_its_param(sharded_run):
  params = sharded_run.state.params
  specs = {k: v.sharding.spec for k, v in params.items()}
  assert specs["embed/embedding"] == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert specs["layers/0/mlp/down/kernel"] == jax.sharding.PartitionSpec("tensor", "fsdp")
  e = epi_state(sharded_run.state.opt_state)
  for field in (e.importance, e.mask, e.first_mask):
    for k, p in params.items():
      assert field[k].sharding.is_equivalent_to(p.sharding, p.ndim), k
  adam = [s for s in jax.tree.leaves(sharded_run.state.opt_state,
                                     is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")]
  assert adam
  for k, p in params.items():
    assert adam[0].mu[k].sharding.is_equivalent_to(p.sharding, p.ndim), k
    assert adam[0].nu[k].sharding.is_equivalent_to(p.sharding, p.ndim), k


def test_explicit_mesh_equals_auto(sharded_run, tmp_path):
  """mesh.axis_types='explicit' (jax.make_mesh's default kind): the same losses,
  masks and params as the Auto mesh of the same shape, state sharded alike."""
  config = small_config(data=2, fsdp=2, tensor=2)
  config.mesh.axis_types = "explicit"
  result = train(config, tmp_path)
  assert losses(tmp_path) == losses(sharded_run.workdir)
  got, ref = (epi_state(r.state.opt_state) for r in (result, sharded_run))
  assert int(got.num_refreshes) == 3
  for k, v in ref.mask.items():
    np.testing.assert_array_equal(np.asarray(got.mask[k]), np.asarray(v), err_msg=k)
    assert got.mask[k].sharding.is_equivalent_to(v.sharding, v.ndim), k
  for k, v in sharded_run.params.items():
    np.testing.assert_array_equal(np.asarray(result.params[k]), np.asarray(v), err_msg=k)


def test_kill_and_resume_equals_uninterrupted(sharded_run, tmp_path):
  config = small_config(data=2, fsdp=2, tensor=2)
  first = train(config, tmp_path, stop_after=3)
  assert first.interrupted and first.step == 3 and not is_finished(tmp_path)
  assert ckpt_lib.Checkpointer(tmp_path, 2).all_steps() == [2, 3]
  second = train(config, tmp_path)
  assert second.step == STEPS and not second.interrupted and is_finished(tmp_path)
  assert losses(tmp_path) == losses(sharded_run.workdir)  # bit-identical
  # A resumed run's lock-in counts go on from the restored mask (refresh 4 after step 3).
  assert ([r["lock_in"] for r in read_jsonl(tmp_path / "refreshes.jsonl")]
          == [r["lock_in"] for r in read_jsonl(sharded_run.workdir / "refreshes.jsonl")])
  for k, v in sharded_run.params.items():
    np.testing.assert_array_equal(np.asarray(second.params[k]), np.asarray(v))
  # Checkpoint content: both final checkpoints hold the same state.
  ref, got = (jax.device_get(ckpt_lib.to_storable(r.state)) for r in (sharded_run, second))
  jax.tree.map(np.testing.assert_array_equal, ref, got)
  assert list_snapshots(tmp_path) == [2, STEPS]
  model, tok, cfg = load_run(tmp_path)
  assert cfg.total_steps == STEPS and tok.vocab_size == 259
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]),
                                np.asarray(second.params["embed/embedding"]))


def test_corrupt_latest_checkpoint_falls_back(sharded_run, tmp_path, capfd):
  workdir = tmp_path / "run"
  shutil.copytree(sharded_run.workdir, workdir)
  steps = ckpt_lib.Checkpointer(workdir, 2).all_steps()
  assert steps == [4, 6]
  # Corrupt every data file of the latest state checkpoint.
  for f in (workdir / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  (workdir / "DONE").unlink()
  result = train(small_config(data=2, fsdp=2, tensor=2), workdir)
  err = capfd.readouterr().err
  assert "failed to restore" in err and "resumed from step 4" in err
  assert result.step == STEPS and is_finished(workdir)
  assert len(list((workdir / "checkpoints_corrupt").iterdir())) == 1  # moved, not deleted
  assert ckpt_lib.Checkpointer(workdir, 2).all_steps() == [4, 6]
  # Steps 5 and 6 were redone from step 4: the same losses as the first time.
  recs = read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
  assert [r["loss"] for r in recs] == losses(sharded_run.workdir)


@pytest.mark.parametrize("field, value, message", [
    ("foo", 1, "Unknown config field 'foo'"),
    ("optimizer.lr", 1.0, "Unknown config field 'optimizer.lr'"),
    ("method", "bogus", "config.method='bogus'"),
    ("optimizer.learning_rate", -1.0, "optimizer.learning_rate"),
    ("data.mixture", {"nope": 1.0}, "data.mixture.nope"),
    ("epi.isolation_ratio", 1.5, "epi.isolation_ratio"),
    ("mesh.tensor", 0, "mesh.tensor"),
    ("mesh.axis_types", "manual", "mesh.axis_types"),
    ("epi.importance_dtype", "float16", "epi.importance_dtype"),
    ("epi.release_after", 0, "epi.release_after"),
    ("checkpoint_every", -1, "checkpoint_every=-1: must be an int >= 1, or 0"),
])
def test_bad_config_fails_before_training(field, value, message, tmp_path):
  config = small_config()
  parent, _, leaf = field.rpartition(".")
  node = config
  for part in filter(None, parent.split(".")):
    node = node[part]
  with node.unlocked() if hasattr(node, "unlocked") else _null():
    node[leaf] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    train(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # nothing started


# Slow tier: cheap after single_run (same step), which only the slow tier runs.
@pytest.mark.slow
def test_checkpoint_every_zero_writes_snapshots_only(tmp_path):
  config = small_config()  # single_run's step (its total_steps): no compile of its own
  config.checkpoint_every, config.snapshot_steps = 0, (2,)
  result = train(config, tmp_path / "run")
  assert result.step == STEPS and is_finished(tmp_path / "run")
  assert list_snapshots(tmp_path / "run") == [2, STEPS]
  assert ckpt_lib.Checkpointer(tmp_path / "run", 2).all_steps() == []


def test_later_seed_reuses_the_compiled_step(tmp_path):
  """Runs differing only in their seed share one compiled step (the seed is in
  the initial state only), and a reused step trains exactly like a fresh one."""
  from epi_jax.training import step as step_lib
  step_lib._STEP_CACHE.clear()
  first = small_config()
  first.total_steps, first.checkpoint_every, first.snapshot_steps = 2, 0, ()
  later = cfg_lib.from_json(cfg_lib.to_json(first))
  later.seed = first.seed + 1
  train(first, tmp_path / "seed0")
  reused = train(later, tmp_path / "seed1")
  assert len(step_lib._STEP_CACHE) == 1
  step_lib._STEP_CACHE.clear()
  fresh = train(later, tmp_path / "fresh")
  assert losses(tmp_path / "seed1") == losses(tmp_path / "fresh")
  assert losses(tmp_path / "seed0") != losses(tmp_path / "seed1")
  for k, v in fresh.params.items():
    np.testing.assert_array_equal(np.asarray(reused.params[k]), np.asarray(v), err_msg=k)


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def test_multi_stage_total_steps_must_match_stages():
  config = small_config()
  config.method = "multi_stage"
  with pytest.raises(ValueError, match="sum of data.stages"):
    cfg_lib.validate(config)
  config.total_steps = 0
  assert cfg_lib.validate(config).total_steps == 24


def test_compact_state_and_variants_train_sharded(tmp_path):
  """bf16 importance, packed masks, release hysteresis and moment reset in the trainer."""
  config = small_config(data=2, fsdp=2, tensor=2)
  config.total_steps = 4
  config.snapshot_steps = ()
  config.epi.importance_dtype = "bfloat16"
  config.epi.packed_mask = True
  config.epi.release_after = 2
  config.epi.reset_on_release = True
  result = train(config, tmp_path / "run")
  assert np.all(np.isfinite(losses(result.workdir)))
  e = epi_state(result.state.opt_state)
  assert {str(m.dtype) for m in jax.tree.leaves(e.mask)} == {"uint8"}
  assert {str(i.dtype) for i in jax.tree.leaves(e.importance)} == {"bfloat16"}
  assert int(e.num_refreshes) == 2 and jax.tree.leaves(e.out_streak)
  refreshes = read_jsonl(result.workdir / "refreshes.jsonl")
  assert [r["step"] for r in refreshes] == [2, 4]
  for r in refreshes:  # per-layer fractions of the unpacked masks
    assert all(0.0 <= v <= 1.0 for v in r["per_layer"].values())
    assert max(r["per_layer"].values()) > 0.0
  # Lock-in counts from packed masks, hysteresis on: the bookkeeping adds up.
  last = refreshes[-1]["lock_in"]
  assert last["prev_isolated"] == refreshes[0]["lock_in"]["isolated"] > 0
  assert last["isolated"] == last["prev_isolated"] - last["released"] + last["entered"]


def test_static_importance_option_picks_cpi_ft_displacement():
  from epi_jax.training import optim
  config = small_config()
  config.method = "static"
  config.epi.static_importance = "displacement"
  cfg_lib.validate(config)
  params = {"layer": {"w": jax.numpy.arange(6.0).reshape(2, 3)}}
  state = optim.make_optimizer(config).init(params)
  np.testing.assert_array_equal(epi_state(state).importance["layer"]["w"], params["layer"]["w"])
  config.method = "epi"  # epi keeps epi.importance (grad_sq: starts at zero)
  state = optim.make_optimizer(config).init(params)
  assert float(jax.numpy.abs(epi_state(state).importance["layer"]["w"]).sum()) == 0.0
  config.epi.static_importance = "nope"
  with pytest.raises(ValueError, match="epi.static_importance"):
    cfg_lib.validate(config)
