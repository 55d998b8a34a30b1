"""Nothing silently wrong: damaged checkpoints, changed configs, two writers, non-finite
values, bad config files and data, out-of-vocabulary generation (issue 16)."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from epi_jax.training import checkpoint as ckpt_lib
from epi_jax.training import cli as train_cli
from epi_jax.training import config as cfg_lib
from epi_jax.training import trainer
from epi_jax.training import workdir as workdir_lib
from epi_jax.training import NonFiniteError, train
from epi_jax.utils.files import read_jsonl
from test_training import STEPS, losses, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tree_digest(directory) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``directory``."""
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """6 uninterrupted steps on one device; checkpoints 4 and 6 are kept."""
  return train(small_config(), tmp_path_factory.mktemp("reference"))


def _copy_run(run, dest) -> pathlib.Path:
  shutil.copytree(run.workdir, dest)
  return dest


def _target(config):
  """The abstract train state of ``config`` (for Checkpointer.restore_latest)."""
  from epi_jax import sharding
  abstract, shardings = trainer.abstract_state(config, sharding.make_mesh(config.mesh))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


# ----------------------------------------------------------------------------- checkpoints


def _flip_64_bytes(directory):
  """XORs 64 bytes in the middle of the largest (array data) file under ``directory``."""
  files = [p for p in pathlib.Path(directory).rglob("*")
           if p.is_file() and "metadata" not in p.name and "manifest" not in p.name]
  data = max(files, key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])
  data.write_bytes(bytes(raw))


def test_flipped_bytes_checkpoint_falls_back_and_resumes_exactly(reference_run, tmp_path, capfd):
  workdir = _copy_run(reference_run, tmp_path / "run")
  _flip_64_bytes(workdir / "checkpoints" / "6" / "state")
  (workdir / "DONE").unlink()
  result = train(small_config(), workdir)
  err = capfd.readouterr().err
  # The flipped bytes land in an array's data (a checksum mismatch) or in the
  # file's own framing (a read error), as the writer's threads laid the file out
  # (it varied under load in `make test`): either way the checkpoint is damaged.
  # (The checksum itself: test_flipped_bytes_snapshot_is_refused.)
  assert "checkpoint" in err and "is damaged" in err and "resumed from step 4" in err
  assert len(list((workdir / "checkpoints_corrupt").iterdir())) == 1  # moved aside
  assert result.step == STEPS and trainer.is_finished(workdir)
  assert losses(workdir) == losses(reference_run.workdir)
  for k, v in reference_run.params.items():
    np.testing.assert_array_equal(np.asarray(result.params[k]), np.asarray(v))


def test_flipped_bytes_snapshot_is_refused(reference_run, tmp_path):
  workdir = _copy_run(reference_run, tmp_path / "run")
  trainer.load_run(workdir, snapshot=2)  # intact
  _flip_64_bytes(workdir / "snapshots" / "2")
  with pytest.raises(ValueError, match="snapshot .*2 is damaged: checksum mismatch"):
    trainer.load_run(workdir, snapshot=2)


def test_restored_nonfinite_params_are_refused(reference_run, tmp_path, capfd):
  """A checkpoint whose params are inf (checksums consistent) is not resumed from."""
  workdir = _copy_run(reference_run, tmp_path / "run")
  config = small_config()
  target = _target(config)
  ckpt = ckpt_lib.Checkpointer(workdir, 3, async_save=False)
  state, data_state, step = ckpt.restore_latest(target)
  assert step == STEPS
  k = "layers/0/mlp/down/kernel"
  state = state._replace(params={**state.params, k: state.params[k].at[0, 0].set(np.inf)})
  ckpt.save(STEPS + 1, state, data_state)
  ckpt.wait()
  _, _, step = ckpt.restore_latest(target)
  ckpt.close()
  err = capfd.readouterr().err
  assert step == STEPS and "params hold inf or nan" in err


