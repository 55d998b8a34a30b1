"""Llama-3-8B multi-task SFT on a TPU slice (e.g. v5p-64): FSDP x tensor parallel.

Weights: a Hugging Face checkpoint directory (config.json + safetensors) given
as ``--config.model.name=/path/to/Meta-Llama-3-8B-Instruct``. bf16 compute,
fp32 master weights, remat. Multi-host: run the same command on every host
with ``--distributed`` (TPU pods are detected by jax.distributed).
"""

from epi_jax.training.config import default_config


def get_config():
  c = default_config()
  c.method = "epi"
  c.total_steps = 3000
  c.log_every = 10
  c.checkpoint_every = 250
  c.keep_checkpoints = 3
  c.snapshot_steps = (500, 1000, 1500, 2000, 2500)
  c.async_checkpointing = True

  c.model.name = "llama-3-8b"   # set to the checkpoint dir with init='pretrained'
  c.model.init = "random"
  c.model.compute_dtype = "bfloat16"
  c.model.remat = True
  c.model.scan_layers = True   # compile time independent of depth

  c.data.stages = [
      {"mixture": {"gsm8k": 1.0, "code_alpaca": 1.0}, "steps": 1000},
      {"mixture": {"logiqa": 1.0, "alpaca": 1.0}, "steps": 1000},
      {"mixture": {"chat": 1.0}, "steps": 1000},
  ]
  c.data.batch_size = 256
  c.data.seq_len = 2048

  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_accum_steps = 1

  # EPI at the defaults: p = 1%, T = 100, beta = 0.99 (epi_jax.training.config).

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 4
  return c
