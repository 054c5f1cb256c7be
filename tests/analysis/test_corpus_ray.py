"""The Ray engine gives the local engine's rows and aggregates, for every input kind, and resumes a local run.

Ray runs in a child process in its own session, under a timeout (an actor pool that starves its readers hangs
for ever rather than failing): on timeout the whole process group, raylet included, is killed. The child starts
one local Ray instance (2 CPUs, no dashboard, a private temp dir) and shuts it down; the test then checks that no
Ray process of that temp dir is left.
"""

import contextlib
import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from analysis.corpus_io import iter_records
from analysis.corpus_store import ResultsFolder, load_results, run_local
from reports.untrusted import shown_command
from tests.analysis.test_corpus_store import failing

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 420
WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "from", "home", "in", "rain"]
NUMBERS = ("number", "id", "text_hash", "excerpt", "n_tokens", "error")

RAY_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from analysis.corpus_ray import run_ray
    from analysis.errors import HeadscopeError
    from reports.__main__ import main

    def job(source, folder, column, input_changed, other_model):
        try:
            return run_ray(other_model or model, source, folder, text_column=column, batch_size=4,
                           input_changed=input_changed)
        except HeadscopeError as exc:  # a refusal: its one line
            return {"error": str(exc)}

    model, temp_dir, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        source, folder, column = jobs[0][:3]  # the first through the command line
        code = main(["--model", model, "--batch", source, "--results", folder, "--text-column", column,
                     "--engine", "ray", "--batch-size", "4", "--html", folder + ".html"])
        assert code == 0, code
        runs = [json.load(open(folder + "/corpus.json"))["runs"][-1]]
        runs[0]["this_gcs_address"] = ray.get_runtime_context().gcs_address
        runs += [job(*spec) for spec in jobs[1:]]
        assert ray.is_initialized()  # run_ray leaves a Ray it did not start running
    finally:
        ray.shutdown()
    print(json.dumps(runs))
