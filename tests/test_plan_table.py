"""benchmarks/plan_table.py: finished cells are read, not recompiled; EPI's extras against full."""

import json
import pathlib
import runpy

REPO = pathlib.Path(__file__).resolve().parents[1]
TABLE = runpy.run_path(str(REPO / "benchmarks" / "plan_table.py"))


def _record(method, total, epi=0.0, bytes_=1e11, fits=True, plain=None, refresh=None, floor=0):
  return {"method_name": method, "fits": fits, "bytes_per_step": bytes_, "est_step_s": 0.5,
          "bytes_per_plain_step": plain or bytes_, "bytes_per_refresh_step": refresh or bytes_,
          "bytes_epi_floor": floor,
          "est_mfu": 0.4, "compile_s": 100.0, "collectives": {"all-reduce": 3, "all-gather": 0},
          "epi_update": {"temp_gib": 0.01} if epi else None,
          "hbm_gib": {"total": total, "capacity": 95, "epi": epi, "temp": 10.0}}


def test_finished_cells_are_tabulated_without_compiling(tmp_path):
  cell = tmp_path / "llama-3-8b_2048_v5p-8.json"
  cell.write_text(json.dumps([_record("full", 37.2), _record("epi", 48.5, epi=11.2, bytes_=1.06e11, plain=1.05e11,
                                                      refresh=2.05e11, floor=4e9),
                              _record("epi_compact", 99.0, epi=4.2, fits=False)]))
  # A cell that is not finished would start `epi-jax plan`: none is asked for here.
  assert TABLE["main"](["--out", str(tmp_path), "--models", "llama-3-8b", "--seq_lens", "2048",
                        "--topologies", "v5p-8"]) == 0
  rows = (tmp_path / "plan_table.md").read_text().splitlines()
  assert len(rows) == 5
  assert rows[2].startswith("| llama-3-8b | 2048 | v5p-8 | full | 37.2 / 95 | yes |")
  assert "| +11.30 |" in rows[3] and "| 1.05x / 2.05x / 1.06x | 1.04x |" in rows[3] and "all-reduce 3" in rows[3]
  assert "all-gather" not in rows[3]  # zero counts are left out
  assert "| **no** |" in rows[4]


def test_a_plan_from_before_the_split_says_both_branches():
  full, epi = _record("full", 37.2), _record("epi", 48.5, epi=11.2, bytes_=1.2e11)
  del epi["bytes_per_plain_step"], epi["bytes_per_refresh_step"]
  row = TABLE["table"]({"llama-3-8b_2048_v5p-8": [full, epi]}).splitlines()[3]
  assert "| 1.20x (both branches) | – |" in row
