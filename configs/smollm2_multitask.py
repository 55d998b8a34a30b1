"""SmolLM2-135M-Instruct (pretrained) on the five tasks, sized for a 2-core CPU.

One step of 4 x 192 tokens takes ~10 s on such a CPU, so this is a short
run (20 steps); on an accelerator raise ``total_steps``, ``batch_size``
and ``seq_len`` from the command line, e.g.
``--config.total_steps=2000 --config.data.batch_size=64 --config.data.seq_len=1024``.
"""

from epi_jax.training.config import default_config


def get_config():
  c = default_config()
  c.method = "epi"
  c.seed = 0
  # A short multi-task run on a CPU (configs/demo.py shrinks it further for
  # `make demo`): 20 steps of 4 x 192 tokens.
  c.total_steps = 20
  c.log_every = 2
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  c.snapshot_steps = ()  # compare adds the stage ends (step 10) for forgetting

  c.model.name = "smollm2-135m-instruct"
  c.model.init = "pretrained"
  c.model.compute_dtype = "float32"

  # multi_stage: math, code and logic first, then instructions and chat.
  c.data.stages = [
      {"mixture": {"gsm8k": 1.0, "code_alpaca": 1.0, "logiqa": 1.0}, "steps": 10},
      {"mixture": {"alpaca": 1.0, "chat": 1.0}, "steps": 10},
  ]
  c.data.batch_size = 4
  c.data.seq_len = 192
  c.data.packing = True

  c.optimizer.learning_rate = 5e-5
  c.optimizer.warmup_steps = 2
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_norm = 1.0

  # p = 5% (the largest of the spec's starting points, so that isolation
  # matters within 20 steps); refresh every 5 steps: 4 refreshes per run.
  c.epi.isolation_ratio = 0.05
  c.epi.update_interval = 5
  c.epi.ema_decay = 0.9

  # Evaluation (epi_jax.scoring): small fixed subsets of each test split.
  c.eval.num_examples = {"gsm8k": 8, "logiqa": 16, "code_alpaca": 16, "alpaca": 16,
                         "chat": 16}
  c.eval.max_new_tokens = 128
  c.eval.batch_size = 8
  c.eval.seq_len = 256
  return c
