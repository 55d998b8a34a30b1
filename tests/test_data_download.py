"""Raw-file downloads (TFDS download manager, pinned sha256) against http.server on 127.0.0.1."""

import functools
import hashlib
import http.server
import pathlib
import shutil
import threading

import pytest

from epi_jax import data as epi_data
from epi_jax.data import cli, download, tasks
from epi_jax.utils import assets

RAW = assets.default_raw_data_dir()
pytestmark = pytest.mark.skipif(RAW is None, reason="raw task data not found "
                                "(set $EPI_RAW_DATA_DIR or put it at ../shared/data)")
TASKS = ("gsm8k", "logiqa")  # four files; builds in seconds


class _Server:
  """Serves ``root`` on 127.0.0.1 and records the request paths."""

  def __init__(self, root):
    self.requests = []
    log = self.requests

    class Handler(http.server.SimpleHTTPRequestHandler):
      def log_message(self, *args):
        log.append(self.path)

    self.httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """good/: a copy of the shared raw files; bad/: alpaca's file corrupted (same size)."""
  root = tmp_path_factory.mktemp("served")
  for rel in download.RAW_FILE_PINS:
    for sub in ("good", "bad"):
      (root / sub / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copyfile(RAW / rel, root / sub / rel)
  bad = root / "bad" / "alpaca/alpaca_5000.json"
  data = bytearray(bad.read_bytes())
  data[100] ^= 0x01
  bad.write_bytes(bytes(data))
  srv = _Server(root)
  yield srv
  srv.close()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
  """An empty raw dir and data dir: nothing local, so prepare must download."""
  empty = tmp_path / "no_raw"
  empty.mkdir()
  monkeypatch.setenv("EPI_RAW_DATA_DIR", str(empty))
  monkeypatch.setenv("EPI_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.delenv(download.MIRROR_ENV, raising=False)
  return empty, tmp_path / "tfds"


def test_pins_cover_and_match_the_shared_raw_files():
  assert set(download.RAW_FILE_PINS) == {r for rels in tasks.RAW_FILES.values() for r in rels}
  for rel, (url, size, sha) in download.RAW_FILE_PINS.items():
    data = (RAW / rel).read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (size, sha), rel
    assert url.startswith("https://") and url.endswith(pathlib.Path(rel).name)
  assert download.url_of("gsm8k/train.jsonl", "http://m/x/") == "http://m/x/gsm8k/train.jsonl"


def test_prepare_downloads_then_uses_the_cache(server, isolated, tmp_path, monkeypatch):
  _, data_dir = isolated
  start = len(server.requests)
  assert cli.prepare_main(["--data_dir", str(data_dir), "--tasks", ",".join(TASKS),
                           "--mirror", f"{server.url}/good"]) == 0
  got = sorted(server.requests[start:])
  assert got == sorted(f"/good/{r}" for t in TASKS for r in tasks.RAW_FILES[t])
  # The same datasets as from the manual dir.
  manual_dir = tmp_path / "from_manual"
  epi_data.prepare(raw_dir=RAW, data_dir=manual_dir, tasks=TASKS)
  for task in TASKS:
    for split in epi_data.SPLITS:
      assert (list(epi_data.load_examples(task, split, data_dir))
              == list(epi_data.load_examples(task, split, manual_dir))), (task, split)
  # Again, mirror from the environment: nothing downloaded, nothing built.
  monkeypatch.setenv(download.MIRROR_ENV, f"{server.url}/good")
  n = len(server.requests)
  again = epi_data.prepare(data_dir=data_dir, tasks=TASKS)
  assert not any(s["built"] for s in again.values()) and len(server.requests) == n
  # Datasets deleted: rebuilt from the TFDS download cache, still no request.
  shutil.rmtree(data_dir / epi_data.DATASET_NAME)
  rebuilt = epi_data.prepare(data_dir=data_dir, tasks=TASKS)
  assert all(s["built"] for s in rebuilt.values()) and len(server.requests) == n


def test_corrupted_file_is_a_checksum_error_and_nothing_is_built(server, isolated):
  _, data_dir = isolated
  with pytest.raises(download.DownloadError, match=r"'alpaca/alpaca_5000.json' failed its "
                     r"size/sha256 check") as err:
    epi_data.prepare(data_dir=data_dir, tasks=["gsm8k", "alpaca"], mirror=f"{server.url}/bad")
  assert "Nothing was built" in str(err.value)
  for task in ("gsm8k", "alpaca"):
    assert not epi_data.get_builder(task, data_dir).is_prepared()
  assert not list((data_dir / "downloads").glob("*.tmp.*"))  # no partial file kept
  # The good mirror then works: the corrupt file was never cached.
  stats = epi_data.prepare(data_dir=data_dir, tasks=["alpaca"], mirror=f"{server.url}/good")
  assert stats["alpaca"]["built"] and stats["alpaca"]["train"] == 4733


def test_404_is_a_clear_error(server, isolated, capsys):
  _, data_dir = isolated
  assert cli.prepare_main(["--data_dir", str(data_dir), "--tasks", "gsm8k",
                           "--mirror", f"{server.url}/nowhere"]) == 2
  err = capsys.readouterr().err
  assert "'gsm8k/train.jsonl' could not be downloaded" in err and "404" in err
  assert f"{server.url}/nowhere/gsm8k/train.jsonl" in err
  assert not epi_data.get_builder("gsm8k", data_dir).is_prepared()


def test_training_prepares_on_demand_from_config_mirror(server, isolated):
  from configs_loader import load_config
  from epi_jax.training import config as cfg_lib
  from epi_jax.training import inputs
  _, data_dir = isolated
  c = load_config("tiny")
  c.method = "epi"
  c.data.mixture = {"gsm8k": 1.0}
  c.data.allow_standin = False
  c.data.mirror = f"{server.url}/good"
  c.data.data_dir = str(data_dir)
  out = inputs.ensure_data(cfg_lib.validate(c))
  assert out == {"data_dir": str(data_dir)}
  assert epi_data.get_builder("gsm8k", data_dir).is_prepared()
  c.data.mirror = "not a url"
  with pytest.raises(ValueError, match="data.mirror"):
    cfg_lib.validate(c)
