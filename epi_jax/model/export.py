"""Exporting a :class:`~epi_jax.model.llama.Llama` for other tools.

* :func:`export_hf`: a Hugging Face checkpoint directory (``config.json``,
  ``model.safetensors`` or shards with ``model.safetensors.index.json``,
  tokenizer files, ``generation_config.json``) that
  ``transformers.AutoModelForCausalLM.from_pretrained`` (and vLLM,
  lm-evaluation-harness) load. Architecture ``llama``, or ``qwen2`` when the
  model has q/k/v biases.
* :func:`export_gguf`: a llama.cpp GGUF (f16 or f32 weights, norms and
  biases in f32, llama.cpp's Q/K row order for ``llama``), with the tokenizer
  in its metadata.

Tensor names and layouts come from :mod:`epi_jax.model.tensor_names` (the
rules the loaders use). Tensors are read off the device one at a time, so the
host holds at most one safetensors shard (HF) or one tensor (GGUF). Both
write into a temporary sibling and rename it into place when complete:
nothing partial is left under the output name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from epi_jax.model import tensor_names as names
from epi_jax.model.config import ModelConfig, _rope_type
from epi_jax.model.loading import TOKENIZER_FILES, param_slots
from epi_jax.model.tokenizer import ByteTokenizer

HF_DTYPES = ("float32", "bfloat16", "float16")
GGUF_DTYPES = ("float16", "float32")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


@dataclasses.dataclass(frozen=True)
class ModuleTensor:
  """One tensor of the module: its slot, shape (module layout) and a fetch."""
  slot: str
  shape: tuple[int, ...]
  fetch: Callable[[], np.ndarray]


def module_tensors(model) -> Iterator[ModuleTensor]:
  """The module's tensors, one per slot and layer, fetched lazily to the host.

  The one place the exporters read the module: a stacked (scanned) layer
  layout yields its per-layer slices here.
  """
  for slot, var in param_slots(model).items():
    value = var.get_value()
    yield ModuleTensor(slot, tuple(value.shape),
                       lambda v=value: np.asarray(jax.device_get(v)))


def _dtype_name(dtype) -> str:
  name = np.dtype(dtype).name
  if name not in HF_DTYPES:
    raise ValueError(f"Cannot export parameters of dtype {name}")
  return name


def model_type(config: ModelConfig) -> str:
  """``'qwen2'`` for q/k/v biases (Qwen2's layout), else ``'llama'``."""
  return "qwen2" if config.attention_bias else "llama"


def hf_config_dict(config: ModelConfig, *, dtype: str = "float32",
                   eos_token_id=None, pad_token_id=None) -> dict:
  """The ``config.json`` of ``config``; :func:`~epi_jax.model.loading.hf_config`
  reads it back to an equal :class:`ModelConfig` (up to the dtypes)."""
  kind = model_type(config)
  d = {
      "architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"],
      "model_type": kind, "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
      "hidden_act": "silu", "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
      "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
      "tie_word_embeddings": config.tie_embeddings, "torch_dtype": dtype,
      "attention_dropout": 0.0, "use_cache": True,
  }
  if kind == "qwen2":
    d.update(use_sliding_window=False, sliding_window=None)
  else:
    d.update(attention_bias=False, mlp_bias=False)
  if eos_token_id is not None:
    d["eos_token_id"] = int(eos_token_id)
  if pad_token_id is not None:
    d["pad_token_id"] = int(pad_token_id)
  return d


# ----------------------------------------------------------------------------
# Writing into place
# ----------------------------------------------------------------------------


def _check_out(out: pathlib.Path) -> None:
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"Export destination {out} already exists; remove it or "
                          "choose another --out")


def _staging(out: pathlib.Path) -> pathlib.Path:
  out.parent.mkdir(parents=True, exist_ok=True)
  return pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _publish(staged: pathlib.Path, out: pathlib.Path) -> None:
  if out.is_dir():
    out.rmdir()  # empty (checked before writing)
  os.replace(staged, out)


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def _tokenizer_config(tokenizer, config: ModelConfig) -> dict:
  token = tokenizer.backend.id_to_token
  return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": token(tokenizer.eos_id),
          "pad_token": token(tokenizer.pad_id), "chat_template": tokenizer.chat_template(),
          "model_max_length": config.max_position_embeddings, "add_bos_token": False,
          "clean_up_tokenization_spaces": False}


