"""`make demo` on a 2-core CPU: SmolLM2-135M-Instruct, both protocols, two seeds.

configs/smollm2_multitask.py with sizes for an idle 2-core CPU (docs/RESULTS.md,
"make demo: sizes and cost"): 8 steps of 2 x 128 tokens per run, the blocks
scanned (compile time), 24 held-out examples per loss task (GSM8K: its
reference solutions), no LogiQA eval (300 questions cost about 8 minutes per
model here), the mixture runs evaluated at the end only, and the importance
drift tracked in the first seed's full SFT and EPI runs only. These eval sets
are far below what resolves small differences (>= 128 per task, >= 300 LogiQA
questions): expect wide intervals; `make demo PRESET=gpu` (configs/demo_gpu.py)
runs those sizes.
"""

import pathlib
import runpy


def get_config():
  c = runpy.run_path(str(pathlib.Path(__file__).with_name("smollm2_multitask.py")))["get_config"]()
  c.total_steps = 8                # sequential protocol: 4 steps on A, then 4 on B
  c.log_every = 2
  c.checkpoint_every = 0           # comparison runs are short: snapshots only, no resume
  c.snapshot_steps = ()
  c.data.stages = [
      {"mixture": {"gsm8k": 1.0, "code_alpaca": 1.0, "logiqa": 1.0}, "steps": 4},
      {"mixture": {"alpaca": 1.0, "chat": 1.0}, "steps": 4},
  ]
  # Scanned blocks: compile + first step 10 s (full) and 14 s (EPI) instead of
  # 30 and 94 s, for a somewhat slower step (BENCHMARKS.md, "Side by side with
  # the PyTorch peer"): over the demo's 14 short runs the cheaper layout.
  c.model.scan_layers = True
  c.data.batch_size = 2
  c.data.seq_len = 128
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 1
  # Refresh every 2 steps (4 refreshes per run); importance tracked (full SFT
  # included) for the drift of the top-p set, in the first seed's runs.
  c.epi.update_interval = 2
  c.epi.track_importance = True

  c.eval.tasks = ["gsm8k", "code_alpaca", "alpaca", "chat"]
  c.eval.num_examples = {"gsm8k": 24, "code_alpaca": 24, "alpaca": 24, "chat": 24,
                         "logiqa": 300}
  c.eval.num_generate = 0          # GSM8K exact match is ~0 at 135M: loss only here
  c.eval.seq_len = 128
  c.eval.batch_size = 8           # 24 examples: three full batches, no padded rows
  # The sequential protocol always evaluates the end of A and the end; the
  # mixture comparison only the final snapshot (its forgetting is then undefined).
  c.eval.snapshots = "final"
  return c
