"""Qwen2-7B multi-task SFT on one 8-GPU node: FSDP over 8 GPUs, grad accumulation.

Weights: ``--config.model.name=/path/to/Qwen2-7B-Instruct --config.model.init=pretrained``
(a Hugging Face checkpoint directory). bf16 compute with fp32 master weights
and remat.
"""

from epi_jax.training.config import default_config


def get_config():
  c = default_config()
  c.method = "epi"
  c.total_steps = 2000
  c.log_every = 10
  c.checkpoint_every = 200
  c.keep_checkpoints = 2
  c.snapshot_steps = (500, 1000, 1500)

  c.model.name = "qwen2-7b"
  c.model.init = "random"
  c.model.compute_dtype = "bfloat16"
  c.model.remat = True
  c.model.scan_layers = True   # compile time independent of depth

  c.data.stages = [
      {"mixture": {"gsm8k": 1.0, "code_alpaca": 1.0}, "steps": 700},
      {"mixture": {"logiqa": 1.0, "alpaca": 1.0}, "steps": 700},
      {"mixture": {"chat": 1.0}, "steps": 600},
  ]
  c.data.batch_size = 64
  c.data.seq_len = 2048

  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 50
  c.optimizer.grad_accum_steps = 4

  # EPI at the defaults: p = 1%, T = 100, beta = 0.99 (epi_jax.training.config).

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
