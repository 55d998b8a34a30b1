"""``epi-jax plan``: the train step compiled by the TPU compiler (libtpu) on this CPU host.

Compile-only (no TPU): configs/tiny.py at seq 128 on ``v5e-4``. libtpu comes
with the ``tpu`` extra that ``dev`` includes (``make test``); without it these
tests fail and say how to install it.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epi_jax.model import attention as attn_lib
from epi_jax import sharding
from epi_jax.training import plan
from epi_jax.training import config as cfg_lib
from epi_jax.training import step as step_lib
from epi_jax.training import trainer
from epi_jax.utils import platforms

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
SMALL = ["--config.data.seq_len=128", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]


@pytest.fixture(scope="module")
def v5e4():
  if not platforms.libtpu_available():
    pytest.fail("libtpu is not installed: pip install 'epi_jax[tpu]' (make test installs "
                "it through the dev extra)")
  topo = plan.topology("v5e-4")
  return topo, plan.topology_devices(topo)


def _tiny(**fields):
  config = cfg_lib.load_config_file(TINY)
  for key, value in {"data.seq_len": 128, "mesh.data": 1, "mesh.fsdp": -1, **fields}.items():
    cfg_lib.set_field(config, key, value)
  return config


def test_topology_names():
  assert plan.topology("v5e-4").compiler_name == "v5e:2x2"
  assert plan.topology("v5p-8").compiler_name == "v5p:2x2x1" and plan.topology("v5p-8").chips == 4
  assert plan.topology("v5e-256").chips == 256 and plan.topology("v5p-64").chips == 32
  assert plan.topology("v5e:2x2").chips == 4
  with pytest.raises(ValueError, match="v5e-4"):
    plan.topology("v9-3")


def test_gpu_topology_names():
  h100 = plan.topology("h100-8")
  assert (h100.platform, h100.compiler_name, h100.chips) == ("cuda", "1x1x8", 8)
  assert plan.topology("h100-16").compiler_name == "1x2x8"  # 8 GPUs per host
  assert plan.topology("h100-2").compiler_name == "1x1x2"
  with pytest.raises(ValueError, match="multiple of 8"):
    plan.topology("h100-12")


def test_plan_for_h100_without_a_gpu(tmp_path, capsys, monkeypatch):
  """XLA's GPU compiler (the CUDA plugin, from the gpu-plan extra that dev includes)
  compiles the step for 8 H100s on this CPU host: memory, and bytes from XLA's
  cost analysis run with the CPU client (the deviceless executable has none)."""
  topo = plan.topology("h100-8")
  assert plan.missing_compiler(topo) is None, "pip install 'epi_jax[gpu-plan]'"
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  out = tmp_path / "plan.json"
  assert plan.plan_main(["--config", TINY, "--topology", "h100-8", "--methods", "full,epi",
                         "--json", str(out), *SMALL]) == 0
  assert "| full |" in capsys.readouterr().out
  records = {r["method_name"]: r for r in json.loads(out.read_text())}
  for r in records.values():
    g = r["hbm_gib"]
    assert r["cuda_topology"] == "1x1x8" and r["chips"] == 8
    assert g["capacity"] == pytest.approx(0.9 * 84929347584 / 2 ** 30)
    assert r["fits"] and g["temp"] > 0
    assert r["bytes"]["compiled_arguments"] == sum(r["bytes"][k] for k in (
        "params", "optimizer", "epi", "batch", "padding"))
    assert r["compiler_flops"] > 0 and r["bytes_per_step"] > 0 and 0 < r["est_mfu"] <= 1
    assert sum(r["collectives"].values()) > 0
    assert r["attention_kernel"].startswith(("xla", "cudnn"))
  full, epi = records["full"], records["epi"]
  assert full["flops_per_step"] == epi["flops_per_step"]
  assert epi["hbm_gib"]["epi"] > 0 == full["hbm_gib"]["epi"]
  assert epi["bytes_per_plain_step"] < epi["bytes_per_refresh_step"]
  assert epi["bytes_per_plain_step"] - full["bytes_per_plain_step"] >= epi["bytes_epi_floor"] > 0


def test_plan_for_gpu_without_the_cuda_plugin_says_how_to_install(monkeypatch, capsys):
  for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13",
               "jax_plugins.xla_cuda12"):
    monkeypatch.setitem(sys.modules, name, None)  # its import fails
  assert not platforms.cuda_plugin_available()
  assert plan.plan_main(["--config", TINY, "--topology", "h100-8"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "pip install 'epi_jax[gpu-plan]'" in err


def test_hosts_as_on_real_slices(v5e4):
  """One host up to 8 v5e chips; 4 chips per host beyond, and on v5p (megacore)."""
  hosts = lambda name: {d.process_index for d in plan.topology_devices(plan.topology(name))}
  assert len(hosts("v5e-8")) == 1 and len(hosts("v5e-16")) == 4
  devices = plan.topology_devices(plan.topology("v5p-64"))
  assert len(devices) == 32 and len({d.process_index for d in devices}) == 8


def test_plan_full_and_epi_on_v5e_4(v5e4, tmp_path, capsys):
  out = tmp_path / "plan.json"
  assert plan.plan_main(["--config", TINY, "--topology", "v5e-4", "--methods", "full,epi",
                         "--json", str(out), *SMALL]) == 0
  table = capsys.readouterr().out
  assert "| full |" in table and "| epi |" in table
  records = {r["method_name"]: r for r in json.loads(out.read_text())}
  assert set(records) == {"full", "epi"}
  for name, r in records.items():
    for key in ("topology", "chips", "method", "hbm_gib", "fits", "flops_per_step",
                "bytes_per_step", "est_step_s", "est_mfu", "collectives", "epi_update",
                "epi_update_all_gathers", "attention_kernel", "compile_s"):
      assert key in r, (name, key)
    g = r["hbm_gib"]
    assert r["topology"] == "v5e-4" and r["chips"] == 4 and g["capacity"] == 16
    parts = g["params"] + g["optimizer"] + g["epi"] + g["batch"] + g["padding"] + g["temp"]
    assert abs(parts - g["total"]) < 1e-9 * max(1.0, g["total"]), name
    assert r["fits"] == (g["total"] <= g["capacity"])
    # The compiled step's arguments are the state and the batch in the TPU's tiled layouts.
    b = r["bytes"]
    assert b["compiled_arguments"] == (b["params"] + b["optimizer"] + b["epi"] + b["batch"]
                                       + b["padding"])
    assert b["total"] == b["compiled_arguments"] + b["temp"] and b["temp"] > 0
    assert set(r["collectives"]) == set(plan.COLLECTIVES)
    assert r["epi_update_all_gathers"] == r["epi_update"]["collectives"]["all-gather"]
    assert r["flops_per_step"] > 0 and r["bytes_per_step"] > 0
    assert 0 < r["est_mfu"] <= 1 and r["est_step_s"] > 0
    # tiny's attention is "auto": splash for a TPU mesh, as the Mosaic kernel.
    assert r["attention_kernel"] == "splash (Mosaic kernel)"
  assert records["full"]["hbm_gib"]["epi"] == 0 and records["epi"]["hbm_gib"]["epi"] > 0
  # Bytes: full SFT has no refresh; EPI's plain step leaves the refresh branch out, and
  # adds at least what it must read and write to full's; the run averages the two.
  full, epi = records["full"], records["epi"]
  assert (full["bytes_per_plain_step"] == full["bytes_per_refresh_step"]
          == full["bytes_per_step"] == full["bytes_both_branches"])
  assert full["refresh_share"] == 0 and full["bytes_epi_floor"] == 0
  assert epi["bytes_per_plain_step"] < epi["bytes_per_refresh_step"] <= epi["bytes_both_branches"]
  assert epi["bytes_per_plain_step"] - full["bytes_per_plain_step"] >= epi["bytes_epi_floor"] > 0
  tiny = cfg_lib.load_config_file(TINY)  # refreshes at T, 2T, ... of its total_steps
  assert epi["refresh_share"] == (tiny.total_steps // tiny.epi.update_interval) / tiny.total_steps
  assert epi["bytes_per_step"] == pytest.approx(
      epi["bytes_per_plain_step"] + epi["refresh_share"] * (
          epi["bytes_per_refresh_step"] - epi["bytes_per_plain_step"]))


def test_bytes_of_a_refresh_cond_count_the_branch_taken(v5e4):
  """XLA's cost analysis counts every branch of a cond (and a loop's body once); the
  plan counts the branch that a plain or a refreshing step takes: here a refresh
  branch of ten passes over x (each reads and writes it) against an identity."""
  from epi_jax.method.transforms import REFRESH_SCOPE  # pylint: disable=g-import-not-at-top
  _, devices = v5e4
  mesh = jax.sharding.Mesh(devices[:1], ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  n = 1 << 20
  passes = lambda x: jax.lax.fori_loop(0, 10, lambda i, a: a + jnp.sin(a) * i, x)

  def step(refresh, x, scope):
    with jax.named_scope(scope):
      return 2 * jax.lax.cond(refresh, passes, lambda a: a, x)

  picks = (plan.refresh_branch(REFRESH_SCOPE, False), plan.refresh_branch(REFRESH_SCOPE, True),
           None)
  args = (jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep),
          jax.ShapeDtypeStruct((n,), jnp.float32, sharding=rep))
  for scope in (REFRESH_SCOPE, "another_cond"):
    compiled = jax.jit(step, static_argnums=2).lower(*args, scope).compile()
    hlo, counted = compiled.as_text(), plan._cost(compiled)["bytes accessed"]
    plain, refresh, both = (counted + e for e in plan.loop_extra_bytes(hlo, picks)[0])
    if scope == REFRESH_SCOPE:
      assert refresh == both and refresh - plain == pytest.approx(10 * 8 * n, rel=0.05)
    else:  # not EPI's refresh: both branches, as XLA counts them
      assert plain == refresh == both


def test_flops_scanned_and_unscanned_agree(v5e4):
  topo, devices = v5e4
  unscanned, scanned = [
      plan.compile_plan(_tiny(**{"model.scan_layers": scan, "method": "full",
                                 "data.batch_size": 24}), devices, chip=topo.chip, update=False)
      for scan in (False, True)]
  assert scanned["loop_trip_counts"] == [2, 2]  # forward and backward scans over 2 layers
  assert abs(unscanned["flops_per_step"] - scanned["flops_per_step"]) <= (
      0.02 * unscanned["flops_per_step"])
  # Bytes: the loops' bodies counted once by XLA, the other iteration estimated from the
  # HLO (0.72 of the unscanned build measured here; XLA's count alone gave 0.49).
  ratio = scanned["bytes_per_step"] / unscanned["bytes_per_step"]
  assert 0.6 < ratio < 1.4, ratio


def _compiled_text(config, devices):
  config = cfg_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  ts = trainer.setup(config, mesh)
  step = step_lib.make_train_step(config, ts.spec, ts.method, mesh, ts.shardings)
  return step.lower(ts.target, plan.abstract_batch(config, mesh)).compile().as_text()


def test_splash_is_the_mosaic_kernel_for_tpu_and_interpreted_on_cpu(v5e4):
  _, devices = v5e4
  # fsdp 2 x tensor 2: the kernel under a shard_map over the batch and the heads.
  fields = {"model.attention": "splash", "method": "full", "mesh.fsdp": 2, "mesh.tensor": 2}
  assert "tpu_custom_call" in _compiled_text(_tiny(**fields), devices)
  assert "tpu_custom_call" not in _compiled_text(_tiny(**fields), jax.devices("cpu"))


def test_splash_under_a_cpu_mesh_equals_xla():
  """Interpret mode, one kernel per (batch, heads) shard: the same as unsharded xla."""
  mesh = jax.make_mesh((1, 2, 2), sharding.MESH_AXES, devices=jax.devices("cpu")[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  r = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(r[0], (4, 128, 4, 16))
  k, v = (jax.random.normal(x, (4, 128, 2, 16)) for x in r[1:])
  seg = jnp.asarray(np.repeat([[1] * 100 + [0] * 28], 4, axis=0), jnp.int32)

  def f(q, k, v, seg):
    with attn_lib.on_mesh(mesh):
      return attn_lib.attention(q, k, v, q_segment_ids=seg, implementation="splash")

  want = attn_lib.attention(q, k, v, q_segment_ids=seg, implementation="xla")
  got = jax.jit(f)(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(got)[:, :100], np.asarray(want)[:, :100], atol=2e-3)


def test_plan_without_libtpu_says_how_to_install(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu fails
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  assert not platforms.libtpu_available()
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert platforms.skip_absent_accelerators() is None  # import epi_jax changes nothing without it
  assert plan.plan_main(["--config", TINY, "--topology", "v5e-4"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "pip install 'epi_jax[tpu]'" in err


@pytest.mark.parametrize("hidden", ["", "libtpu"])
def test_import_epi_jax_with_the_compilers_installed_is_silent(hidden):
  """No TPU and no GPU here: with JAX_PLATFORMS unset, JAX starts without libtpu's
  errors and without the CUDA plugin's, with both installed and with only the
  CUDA plugin (libtpu hidden)."""
  assert platforms.libtpu_available() and platforms.cuda_plugin_available()
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_LIBRARY_PATH")}
  hide = f"import sys; sys.modules[{hidden!r}] = None; " if hidden else ""
  proc = subprocess.run(
      [sys.executable, "-c",
       hide + "import epi_jax, jax; jax.devices(); print(jax.default_backend())"],
      env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == "", proc.stderr
  assert proc.stdout.strip() in ("cpu", "gpu")


def test_attention_kernel_says_what_the_program_runs():
  # cuDNN cannot mask packed rows: attention falls back to XLA, and the plan says so.
  fused = 'custom-call(...), custom_call_target="__cudnn$fmhaSoftmax"'
  assert plan.attention_kernel(fused, "cudnn").startswith("cudnn")
  assert plan.attention_kernel("fusion(...)", "cudnn").startswith("xla")
  assert plan.attention_kernel("tpu_custom_call", "splash") == "splash (Mosaic kernel)"


def test_plan_for_gpu_with_cudnn_attention(capsys):
  """Unpacked rows on a GPU run cuDNN's fused attention: compiling it needs cuDNN,
  which the gpu-plan extra leaves out (1.1 GB): the plan says so in one line, or,
  where cuDNN is installed, runs the fused kernel."""
  code = plan.plan_main(["--config", TINY, "--topology", "h100-8", "--methods", "full",
                         *SMALL, "--config.data.packing=False", "--config.model.attention=cudnn"])
  out, err = capsys.readouterr()
  if platforms._importable("nvidia.cudnn"):  # pylint: disable=protected-access
    assert code == 0 and "cudnn (fused kernel)" in out
  else:
    assert code == 2 and "pip install 'nvidia-cudnn-cu12" in err.strip().splitlines()[-1]
