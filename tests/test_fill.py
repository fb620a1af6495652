"""The Figure 2 fill (rddrs fill): image by image, alternating the sigmas, in the order of sigma
0.25's rows; each image's rows committed; resumed after a kill with nothing lost; bad input
refused in one line with nothing written. At the smoke preset (seconds an image)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from helpers import snapshot

from rddrs import RDDRSError
from rddrs.pipeline.files import exclusive
from rddrs.pipeline.results import COLUMNS, read_rows, read_sidecar, write_rows
from rddrs.studies import fill
from rddrs.studies.headline import PAIRED

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--data", str(ROOT / "data"), "--models", str(ROOT / "data" / "models")]
LATER = (datetime.now() + timedelta(hours=2)).isoformat(timespec="minutes")


def repository(tmp_path: Path) -> Path:
    """A git repository with an empty results folder, as the project's checkout."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for key, value in (("user.email", "fill@test"), ("user.name", "fill")):
        subprocess.run(["git", "-C", str(tmp_path), "config", key, value], check=True)
    (tmp_path / "results" / "smoke").mkdir(parents=True)
    return tmp_path / "results" / "smoke"


def rddrs(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rddrs", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kwargs,
    )


def rows_by_run(results: Path, sigma: float) -> dict[str, dict]:
    return {
        spec.out: read_rows(spec.out)
        for spec in fill.specs(results, sigma, 0, preset="smoke", data=ROOT / "data", models=ROOT / "data" / "models")
    }


def test_deadlines():
    now = datetime(2026, 12, 7, 10, 0)
    assert fill.parse_deadline("11:30", now) == datetime(2026, 12, 7, 11, 30)
    assert fill.parse_deadline("2026-12-08T09:15", now) == datetime(2026, 12, 8, 9, 15)
    for text, why in (
        ("09:59", "has passed"),
        ("2026-12-07T10:00", "has passed"),
        ("soon", "cannot read"),
        ("25:00", "cannot read"),
        ("", "cannot read"),
    ):
        with pytest.raises(RDDRSError, match=why):
            fill.parse_deadline(text, now)


def test_the_order_follows_sigma_025s_rows(tmp_path):
    results = tmp_path / "results"
    for spec in fill.specs(results, 0.25, 0, preset="smoke"):
        Path(spec.out).parent.mkdir(parents=True, exist_ok=True)
    lead = fill.specs(results, fill.LEAD_SIGMA, 0, preset="smoke")
    for i, spec in enumerate(lead):  # every paired run holds 5, 7 and 40; one also holds 3
        rows = [
            {**{c: 0 for c in COLUMNS}, "idx": k, "search": "ok"} for k in ([3, 5, 7, 40] if i == 0 else [5, 7, 40])
        ]
        write_rows(Path(spec.out), rows)
    assert fill.order(results, 12, preset="smoke", data=ROOT / "data") == [5, 7, 0, 1, 2, 3, 4, 6, 8, 9, 10, 11]


