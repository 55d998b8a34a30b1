"""``epi-jax generate``: chat with a pretrained model from the command line."""

from __future__ import annotations

import argparse
import sys
import time


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  parser = parser or argparse.ArgumentParser(
      prog="epi-jax generate", description="Generate an assistant reply.")
  parser.add_argument("--model", default="smollm2-135m-instruct",
                      help="'smollm2-135m-instruct' (fetched once into the cache), "
                           "a Hugging Face Hub id org/name[@revision], a .gguf file or a "
                           "Hugging Face checkpoint directory")
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


def generate_main(argv=None) -> int:
  """Parses ``argv``, loads the model and prints the reply.

  Returns 0, or 2 for bad flags or a request past the model's context.
  """
  args = build_parser().parse_args(argv)
  bad = _check_args(args)
  if bad:
    print(f"epi-jax generate: {bad}", file=sys.stderr)
    return 2
  import jax
  import jax.numpy as jnp
  from epi_jax.model.generate import generate_text
  from epi_jax.model.loading import load_pretrained

  start = time.perf_counter()
  try:
    model, tokenizer, _ = load_pretrained(args.model, param_dtype=getattr(jnp, args.dtype))
  except (FileNotFoundError, ValueError) as e:
    print(f"epi-jax generate: {e}", file=sys.stderr)
    return 2
  print(f"[epi_jax] model loaded in {time.perf_counter() - start:.1f}s",
        file=sys.stderr)
  messages = [{"role": "user", "content": args.prompt}]
  if args.system is not None:
    messages.insert(0, {"role": "system", "content": args.system})
  prompt_len = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)[0])
  context = model.config.max_position_embeddings
  if prompt_len + args.max_new_tokens > context:
    print(f"epi-jax generate: the prompt takes {prompt_len} tokens and --max_new_tokens="
          f"{args.max_new_tokens} more, past the model's context of {context} tokens; "
          f"ask for at most {max(context - prompt_len, 0)} new tokens", file=sys.stderr)
    return 2
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
