"""Drift metrics on constructed masks, and the drift plots and table."""

import json

import numpy as np
import pytest

from epi_jax.experiments import plots
from epi_jax.experiments import report
from epi_jax.scoring import drift


def test_jaccard_on_constructed_masks():
  a = np.array([1, 1, 0, 0, 1], bool)
  b = np.array([1, 0, 1, 0, 1], bool)
  assert drift.jaccard(a, b) == pytest.approx(2 / 4)
  assert drift.jaccard(a, a) == 1.0
  assert drift.jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0  # both empty
  assert drift.jaccard(a, ~a) == 0.0
  assert drift.num_flipped(a, b) == 2
  # Pytrees: counts pool over leaves (not a mean of per-leaf Jaccards).
  ta = {"x": np.array([1, 1, 1, 1], bool), "y": np.array([1, 0], bool)}
  tb = {"x": np.array([1, 1, 1, 1], bool), "y": np.array([0, 1], bool)}
  assert drift.jaccard(ta, tb) == pytest.approx(4 / 6)
  with pytest.raises(ValueError, match="same structure"):
    drift.jaccard(a, np.zeros(4, bool))


def test_jaccard_curves_and_layer_metrics():
  m0 = {"l0": np.array([1, 1, 0, 0], bool), "l1": np.array([0, 0, 0, 0], bool)}
  m1 = {"l0": np.array([1, 0, 0, 0], bool), "l1": np.array([1, 0, 0, 0], bool)}
  m2 = {"l0": np.array([0, 0, 0, 0], bool), "l1": np.array([1, 1, 0, 0], bool)}
  curves = drift.jaccard_curves([m0, m1, m2])
  assert curves["jaccard_first"] == pytest.approx([1.0, 1 / 3, 0.0])
  assert curves["jaccard_prev"] == pytest.approx([1.0, 1 / 3, 1 / 3])
  f0, f2 = drift.layer_fractions(m0), drift.layer_fractions(m2)
  assert f0 == {"l0": 0.5, "l1": 0.0}
  assert drift.layer_shares(f0) == {"l0": 1.0, "l1": 0.0}
  # All isolated entries moved from l0 to l1, half of them by m1.
  assert drift.migration(f0, f2) == pytest.approx(1.0)
  assert drift.migration(f0, drift.layer_fractions(m1)) == pytest.approx(0.5)
  assert drift.migration(f0, f0) == 0.0
  # Sizes turn fractions into counts: l1 four times larger.
  assert drift.layer_shares({"a": 0.5, "b": 0.5}, {"a": 1, "b": 4}) == pytest.approx(
      {"a": 0.2, "b": 0.8})


def test_block_grouping():
  assert drift.block_of("layers/3/attn/q/kernel") == "block 03"
  assert drift.block_of("layers.12.mlp.up.kernel") == "block 12"
  assert drift.block_of("embed/embedding") == "embed"


def _refreshes(tmp_path):
  rows = []
  for i, step in enumerate([10, 20, 30]):
    rows.append({"step": step, "num_refreshes": i + 1, "isolated_fraction": 0.01,
                 "num_flipped": 5 * i, "jaccard_prev": 1.0 if i == 0 else 0.7,
                 "jaccard_first": 1.0 - 0.2 * i,
                 "per_layer": {"layers/0/mlp/up/kernel": 0.02 - 0.005 * i,
                               "layers/1/mlp/up/kernel": 0.005 * i,
                               "embed/embedding": 0.01}})
  path = tmp_path / "refreshes.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in reversed(rows)) + "\n")
  return rows


def test_summary_matrix_and_plots(tmp_path):
  _refreshes(tmp_path)
  refreshes = drift.load_refreshes(tmp_path)
  assert [r["step"] for r in refreshes] == [10, 20, 30]  # sorted
  summary = drift.drift_summary(refreshes)
  assert summary["jaccard_first"] == [1.0, 0.8, 0.6]
  assert summary["final_jaccard_first"] == pytest.approx(0.6)
  assert summary["migration"][0] is None and summary["migration"][2] > 0
  rows, steps, mat = drift.layer_matrix(refreshes)
  assert rows == ["block 00", "block 01", "embed"] and steps == [10, 20, 30]
  np.testing.assert_allclose(mat[0], [0.02, 0.015, 0.01])
  assert plots.plot_drift({"epi": summary}, tmp_path / "p" / "drift.png").stat().st_size > 1000
  assert plots.plot_layer_heatmap(refreshes, tmp_path / "p" / "heat.png").is_file()
  methods = {m: {"normalized": {"gsm8k": {"mean": v, "std": 1.0},
                                "average": {"mean": v, "std": 0.5}}}
             for m, v in (("full", 98.0), ("epi", 104.0))}
  assert plots.plot_task_metrics(methods, tmp_path / "p" / "tasks.png").is_file()
  assert plots.plot_drift({}, tmp_path / "none.png") is None
  assert drift.load_refreshes(tmp_path / "missing") == []