def test_image_by_image_alternating_committed_and_resumed(tmp_path):
    results = repository(tmp_path)
    first = rddrs(
        "fill", "--preset", "smoke", "--until", LATER, "--images", "2", "--commit", "--results", str(results), *COMMON
    )
    assert first.returncode == 0, first.stderr
    steps = [line.split(":")[0] for line in first.stdout.splitlines()[:4]]
    assert steps == ["sigma 0.5, image 0", "sigma 0.12, image 0", "sigma 0.5, image 1", "sigma 0.12, image 1"]
    log = subprocess.run(["git", "-C", str(tmp_path), "log", "--format=%s"], capture_output=True, text=True).stdout
    assert [line.split(": ")[1].split(" (")[0] for line in log.splitlines()] == [
        "test image 1 at sigma 0.12",
        "test image 1 at sigma 0.5",
        "test image 0 at sigma 0.12",
        "test image 0 at sigma 0.5",
    ]
    tracked = subprocess.run(["git", "-C", str(tmp_path), "ls-files"], capture_output=True, text=True).stdout.split()
    assert len(tracked) == 2 * 2 * len(PAIRED) and not any(".traces" in name for name in tracked)
    for sigma in (0.5, 0.12):
        runs = rows_by_run(results, sigma)
        assert len(runs) == len(PAIRED) and all(sorted(rows) == [0, 1] for rows in runs.values())
        for out in runs:
            part = read_sidecar(Path(out))["provenance"]
            assert part["threads"] == 1 and part["network"] in ("fast", "autograd") and part["processor"]
    again = rddrs("fill", "--preset", "smoke", "--until", LATER, "--images", "1", "--results", str(results), *COMMON)
    assert again.returncode == 0, again.stderr
    assert [line.split(":")[0] for line in again.stdout.splitlines()[:2]] == [
        "sigma 0.5, image 2",
        "sigma 0.12, image 2",
    ]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_fill_killed_at_any_moment_loses_nothing_and_the_next_one_finishes_the_same_rows(tmp_path, processes):
    """Killed with ``--processes 2`` its workers end with it: the rows stop changing."""
    whole, killed = repository(tmp_path / "a"), repository(tmp_path / "b")
    args = ["fill", "--preset", "smoke", "--until", LATER, "--images", "2", *COMMON]
    assert rddrs(*args, "--results", str(whole)).returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "rddrs", *args, "--processes", str(processes), "--results", str(killed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout.readline().startswith("sigma 0.5, image 0: ")  # done: kill it in the middle of the next
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = snapshot(killed)
    time.sleep(3.0)  # a smoke image takes seconds: a worker left running would write rows meanwhile
    assert snapshot(killed) == before
    before = {out: rows for sigma in (0.5, 0.12) for out, rows in rows_by_run(killed, sigma).items()}
    assert any(before.values())
    assert rddrs(*args, "--results", str(killed)).returncode == 0
    for sigma in (0.5, 0.12):
        want, got = rows_by_run(whole, sigma), rows_by_run(killed, sigma)
        for (out_w, rows_w), (out_k, rows_k) in zip(sorted(want.items()), sorted(got.items())):
            assert sorted(rows_w) == [0, 1] and {0, 1} <= set(rows_k)  # the second fill goes on after them
            for i in rows_w:
                assert {k: v for k, v in rows_k[i].items() if k != "seconds"} == {
                    k: v for k, v in rows_w[i].items() if k != "seconds"
                }, (out_k, i)
            for i, row in before.get(out_k, {}).items():  # rows finished before the kill are kept as they were
                assert rows_k[i] == row


def test_two_processes_compute_both_sigmas_side_by_side_each_at_its_next_image(tmp_path, monkeypatch):
    from rddrs.pipeline import engines, sweep

    one, two = repository(tmp_path / "a"), repository(tmp_path / "b")
    args = ["fill", "--preset", "smoke", "--until", LATER, *COMMON]
    assert rddrs(*args, "--images", "2", "--results", str(one)).returncode == 0
    assert rddrs(*args, "--images", "1", "--sigmas", "0.5", "--results", str(two)).returncode == 0  # 0.5 ahead
    calls, execute = [], sweep.execute

    def recorded(runs, engine):  # which engine computes which images of which sigmas in one call
        calls.append((type(engine), engine.capacity, {(spec.sigma, spec.ranges) for spec in runs}))
        return execute(runs, engine)

    monkeypatch.setattr(sweep, "execute", recorded)
    lines = []
    where = dict(preset="smoke", data=ROOT / "data", models=ROOT / "data" / "models")
    report = fill.fill(two, fill.parse_deadline(LATER), processes=2, images=1, log=lines.append, **where)
    assert report.images == {0.5: [1], 0.12: [0]}
    assert calls == [(engines.Local, 2, {(0.5, ((1, 2),)), (0.12, ((0, 1),))})]  # one call, two processes
    assert [line.split(":")[0] for line in lines] == ["sigma 0.5, image 1", "sigma 0.12, image 0"]
    assert all("beside 1 other sigma(s)" in line for line in lines)  # one wall time for the two
    for sigma, done in ((0.5, [0, 1]), (0.12, [0])):
        pairs = zip(sorted(rows_by_run(one, sigma).items()), sorted(rows_by_run(two, sigma).items()))
        for (out_1, rows_1), (_, rows_2) in pairs:
            assert sorted(rows_2) == done
            for i in done:  # the same rows as one process computing one image after another
                assert {k: v for k, v in rows_2[i].items() if k != "seconds"} == {
                    k: v for k, v in rows_1[i].items() if k != "seconds"
                }, (out_1, i)


@pytest.mark.parametrize("case", ["past", "unreadable", "no model", "busy"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    results = tmp_path / "results" / "smoke"
    results.mkdir(parents=True)
    args = ["fill", "--preset", "smoke", "--until", LATER, "--results", str(results), *COMMON]
    if case == "past":
        args[4] = "00:00"
    elif case == "unreadable":
        args[4] = "tomorrow-ish"
    elif case == "no model":
        args += ["--sigmas", "0.3"]
    if case == "busy":  # another fill or sweep holds the folder
        with exclusive(results / ".sweep"):
            before = snapshot(tmp_path)
            proc = rddrs(*args)
            after = snapshot(tmp_path)
    else:
        before = snapshot(tmp_path)
        proc = rddrs(*args)
        after = snapshot(tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rddrs fill: error: "), proc.stderr
    assert {
        "past": "has passed",
        "unreadable": "cannot read the deadline",
        "no model": "no model for sigma 0.3",
        "busy": "another sweep is computing runs",
    }[case] in lines[0]
    unlocked = {k: v for k, v in after.items() if not k.endswith(".lock")}  # a refused lock attempt touches the lock
    assert unlocked == {k: v for k, v in before.items() if not k.endswith(".lock")} and set(after) == set(before)
