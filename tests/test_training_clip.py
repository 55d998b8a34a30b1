"""optimizer.clip_scope: clipping by the norm of the trainable (not isolated) gradients."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import epi_jax
from epi_jax.method import compact
from epi_jax.training import config as cfg_lib
from epi_jax.training import optim


def test_clip_by_trainable_norm():
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([100.0])}
  trainable = {"a": jnp.array([True, True]), "b": jnp.array([False])}
  clip = optim.clip_by_trainable_norm(1.0)
  out, _ = clip.update(g, clip.init(g), trainable=trainable)
  # The trainable norm is 5: every entry is scaled by 1/5 (the isolated one too;
  # isolate zeroes it afterwards).
  np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(out["b"], [20.0], rtol=1e-6)
  assert float(optim.trainable_norm(g, trainable)) == pytest.approx(5.0)
  # Without the mask: optax.clip_by_global_norm.
  ref, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
  plain, _ = clip.update(g, clip.init(g))
  for k in g:
    np.testing.assert_allclose(plain[k], ref[k], rtol=1e-6)
  small, _ = clip.update({"a": jnp.array([0.3, 0.4])}, optax.EmptyState(),
                         trainable={"a": jnp.array([True, True])})
  np.testing.assert_allclose(small["a"], [0.3, 0.4])  # under the limit: unchanged


def test_isolate_passes_the_mask_to_the_clip():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
  tx = epi_jax.isolate(optax.chain(optim.clip_by_trainable_norm(1.0), optax.sgd(1.0)), 0.0, 100)
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([100.0])}
  trainable = {"a": jnp.array([True, True]), "b": jnp.array([False])}
  upd, _ = tx.update(g, tx.init(params), params, trainable=trainable)
  np.testing.assert_allclose(upd["a"], [-0.6, -0.8], rtol=1e-6)


def _cfg(**opt):
  c = cfg_lib.default_config()
  c.method = "static"
  for k, v in opt.items():
    c.optimizer[k] = v
  return cfg_lib.validate(c)


def test_clip_scope_config():
  assert _cfg().optimizer.clip_scope == "all"
  assert optim.clips_trainable(_cfg(clip_scope="trainable"))
  assert not optim.clips_trainable(_cfg(clip_scope="trainable", clip_norm=0.0))
  full = _cfg(clip_scope="trainable")
  with full.unlocked():
    full.method = "full"
  assert not optim.clips_trainable(full)  # nothing is isolated in full SFT
  with pytest.raises(ValueError, match="clip_scope"):
    _cfg(clip_scope="frozen")


@pytest.mark.parametrize("packed", [False, True])
def test_isolate_feeds_the_mask_itself(packed):
  """Without ``trainable`` from the caller, isolate hands its inner clip ~mask of its own
  state (packed or not); tests/test_tunix.py checks a refresh step clips by the old mask."""
  params = {"a": jnp.zeros(8)}
  tx = epi_jax.isolate(optax.chain(optim.clip_by_trainable_norm(1.0), optax.sgd(1.0)),
                       0.0, 100, packed_mask=packed)
  state = tx.init(params)
  isolated = jnp.arange(8) == 0
  state = state._replace(epi=state.epi._replace(
      mask={"a": compact.pack(isolated) if packed else isolated}))
  upd, _ = tx.update({"a": jnp.array([100.0, 3.0, 4.0, 0, 0, 0, 0, 0])}, state, params)
  np.testing.assert_allclose(upd["a"], [0.0, -0.6, -0.8, 0, 0, 0, 0, 0], rtol=1e-6)