def _write_tokenizer(out: pathlib.Path, tokenizer, config: ModelConfig, source) -> list[str]:
  """Tokenizer files into ``out``; returns notes for the user."""
  if tokenizer is None:
    return ["no tokenizer given: the export has no tokenizer files"]
  notes = []
  if source is not None and pathlib.Path(source).is_dir():
    copied = [f for f in TOKENIZER_FILES if (pathlib.Path(source) / f).is_file()]
    for f in copied:
      shutil.copyfile(pathlib.Path(source) / f, out / f)
    if "tokenizer.json" in copied:
      return notes
  tokenizer.backend.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(
      json.dumps(_tokenizer_config(tokenizer, config), indent=2))
  if isinstance(tokenizer, ByteTokenizer):
    notes.append("the run uses the byte-level stand-in tokenizer (no pretrained tokenizer): "
                 "exported as an equivalent tokenizer.json (256 byte tokens + "
                 "<|endoftext|>, <|im_start|>, <|im_end|>; same ids)")
  return notes


# ----------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------


def _shards(tensors: list[ModuleTensor], itemsize: int, max_bytes: int
            ) -> list[list[ModuleTensor]]:
  shards, size = [[]], 0
  for t in tensors:
    nbytes = math.prod(t.shape) * itemsize
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  return shards


