"""`kvc compress --engine ray` on a local Ray cluster of 2 CPUs (one per test module), with the embedded model: a
folder of small documents with a corrupt one among them, a worker killed mid-run (the job finishes and the
manifest is complete), a rerun that skips everything done, and files equal to the single-document command's.
CI installs Ray (the `ray` extra); there these tests never skip."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvc_format import KvcReader

from fixtures import DOCS
from kvc_compare import assert_same_cache

pytestmark = pytest.mark.slow
# Pruned with the value refit (its least squares rounds differently with another thread count), quantized and
# entropy-coded, with the cheapest scorer: the machinery, not the model, is under test.
SETTINGS = ("--ratio", "0.5", "--scorer", "knorm", "--bits", "4", "--no-estimate")  # the engine is under test
DOCUMENTS = {"apache": "apache-2.0.txt", "gpl": "gpl-3.txt", "mpl": "mpl-2.0.txt", "lgpl": "lgpl-2.1.txt"}


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray cluster of 2 CPUs; its address, for `--address`."""
    try:
        import ray
    except ImportError:
        message = "Ray missing: pip install -e '.[ray]' (make setup installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Four documents of a few hundred tokens and a corrupt one (NUL bytes: binary)."""
    folder = tmp_path_factory.mktemp("ray-docs")
    for name, source in DOCUMENTS.items():
        (folder / f"{name}.txt").write_text(DOCS.joinpath(source).read_text()[:1200])
    (folder / "corrupt.txt").write_bytes(b"PK\x03\x04\x00\x00 not a text file")
    return folder


def kvc(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvzip_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, **kwargs)


def map_workers() -> list[int]:
    """Process ids of the Ray Data actors (their process title is `ray::MapWorker(...)`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ray::MapWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def kill_a_worker_mid_run(manifest: Path, total: int, killed: list, stop: threading.Event) -> None:
    """Once the first document is in the manifest and while others are not, SIGKILL one actor process."""
    while not stop.is_set():
        rows = len(manifest.read_text().splitlines()) if manifest.exists() else 0
        if rows >= total:
            return
        workers = map_workers() if rows >= 1 else []
        if workers:
            os.kill(workers[0], signal.SIGKILL)
            killed.append((workers[0], rows))
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def first_run(cluster, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-out")
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_a_worker_mid_run, args=(out / "manifest.jsonl", 5, killed, stop))
    killer.start()
    try:
        result = kvc("compress", corpus, "-o", out, *SETTINGS, "--engine", "ray", "--address", cluster, "--json")
    finally:
        stop.set()
        killer.join()
    return out, result, killed


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_the_job_finishes_with_a_complete_manifest_after_a_killed_worker(first_run, corpus):
    out, result, killed = first_run
    assert killed and killed[0][1] < 5, "no worker was killed while the job ran"
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 of 5 documents failed")
    summary = json.loads(result.stdout)
    # A worker killed after its file was complete but before its row came back: the retry finds the file `skipped`.
    assert (summary["documents"], summary["ok"] + summary["skipped"], summary["errors"]) == (5, 4, 1)
    assert summary["skipped"] <= 1 and summary["engine"] == "ray"
    rows = manifest(out)
    assert [Path(r["source"]).name for r in rows] == sorted(p.name for p in corpus.iterdir())
    (bad,) = (r for r in rows if r["status"] == "error")
    assert Path(bad["source"]).name == "corrupt.txt" and "looks binary" in bad["error"]
    for row in rows:
        if row["status"] != "error":
            with KvcReader(row["output"]) as reader:
                reader.verify()
                assert reader.header["document"]["sha256"] == row["digest"]
                assert reader.header["settings"]["refit"] == "values+bias"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [Path(r["output"]).name for r in rows if r["output"]] + ["manifest.jsonl"])


def test_a_rerun_skips_everything_done(first_run, corpus, cluster):
    out, _, _ = first_run
    result = kvc("compress", corpus, "-o", out, *SETTINGS, "--engine", "ray", "--address", cluster, "--json")
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["ok"], summary["skipped"], summary["errors"]) == (0, 4, 1)
    # the local engine with the actors' thread count names and checks the files the same way: nothing to redo
    local = kvc("compress", corpus, "-o", out, *SETTINGS, "--threads", "1", "--json")
    assert json.loads(local.stdout)["skipped"] == 4


def test_the_files_are_the_single_document_commands(first_run, tmp_path):
    """The same bytes but the measured prefill time, with the actors' thread count (one per actor here)."""
    out, _, _ = first_run
    for row in [r for r in manifest(out) if r["status"] == "ok"][:2]:
        single = tmp_path / "single.kvc"
        result = kvc("compress", row["source"], "-o", single, *SETTINGS, "--threads", "1", "--json")
        assert result.returncode == 0, result.stderr
        assert_same_cache(Path(row["output"]), single)


def test_a_model_that_does_not_load_stops_the_job_with_one_line(cluster, corpus, tmp_path):
    out = tmp_path / "out"
    result = kvc("compress", corpus, "-o", out, "--model", "no-such-model", "--engine", "ray", "--address", cluster)
    assert result.returncode == 1
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown model") and "Traceback" not in result.stderr
    assert not list(out.glob("*.kvc"))