""")


def short_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(2, 12)))) for _ in range(n)]


def ray_processes(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline[:120]}")
    return found


def run_ray_jobs(model: Path, jobs: list[tuple], temp_dir: Path) -> list[dict]:
    """Run each (source, folder, text column[, input_changed[, another model]]) in one Ray instance: the first
    through the command line, the others through run_ray (a refusal comes back as {"error": its line})."""
    out, _ = run_ray_child([RAY_SCRIPT, str(model), str(temp_dir),
                            json.dumps([[str(s), str(f), c, bool(rest and rest[0]), str(rest[1]) if len(rest) > 1
                                         else None] for s, f, c, *rest in jobs])], ROOT, temp_dir)
    return json.loads(out.strip().splitlines()[-1])


def run_ray_child(argv: list[str], cwd: Path, temp_dir: Path) -> tuple[str, str]:
    """(stdout, stderr) of `python -c argv[0] argv[1:]` in `cwd`, a script that starts its own Ray instance in
    `temp_dir`: killed past TIMEOUT, and every process of that instance left afterwards killed and reported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    child = subprocess.Popen([sys.executable, "-c", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail(f"the Ray run did not finish in {TIMEOUT} s (killed)")
    finally:
        leftovers = ray_processes(str(temp_dir))
        for line in leftovers:  # only processes of this test's private Ray instance
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert child.returncode == 0, err[-3000:]
    assert leftovers == [], leftovers  # ray.shutdown() stopped every Ray process it started
    return out, err


def assert_same_rows(ray_folder: Path, local_folder: Path) -> None:
    got, expected = ResultsFolder(ray_folder).read_rows(), ResultsFolder(local_folder).read_rows()
    assert got.num_rows == expected.num_rows > 0
    for name in expected.column_names:
        if name in NUMBERS:
            assert got[name].to_pylist() == expected[name].to_pylist(), name
        else:
            a = got.filter(got["error"].is_null())[name].combine_chunks().flatten().to_numpy()
            b = expected.filter(expected["error"].is_null())[name].combine_chunks().flatten().to_numpy()
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=name)
    mine, theirs = load_results(ray_folder), load_results(local_folder)
    for name in theirs.means:
        for field in ("means", "low", "high"):
            np.testing.assert_allclose(getattr(mine, field)[name], getattr(theirs, field)[name], rtol=0, atol=1e-6,
                                       err_msg=f"{field} {name}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same 24 texts with bad records as .txt, as a folder of two Parquet files, and as a saved dataset."""
    import datasets

    base = tmp_path_factory.mktemp("ray-inputs")
    texts = short_texts(24)
    txt = base / "in.txt"
    txt.write_bytes(("\n".join(texts[:5]) + "\n\nbad \xff\n" + " ".join(["cat"] * 300) + "\n"
                     + "\n".join(texts[5:]) + "\n").encode("latin-1"))
    folder = base / "parquet"
    folder.mkdir()
    pq.write_table(pa.table({"text": texts[:10] + [None]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"text": texts[10:] + [""]}), folder / "part-1.parquet", row_group_size=4)
    dataset = base / "dataset"
    datasets.Dataset.from_dict({"body": texts, "id": [f"doc{i}" for i in range(24)]}).save_to_disk(dataset)
    return {"txt": (txt, "text"), "parquet": (folder, "text"), "hf": (dataset, "body")}


def test_ray_equals_local_for_every_input_and_resumes_a_local_run(steady_gpt2, steady_gpt2_path, inputs, tmp_path,
                                                                  monkeypatch):
    """On the steady checkpoint: Ray's workers are other processes, whose BLAS may round differently (conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (one CPU): the same float32 sums
    try:
        local = {}
        for kind, (source, column) in inputs.items():
            local[kind] = tmp_path / f"local-{kind}"
            run_local(steady_gpt2, iter_records(source, column), local[kind], source=str(source),
                      text_column=column, batch_size=4)
        # a local run killed after 8 records; Ray finishes it
        txt, _ = inputs["txt"]
        partial = tmp_path / "resumed"

        def stop(seen, written):
            if seen >= 8:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_local(steady_gpt2, iter_records(txt), partial, batch_size=4, flush_rows=4, progress=stop)
        done_before = ResultsFolder(partial).read_rows().num_rows
        relabel = tmp_path / "relabel.jsonl"  # ids changed, texts not (but the second): Ray updates the ids
        lines = [{"text": text, "id": f"old{i}"} for i, text in enumerate(short_texts(3, seed=7))]
        relabel.write_text("".join(json.dumps(line) + "\n" for line in lines))
        run_local(steady_gpt2, iter_records(relabel), tmp_path / "relabel", source=str(relabel), batch_size=4)
        lines[0]["id"], lines[2]["id"], lines[1]["text"] = "new0", "new2", "a changed second text"
        relabel.write_text("".join(json.dumps(line) + "\n" for line in lines))
        run_local(steady_gpt2, iter_records(relabel), tmp_path / "relabel-fresh", source=str(relabel), batch_size=4)
    finally:
        torch.set_num_threads(before)
    assert done_before == 8
    edited = tmp_path / "edited.txt"  # a local run, then its second line changed: Ray replaces that row alone; its
    # third line failed under a bug since fixed: Ray retries it; a failing (not UTF-8) last line made another failing
    # line: the run's one failure, though the folder's is the same
    edited.write_bytes(b"The cat sat on the mat.\nMary and John went to the store.\nAttention heads.\n\xff one\n")
    with monkeypatch.context() as patch:
        failing(patch, {"Attention heads."})
        run_local(steady_gpt2, iter_records(edited), tmp_path / "edited", source=str(edited))
    edited.write_bytes(b"The cat sat on the mat.\nA different second line.\nAttention heads.\n\xfe two\n")
    run_local(steady_gpt2, iter_records(edited), tmp_path / "edited-fresh", source=str(edited))
    shortened = tmp_path / "shortened.txt"  # made shorter: Ray refuses, then drops the rows past its end when told
    shortened.write_text("The cat sat on the mat.\nMary and John went to the store.\nAttention heads.\n")
    run_local(steady_gpt2, iter_records(shortened), tmp_path / "shortened", source=str(shortened))
    shortened.write_text("The cat sat on the mat.\n")
    moved = tmp_path / "moved.txt"  # a copy of the txt input elsewhere resumes the local folder of the first
    shutil.copy(txt, moved)

    jobs = [(source, tmp_path / f"ray-{kind}", column) for kind, (source, column) in inputs.items()]
    temp_dir = Path(tempfile.mkdtemp(prefix="hs-ray-test-", dir="/tmp"))  # short: Ray's socket paths <= 107 bytes
    try:
        runs = run_ray_jobs(steady_gpt2_path, [
            *jobs, (txt, partial, "text"), (edited, tmp_path / "edited", "text"),
            (shortened, tmp_path / "shortened", "text", False, tmp_path / "no-model"),
            (shortened, tmp_path / "shortened", "text", True), (moved, local["txt"], "text"),
            (relabel, tmp_path / "relabel", "text"), (txt, tmp_path / "never", "text", False, tmp_path / "no-model")],
            temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    no_model, relabel_run, moved_run, dropped_run, refused, edited_run = (runs.pop() for _ in range(6))
    assert "no-model' exists" in no_model["error"] and "\n" not in no_model["error"]  # not Ray's remote traceback
    assert [edited_run[key] for key in ("new_rows", "new_failed", "skipped", "dropped")] == [3, 1, 1, 2]  # 0 failed
    assert (edited_run["retried"], edited_run["recovered"]) == (1, 1)  # the failed row, analysed now, replaced
    edited_parts = ResultsFolder(tmp_path / "edited").part_files()
    assert sum(pq.read_metadata(part).num_rows for part in edited_parts) == 4  # one row per text
    assert_same_rows(tmp_path / "edited", tmp_path / "edited-fresh")  # as the edited file written afresh
    # refused before any model loads: the model given (a path that does not exist) was never tried
    assert "shortened holds 2 rows of texts" in refused["error"] and "(numbers 2, 3)" in refused["error"]
    assert (dropped_run["new_rows"], dropped_run["skipped"], dropped_run["dropped"]) == (0, 1, 2)
    assert [t.number for t in load_results(tmp_path / "shortened").texts] == [1]
    assert (moved_run["new_rows"], moved_run["skipped"], moved_run["dropped"]) == (0, 26, 0)
    assert [relabel_run[key] for key in ("new_rows", "skipped", "dropped", "relabelled")] == [1, 2, 1, 2]
    assert ResultsFolder(tmp_path / "relabel").read_rows()["id"].to_pylist() == ["new0", "old1", "new2"]
    assert_same_rows(tmp_path / "relabel", tmp_path / "relabel-fresh")  # as the edited file written afresh

    for kind in inputs:
        assert_same_rows(tmp_path / f"ray-{kind}", local[kind])
    assert [run["new_rows"] for run in runs] == [26, 26, 24, 26 - 8]  # 24 texts + 2 bad records (not the blank line)
    # the command line's run, in a Ray the caller had started: its entry and its corpus page say so, and the command
    first = runs[0]
    assert (first["ray_instance"], first["gcs_address"]) == ("already running", first["this_gcs_address"])
    page = (tmp_path / "ray-txt.html").read_text()
    assert ("ray engine, 1 worker(s) on the Ray instance already running in the calling process "
            f"({first['gcs_address']}), device cpu, batch size 4;") in page
    assert first["command"].startswith("python -m reports --model") and "--engine ray" in first["command"]
    assert f"<pre>{html.escape(shown_command(first['command']))}</pre>" in page
    assert runs[-1]["skipped"] == 8  # the resumed run computed only the records without a row
    assert_same_rows(partial, local["txt"])
    manifest = json.loads((partial / "corpus.json").read_text())
    assert [run["engine"] for run in manifest["runs"]] == ["ray"]  # the killed local run never finished
    assert manifest["counts"] == {"rows": 26, "analysed": 24, "failed": 2}

    rows = ResultsFolder(tmp_path / "ray-txt").read_rows()
    errors = dict(zip(rows["number"].to_pylist(), rows["error"].to_pylist()))
    assert errors[7] == "not UTF-8 (bad byte at offset 4)" and "accepts at most 128" in errors[8]
    hf_rows = ResultsFolder(tmp_path / "ray-hf").read_rows()
    assert hf_rows["id"].to_pylist() == [f"doc{i}" for i in range(24)]


def test_a_set_ray_address_does_not_stop_the_local_instance(gpt2_path, tmp_path):
    # RAY_ADDRESS is set in a Ray job's driver and in many cluster shells; ray.init(num_cpus=...) then joined it and
    # refused: 'The Ray run failed (ValueError): When connecting to an existing cluster, num_cpus and num_gpus must
    # not be provided.', exit 2, though without --ray-address a local instance is documented to start. Nothing
    # listens at this address: the run must not try it.
    source = tmp_path / "in.txt"
    source.write_text("\n".join(short_texts(3)) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "RAY_ADDRESS": "127.0.0.1:1"}
    child = subprocess.Popen([sys.executable, "-m", "reports", "--model", str(gpt2_path), "--batch", str(source),
                              "--results", str(tmp_path / "res"), "--engine", "ray", "--batch-size", "4"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # its own process group: the Ray it started
        child.communicate()
        pytest.fail(f"the Ray run did not finish in {TIMEOUT} s (killed)")
    assert child.returncode == 0, err[-3000:]
    assert "3 texts written on ray" in err
    run = json.loads((tmp_path / "res" / "corpus.json").read_text())["runs"][-1]
    assert (run["ray_instance"], run["address"]) == ("started", None)


OTHER_CWD_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys
    import ray
    import ray.data
    from analysis.corpus_ray import run_ray
    from analysis.errors import HeadscopeError
    from reports.__main__ import main

    # workers that run in their own directory (a runtime_env working_dir, as on a cluster node), not the driver's
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1], log_to_driver=False,
             runtime_env={"working_dir": "worker-dir"})
    context = ray.data.DataContext.get_current()

    def caller_settings():
        return [context.execution_options.preserve_order, context.enable_progress_bars,
                logging.getLogger("ray").level, logging.getLogger("ray.data").level]

    try:
        worker_cwd = ray.get(ray.remote(lambda: os.getcwd()).options(num_cpus=0.25).remote())
        context.execution_options.preserve_order, context.enable_progress_bars = False, True  # the caller's own
        logging.getLogger("ray").setLevel(logging.DEBUG)
        logging.getLogger("ray.data").setLevel(logging.INFO)
        before = caller_settings()
        code = main(["--model", "ckpt", "--batch", "in.txt", "--results", "res", "--engine", "ray",
                     "--batch-size", "4"])  # relative paths, as typed in the driver's directory
        after_return = caller_settings()
        try:
            run_ray("no-such-model", "in.txt", "res-failed", batch_size=4)
            failed = None
        except HeadscopeError as exc:
            failed = str(exc)
        after_raise = caller_settings()
    finally:
        ray.shutdown()
    print(json.dumps({"worker_cwd": worker_cwd, "code": code, "before": before, "after_return": after_return,
                      "after_raise": after_raise, "failed": failed}))
""")


def test_relative_paths_reach_workers_in_other_directories_and_ray_data_settings_are_the_callers_again(
        gpt2_path, tmp_path):
    # --model ckpt and --batch in.txt (relative) were shipped as typed and resolved in each worker's own directory:
    # the checkpoint was taken for a hub id ("'ckpt' is not in the local Hugging Face cache"), the input not found
    # ("Failed to open local file 'in.txt'"). And run_ray left the caller's DataContext with preserve_order on and
    # progress bars off, and Ray's loggers at WARNING, after it returned or raised.
    (tmp_path / "ckpt").symlink_to(gpt2_path, target_is_directory=True)
    (tmp_path / "in.txt").write_text("\n".join(short_texts(3)) + "\n")
    (tmp_path / "worker-dir").mkdir()
    (tmp_path / "worker-dir" / "README").write_text("the Ray workers' directory\n")
    temp_dir = Path(tempfile.mkdtemp(prefix="hs-ray-test-", dir="/tmp"))  # short: Ray's socket paths <= 107 bytes
    try:
        out, err = run_ray_child([OTHER_CWD_SCRIPT, str(temp_dir)], tmp_path, temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    got = json.loads(out.strip().splitlines()[-1])
    assert Path(got["worker_cwd"]).resolve() != tmp_path.resolve()  # the workers do not run where the paths were typed
    assert got["code"] == 0, err[-3000:]
    run = json.loads((tmp_path / "res" / "corpus.json").read_text())["runs"][-1]
    assert (run["new_rows"], run["new_failed"]) == (3, 0)
    assert (run["model"], run["input"]) == (str(gpt2_path.resolve()), str(tmp_path / "in.txt"))  # what was shipped
    # the caller's Ray Data settings and log levels, as they were before, after a run that returned and one that raised
    assert got["failed"] and "no-such-model" in got["failed"]
    assert got["before"] == [False, True, 10, 20] == got["after_return"] == got["after_raise"]


def test_a_worker_that_runs_other_code_than_the_first_is_refused_and_the_run_records_the_workers(gpt2_path,
                                                                                                  monkeypatch):
    """A cluster's workers compute the rows, not the driver: the run entry records the code the first worker runs
    (_describe), and a worker whose library versions or headscope commit differ from it refuses to make rows, as
    one whose checkpoint revision differs does (RowMaker, called here as Ray calls it, in this process)."""
    from analysis import corpus_ray
    from analysis.errors import HeadscopeError

    code = corpus_ray.worker_code()
    info, _, described = corpus_ray._describe(str(gpt2_path), "cpu", "float32")
    assert described == code and code["versions"]["torch"] and "headscope" in code["versions"]
    corpus_ray.RowMaker(str(gpt2_path), "cpu", "float32", info["revision"], {}, None, code=code)  # the same: fine
    other = {"versions": {**code["versions"], "torch": "0.0.1"}, "git_commit": code["git_commit"]}
    with pytest.raises(HeadscopeError, match=r"a worker runs torch \S+, not torch 0\.0\.1 as the first worker does"):
        corpus_ray.RowMaker(str(gpt2_path), "cpu", "float32", info["revision"], {}, None, code=other)


GPU_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, os, sys
    import ray
    from analysis.corpus_ray import run_ray
    from analysis.errors import HeadscopeError
    from reports.__main__ import main

    model, source, temp_dir = sys.argv[1:4]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the local instance the command line starts: no GPU, on any machine
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["--model", model, "--batch", source, "--results", "res-none", "--engine", "ray", "--device",
                     "cuda", "--ray-workers", "2"])
    if visible is None:  # Ray refuses to declare a GPU where CUDA_VISIBLE_DEVICES lists none
        del os.environ["CUDA_VISIBLE_DEVICES"]
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    got = {"none": [code, [line for line in err.getvalue().splitlines() if line.startswith("headscope")]]}
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)  # GPUs
    try:  # declared: nothing runs on them, every run here stops before its model loads
        for device, workers in (("cuda", 3), ("auto", 3), ("cuda", 2), ("cpu", 8), ("cuda", 1), ("cpu", 7)):
            try:
                run_ray(model, source, f"res-{device}-{workers}", device=device, workers=workers, batch_size=4)
                got[f"{device} {workers}"] = None
            except HeadscopeError as exc:
                got[f"{device} {workers}"] = str(exc)
    finally:
        ray.shutdown()
    print(json.dumps(got))
