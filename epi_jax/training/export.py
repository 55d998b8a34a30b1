"""``epi-jax export``: a run's snapshot as a Hugging Face checkpoint or a GGUF.

  epi-jax export --workdir RUN [--snapshot N] --format hf --out DIR [--dtype bfloat16]
  epi-jax export --workdir RUN [--snapshot N] --format gguf --out FILE.gguf [--dtype float32]

The snapshot's params (default: the final one) are written with the run's
tokenizer: a pretrained run's tokenizer files come from the checkpoint it
started from; a random-init run's byte-level stand-in is written as an
equivalent ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from epi_jax.utils.usage import ArgumentParser, fail

FORMATS = ("hf", "gguf")


def export_run(workdir, out, *, fmt: str = "hf", snapshot: int | None = None,
               dtype: str | None = None) -> list[str]:
  """Exports snapshot ``snapshot`` (None: the final one) of the run in ``workdir``.

  Returns the exporter's notes for the user.
  """
  from epi_jax.model import export  # pylint: disable=g-import-not-at-top
  from epi_jax.model.loading import resolve_model_path  # pylint: disable=g-import-not-at-top
  from epi_jax.training.trainer import load_run  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")
  model, tokenizer, config = load_run(workdir, snapshot=snapshot)
  source = (resolve_model_path(config.model.name) if config.model.init == "pretrained"
            else None)
  if fmt == "hf":
    return export.export_hf(model, out, tokenizer=tokenizer, source=source, dtype=dtype)
  return export.export_gguf(model, out, tokenizer=tokenizer, source=source,
                            dtype=dtype or "float16",
                            name=f"epi_jax {pathlib.Path(workdir).name}")


def export_main(argv=None) -> int:
  """Parses ``argv`` and exports; 0 on success, 2 on bad input."""
  from epi_jax.model.export import GGUF_DTYPES, HF_DTYPES  # pylint: disable=g-import-not-at-top
  parser = ArgumentParser(prog="epi-jax export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run directory")
  parser.add_argument("--snapshot", type=int, default=None,
                      help="step of the snapshot (default: the final one)")
  parser.add_argument("--format", choices=FORMATS, default="hf",
                      help="hf: a Hugging Face checkpoint directory; gguf: a llama.cpp file")
  parser.add_argument("--out", required=True, help="output directory (hf) or .gguf file")
  parser.add_argument("--dtype", default=None, choices=sorted(set(HF_DTYPES + GGUF_DTYPES)),
                      help="weight dtype (default: hf the params' dtype, gguf float16)")
  args = parser.parse_args(argv)
  if args.format == "gguf" and args.dtype not in (None, *GGUF_DTYPES):
    return fail("epi-jax export", f"--dtype {args.dtype} is not available for gguf "
                f"(choose from {', '.join(GGUF_DTYPES)})")
  try:
    notes = export_run(args.workdir, args.out, fmt=args.format, snapshot=args.snapshot,
                       dtype=args.dtype)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    return fail("epi-jax export", e)
  for note in notes:
    print(f"[epi_jax] note: {note}", file=sys.stderr)
  print(f"[epi_jax] exported {args.workdir} ({args.format}) to {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(export_main())
