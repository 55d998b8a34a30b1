"""The trainer's jitted step against a plain reference step (issue 13).

The reference is the textbook step: ``jax.value_and_grad`` of the mean
cross-entropy of ``spec.bind(params)`` over every position, then the same
optax transformation, unsharded, not donated. The trainer's step (sharding
constraints, donation, per-task sums, finite checks, metrics) must give the
same losses to fp32 tolerance, and an EPI step that has not isolated anything
yet the same as full AdamW: whatever is changed for speed must not change results.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from epi_jax.method import unpacked_mask
from epi_jax.training import config as cfg_lib
from epi_jax import sharding
from epi_jax.model import setup as model_setup
from epi_jax.training import optim, trainer
from epi_jax.training import step as step_lib

STEPS = 3


def _config(model: str, method: str, batch: int, seq: int, scan: bool = False, **epi):
  c = cfg_lib.default_config()
  c.method, c.model.name, c.model.init = method, model, "random"
  c.model.scan_layers = scan
  c.data.batch_size, c.data.seq_len = batch, seq
  c.mesh.data = 1
  c.total_steps, c.optimizer.warmup_steps = 100, 1
  c.optimizer.learning_rate = 1e-3
  c.epi.update_interval = 100  # no refresh within STEPS: nothing isolated yet
  c.epi.update(epi)
  return cfg_lib.validate(c)


def _batch(vocab: int, batch: int, seq: int):
  ids = np.random.default_rng(0).integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
          "segment_ids": np.ones((batch, seq), np.int32),
          "loss_mask": np.ones((batch, seq), np.int32),
          "task_ids": np.zeros((batch, seq), np.int32)}


def trainer_losses(config, batch):
  mesh = sharding.make_mesh(config.mesh)
  spec, params, _ = model_setup.build(config.model, config.seed, mesh)
  ts = trainer.setup(config, mesh, spec)
  state = ts.init_state(params)
  step = step_lib.make_train_step(config, spec, ts.method, mesh, ts.shardings)
  gb = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, sharding.batch_sharding(mesh))
  out = []
  for _ in range(STEPS):
    state, m = step(state, gb)
    out.append(float(m["loss"]))
  return out


def reference_losses(config, batch):
  spec, params, _ = model_setup.build(config.model, config.seed)
  tx = trainer.setup(config, sharding.make_mesh(config.mesh), spec).tx

  def loss_fn(p):
    logits = spec.bind(p)(jnp.asarray(batch["inputs"]), positions=jnp.asarray(batch["positions"]),
                          segment_ids=jnp.asarray(batch["segment_ids"]), packed=True)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.asarray(batch["targets"])).mean()

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  opt_state, out = tx.init(params), []
  for _ in range(STEPS):
    params, opt_state, loss = step(params, opt_state)
    out.append(float(loss))
  return out


# SmolLM2's shapes with the blocks scanned (the layout of `make demo`): its
# unscanned EPI step alone took 94 s to compile at 2 x 128 (BENCHMARKS.md),
# and test_scan_layers checks that both layouts train alike.
@pytest.mark.parametrize("model, batch, seq, scan", [
    ("tiny", 2, 32, False),
    pytest.param("smollm2-135m", 1, 32, True, marks=pytest.mark.slow),
])
def test_trainer_step_equals_reference_and_epi_equals_full(model, batch, seq, scan):
  data = _batch(model_setup.model_config(_config(model, "full", batch, seq).model).vocab_size,
                batch, seq)
  full = trainer_losses(_config(model, "full", batch, seq, scan), data)
  ref = reference_losses(_config(model, "full", batch, seq, scan), data)
  epi = trainer_losses(_config(model, "epi", batch, seq, scan), data)
  np.testing.assert_allclose(full, ref, rtol=1e-5)
  np.testing.assert_allclose(epi, full, rtol=1e-5)
  assert full[-1] < full[0]  # the steps train


@pytest.mark.parametrize("lowering", ["cpu", "default"])
def test_trainable_grad_norm_is_over_the_entries_left_trainable(lowering, monkeypatch):
  """A program compiled for CPU reads the new mask: at a refresh step
  ``trainable_grad_norm`` is the gradient norm over the entries left out of it
  (the ones this update moved). Elsewhere it reads the mask in force before the
  step (the trainable clip's; no pass of its own): run here by making
  ``lax.platform_dependent`` take its default branch."""
  if lowering == "default":
    monkeypatch.setattr(jax.lax, "platform_dependent",
                        lambda *args, default, **_: default(*args))
  config = _config("tiny", "epi", 2, 32, update_interval=1, warmup_steps=1, isolation_ratio=0.5)
  mesh = sharding.make_mesh(config.mesh)
  spec, params, _ = model_setup.build(config.model, config.seed, mesh)
  ts = trainer.setup(config, mesh, spec)
  data = _batch(spec.config.vocab_size, 2, 32)
  gb = jax.device_put({k: jnp.asarray(v) for k, v in data.items()}, sharding.batch_sharding(mesh))
  denom = jnp.sum(gb["loss_mask"].astype(jnp.float32))
  grads = jax.block_until_ready(
      jax.grad(lambda p: step_lib.loss_sums(spec, p, gb)[0] / denom)(params))
  step = step_lib.make_train_step(config, spec, ts.method, mesh, ts.shardings)
  state, m = step(ts.init_state(params), gb)  # the first step refreshes
  assert float(m["isolated_fraction"]) > 0.4
  trained = jax.tree.map(jnp.logical_not, unpacked_mask(state.opt_state))
  after = float(optim.trainable_norm(grads, trained))
  assert after < 0.9 * float(m["grad_norm"])
  # Before the first refresh nothing was isolated: every entry counts.
  expected = after if lowering == "cpu" else float(optim.trainable_norm(
      grads, jax.tree.map(lambda g: jnp.ones(g.shape, bool), grads)))
  np.testing.assert_allclose(float(m["trainable_grad_norm"]), expected, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_fsdp_step_gathers_weights_not_activations(scan):
  """On 8 devices with FSDP the compiled step moves weights, not activations: no
  collective returns a ``[batch, seq, ...]`` array. Left to propagation, XLA kept
  the weights sharded and gathered the activations (every device ran every row
  on a slice of each contraction, then all-reduced), as the plan for 8 H100s
  showed at Qwen2-7B; the model's activation constraints prevent it."""
  import re  # pylint: disable=g-import-not-at-top
  from epi_jax.training import plan  # pylint: disable=g-import-not-at-top
  batch, seq = 32, 128
  config = _config("tiny", "full", batch, seq, scan)
  config.mesh.fsdp, config.model.attention = -1, "xla"
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.shape["fsdp"] == 8
  ts = trainer.setup(config, mesh)
  step = step_lib.make_train_step(config, ts.spec, ts.method, mesh, ts.shardings)
  hlo = step.lower(ts.target, plan.abstract_batch(config, mesh)).compile().as_text()
  moved = [m.group(1) for m in re.finditer(
      r"= (.*?) (?:all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(", hlo)]
  assert moved, "no collective at all: the step is not sharded"
  activations = [t for t in moved if re.search(rf"\[{batch},{seq}[,\]]", t)]
  assert not activations, activations[:3]
