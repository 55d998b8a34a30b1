"""EPI in Tunix's PeftTrainer (``epi_jax.integrations.tunix``).

A Tunix Llama3 (its smallest config, shrunk further, random init) trained by
``PeftTrainer`` with ``epi_optimizer`` and ``EPIHook``, full fine-tuning and
LoRA (qwix, with gradient accumulation): isolated entries bit-frozen at every
step; the hook's logged values equal ``epi_metrics`` of the state at that step
and nothing is read on steps that log nothing; a restart from Tunix's
checkpoint continues bit-identically. Our scanned model driven by PeftTrainer
(``tunix.models`` has no stacked model) gets the masks of the unstacked one.
Tunix is installed by ``make test`` (``make tunix``); without it this file
fails to import, it does not skip.
"""

import dataclasses
import importlib.util
import pathlib
import re
import shutil
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import config as flax_config
from flax import nnx

from epi_jax.integrations import tunix as epi_tunix  # without Tunix: says how to install it

# Importing a tunix.models module sets the process-wide flax_always_shard_variable
# to False (Tunix's env_utils.setup_sharding_environment). Test collection imports
# every test file in every worker, so set it back at once; this file's tests get
# Tunix's setting through the fixture below.
_ALWAYS_SHARD = flax_config.flax_always_shard_variable
import qwix  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.sft import hooks as tunix_hooks  # noqa: E402
from tunix.sft import peft_trainer  # noqa: E402

flax_config.update("flax_always_shard_variable", _ALWAYS_SHARD)

import epi_jax  # noqa: E402
from epi_jax.method import METRICS, OptionError, path_str  # noqa: E402
from epi_jax.model import Llama, get_config  # noqa: E402
from epi_jax.model import setup as model_setup  # noqa: E402
from epi_jax.training.optim import clip_by_trainable_norm  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB, B, L = 32, 2, 8
STEPS, T, RESTART = 6, 2, 3


@pytest.fixture(autouse=True)
def _tunix_flax_config():
  flax_config.update("flax_always_shard_variable", False)
  yield
  flax_config.update("flax_always_shard_variable", _ALWAYS_SHARD)


def _llama3(lora: bool):
  cfg = dataclasses.replace(llama3.ModelConfig.llama3p2_1b(), num_layers=1, vocab_size=VOCAB,
                            embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8,
                            num_kv_heads=1)
  model = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
  if lora:
    inputs = dict(input_tokens=jnp.ones((1, L), jnp.int32), positions=jnp.ones((1, L), jnp.int32),
                  cache=None, attention_mask=jnp.ones((1, L, L), bool))
    model = qwix.apply_lora_to_model(
        model, qwix.LoraProvider(module_path=".*attn.*|.*mlp.*", rank=2, alpha=2.0), **inputs)
  return model


def _batches(n: int):
  rng = np.random.default_rng(0)
  causal = np.tril(np.ones((L, L), bool))[None].repeat(B, 0)
  return [dict(input_tokens=rng.integers(0, VOCAB, (B, L)).astype(np.int32),
               input_mask=np.ones((B, L), np.int32),
               positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)),
               attention_mask=causal) for _ in range(n)]


def _wrt(model):
  return nnx.LoRAParam if any(True for _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))) \
      else nnx.Param


def _flat(tree) -> dict:
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.as_pure(tree))[0]}


