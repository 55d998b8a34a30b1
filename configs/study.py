"""`make study`: the sequential protocol at a size that can tell EPI from static isolation.

configs/demo.py's model (SmolLM2-135M-Instruct, blocks scanned) and step (2 x
128 tokens), run longer: the pair PAIR, full / static / EPI, SEEDS seeds,
STEPS_PER_TASK steps on A then as many on B, EVAL_EXAMPLES held-out examples
per task (loss; no GSM8K generation), evaluated at the end of A and at the end.
EPI refreshes every UPDATE_INTERVAL steps from an importance EMA of decay
EMA_DECAY (a window of about 1 / (1 - 0.9) = 10 steps, 2,560 tokens); that is
12 refreshes per run, enough for the lock-in statistics
(epi_jax.method.lock_in). T and beta are chosen from
benchmarks/importance_noise.py at this model and step (docs/RESULTS.md, "Is
the importance signal or batch noise?", docs/study/importance_noise.json):
two disjoint one-row streams agree on 11% of one step's top-5% set (chance:
2.6%), on 20-27% after an EMA of beta = 0.9, and no more with beta = 0.97
within a task's first 20 steps, which would follow a change of task 3x more
slowly; with T = 10 each refresh's EMA is two-thirds new batches
(1 - 0.9^10 = 0.65). The demo's T = 2 refreshed from two batches. The first
seed's full SFT and EPI runs track the importance and save their top-p sets
(EPI's Jaccard against full SFT in the lock-in table). Checkpoints every
CHECKPOINT_EVERY steps: rerunning `make study` skips finished runs and their
evals and resumes an interrupted run from its last checkpoint.

Sized for about 2 hours of a 2-core CPU, from costs measured in docs/RESULTS.md
("make demo: sizes and cost"), at the demo's step and eval sizes:

- a train step: 4.3 s full SFT (measured 3.5-4.3 s), 6.5 s static and EPI
  (EPI windows with a refresh every other step: 5.2-7.9 s; here refreshes
  are 5x rarer, so this errs high);
- an eval: 0.44 s per example (a 2-task x 24-example snapshot: 20-22 s);
- per run, 15 s of loading and compiling (first step 10-15 s).

Training: 3 seeds x 120 steps x (4.3 + 6.5 + 6.5) s = 6228 s.
Evals: (1 base + 9 runs x 2 snapshots) x 2 tasks x 64 examples x 0.44 s = 1070 s.
Runs: 9 x 15 s = 135 s.
Total: 7433 s, about 124 min (tests/test_study.py recomputes it from the
constants below). The mixture protocol does not fit beside it.

The arithmetic holds for a pair of loss-scored tasks; a pair with LogiQA costs
more per eval example (4 options, up to 1024 tokens). PAIR is the one the
screen picks (`make study-screen`, benchmarks/forgetting_screen.py: full SFT's
drop on the first task of every ordered pair); the Makefile's STUDY_TASKS
must name the same pair (a test checks it).
"""

import pathlib
import runpy

# The pair that forgets most, per the screen (`make study-screen`, docs/study/screen.md:
# full SFT's drop on gsm8k after alpaca +2.06 [+1.25, +3.07], the largest of the 12
# ordered pairs of the loss-scored tasks). Keep STUDY_TASKS in the Makefile equal to it.
PAIR = ("gsm8k", "alpaca")
METHODS = ("full", "static", "epi")
SEEDS = 3
STEPS_PER_TASK = 60
BATCH_SIZE = 2
SEQ_LEN = 128
UPDATE_INTERVAL = 10
EMA_DECAY = 0.9
EVAL_EXAMPLES = 64
CHECKPOINT_EVERY = 20

# Measured costs (docs/RESULTS.md, "make demo: sizes and cost"), 2-core CPU.
STEP_SECONDS = {"full": 4.3, "static": 6.5, "epi": 6.5}
EVAL_SECONDS_PER_EXAMPLE = 0.44
RUN_OVERHEAD_SECONDS = 15.0
BUDGET_SECONDS = 2 * 3600


def estimated_seconds() -> dict[str, float]:
  """The docstring's arithmetic, from the constants above."""
  train = SEEDS * 2 * STEPS_PER_TASK * sum(STEP_SECONDS[m] for m in METHODS)
  runs = SEEDS * len(METHODS)
  evals = (1 + runs * 2) * len(PAIR) * EVAL_EXAMPLES * EVAL_SECONDS_PER_EXAMPLE
  overhead = runs * RUN_OVERHEAD_SECONDS
  return {"train": train, "eval": evals, "overhead": overhead,
          "total": train + evals + overhead}


def get_config():
  c = runpy.run_path(str(pathlib.Path(__file__).with_name("demo.py")))["get_config"]()
  c.total_steps = 2 * STEPS_PER_TASK   # the sequential protocol: half on A, half on B
  c.log_every = 10
  c.checkpoint_every = CHECKPOINT_EVERY  # resumable (the demo's runs are not)
  c.keep_checkpoints = 1
  c.data.batch_size = BATCH_SIZE
  c.data.seq_len = SEQ_LEN
  c.epi.update_interval = UPDATE_INTERVAL
  c.epi.ema_decay = EMA_DECAY
  c.epi.track_importance = True        # kept in the first seed's full SFT and EPI runs

  c.eval.tasks = list(PAIR)
  c.eval.num_examples = {t: EVAL_EXAMPLES for t in c.eval.num_examples}
  c.eval.num_generate = 0              # GSM8K exact match is ~0 at 135M: loss only
  c.eval.batch_size = 8                # 64 examples: eight full batches
  c.eval.snapshots = "all"
  return c