""")


def test_more_workers_than_the_clusters_gpus_or_cpus_allow_are_refused_before_any_model_loads(tmp_path):
    # each worker asks for one GPU (num_gpus=1): the workers past the cluster's GPUs never started, and the run went on
    # with fewer than asked, and recorded the number asked. Workers that took every CPU but under READ_CPUS (8 on 2
    # CPUs, 0.25 each; 2 GPU workers on 2 CPUs, 1 each) left the readers none, and the run waited for ever. The model
    # named does not exist: a run these counts let through fails in its worker.
    source = tmp_path / "in.txt"
    source.write_text("\n".join(short_texts(3)) + "\n")
    temp_dir = Path(tempfile.mkdtemp(prefix="hs-ray-test-", dir="/tmp"))  # short: Ray's socket paths <= 107 bytes
    try:
        out, _ = run_ray_child([GPU_SCRIPT, str(tmp_path / "no-model"), str(source), str(temp_dir)], tmp_path,
                               temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    got = json.loads(out.strip().splitlines()[-1])
    # no GPU at all: the command line's one line, exit 2, nothing written
    from analysis.corpus_ray import FEW_CPUS, FEW_GPUS, NO_GPUS, READ_CPUS

    assert got["none"] == [2, [f"headscope: error: {NO_GPUS}"]]
    assert not (tmp_path / "res-none").exists()
    assert got["cuda 3"] == FEW_GPUS.format(workers=3, gpus=2, device="cuda")  # both numbers, and what to do
    assert got["auto 3"] == FEW_GPUS.format(workers=3, gpus=2, device="auto")  # auto: cuda, the cluster has GPUs
    assert got["cuda 2"] == FEW_CPUS.format(workers=2, cpus=2, each=1, read=READ_CPUS,
                                            fix="give --ray-workers 1 or fewer")
    assert got["cpu 8"] == FEW_CPUS.format(workers=8, cpus=2, each=0.25, read=READ_CPUS,
                                           fix="give --ray-workers 7 or fewer")
    # as many as the GPUs and CPUs allow: on to the worker, whose model load fails (no CUDA device here, or no model)
    for name in ("cuda 1", "cpu 7"):
        assert got[name] and "Ray cluster has" not in got[name] and "wait for ever" not in got[name], got[name]
    assert "no-model" in got["cpu 7"]
    assert not any((tmp_path / f"res-{name}").exists() for name in ("cuda-3", "auto-3", "cuda-2", "cpu-8"))


HEAD_SCRIPT = textwrap.dedent("""
    import sys
    import ray
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    # a cluster's head with sys.argv[2] CPUs: its GCS address on stdout; then, for each line on stdin, what its
    # autoscaler is asked for (request_resources' bundles, which Ray's autoscaler reads from this key; null: never
    # asked), until stdin closes
    ray.init(num_cpus=int(sys.argv[2]), include_dashboard=False, _temp_dir=sys.argv[1], log_to_driver=False)
    try:
        print(ray.get_runtime_context().gcs_address, flush=True)
        for _ in sys.stdin:
            print((_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"null").decode(), flush=True)
    finally:
        ray.shutdown()
