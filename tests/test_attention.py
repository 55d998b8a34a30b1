"""Every attention implementation available on CPU equals a naive reference.

Packed rows (several segments), right padding and grouped-query heads; the
output and the gradients of q, k and v. ``splash`` runs the Pallas TPU kernel
in interpret mode.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epi_jax.model import attention as attn_lib
from epi_jax.model.attention import attention

B, L, H, K, D = 2, 128, 4, 2, 16


def _reference(q, k, v, seg):
  """Per-head loops over repeated kv heads, a dense boolean mask, float32 softmax."""
  k = jnp.repeat(k, H // K, axis=2)
  v = jnp.repeat(v, H // K, axis=2)
  i = jnp.arange(L)
  mask = (i[None, :] <= i[:, None])[None] & (seg[:, :, None] == seg[:, None, :])
  mask = mask & (seg[:, None, :] != 0)
  outs = []
  for h in range(H):
    s = jnp.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h]) / math.sqrt(D)
    s = jnp.where(mask, s, -1e30)
    outs.append(jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, axis=-1), v[:, :, h]))
  return jnp.stack(outs, axis=2)


@pytest.fixture(scope="module")
def inputs():
  r = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(r[0], (B, L, H, D))
  k = jax.random.normal(r[1], (B, L, K, D))
  v = jax.random.normal(r[2], (B, L, K, D))
  seg = np.zeros((B, L), np.int32)
  seg[0, :40], seg[0, 40:90], seg[0, 90:120] = 1, 2, 3  # packed, then padding
  seg[1, :100] = 1                                       # one example, then padding
  weight = jax.random.normal(r[3], (B, L, H, D)) * (seg != 0)[..., None, None]
  return q, k, v, jnp.asarray(seg), weight


def _loss(fn, seg, weight):
  # Padding rows are weighted 0, as the training loss masks them.
  return lambda q, k, v: jnp.sum(fn(q, k, v) * weight)


@pytest.mark.parametrize("impl", ["einsum", "xla", "splash"])
def test_attention_equals_reference(inputs, impl):
  q, k, v, seg, weight = inputs
  fn = lambda q, k, v: attention(q, k, v, q_segment_ids=seg, implementation=impl)
  ref = lambda q, k, v: _reference(q, k, v, seg)
  real = (seg != 0)[..., None, None]
  np.testing.assert_allclose(np.asarray(fn(q, k, v) * real), np.asarray(ref(q, k, v) * real),
                             rtol=1e-5, atol=2e-6)
  got = jax.grad(_loss(fn, seg, weight), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(_loss(ref, seg, weight), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert float(jnp.max(jnp.abs(g - w))) <= 1e-5 * float(jnp.max(jnp.abs(w))) + 1e-5


def test_decode_with_offset_matches_full(inputs):
  """A cache-style call (queries at slots >= q_offset) equals the full pass's rows."""
  q, k, v, seg, _ = inputs
  full = attention(q, k, v, q_segment_ids=seg, implementation="einsum")
  for impl in ("einsum", "xla", "splash", "cudnn"):  # fused kernels take the xla path
    tail = attention(q[:, 100:], k, v, q_segment_ids=seg[:, 100:], kv_segment_ids=seg,
                     q_offset=jnp.int32(100), implementation=impl)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 100:]), rtol=1e-5,
                               atol=2e-6)


def test_auto_picks_by_backend_and_cudnn_needs_gpu(inputs, capsys):
  assert attn_lib.resolve("auto", "tpu") == "splash"
  assert attn_lib.resolve("auto", "gpu") == "cudnn"
  assert attn_lib.resolve("auto", "cpu") == attn_lib.CPU_DEFAULT
  with pytest.raises(ValueError, match="not one of"):
    attn_lib.resolve("flash")
  q, k, v, seg, _ = inputs
  # Packed rows: cudnn cannot mask segments, falls back to xla with a notice.
  out = attention(q, k, v, q_segment_ids=seg, implementation="cudnn", packed=True)
  assert "using 'xla' for packed rows" in capsys.readouterr().err
  np.testing.assert_allclose(
      np.asarray(out), np.asarray(attention(q, k, v, q_segment_ids=seg, implementation="xla")))
  with pytest.raises(ValueError, match="needs a GPU"):
    attention(q, k, v, q_segment_ids=seg, implementation="cudnn", packed=False)
