"""Writes the colab notebooks from their cell sources (outputs stripped).

Run `python colabs/make_notebooks.py` after editing a notebook's cells here; the
.ipynb files are committed so that Colab can open them directly.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
# The one place that names the repository: the badges and the install cell point here.
# For a fork, change it and rerun this script (or set EPI_JAX_REPO=https://github.com/you/fork
# in the runtime before the install cell).
REPO = "epi-jax/epi_jax"


def badge(name):
  return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
          f"(https://colab.research.google.com/github/{REPO}/blob/main/colabs/{name})")


INSTALL = f'''# Install epi_jax (on Colab; a local checkout with `make install` already has it).
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("epi_jax") is None:
  repo = os.environ.get("EPI_JAX_REPO", "https://github.com/{REPO}")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"epi_jax @ git+{{repo}}"], check=True)
SMOKE = os.environ.get("EPI_COLAB_SMOKE") == "1"  # CI sets this: tiny sizes, CPU, minutes.
import jax
print("backend:", jax.default_backend(), "devices:", jax.device_count(), "smoke:", SMOKE)'''


def quickstart():
  name = "01_quickstart.ipynb"
  cells = [
      new_markdown_cell(f"# EPI quickstart: Evolving Parameter Isolation as an optax transformation\n\n{badge(name)}\n\n"
                        "EPI keeps an EMA of g² per parameter and every `update_interval` steps isolates (freezes) "
                        "the global top-p of the layer-normalized importance. This notebook trains a small Flax NNX "
                        "model with both forms and shows the mask and the importance."),
      new_code_cell(INSTALL),
      new_code_cell('''import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
import epi_jax

class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(16, 64, rngs=rngs)
    self.l2 = nnx.Linear(64, 64, rngs=rngs)
    self.out = nnx.Linear(64, 1, rngs=rngs)
  def __call__(self, x):
    return self.out(nnx.gelu(self.l2(nnx.gelu(self.l1(x)))))

# Two "tasks" whose targets depend on different inputs: importance drifts when the mix changes.
def batch(step, task):
  x = jax.random.normal(jax.random.key(step), (64, 16))
  y = jnp.sin(x[:, :4].sum(1)) if task == 0 else jnp.cos(x[:, 8:12].sum(1))
  return x, y[:, None]

steps = 60 if SMOKE else 600'''),
      new_code_cell('''def train(tx, steps):
  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  @nnx.jit
  def step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss
  history = []
  for t in range(steps):
    x, y = batch(t, task=0 if t < steps // 2 else 1)   # task A, then task B
    loss = step(model, opt, x, y)
    s = epi_jax.epi_state(opt.opt_state)
    history.append((float(loss), float(s.isolated_fraction), float(s.jaccard_prev), float(s.jaccard_first)))
  return model, opt, np.array(history)

# Wrapper form: isolated weights do not move at all (AdamW's weight decay included).
wrapper = epi_jax.epi_adamw(3e-3, weight_decay=0.01, isolation_ratio=0.05,
                            update_interval=10, ema_decay=0.9, track_first_mask=True)
# Chain-first form: masks gradients only; cheaper to compose, but AdamW still moves isolated weights.
chained = optax.chain(epi_jax.epi_transform(0.05, 10, 0.9, track_first_mask=True), optax.adamw(3e-3))
model, opt, hist = train(wrapper, steps)
_, _, hist_chain = train(chained, steps)
print("final loss wrapper %.4f, chain %.4f" % (hist[-1, 0], hist_chain[-1, 0]))
print("isolated fraction %.3f, Jaccard with previous mask %.3f, with the first mask %.3f" % tuple(hist[-1, 1:]))'''),
      new_code_cell('''import matplotlib
import matplotlib.pyplot as plt
s = epi_jax.epi_state(opt.opt_state)
mask = np.asarray(s.mask["l2"]["kernel"])
imp = np.asarray(s.importance["l2"]["kernel"])
fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
ax[0].imshow(np.log10(imp + 1e-12), cmap="viridis"); ax[0].set_title("log10 importance, l2 kernel")
ax[1].imshow(mask, cmap="gray_r"); ax[1].set_title(f"isolated entries ({mask.mean():.1%})")
ax[2].plot(hist[:, 2], label="Jaccard vs previous mask"); ax[2].plot(hist[:, 3], label="Jaccard vs first mask")
ax[2].axvline(steps // 2, ls="--", c="k"); ax[2].set_xlabel("step"); ax[2].legend(); ax[2].set_title("drift")
plt.tight_layout(); plt.show()
assert 0 < hist[-1, 1] <= 0.05 + 1e-6'''),
  ]
  return name, cells


WORKDIR_CELL = '''import os, pathlib, tempfile
# Everything this notebook writes goes under WORKDIR (CI points EPI_COLAB_WORKDIR at a temp dir);
# prepared datasets are cached in ~/.cache/epi_jax (or $EPI_DATA_DIR).
WORKDIR = pathlib.Path(os.environ.get("EPI_COLAB_WORKDIR") or tempfile.mkdtemp(prefix="epi_colab_"))'''

# The trainer config of notebooks 02 and 03: configs/tiny.py shrunk in smoke mode,
# configs/smollm2_multitask.py scaled up for an accelerator otherwise. Built from
# default_config() because configs/ is not part of the installed package.
CONFIG_CELL = '''import jax
from epi_jax.training import default_config
from epi_jax.scoring import TASKS

RUNTIME = jax.default_backend()   # 'tpu', 'gpu' or 'cpu'
N = jax.device_count()
print(f"runtime: {RUNTIME}, {N} x {jax.devices()[0].device_kind}")

def make_config(method="epi", steps=None):
  c = default_config()
  c.method = method
  c.seed = 0
  c.progress_bar = not SMOKE
  c.async_checkpointing = not SMOKE
  # The raw task files: EPI_RAW_DATA_DIR (e.g. a mounted Drive folder) if set; otherwise they are
  # downloaded from their upstream sources (pinned sha256; EPI_DATA_MIRROR for a mirror).
  c.data.raw_dir = os.environ.get("EPI_RAW_DATA_DIR")
  # Smoke mode only: without raw files, a small built-in stand-in instead of downloading.
  c.data.allow_standin = SMOKE
  if SMOKE:  # configs/tiny.py, shrunk: a random tiny Llama with byte tokens, seconds per step on CPU.
    c.model.name, c.model.init = "tiny", "random"
    c.total_steps = steps or 6
    c.log_every, c.checkpoint_every = 1, c.total_steps
    c.snapshot_steps = (c.total_steps // 2,)
    c.data.batch_size, c.data.seq_len = 8, 128
    # LogiQA's byte-level prompts do not fit 128 tokens: train on the other four tasks.
    c.data.mixture = {t: 1.0 for t in TASKS if t != "logiqa"}
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.weight_decay = 3e-3, 2, 0.01
    c.epi.isolation_ratio, c.epi.update_interval, c.epi.ema_decay = 0.05, 2, 0.9
  else:  # configs/smollm2_multitask.py, scaled up for a TPU / GPU.
    # From the Hugging Face Hub (config, tokenizer, safetensors; HF_TOKEN for gated models).
    c.model.name = os.environ.get("EPI_COLAB_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct")
    c.model.init = "pretrained"
    c.model.compute_dtype = "float32" if RUNTIME == "cpu" else "bfloat16"
    c.model.remat = RUNTIME != "cpu"
    c.total_steps = steps or 600
    c.log_every, c.checkpoint_every = 10, 200
    c.snapshot_steps = tuple(range(c.total_steps // 3, c.total_steps, c.total_steps // 3))
    c.data.batch_size, c.data.seq_len = 32, 512
    c.data.mixture = {t: 1.0 for t in TASKS}
    c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.min_lr_ratio = 2e-5, 30, 0.1
    c.optimizer.clip_norm = 1.0
    c.epi.isolation_ratio, c.epi.update_interval, c.epi.ema_decay = 0.01, 50, 0.9
  # The mesh from the devices found. SmolLM2-135M fits on any one chip, so GPUs and CPUs each
  # hold a replica (data parallel); on a TPU, FSDP also shards params and optimizer state over
  # the cores (Colab's have 8-16 GiB each), which leaves room for longer sequences.
  if RUNTIME == "tpu" and not SMOKE:
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, N, 1
  else:
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = N, 1, 1
  c.data.batch_size = -(-c.data.batch_size // N) * N   # a multiple of the batch shards
  return c'''


def multitask_sft():
  name = "02_multitask_sft.ipynb"
  cells = [
      new_markdown_cell(
          f"# Multi-task SFT of SmolLM2-135M-Instruct with EPI\n\n{badge(name)}\n\n"
          "Trains SmolLM2-135M-Instruct on the five task families (GSM8K, Code Alpaca, LogiQA, "
          "Alpaca, chat) with Evolving Parameter Isolation, using the project's trainer "
          "(`epi_jax.training.train`): it finds the runtime (TPU, GPU or CPU), lays the mesh over "
          "the devices it finds, trains, then evaluates each task with `epi_jax.scoring.evaluate` "
          "against the model it started from.\n\n"
          "**Data and model.** The raw task files are downloaded from their upstream sources "
          "(pinned sha256, cached; `EPI_DATA_MIRROR` points at a mirror, `EPI_RAW_DATA_DIR` at "
          "files you already have) and the model from the Hugging Face Hub "
          "(`HuggingFaceTB/SmolLM2-135M-Instruct`, or `EPI_COLAB_MODEL`). At the end the model is "
          "exported as a Hugging Face checkpoint for transformers, vLLM or lm-evaluation-harness. "
          "**Smoke mode** (`EPI_COLAB_SMOKE=1`, set by CI) swaps in a random tiny Llama with byte "
          "tokens and a few steps, and the built-in stand-in data where the raw files are not "
          "local, so the notebook runs on a CPU in minutes."),
      new_code_cell(INSTALL),
      new_code_cell(WORKDIR_CELL + '\nWORKDIR = WORKDIR / "02_multitask_sft"\nprint("workdir:", WORKDIR)'),
      new_code_cell(CONFIG_CELL + '''

config = make_config("epi")
print(f"model {config.model.name}, {config.total_steps} steps of {config.data.batch_size} x "
      f"{config.data.seq_len} tokens, mesh data={config.mesh.data} fsdp={config.mesh.fsdp} "
      f"tensor={config.mesh.tensor}")'''),
      new_markdown_cell("## Train\n\n`train` checkpoints into the run directory and resumes from it, "
                        "so rerunning this cell after a disconnect continues where it stopped."),
      new_code_cell('''import time
from epi_jax.training import train
start = time.time()
result = train(config, WORKDIR / "run")
print(f"trained to step {result.step} in {time.time() - start:.0f} s -> {result.workdir}")'''),
      new_code_cell('''import matplotlib.pyplot as plt
import numpy as np
from epi_jax.utils.files import read_jsonl

logs = read_jsonl(result.workdir / "metrics.jsonl")
steps = [r["step"] for r in logs]
# The mask statistics mean something once the first mask is selected.
masked = lambda key: [r.get(key, np.nan) if r.get("num_refreshes") else np.nan for r in logs]
tasks = sorted({k.split("/", 1)[1] for r in logs for k in r if k.startswith("loss/")})
fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
ax[0].plot(steps, [r["loss"] for r in logs], "k", label="all")
for t in tasks:
  ax[0].plot(steps, [r.get(f"loss/{t}", np.nan) for r in logs], label=t, alpha=0.7)
ax[0].set_title("training loss per task"); ax[0].set_xlabel("step"); ax[0].legend(fontsize=7)
ax[1].plot(steps, [r.get("isolated_fraction", np.nan) for r in logs])
ax[1].set_title("isolated fraction"); ax[1].set_xlabel("step")
ax[2].plot(steps, masked("jaccard_prev"), marker=".", label="vs previous mask")
ax[2].plot(steps, masked("jaccard_first"), marker=".", label="vs first mask")
ax[2].set_title("mask Jaccard"); ax[2].set_xlabel("step"); ax[2].legend(fontsize=7)
plt.tight_layout(); plt.show()
assert logs[-1]["step"] == config.total_steps and np.isfinite(logs[-1]["loss"])'''),
      new_markdown_cell("## Evaluate\n\nGSM8K: exact match of the final number (greedy decoding). "
                        "LogiQA: accuracy of the most likely option. Code Alpaca, Alpaca, chat: "
                        "held-out loss per assistant token (lower is better)."),
      new_code_cell('''from epi_jax.experiments import compare
from epi_jax.scoring import evaluate, metrics

# The prepared test split (or the stand-in's examples when there are no raw files).
data_kwargs = compare.eval_data(config, TASKS)
if SMOKE:
  eval_kwargs = dict(num_examples=2, max_new_tokens=8, batch_size=2, seq_len=128)
else:
  eval_kwargs = dict(num_examples={"gsm8k": 200, "logiqa": 300, "code_alpaca": 200, "alpaca": 200,
                                   "chat": 200}, max_new_tokens=256, batch_size=16, seq_len=1024,
                     generate_batch_size=64)
base, tokenizer = compare.base_model(config)   # the model training started from
scores = {"base": evaluate(base, tokenizer, **eval_kwargs, **data_kwargs),
          "EPI": evaluate(result.model, result.tokenizer, **eval_kwargs, **data_kwargs)}'''),
      new_code_cell('''from IPython.display import Markdown, display

def primary(task, r):
  metric, higher_is_better = metrics.PRIMARY_METRIC[task]
  return metric, r[metric], higher_is_better

rows = ["| task | metric | base | EPI | n |", "|---|---|---|---|---|"]
for t in TASKS:
  metric, b, _ = primary(t, scores["base"][t])
  _, e, _ = primary(t, scores["EPI"][t])
  fmt = (lambda v: f"{100 * v:.1f}%") if metric == "accuracy" else (lambda v: f"{v:.3f}")
  rows.append(f"| {t} | {metric} | {fmt(b)} | {fmt(e)} | {scores['EPI'][t]['n']} |")
display(Markdown("\\n".join(rows)))

fig, ax = plt.subplots(1, 2, figsize=(12, 3.6))
acc = [t for t in TASKS if primary(t, scores["EPI"][t])[0] == "accuracy"]
loss = [t for t in TASKS if t not in acc]
for a, group, label in ((ax[0], acc, "accuracy"), (ax[1], loss, "held-out loss")):
  x = np.arange(len(group))
  for i, (name, res) in enumerate(scores.items()):
    a.bar(x + (i - 0.5) * 0.38, [primary(t, res[t])[1] for t in group], 0.38, label=name)
  a.set_xticks(x); a.set_xticklabels(group); a.set_title(label); a.legend()
plt.tight_layout(); plt.show()
assert all(np.isfinite(primary(t, scores["EPI"][t])[1]) for t in TASKS)'''),
      new_markdown_cell("## Export\n\nThe final snapshot as a Hugging Face checkpoint "
                        "(`epi-jax export --workdir RUN --format hf --out DIR` on the command "
                        "line; `--format gguf` for llama.cpp)."),
      new_code_cell('''from epi_jax.training.export import export_run
EXPORT = WORKDIR / "export_hf"
if not (EXPORT / "config.json").is_file():
  for note in export_run(result.workdir, EXPORT, fmt="hf"):
    print("note:", note)
print(sorted(p.name for p in EXPORT.iterdir()))
assert (EXPORT / "config.json").is_file() and (EXPORT / "tokenizer.json").is_file()'''),
  ]
  return name, cells


def drift_analysis():
  name = "03_drift_analysis.ipynb"
  cells = [
      new_markdown_cell(
          f"# Drift analysis: how the EPI mask moves, and EPI vs static isolation\n\n{badge(name)}\n\n"
          "EPI re-selects the isolated (frozen) parameters every `update_interval` steps from an EMA "
          "of g²; static isolation picks them once. This notebook reads two runs' logs "
          "(`metrics.jsonl`, `refreshes.jsonl`) and snapshots and plots: the importance drift "
          "(Jaccard of each mask with the first and the previous one), the per-layer isolation "
          "map over refreshes, and how far each layer's weights moved under each method.\n\n"
          "Set `EPI_DRIFT_RUN_DIR` to the workdir of an `epi-jax compare` run (it reads "
          "`epi/seed0` and `static/seed0` there); otherwise the notebook trains both methods "
          "itself (in smoke mode, `EPI_COLAB_SMOKE=1`, a random tiny Llama for a few steps)."),
      new_code_cell(INSTALL),
      new_code_cell(WORKDIR_CELL + '\nWORKDIR = WORKDIR / "03_drift_analysis"\nprint("workdir:", WORKDIR)'),
      new_code_cell(CONFIG_CELL),
      new_code_cell('''from epi_jax.training import is_finished, train

RUN_DIR = os.environ.get("EPI_DRIFT_RUN_DIR")
if RUN_DIR:   # an existing `epi-jax compare` workdir
  runs = {m: pathlib.Path(RUN_DIR) / m / "seed0" for m in ("epi", "static")}
  missing = [str(d) for d in runs.values() if not (d / "metrics.jsonl").is_file()]
  if missing:
    raise FileNotFoundError(f"EPI_DRIFT_RUN_DIR: no metrics.jsonl in {missing}")
else:         # train both methods with the same data, steps and seed
  runs = {m: WORKDIR / m for m in ("epi", "static")}
  for m, d in runs.items():
    if not is_finished(d):
      train(make_config(m, steps=10 if SMOKE else 300), d)
print({m: str(d) for m, d in runs.items()})'''),
      new_markdown_cell("## Importance drift\n\nOne point per mask refresh. Static isolation "
                        "selects once, so its mask never changes (Jaccard 1 throughout); EPI's "
                        "overlap with its first mask shows how far the important set has moved."),
      new_code_cell('''import matplotlib.pyplot as plt
import numpy as np
from epi_jax.experiments import compare
from epi_jax.scoring import drift
from epi_jax.training import load_config
from epi_jax.utils import files

configs = {m: load_config(d) for m, d in runs.items()}
refreshes = {m: drift.load_refreshes(d) for m, d in runs.items()}
logs = {m: files.read_jsonl(d / "metrics.jsonl") for m, d in runs.items()}
sizes = compare.param_sizes(configs["epi"].model)   # entries per parameter, to weigh layers
summary = {m: drift.drift_summary(r, sizes) for m, r in refreshes.items()}
for m, s in summary.items():
  print(f"{m}: {s['num_refreshes']} refreshes, final Jaccard vs first mask {s['final_jaccard_first']}")

last = max(r[-1]["step"] for r in logs.values())
nan = lambda xs: [np.nan if v is None else v for v in xs]
fig, ax = plt.subplots(1, 4, figsize=(18, 3.6))
for m, s in summary.items():
  steps = s["step"]
  if m == "static" and len(steps) == 1:  # one selection, held unchanged to the end
    s = dict(s, jaccard_first=s["jaccard_first"] + [1.0], jaccard_prev=s["jaccard_prev"] + [1.0],
             num_flipped=s["num_flipped"] + [0], migration=s["migration"] + [0.0])
    steps = [steps[0], last]
  ax[0].plot(steps, nan(s["jaccard_first"]), marker="o", label=m)
  ax[1].plot(steps, nan(s["jaccard_prev"]), marker="o", label=m)
  ax[2].plot(steps, nan(s["num_flipped"]), marker="o", label=m)
  ax[3].plot(steps, nan(s["migration"]), marker="o", label=m)
for a, title in zip(ax, ("Jaccard vs first mask", "Jaccard vs previous mask", "entries flipped",
                         "isolated entries changing layer")):
  a.set_title(title); a.set_xlabel("step"); a.legend(fontsize=8); a.grid(alpha=0.3)
ax[0].set_ylim(0, 1.05); ax[1].set_ylim(0, 1.05)
plt.tight_layout(); plt.show()
assert summary["epi"]["num_refreshes"] >= 2 and summary["static"]["num_refreshes"] == 1'''),
      new_markdown_cell("## Per-layer isolation maps\n\nThe isolated fraction of each decoder block "
                        "(rows; size-weighted over its parameters) at each refresh (columns)."),
      new_code_cell('''mats = {m: drift.layer_matrix(r, group="block", sizes=sizes) for m, r in refreshes.items()}
vmax = max(np.nanmax(mat) for _, _, mat in mats.values())
fig, ax = plt.subplots(1, 2, figsize=(14, 0.25 * len(mats["epi"][0]) + 2.5),
                       gridspec_kw={"width_ratios": [max(len(mats["epi"][1]), 2), 2]})
for a, (m, (rows, steps, mat)) in zip(ax, mats.items()):
  im = a.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax)
  a.set_yticks(range(len(rows))); a.set_yticklabels(rows, fontsize=7)
  a.set_xticks(range(len(steps))); a.set_xticklabels(steps, fontsize=7)
  a.set_xlabel("refresh step"); a.set_title(f"{m}: isolated fraction per block")
fig.colorbar(im, ax=ax, label="isolated fraction")
plt.show()

rows, _, epi_mat = mats["epi"]
srows, _, static_mat = mats["static"]
final = {"EPI (last refresh)": dict(zip(rows, epi_mat[:, -1])),
         "static": dict(zip(srows, static_mat[:, -1]))}
x = np.arange(len(rows))
plt.figure(figsize=(12, 3.2))
for i, (m, f) in enumerate(final.items()):
  plt.bar(x + (i - 0.5) * 0.4, [f.get(r, np.nan) for r in rows], 0.4, label=m)
plt.xticks(x, rows, rotation=60, fontsize=7); plt.ylabel("isolated fraction"); plt.legend()
plt.title("where the isolated parameters end up"); plt.tight_layout(); plt.show()'''),
      new_markdown_cell("## What the snapshots say\n\nThe relative change of each block's weights "
                        "between the first and the last snapshot, and the per-task training "
                        "losses of the two methods."),
      new_code_cell('''from epi_jax.training import list_snapshots, load_run
from epi_jax.model import setup as model_setup

def block_change(run):
  snaps = list_snapshots(run)
  first = model_setup.flat_params(load_run(run, snaps[0])[0])
  final = model_setup.flat_params(load_run(run, snaps[-1])[0])
  num, den = {}, {}
  for k, w0 in first.items():
    b = drift.block_of(k)
    num[b] = num.get(b, 0.0) + float(np.sum((np.asarray(final[k], np.float32) - np.asarray(w0, np.float32)) ** 2))
    den[b] = den.get(b, 0.0) + float(np.sum(np.asarray(w0, np.float32) ** 2))
  return snaps, {b: np.sqrt(num[b] / max(den[b], 1e-30)) for b in num}

changes = {m: block_change(d) for m, d in runs.items()}
blocks = sorted(changes["epi"][1])
fig, ax = plt.subplots(1, 2, figsize=(15, 3.6))
x = np.arange(len(blocks))
for i, (m, (snaps, ch)) in enumerate(changes.items()):
  ax[0].bar(x + (i - 0.5) * 0.4, [ch[b] for b in blocks], 0.4, label=f"{m} (steps {snaps[0]}->{snaps[-1]})")
ax[0].set_xticks(x); ax[0].set_xticklabels(blocks, rotation=60, fontsize=7)
ax[0].set_title("relative weight change per block"); ax[0].legend(fontsize=8)
for m, recs in logs.items():
  ax[1].plot([r["step"] for r in recs], [r["loss"] for r in recs], label=m)
ax[1].set_title("training loss"); ax[1].set_xlabel("step"); ax[1].legend()
plt.tight_layout(); plt.show()

tasks = sorted(k.split("/", 1)[1] for k in logs["epi"][-1] if k.startswith("loss/"))
print("final training loss per task:")
for m, recs in logs.items():
  print(f"  {m:7s}" + "".join(f"  {t} {recs[-1].get('loss/' + t, float('nan')):.3f}" for t in tasks))
assert all(np.isfinite(v) for _, ch in changes.values() for v in ch.values())'''),
      new_code_cell('''# With an `epi-jax compare` workdir: its evaluated comparison table as well.
from IPython.display import Markdown, display
if RUN_DIR and (pathlib.Path(RUN_DIR) / "results.md").is_file():
  display(Markdown((pathlib.Path(RUN_DIR) / "results.md").read_text()))
else:
  print("no results.md (set EPI_DRIFT_RUN_DIR to an `epi-jax compare` workdir for the evaluated table)")'''),
  ]
  return name, cells


def main():
  for make in (quickstart, multitask_sft, drift_analysis):
    name, cells = make()
    for i, cell in enumerate(cells):  # stable ids: regenerating leaves unchanged notebooks alone
      cell.id = f"cell-{i:02d}"
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "accelerator": "TPU", "colab": {"provenance": []}})
    nbformat.write(nb, HERE / name)
    print("wrote", name)


if __name__ == "__main__":
  main()
