"""The Ray engine of the corpus mode: Ray Data reads the input, a callable class analyses it, rows go to Parquet.

Only this module imports Ray, and only inside `run_ray`: importing analysis (or the app, or the plain command line)
never loads Ray.

The pipeline:
  read       .txt/.jsonl: `ray.data.read_binary_files` (the bytes go through corpus_io.parse_lines, the same parser
             as the local engine, so line numbers, ids and bad records are the same); Parquet: `ray.data.read_parquet`
             in file-name order, zipped with `ray.data.range` for the row numbers; a dataset saved to disk: its
             memory-mapped Arrow table through `ray.data.from_arrow` (`from_huggingface` needs aiohttp);
  compare    on a rerun, before Ray starts or any model loads, the driver checks the folder's settings and dtype and
             compares the input's records with its rows (ResultsFolder.check_rerun, as the local engine): another
             input is refused; once a worker has described the model and `open` has checked it, rows of texts changed
             or gone are dropped and rows whose text is unchanged take the input's id (ResultsFolder.reconcile);
  skip       records that already have a row in the results folder (number, text_hash) are dropped, but for those
             whose row holds an unexpected error (ResultsFolder.row_keys): they are analysed again, and their new
             row replaces the old one only if it is analysed now (ResultsFolder.drop_replaced);
  analyse    `map_batches(RowMaker, compute=ActorPoolStrategy(size=workers))`: each worker loads the model once and
             turns batches of records into rows with corpus_store.analyze_records, the function the local engine calls;
             `num_gpus=1` per worker when the cluster has GPUs;
  write      `write_parquet` into DIR/rows, next to what earlier runs wrote.

Without an address a local Ray instance starts (every CPU of this machine, no dashboard, its own temp dir) and
stops with the run; `address="auto"` joins a running cluster, to which the `analysis` package is shipped.
On a CPU-only machine the workers together take at most all CPUs but one (fractional `num_cpus`): an actor pool that
takes every CPU starves the read tasks and the job never finishes. More workers than that leaves room for (0.25 CPU
each, or one per GPU), or than the cluster has GPUs, is refused before any model loads (or, with `wait`, asked of the
cluster's autoscaler and waited for, up to that many seconds); so is an address where no cluster answers, or where
what answers does not speak gRPC as a GCS does (ray.init would retry either for many minutes).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa

from analysis.commit import git_commit
from analysis.corpus import read_ahead
from analysis.corpus_io import (
    check_column,
    check_input,
    detect_kind,
    load_hf,
    make_record,
    parquet_files,
    parse_lines,
)
from analysis.corpus_store import (
    ResultsFolder,
    _now,
    analyze_records,
    result_settings,
    rows_to_table,
    versions,
)
from analysis.errors import HeadscopeError
from analysis.loading import local_directory, one_line

RECORD_SCHEMA = pa.schema([("number", pa.int64()), ("id", pa.string()), ("text", pa.string()),
                           ("text_hash", pa.string()), ("error", pa.string())])
HF_BLOCK_ROWS = 4096  # rows per block of a saved dataset
QUIET_LOGGERS = ("ray", "ray.data")  # set to WARNING while run_ray runs
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"  # quiet while a local instance starts
READ_CPUS = 0.25  # what a read or parse task reserves: small, the model workers need the CPUs
PACKAGE = Path(__file__).resolve().parent  # analysis/, shipped to a cluster joined by address
REVISION_CHANGED = "worker loaded {model} at revision {got}, not {expected}: the nodes see different weights."
VERSIONS_CHANGED = ("a worker runs {got}, not {expected} as the first worker does: the nodes run different code, whose "
                    "rows could differ; install the same versions on every node.")
NO_GPUS = "--device cuda, but the Ray cluster has no GPUs: use --device cpu (or auto)."
FEW_GPUS = ("--ray-workers {workers}, but the Ray cluster has {gpus} GPU(s) and each worker takes one (--device "
            "{device}): give --ray-workers {gpus} or fewer, or add GPUs to the cluster.")
FEW_CPUS = ("{workers} Ray workers would take the cluster's CPUs ({cpus:g}, {each:g} each) and leave under {read:g} to "
            "read the input, so the run would wait for ever: {fix}.")
WAITING = ("the Ray cluster has {has}, the run needs {needs}: asked its autoscaler for them, waiting up to {wait:g} s "
           "(--ray-wait)")
WAITED = "{message} Waited {seconds:.0f} s (--ray-wait) for the cluster to grow."
WAIT_POLL_SECONDS = 1.0  # how often a run that waits for its cluster reads the cluster's resources
NO_CLUSTER = "No Ray cluster answers at {address}: start one (`ray start --head`) or check {named}."
NO_CLUSTER_AUTO = ("--ray-address auto, but no Ray cluster runs here (RAY_ADDRESS is not set and no `ray start` on "
                   "this machine): start one (`ray start --head`) or give its address.")
NOT_RAY = ("Something answers at {address}, but not a Ray cluster (its GCS speaks gRPC): check {named}, which names "
           "the head node's GCS port (6379 unless `ray start --head --port` gave another).")
FOUND_BY_AUTO = "{address} ({found}, which --ray-address auto reads)"
CONNECT_SECONDS = 3.0  # connect and answer: a GCS does both at once; ray.init retries one that does not for ~14 minutes
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
RAY_FAILED = "The Ray run failed ({kind}): {message}"
NOT_JOINED = ("Ray could not join the cluster at {address} ({message}): if the cluster uses token authentication "
              "(Ray's lines above then say the token is missing), set RAY_AUTH_MODE=token and give its token "
              "(RAY_AUTH_TOKEN, or ~/.ray/auth_token), which Ray sends to an address given by name only then.")
NO_RAY = ("--engine ray needs Ray Data, and {module} cannot be imported ({reason}): pip install 'headscope[ray]' "
          "(or pip install -r requirements-dev.txt), or run with --engine local.")


def _records_table(records: list[dict], done: frozenset) -> pa.Table:
    kept = [record for record in records if (record["number"], record["text_hash"]) not in done]
    return pa.Table.from_pylist(kept, schema=RECORD_SCHEMA)


def parse_files(batch: pa.Table, kind: str, field: str, done: frozenset) -> pa.Table:
    """Bytes of .txt/.jsonl files (read_binary_files rows) -> records, less those already done."""
    records = [record for data in batch.column("bytes").to_pylist() for record in parse_lines(data, kind, field)]
    return _records_table(records, done)


def table_records(batch: pa.Table, field: str, done: frozenset) -> pa.Table:
    """Rows of a table with a text column and a 0-based `__row` position -> records, less those already done."""
    ids = batch.column("id").to_pylist() if "id" in batch.column_names and field != "id" else None
    records = [make_record(int(row) + 1, value, None if ids is None else ids[i], field)
               for i, (row, value) in enumerate(zip(batch.column("__row").to_pylist(),
                                                    batch.column(field).to_pylist()))]
    return _records_table(records, done)


class RowMaker:
    """A Ray Data worker: loads the model once, then turns each batch of records into result rows."""

    def __init__(self, model: str, device: str, dtype: str, revision: str, settings: dict, threads: int | None,
                 retry: frozenset = frozenset(), code: dict | None = None):
        import torch

        from analysis import load_model

        if code is not None and (here := worker_code()) != code:  # `code`: the first worker's (_describe), which
            # the run records
            mine, theirs = _flat(here), _flat(code)
            differ = sorted(name for name in {*mine, *theirs} if mine.get(name) != theirs.get(name))
            raise HeadscopeError(VERSIONS_CHANGED.format(
                got=", ".join(f"{name} {mine.get(name)}" for name in differ),
                expected=", ".join(f"{name} {theirs.get(name)}" for name in differ)))
        if threads:
            torch.set_num_threads(threads)
        self.loaded = load_model(model, device=device, dtype=dtype)
        if self.loaded.info.revision != revision:
            raise HeadscopeError(REVISION_CHANGED.format(model=model, got=self.loaded.info.revision, expected=revision))
        self.settings = settings
        self.retry = retry  # (number, text_hash) of records whose error row is retried: kept if they fail again

    def __call__(self, batch: pa.Table) -> pa.Table:
        # settings: the exclusions and the batch size; the rows do not depend on how Ray cut the input into batches
        rows = analyze_records(self.loaded, batch.to_pylist(), **self.settings)
        return rows_to_table([row for row in rows
                              if row["error"] is None or (row["number"], row["text_hash"]) not in self.retry])


def _describe(model: str, device: str, dtype: str) -> tuple[dict, bool, dict]:
    """The model's info (id, revision, shapes) as a worker sees it, what the manifest records and checks, whether
    its unknown token is a word of the text (capture.unk_is_word; ResultsFolder.open checks the rows' rule), and
    the code it runs (worker_code): a cluster's workers compute the rows, not the driver, whose versions may differ."""
    from analysis import load_model
    from analysis.capture import unk_is_word

    loaded = load_model(model, device=device, dtype=dtype)
    return loaded.info.to_dict(), unk_is_word(loaded.tokenizer), worker_code()


def _flat(code: dict) -> dict:
    """worker_code's {"versions": {...}, "git_commit": ...} as one {name: version} for a message."""
    return {**code["versions"], "headscope commit": code["git_commit"]}


def worker_code() -> dict:
    """What a run entry records of the code that computed its rows: {"versions": corpus_store.versions(),
    "git_commit": headscope's commit}."""
    return {"versions": versions(), "git_commit": git_commit()}


def read_records(ray, path: Path, field: str, done: frozenset):
    """The input as a Ray dataset of records (RECORD_SCHEMA), in input order, less those already done."""
    kind = detect_kind(path)
    if kind in ("txt", "jsonl"):
        files = ray.data.read_binary_files(str(path), num_cpus=READ_CPUS)
        return files.map_batches(parse_files, fn_args=(kind, field, done), batch_size=1, batch_format="pyarrow",
                                 num_cpus=READ_CPUS)
    if kind == "hf":
        dataset = load_hf(path)
        check_column(path, field, dataset.column_names)
        keep = [field] + (["id"] if "id" in dataset.column_names and field != "id" else [])
        arrow = dataset.data.table.select(keep)  # memory-mapped Arrow
        arrow = arrow.append_column("__row", pa.array(range(arrow.num_rows), pa.int64()))
        # from_arrow, not from_huggingface: that one needs aiohttp (ray[default]), which ray[data] does not bring
        table = ray.data.from_arrow([arrow.slice(start, HF_BLOCK_ROWS)
                                     for start in range(0, max(arrow.num_rows, 1), HF_BLOCK_ROWS)])
    else:
        import pyarrow.parquet as pq

        files = parquet_files(path)
        names = pq.read_schema(files[0]).names
        check_column(path, field, names)
        columns = [field] + (["id"] if "id" in names and field != "id" else [])
        table = ray.data.read_parquet(files, columns=columns, num_cpus=READ_CPUS)
        table = table.zip(ray.data.range(table.count()).rename_columns({"id": "__row"}))  # row numbers, in order
    return table.map_batches(table_records, fn_args=(field, done), batch_format="pyarrow", num_cpus=READ_CPUS)


def new_rows(folder: ResultsFolder, parts_before: set) -> tuple[int, int]:
    """(rows, failed rows) of the part files a run wrote (a text changed since the last run replaces its row, and a
    failed row dropped by the run is not one it wrote, so counting the folder's rows before and after would not do)."""
    import pyarrow.parquet as pq

    written = failed = 0
    for part in folder.part_files():
        if part not in parts_before:
            errors = pq.read_table(part, columns=["error"]).column("error")  # [row]
            written, failed = written + len(errors), failed + len(errors) - errors.null_count
    return written, failed


def keys_written(folder: ResultsFolder, parts_before: set) -> set[tuple[int, str]]:
    """(number, text_hash) of the rows of the part files a run wrote."""
    import pyarrow.parquet as pq

    keys = set()
    for part in folder.part_files():
        if part not in parts_before:
            table = pq.read_table(part, columns=["number", "text_hash"])
            keys.update(zip(table["number"].to_pylist(), table["text_hash"].to_pylist()))
    return keys


def _without_fsspec_http() -> None:
    """Without aiohttp, make `fsspec.implementations.http` fail to import at once and the same way every time.

    Ray Data's path resolution imports it from several listing threads and expects ModuleNotFoundError when it is
    unusable; when two threads race, one sees the other's half-imported module and gets an ImportError that Ray does
    not catch ("cannot import name 'HTTPFileSystem'"), and the read fails at random. None in sys.modules makes every
    import raise ModuleNotFoundError before any module code runs. Nothing here reads over HTTP.
    """
    import importlib.util
    import sys

    if importlib.util.find_spec("aiohttp") is None:
        sys.modules.setdefault("fsspec.implementations.http", None)


def speaks_grpc(host: str, port: int) -> bool:
    """Whether host:port answers the HTTP/2 connection preface with a SETTINGS frame, as a gRPC server (a GCS) does,
    all within CONNECT_SECONDS; OSError where nothing accepts the connection. Under RAY_USE_TLS the GCS wants a TLS
    handshake first: the connection alone is checked."""
    deadline = time.monotonic() + CONNECT_SECONDS
    with socket.create_connection((host, port), timeout=CONNECT_SECONDS) as conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return True
        head = b""  # the first frame's header: length (3 bytes), type, flags, stream (4 bytes)
        try:
            conn.sendall(HTTP2_PREFACE)
            while len(head) < 9 and (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                chunk = conn.recv(9 - len(head))
                if not chunk:  # closed
                    break
                head += chunk
        except OSError:  # timed out (a silent listener), or reset
            return False
    return head[3:4] == b"\x04" and head[5:9] == bytes(4)  # SETTINGS, on stream 0 (HTTP/1.1 or a banner: text)


def check_cluster(address: str) -> None:
    """One TCP connection, at most CONNECT_SECONDS, to the GCS port `address` names, before ray.init: where nothing
    listens (a typo, a cluster that is down), ray.init retries for about 14 minutes (20 tries of ~40 s) and says
    nothing on the way, and so it does where something else listens (a web server, an ssh daemon, a silent port):
    the port must also speak gRPC (speaks_grpc). 'auto' is looked up as ray.init does (RAY_ADDRESS, else this
    machine's last `ray start`); an address this cannot read (another scheme, no port) is left to ray.init."""
    try:  # Ray's own reading of an address, a private function (the extra allows ray>=2.50): without it, no check
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return
    target = address
    if "://" not in address:
        try:
            target = canonicalize_bootstrap_address(address)  # as ray.init reads it (127.0.0.1: this node's IP)
        except ConnectionError:  # auto, and no cluster to join
            raise HeadscopeError(NO_CLUSTER_AUTO) from None
        except ValueError:  # not host:port: ray.init says so
            return
    target = (target or "").removeprefix("ray://")  # None: 'local', a new instance; ray://: a Ray Client server
    host, _, port = target.rpartition(":")
    if "://" in target or not host or not port.isdigit():
        return
    try:
        if speaks_grpc(host.strip("[]"), int(port)):
            return
        message = NOT_RAY
    except OSError:  # refused, timed out, or a host name that does not resolve
        message = NO_CLUSTER
    if address != "auto":
        raise HeadscopeError(message.format(address=address, named="--ray-address"))
    if os.environ.get("RAY_ADDRESS"):
        shown = FOUND_BY_AUTO.format(address=os.environ["RAY_ADDRESS"], found="RAY_ADDRESS")
        raise HeadscopeError(message.format(address=shown, named="RAY_ADDRESS"))
    shown = FOUND_BY_AUTO.format(address=target, found="this machine's last `ray start`")
    raise HeadscopeError(message.format(address=shown, named="--ray-address"))


class Plan(NamedTuple):
    """What a run takes of a cluster (plan_workers)."""
    device: str  # cpu or cuda ('auto' resolved)
    workers: int
    worker_cpus: float  # each worker's num_cpus
    gpu_args: dict  # each worker's num_gpus: {"num_gpus": 1} on cuda
    refused: str | None  # why the cluster cannot hold the run now (NO_GPUS, FEW_GPUS, FEW_CPUS), None if it can


def plan_workers(resources: dict, device: str, workers: int | None) -> Plan:
    """The workers a run takes of a cluster with `resources` (ray.cluster_resources()): on cuda ('auto': where the
    cluster has GPUs) one GPU and one CPU each, on the CPU their share of all CPUs but one (0.25 at least), always
    leaving READ_CPUS to the readers; `workers` None: one per GPU, or 1."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))  # none listed: none there (a
    # head started with 0 CPUs, as autoscaling clusters' often are)
    cuda = device == "cuda" or (device == "auto" and gpus > 0)
    workers = workers or max(1, gpus)
    worker_cpus = 1.0 if cuda else max(0.25, min(1.0, (cpus - 1) / workers))  # leave a CPU to the readers
    most = math.floor((cpus - READ_CPUS) / worker_cpus)
    refused = None
    if cuda and not gpus:
        refused = NO_GPUS
    elif cuda and workers > gpus:  # each worker takes a GPU (num_gpus=1): those past the cluster's GPUs never start,
        # and the run would go on with fewer workers than asked (and than its entry records)
        refused = FEW_GPUS.format(workers=workers, gpus=gpus, device=device)
    elif workers * worker_cpus > cpus - READ_CPUS:  # past 4 per CPU (less one) or a GPU worker per CPU: the readers
        # never get a CPU and the actor pool waits for their input for ever
        refused = FEW_CPUS.format(workers=workers, cpus=cpus, each=worker_cpus, read=READ_CPUS,
                                  fix=f"give --ray-workers {most} or fewer" if most > 0 else "add CPUs to the cluster")
    return Plan("cuda" if cuda else "cpu", workers, worker_cpus, {"num_gpus": 1} if cuda else {}, refused)


def _amount(cpus: float, gpus: int, cuda: bool) -> str:
    return f"{cpus:g} CPU(s)" + (f" and {gpus} GPU(s)" if cuda else "")


def fit_cluster(ray, device: str, workers: int | None, wait: float,
                waiting: Callable[[str], None] | None = None) -> tuple[Plan, float]:
    """(plan_workers' plan for the cluster, seconds waited for it). A cluster that cannot hold the run is refused at
    once (`wait` 0), or asked for what the run needs (its autoscaler's request_resources: a hint, which nothing reads
    where no autoscaler runs) and polled every WAIT_POLL_SECONDS until it can, or refused when `wait` seconds have
    passed; the request is withdrawn either way, so that the autoscaler may scale down again."""
    resources = ray.cluster_resources()
    plan = plan_workers(resources, device, workers)
    if plan.refused is None or wait <= 0:
        if plan.refused is not None:
            raise HeadscopeError(plan.refused)
        return plan, 0.0
    from ray.autoscaler.sdk import request_resources

    cuda = bool(plan.gpu_args)
    start = time.monotonic()
    request_resources(bundles=[{"CPU": plan.worker_cpus, **({"GPU": 1} if cuda else {})}] * plan.workers
                      + [{"CPU": READ_CPUS}])  # each worker's, and the readers'
    try:
        if waiting is not None:
            waiting(WAITING.format(has=_amount(float(resources.get("CPU", 0)), int(resources.get("GPU", 0)), cuda),
                                   needs=_amount(plan.workers * plan.worker_cpus + READ_CPUS, plan.workers, cuda),
                                   wait=wait))
        while (plan := plan_workers(ray.cluster_resources(), device, workers)).refused is not None and (
                left := wait - (time.monotonic() - start)) > 0:
            time.sleep(min(WAIT_POLL_SECONDS, left))
    finally:
        request_resources()  # nothing: the request withdrawn
    waited = time.monotonic() - start
    if plan.refused is not None:
        raise HeadscopeError(WAITED.format(message=plan.refused, seconds=waited))
    return plan, waited


def _init_ray(ray, address: str | None, num_cpus: int | None, temp_dir: str) -> None:
    if address:
        check_cluster(address)
        try:
            ray.init(address=address, runtime_env={"py_modules": [str(PACKAGE)]}, log_to_driver=False)
        except ConnectionError as exc:  # a GCS that answers gRPC but refused this driver: its token, if unset
            if os.environ.get("RAY_AUTH_MODE") is not None:
                raise
            raise HeadscopeError(NOT_JOINED.format(address=address, message=one_line(exc))) from exc
        return
    root = str(PACKAGE.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # address "local": a new local instance, as documented, even where RAY_ADDRESS is set (a Ray job's driver, a
    # cluster node's shell), which ray.init would join instead and then refuse num_cpus for. Ray turns its token
    # authentication on for a new local instance and says so on stderr at every start: the instance is the run's
    # own, so the line (a second one beside a refusal's) is left out, the authentication kept
    said = logging.getLogger(AUTH_LOGGER)
    level = said.level
    said.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False,
                 _temp_dir=temp_dir,
                 runtime_env={"env_vars": {"PYTHONPATH": path,
                                           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                                           "TOKENIZERS_PARALLELISM": "false"}},
                 log_to_driver=False, configure_logging=False)
    finally:
        said.setLevel(level)


def run_ray(model: str, source: str | Path, folder: ResultsFolder | str | Path, text_column: str = "text",
            device: str = "cpu", dtype: str = "float32", exclude_first_token: bool = True,
            exclude_current_token: bool = False, batch_size: int = 16, address: str | None = None,
            workers: int | None = None, num_cpus: int | None = None, input_changed: bool = False,
            command: str | None = None, wait: float = 0.0, waiting: Callable[[str], None] | None = None) -> dict:
    """Analyse every record of `source` without a row in `folder` on Ray Data; returns the run entry (timings, the
    Ray settings and `command`, the command line that ran it: the corpus page shows them). The workers get `model`
    and `source` as absolute paths when they are local (a hub id as given), and the entry records them (`model`,
    `input`): a relative path would be looked up in each worker's own directory.
    A rerun first compares the input with the folder's rows in this process, before Ray starts and any model loads
    (ResultsFolder.check_rerun). The Ray Data settings it needs (preserve_order, no progress bars: the DataContext
    of this process, which a caller's own Ray Data work shares) and Ray's log levels are the caller's again when
    it returns or raises.
    A cluster that cannot hold the workers now is refused at once, or with `wait` seconds (an autoscaling cluster)
    asked for what they need and waited for, up to `wait` seconds (fit_cluster; `waiting` gets its one line)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:  # Ray not installed, or without its data extra: one line, not a traceback
        raise HeadscopeError(NO_RAY.format(module=exc.name or "ray", reason=exc)) from None
    _without_fsspec_http()
    folder = folder if isinstance(folder, ResultsFolder) else ResultsFolder(folder)
    # the workers run in their own directories (a cluster node's, a runtime_env's working_dir): a relative path
    # would be looked up there, a local checkpoint's taken for a hub id. Local paths go absolute, hub ids as given.
    local = local_directory(model)
    model = model if local is None else str(local)
    source = Path(source)
    shipped = Path(os.path.abspath(source))  # what the workers read (the messages name the input as given)
    check_input(source, text_column)  # a missing, damaged or columnless input is refused before Ray starts
    settings = result_settings(exclude_first_token, exclude_current_token)
    checked = folder.check_rerun(str(source), settings, text_column, dtype, input_changed)  # no Ray, no model yet
    started, clock = _now(), time.perf_counter()
    temp_dir = tempfile.mkdtemp(prefix="hs-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    started_here = not ray.is_initialized()
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}  # the caller's, restored on return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    context = data_settings = None
    try:
        if started_here:
            _init_ray(ray, address, num_cpus, temp_dir)
        ready = time.perf_counter()
        # where the run went, for its entry: a Ray this call started, a cluster it joined, or the caller's own Ray
        # (already initialised: `address` is not used then, so the entry says which instance ran it)
        instance = "already running" if not started_here else "joined" if address else "started"
        gcs_address = ray.get_runtime_context().gcs_address
        context = ray.data.DataContext.get_current()  # the process's own: the caller's settings, restored on return
        data_settings = (context.execution_options.preserve_order, context.enable_progress_bars)
        context.execution_options.preserve_order = True  # row numbers of Parquet inputs follow the file order
        context.enable_progress_bars = False
        plan, waited = fit_cluster(ray, device, workers, wait, waiting)
        device, workers, worker_cpus, gpu_args = plan.device, plan.workers, plan.worker_cpus, plan.gpu_args
        info, unk_word, code = ray.get(ray.remote(_describe).options(num_cpus=worker_cpus, **gpu_args).remote(
            model, device, dtype))
        folder.open(info, settings, str(source), text_column, unk_word)
        dropped, relabelled = folder.reconcile(str(source), checked)
        done, retry = (frozenset(keys) for keys in folder.row_keys())
        parts_before = set(folder.part_files())
        records = read_records(ray, shipped, text_column, done)
        rules = {key: value for key, value in settings.items()  # the rules analyze_records takes, not the flags
                 if key not in ("unk_is_word", "score_definition")}  # that record which rules the rows follow
        rows = records.map_batches(
            RowMaker, fn_constructor_args=(model, device, dtype, info["revision"],
                                           {**rules, "batch_size": batch_size}, max(1, int(worker_cpus)), retry,
                                           code),
            batch_size=read_ahead(device, batch_size), batch_format="pyarrow",  # passes cut from fuller batches
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=worker_cpus, **gpu_args)
        rows.write_parquet(str(folder.rows_dir.resolve()))
        written, failed = new_rows(folder, parts_before)
        recovered = retry & keys_written(folder, parts_before)  # retried and analysed now; the others failed again
        folder.drop_replaced(recovered, parts_before)
        kept = len(done & frozenset(folder.done_keys())) + len(retry - recovered)  # rows there, left as they were
    except Exception as exc:  # Ray wraps worker errors: one line for the user; the rows written so far are kept
        cause = getattr(exc, "cause", None) or exc
        if cause is exc and isinstance(exc, HeadscopeError):  # the driver's own
            raise
        if isinstance(cause, HeadscopeError):  # a task's, as a RayTaskError that is also a HeadscopeError (its str
            raise HeadscopeError(str(cause)) from None  # the remote traceback): its own line
        raise HeadscopeError(RAY_FAILED.format(kind=type(cause).__name__, message=str(cause).splitlines()[0]
                                               if str(cause) else "")) from exc
    finally:
        if data_settings is not None:
            context.execution_options.preserve_order, context.enable_progress_bars = data_settings
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if started_here and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    run = {"engine": "ray", "started": started, "finished": _now(), "seconds": round(time.perf_counter() - clock, 3),
           "ray_start_seconds": round(ready - clock, 3), "new_rows": written, "new_failed": failed, "skipped": kept,
           "dropped": dropped, "relabelled": relabelled, "retried": len(retry), "recovered": len(recovered),
           "batch_size": batch_size, "workers": workers, "address": address, "ray_instance": instance,
           "ray_wait": wait, "waited_seconds": round(waited, 3),
           "gcs_address": gcs_address, "device": device, "model": model, "input": str(shipped), "command": command,
           **code}  # the workers' versions and commit, not the driver's (finish_run's default)
    folder.finish_run(run)
    return run
