"""``epi-jax generate``: chat with a pretrained model from the command line."""

from __future__ import annotations

import argparse
import sys
import time

from epi_jax.utils.usage import ArgumentParser, fail


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  parser = parser or ArgumentParser(
      prog="epi-jax generate", description="Generate an assistant reply.")
  parser.add_argument("--model", default="smollm2-135m-instruct",
                      help="'smollm2-135m-instruct' (fetched once into the cache), "
                           "a Hugging Face Hub id org/name[@revision], a .gguf file, a "
                           "Hugging Face checkpoint directory, or a training run directory "
                           "(its latest snapshot, in the run's dtype)")
  parser.add_argument("--prompt", required=True, help="user message")
  parser.add_argument("--system", default=None,
                      help="system prompt (default: the model's own, if any)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0 = greedy decoding")
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="parameter and compute dtype")
  return parser


def _check_args(args) -> str | None:
  """What is wrong with the sampling flags (checked before the model loads), or None."""
  if args.max_new_tokens < 1:
    return f"--max_new_tokens={args.max_new_tokens} must be >= 1"
  if not (args.temperature >= 0 and args.temperature != float("inf")):
    return f"--temperature={args.temperature} must be a finite number >= 0"
  if not 0 < args.top_p <= 1:
    return f"--top_p={args.top_p} must be in (0, 1]"
  return None


def load_model(spec: str, param_dtype):
  """``(model, tokenizer)`` of ``--model``: a training run directory's latest snapshot, or
  whatever :func:`epi_jax.model.load_pretrained` takes."""
  from epi_jax.training import workdir  # pylint: disable=g-import-not-at-top
  if workdir.is_run_dir(spec):
    from epi_jax.training import load_run  # pylint: disable=g-import-not-at-top
    model, tokenizer, _ = load_run(spec)
    return model, tokenizer
  from epi_jax.model.loading import load_pretrained  # pylint: disable=g-import-not-at-top
  model, tokenizer, _ = load_pretrained(spec, param_dtype=param_dtype)
  return model, tokenizer


def generate_main(argv=None) -> int:
  """Parses ``argv``, loads the model and prints the reply.

  Returns 0, or 2 for bad flags or a request past the model's context.
  """
  prog = "epi-jax generate"
  args = build_parser().parse_args(argv)
  bad = _check_args(args)
  if bad:
    return fail(prog, bad)
  import jax
  import jax.numpy as jnp
  from epi_jax.model.generate import generate_text

  start = time.perf_counter()
  try:
    model, tokenizer = load_model(args.model, getattr(jnp, args.dtype))
  except (FileNotFoundError, ValueError) as e:
    return fail(prog, e)
  print(f"[epi_jax] model loaded in {time.perf_counter() - start:.1f}s",
        file=sys.stderr)
  messages = [{"role": "user", "content": args.prompt}]
  if args.system is not None:
    messages.insert(0, {"role": "system", "content": args.system})
  prompt_len = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)[0])
  context = model.config.max_position_embeddings
  if prompt_len >= context:
    return fail(prog, f"--prompt takes {prompt_len} tokens (with the chat template"
                f"{' and --system' if args.system is not None else ''}), not less than the "
                f"model's context of {context} tokens: shorten it")
  if prompt_len + args.max_new_tokens > context:
    return fail(prog, f"the prompt takes {prompt_len} tokens and --max_new_tokens="
                f"{args.max_new_tokens} more, past the model's context of {context} tokens; "
                f"ask for at most {context - prompt_len} new tokens")
  start = time.perf_counter()
  reply = generate_text(model, tokenizer, messages,
                        max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p,
                        rng=jax.random.key(args.seed))
  print(f"[epi_jax] generated in {time.perf_counter() - start:.1f}s",
        file=sys.stderr)
  print(reply)
  return 0


if __name__ == "__main__":
  sys.exit(generate_main())
