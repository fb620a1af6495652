"""Runs as data and their sweep: the registry, shards and merges, the local and Ray engines, a
killed worker, a stopped driver, and two sweeps on one directory.

The Ray tests start one real local cluster (2 CPUs, a 300 MiB object store) for the module and
shut it down at the end."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import run_bound_by_permissions

from rddrs import RDDRSError
from rddrs.cli import main
from rddrs.core import presets
from rddrs.pipeline import engines, runspec, shards, sweep
from rddrs.pipeline.results import read_rows, result_path, traces_dir
from rddrs.studies import claims, registry
from rddrs.studies.study import study_specs

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MODELS = ROOT / "data" / "models"


def without_time(path):
    return {i: {k: v for k, v in row.items() if k != "seconds"} for i, row in read_rows(path).items()}


def specs_for(results, methods=("ddrs", "rddrs"), count=4, inputs_per_batch=1):
    """The standard runs of ``methods`` at sigma 0.25 (smoke), batching ``inputs_per_batch`` images."""
    specs = runspec.standard_specs(0.25, "smoke", results, methods=methods, count=count, data=DATA, models=MODELS)
    return [replace(s, inputs_per_batch=inputs_per_batch) for s in specs]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        object_store_memory=300 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


# -- the registry ---------------------------------------------------------------------------------


def test_the_committed_cpu_results_are_complete_for_the_chapters():
    """Every file chapters 6 to 8 read at the cpu preset is found complete: nothing to compute."""
    specs = registry.runs(
        "cpu", ROOT / "results" / "cpu", groups=["standard", "memory", "claims"], data=DATA, models=MODELS
    )
    assert len(specs) > 40 and shards.complete(specs)
    assert all(shards.plan(s, 25) == [] for s in specs)
    assert {state for _, state in registry.status(specs)} == {"complete"}


def test_registry_lists_each_file_once_after_what_it_starts_from(tmp_path):
    specs = registry.runs("smoke", tmp_path, data=DATA, models=MODELS)
    outs = [s.out for s in specs]
    assert len(outs) == len(set(outs))
    position = {s.out: k for k, s in enumerate(specs)}
    for spec in specs:
        if spec.depends is not None:
            assert position[spec.depends] < position[spec.out], spec.out
    by_out = {s.out: s for s in specs}
    for sigma in presets.SIGMAS:
        for method in ("ancer", "rddrs"):
            spec = by_out[str(result_path(tmp_path, method, sigma))]
            assert spec.init == str(result_path(tmp_path, "ddrs", sigma))
        memory = by_out[str(result_path(tmp_path, "rddrs", sigma)) + ".memory.tsv"]
        assert memory.kind == "memory" and memory.source == str(result_path(tmp_path, "rddrs", sigma))
    # the studies' variants, with the file paths of run_study
    floor = claims.studies("smoke")["floor"]
    assert str(tmp_path / "claims" / "floor" / "no_floor.tsv") in by_out
    # the variant with the preset's own settings is the standard run
    assert study_specs(floor, 0.25, "smoke", tmp_path, data=DATA, models=MODELS)["floor"].out == str(
        result_path(tmp_path, "rddrs", 0.25)
    )
    assert any("/claims/tuning/" in o for o in outs) and any("/claims/best_sigma0.12/" in o for o in outs)
    # a start holds every image of the runs that start from it
    ddrs = by_out[str(result_path(tmp_path, "ddrs", 0.25))]
    for spec in specs:
        if spec.init == ddrs.out:
            assert set(spec.indices()) <= set(ddrs.indices())


def test_registry_filters_keep_what_the_runs_start_from(tmp_path):
    specs = registry.runs(
        "smoke", tmp_path, sigmas=[0.5], methods=["rddrs"], groups=["standard"], count=3, data=DATA, models=MODELS
    )
    assert [(s.method, s.sigma, s.ranges) for s in specs] == [("ddrs", 0.5, ((0, 3),)), ("rddrs", 0.5, ((0, 3),))]
    memory = registry.runs(
        "smoke", tmp_path, sigmas=[0.12], methods=["rs"], groups=["memory"], data=DATA, models=MODELS
    )
    assert [s.kind for s in memory] == ["certify", "memory"]
    with pytest.raises(RDDRSError, match="unknown group"):
        registry.runs("smoke", tmp_path, groups=["nope"])
    with pytest.raises(RDDRSError, match="unknown method"):
        registry.runs("smoke", tmp_path, methods=["pgd"])


def test_two_different_runs_for_one_file_are_refused(tmp_path):
    a = specs_for(tmp_path, methods=("rs",))[0]
    with pytest.raises(RDDRSError, match="two different runs want the file"):
        runspec.combine([a, replace(a, seed=1)])
    joined = runspec.combine([a, replace(a, ranges=((6, 9),))])
    assert len(joined) == 1 and joined[0].ranges == ((0, 4), (6, 9))


# -- shards ---------------------------------------------------------------------------------------


def test_shards_cover_only_missing_images_and_resume_earlier_shards(tmp_path):
    spec = replace(specs_for(tmp_path, methods=("rs",), count=10, inputs_per_batch=2)[0])
    assert [(t.lo, t.hi) for t in shards.plan(spec, 4)] == [(0, 4), (4, 8), (8, 10)]
    assert [(t.lo, t.hi) for t in shards.plan(spec, 5)] == [(0, 4), (4, 8), (8, 10)]  # 5 -> 4: whole batches
    sweep.execute([replace(spec, ranges=((0, 3),))], shard_size=4)  # the file holds 0..2 now
    assert sorted(read_rows(spec.out)) == [0, 1, 2]
    assert [(t.lo, t.hi) for t in shards.plan(spec, 4)] == [(3, 4), (4, 8), (8, 10)]
    # a shard file left by a stopped sweep is resumed as it is, even of another shard size
    stale = shards.Task(spec, 4, 10)
    assert engines.run_task(shards.Task(spec, 4, 6))["status"] == "done"  # as if 4..9 stopped after two rows
    os.replace(shards.Task(spec, 4, 6).path, stale.path)
    os.replace(shards.Task(spec, 4, 6).path.with_name("4-6.tsv.json"), stale.path.with_name("4-10.tsv.json"))
    assert [(t.lo, t.hi) for t in shards.plan(spec, 4)] == [(3, 4), (4, 10)]
    report = sweep.execute([spec], shard_size=4)
    assert report.done == 2 and sorted(read_rows(spec.out)) == list(range(10))
    assert not shards.shards_dir(spec.out).exists()  # merged and removed
    assert shards.plan(spec, 4) == [] and sweep.execute([spec]).shards == 0


def test_a_merge_refuses_other_settings_and_rows_twice(tmp_path):
    spec = specs_for(tmp_path, methods=("rs",), count=4, inputs_per_batch=2)[0]
    sweep.execute([replace(spec, ranges=((0, 2),))])
    other = replace(spec, n=300)
    assert engines.run_task(shards.Task(other, 2, 4))["status"] == "done"
    with pytest.raises(RDDRSError, match="different settings"):
        shards.merge_shard(shards.Task(other, 2, 4))
    with pytest.raises(RDDRSError, match="other settings"):  # planning the sweep refuses the file too
        shards.plan(other, 2)
    again = shards.Task(spec, 0, 2)
    assert engines.run_task(again)["status"] == "done"
    with pytest.raises(RDDRSError, match="overlaps"):
        shards.merge_shard(again)
    assert sorted(read_rows(spec.out)) == [0, 1]


def test_a_diverging_search_is_rows_and_what_starts_from_it_goes_on(tmp_path):
    """DDRS at an absurd step size overflows at its first step on every image: its rows say so and
    keep the start sigma; the RDDRS run that starts from them is computed; nothing fails."""
    ddrs, rddrs = specs_for(tmp_path, count=2)
    wild = replace(ddrs, out=str(tmp_path / "wild.tsv"), search={"lr": 1e30, "max_step": 0})
    after = replace(rddrs, out=str(tmp_path / "after.tsv"), init=wild.out)
    report = sweep.execute([after, wild])
    assert not report.failed and report.done == report.shards == 2
    assert [(r["search"], r["sigma_min"]) for r in read_rows(wild.out).values()] == [("diverged@1", 0.25)] * 2
    assert [r["search"] for r in read_rows(after.out).values()] == ["ok"] * 2
    assert shards.complete([wild, after]) and sweep.execute([after, wild]).shards == 0


def test_a_failed_run_fails_what_starts_from_it_and_the_rest_goes_on(tmp_path):
    ddrs, rddrs = specs_for(tmp_path, count=2)
    rs = specs_for(tmp_path, methods=("rs",), count=2)[0]
    broken = replace(ddrs, model=str(tmp_path / "missing.pt"))
    report = sweep.execute([rddrs, broken, rs])
    assert "no such file" in report.failed[ddrs.out]
    assert "the run it reads, ddrs_sigma0.25.tsv, failed" in report.failed[rddrs.out]
    assert sorted(read_rows(rs.out)) == [0, 1] and not Path(rddrs.out).exists()


# -- engines give the same rows as one plain run --------------------------------------------------


def plain_runs(folder: Path) -> dict[str, Path]:
    """DDRS then RDDRS from it, each one `rddrs certify` over images 0..3, one image per batch."""
    ddrs, rddrs = result_path(folder, "ddrs", 0.25), result_path(folder, "rddrs", 0.25)
    common = [
        "--sigma",
        "0.25",
        "--model",
        str(MODELS / "mnist_cnn_sigma0.25.pt"),
        "--preset",
        "smoke",
        "--count",
        "4",
        "--inputs-per-batch",
        "1",
        "--data",
        str(DATA),
        "--quiet",
    ]
    assert main(["certify", "--method", "ddrs", "--out", str(ddrs), *common]) == 0
    assert main(["certify", "--method", "rddrs", "--out", str(rddrs), "--init", str(ddrs), *common]) == 0
    return {"ddrs": ddrs, "rddrs": rddrs}


def test_local_and_ray_sweeps_and_one_plain_certify_give_the_same_files(tmp_path, ray_cluster):
    from rddrs.pipeline.cluster import RayEngine

    plain = plain_runs(tmp_path / "plain")
    for name, engine in (("local", engines.Local(processes=2)), ("ray", RayEngine())):
        specs = specs_for(tmp_path / name)
        report = sweep.execute(specs, engine, shard_size=2, results=tmp_path / name)
        assert report.shards == report.done == 4 and not report.failed, report
        for spec in specs:
            assert without_time(spec.out) == without_time(plain[spec.method]), (name, spec.method)
            assert sorted(p.name for p in traces_dir(Path(spec.out)).iterdir()) == [f"{i}.npz" for i in range(4)]
            assert not shards.shards_dir(spec.out).exists()


# -- nothing lost: a killed worker, a stopped driver ----------------------------------------------


def holder_of(path: Path) -> int | None:
    """The process that has ``path`` open (the worker writing a shard), from /proc."""
    target = str(path.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == target:
                    return int(proc.name)
        except OSError:
            continue
    return None


@pytest.mark.parametrize("engine_name", ["ray", "local"])
def test_a_worker_killed_mid_shard_is_restarted_and_resumes(tmp_path, engine_name, request):
    """SIGKILL the worker process while it writes an RDDRS shard: the engine starts the shard
    again, it resumes from its flushed rows (they keep their timings), and the merged file is that
    of an uninterrupted run."""
    ddrs, rddrs = specs_for(tmp_path / "killed", count=8)
    sweep.execute([ddrs])  # the start, computed first
    reference = specs_for(tmp_path / "reference", count=8)
    sweep.execute(reference)
    if engine_name == "ray":
        request.getfixturevalue("ray_cluster")
        from rddrs.pipeline.cluster import RayEngine

        engine = RayEngine()
    else:
        engine = engines.Local(processes=1)
    shard = shards.Task(rddrs, 0, 8).path
    outcome = {}
    driver = threading.Thread(target=lambda: outcome.update(report=sweep.execute([rddrs], engine, shard_size=8)))
    driver.start()
    deadline, killed = time.time() + 240, None
    while time.time() < deadline and killed is None and driver.is_alive():
        written = len(read_rows(shard)) if shard.exists() else 0
        if 1 <= written < 8 and (pid := holder_of(shard)) is not None:
            before = read_rows(shard)
            os.kill(pid, signal.SIGKILL)
            killed = pid
        time.sleep(0.01)
    driver.join(300)
    assert killed is not None, "the shard finished before it could be killed"
    report = outcome["report"]
    assert not report.failed and report.done == 1, report
    merged = read_rows(rddrs.out)
    assert without_time(rddrs.out) == without_time(reference[1].out)
    kept = [i for i in before if merged[i]["seconds"] == before[i]["seconds"]]
    assert kept and kept == sorted(before)[: len(kept)]  # the flushed rows were not computed again
    assert len(list(traces_dir(Path(rddrs.out)).glob("*.npz"))) == 8


def test_a_ray_sweep_stopped_by_its_time_limit_merges_what_its_cancelled_shard_finished(tmp_path, ray_cluster):
    """``until`` on the Ray engine: the shard in flight at the deadline is cancelled (its worker
    killed), the batches it finished are merged, no shard file stays behind, and a sweep without a
    limit computes the rest; the rows are those of an uninterrupted run."""
    from rddrs.pipeline.cluster import RayEngine

    ddrs, rddrs = specs_for(tmp_path / "stopped", count=16)
    sweep.execute([ddrs])  # the start, computed first
    report = sweep.execute([rddrs], RayEngine(), shard_size=16, until=8)
    assert report.left == 1 and not report.failed, report
    first = read_rows(rddrs.out) if Path(rddrs.out).exists() else {}
    assert 1 <= len(first) < 16  # some batches finished before the deadline, not all
    assert not list((tmp_path / "stopped").rglob("*.shards*"))
    time.sleep(1)  # a worker still alive after the cancel would write again now
    assert not list((tmp_path / "stopped").rglob("*.shards*"))
    report = sweep.execute([rddrs], RayEngine(), shard_size=16)
    assert report.done == 1 and not report.failed, report
    reference = specs_for(tmp_path / "reference", count=16)
    sweep.execute(reference)
    assert without_time(rddrs.out) == without_time(reference[1].out)


def sweep_command(results: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rddrs",
        "sweep",
        "--preset",
        "smoke",
        "--results",
        str(results),
        "--groups",
        "standard",
        "--methods",
        "rddrs",
        "--sigmas",
        "0.25",
        "--count",
        "8",
        "--shard-size",
        "2",
        "--inputs-per-batch",
        "1",
        "--processes",
        "1",
        "--data",
        str(DATA),
        "--models",
        str(MODELS),
        "--quiet",
        *extra,
    ]


def test_a_stopped_sweep_computes_only_what_is_missing(tmp_path):
    results = tmp_path / "res"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        sweep_command(results), env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    out = result_path(results, "rddrs", 0.25)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(read_rows(out)) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, as a lost node
    proc.wait()
    first = read_rows(out)
    assert 2 <= len(first) < 8, "the sweep was not stopped in the middle"
    again = subprocess.run(sweep_command(results), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    computed = int(again.stdout.split(" of ")[0].split(", ")[-1])
    assert computed <= 6  # fewer shards than the whole sweep (DDRS and RDDRS advance chunk by chunk)
    final = read_rows(out)
    assert sorted(final) == list(range(8))
    assert all(final[i]["seconds"] == first[i]["seconds"] for i in first)  # merged rows are not recomputed
    reference = specs_for(tmp_path / "reference", count=8)
    sweep.execute(reference)
    assert without_time(out) == without_time(reference[1].out)


def pool_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    pool = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pool.append(int(proc.name))
        except OSError:  # ended meanwhile
            continue
    return pool


def running(pid: int) -> bool:
    """Whether process ``pid`` is there and has not ended (a zombie that no one reaps has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_the_pool_ends_with_its_driver(tmp_path, stop):
    """Kill the sweep's driver while its worker computes a shard (kill -9, or SIGTERM, which stops
    it cleanly): a few seconds later no process of its pool (the worker, the resource tracker)
    is left."""
    results = tmp_path / "res"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        sweep_command(results),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while (
            time.time() < deadline
            and proc.poll() is None
            and not any(read_rows(shard) for shard in results.glob("*.shards/*.tsv"))
        ):
            time.sleep(0.05)
        pool = pool_of(proc.pid)
        assert proc.poll() is None and any(b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pool)
        os.kill(proc.pid, stop)
        status = proc.wait(timeout=60)
        if stop == signal.SIGTERM:
            assert status == 128 + signal.SIGTERM and "rddrs sweep: terminated" in proc.stderr.read()
        deadline = time.time() + 10
        while time.time() < deadline and any(running(pid) for pid in pool):
            time.sleep(0.1)
        assert not [pid for pid in pool if running(pid)], "processes of the pool outlived their driver"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the session
        except ProcessLookupError:
            pass
        proc.wait()


def test_a_failure_that_a_retry_cannot_mend_is_not_offered_one(tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                "--preset",
                "smoke",
                "--results",
                str(tmp_path / "res"),
                "--groups",
                "standard",
                "--methods",
                "rs",
                "--sigmas",
                "0.25",
                "--count",
                "2",
                "--data",
                str(DATA),
                "--models",
                str(tmp_path / "no-models"),
                "--quiet",
                "--processes",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("failed: rs_sigma0.25.tsv: model ") and err[0].endswith("no such file")
    assert err[1:] == ["rddrs sweep: error: 1 of 1 runs failed (listed above)"]


def test_two_sweeps_on_one_directory_are_refused(tmp_path, capsys):
    results = tmp_path / "res"
    results.mkdir()
    args = [
        "sweep",
        "--preset",
        "smoke",
        "--results",
        str(results),
        "--groups",
        "standard",
        "--methods",
        "rs",
        "--sigmas",
        "0.25",
        "--count",
        "2",
        "--data",
        str(DATA),
        "--models",
        str(MODELS),
        "--quiet",
        "--processes",
        "1",
    ]
    with open(results / ".sweep.lock", "w") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "another sweep is computing runs in" in err and len(err.splitlines()) == 1
        assert sorted(p.name for p in results.iterdir()) == [".sweep.lock"]  # nothing written
    # a run's own lock still holds: a plain certify writing the file makes the sweep leave it
    out = result_path(results, "rs", 0.25)
    with open(out.with_name(out.name + ".lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(args) == 2
        captured = capsys.readouterr()
        assert "being written by another process" in captured.err and "1 failed" in captured.out
        assert captured.err.endswith("1 of 1 runs failed (listed above); run the same command again to retry them\n")
        assert not out.exists()
    assert main(args) == 0 and sorted(read_rows(out)) == [0, 1]


def test_sweep_lists_the_runs_and_their_state(tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                "--preset",
                "smoke",
                "--results",
                str(tmp_path),
                "--groups",
                "standard",
                "memory",
                "--sigmas",
                "0.5",
                "--list",
                "--data",
                str(DATA),
                "--models",
                str(MODELS),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and all("4 of 4 images missing" in line for line in lines[:1])
    assert any("memory pass over rddrs_sigma0.50.tsv" in line for line in lines)
    assert not any(tmp_path.iterdir())  # listing writes nothing


def test_no_help_imports_torch_or_ray():
    """``rddrs --help`` and every subcommand's ``--help`` print their usage without importing torch
    or ray (what keeps them immediate: benchmarks/bench_core.py section 6 times them)."""
    code = (
        "import argparse, sys\nfrom rddrs.cli import build_parser, main\n"
        "sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))\n"
        "for argv in [[], *([name] for name in sub.choices)]:\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit as stop:\n"
        "        assert stop.code == 0, argv\n"
        "    heavy = sorted({'torch', 'ray'} & set(sys.modules))\n"
        "    assert not heavy, f'rddrs {\" \".join(argv)} --help imported {heavy}'\n"
        "print(sorted(sub.choices), file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    )
    assert proc.returncode == 0, proc.stderr
    assert "sweep" in proc.stderr and "train" in proc.stderr and "--engine {local,ray}" in proc.stdout


# -- order, time limit, archives ----------------------------------------------------------------


def test_shards_start_by_priority_then_chunk_then_start_order(tmp_path):
    """A short session advances the most urgent runs together, chunk by chunk: the Inline engine
    runs the shards in the order the driver starts them."""
    ddrs, rddrs = specs_for(tmp_path, count=4)
    urgent = [replace(ddrs, priority=0), replace(rddrs, priority=0)]
    later = replace(specs_for(tmp_path, methods=("rs",), count=4)[0], priority=5)
    started = []

    class Recording(engines.Inline):
        def submit(self, task):
            started.append((Path(task.spec.out).name, task.lo))
            super().submit(task)

    report = sweep.execute([later, *urgent], Recording(), shard_size=2)
    assert not report.failed
    assert started == [
        ("ddrs_sigma0.25.tsv", 0),
        ("rddrs_sigma0.25.tsv", 0),
        ("ddrs_sigma0.25.tsv", 2),
        ("rddrs_sigma0.25.tsv", 2),
        ("rs_sigma0.25.tsv", 0),
        ("rs_sigma0.25.tsv", 2),
    ]


def test_no_shard_starts_after_the_time_limit_and_bad_limits_are_refused(tmp_path):
    specs = specs_for(tmp_path, count=4)
    report = sweep.execute(specs, shard_size=2, until=1e-9)
    assert report.done == 0 and report.left == report.shards == 4 and not report.failed
    assert "4 left for the next sweep" in report.summary()
    assert not any(Path(s.out).exists() for s in specs)
    with pytest.raises(RDDRSError, match="time limit must be > 0"):
        sweep.execute(specs, until=0)
    again = sweep.execute(specs, shard_size=2, until=3600)
    assert again.done == 4 and again.left == 0


def test_a_sweep_stopped_by_its_time_limit_lands_its_finished_batches(tmp_path):
    """The CLI with --until: the shard still running at the deadline is stopped (with no warning of
    a leaked semaphore), the batches it finished are merged (no shard file stays behind), the sweep
    exits 0, and the same command without a limit computes the rest; the rows are those of an
    uninterrupted run."""
    results = tmp_path / "res"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    command = [*sweep_command(results), "--shard-size", "8", "--count", "24"]  # the last --count wins
    stopped = subprocess.run([*command, "--until", "6"], env=env, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 0, stopped.stderr
    assert "left for the next sweep" in stopped.stdout
    assert "leaked" not in stopped.stderr  # the stopped worker left no semaphore behind
    out = result_path(results, "rddrs", 0.25)
    first = read_rows(out)
    assert len(first) < 24
    assert not list(results.rglob("*.shards"))
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(read_rows(out)) == list(range(24))
    reference = specs_for(tmp_path / "reference", count=24)
    sweep.execute(reference)
    assert without_time(out) == without_time(reference[1].out)


def test_pack_and_land_into_read_only_places_are_one_line_and_write_nothing(tmp_path):
    here, closed = tmp_path / "here", tmp_path / "closed"
    assert (
        main(
            [
                "sweep",
                "--preset",
                "smoke",
                "--groups",
                "standard",
                "--methods",
                "rs",
                "--sigmas",
                "0.25",
                "--data",
                str(DATA),
                "--models",
                str(MODELS),
                "--quiet",
                "--processes",
                "1",
                "--results",
                str(here),
                "--count",
                "1",
            ]
        )
        == 0
    )
    archive = tmp_path / "rows.tar.gz"
    assert main(["pack", "--preset", "smoke", "--since", "0", "--results", str(here), "--out", str(archive)]) == 0
    closed.mkdir()
    closed.chmod(0o555)
    pack = ["pack", "--preset", "smoke", "--since", "0", "--results", here, "--out", closed / "a.tar.gz"]
    for args, message in (
        (pack, f"cannot write the archive {closed}/a.tar.gz (PermissionError"),
        (["land", archive, "--results", closed, "--models", MODELS], f"cannot write in {closed} (PermissionError"),
    ):
        proc = run_bound_by_permissions(args, tmp_path)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err
        assert message in err
        assert not any(closed.iterdir())


def test_pack_and_land_move_new_rows_and_refuse_other_presets_and_models(tmp_path, capsys):
    from rddrs.pipeline.archive import pack

    here, there = tmp_path / "here", tmp_path / "there"
    base = [
        "sweep",
        "--preset",
        "smoke",
        "--groups",
        "standard",
        "--methods",
        "rs",
        "--sigmas",
        "0.25",
        "--data",
        str(DATA),
        "--models",
        str(MODELS),
        "--quiet",
        "--processes",
        "1",
    ]
    assert main([*base, "--results", str(here), "--count", "2"]) == 0
    import shutil

    shutil.copytree(here, there)  # the copy a GPU session starts from
    archive = tmp_path / "rows.tar.gz"
    start = time.time()
    time.sleep(0.05)
    assert main([*base, "--results", str(there), "--count", "4"]) == 0
    (there / "claims").mkdir()
    (there / "claims" / "measured.json").write_text('{"a": 1}')  # a cached measurement
    assert (
        main(["pack", "--preset", "smoke", "--since", str(start), "--results", str(there), "--out", str(archive)]) == 0
    )
    assert "packed 1 result files (4 rows) and 1 measurements" in capsys.readouterr().out
    assert main(["land", str(archive), "--results", str(here), "--models", str(MODELS)]) == 0
    assert "landed 2 new rows in 1 files" in capsys.readouterr().out
    assert sorted(read_rows(result_path(here, "rs", 0.25))) == [0, 1, 2, 3]
    assert (here / "claims" / "measured.json").read_text() == '{"a": 1}'
    assert main(["land", str(archive), "--results", str(here), "--models", str(MODELS)]) == 0  # again: nothing new
    assert "landed 0 new rows" in capsys.readouterr().out
    meta = json.loads((here / "rs_sigma0.25.tsv.json").read_text())
    assert [part["rows"] for part in meta["parts"]] == [[[0, 2]], [[2, 4]]]
    # another preset's results, another model, an archive that is no archive: one line, nothing written
    other = tmp_path / "cpu"
    other.mkdir()
    (other / "x.tsv.json").write_text(json.dumps({"settings": {"preset": "cpu"}}))
    fake_models = tmp_path / "models"
    fake_models.mkdir()
    (fake_models / "mnist_cnn_sigma0.25.pt").write_bytes(b"other weights")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    for args, message in (
        (["--results", str(other), "--models", str(MODELS)], "holds rows of preset smoke"),
        (["--results", str(tmp_path / "new"), "--models", str(fake_models)], "another model"),
        (["--results", str(here)], "no such archive"),
    ):
        target = archive if message != "no such archive" else tmp_path / "missing.tar.gz"
        assert main(["land", str(target), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert main(["land", str(junk), "--results", str(here)]) == 2
    assert "is not an archive of rddrs rows" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and sorted(p.name for p in other.iterdir()) == ["x.tsv.json"]
    (here / "claims" / "measured.json").write_text('{"a": 2}')  # another measurement of the same name
    assert main(["land", str(archive), "--results", str(here), "--models", str(MODELS)]) == 2
    assert "exists here with other content" in capsys.readouterr().err
    with pytest.raises(RDDRSError, match="not under the results directory"):
        pack([result_path(here, "rs", 0.25)], there, tmp_path / "x.tar.gz", "smoke")


def test_a_gpu_sweep_on_a_machine_without_one_is_refused_in_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert (
        main(
            [
                "sweep",
                "--preset",
                "smoke",
                "--device",
                "cuda",
                "--results",
                str(tmp_path),
                "--groups",
                "standard",
                "--methods",
                "rs",
                "--data",
                str(DATA),
                "--models",
                str(MODELS),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "CUDA is not available" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())
    assert main(["sweep", "--preset", "smoke", "--until", "-5", "--results", str(tmp_path)]) == 2
    assert "--until must be" in capsys.readouterr().err


def test_a_study_alone_holds_its_own_images_of_the_standard_runs_it_shares(tmp_path):
    """The mechanism group alone: its RS variant is the standard RS file, but only on its images
    (a GPU session once computed 600 RS images it did not ask for)."""
    specs = registry.runs("smoke", tmp_path, groups=["mechanism"], data=DATA, models=MODELS)
    rs = next(s for s in specs if s.out == str(result_path(tmp_path, "rs", 0.25)))
    assert rs.indices() == [0, 1]
    both = registry.runs("smoke", tmp_path, groups=["mechanism", "standard"], data=DATA, models=MODELS)
    assert next(s for s in both if s.out == rs.out).indices() == [0, 1, 2, 3]