class Recorder(epi_tunix.EPIHook):
  """EPIHook that also records, with host syncs, each step's params, mask and metrics."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.params, self.masks, self.metrics, self.snapshots = {}, {}, {}, []

  def _record(self, trainer):
    n = trainer.train_steps
    if n not in self.params:
      self.params[n] = _flat(nnx.state(trainer.model, _wrt(trainer.model)))
      self.masks[n] = _flat(epi_jax.unpacked_mask(trainer.optimizer.opt_state))
      self.metrics[n] = {k: np.asarray(v) for k, v in epi_jax.epi_metrics(
          nnx.as_pure(trainer.optimizer.opt_state)).items()}

  def _snapshot(self, trainer, step):
    self.snapshots.append(step)
    return super()._snapshot(trainer, step)

  def on_train_step_start(self, train_ctx):
    self._record(train_ctx)
    super().on_train_step_start(train_ctx)

  def on_train_end(self, train_ctx):
    self._record(train_ctx)


def _committed(trainer):
  """Every array committed to the device, as those a restore or a step returns: one
  train-step program, compiled once (not again for the committed outputs of the first
  step), which the resumed run loads from the compilation cache."""
  for graph_node in (trainer.model, trainer.optimizer):
    nnx.update(graph_node, jax.device_put(nnx.state(graph_node), jax.devices()[0]))
  return trainer


def _trainer(lora, ckpt, hook=None):
  model = _llama3(lora)
  tx = epi_tunix.epi_optimizer(model, optax.linear_schedule(1e-2, 1e-3, STEPS),
                               isolation_ratio=0.25, update_interval=T,
                               max_grad_norm=None if lora else 0.5)
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=100, max_steps=STEPS, checkpoint_root_directory=str(ckpt),
      checkpointing_options=ocp.CheckpointManagerOptions(
          save_interval_steps=RESTART, enable_async_checkpointing=False),
      gradient_accumulation_steps=2 if lora else None)
  trainer = _committed(peft_trainer.PeftTrainer(model, tx, config))
  if hook is not None:
    trainer.with_training_hooks(hook)
  return trainer


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_peft_trainer_with_epi(tmp_path, lora):
  micro = 2 if lora else 1  # LoRA runs with gradient accumulation (optax.MultiSteps)
  data = _batches(STEPS * micro)
  log_every = 3 if lora else 1
  hook = Recorder(T, log_every=log_every)
  trainer = _trainer(lora, tmp_path / "a", hook)
  trainer.train(data)

  # Isolated entries are bit-frozen at every step; the others train.
  steps = sorted(hook.params)
  assert steps == list(range(STEPS + 1))
  for n in steps[1:]:
    before, after, mask = hook.params[n - 1], hook.params[n], hook.masks[n]
    assert set(mask) == set(after)
    for k, m in mask.items():
      np.testing.assert_array_equal(after[k][m], before[k][m], err_msg=f"{k} step {n}")
    moved = sum(int(np.sum((after[k] != before[k]) & ~m)) for k, m in mask.items())
    assert moved > 0, n
    isolated = sum(int(m.sum()) for m in mask.values())
    assert (isolated > 0) == (n >= T), (n, isolated)
    for k, m in mask.items():  # norms and embeddings are never isolated
      if "norm" in k or "embed" in k:
        assert not m.any(), k
  if lora:
    assert all("lora" in k for k in hook.masks[STEPS])

  # The hook logged epi_metrics of the state at its steps, and read nothing at the others.
  logger, prefix = trainer.metrics_logger, trainer.metrics_prefix
  logged = [n for n in range(1, STEPS + 1) if n % log_every == 0 or n % T == 0]
  assert hook.snapshots == logged  # once each (the last one at close()), none elsewhere
  for k in METRICS:
    history = logger.get_metric_history(prefix, f"epi/{k}", "train")
    np.testing.assert_array_equal(history, [hook.metrics[n][k] for n in logged], err_msg=k)
  assert hook.metrics[STEPS]["num_refreshes"] == STEPS // T
  assert 0 < hook.metrics[STEPS]["jaccard_first"] <= 1
  name = "layers/0/mlp/down_proj/kernel_lora_b" if lora else "layers/0/mlp/down_proj/kernel"
  np.testing.assert_allclose(logger.get_metric_history(prefix, f"epi/isolated/{name}", "train"),
                             [hook.masks[n][name].mean() for n in range(T, STEPS + 1, T)])
  assert logger.metric_exists(prefix, "learning_rate", "train")  # inject_hyperparams

  # A run restarted from Tunix's checkpoint of step RESTART ends with the same params and state.
  shutil.copytree(tmp_path / "a" / str(RESTART), tmp_path / "b" / str(RESTART))
  resumed = _trainer(lora, tmp_path / "b")
  assert resumed.train_steps == RESTART
  resumed.train(data)
  for got, want in ((nnx.state(resumed.model, _wrt(resumed.model)),
                     nnx.state(trainer.model, _wrt(trainer.model))),
                    (resumed.optimizer.opt_state, trainer.optimizer.opt_state)):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


class Counting(tunix_hooks.TrainingHooks):
  """Other hooks of the trainer, which EPIHook(wrapped=...) calls."""

  def __init__(self):
    self.calls = []

  def on_train_start(self, train_ctx):
    self.calls.append("start")

  def on_train_end(self, train_ctx):
    self.calls.append("end")

  def on_train_step_start(self, train_ctx):
    self.calls.append("step_start")

  def on_train_step_end(self, train_ctx, train_step, train_loss):
    self.calls.append("step_end")

  def on_eval_step_start(self, train_ctx):
    self.calls.append("eval_start")

  def on_eval_step_end(self, train_ctx, eval_loss):
    self.calls.append("eval_end")


def _ours_loss(model, inputs, targets):
  logits = model(inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def test_stacked_model_masks_equal_unstacked(tmp_path):
  config = get_config("tiny", num_layers=2)
  model = Llama(config, rngs=nnx.Rngs(0))
  params = model_setup.flat_params(model)
  scanned = model_setup.spec_for(dataclasses.replace(config, scan_layers=True)).bind(
      model_setup.stack_layers(params))
  axes = epi_tunix.model_layer_axes(scanned)
  assert axes["layers/attn/q/kernel"] == 0 and axes["embed/embedding"] is None
  assert epi_tunix.model_layer_axes(model) is None

  rng = np.random.default_rng(1)
  tokens = rng.integers(0, config.vocab_size, (3, 4, 17)).astype(np.int32)
  data = [dict(inputs=t[:, :-1], targets=t[:, 1:]) for t in tokens]
  masks, fractions = [], []
  for i, m in enumerate((model, scanned)):
    tx = epi_tunix.epi_optimizer(m, 1e-2, isolation_ratio=0.1, update_interval=1,
                                 max_grad_norm=1.0)
    trainer = _committed(peft_trainer.PeftTrainer(m, tx, peft_trainer.TrainingConfig(
        eval_every_n_steps=100, max_steps=len(data), checkpoint_root_directory=None)))
    others = Counting()
    trainer.with_loss_fn(_ours_loss).with_training_hooks(epi_tunix.EPIHook(1, wrapped=others))
    trainer.train(data)
    assert others.calls[0] == "start" and "end" in others.calls, others.calls
    assert others.calls.count("step_start") == others.calls.count("step_end") == len(data)
    masks.append(_flat(epi_jax.unpacked_mask(trainer.optimizer.opt_state)))
    fractions.append(trainer.metrics_logger.get_metric_history(
        "", "epi/isolated_fraction", "train"))
  unstacked, stacked = masks
  assert sum(int(v.sum()) for v in stacked.values()) > 0
  restacked = model_setup.stack_layers(unstacked)
  assert restacked.keys() == stacked.keys()
  for k, v in stacked.items():
    np.testing.assert_array_equal(v, restacked[k], err_msg=k)
  np.testing.assert_array_equal(fractions[0], fractions[1])


def test_readme_tunix_example_runs(capsys):
  text = (ROOT / "README.md").read_text()
  section = text.split("## EPI in Tunix (and MaxText SFT)")[1].split("\n## ")[0]
  block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out.split()
  assert int(out[0]) == 2 and 0 < float(out[1]) <= 0.11


def test_trainable_clipping_uses_the_mask_before_the_step():
  """wrap_optimizer(clip_scope="trainable") = our train step: clip_by_trainable_norm fed
  ~mask of the state before the update (the refresh step's new mask not yet)."""
  params = {"a": jnp.zeros((4, 8)), "norm": jnp.zeros((8,))}
  kw = dict(isolation_ratio=0.25, update_interval=2, warmup_steps=1, exclude=("norm",))
  tx = epi_tunix.wrap_optimizer(optax.sgd(1.0), None, max_grad_norm=0.3, layer_axes=None, **kw)
  ref = epi_jax.isolate(optax.chain(clip_by_trainable_norm(0.3), optax.sgd(1.0)),
                        kw["isolation_ratio"], kw["update_interval"],
                        warmup_steps=kw["warmup_steps"], track_first_mask=True,
                        eligible=lambda path: "norm" not in path)
  glob = epi_tunix.wrap_optimizer(optax.sgd(1.0), None, max_grad_norm=0.3, clip_scope="global",
                                  layer_axes=None, **kw)
  state, ref_state, glob_state = tx.init(params), ref.init(params), glob.init(params)
  for i in range(4):
    g = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params)
    trainable = jax.tree.map(jnp.logical_not, epi_jax.unpacked_mask(ref_state))
    u, state = tx.update(g, state, params)
    want, ref_state = ref.update(g, ref_state, params, trainable=trainable)
    chex.assert_trees_all_equal(u, want)
    u_glob, glob_state = glob.update(g, glob_state, params)
    # From the second step a mask is in force: the trainable norm is the smaller one.
    assert (optax.tree.norm(u) > optax.tree.norm(u_glob) * 1.01) == (i >= 1), i


