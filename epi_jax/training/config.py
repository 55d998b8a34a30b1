"""Trainer configuration: defaults, and validation before anything runs.

A config file (``configs/NAME.py``) defines ``get_config()`` returning an
``ml_collections.ConfigDict``; it starts from :func:`default_config` and changes
what it needs. :func:`validate` checks every field (unknown fields, types and
values) and returns a resolved copy; training never starts on a bad config.
The README's trainer sections say what each field means.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import math
import pathlib
import sys
from typing import Any

import ml_collections
from ml_collections import config_dict

from epi_jax.data import tasks as tasks_lib
from epi_jax.method.options import IMPORTANCES, OptionError
from epi_jax.model.attention import IMPLEMENTATIONS as ATTENTIONS
from epi_jax.training import optim

# The methods (experiments/compare.py imports this one definition).
METHODS = ("full", "multi_stage", "static", "epi")
DTYPES = ("float32", "bfloat16")
INITS = ("pretrained", "random")
CLIP_SCOPES = ("all", "trainable")


def default_config() -> ml_collections.ConfigDict:
  """Every field the trainer knows, with its default."""
  c = ml_collections.ConfigDict()
  c.method = "epi"                 # full | multi_stage | static | epi
  c.seed = 0
  c.total_steps = 100              # multi_stage: <= 0 means the sum of stage steps
  c.log_every = 10
  c.checkpoint_every = 50          # 0: no checkpoints (the run cannot resume; snapshots still)
  c.keep_checkpoints = 3
  c.snapshot_steps = ()            # params-only snapshots for evaluation
  c.progress_bar = True
  c.async_checkpointing = True

  c.model = ml_collections.ConfigDict()
  c.model.name = "tiny"
  c.model.init = "random"          # pretrained | random
  c.model.param_dtype = "float32"  # master weights
  c.model.compute_dtype = "float32"
  c.model.remat = False
  c.model.scan_layers = False      # blocks stacked on a 'layers' axis, run by lax.scan
  c.model.attention = "auto"       # auto | xla | einsum | cudnn | splash (epi_jax.model.attention)

  c.data = ml_collections.ConfigDict()
  c.data.mixture = {t: 1.0 for t in tasks_lib.names(benchmark_only=True)}
  c.data.stages = tasks_lib.default_stages(50)  # each benchmark task in its registry stage
  # True: every method trains over data.stages (the sequential A-then-B
  # protocol of `epi-jax compare`); multi_stage always does, the others
  # otherwise train on data.mixture.
  c.data.staged = False
  c.data.batch_size = 8
  c.data.seq_len = 128
  c.data.packing = True
  c.data.data_dir = config_dict.placeholder(str)
  c.data.raw_dir = config_dict.placeholder(str)
  c.data.max_examples_per_task = config_dict.placeholder(int)
  # Base URL serving the raw files under the raw dir's relative paths, for the
  # downloads of files no raw dir holds (None: $EPI_DATA_MIRROR, else upstream).
  c.data.mirror = config_dict.placeholder(str)
  # Where the data is not prepared and no raw dir holds its files, train on a
  # small built-in stand-in instead of downloading them (for tests and demos).
  c.data.allow_standin = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.min_lr_ratio = 0.1
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0      # <= 0: no clipping
  # static/epi: the gradient norm that clipping uses: "all" gradients, or only
  # the "trainable" (not isolated) ones (the isolated entries have the largest
  # g^2 by construction and would otherwise shrink every trainable step).
  c.optimizer.clip_scope = "all"
  c.optimizer.grad_accum_steps = 1
  # A step whose gradients are non-finite: False stops the run (exit 4, the last
  # finite checkpoint kept); True skips the update as optax.apply_if_finite does.
  c.optimizer.skip_nonfinite = False

  c.epi = ml_collections.ConfigDict()
  c.epi.isolation_ratio = 0.01
  c.epi.update_interval = 100
  # The importance EMA's decay. With importance="inner_nu" (AdamW's second moment,
  # no EMA of EPI's own) it is optimizer.b2: set None (or equal to optimizer.b2).
  c.epi.ema_decay = 0.99
  c.epi.warmup_steps = config_dict.placeholder(int)
  c.epi.importance = "grad_sq"   # or grad_abs, taylor, displacement, inner_nu
  c.epi.normalization = "layer_mean"
  c.epi.selection = "global"
  c.epi.exclude = ("norm",)        # substrings of param paths never isolated
  c.epi.importance_dtype = "float32"  # or "bfloat16": 2 bytes/param of importance
  # method=static only: its importance, e.g. "displacement" for CPI-FT's |theta - theta_0|
  # after a warmup_steps probe. None: epi.importance.
  c.epi.static_importance = config_dict.placeholder(str)
  c.epi.packed_mask = False        # masks as bits: 1/8 byte/param
  c.epi.release_after = 1          # >1: release hysteresis (see epi_jax.isolate)
  c.epi.reset_on_release = False   # zero AdamW's moments of released entries
  # Track the importance (full/multi_stage too, isolating nothing) and the drift
  # of its top-p set on the refresh schedule: importance_drift.jsonl.
  c.epi.track_importance = False
  # With track_importance: also save that top-p set (EPI: its mask) at each
  # refresh as packed bits, top_sets/step_<N>.npy (1 bit/param per refresh), for
  # comparing sets across runs (`epi-jax compare` sets it where it needs them).
  c.epi.save_top_sets = False

  # Evaluation settings, read by `epi-jax compare` / `epi-jax evaluate` and
  # validated there (epi_jax.experiments.compare); the trainer ignores them.
  c.eval = ml_collections.ConfigDict()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: the remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # "auto" or "explicit" (jax.sharding.AxisType): the same program either way
  # (the step runs its model with the axes Auto); "explicit" for code that
  # passes the trainer's mesh to JAX code written for Explicit meshes.
  c.mesh.axis_types = "auto"
  return c


# Groups whose keys are not fixed here: task weights, and eval settings that
# the experiment driver validates (epi_jax.experiments.compare).
_FREE_GROUPS = ("data.mixture", "eval")


def _check_fields(config, defaults, prefix=""):
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in defaults:
      raise ValueError(f"Unknown config field {name!r}; known fields here: "
                       f"{sorted(defaults.keys())}")
    if isinstance(defaults[key], ml_collections.ConfigDict) and name not in _FREE_GROUPS:
      if not hasattr(config[key], "keys"):
        raise ValueError(f"Config field {name!r} must be a group of fields")
      _check_fields(config[key], defaults[key], name + ".")


def _fill_defaults(config, defaults, prefix=""):
  for key in defaults.keys():
    if key not in config:
      config[key] = copy.deepcopy(defaults[key])
    elif (isinstance(defaults[key], ml_collections.ConfigDict)
          and f"{prefix}{key}" not in _FREE_GROUPS):
      _fill_defaults(config[key], defaults[key], f"{prefix}{key}.")


def uses_stages(config) -> bool:
  """Whether ``config`` trains over ``data.stages`` rather than ``data.mixture``."""
  return config.method == "multi_stage" or bool(config.data.get("staged", False))


def _need(cond: bool, field: str, value: Any, what: str):
  if isinstance(value, float) and not math.isfinite(value) and "finite" not in what:
    what += " (and finite)"
  if not cond:
    raise ValueError(f"Invalid config.{field}={value!r}: {what}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
  """A finite int or float (no config number may be inf or nan)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_dict(x):
  return {k: _as_dict(v) for k, v in x.items()} if hasattr(x, "items") else x


