"""The `epi-jax train` command end to end, SIGTERM, and the large configs' abstract state."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs_loader import load_config
from epi_jax.method.inspection import epi_state
from epi_jax.training import checkpoint as ckpt_lib
from epi_jax import sharding
from epi_jax.training import trainer
from epi_jax.utils.files import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--config.data.seq_len=128", "--config.data.mixture.logiqa=0.0",
        "--config.progress_bar=False", "--config.mesh.data=1",
        "--config.async_checkpointing=False"]


def _cli(workdir, *extra):
  cmd = [sys.executable, "-m", "epi_jax.cli", "train", "--config", str(ROOT / "configs/tiny.py"),
         "--workdir", str(workdir), *FAST, *extra]
  env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")
  return cmd, env


def test_cli_end_to_end_then_resume_noop(tmp_path, capsys):
  cmd, env = _cli(tmp_path, "--config.total_steps=4", "--config.log_every=2",
                  "--config.method=full")
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((tmp_path / "DONE").read_text())["step"] == 4
  recs = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in recs] == [2, 4] and "isolated_fraction" not in recs[0]
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["method"] == "full" and cfg["total_steps"] == 4
  assert list((tmp_path / "tensorboard").iterdir())
  assert trainer.list_snapshots(tmp_path) == [4]
  # A bad flag: the same CLI in this process (it stops before any JAX work).
  from epi_jax.training import cli as train_cli
  capsys.readouterr()
  assert train_cli.train_main(_cli(tmp_path, "--config.optimizer.lr=1")[0][4:]) == 2
  assert "Unknown config field 'optimizer.lr'" in capsys.readouterr().err


def test_sigterm_leaves_a_restorable_checkpoint(tmp_path):
  cmd, env = _cli(tmp_path, "--config.total_steps=500", "--config.log_every=1",
                  "--config.checkpoint_every=1000")
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 3, err[-3000:]
  steps = ckpt_lib.Checkpointer(tmp_path, 2).all_steps()
  assert len(steps) == 1 and 2 <= steps[0] < 500
  config = load_config("tiny")
  config.total_steps, config.data.seq_len, config.mesh.data = 500, 128, 1
  config.data.mixture = {"gsm8k": 1.0, "code_alpaca": 1.0, "alpaca": 1.0, "chat": 1.0}
  mesh = sharding.make_mesh(config.mesh)
  abstract, shardings = trainer.abstract_state(config, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  state, data_state, step = ckpt_lib.Checkpointer(tmp_path, 2).restore_latest(target)
  assert step == steps[0] == int(state.step) == data_state["step"]
  assert not trainer.is_finished(tmp_path)


@pytest.mark.parametrize("name, expect_billion", [("tpu_llama3_8b", 8.03), ("gpu_qwen2_7b", 7.62)])
def test_large_configs_abstract_state_and_shardings(name, expect_billion):
  config = load_config(name)
  mesh = sharding.make_mesh(config.mesh)  # 8 fake devices
  abstract, shardings = trainer.abstract_state(config, mesh)
  params = abstract.params
  n = sum(math.prod(p.shape) for p in params.values())
  assert abs(n / 1e9 - expect_billion) < 0.01
  e = epi_state(abstract.opt_state)
  e_shard = epi_state(shardings.opt_state)
  p_shard = shardings.params
  per_device = 0
  for k, p in params.items():
    for field in (e_shard.importance, e_shard.mask, e_shard.first_mask):
      assert field[k] == p_shard[k], k
    stacked = k.startswith("layers/") and not k.split("/")[1].isdigit()  # scan_layers
    if p.ndim - stacked == 2:  # every matrix is split over the mesh
      assert p_shard[k].spec != jax.sharding.PartitionSpec(), k
    per_device += math.prod(p_shard[k].shard_shape(p.shape)) * (4 + 4 + 4 + 4 + 1 + 1)
  # params + adam mu/nu + importance (fp32) + two bool masks, per device.
  assert per_device < 0.3 * n * 18
  assert e.mask["embed/embedding"].dtype == np.bool_
