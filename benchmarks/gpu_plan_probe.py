"""Deviceless (no-GPU) ahead-of-time compilation for NVIDIA H100 with the PyPI
CUDA plugin (jax-cuda12-plugin / jax-cuda12-pjrt): a probe.

  CUDA_VISIBLE_DEVICES= python benchmarks/gpu_plan_probe.py matmul
  CUDA_VISIBLE_DEVICES= python benchmarks/gpu_plan_probe.py plan [--config.FIELD=VALUE ...]

`matmul` compiles a sharded matmul for 8 x H100 and prints memory_analysis(),
cost_analysis() and what kernels the compiled HLO holds. `plan` runs
epi_jax.training.plan.compile_plan on the 8 deviceless H100 devices
(PLAN_CONFIG: the config file, default configs/gpu_qwen2_7b.py; PLAN_UPDATE=0:
skip the update-alone compile; PLAN_CPU_COST=0: keep plan's own (empty)
cost analysis). Not part of `epi-jax plan` yet (issue 31, item 5: BENCHMARKS.md,
"Planning for GPUs without a GPU"); not run by the tests (it needs the CUDA
plugin, which the project's environment does not install).

Needs (PyPI, no GPU, no system CUDA): jax==0.10.2 jaxlib==0.10.2
jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 nvidia-cuda-nvcc-cu12 (ptxas)
nvidia-cuda-runtime-cu12 (silences the plugin's cudart_stub logging);
nvidia-cudnn-cu12 only for attention='cudnn' (unpacked data). Run with
JAX_PLATFORMS=cpu (or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1): otherwise the CUDA
plugin's version check (cuInit) fails, the plugin is not registered and
get_topology_desc raises "topology not implemented for cuda".
"""
import json
import os
import sys
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# H100 SXM 80GB: the fields of XLA's xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb
# (stream_executor.GpuTargetConfigProto) plus a cuDNN version (9.8, the
# plugin's minimum) for the cuDNN fusions.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GIB = 2 ** 30


def h100_devices(n=8, topology=None, target_config=H100_TARGET_CONFIG):
  from jax.experimental import topologies
  topology = topology or os.environ.get("GPU_TOPOLOGY", f"1x1x{n}")
  desc = topologies.get_topology_desc(platform="cuda", topology=topology,
                                      target_config=target_config)
  return list(desc.devices)


def mem_dict(mem):
  return {k: getattr(mem, k) / GIB for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
      "temp_size_in_bytes", "generated_code_size_in_bytes")}


def matmul():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = h100_devices()
  print("devices:", devices, "platform:", devices[0].platform,
        "kind:", getattr(devices[0], "device_kind", None))
  mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
  x = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16, sharding=NamedSharding(mesh, P("data", "model")))
  w = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16, sharding=NamedSharding(mesh, P("model", None)))

  def f(x, w):
    return jax.nn.relu(x @ w).sum(axis=0)

  t0 = time.perf_counter()
  lowered = jax.jit(f).lower(x, w)
  compiled = lowered.compile()
  print("compile_s", round(time.perf_counter() - t0, 2))
  print("memory_analysis (GiB):", json.dumps(mem_dict(compiled.memory_analysis())))
  try:
    cost = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except
    cost = f"raised {e!r}"
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if isinstance(cost, dict):
    cost = {k: v for k, v in cost.items() if k in ("flops", "bytes accessed", "transcendentals")}
  print("cost_analysis:", cost)
  from jax._src.lib import _jax
  module = compiled.runtime_executable().hlo_modules()[0]
  cpu_cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  print("HloCostAnalysis of the GPU-optimized module (CPU client):",
        {k: cpu_cost[k] for k in ("flops", "bytes accessed")},
        "expected flops/device:", 2 * 4096 * 2048 * 8192)
  print("type(compiled.runtime_executable()):", type(compiled.runtime_executable()))
  text = compiled.as_text()
  for marker in ("__cublas$gemm", "__cublas$lt$matmul", "custom-call", "kernel", "all-reduce", "reduce-scatter", "triton", "fusion"):
    print(f"  as_text has {marker!r}: {text.count(marker)}")


def plan(argv):
  from epi_jax.training import config as cfg_lib
  from epi_jax.training import plan as plan_lib
  cfg_path = os.environ.get("PLAN_CONFIG", "configs/gpu_qwen2_7b.py")
  config = cfg_lib.load_config_file(cfg_path)
  for arg in argv:
    field, value = arg.removeprefix("--").removeprefix("config.").split("=", 1)
    try:
      value = json.loads(value)
    except ValueError:
      pass
    cfg_lib.set_field(config, field, value)
  # The deviceless CUDA executable's cost_analysis() is UNIMPLEMENTED (jax returns
  # None; plan's _cost gives {}): run XLA's HloCostAnalysis on the optimized GPU
  # HLO module with the CPU client instead.
  original_cost = plan_lib._cost
  def cost(compiled):
    got = original_cost(compiled)
    if got:
      return got
    import jax
    from jax._src.lib import _jax
    module = compiled.runtime_executable().hlo_modules()[0]
    return dict(_jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module))
  if os.environ.get("PLAN_CPU_COST", "1") == "1":
    plan_lib._cost = cost
  # What the compiled step really runs for attention.
  seen = {}
  original_kernel = plan_lib.attention_kernel
  def kernel(hlo_text, implementation):
    seen["cudnn_fmha_custom_calls"] = hlo_text.count('custom_call_target="__cudnn$fmha')
    seen["hlo_chars"] = len(hlo_text)
    return original_kernel(hlo_text, implementation)
  plan_lib.attention_kernel = kernel
  devices = h100_devices()
  h100 = plan_lib.Chip("H100 SXM 80GB", 80, 989e12, 3.35e12)
  t0 = time.perf_counter()
  record = plan_lib.compile_plan(config, devices, chip=h100,
                                 update=os.environ.get("PLAN_UPDATE", "1") == "1")
  record["wall_s"] = round(time.perf_counter() - t0, 1)
  record["probe"] = seen
  print(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
  if sys.argv[1] == "matmul":
    matmul()
  else:
    plan(sys.argv[2:])
