"""Tokenizers with a ChatML chat template and an assistant-token mask.

* :class:`ChatTokenizer` wraps a Hugging Face ``tokenizers.Tokenizer``,
  rebuilt from GGUF metadata (byte-level BPE; SmolLM2 splits digits one by
  one) or loaded from a checkpoint's ``tokenizer.json``.
* :class:`ByteTokenizer` is a dependency-free stand-in (256 bytes + 3 special
  tokens) for tests and the ``tiny`` config.

Both render conversations in ChatML::

  <|im_start|>system\\n{content}<|im_end|>\\n
  <|im_start|>user\\n{content}<|im_end|>\\n
  <|im_start|>assistant\\n{content}<|im_end|>\\n

and :meth:`apply_chat_template` returns ``(ids, assistant_mask)`` where the
mask is True exactly on the assistant content tokens and the ``<|im_end|>``
closing each assistant turn (what the SFT loss trains the model to emit).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Sequence

from epi_jax.model.gguf_cache import gguf_reader

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
_ROLES = ("system", "user", "assistant")
# What an id outside the vocabulary decodes to (as invalid UTF-8 bytes do).
REPLACEMENT = "\ufffd"


# The system turn a ChatML template inserts; its newline is either a character or, inside a
# Jinja string literal, the two characters backslash-n (then the text is unescaped).
_TEMPLATE_SYSTEM = re.compile(r"<\|im_start\|>system(\n|\\n)(.*?)<\|im_end\|>", re.S)
_JINJA_ESCAPES = re.compile(r"\\(.)")


def template_system_prompt(template: str) -> str | None:
  """The default system prompt of a ChatML chat template (None when it has none)."""
  m = _TEMPLATE_SYSTEM.search(template)
  if not m:
    return None
  if m.group(1) == "\n":
    return m.group(2)
  return _JINJA_ESCAPES.sub(lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), e.group(1)),
                            m.group(2))


class _ChatML:
  """ChatML rendering shared by the tokenizers (needs ``encode``/``token_id``)."""

  default_system_prompt: str | None = None

  def _check_messages(self, messages):
    if not isinstance(messages, (list, tuple)) or not messages:
      raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
      if m["role"] not in _ROLES:
        raise ValueError(f"messages[{i}]['role']={m['role']!r}; expected one of {_ROLES}")
      if not isinstance(m["content"], str):
        raise ValueError(f"messages[{i}]['content'] must be a str, got "
                         f"{type(m['content']).__name__}")

  def _with_system(self, messages):
    if messages[0]["role"] != "system" and self.default_system_prompt:
      return [{"role": "system", "content": self.default_system_prompt}, *messages]
    return list(messages)

  def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
    """The ChatML text of ``messages`` (what the token ids decode to)."""
    self._check_messages(messages)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
                   for m in self._with_system(messages))
    if add_generation_prompt:
      text += f"{IM_START}assistant\n"
    return text

  def chat_template(self) -> str:
    """:meth:`render_chat` as a Jinja chat template (Hugging Face / llama.cpp
    convention), for exported checkpoints."""
    head = ""
    if self.default_system_prompt:
      system = json.dumps(f"{IM_START}system\n{self.default_system_prompt}{IM_END}\n",
                          ensure_ascii=False)
      head = ("{%- if messages[0]['role'] != 'system' %}{{ " + system + " }}{%- endif %}")
    return (head + "{%- for message in messages %}{{ '" + IM_START + "' + message['role'] + "
            "'\\n' + message['content'] + '" + IM_END + "\\n' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{ '" + IM_START + "assistant\\n' }}{%- endif %}")

  def apply_chat_template(self, messages, add_generation_prompt: bool = False
                          ) -> tuple[list[int], list[bool]]:
    """Tokenizes a conversation.

    Args:
      messages: list of ``{'role': 'system'|'user'|'assistant', 'content': str}``.
        When the first message is not a system message and the tokenizer has
        a default system prompt (SmolLM2's template does), it is prepended.
      add_generation_prompt: append ``<|im_start|>assistant\\n`` so that the
        model continues with an assistant turn.

    Returns:
      ``(ids, assistant_mask)`` of equal length; the mask is True on the
      assistant content tokens and on each assistant turn's ``<|im_end|>``.
    """
    self._check_messages(messages)
    start, end = self.token_id(IM_START), self.token_id(IM_END)
    newline = self.encode("\n")
    ids: list[int] = []
    mask: list[bool] = []

    def add(tokens, flag):
      ids.extend(tokens)
      mask.extend([flag] * len(tokens))

    for m in self._with_system(messages):
      is_assistant = m["role"] == "assistant"
      add([start] + self.encode(m["role"] + "\n"), False)
      add(self.encode(m["content"]) if m["content"] else [], is_assistant)
      add([end], is_assistant)
      add(newline, False)
    if add_generation_prompt:
      add([start] + self.encode("assistant\n"), False)
    return ids, mask


class ChatTokenizer(_ChatML):
  """A ``tokenizers.Tokenizer`` plus special-token ids and the ChatML template.

  Attributes:
    eos_id: id that ends an assistant turn (``<|im_end|>`` for ChatML models).
    pad_id: padding id.
    stop_ids: ids at which generation stops.
    vocab_size: size of the tokenizer's vocabulary.
    default_system_prompt: system prompt the chat template inserts when the
      conversation has none (``None``: no insertion).
  """

  def __init__(self, tokenizer, *, eos_id: int | None = None,
               pad_id: int | None = None, stop_ids: Sequence[int] = (),
               default_system_prompt: str | None = None):
    self._tok = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    im_end = tokenizer.token_to_id(IM_END)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    if eos_id is None:
      eos_id = im_end if im_end is not None else eot
    if eos_id is None:
      raise ValueError(f"Tokenizer has neither {IM_END} nor {END_OF_TEXT}; pass eos_id")
    self.eos_id = int(eos_id)
    self.pad_id = int(pad_id if pad_id is not None else (eot if eot is not None else eos_id))
    stops = {self.eos_id, *map(int, stop_ids)}
    stops.update(i for i in (im_end, eot) if i is not None)
    self.stop_ids = tuple(sorted(stops))
    self.default_system_prompt = default_system_prompt

  # -- constructors ----------------------------------------------------------

  @classmethod
  def from_gguf(cls, path) -> "ChatTokenizer":
    """Rebuilds the tokenizer stored in a GGUF file's metadata."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"GGUF file not found: {path}")
    return cls.from_gguf_reader(gguf_reader(path))

  @classmethod
  def from_gguf_reader(cls, reader) -> "ChatTokenizer":
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    def field(key, default=None):
      f = reader.fields.get(key)
      return default if f is None else f.contents()

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(f"GGUF tokenizer.ggml.model={kind!r}: only byte-level BPE "
                       "('gpt2') is supported")
    tokens = field("tokenizer.ggml.tokens")
    merges = field("tokenizer.ggml.merges", [])  # absent: a byte-only vocabulary
    types = field("tokenizer.ggml.token_type")
    if tokens is None:
      raise ValueError("GGUF lacks tokenizer.ggml.tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
      bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                       fuse_unk=False)
    except Exception as e:  # tokenizers raises a bare Exception
      raise ValueError(f"GGUF tokenizer.ggml.merges/tokens are inconsistent: {e}") from e
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = field("tokenizer.ggml.pre", "default")
    if pre in ("smollm", "starcoder", "qwen2", "llama3", "llama-bpe", "deepseek-coder"):
      # These split numbers into single digits (qwen2/llama3: up to 3 digits,
      # approximated here by single digits only for smollm/starcoder).
      if pre in ("smollm", "starcoder"):
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
      else:
        tok.pre_tokenizer = byte_level
    else:
      tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = CONTROL, 4 = USER_DEFINED (gguf.TokenType).
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types or []) if int(t) in (3, 4)]
    tok.add_special_tokens(special)
    system = template_system_prompt(field("tokenizer.chat_template", "") or "")
    eos = field("tokenizer.ggml.eos_token_id")
    pad = field("tokenizer.ggml.padding_token_id")
    return cls(tok, eos_id=None if eos is None else int(eos),
               pad_id=None if pad is None else int(pad),
               default_system_prompt=system)

  @classmethod
  def from_file(cls, tokenizer_json_path, *, config_dir=None) -> "ChatTokenizer":
    """Loads a ``tokenizer.json``; reads ``tokenizer_config.json`` beside it
    (or in ``config_dir``) for the eos/pad tokens and default system prompt."""
    from tokenizers import Tokenizer
    path = pathlib.Path(tokenizer_json_path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    tok = Tokenizer.from_file(str(path))
    cfg_path = pathlib.Path(config_dir or path.parent) / "tokenizer_config.json"
    eos = pad = system = None
    if cfg_path.is_file():
      cfg = json.loads(cfg_path.read_text())
      name = lambda v: v.get("content") if isinstance(v, dict) else v
      if cfg.get("eos_token"):
        eos = tok.token_to_id(name(cfg["eos_token"]))
      if cfg.get("pad_token"):
        pad = tok.token_to_id(name(cfg["pad_token"]))
      system = template_system_prompt(cfg.get("chat_template") or "")
    return cls(tok, eos_id=eos, pad_id=pad, default_system_prompt=system)

  # -- interface -------------------------------------------------------------

  @property
  def backend(self):
    """The wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (special-token strings become their ids)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """The text of ``ids``; an id outside the vocabulary becomes U+FFFD."""
    ids = [int(i) for i in ids]
    if all(0 <= i < self.vocab_size for i in ids):
      return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
    out, run = [], []
    for i in ids + [-1]:
      if 0 <= i < self.vocab_size:
        run.append(i)
        continue
      out.append(self._tok.decode(run, skip_special_tokens=skip_special_tokens))
      run = []
      out.append(REPLACEMENT)
    return "".join(out[:-1])

  def token_id(self, token: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"Token {token!r} is not in the vocabulary (the ChatML "
                       "template needs <|im_start|> and <|im_end|>)")
    return i


class ByteTokenizer(_ChatML):
  """UTF-8 bytes (ids 0-255) plus ``<|endoftext|>`` (256), ``<|im_start|>``
  (257) and ``<|im_end|>`` (258). Same interface as :class:`ChatTokenizer`."""

  SPECIALS = (END_OF_TEXT, IM_START, IM_END)
  _SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

  def __init__(self, default_system_prompt: str | None = None):
    self.vocab_size = 256 + len(self.SPECIALS)
    self.pad_id = 256
    self.eos_id = 258
    self.stop_ids = (256, 258)
    self.default_system_prompt = default_system_prompt

  @property
  def backend(self):
    """An equivalent ``tokenizers.Tokenizer`` (same ids): byte-level BPE with the
    256 bytes as its vocabulary, no merges, and the 3 special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in self.SPECIALS])
    return tok

  def token_id(self, token: str) -> int:
    if token not in self.SPECIALS:
      raise ValueError(f"Token {token!r} is not a ByteTokenizer special token")
    return 256 + self.SPECIALS.index(token)

  def encode(self, text: str) -> list[int]:
    ids: list[int] = []
    for part in self._SPLIT.split(text):
      if part in self.SPECIALS:
        ids.append(self.token_id(part))
      elif part:
        ids.extend(part.encode("utf-8"))
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """The text of ``ids``; an id outside the vocabulary becomes U+FFFD."""
    out, buf = [], bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        buf.append(i)
        continue
      out.append(buf.decode("utf-8", errors="replace"))
      buf = bytearray()
      if 256 <= i < self.vocab_size and not skip_special_tokens:
        out.append(self.SPECIALS[i - 256])
      elif not (256 <= i < self.vocab_size):
        out.append(REPLACEMENT)  # not an id of this tokenizer
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (what byte-level BPE vocabularies use)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table
