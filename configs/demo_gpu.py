"""`make demo PRESET=gpu`: the comparison on one GPU in about an hour (an estimate).

SmolLM2-135M-Instruct in bf16 compute (fp32 master weights), 16 x 1024 tokens
per step, 400 steps per run; the full eval: 128 held-out examples per loss
task (GSM8K: its reference solutions), 300 LogiQA questions, GSM8K exact
match on 128 problems. `make demo PRESET=gpu` runs the sequential protocol
(gsm8k then chat and back) and the five-task comparison with 3 seeds.
"""

import pathlib
import runpy


def get_config():
  c = runpy.run_path(str(pathlib.Path(__file__).with_name("smollm2_multitask.py")))["get_config"]()
  c.total_steps = 400              # sequential protocol: 200 steps on A, then 200 on B
  c.log_every = 10
  c.checkpoint_every = 200
  c.snapshot_steps = (100, 300)    # compare adds the stage end (200)
  c.model.compute_dtype = "bfloat16"
  c.model.scan_layers = True       # compile time independent of depth
  c.data.stages = [
      {"mixture": {"gsm8k": 1.0, "code_alpaca": 1.0, "logiqa": 1.0}, "steps": 200},
      {"mixture": {"alpaca": 1.0, "chat": 1.0}, "steps": 200},
  ]
  c.data.batch_size = 16
  c.data.seq_len = 1024
  c.optimizer.learning_rate = 5e-5
  c.optimizer.warmup_steps = 20
  c.epi.isolation_ratio = 0.01     # CPI-FT's 1%
  c.epi.update_interval = 50
  c.epi.ema_decay = 0.99
  c.epi.track_importance = True

  c.eval.num_examples = {"gsm8k": 128, "code_alpaca": 128, "alpaca": 128, "chat": 128,
                         "logiqa": 300}
  c.eval.num_generate = 128
  c.eval.max_new_tokens = 256
  c.eval.seq_len = 1024
  c.eval.batch_size = 32
  c.eval.generate_batch_size = 64
  return c