""")


def test_a_running_clusters_address_passes_the_clusters_check_and_is_joined(gpt2_path, tmp_path, monkeypatch):
    """check_cluster, before ray.init joins an address, lets a real GCS through: it looks the address up as ray.init
    does (127.0.0.1: this node's IP; auto: RAY_ADDRESS), connects, and the GCS answers the HTTP/2 preface (gRPC);
    the command line then joins that cluster and runs there."""
    from analysis.corpus_ray import check_cluster

    source = tmp_path / "in.txt"
    source.write_text("\n".join(short_texts(3)) + "\n")
    run = [sys.executable, "-m", "reports", "--model", str(gpt2_path), "--batch", str(source), "--results",
           str(tmp_path / "res"), "--ray-address"]
    with ray_head(tmp_path, 2) as (address, _, env, _):
        check_cluster(address)
        with monkeypatch.context() as patch:
            patch.setenv("RAY_ADDRESS", address)
            check_cluster("auto")
        # the head turned Ray's token authentication on (its token in ~/.ray/auth_token); a driver that names the
        # address (not auto) uses the token only when told to, as on any such cluster: untold, it is refused, and
        # the last line says what to set (ray.init's ~20 tries of a second cut to 2 here)
        untold = {**{k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}, "RAY_gcs_server_port_wait_time_s": "2"}
        refused = subprocess.run([*run, address], cwd=ROOT, env=untold, capture_output=True, text=True,
                                 timeout=TIMEOUT, check=False, start_new_session=True)
        done = subprocess.run([*run, address, "--batch-size", "4"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT, check=False, start_new_session=True)
    assert refused.returncode == 2, refused.stderr[-3000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"headscope: error: Ray could not join the cluster at {address} (") and (
        "set RAY_AUTH_MODE=token" in last), refused.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 texts written on ray" in done.stderr
    entry = json.loads((tmp_path / "res" / "corpus.json").read_text())["runs"][-1]
    assert (entry["ray_instance"], entry["address"]) == ("joined", address)
    assert entry["gcs_address"].rsplit(":", 1)[1] == address.rsplit(":", 1)[1]  # the head's own IP, that port


@contextlib.contextmanager
def ray_head(cwd: Path, num_cpus: int):
    """A Ray cluster's head with `num_cpus` CPUs in a child process (HEAD_SCRIPT), for the runs of the body: yields
    (its address as 127.0.0.1:PORT, its temp dir, the runs' environment, a function that returns what its autoscaler
    is asked for now). Then it shuts down, and every process of its temp dir left (its own, or a node's that joined
    it) is killed and reported."""
    temp_dir = Path(tempfile.mkdtemp(prefix="hs-ray-test-", dir="/tmp"))  # short: Ray's socket paths <= 107 bytes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           "RAY_AUTH_MODE": "token"}  # the head's token (~/.ray/auth_token), which a driver sends to an address only so
    head = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT, str(temp_dir), str(num_cpus)], cwd=cwd, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)

    def asked():
        head.stdin.write("\n")
        head.stdin.flush()
        return json.loads(head.stdout.readline())

    try:
        gcs_address = head.stdout.readline().strip()
        assert gcs_address, "the Ray head did not start"
        yield f"127.0.0.1:{gcs_address.rsplit(':', 1)[1]}", temp_dir, env, asked
        head.communicate(input="", timeout=TIMEOUT)  # stdin closed: the head shuts down
    except subprocess.TimeoutExpired:
        pytest.fail(f"the Ray head or a run joining it did not finish in {TIMEOUT} s (killed)")
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
            head.communicate()
        leftovers = ray_processes(str(temp_dir))
        for line in leftovers:  # only processes of this test's Ray cluster
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert leftovers == [], leftovers  # ray.shutdown() in the head, and a node's `ray start` when stopped, stopped them


def test_a_cluster_without_cpus_is_refused_at_once_or_waited_for_until_a_node_joins(gpt2_path, tmp_path):
    # an autoscaling cluster's head often has no CPUs (KubeRay's rayStartParams num-cpus: "0"), and
    # ray.cluster_resources() then has no "CPU" at all: that was read as 1 CPU, one worker (0.25 CPU) passed the
    # check, and the run waited for ever for a CPU that no node had. Refused now at once (exit 2, nothing asked of the
    # autoscaler); with --ray-wait the run asks the autoscaler for what it needs and waits: refused when nothing
    # comes, and run when a node joins meanwhile (`ray start --address`, as an autoscaler's node does), the request
    # withdrawn either way.
    from analysis.corpus_ray import FEW_CPUS, READ_CPUS

    source = tmp_path / "in.txt"
    source.write_text("\n".join(short_texts(3)) + "\n")
    command = [sys.executable, "-m", "reports", "--model", str(gpt2_path), "--batch", str(source), "--results",
               str(tmp_path / "res"), "--batch-size", "4"]
    waiting = "headscope: the Ray cluster has 0 CPU(s), the run needs 0.5 CPU(s): asked its autoscaler for them"
    with ray_head(tmp_path, num_cpus=0) as (address, temp_dir, env, asked):
        command += ["--ray-address", address]
        refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                                 check=False, start_new_session=True)
        asked_before = asked()
        waited = subprocess.run([*command, "--ray-wait", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=TIMEOUT, check=False, start_new_session=True)
        asked_after_refusal = asked()
        written_after_refusals = (tmp_path / "res").exists()
        err_path = tmp_path / "stderr.txt"
        with err_path.open("w") as err_file:
            run = subprocess.Popen([*command, "--ray-wait", "120"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=err_file, start_new_session=True)
        node, deadline = None, time.monotonic() + TIMEOUT
        try:
            while run.poll() is None and waiting not in err_path.read_text():  # until it waits
                if time.monotonic() > deadline:
                    pytest.fail(f"the run did not start to wait in {TIMEOUT} s (killed)")
                time.sleep(0.5)
            asked_while_waiting = asked()
            node = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--address", address,
                                     "--num-cpus", "4", "--block", "--temp-dir", str(temp_dir)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            run.wait(TIMEOUT)
            asked_after_run = asked()
        finally:
            for child in (run, node):
                if child is not None and child.poll() is None:
                    os.killpg(child.pid, signal.SIGTERM)  # `ray start --block`: drains and stops its node
                    try:
                        child.wait(TIMEOUT)
                    except subprocess.TimeoutExpired:
                        os.killpg(child.pid, signal.SIGKILL)
    message = FEW_CPUS.format(workers=1, cpus=0, each=0.25, read=READ_CPUS, fix="add CPUs to the cluster")
    # no --ray-wait: refused at once, as before, nothing asked
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == f"headscope: error: {message}", refused.stderr[-3000:]
    assert "asked its autoscaler" not in refused.stderr and asked_before is None
    # --ray-wait 3, nothing joins: one line when it starts to wait, the refusal with how long it waited; withdrawn
    lines = waited.stderr.strip().splitlines()
    assert waited.returncode == 2 and [line for line in lines if "autoscaler" in line] == [
        f"{waiting}, waiting up to 3 s (--ray-wait)"], waited.stderr[-3000:]
    last = re.fullmatch(rf"headscope: error: {re.escape(message)} Waited (\d+) s \(--ray-wait\) for the cluster to "
                        r"grow\.", lines[-1])
    assert last and int(last.group(1)) >= 3, lines[-1]
    assert asked_after_refusal == [] and not written_after_refusals  # refused before anything was written
    # --ray-wait 120, a node with 4 CPUs joins while it waits: the run asked for its worker's and readers' CPUs, ran
    # on the node, and withdrew the request
    err = err_path.read_text()
    assert run.returncode == 0, err[-3000:]
    assert asked_while_waiting == [{"CPU": 0.25}, {"CPU": 0.25}]
    assert "3 texts written on ray" in err and asked_after_run == []
    entry = json.loads((tmp_path / "res" / "corpus.json").read_text())["runs"][-1]
    assert (entry["ray_instance"], entry["workers"], entry["ray_wait"]) == ("joined", 1, 120)
    assert 0 < entry["waited_seconds"] < entry["seconds"]