def test_packed_masks_of_the_earlier_layout_are_converted_on_restore(tmp_path, capfd):
  """Checkpoints of ``epi.packed_mask`` runs written before the masks were packed by
  rows (8 entries of the last axis per byte then, ``np.packbits(axis=-1)``) resume
  with the same masks, converted, not quarantined as damaged."""
  from epi_jax.method import compact  # pylint: disable=g-import-not-at-top
  config = small_config()
  config.epi.packed_mask = True
  target = _target(config)
  rng = np.random.default_rng(0)
  masks, now, before = {}, [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(target.opt_state)[0]:
    name = next((k.key for k in reversed(path) if getattr(k, "key", None) in target.params), None)
    value = rng.integers(0, 255, leaf.shape).astype(leaf.dtype)
    if name is not None and leaf.dtype == np.uint8 and leaf.shape != target.params[name].shape:
      m = masks.setdefault(name, rng.random(target.params[name].shape) < 0.3)
      value = np.asarray(compact.pack(m))  # this version's layout
      before.append(np.packbits(m, axis=-1, bitorder="little") if m.ndim else np.uint8([m]))
    else:
      before.append(value)
    now.append(value)
  assert len(masks) > 3
  as_state = lambda leaves: target._replace(  # pylint: disable=unnecessary-lambda-assignment
      params={k: np.zeros(v.shape, v.dtype) for k, v in target.params.items()},
      step=np.int32(4), opt_state=jax.tree.unflatten(jax.tree.structure(target.opt_state),
                                                     leaves))
  ckpt = ckpt_lib.Checkpointer(tmp_path, 2, async_save=False)
  ckpt.save(4, as_state(before), {"iterator": {}})
  ckpt.wait()
  state, _, step = ckpt.restore_latest(target)
  ckpt.close()
  assert step == 4 and "packed masks in the earlier last-axis layout: converted" in (
      capfd.readouterr().err)
  assert not (tmp_path / "checkpoints_corrupt").exists()
  for got, want in zip(jax.tree.leaves(state.opt_state), now):
    np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------- binding


@pytest.mark.parametrize("field, value", [
    ("method", "full"),
    ("epi.packed_mask", True),
    ("model.param_dtype", "bfloat16"),
    ("data.mixture", {"gsm8k": 1.0}),
    ("seed", 1),
])
def test_config_change_refused_and_workdir_untouched(reference_run, field, value):
  before = tree_digest(reference_run.workdir)
  config = small_config()
  parent, _, leaf = field.rpartition(".")
  node = config[parent] if parent else config
  with node.unlocked():
    node[leaf] = value
  for allow in (False, True):  # unsafe fields: not even with allow_config_change
    with pytest.raises(workdir_lib.ConfigChanged, match=field.replace(".", r"\.")) as e:
      train(config, reference_run.workdir, allow_config_change=allow)
    assert "new --workdir" in str(e.value)
  assert tree_digest(reference_run.workdir) == before


def test_failed_start_changes_nothing(reference_run, capsys):
  before = tree_digest(reference_run.workdir)
  config = small_config()
  config.mesh.data = 64
  with pytest.raises(workdir_lib.RunRefused, match="needs 64 devices"):
    train(config, reference_run.workdir)
  config = small_config()
  config.total_steps = STEPS + 2
  with pytest.raises(workdir_lib.ConfigChanged, match="--allow_config_change"):
    train(config, reference_run.workdir)
  assert train_cli.train_main(["--config", str(ROOT / "configs/tiny.py"), "--workdir",
                               str(reference_run.workdir), "--config.mesh.data=64"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "needs 64 devices" in err
  assert tree_digest(reference_run.workdir) == before


def test_second_run_refused_while_locked(reference_run):
  before = tree_digest(reference_run.workdir)
  with workdir_lib.WorkdirLock(reference_run.workdir):
    with pytest.raises(workdir_lib.WorkdirLocked, match=f"pid {os.getpid()}"):
      train(small_config(), reference_run.workdir)
    lock = workdir_lib.WorkdirLock(reference_run.workdir)
    with pytest.raises(workdir_lib.WorkdirLocked, match="in use by another run"):
      lock.acquire()
  assert not (reference_run.workdir / workdir_lib.LOCK_NAME).exists()  # released
  assert tree_digest(reference_run.workdir) == before


def test_safe_change_allowed_and_stale_lock_taken_over(reference_run, tmp_path, capfd):
  workdir = _copy_run(reference_run, tmp_path / "run")
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(
      {"pid": dead.pid, "host": os.uname().nodename, "started": 0}))
  config = small_config()
  config.total_steps, config.log_every = STEPS + 2, 2
  result = train(config, workdir, allow_config_change=True)
  err = capfd.readouterr().err
  assert "taking over the stale lock" in err and "resumed from step 6" in err
  assert "total_steps: 6 -> 8" in err
  assert result.step == STEPS + 2 and trainer.is_finished(workdir)
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == STEPS + 2
  assert not (workdir / workdir_lib.LOCK_NAME).exists()
  assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")][-2:] == [6, 8]


def test_config_changes_lists_only_meaningful_fields():
  a = json.loads(cfg_lib.to_json(cfg_lib.validate(small_config())))
  c = small_config()
  c.progress_bar, c.total_steps = True, 9
  c.optimizer.learning_rate = 1e-3
  b = json.loads(cfg_lib.to_json(cfg_lib.validate(c)))
  assert set(workdir_lib.config_changes(a, b)) == {"total_steps", "optimizer.learning_rate"}


# ----------------------------------------------------------------------------- non-finite


def _nan_at_step(monkeypatch, nan_step: int):
  """Batch ``nan_step`` (1-based) gets a NaN loss weight: its loss and gradients are NaN."""
  orig, count = trainer.inputs.to_global, [0]

  def to_global(batch, mesh, batch_size):
    count[0] += 1
    batch = dict(batch)
    mask = np.asarray(batch["loss_mask"]).astype(np.float32)
    if count[0] == nan_step:
      mask[0, 0] = np.nan
    batch["loss_mask"] = mask
    return orig(batch, mesh, batch_size)
  monkeypatch.setattr(trainer.inputs, "to_global", to_global)


def test_nan_loss_mid_run_stops_with_exit_4_and_a_finite_checkpoint(tmp_path, monkeypatch,
                                                                      capsys):
  _nan_at_step(monkeypatch, 3)
  # small_config()'s step (optimizer, EPI options, steps, shapes): compiled already for
  # reference_run, loaded from the persistent compilation cache (tests/conftest.py).
  argv = ["--config", str(ROOT / "configs/tiny.py"), "--workdir", str(tmp_path),
          f"--config.total_steps={STEPS}", "--config.checkpoint_every=2", "--config.log_every=1",
          "--config.data.seq_len=128", "--config.data.mixture.logiqa=0.0",
          "--config.optimizer.warmup_steps=2", "--config.epi.update_interval=2",
          "--config.epi.isolation_ratio=0.1",
          "--config.progress_bar=False", "--config.mesh.data=1",
          "--config.async_checkpointing=False"]
  assert train_cli.train_main(argv) == 4
  err = capsys.readouterr().err
  assert "non-finite at step 3" in err and "newest checkpoint (step 2)" in err
  assert ckpt_lib.Checkpointer(tmp_path, 2).all_steps() == [2]  # the NaN state not saved
  assert not trainer.is_finished(tmp_path)
  config = cfg_lib.validate(trainer.load_config(tmp_path))
  state, _, step = ckpt_lib.Checkpointer(tmp_path, 2).restore_latest(_target(config))
  assert step == 2 and all(np.isfinite(np.asarray(v)).all() for v in state.params.values())


def test_skip_nonfinite_skips_the_step(tmp_path, monkeypatch):
  _nan_at_step(monkeypatch, 3)
  config = small_config()
  config.optimizer.skip_nonfinite = True
  result = train(config, tmp_path)
  assert result.step == STEPS and trainer.is_finished(tmp_path)
  recs = read_jsonl(tmp_path / "metrics.jsonl")
  assert recs[2]["loss"] is None and recs[1]["skipped_steps"] == 0
  assert recs[-1]["skipped_steps"] == 1 and recs[-1]["loss"] is not None
  assert all(np.isfinite(np.asarray(v)).all() for v in result.params.values())


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value", [
    ("learning_rate", float("inf")), ("learning_rate", float("nan")), ("eps", float("inf")),
    ("clip_norm", float("nan")), ("weight_decay", float("inf")), ("b2", float("nan")),
])
def test_nonfinite_optimizer_values_refused(field, value):
  config = small_config()
  config.optimizer[field] = value
  with pytest.raises(ValueError, match=f"optimizer\\.{field}=.*finite"):
    cfg_lib.validate(config)