def test_bad_jsonl_names_file(tmp_path):
  (tmp_path / "refreshes.jsonl").write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match="refreshes.jsonl:2"):
    drift.load_refreshes(tmp_path)


def _snapshots():
  """Importance of 20 entries at 4 checkpoints: the top 5 drift from 0..4 to 15..19."""
  snaps = []
  for shift in (0, 1, 3, 15):
    imp = np.arange(20, dtype=float)[::-1].copy()  # entry i scores 19 - i
    imp = np.roll(imp, shift)  # the top block moves right by `shift`
    snaps.append({"a": imp[:10], "b": imp[10:]})
  return snaps


def test_top_p_importance_jaccard_on_constructed_snapshots():
  snaps = _snapshots()
  top = drift.top_set(snaps[0], 0.25)
  assert np.flatnonzero(np.concatenate([top["a"], top["b"]])).tolist() == [0, 1, 2, 3, 4]
  curves = drift.top_set_curves(snaps, 0.25)
  # Sets {0..4}, {1..5}, {3..7}, {15..19}.
  assert curves["jaccard_first"] == pytest.approx([1.0, 4 / 6, 2 / 8, 0.0])
  assert curves["jaccard_prev"] == pytest.approx([1.0, 4 / 6, 3 / 7, 0.0])
  assert not drift.top_set(snaps[0], 0.0)["a"].any()


def test_trainer_tracker_matches_the_numpy_top_sets():
  """The trainer's on-device tracker (EPI's selection rule) on constructed importance."""
  import jax.numpy as jnp
  import optax

  import epi_jax
  from epi_jax.training import config as cfg_lib
  from epi_jax.training import importance_drift, optim
  cfg = cfg_lib.default_config()
  cfg.method = "full"
  cfg.epi.isolation_ratio, cfg.epi.update_interval = 0.25, 2
  cfg.epi.normalization, cfg.epi.exclude, cfg.epi.track_importance = "none", (), True
  assert optim.method(cfg).records_drift
  params = {"a": jnp.zeros(10), "b": jnp.zeros(10)}
  tx = epi_jax.isolate(optax.sgd(0.1), 0.25, 2, mode="none")
  state = tx.init(params)
  tracker = importance_drift.ImportanceDrift(optim.method(cfg))
  assert [s for s in range(1, 9) if tracker.due(s)] == [2, 4, 6, 8]
  recs = []
  for step, snap in zip((2, 4, 6, 8), _snapshots()):
    imp = {k: jnp.asarray(v, jnp.float32) for k, v in snap.items()}
    st = state._replace(epi=state.epi._replace(importance=imp))
    recs.append(tracker.record(step, st))
  expected = drift.top_set_curves(_snapshots(), 0.25)
  assert [r["jaccard_first"] for r in recs] == pytest.approx(expected["jaccard_first"])
  assert [r["jaccard_prev"] for r in recs] == pytest.approx(expected["jaccard_prev"])
  assert recs[0]["top_fraction"] == pytest.approx(0.25)
  assert recs[-1]["per_layer"] == {"a": 0.0, "b": 0.5}
  # A resumed tracker does not know the first set.
  resumed = importance_drift.ImportanceDrift(optim.method(cfg), resumed=True)
  st = state._replace(epi=state.epi._replace(importance={k: jnp.asarray(v, jnp.float32)
                                                         for k, v in _snapshots()[0].items()}))
  r1, r2 = resumed.record(10, st), resumed.record(12, st)
  assert r1["jaccard_prev"] is None and r1["jaccard_first"] is None
  assert r2["jaccard_prev"] == 1.0 and r2["jaccard_first"] is None


def test_epi_tracker_reads_its_mask_as_the_top_set():
  """EPI's tracker takes the refreshed mask as the top-p set; it is the set a
  selection over the importance picks (the records are the same)."""
  import jax
  import jax.numpy as jnp

  from epi_jax.training import config as cfg_lib
  from epi_jax.training import importance_drift, optim
  cfg = cfg_lib.default_config()
  cfg.method = "epi"
  cfg.epi.isolation_ratio, cfg.epi.update_interval, cfg.epi.track_importance = 0.25, 2, True
  cfg.epi.exclude = ()
  params = {"a": jnp.zeros((4, 6)), "b": jnp.zeros(10)}
  tx = optim.make_optimizer(cfg)
  state = tx.init(params)
  reads = importance_drift.ImportanceDrift(optim.method(cfg))
  selects = importance_drift.ImportanceDrift(optim.method(cfg))
  selects._select = jax.jit(importance_drift.top_set_fn(optim.method(cfg)))
  assert reads.reads_mask
  rng = np.random.default_rng(0)
  got, want = [], []
  for step in range(1, 9):
    grads = {k: jnp.asarray(rng.normal(size=v.shape) * (1 + step % 3), jnp.float32)
             for k, v in params.items()}
    _, state = tx.update(grads, state, params)
    if reads.due(step):
      got.append(reads.record(step, state))
      want.append(selects.record(step, state))
  assert len(got) == 4 and got == want
  assert got[-1]["jaccard_first"] < 1.0  # the set moved: the comparison is not vacuous


