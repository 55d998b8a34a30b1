"""SmolLM2-135M-Instruct (pretrained) on the five tasks, sized for a 2-core CPU.

One step of 4 x 192 tokens takes several seconds on such a CPU, so this is a
short run (40 steps); on an accelerator raise ``total_steps``, ``batch_size``
and ``seq_len`` from the command line, e.g.
``--config.total_steps=2000 --config.data.batch_size=64 --config.data.seq_len=1024``.
"""

from epi_jax.training.config import default_config


def get_config():
  c = default_config()
  c.method = "epi"
  c.seed = 0
  c.total_steps = 40
  c.log_every = 2
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  c.snapshot_steps = (10, 20, 30)

  c.model.name = "smollm2-135m-instruct"
  c.model.init = "pretrained"
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"

  c.data.mixture = {"gsm8k": 1.0, "code_alpaca": 1.0, "logiqa": 1.0, "alpaca": 1.0,
                    "chat": 1.0}
  # multi_stage: math/code first, then reasoning/instructions, then chat.
  c.data.stages = [
      {"mixture": {"gsm8k": 1.0, "code_alpaca": 1.0}, "steps": 14},
      {"mixture": {"logiqa": 1.0, "alpaca": 1.0}, "steps": 13},
      {"mixture": {"chat": 1.0}, "steps": 13},
  ]
  c.data.batch_size = 4
  c.data.seq_len = 192
  c.data.packing = True

  c.optimizer.learning_rate = 2e-5
  c.optimizer.warmup_steps = 4
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0

  c.epi.isolation_ratio = 0.01
  c.epi.update_interval = 10
  c.epi.ema_decay = 0.9
  return c