@pytest.mark.parametrize("args, message", [
    (["--config.data.mixture.bogus=1.0"], "Unknown task 'bogus'"),
    (["--config.optimizer.learning_rate=inf"], "optimizer.learning_rate=inf"),
    (["--config.data.mixture.lima=1.0"], "does not have"),
])
def test_cli_bad_config_one_line_exit_2(args, message, tmp_path, capsys):
  from epi_jax.experiments import cli as eval_cli
  argv = ["--config", str(ROOT / "configs/tiny.py"), "--workdir", str(tmp_path / "w"), *args]
  for main in (train_cli.train_main, eval_cli.compare_main):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, (main, err)
  assert not (tmp_path / "w").exists()


def test_cli_missing_or_broken_config_file(tmp_path, capsys):
  from epi_jax.experiments import cli as eval_cli
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  raises = tmp_path / "raises.py"
  raises.write_text("def get_config():\n  raise RuntimeError('no such preset')\n")
  for path, message in ((tmp_path / "nope.py", "No such file"), (broken, "invalid syntax"),
                        (raises, "no such preset")):
    for main in (train_cli.train_main, eval_cli.compare_main):
      assert main(["--config", str(path), "--workdir", str(tmp_path / "w")]) == 2
      err = capsys.readouterr().err.strip()
      assert len(err.splitlines()) == 1 and message in err, (main, err)
  assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- data


