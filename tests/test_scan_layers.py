"""``model.scan_layers``: the stacked layout computes what the per-layer list does.

Same logits and KV-cache generation; the same loss and params after 3 train
steps (full and epi, on 1 device and on a mesh of 8 fake devices each);
loading GGUF/safetensors into the stacked layout equals loading then stacking;
checkpoints of one layout are refused by the other with a clear error.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs_loader import load_config
from epi_jax.scoring.evaluate import option_logprobs
from epi_jax.method.inspection import unpacked_mask
from epi_jax.model import Llama, generate, get_config, init_cache
from epi_jax.training import checkpoint as ckpt_lib
from epi_jax.training import config as cfg_lib
from epi_jax.training import metrics as metrics_lib
from epi_jax import sharding
from epi_jax.model import setup as model_setup
from epi_jax.training import trainer
from epi_jax.training import step as step_lib

STEPS = 3
BATCH, SEQ = 8, 64


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _batch(seed=0):
  """Packed rows of 1-3 segments with right padding, positions restarting per segment."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((BATCH, SEQ), np.int32)
  pos = np.zeros((BATCH, SEQ), np.int32)
  for r in range(BATCH):
    cuts = sorted(rng.choice(np.arange(8, SEQ - 4), size=r % 3, replace=False)) + [SEQ - r]
    start = 0
    for s, end in enumerate(cuts, start=1):
      seg[r, start:end] = s
      pos[r, start:end] = np.arange(end - start)
      start = end
  tokens = rng.integers(0, 272, (BATCH, SEQ + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos,
          "segment_ids": seg, "loss_mask": (seg > 0).astype(np.float32) * rng.integers(
              0, 2, (BATCH, SEQ)), "task_ids": np.where(seg > 0, seg % 3, -1).astype(np.int32)}


@pytest.fixture(scope="module")
def models():
  config = get_config("tiny", num_layers=3)
  model = Llama(config, rngs=nnx.Rngs(0))
  params = model_setup.flat_params(model)
  scanned = model_setup.spec_for(dataclasses.replace(config, scan_layers=True)).bind(
      model_setup.stack_layers(params))
  return model, scanned


def test_stacked_params_have_the_layers_axis(models):
  _, scanned = models
  spec = model_setup.spec_for(scanned.config)
  assert spec.shapes["layers/attn/q/kernel"].shape == (3, 64, 64)
  assert spec.axes["layers/attn/q/kernel"] == ("layers", "embed", "heads")
  assert spec.axes["layers/mlp_norm/scale"] == ("layers", "norm")
  axes = sharding.layer_axes(spec.axes)
  assert axes["layers/mlp/down/kernel"] == 0 and axes["embed/embedding"] is None
  assert sharding.layer_axes(model_setup.spec_for(get_config("tiny")).axes) == {
      k: None for k in model_setup.spec_for(get_config("tiny")).axes}
  with pytest.raises(ValueError, match="already in the scan_layers layout"):
    model_setup.stack_layers(model_setup.flat_params(scanned))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_logits_and_grads_equal_unscanned(models, remat):
  model, scanned = models
  b = _batch()
  kw = dict(positions=b["positions"], segment_ids=b["segment_ids"])
  specs = [model_setup.spec_for(dataclasses.replace(m.config, remat=remat))
           for m in (model, scanned)]
  params = [model_setup.flat_params(m) for m in (model, scanned)]
  logits = [jax.jit(lambda p, s=s: s.bind(p)(b["inputs"], **kw))(p)
            for s, p in zip(specs, params)]
  assert _rel(logits[1], logits[0]) <= 1e-5
  grads = [jax.jit(jax.grad(lambda p, s=s: step_lib.loss_sums(s, p, b)[0]))(p)
           for s, p in zip(specs, params)]
  stacked = model_setup.stack_layers(grads[0])
  for k, g in grads[1].items():
    assert _rel(g, stacked[k]) <= 1e-5, k


def test_scanned_option_scoring_equals_unscanned(models):
  # LogiQA's prefix-shared scoring copies the prompt's cache per option: the
  # rows are axis 1 of the stacked cache (a KV cache was once repeated along
  # its layers axis there, and the scan over the blocks failed).
  model, scanned = models
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, 272, n)) for n in (9, 5, 12)]
  options = [[(list(rng.integers(1, 272, m)), [True] * m) for m in (3, 1, 4, 2)]
             for _ in prompts]
  lp, n = option_logprobs(model, prompts, options, batch_size=2, seq_len=64)
  lp_s, n_s = option_logprobs(scanned, prompts, options, batch_size=2, seq_len=64)
  np.testing.assert_allclose(lp_s, lp, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(n_s, n)
  cache = init_cache(scanned.config, 2, 8).repeat_rows(3)
  assert cache.k.shape == (3, 6, 8, 2, 16) and cache.segment_ids.shape == (6, 8)
  assert len(init_cache(model.config, 2, 8).repeat_rows(3).k) == 3


def test_scanned_kv_cache_generation(models):
  model, scanned = models
  prompts = [[5, 6, 7, 8, 9], [40, 41]]
  assert generate(scanned, prompts, max_new_tokens=6) == generate(model, prompts,
                                                                  max_new_tokens=6)
  cache = init_cache(scanned.config, 2, 16)
  assert cache.k.shape == (3, 2, 16, 2, 16)


# ---------------------------------------------------------------------------
# Train steps
# ---------------------------------------------------------------------------


def _config(method, scan, mesh):
  c = load_config("tiny")
  c.method, c.total_steps = method, STEPS
  c.model.scan_layers = scan
  c.data.batch_size, c.data.seq_len = BATCH, SEQ
  c.optimizer.warmup_steps = 1
  c.optimizer.weight_decay = 0.1  # not on stacked norm scales either
  c.epi.update_interval, c.epi.warmup_steps, c.epi.isolation_ratio = 1, 1, 0.1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  return cfg_lib.validate(c)


def _train(method, scan, mesh_shape, params0):
  config = _config(method, scan, mesh_shape)
  mesh = sharding.make_mesh(config.mesh)
  ts = trainer.setup(config, mesh)
  spec = ts.spec
  params = model_setup.stack_layers(params0) if scan else params0
  params = jax.device_put(params, ts.param_shardings)
  state = jax.jit(ts.init, out_shardings=ts.shardings)(params)  # params0 is shared: no donation
  train_step = step_lib.make_train_step(config, spec, ts.method, mesh, ts.shardings)
  losses = []
  for i in range(STEPS):
    b = jax.device_put(_batch(i), sharding.batch_sharding(mesh))
    state, m = train_step(state, b)
    losses.append(float(m["loss"]))
  out = jax.device_get(state.params)
  mask = per_layer = None
  if ts.method.is_epi:
    mask = jax.device_get(unpacked_mask(state.opt_state))
    per_layer = jax.device_get(metrics_lib.per_layer_isolated(
        state.opt_state, sharding.layer_axes(spec.axes)))
  if scan:
    out = model_setup.unstack_layers(out)
    mask = model_setup.unstack_layers(mask) if mask is not None else None
  return losses, out, mask, per_layer


@pytest.fixture(scope="module")
def params0():
  return model_setup.flat_params(Llama(get_config("tiny"), rngs=nnx.Rngs(3)))


# Each 8-device mesh once: EPI on data x fsdp x tensor (every axis the trainer shards
# by; the stacked ``layers`` axis is never sharded: training/sharding.py), full SFT
# on fsdp=4 x tensor. (EPI's masks of stacked leaves on more layouts:
# tests/test_method_sharding.py.)
@pytest.mark.slow
@pytest.mark.parametrize("method, mesh_shape", [
    ("full", (1, 1, 1)), ("full", (1, 4, 2)),
    ("epi", (1, 1, 1)), ("epi", (2, 2, 2))])
def test_scanned_training_equals_unscanned(params0, method, mesh_shape):
  if np.prod(mesh_shape) > jax.device_count():
    pytest.fail(f"needs {np.prod(mesh_shape)} devices (tests/conftest.py sets 8 fake ones)")
  ref_losses, ref_params, ref_mask, ref_per_layer = _train(method, False, mesh_shape, params0)
  losses, params, mask, per_layer = _train(method, True, mesh_shape, params0)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert ref_losses[-1] != ref_losses[0]
  for k, v in ref_params.items():
    np.testing.assert_allclose(params[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
  if method == "epi":
    assert sum(int(m.sum()) for m in ref_mask.values()) > 0
    for k, m in ref_mask.items():
      np.testing.assert_array_equal(mask[k], m, err_msg=k)
    # refreshes.jsonl's per-layer fractions: named layers/<i>/x in both layouts.
    assert set(per_layer) == set(ref_per_layer)
    for k, v in ref_per_layer.items():
      np.testing.assert_allclose(per_layer[k], v, err_msg=k)


# ---------------------------------------------------------------------------
# Checkpoints of the other layout
# ---------------------------------------------------------------------------


def test_checkpoint_of_the_other_layout_is_refused(tmp_path, params0):
  ckpt = ckpt_lib.Checkpointer(tmp_path, 2, async_save=False)
  state = step_lib.TrainState(step=jnp.int32(1), params=params0, opt_state=(jnp.ones(3),))
  ckpt.save(1, state, {"step": 1})
  ckpt.wait()
  stacked = state._replace(params=model_setup.stack_layers(params0))
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), stacked)
  with pytest.raises(ValueError, match=r"scan_layers=False .* this model has scan_layers=True"):
    ckpt.restore_latest(target)
  assert ckpt.all_steps() == [1]  # refused, not quarantined
  same = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  restored, _, step = ckpt.restore_latest(same)
  assert step == 1 and set(restored.params) == set(params0)
  ckpt.close()


def test_scanned_model_exports_like_unscanned(models, tmp_path):
  from epi_jax.model.export import export_hf  # pylint: disable=g-import-not-at-top
  from epi_jax.model.loading import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
  model, scanned = models
  export_hf(model, tmp_path / "plain")
  export_hf(scanned, tmp_path / "scanned")
  a, _, _ = load_hf_checkpoint(tmp_path / "plain")
  b, _, _ = load_hf_checkpoint(tmp_path / "scanned")
  pa, pb = model_setup.flat_params(a), model_setup.flat_params(b)
  assert pa.keys() == pb.keys()
  for k, v in pa.items():
    np.testing.assert_array_equal(np.asarray(pb[k]), np.asarray(v), err_msg=k)