def export_hf(model, out_dir, *, tokenizer=None, source=None, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes ``model`` as a Hugging Face checkpoint directory ``out_dir``.

  Args:
    model: a :class:`~epi_jax.model.llama.Llama`.
    out_dir: the directory to create (must not exist, or be empty).
    tokenizer: a ``ChatTokenizer``/``ByteTokenizer`` (None: no tokenizer files).
    source: the checkpoint the model was loaded from: a Hugging Face directory's
      tokenizer files are copied as they are; otherwise they are written from
      ``tokenizer`` (``tokenizer.json`` + ``tokenizer_config.json`` with the
      ChatML chat template the trainer used).
    dtype: ``'float32'``, ``'bfloat16'`` or ``'float16'`` (None: the params').
    max_shard_bytes: larger checkpoints are split into shards of at most this
      size (``model-0000i-of-0000n.safetensors`` + the index).

  Returns:
    Notes for the user (e.g. about the tokenizer).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out_dir)
  _check_out(out)
  config = model.config
  dtype = dtype or _dtype_name(config.param_dtype)
  if dtype not in HF_DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {HF_DTYPES}")
  np_dtype = jnp.dtype(dtype)  # numpy dtypes, bfloat16 included (ml_dtypes)
  staged = _staging(out)
  try:
    tensors = list(module_tensors(model))
    shards = _shards(tensors, np_dtype.itemsize, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
      fname = ("model.safetensors" if len(shards) == 1
               else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
      arrays = {}
      for t in shard:
        name = names.name_of(t.slot, "hf")
        arrays[name] = np.ascontiguousarray(
            names.swap_layout(t.fetch(), t.slot).astype(np_dtype))
        weight_map[name] = fname
        total += arrays[name].nbytes
      save_file(arrays, str(staged / fname), metadata={"format": "pt"})
      del arrays
    if len(shards) > 1:
      (staged / "model.safetensors.index.json").write_text(json.dumps(
          {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    eos = getattr(tokenizer, "eos_id", None)
    pad = getattr(tokenizer, "pad_id", None)
    (staged / "config.json").write_text(json.dumps(
        hf_config_dict(config, dtype=dtype, eos_token_id=eos, pad_token_id=pad), indent=2))
    if tokenizer is not None:
      (staged / "generation_config.json").write_text(json.dumps(
          {"eos_token_id": list(tokenizer.stop_ids), "pad_token_id": int(pad)}, indent=2))
    notes = _write_tokenizer(staged, tokenizer, config, source)
    _publish(staged, out)
  except BaseException:
    shutil.rmtree(staged, ignore_errors=True)
    raise
  return notes


# ----------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------


def _llama3_rope_factors(config: ModelConfig) -> np.ndarray:
  """llama.cpp's ``rope_freqs.weight`` for llama3 rope scaling (as convert_hf_to_gguf.py)."""
  s = config.rope_scaling
  factor = float(s.get("factor", 8.0))
  low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
  old = float(s.get("original_max_position_embeddings", 8192))
  dim = config.head_dim
  freqs = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old / high:
      out.append(1.0)
    elif wavelen > old / low:
      out.append(factor)
    else:
      smooth = (old / wavelen - low) / (high - low)
      out.append(1.0 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def _gguf_pre(tokenizer, source) -> str:
  """llama.cpp's pre-tokenizer name: the source GGUF's, else a guess from the JSON."""
  if source is not None and str(source).endswith(".gguf"):
    import gguf  # pylint: disable=g-import-not-at-top
    field = gguf.GGUFReader(str(source)).fields.get("tokenizer.ggml.pre")
    if field is not None:
      return str(field.contents())
  spec = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer") or {}
  singles = [p for p in spec.get("pretokenizers", [spec]) if p.get("type") == "Digits"
             and p.get("individual_digits")]
  return "smollm" if singles else "default"  # SmolLM2 splits digits one by one


def _add_tokenizer(writer, tokenizer, config: ModelConfig, source) -> list[str]:
  import gguf  # pylint: disable=g-import-not-at-top
  spec = json.loads(tokenizer.backend.to_str())
  if spec["model"]["type"] != "BPE":
    return [f"tokenizer model {spec['model']['type']!r} is not byte-level BPE: the GGUF "
            "has no tokenizer metadata (llama.cpp needs one to run it)"]
  by_id = {i: t for t, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
  if max(by_id) >= config.vocab_size:
    raise ValueError(f"Tokenizer id {max(by_id)} is outside the model's vocab_size "
                     f"{config.vocab_size}")
  added = {a["id"]: a for a in spec.get("added_tokens", [])}
  tokens, types = [], []
  for i in range(config.vocab_size):
    if i not in by_id:
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.UNUSED)
      continue
    tokens.append(by_id[i])
    types.append(gguf.TokenType.NORMAL if i not in added else
                 gguf.TokenType.CONTROL if added[i].get("special") else
                 gguf.TokenType.USER_DEFINED)
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
  notes = []
  if not merges:  # GGUF cannot store an empty array
    notes.append("the tokenizer has no BPE merges (byte-level stand-in): the GGUF has no "
                 "tokenizer.ggml.merges, which llama.cpp requires; epi_jax reads it")
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(_gguf_pre(tokenizer, source))
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_pad_token_id(tokenizer.pad_id)
  writer.add_add_bos_token(False)
  writer.add_chat_template(tokenizer.chat_template())
  return notes


def export_gguf(model, path, *, tokenizer=None, source=None, dtype: str = "float16",
                name: str = "epi_jax export") -> list[str]:
  """Writes ``model`` as a llama.cpp GGUF file ``path``.

  Args:
    model: a :class:`~epi_jax.model.llama.Llama`.
    path: the ``.gguf`` file to create (must not exist).
    tokenizer: written into the metadata (byte-level BPE; the ChatML template).
    source: the checkpoint the model came from (a source GGUF's pre-tokenizer
      name is kept).
    dtype: of the 2-D weights: ``'float16'`` (default) or ``'float32'``;
      norms, biases and rope factors stay float32 (llama.cpp's convention).
    name: ``general.name``.

  Returns:
    Notes for the user.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if path.exists():
    raise FileExistsError(f"Export destination {path} already exists; remove it or choose "
                          "another --out")
  if dtype not in GGUF_DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {GGUF_DTYPES}")
  config = model.config
  arch = model_type(config)
  permuted = arch == "llama"  # qwen2 keeps the rotate-half order
  notes = []

  def gguf_dtype(shape):
    return np.float16 if len(shape) == 2 and dtype == "float16" else np.float32

  def to_gguf(t: ModuleTensor) -> np.ndarray:
    w = names.swap_layout(t.fetch().astype(np.float32), t.slot)
    if permuted:
      w = names.gguf_qk_order(w, t.slot, num_heads=config.num_heads,
                              num_kv_heads=config.num_kv_heads, to_gguf=True)
    return np.ascontiguousarray(w, gguf_dtype(w.shape))

  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
  os.close(fd)
  try:
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16"
                         else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    extra = []
    if config.rope_scaling:
      kind = _rope_type(config.rope_scaling)
      if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
      elif kind == "llama3":
        extra.append(("rope_freqs.weight", _llama3_rope_factors(config)))
        notes.append("llama3 rope scaling is stored as llama.cpp's rope_freqs.weight; "
                     "epi_jax's own GGUF loader does not read it back")
    if tokenizer is not None:
      notes += _add_tokenizer(writer, tokenizer, config, source)
    else:
      notes.append("no tokenizer given: the GGUF has no tokenizer metadata")
    tensors = list(module_tensors(model))
    # Tensor infos first (shapes only), then the data one tensor at a time.
    for t in tensors:
      shape = names.swap_layout(np.broadcast_to(np.float32(0), t.shape), t.slot).shape
      np_type = np.dtype(gguf_dtype(shape))
      writer.add_tensor_info(names.name_of(t.slot, "gguf"), shape, np_type,
                             math.prod(shape) * np_type.itemsize)
    for tname, value in extra:
      writer.add_tensor_info(tname, value.shape, value.dtype, value.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
      writer.write_tensor_data(to_gguf(t))
    for _, value in extra:
      writer.write_tensor_data(value)
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return notes