def test_empty_or_truncated_json_names_the_file(tmp_path):
  from epi_jax.data import tasks
  (tmp_path / "codealpaca").mkdir()
  good = [{"instruction": f"Write {i}", "input": "", "output": "x"} for i in range(3)]
  (tmp_path / "codealpaca" / "new_codealpaca.json").write_text(json.dumps(good))
  target = tmp_path / "codealpaca" / "code_alpaca_2k.json"
  for text, what in (("", "empty"), (json.dumps(good)[:-40], "not valid JSON")):
    target.write_text(text)
    with pytest.raises(ValueError, match=f"code_alpaca_2k.json: .*{what}"):
      tasks.get("code_alpaca").read(tmp_path)


def test_unparseable_jsonl_names_file_and_line(tmp_path):
  from epi_jax.data import tasks
  (tmp_path / "gsm8k").mkdir()
  rec = json.dumps({"question": "1+1?", "answer": "2\n#### 2"})
  (tmp_path / "gsm8k" / "test.jsonl").write_text(rec + "\n")
  (tmp_path / "gsm8k" / "train.jsonl").write_text("\n[1, 2,\n3]\n")  # not JSON lines
  with pytest.raises(ValueError, match=r"train\.jsonl: line 2 .*is not JSON"):
    tasks.get("gsm8k").read(tmp_path)
  (tmp_path / "gsm8k" / "train.jsonl").write_text("")
  with pytest.raises(ValueError, match=r"train\.jsonl: the file is empty"):
    tasks.get("gsm8k").read(tmp_path)
  # One bad line among good ones: dropped and counted, not fatal.
  (tmp_path / "gsm8k" / "train.jsonl").write_text(rec + "\n{oops\n" + rec + "\n")
  splits, drops = tasks.get("gsm8k").read(tmp_path)
  assert len(splits["train"]) == 2 and drops["bad_json"] == 1


def test_sharegpt_damage_mid_file_is_an_error_truncated_tail_is_not(tmp_path):
  from epi_jax.data import sharegpt
  text = json.dumps([{"id": str(i), "conversations": []} for i in range(50)])
  path = tmp_path / "s.json"
  path.write_text(text[:-25])  # truncated inside the last element
  assert len(list(sharegpt.iter_json_array(path, chunk_chars=64))) == 49
  i = text.index('"id": "20"')
  path.write_text(text[:i] + '"id" "20"' + text[i + 10:])
  with pytest.raises(ValueError, match=r"s\.json: invalid JSON in element 20"):
    list(sharegpt.iter_json_array(path, chunk_chars=64))


# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def tiny_model():
  from epi_jax.model import ByteTokenizer
  from epi_jax.model import setup as model_setup
  config = small_config()
  spec = model_setup.spec_for(model_setup.model_config(config.model))
  params = {k: jax.random.normal(jax.random.key(i), v.shape, v.dtype)
            for i, (k, v) in enumerate(sorted(spec.shapes.items()))}
  return spec.bind(params), ByteTokenizer()


def test_generation_never_samples_past_the_tokenizer(tiny_model):
  from epi_jax.model.generate import generate, generate_text
  model, tok = tiny_model
  assert model.config.vocab_size > tok.vocab_size  # 272 rows, 259 ids
  prompts = [tok.encode(f"prompt {i}") for i in range(4)]
  for temperature in (0.0, 50.0):  # greedy, and near-uniform sampling
    outs = generate(model, prompts, max_new_tokens=64, temperature=temperature,
                    vocab_size=tok.vocab_size)
    assert sum(map(len, outs)) > 0
    assert max(max(o, default=0) for o in outs) < tok.vocab_size
  text = generate_text(model, tok, "hi", max_new_tokens=32, temperature=50.0)
  assert isinstance(text, str)
  assert tok.decode([104, 268, 105]) == "h\ufffdi"  # reported in the text, no crash


def test_generation_context_capped_or_refused(tiny_model):
  from epi_jax.model.generate import generate
  model, tok = tiny_model
  context = model.config.max_position_embeddings
  with pytest.raises(ValueError, match="does not fit the model's context"):
    generate(model, [[65] * context], max_new_tokens=4)
  with pytest.warns(UserWarning, match=f"capped to 12"):
    out = generate(model, [[65] * (context - 12)], max_new_tokens=100,
                   vocab_size=tok.vocab_size)
  assert len(out[0]) <= 12


