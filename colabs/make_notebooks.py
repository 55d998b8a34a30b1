"""Writes the colab notebooks from their cell sources (outputs stripped).

Run `python colabs/make_notebooks.py` after editing a notebook's cells here; the
.ipynb files are committed so that Colab can open them directly.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
REPO = "epi-jax/epi_jax"  # GitHub org/name the badges and the install cell point to.


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


def main():
  import importlib
  for make in [quickstart] + [getattr(importlib.import_module(m), "cells")
                              for m in []]:
    name, cells = make()
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "accelerator": "TPU", "colab": {"provenance": []}})
    nbformat.write(nb, HERE / name)
    print("wrote", name)


if __name__ == "__main__":
  main()