def _check_mixture(mix, field):
  _need(hasattr(mix, "items") and len(mix) > 0, field, mix,
        "must be a non-empty dict task -> weight")
  for task, w in mix.items():
    _need(task in tasks_lib.names(), f"{field}.{task}", w,
          f"unknown task; known: {list(tasks_lib.names())}")
    _need(_is_num(w) and w >= 0, f"{field}.{task}", w, "weight must be a finite number >= 0")
  _need(sum(mix.values()) > 0, field, dict(mix), "needs a positive weight")


def set_field(config, dotted: str, value) -> None:
  """``config.<dotted> = value``; KeyError/AttributeError for an unknown field."""
  *groups, field = dotted.split(".")
  node = config
  for g in groups:
    node = node[g]
  if field not in node:
    raise KeyError(dotted)
  node[field] = value


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks ``config`` and returns a resolved, unlocked copy.

  Raises:
    ValueError: naming the first unknown field or invalid value.
  """
  defaults = default_config()
  _check_fields(config, defaults)
  c = ml_collections.ConfigDict(_as_dict(config))
  _fill_defaults(c, defaults)

  _need(c.method in METHODS, "method", c.method, f"expected one of {METHODS}")
  _need(_is_int(c.seed), "seed", c.seed, "must be an int")
  for f in ("log_every", "keep_checkpoints"):
    _need(_is_int(c[f]) and c[f] >= 1, f, c[f], "must be an int >= 1")
  _need(_is_int(c.checkpoint_every) and c.checkpoint_every >= 0, "checkpoint_every",
        c.checkpoint_every, "must be an int >= 1, or 0 for no checkpoints")
  snaps = c.snapshot_steps
  _need(isinstance(snaps, (tuple, list)) and all(_is_int(s) and s >= 0 for s in snaps),
        "snapshot_steps", snaps, "must be a tuple of ints >= 0")
  c.snapshot_steps = tuple(sorted(set(int(s) for s in snaps)))

  m = c.model
  _need(isinstance(m.name, str) and m.name, "model.name", m.name, "must be a non-empty str")
  _need(m.init in INITS, "model.init", m.init, f"expected one of {INITS}")
  _need(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"expected one of {DTYPES}")
  _need(m.compute_dtype in DTYPES, "model.compute_dtype", m.compute_dtype,
        f"expected one of {DTYPES}")
  _need(isinstance(m.remat, bool), "model.remat", m.remat, "must be a bool")
  _need(isinstance(m.scan_layers, bool), "model.scan_layers", m.scan_layers, "must be a bool")
  _need(m.attention in ATTENTIONS, "model.attention", m.attention,
        f"expected one of {ATTENTIONS}")

  d = c.data
  _check_mixture(d.mixture, "data.mixture")
  stages = list(d.stages or [])
  _need(isinstance(d.staged, bool), "data.staged", d.staged, "must be a bool")
  if uses_stages(c):
    _need(len(stages) > 0, "data.stages", stages,
          "method 'multi_stage' (or data.staged=True) needs stages")
  for i, st in enumerate(stages):
    _need(hasattr(st, "keys") and set(st.keys()) <= {"mixture", "steps"} and "steps" in st,
          f"data.stages[{i}]", st, "must be a dict with 'mixture' and 'steps'")
    _check_mixture(st.get("mixture", d.mixture), f"data.stages[{i}].mixture")
    _need(_is_int(st["steps"]) and st["steps"] >= 1, f"data.stages[{i}].steps",
          st["steps"], "must be an int >= 1")
  d.stages = [{"mixture": _as_dict(st.get("mixture", d.mixture)), "steps": int(st["steps"])}
              for st in stages]
  for f in ("batch_size", "seq_len"):
    _need(_is_int(d[f]) and d[f] >= 1, f"data.{f}", d[f], "must be an int >= 1")
  _need(isinstance(d.packing, bool), "data.packing", d.packing, "must be a bool")
  _need(d.mirror is None or (isinstance(d.mirror, str) and "://" in d.mirror), "data.mirror",
        d.mirror, "must be None or a base URL like https://host/path")
  _need(d.max_examples_per_task is None or d.max_examples_per_task >= 1,
        "data.max_examples_per_task", d.max_examples_per_task, "must be None or >= 1")

  if uses_stages(c):
    total = sum(st["steps"] for st in d.stages)
    if c.total_steps <= 0:
      c.total_steps = total
    _need(c.total_steps == total, "total_steps", c.total_steps,
          f"training over stages (method 'multi_stage' or data.staged) needs total_steps "
          f"== sum of data.stages steps ({total}), or total_steps <= 0 to derive it")
  _need(_is_int(c.total_steps) and c.total_steps >= 1, "total_steps", c.total_steps,
        "must be an int >= 1")

  o = c.optimizer
  _need(_is_num(o.learning_rate) and o.learning_rate > 0, "optimizer.learning_rate",
        o.learning_rate, "must be a finite number > 0")
  _need(_is_int(o.warmup_steps) and 0 <= o.warmup_steps <= c.total_steps,
        "optimizer.warmup_steps", o.warmup_steps, "must be an int in [0, total_steps]")
  _need(_is_num(o.min_lr_ratio) and 0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio",
        o.min_lr_ratio, "must be in [0, 1]")
  _need(_is_num(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay",
        o.weight_decay, "must be >= 0")
  for f in ("b1", "b2"):
    _need(_is_num(o[f]) and 0 <= o[f] < 1, f"optimizer.{f}", o[f], "must be in [0, 1)")
  _need(_is_num(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "must be a finite number > 0")
  _need(_is_num(o.clip_norm), "optimizer.clip_norm", o.clip_norm,
        "must be a finite number (<= 0: no clipping)")
  _need(o.clip_scope in CLIP_SCOPES, "optimizer.clip_scope", o.clip_scope,
        f"expected one of {CLIP_SCOPES}")
  _need(_is_int(o.grad_accum_steps) and o.grad_accum_steps >= 1,
        "optimizer.grad_accum_steps", o.grad_accum_steps, "must be an int >= 1")
  _need(isinstance(o.skip_nonfinite, bool), "optimizer.skip_nonfinite", o.skip_nonfinite,
        "must be a bool")
  _need(d.batch_size % o.grad_accum_steps == 0, "optimizer.grad_accum_steps",
        o.grad_accum_steps, f"must divide data.batch_size={d.batch_size}")

  e = c.epi
  _need(e.importance_dtype in ("float32", "bfloat16"), "epi.importance_dtype",
        e.importance_dtype, "expected 'float32' or 'bfloat16'")
  _need(e.static_importance is None or e.static_importance in IMPORTANCES,
        "epi.static_importance", e.static_importance, f"expected None or one of {IMPORTANCES}")
  _need(_is_int(e.update_interval), "epi.update_interval", e.update_interval, "must be an int")
  _need(isinstance(e.reset_on_release, bool), "epi.reset_on_release", e.reset_on_release,
        "must be a bool")
  _need(isinstance(e.track_importance, bool), "epi.track_importance", e.track_importance,
        "must be a bool")
  _need(isinstance(e.save_top_sets, bool), "epi.save_top_sets", e.save_top_sets,
        "must be a bool")
  _need(isinstance(e.exclude, (tuple, list)) and all(isinstance(s, str) for s in e.exclude),
        "epi.exclude", e.exclude, "must be a tuple of str")
  e.exclude = tuple(e.exclude)
  try:  # EPI validates its own options (for every method: a typo fails early)
    optim.epi_options(c)
  except OptionError as err:
    raise ValueError(f"Invalid config.epi.{err.field}: {err}") from None

  for f in ("data", "fsdp", "tensor"):
    v = c.mesh[f]
    _need(_is_int(v) and (v >= 1 or v == -1), f"mesh.{f}", v, "must be an int >= 1 or -1")
  _need([c.mesh[f] for f in ("data", "fsdp", "tensor")].count(-1) <= 1, "mesh", c.mesh.to_dict(),
        "at most one axis may be -1")
  _need(c.mesh.axis_types in ("auto", "explicit"), "mesh.axis_types", c.mesh.axis_types,
        "must be 'auto' or 'explicit'")
  return c


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
  """The config saved in ``config.json`` (tuples come back as tuples)."""
  raw = json.loads(text)
  raw["snapshot_steps"] = tuple(raw.get("snapshot_steps", ()))
  raw.setdefault("epi", {})["exclude"] = tuple(raw.get("epi", {}).get("exclude", ()))
  c = ml_collections.ConfigDict(raw)
  _fill_defaults(c, default_config())
  return c


def load_config_file(path: str):
  """``get_config()`` of a config file (``configs/NAME.py``).

  Raises:
    FileNotFoundError: no such file. ValueError: it defines no ``get_config()``.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"--config: no such file {path}")
  spec = importlib.util.spec_from_file_location(f"_epi_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"--config: {path} defines no get_config()")
  return module.get_config()


def literal(text: str):
  """A ``--FIELD=VALUE`` value: a Python literal where it parses, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