def test_tracker_counts_a_stacked_leaf_per_layer_named_as_unscanned():
  """scan_layers: a stacked leaf's layers get their own per-layer entries,
  named like the unscanned layout's (``layers/<i>/...``), so reports match."""
  import jax.numpy as jnp
  import optax

  import epi_jax

  from epi_jax.training import config as cfg_lib
  from epi_jax.training import importance_drift, optim
  cfg = cfg_lib.default_config()
  cfg.method = "full"
  cfg.epi.isolation_ratio, cfg.epi.update_interval = 0.25, 2
  cfg.epi.normalization, cfg.epi.exclude, cfg.epi.track_importance = "none", (), True
  tx = epi_jax.isolate(optax.sgd(0.1), 0.25, 2, mode="none")
  params = {"layers/mlp/w": jnp.zeros((2, 5)), "head": jnp.zeros(10)}
  state = tx.init(params)
  imp = {"layers/mlp/w": jnp.asarray([[1.0] * 5, [9.0, 8.0, 7.0, 6.0, 5.0]]),
         "head": jnp.arange(10, dtype=jnp.float32) / 10}
  tracker = importance_drift.ImportanceDrift(
      optim.method(cfg, {"layers/mlp/w": 0, "head": None}))
  rec = tracker.record(2, state._replace(epi=state.epi._replace(importance=imp)))
  assert rec["per_layer"] == {"head": 0.0, "layers/0/mlp/w": 0.0, "layers/1/mlp/w": 1.0}
  assert rec["top_fraction"] == pytest.approx(0.25) and rec["jaccard_first"] == 1.0
  assert drift.block_of("layers/1/mlp/w") == "block 01"


def test_static_mask_curve_is_left_out_and_importance_table(tmp_path):
  static = drift.drift_summary([{"step": 5, "jaccard_prev": 1.0, "jaccard_first": -1.0,
                                 "per_layer": {"x": 0.1}}])
  assert static["jaccard_first"] == [None]  # -1 means "not tracked", not a Jaccard of 0
  assert not drift.meaningful(static)
  assert plots.plot_drift({"static": static}, tmp_path / "d.png") is None
  recs = [{"step": s, "jaccard_first": jf, "jaccard_prev": jp, "per_layer": {"x": f, "y": 0.1}}
          for s, jf, jp, f in ((5, 1.0, 1.0, 0.1), (10, 0.7, 0.7, 0.2), (15, 0.5, 0.8, 0.3))]
  summary = drift.drift_summary(recs)
  assert drift.meaningful(summary) and summary["final_jaccard_first"] == 0.5
  md = report.importance_drift_markdown({"full": summary, "static": summary})
  assert "| 15 | 0.500 | 0.800 |" in md and "full vs first" in md
  assert plots.plot_drift({"full": summary, "static": static}, tmp_path / "i.png",
                          what="top-p importance set").is_file()


def test_saved_top_sets_round_trip_and_their_jaccard(tmp_path):
  """epi.save_top_sets' files: bit-packed sets whose Jaccard is the masks' own."""
  from epi_jax.training import importance_drift as sets
  rng = np.random.default_rng(0)
  a = {"x": rng.random((3, 5)) < 0.3, "y": rng.random(11) < 0.5}  # 26 bits: padded
  b = {"x": rng.random((3, 5)) < 0.3, "y": rng.random(11) < 0.5}
  for run, mask in (("a", a), ("b", b)):
    path = sets.top_set_path(tmp_path / run, 4)
    path.parent.mkdir(parents=True)
    np.save(path, np.asarray(sets.packed_set(mask)))
  pa, pb = sets.load_top_set(tmp_path / "a", 4), sets.load_top_set(tmp_path / "b", 4)
  assert pa.dtype == np.uint8 and pa.size == 4
  assert sets.packed_jaccard(pa, pb) == pytest.approx(drift.jaccard(a, b))
  assert sets.packed_jaccard(pa, pa) == 1.0
  assert sets.load_top_set(tmp_path / "a", 8) is None
  assert report.jaccards_vs(tmp_path / "a", tmp_path / "b", [4, 8]) == [
      pytest.approx(drift.jaccard(a, b)), None]
  with pytest.raises(ValueError, match="packed sets of different sizes"):
    sets.packed_jaccard(pa, pa[:2])


def test_lock_in_plot_leaves_out_runs_without_refreshes(tmp_path):
  epi = {"step": [10, 20, 30], "release_fraction": [None, 0.3, 0.25],
         "importance_ratio": [None, 80.0, 70.0], "jaccard_vs_full": [1.0, 0.9, None]}
  static = {"step": [60], "release_fraction": [None], "importance_ratio": [None],
            "jaccard_vs_full": [None]}
  assert plots.plot_lock_in({"static": static}, tmp_path / "none.png") is None
  assert not (tmp_path / "none.png").exists()
  path = plots.plot_lock_in({"epi": epi, "static": static}, tmp_path / "p" / "lock_in.png")
  assert path.stat().st_size > 1000
