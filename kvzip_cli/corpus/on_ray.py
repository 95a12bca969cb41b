"""`kvc compress --engine ray`: the corpus as a Ray Data job. `read_binary_files` reads the documents (CPU tasks)
into `map_batches` over a pool of actors, each holding one model (kvzip_cli.corpus.Compressor) and writing each
.kvc itself, atomically; only the manifest rows travel back, and the driver writes the manifest.

A document's own fault is a row, never a job failure. A worker that dies (killed, out of memory) is restarted and
its document tried again, RETRIES more times; a document still not done then is recorded as lost, and the job goes
on. Ray is imported here only: the local engine never needs it.
"""

import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

from ..compress.settings import Settings
from ..errors import KvcError
from .inputs import is_uri
from .local import Compressor, Job, one_line, row, run

RETRIES = 2  # more tries of a document whose worker died
DEFAULT_CPU_ACTORS = 2


class CompressorActor:
    """The map_batches callable: one Compressor (one model) per actor; a batch of documents in, their rows out, as
    JSON strings. A failure that is no document's own (the model does not load) comes back as a `fatal` row."""

    def __init__(self, job: Job):
        self.compressor = Compressor(job)

    def __call__(self, batch: dict) -> dict:
        rows = []
        for path, data in zip(batch["path"], batch["bytes"], strict=True):
            try:
                entry = self.compressor.from_bytes(str(path), bytes(data))
            except Exception as exc:
                entry = row(str(path), error=one_line(exc), fatal=True)
            rows.append(json.dumps(entry))
        return {"row": rows}


def _resources(ray, device: str, actors: int | None) -> tuple[int, dict, str]:
    """(actors, each actor's Ray resources, the device kind they compute on)."""
    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    if device.startswith("cuda") and not gpus:
        raise KvcError(f"--device {device} asked for, but the Ray cluster has no GPU")
    if gpus and device != "cpu":
        return actors or gpus, {"num_gpus": 1}, "cuda"
    actors = actors or DEFAULT_CPU_ACTORS
    # One CPU stays for the read tasks: whole-CPU actors on a small machine starve them and the job stalls.
    cpus = max(0.25, (cluster.get("CPU", 1) - 1) / actors)
    return actors, {"num_cpus": cpus}, "cpu"


def _threads(resources: dict, threads: int | None) -> int:
    """torch threads per actor: as asked, else the CPUs it holds (at least 1), so that actors do not crowd out each
    other's cores."""
    return threads or max(1, int(resources.get("num_cpus", 1)))


def _init(ray, address: str | None) -> bool:
    """Connect to `address`, or start a local cluster; True when this call started Ray (and must shut it down)."""
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    ray.init(address=address, **quiet) if address else ray.init(include_dashboard=False, **quiet)
    return True


def run_ray(sources: list[str], out_dir: Path, model: str, settings: Settings, *, device: str = "auto",
            dtype: str = "auto", address: str | None,
            actors: int | None, threads: int | None, progress: bool) -> dict:
    """Compress `sources` as a Ray Data job on the cluster at `address` (default: a local one); the summary."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise KvcError("--engine ray needs Ray Data: pip install 'kvc[ray]'") from None
    # Ray prints its own notices (a worker died, …) on stdout, where --json's object goes: they go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        started_here = _init(ray, address)
        try:
            return _run(ray, sources, out_dir, model, settings, device, dtype, actors, threads, progress)
        finally:
            if started_here:
                _join_ray_data_threads()
                ray.shutdown()  # disconnects from a cluster given by --address; stops one started here


# Ray Data's executor waits only 2 s for its scheduling thread when a job stops early; on a loaded machine that
# thread (or the metadata prefetcher) still runs when ray.shutdown() tears the core worker down, and Ray then
# prints a C++ notice after kvc's error line. The same holds for the row iterator's worker threads, which fetch
# blocks from the core worker: seen alive at shutdown when a model fails to load (and the notice once in CI). They
# end on their own once the job is stopped: wait for them. (Its block prefetcher ends only when stopped, and waits
# parked, away from the core worker: not joined.)
_RAY_DATA_THREADS = ("StreamingExecutor-", "ray-data-metadata-prefetch", "iter_threaded")


def _join_ray_data_threads(timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith(_RAY_DATA_THREADS):
            thread.join(max(0.0, deadline - time.monotonic()))


def _run(ray, sources, out_dir, model, settings, device, dtype, actors, threads, progress) -> dict:
    count, resources, kind = _resources(ray, device, actors)
    # Actors may run elsewhere (another node, another working folder): they get absolute paths.
    job = Job(out_dir.absolute(), model, settings, device, dtype, kind, _threads(resources, threads))
    paths = {s if is_uri(s) else os.path.abspath(s): s for s in sources}
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.max_errored_blocks = len(paths)  # a block whose worker died RETRIES + 1 times: recorded, not fatal
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its own tracebacks: the CLI says one line
    dataset = ray.data.read_binary_files(list(paths), include_paths=True, override_num_blocks=len(paths))
    with warnings.catch_warnings():  # Ray 2.60 takes the retries only as (deprecated) loose remote arguments
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = dataset.map_batches(CompressorActor, fn_constructor_kwargs={"job": job}, batch_size=1,
                                      compute=ray.data.ActorPoolStrategy(size=count), max_restarts=-1,
                                      max_task_retries=RETRIES, **resources)

    def rows():
        done = set()
        records = iter(dataset.iter_rows())
        try:
            for record in records:
                entry = json.loads(record["row"])
                if entry.pop("fatal", False):
                    raise KvcError(entry["error"])
                entry["source"] = paths.get(entry["source"], entry["source"])
                done.add(entry["source"])
                yield entry
        except ray.exceptions.RayError as exc:
            raise KvcError(f"the Ray job failed: {one_line(exc)}") from None
        finally:
            records.close()  # stops the job now, while Ray is up (not when collected, after it shut down)
        for source in sources:  # what lies under a URI is known from Ray's rows only
            if source not in done and not is_uri(source):
                yield row(source, error=f"lost: the Ray worker compressing it died {RETRIES + 1} times (killed, or "
                                        "out of memory?)")

    return run(sources, job, lambda task: rows(), "ray", progress)  # the actors' phases stay in their processes
