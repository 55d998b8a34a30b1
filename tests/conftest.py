"""Test setup, before jax is imported: 8 fake CPU devices for the sharding tests,
and one persistent XLA compilation cache for the whole run."""

import atexit
import os
import shutil
import tempfile

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The xdist workers and the CLI subprocesses the tests start inherit this
# environment, so a program that one of them compiled is loaded by the others
# instead of compiled again (the kill-and-resume tests restart the same run a
# dozen times). Entries are keyed by the optimized program, the flags and the
# versions: the cache changes how long a start takes, never what runs. A fresh
# directory per run, removed by the process that made it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="epi_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)


# ----------------------------------------------------------------------------- tiers

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Seconds per test (setup + call + teardown) from a measured full run of `make test`
# (a loaded 2-core machine: about 1.25x an idle one's). They decide two things:
# - the fast tier: a test over FAST_TEST_BUDGET_S is marked slow here, so `make
#   test-fast` (-m "not slow") stays a per-commit check (target 3 min idle) while
#   `make test` still runs everything; every file keeps its cheapest test in the
#   fast tier, so every module is exercised by it;
# - the order: `make test` hands whole files to the two xdist workers in collection
#   order (--dist loadfile --no-loadscope-reorder), so the most expensive files go
#   first and the cheap ones fill in at the end, instead of one worker starting a
#   long end-to-end file last while the other idles.
# Refresh after adding tests: `make test PYTEST_ARGS=--store-durations`.
DURATIONS = pathlib.Path(__file__).with_name("durations.json")
# At 10 s the fast tier summed 507 s here and took 256 s idle (2 workers); at 4.5 s
# with RUN_FIXTURES below it took 163 s and 167 s of pytest idle (2026-12-07).
FAST_TEST_BUDGET_S = 4.5
# Module fixtures that train a whole run (15-25 s idle each). Their cost lands on
# whichever test of the tier uses them first, not in that test's stored seconds
# (in `make test` an earlier, slow test built them), so the tests that use them
# leave the fast tier: at 4.5 s alone, test-fast took 187 s idle, 78 s of CPU
# of it these runs. Their files keep their other, cheap tests there.
RUN_FIXTURES = frozenset({"sharded_run", "single_run", "trained", "reference_run"})
_RUN_FIXTURE_S = 20.0
_UNKNOWN_FILE_S = 30.0  # a file not measured yet: scheduled like a mid-sized one


def pytest_addoption(parser):
  parser.addoption("--store-durations", action="store_true",
                   help=f"write each test's measured seconds into tests/{DURATIONS.name}")


def _durations() -> dict[str, float]:
  try:
    return json.loads(DURATIONS.read_text())
  except (OSError, ValueError):
    return {}


def _file(item) -> str:
  return item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config, items):
  del config
  per_test = _durations()
  by_file: dict[str, list] = {}
  for item in items:
    by_file.setdefault(_file(item), []).append(item)
  for tests in by_file.values():
    fast_cost = {i.nodeid: per_test.get(i.nodeid, 0.0)
                 + (_RUN_FIXTURE_S if RUN_FIXTURES & set(i.fixturenames) else 0.0)
                 for i in tests}
    costly = [i for i in tests if fast_cost[i.nodeid] > FAST_TEST_BUDGET_S
              and i.get_closest_marker("slow") is None]
    if costly and all(i in costly or i.get_closest_marker("slow") for i in tests):
      costly.remove(min(costly, key=lambda i: fast_cost[i.nodeid]))  # the file's one fast test
    for item in costly:
      item.add_marker(pytest.mark.slow)
  known = {t.split("::")[0] for t in per_test}
  cost = {f: (sum(per_test.get(i.nodeid, 0.0) for i in tests) if f in known
              else _UNKNOWN_FILE_S) for f, tests in by_file.items()}
  # Stable: tests keep their order within a file (module fixtures, readable output).
  items.sort(key=lambda item: -cost[_file(item)])


_MEASURED: dict[str, float] = {}
_NOT_SLOW: set[str] = set()


def pytest_runtest_logreport(report):
  _MEASURED[report.nodeid] = _MEASURED.get(report.nodeid, 0.0) + report.duration
  if "slow" not in report.keywords:
    _NOT_SLOW.add(report.nodeid)


def pytest_terminal_summary(terminalreporter):
  # A module fixture's cost lands on the first test that uses it: a test of the
  # fast tier can exceed the budget when the one before it was marked slow.
  over = sorted(((s, t) for t, s in _MEASURED.items()
                 if t in _NOT_SLOW and s > FAST_TEST_BUDGET_S), reverse=True)
  if over:
    terminalreporter.write_sep("-", f"in the fast tier and over {FAST_TEST_BUDGET_S:.0f} s")
    for s, t in over:
      terminalreporter.write_line(f"{s:7.1f} s  {t}")


def pytest_sessionfinish(session):
  if session.config.getoption("store_durations") and not hasattr(session.config,
                                                                 "workerinput"):
    merged = {**_durations(), **{k: round(v, 1) for k, v in _MEASURED.items()}}
    DURATIONS.write_text(json.dumps(dict(sorted(merged.items())), indent=0) + "\n")