def test_generate_cli_refuses_bad_budget_before_loading(tmp_path, capsys):
  from epi_jax.model import cli as model_cli
  missing = str(tmp_path / "no_such_model")  # loading it would fail differently
  assert model_cli.generate_main(["--model", missing, "--prompt", "hi",
                                  "--max_new_tokens", "0"]) == 2
  assert "--max_new_tokens=0 must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_base_model_eval_with_default_settings(tmp_path):
  """What `epi-jax compare --config configs/tiny.py` does first: the base model's eval
  with the default settings (160 new tokens), here on 2 examples per task."""
  from configs_loader import load_config
  from epi_jax.experiments import compare as cmp
  config = cfg_lib.validate(load_config("tiny"))
  settings = cmp.eval_defaults()
  settings["num_examples"] = {t: 2 for t in settings["num_examples"]}
  model, tok = cmp.base_model(config)
  out = cmp.run_eval(model, tok, settings, cmp.eval_data(config, settings["tasks"]),
                     log=lambda m: None)
  assert set(out["results"]) == set(settings["tasks"])


# ----------------------------------------------------------------------------- kill -9


def _train_cmd(workdir, total):
  cmd = [sys.executable, "-m", "epi_jax.cli", "train", "--config", str(ROOT / "configs/tiny.py"),
         "--workdir", str(workdir), f"--config.total_steps={total}",
         "--config.checkpoint_every=3", "--config.log_every=1", "--config.keep_checkpoints=2",
         "--config.data.seq_len=128", "--config.data.mixture.logiqa=0.0",
         "--config.progress_bar=False", "--config.mesh.data=1"]
  return cmd, dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")


def _max_step(workdir) -> int:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  try:
    return max((r["step"] for r in read_jsonl(path)), default=0)
  except (OSError, ValueError):
    return 0  # being rewritten


@pytest.mark.slow
def test_kill_9_at_random_points_resumes_bit_identically(tmp_path):
  """SIGKILL at 6 points, each kind twice at random times: during start-up (first early,
  before any checkpoint exists; then later, when a restart is restoring one or compiling),
  while an async save is in flight, and a random fraction into a step; every resumed run
  continues exactly: the final losses, params and optimizer state equal those of an
  uninterrupted run."""
  import random
  import signal
  import time
  total, every, rng = 30, 3, random.Random(16)
  ref = tmp_path / "ref"
  cmd, env = _train_cmd(ref, total)
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  run, seen = tmp_path / "run", 0
  cmd, env = _train_cmd(run, total)
  for kind in ("early start-up", "save", "step", "late start-up", "save", "step"):
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    if kind.endswith("start-up"):  # importing; then compiling, restoring
      time.sleep(rng.uniform(0.5, 4.0) if kind.startswith("early") else rng.uniform(3.0, 8.0))
    else:
      # "save": just after the metrics of the next checkpoint step past the last kill
      # (they are written before its save starts); "step": past some progress.
      target = (seen // every + 1) * every if kind == "save" else seen + rng.randint(1, 3)
      while _max_step(run) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 0.1 if kind == "save" else 0.4))
    assert proc.poll() is None, f"the run ended before it was killed ({kind}): raise total"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = max(seen, _max_step(run))
  assert seen >= 2 * every  # checkpoints were written (and restored by the next start)
  assert not trainer.is_finished(run)
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert losses(run) == losses(ref) and len(losses(ref)) == total
  config = cfg_lib.validate(trainer.load_config(ref))
  states = [ckpt_lib.Checkpointer(w, 2).restore_latest(_target(config)) for w in (ref, run)]
  assert states[0][2] == states[1][2] == total
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(states[0][0]),
               jax.device_get(states[1][0]))


def test_data_prepare_cli_names_the_broken_file(tmp_path, capsys):
  from epi_jax.data import cli as data_cli
  (tmp_path / "raw" / "codealpaca").mkdir(parents=True)
  (tmp_path / "raw" / "codealpaca" / "code_alpaca_2k.json").write_text("")
  (tmp_path / "raw" / "codealpaca" / "new_codealpaca.json").write_text("[]")
  assert data_cli.main(["prepare", "--raw_dir", str(tmp_path / "raw"), "--data_dir",
                        str(tmp_path / "data"), "--tasks", "code_alpaca"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "code_alpaca_2k.json: the file is empty" in err, err
  assert not list((tmp_path / "data").rglob("*.array_record*"))  # no partial dataset
