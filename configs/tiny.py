"""A tiny random-init Llama (ByteTokenizer) on the five-task mixture: seconds per run.

Used by the tests. Byte-level tokens make the prompts long (LogiQA's passages
run to ~1000 bytes), hence seq_len 512; the few LogiQA examples whose answer
falls in the window are kept, the rest are dropped and counted by the data
pipeline. Where the raw data is missing a built-in stand-in is used.

  epi-jax train --config configs/tiny.py --workdir /tmp/tiny --config.method=full
"""

from epi_jax.training.config import default_config


def get_config():
  c = default_config()
  c.method = "epi"
  c.seed = 0
  c.total_steps = 24
  c.log_every = 4
  c.checkpoint_every = 8
  c.keep_checkpoints = 2
  c.snapshot_steps = (12,)

  c.model.name = "tiny"
  c.model.init = "random"

  c.data.stages = [
      {"mixture": {"gsm8k": 1.0, "code_alpaca": 1.0}, "steps": 8},
      {"mixture": {"logiqa": 1.0, "alpaca": 1.0}, "steps": 8},
      {"mixture": {"chat": 1.0, "gsm8k": 0.5, "alpaca": 0.5}, "steps": 8},
  ]
  c.data.batch_size = 8
  c.data.seq_len = 512
  c.data.allow_standin = True

  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 4
  c.optimizer.weight_decay = 0.01

  c.epi.isolation_ratio = 0.05
  c.epi.update_interval = 5
  c.epi.ema_decay = 0.9
  return c