def test_bad_input_and_missing_tunix(monkeypatch):
  model = _llama3(False)
  with pytest.raises(ValueError, match="clip_scope"):
    epi_tunix.epi_optimizer(model, 1e-3, isolation_ratio=0.1, update_interval=2,
                            max_grad_norm=1.0, clip_scope="all")
  with pytest.raises(ValueError, match="exclude"):
    epi_tunix.epi_optimizer(model, 1e-3, isolation_ratio=0.1, update_interval=2, exclude="norm")
  with pytest.raises(OptionError, match="isolation_ratio"):
    epi_tunix.epi_optimizer(model, 1e-3, isolation_ratio=2.0, update_interval=2)
  with pytest.raises(ValueError, match="reads the model"):
    epi_tunix.wrap_optimizer(optax.sgd(1.0), None, isolation_ratio=0.1, update_interval=2)
  with pytest.raises(ValueError, match="layer_axes must be"):
    epi_tunix.epi_optimizer(model, 1e-3, isolation_ratio=0.1, update_interval=2, layer_axes=[0])
  with pytest.raises(ValueError, match="log_every"):
    epi_tunix.EPIHook(2, log_every=0)
  # Without Tunix the module says how to install it.
  monkeypatch.setitem(sys.modules, "tunix", None)
  monkeypatch.delitem(sys.modules, "tunix.sft", raising=False)
  spec = importlib.util.spec_from_file_location(
      "epi_tunix_without_tunix", ROOT / "epi_jax" / "integrations" / "tunix.py")
  with pytest.raises(ImportError, match="make tunix.*pip install --no-deps google-tunix"):
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_only_the_integration_imports_tunix():
  for path in (ROOT / "epi_jax").rglob("*.py"):
    if path.name == "tunix.py" and path.parent.name == "integrations":
      continue
    assert not re.search(r"^\s*(import|from)\s+tunix\b", path.read_text(), re.M), path
