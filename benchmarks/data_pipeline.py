"""Input pipeline throughput (batches/s) for a batch shape, with the SmolLM2 tokenizer.

  python benchmarks/data_pipeline.py --batch_size 4 --seq_len 192 --seconds 20

Prints batches/s over a timed window (tokenizing included: the pipeline
tokenizes on the fly), row fill and examples per batch.
"""

import argparse
import time

from epi_jax.data import TASKS, pipeline
from epi_jax.data.cli import load_stats_tokenizer
from epi_jax.data import default_data_dir, prepare


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=192)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--tokenizer", default="smollm2")
  args = parser.parse_args()
  tokenizer, desc = load_stats_tokenizer(args.tokenizer)
  data_dir = default_data_dir()
  prepare(data_dir=data_dir)  # idempotent
  it = pipeline.make_train_iterator(tokenizer, data_dir=data_dir,
                                    mixture={t: 1.0 for t in TASKS},
                                    batch_size=args.batch_size, seq_len=args.seq_len,
                                    packing=True, seed=0)
  n = fill = examples = 0
  start = time.perf_counter()
  while time.perf_counter() - start < args.seconds:
    batch = next(it)
    n += 1
    fill += float((batch["segment_ids"] > 0).mean())
    examples += int(((batch["positions"] == 0) & (batch["segment_ids"] > 0)).sum())
  elapsed = time.perf_counter() - start
  print(f"{desc}: {args.batch_size}x{args.seq_len} packed, {n / elapsed:.1f} batches/s, "
        f"row fill {fill / n:.3f}, {examples / n:.1f} examples/batch")


if __name__ == "__main__":
  main()
