"""End-to-end certification runs through the CLI at the smoke preset: rows, resume, merge."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import exit_status, run_bound_by_permissions, snapshot

import rddrs.pipeline.runs
from rddrs.cli import main
from rddrs.pipeline.models import MnistCNN
from rddrs.pipeline.results import COLUMNS, read_rows, sidecar_path, traces_dir

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained CNN checkpoint (speed and bookkeeping do not depend on training)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "cnn.pt"
    torch.save({"state_dict": MnistCNN().state_dict(), "arch": "MnistCNN"}, path)
    return path


def certify(checkpoint, out, method="rs", *extra):
    args = [
        "certify",
        "--method",
        method,
        "--sigma",
        "0.25",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--preset",
        "smoke",
        "--data",
        str(DATA),
        "--quiet",
        *extra,
    ]
    return main(args)


def rows_without_time(path):
    return {i: {k: v for k, v in row.items() if k != "seconds"} for i, row in read_rows(path).items()}


@pytest.mark.parametrize("method", ["rs", "ddrs", "ancer", "rddrs"])
def test_each_method_writes_rows_and_sidecar(checkpoint, tmp_path, method):
    out = tmp_path / f"{method}.tsv"
    assert certify(checkpoint, out, method, "--count", "3") == 0
    lines = out.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == COLUMNS
    rows = read_rows(out)
    assert sorted(rows) == [0, 1, 2]
    for row in rows.values():
        assert row["correct"] == int(row["predict"] == row["label"])
        assert row["radius"] <= row["proxy_radius"] + 1e-12  # the inscribed ball is the smaller one
        assert row["sigma_min"] <= row["sigma_proxy"] <= row["sigma_max"] + 1e-9
        if row["predict"] == -1:
            assert row["radius"] == row["gap"] == 0
    side = json.loads((tmp_path / f"{method}.tsv.json").read_text())
    assert side["settings"]["method"] == method and side["settings"]["n"] == 200
    assert side["provenance"]["versions"]["torch"] == torch.__version__
    assert len(list((tmp_path / f"{method}.tsv.traces").glob("*.npz"))) == (0 if method == "rs" else 3)
    if method != "rs":
        assert side["settings"]["search"]["ddrs"]["iterations"] == 10
        # the stored final parameter reproduces the row's scales
        shape = {"ddrs": (), "ancer": (784,), "rddrs": (784, 784)}[method]
        for i, row in rows.items():
            param = np.load(tmp_path / f"{method}.tsv.traces" / f"{i}.npz")["param"]
            assert param.shape == shape
            scales = np.linalg.eigvalsh(param.astype(np.float64)) if param.ndim == 2 else np.atleast_1d(param)
            assert scales.min() == pytest.approx(row["sigma_min"], rel=1e-5)
    if method == "rs":
        assert all(row["sigma_min"] == pytest.approx(0.25) for row in rows.values())


def test_resume_keeps_rows_and_matches_an_uninterrupted_run(checkpoint, tmp_path):
    whole, parts = tmp_path / "whole.tsv", tmp_path / "parts.tsv"
    assert certify(checkpoint, whole, "ddrs", "--count", "5") == 0
    assert certify(checkpoint, parts, "ddrs", "--count", "2") == 0
    with open(parts, "a") as f:  # a run killed in the middle of writing a row
        f.write("2\t1\t1\t1\t0.5")
    assert certify(checkpoint, parts, "ddrs", "--count", "5") == 0
    lines = parts.read_text().splitlines()
    assert len(lines) == 6 and [int(line.split("\t")[0]) for line in lines[1:]] == [0, 1, 2, 3, 4]
    assert rows_without_time(parts) == rows_without_time(whole)


def test_a_killed_run_resumes_without_loss_or_duplicates(checkpoint, tmp_path):
    out = tmp_path / "killed.tsv"
    cmd = [
        sys.executable,
        "-m",
        "rddrs",
        "certify",
        "--method",
        "rs",
        "--sigma",
        "0.25",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--preset",
        "smoke",
        "--data",
        str(DATA),
        "--count",
        "40",
        "--n",
        "3000",
        "--inputs-per-batch",
        "1",
        "--quiet",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(out.read_text().splitlines()) - 1
    assert 3 <= written < 40  # it was killed mid-way
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    reference = tmp_path / "reference.tsv"
    subprocess.run(
        cmd[: cmd.index("--out") + 1] + [str(reference)] + cmd[cmd.index("--out") + 2 :],
        env=env,
        check=True,
        capture_output=True,
    )
    assert [int(line.split("\t")[0]) for line in out.read_text().splitlines()[1:]] == list(range(40))
    assert rows_without_time(out) == rows_without_time(reference)


def test_settings_mismatch_is_an_error(checkpoint, tmp_path, capsys):
    out = tmp_path / "rs.tsv"
    assert certify(checkpoint, out, "rs", "--count", "2") == 0
    assert certify(checkpoint, out, "rs", "--count", "2", "--n", "300") == 2
    err = capsys.readouterr().err.strip()
    assert "other settings" in err and "n" in err and len(err.splitlines()) == 1
    assert len(read_rows(out)) == 2  # nothing was added or lost


def test_merge_joins_shards_and_rejects_overlaps_and_gaps(checkpoint, tmp_path, capsys):
    a, b, c, whole = (tmp_path / f"{n}.tsv" for n in ("a", "b", "c", "whole"))
    assert certify(checkpoint, a, "rddrs", "--start", "0", "--count", "2") == 0
    assert certify(checkpoint, b, "rddrs", "--start", "2", "--count", "2") == 0
    assert certify(checkpoint, whole, "rddrs", "--count", "4") == 0
    merged = tmp_path / "merged.tsv"
    assert main(["merge", str(b), str(a), "--out", str(merged)]) == 0
    assert [int(line.split("\t")[0]) for line in merged.read_text().splitlines()[1:]] == [0, 1, 2, 3]
    got, want = rows_without_time(merged), rows_without_time(whole)
    assert {i: r["predict"] for i, r in got.items()} == {i: r["predict"] for i, r in want.items()}
    for i in want:  # batched and single linear algebra agree to rounding
        assert got[i]["proxy_radius"] == pytest.approx(want[i]["proxy_radius"], rel=1e-4, abs=1e-6)
    assert len(list((tmp_path / "merged.tsv.traces").glob("*.npz"))) == 4
    assert main(["merge", str(a), str(whole), "--out", str(tmp_path / "x.tsv")]) == 2
    assert "overlaps" in capsys.readouterr().err
    assert certify(checkpoint, c, "rddrs", "--start", "5", "--count", "1") == 0
    assert main(["merge", str(a), str(c), "--out", str(tmp_path / "y.tsv")]) == 2
    assert "miss idx 2" in capsys.readouterr().err


def test_init_reuses_ddrs_optimum(checkpoint, tmp_path):
    ddrs, direct, reused = tmp_path / "ddrs.tsv", tmp_path / "ancer.tsv", tmp_path / "ancer_init.tsv"
    assert certify(checkpoint, ddrs, "ddrs", "--count", "3") == 0
    assert certify(checkpoint, direct, "ancer", "--count", "3") == 0
    assert certify(checkpoint, reused, "ancer", "--count", "3", "--init", str(ddrs)) == 0
    assert rows_without_time(reused) == rows_without_time(direct)
    assert certify(checkpoint, tmp_path / "other.tsv", "rddrs", "--count", "3", "--init", str(ddrs), "--seed", "1") == 2


@pytest.mark.parametrize("method", ["rs", "ddrs", "rddrs"])
def test_rotated_run_reproduces_an_invariant_method(checkpoint, tmp_path, method):
    """--rotate draws U eps where the plain run draws eps: the rotated run of an invariant method is
    the plain run seen in other coordinates, so its rows agree up to float error."""
    plain, turned = tmp_path / "plain.tsv", tmp_path / "turned.tsv"
    assert certify(checkpoint, plain, method, "--count", "3") == 0
    assert certify(checkpoint, turned, method, "--count", "3", "--rotate", "1") == 0
    assert json.loads((tmp_path / "turned.tsv.json").read_text())["settings"]["rotate"] == 1
    p, t = rows_without_time(plain), rows_without_time(turned)
    for i in p:
        assert t[i]["predict"] == p[i]["predict"]
        for key in ("gap", "proxy_radius", "radius", "sigma_min", "sigma_max"):
            assert t[i][key] == pytest.approx(p[i][key], rel=1e-3, abs=1e-4), (i, key)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alpha", "1.5"], "alpha"),
        (["--sigma", "-1"], "sigma"),
        (["--device", "cuda:7"], "CUDA" if not torch.cuda.is_available() else "device"),
        (["--start", "10000"], "outside"),
    ],
)
def test_bad_arguments_give_one_line(checkpoint, tmp_path, capsys, extra, message):
    args = [
        "certify",
        "--method",
        "rs",
        "--sigma",
        "0.25",
        "--model",
        str(checkpoint),
        "--out",
        str(tmp_path / "x.tsv"),
        "--preset",
        "smoke",
        "--data",
        str(DATA),
        "--quiet",
    ]
    if "--sigma" in extra:
        args[args.index("--sigma") + 1] = extra[1]
        extra = []
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_model_and_init_errors(checkpoint, tmp_path, capsys):
    assert certify(tmp_path / "nope.pt", tmp_path / "x.tsv") == 2
    assert "no such file" in capsys.readouterr().err
    assert certify(checkpoint, tmp_path / "y.tsv", "rddrs", "--init", str(tmp_path / "none.tsv")) == 2
    assert "no such result file" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["rs", "rddrs"])
def test_exported_program_certifies_like_its_checkpoint(tmp_path, method):
    models = ROOT / "data" / "models"
    a, b = tmp_path / "pt.tsv", tmp_path / "pt2.tsv"
    assert certify(models / "mnist_cnn_sigma0.25.pt", a, method, "--count", "3") == 0
    assert certify(models / "mnist_cnn_sigma0.25.pt2", b, method, "--count", "3") == 0
    got, want = read_rows(b), read_rows(a)
    assert [r["predict"] for r in got.values()] == [r["predict"] for r in want.values()]
    for i in want:  # the same network, up to float rounding of two implementations
        assert got[i]["proxy_radius"] == pytest.approx(want[i]["proxy_radius"], rel=1e-3, abs=1e-6)
        assert got[i]["sigma_max"] == pytest.approx(want[i]["sigma_max"], rel=1e-4)


def test_standard_runs_compute_what_is_missing_and_nothing_else(checkpoint, tmp_path, monkeypatch):
    from rddrs.pipeline import runspec, sweep
    from rddrs.pipeline.results import sidecar_path

    models = tmp_path / "models"
    models.mkdir()
    (models / "mnist_cnn_sigma0.25.pt").write_bytes(checkpoint.read_bytes())

    def standard_runs():
        wanted = runspec.standard_specs(0.25, "smoke", tmp_path / "res", count=2, data=DATA, models=models)
        sweep.execute(wanted, results=tmp_path / "res").check()
        return {spec.method: Path(spec.out) for spec in wanted}

    outs = standard_runs()
    assert sorted(outs) == sorted(["rs", "ddrs", "ancer", "rddrs"])
    ddrs = read_rows(outs["ddrs"])
    for method in ("ancer", "rddrs"):  # started from DDRS' sigma_x*, which is their floor
        side = json.loads(sidecar_path(outs[method]).read_text())["settings"]
        assert side["init"] == "ddrs_sigma0.25.tsv"
        for i, row in read_rows(outs[method]).items():
            assert row["sigma_min"] >= ddrs[i]["sigma_min"] * (1 - 1e-6)
    calls = []
    monkeypatch.setattr(rddrs.pipeline.runs, "find_smoothing", lambda *a, **k: calls.append(a))
    again = standard_runs()
    assert again == outs and calls == []


def test_make_settings_errors(checkpoint):
    from rddrs import RDDRSError
    from rddrs.pipeline.settings import make_settings

    for kwargs, message in [
        (dict(method="pgd"), "unknown method"),
        (dict(sigma=0.0), r"sigma must lie in \[1e-06, 1000\]"),
        (dict(alpha=1.5), "alpha must lie in"),
        (dict(preset="huge"), "unknown preset"),
        (dict(method="rs", search={"lr": 1.0}), "RS has no search"),
        (dict(method="ddrs", init="x.tsv"), "applies to method ancer or rddrs"),
        (dict(model="missing.pt"), "no such file"),
    ]:
        args = dict(method="rddrs", sigma=0.25, model=checkpoint, preset="smoke") | kwargs
        with pytest.raises(RDDRSError, match=message):
            make_settings(**args)
    settings = make_settings("rddrs", 0.25, checkpoint, "smoke", search={"kappa": 2.0, "max_step": 0})
    assert settings.search["rddrs"]["kappa"] == 2.0 and settings.search["rddrs"]["max_step"] is None
    assert settings.search["ddrs"]["kappa"] == 0.0


def test_a_second_writer_of_the_same_file_is_refused(checkpoint, tmp_path, capsys):
    import fcntl

    out = tmp_path / "busy.tsv"
    with open(tmp_path / "busy.tsv.lock", "w") as held:  # as a run in another process holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert certify(checkpoint, out, "rs", "--count", "2") == 2
        assert "being written by another process" in capsys.readouterr().err
        assert not out.exists() or read_rows(out) == {}
    assert certify(checkpoint, out, "rs", "--count", "2") == 0  # released: the run goes ahead
    assert sorted(read_rows(out)) == [0, 1] and not (tmp_path / "busy.tsv.lock").exists()


def test_rddrs_from_ancer_with_no_steps_certifies_ancers_ellipsoid(checkpoint, tmp_path):
    """C = diag(theta) from the ANCER run's traces, floor sigma_x*, zero steps: the same draws
    (common random numbers) certify the same region, to rounding."""
    ddrs, ancer, rddrs = tmp_path / "ddrs.tsv", tmp_path / "ancer.tsv", tmp_path / "rddrs.tsv"
    assert certify(checkpoint, ddrs, "ddrs", "--count", "3") == 0
    assert certify(checkpoint, ancer, "ancer", "--count", "3", "--init", str(ddrs)) == 0
    assert certify(checkpoint, rddrs, "rddrs", "--count", "3", "--init", str(ancer), "--iterations", "0") == 0
    a, r = rows_without_time(ancer), rows_without_time(rddrs)
    for i in a:
        assert r[i]["predict"] == a[i]["predict"] and r[i]["gap"] == a[i]["gap"]
        for key in ("proxy_radius", "radius", "sigma_min", "sigma_proxy", "sigma_max"):
            assert r[i][key] == pytest.approx(a[i][key], rel=1e-6), (i, key)
    side = json.loads((tmp_path / "rddrs.tsv.json").read_text())["settings"]
    assert side["init"] == "ancer.tsv" and side["search"]["rddrs"]["iterations"] == 0


def test_search_options_reach_the_sidecar(checkpoint, tmp_path):
    from rddrs.core.stats import gap_cap

    out = tmp_path / "ancer.tsv"
    assert (
        certify(
            checkpoint,
            out,
            "ancer",
            "--count",
            "1",
            "--iterations",
            "3",
            "--samples",
            "8",
            "--lr",
            "0.5",
            "--kappa",
            "1.5",
            "--max-step",
            "0.2",
            "--objective",
            "capped",
            "--step",
            "sgd",
        )
        == 0
    )
    search = json.loads((tmp_path / "ancer.tsv.json").read_text())["settings"]["search"]
    assert {
        k: search["ancer"][k] for k in ("iterations", "samples", "lr", "kappa", "max_step", "objective", "step")
    } == {"iterations": 3, "samples": 8, "lr": 0.5, "kappa": 1.5, "max_step": 0.2, "objective": "capped", "step": "sgd"}
    assert search["ancer"]["cap"] == pytest.approx(gap_cap(200, 0.01))  # the smoke preset's n and alpha
    assert search["ddrs"]["objective"] == "soft"  # only the method's own search changes
    # a resumed run with another objective is refused
    assert (
        certify(
            checkpoint,
            out,
            "ancer",
            "--count",
            "1",
            "--iterations",
            "3",
            "--samples",
            "8",
            "--lr",
            "0.5",
            "--kappa",
            "1.5",
            "--max-step",
            "0.2",
            "--objective",
            "soft",
            "--step",
            "sgd",
        )
        == 2
    )


@pytest.mark.parametrize(
    "method, init_method, message",
    [
        ("ancer", "ancer", "ancer starts from ddrs"),
        ("rddrs", "rddrs", "rddrs starts from ddrs or ancer"),
        ("ddrs", "ddrs", "applies to method ancer or rddrs"),
    ],
)
def test_an_init_file_of_the_wrong_method_is_refused(checkpoint, tmp_path, capsys, method, init_method, message):
    init = tmp_path / f"{init_method}.tsv"
    assert certify(checkpoint, init, init_method, "--count", "1") == 0
    capsys.readouterr()
    assert certify(checkpoint, tmp_path / "x.tsv", method, "--count", "1", "--init", str(init)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_bad_objective_or_step_is_a_one_line_error(checkpoint, tmp_path, capsys):
    for option, value in (("--objective", "hard"), ("--step", "lbfgs")):
        with pytest.raises(SystemExit) as exit_:
            certify(checkpoint, tmp_path / "x.tsv", "rddrs", "--count", "1", option, value)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "invalid choice" in err and len(err.splitlines()) == 1
    assert certify(checkpoint, tmp_path / "y.tsv", "rs", "--count", "1", "--objective", "capped") == 2
    assert "RS has no search" in capsys.readouterr().err
    assert certify(checkpoint, tmp_path / "z.tsv", "ancer", "--count", "1", "--diagonal") == 2
    err = capsys.readouterr().err.strip()
    assert "diagonal-only" in err and "ANCER" in err and len(err.splitlines()) == 1


def test_a_diagonal_only_rddrs_run_records_the_option_and_keeps_C_diagonal(checkpoint, tmp_path):
    out = tmp_path / "diag.tsv"
    assert certify(checkpoint, out, "rddrs", "--count", "1", "--diagonal") == 0
    assert json.loads((tmp_path / "diag.tsv.json").read_text())["settings"]["search"]["rddrs"]["diagonal"] is True
    c = np.load(tmp_path / "diag.tsv.traces" / "0.npz")["param"]
    assert c.shape == (784, 784) and np.count_nonzero(c - np.diag(np.diag(c))) == 0
    assert np.ptp(np.diag(c)) > 0  # the search moved the scales apart


# -- what the command line lacked -----------------------------------------------------------------


def test_rddrs_search_options_reach_the_sidecar_and_max_step_0_removes_the_bound(checkpoint, tmp_path):
    out = tmp_path / "rddrs.tsv"
    assert (
        certify(
            checkpoint,
            out,
            "rddrs",
            "--count",
            "1",
            "--iterations",
            "2",
            "--samples",
            "6",
            "--lr",
            "0.7",
            "--kappa",
            "0.25",
            "--max-step",
            "0",
        )
        == 0
    )
    search = json.loads((tmp_path / "rddrs.tsv.json").read_text())["settings"]["search"]
    assert {k: search["rddrs"][k] for k in ("iterations", "samples", "lr", "kappa", "max_step")} == {
        "iterations": 2,
        "samples": 6,
        "lr": 0.7,
        "kappa": 0.25,
        "max_step": None,
    }
    assert search["ddrs"]["iterations"] == 10  # the start keeps the preset's search
    trace = np.load(tmp_path / "rddrs.tsv.traces" / "0.npz")
    assert trace["rddrs"].shape == (2,)  # two iterations ran


def test_merge_refuses_shards_of_different_settings(checkpoint, tmp_path, capsys):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    assert certify(checkpoint, a, "rs", "--start", "0", "--count", "2") == 0
    assert certify(checkpoint, b, "rs", "--start", "2", "--count", "2", "--n", "300") == 0
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m.tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "different settings" in err and "n differ" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.tsv").exists()


def test_init_of_another_sigma_or_missing_rows_is_refused(checkpoint, tmp_path, capsys):
    ddrs = tmp_path / "ddrs.tsv"
    assert certify(checkpoint, ddrs, "ddrs", "--count", "2") == 0
    capsys.readouterr()
    other = [
        "certify",
        "--method",
        "ancer",
        "--sigma",
        "0.5",
        "--model",
        str(checkpoint),
        "--preset",
        "smoke",
        "--data",
        str(DATA),
        "--quiet",
        "--count",
        "2",
        "--init",
        str(ddrs),
        "--out",
        str(tmp_path / "a.tsv"),
    ]
    assert main(other) == 2
    err = capsys.readouterr().err.strip()
    assert "ancer starts from ddrs at sigma=0.5" in err and len(err.splitlines()) == 1
    assert certify(checkpoint, tmp_path / "b.tsv", "ancer", "--count", "3", "--init", str(ddrs)) == 2
    err = capsys.readouterr().err.strip()
    assert "has no row for idx 2" in err and len(err.splitlines()) == 1
    assert read_rows(tmp_path / "b.tsv") == {}  # nothing certified


def test_a_killed_search_resumes_with_its_traces(checkpoint, tmp_path):
    """SIGKILL an RDDRS run (a search that writes traces) mid-way: the rerun keeps the flushed rows
    and their traces, and ends with the rows and parameters of an uninterrupted run."""
    ddrs = tmp_path / "ddrs.tsv"
    assert certify(checkpoint, ddrs, "ddrs", "--count", "8") == 0
    out, reference = tmp_path / "killed.tsv", tmp_path / "reference.tsv"
    cmd = [
        sys.executable,
        "-m",
        "rddrs",
        "certify",
        "--method",
        "rddrs",
        "--sigma",
        "0.25",
        "--model",
        str(checkpoint),
        "--preset",
        "smoke",
        "--data",
        str(DATA),
        "--count",
        "8",
        "--init",
        str(ddrs),
        "--inputs-per-batch",
        "1",
        "--quiet",
        "--out",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd + [str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(read_rows(out)) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_rows(out)
    assert 2 <= len(before) < 8, "the run was not killed mid-way"
    subprocess.run(cmd + [str(out)], env=env, check=True, capture_output=True)
    subprocess.run(cmd + [str(reference)], env=env, check=True, capture_output=True)
    after = read_rows(out)
    assert sorted(after) == list(range(8)) and all(after[i]["seconds"] == before[i]["seconds"] for i in before)
    assert rows_without_time(out) == rows_without_time(reference)
    for i in range(8):
        got = np.load(tmp_path / "killed.tsv.traces" / f"{i}.npz")
        want = np.load(tmp_path / "reference.tsv.traces" / f"{i}.npz")
        np.testing.assert_array_equal(got["param"], want["param"])
        np.testing.assert_array_equal(got["rddrs"], want["rddrs"])


class Recorder(torch.nn.Module):
    """A model that keeps every input it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("family", ["isotropic", "full"])
def test_one_certify_call_never_reuses_a_selection_draw_for_estimation(family):
    """The model records its inputs: within one CERTIFY call, no noise vector of the n0 selection
    draws is among the n estimation draws (exact rows, recovered as S^-1 (y - x))."""
    from rddrs.core.certify import certify as cohen
    from rddrs.core.noise import FullSPD, Isotropic

    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    d = 784
    if family == "isotropic":
        law = Isotropic(torch.tensor([0.25, 0.4], dtype=torch.float64), d)
    else:
        q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        law = FullSPD(torch.stack([(q * torch.linspace(0.2, 0.6, d, dtype=torch.float64)) @ q.T] * 2))
    model = Recorder(MnistCNN().double().eval())
    n0, n = 20, 300
    cohen(model, x, law, [3, 8], n0, n, alpha=0.01, seed=0, batch_size=100)
    draws = {0: [], 1: []}
    for y in model.seen:  # a batch holds m noisy copies of input 0, then m of input 1
        y = y.reshape(len(x), -1, d)
        for j in range(len(x)):
            draws[j].append(y[j])
    for j in range(len(x)):
        noisy = torch.cat(draws[j])
        assert len(noisy) == n0 + n  # selection first, then estimation
        offset = (noisy - x[j].reshape(1, d)).T
        eps = (offset / law.param[j] if family == "isotropic" else torch.linalg.solve(law.param[j], offset)).T
        select, estimate = eps[:n0], eps[n0:]
        distance = torch.cdist(select, estimate)
        assert distance.min() > 1.0, "a selection draw reappears among the estimation draws"
        within = torch.cdist(eps, eps) + torch.eye(n0 + n, dtype=eps.dtype) * 1e9
        assert within.min() > 1.0  # and no draw comes twice at all


# -- bad input as a new user gives it: one line, nothing written or changed -------------------------


def test_a_slice_past_the_end_of_the_test_set_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "x.tsv"
    assert certify(checkpoint, out, "rs", "--start", "9999", "--count", "5") == 2
    err = capsys.readouterr().err.strip()
    assert "reach outside the test set" in err and "9999..10003" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_an_unwritable_output_is_one_line(checkpoint, capsys):
    assert certify(checkpoint, "/proc/nope/a.tsv", "rs", "--count", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write into /proc/nope" in err and len(err.splitlines()) == 1


def test_an_exported_model_for_other_inputs_is_one_line(tmp_path, capsys):
    class Colour(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            return self.linear(x.flatten(1))

    path = tmp_path / "cifar.pt2"
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(
        torch.export.export(Colour().eval(), (torch.zeros(2, 3, 32, 32),), dynamic_shapes=({0: batch},)), path
    )
    out = tmp_path / "x.tsv"
    assert certify(path, out, "rs", "--count", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "exported for inputs N x 3 x 32 x 32" in err and "N x 1 x 28 x 28" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_corrupt_sidecar_is_named_on_resume_and_the_rows_are_kept(checkpoint, tmp_path, capsys):
    out = tmp_path / "rs.tsv"
    assert certify(checkpoint, out, "rs", "--count", "2") == 0
    rows = out.read_bytes()
    (tmp_path / "rs.tsv.json").write_text("{broken")
    assert certify(checkpoint, out, "rs", "--count", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "rs.tsv.json is not valid JSON" in err and "restore it" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == rows and (tmp_path / "rs.tsv.json").read_text() == "{broken"


def test_a_diverging_image_is_a_row_certified_with_its_last_finite_law(tmp_path):
    """The authors' unbounded clamped RDDRS at a step size of 25 overflows on some images of our CNN:
    the run still ends (exit 0) with every row; those rows say diverged@ITER and hold the certificate
    of the last finite law (the trace's param), and the other images' rows are those of a run
    without the diverging ones. Old rows without the column read as ok; RS rows say -."""
    from rddrs.core.certify import certify as certify_law
    from rddrs.core.noise import FullSPD
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.models import load_model

    model_file = ROOT / "data" / "models" / "mnist_cnn_sigma0.25.pt"
    wild = ["--objective", "clamped", "--max-step", "0", "--lr", "25", "--samples", "32"]
    out = tmp_path / "wild.tsv"
    assert certify(model_file, out, "rddrs", *wild) == 0
    rows = read_rows(out)
    assert sorted(rows) == [0, 1, 2, 3]
    diverged = [i for i, r in rows.items() if r["search"].startswith("diverged@")]
    calm = [i for i, r in rows.items() if r["search"] == "ok"]
    assert diverged and calm and len(diverged) + len(calm) == 4
    images, labels = load_dataset(DATA, train=False)
    model = load_model(model_file)
    for i in diverged:
        with np.load(tmp_path / "wild.tsv.traces" / f"{i}.npz") as trace:
            law = FullSPD(torch.from_numpy(trace["param"])[None])
            stopped = int(rows[i]["search"].split("@")[1])
            assert trace["rddrs_diverged_at"] == stopped and np.isnan(trace["rddrs"][stopped:]).all()
        cert = certify_law(model, images[i : i + 1], law, [i], 10, 200, 0.01, seed=0)
        assert (rows[i]["predict"], rows[i]["p_lower"]) == (cert.predict[0], cert.p_lower[0])
        assert rows[i]["gap"] == pytest.approx(cert.gap[0]) and rows[i]["radius"] == pytest.approx(cert.radius[0])
    for i in calm:  # the same image searched without the others
        alone = tmp_path / f"alone{i}.tsv"
        assert certify(model_file, alone, "rddrs", *wild, "--start", str(i), "--count", "1") == 0
        (row,) = read_rows(alone).values()
        assert (row["predict"], row["search"]) == (rows[i]["predict"], "ok")
        for key in ("gap", "radius", "proxy_radius", "sigma_min", "sigma_max"):
            assert row[key] == pytest.approx(rows[i][key], rel=1e-4), key
    assert certify(model_file, tmp_path / "rs.tsv", "rs", "--count", "1") == 0
    assert read_rows(tmp_path / "rs.tsv")[0]["search"] == "-"


def test_a_file_without_the_search_column_reads_as_ok_and_resumes(checkpoint, tmp_path):
    out = tmp_path / "old.tsv"
    assert certify(checkpoint, out, "ddrs", "--count", "2") == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(line.rsplit("\t", 1)[0] for line in lines) + "\n")  # as an older rddrs wrote it
    assert {r["search"] for r in read_rows(out).values()} == {"ok"}
    assert certify(checkpoint, out, "ddrs", "--count", "3") == 0  # resumed: the header gains the column
    assert out.read_text().splitlines()[0].split("\t") == list(COLUMNS)
    assert [r["search"] for r in read_rows(out).values()] == ["ok"] * 3


# -- refused commands write nothing and change nothing ------------------------------------------------


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    """Finished runs to merge and to merge into: RS shards of images 0..1 and 2..3, and an RDDRS
    run of images 0..1 (with its traces)."""
    folder = tmp_path_factory.mktemp("runs")
    assert certify(checkpoint, folder / "a.tsv", "rs", "--start", "0", "--count", "2") == 0
    assert certify(checkpoint, folder / "b.tsv", "rs", "--start", "2", "--count", "2") == 0
    assert certify(checkpoint, folder / "run.tsv", "rddrs", "--count", "2") == 0
    return folder


def copy_of(runs, tmp_path):
    shutil.copytree(runs, tmp_path, dirs_exist_ok=True)
    return tmp_path


def result_files(out):
    """A result file, its sidecar and its traces."""
    return out, sidecar_path(out), traces_dir(out)


def test_a_merge_into_a_run_being_written_is_refused_and_the_run_goes_on(checkpoint, runs, tmp_path, capsys):
    """The issue's case: merging RS shards into the OUT of an RDDRS certify while it runs, with or
    without --replace, is refused, and the certify ends with its own rows, sidecar and traces."""
    folder = copy_of(runs, tmp_path)
    out = folder / "live.tsv"
    cmd = [
        sys.executable,
        "-m",
        "rddrs",
        "certify",
        "--method",
        "rddrs",
        "--sigma",
        "0.25",
        "--model",
        str(checkpoint),
        "--preset",
        "smoke",
        "--data",
        str(DATA),
        "--count",
        "6",
        "--inputs-per-batch",
        "1",
        "--quiet",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not read_rows(out):
        time.sleep(0.02)
    for replace in ([], ["--replace"]):
        assert main(["merge", str(folder / "a.tsv"), str(folder / "b.tsv"), "--out", str(out), *replace]) == 2
        err = capsys.readouterr().err.strip()
        assert "live.tsv is being written by another process" in err and len(err.splitlines()) == 1
    assert proc.poll() is None, "the run ended before the merges were tried"
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert sorted(read_rows(out)) == list(range(6))
    assert json.loads(sidecar_path(out).read_text())["settings"]["method"] == "rddrs"
    assert "merged_from" not in json.loads(sidecar_path(out).read_text())
    assert sorted(p.name for p in traces_dir(out).iterdir()) == [f"{i}.npz" for i in range(6)]


def test_a_merge_into_a_finished_run_needs_replace(runs, tmp_path, capsys):
    folder = copy_of(runs, tmp_path)
    out = folder / "run.tsv"
    shards = [str(folder / "a.tsv"), str(folder / "b.tsv")]
    before = snapshot(*result_files(out))
    assert main(["merge", *shards, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "run.tsv exists" in err and "--replace" in err and len(err.splitlines()) == 1
    assert snapshot(*result_files(out)) == before
    assert main(["merge", *shards, "--out", str(out), "--replace"]) == 0  # asked for: the RS rows replace it
    assert sorted(read_rows(out)) == [0, 1, 2, 3] and not traces_dir(out).exists()
    assert json.loads(sidecar_path(out).read_text())["settings"]["method"] == "rs"


def test_a_merge_of_a_shard_being_written_is_refused(runs, tmp_path, capsys):
    import fcntl

    folder = copy_of(runs, tmp_path)
    a, b, merged = folder / "a.tsv", folder / "b.tsv", folder / "merged.tsv"
    before = snapshot(a, sidecar_path(a), b, sidecar_path(b))
    with open(folder / "b.tsv.lock", "w") as held:  # as the certify writing it holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["merge", str(a), str(b), "--out", str(merged)]) == 2
    err = capsys.readouterr().err.strip()
    assert "b.tsv is being written by another process" in err and len(err.splitlines()) == 1
    assert snapshot(a, sidecar_path(a), b, sidecar_path(b)) == before
    assert not any(p.exists() for p in result_files(merged)) and not (folder / "merged.tsv.lock").exists()


@pytest.mark.parametrize("command", ["certify", "merge --replace"])
def test_a_plain_file_where_the_traces_go_is_refused(checkpoint, runs, tmp_path, capsys, command):
    folder = copy_of(runs, tmp_path)
    out = folder / "x.tsv"
    traces_dir(out).write_text("not a folder")
    before = snapshot(folder)
    if command == "certify":
        assert certify(checkpoint, out, "ddrs", "--count", "1") == 2
    else:
        assert main(["merge", str(folder / "a.tsv"), str(folder / "b.tsv"), "--out", str(out), "--replace"]) == 2
    err = capsys.readouterr().err.strip()
    assert "x.tsv.traces exists and is not a directory" in err and len(err.splitlines()) == 1
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    "method, option, value, message",
    [
        ("rs", "--seed", "-1", "argument --seed: must be an integer >= 0, got -1"),
        ("rs", "--rotate", "-1", "argument --rotate: must be an integer >= 0, got -1"),
        (
            "rs",
            "--sigma",
            "inf",
            "sigma must lie in [1e-06, 1000] (images are in [0, 1], the network computes in float32), got inf",
        ),
        ("rs", "--sigma", "nan", "sigma must lie in [1e-06, 1000]"),
        ("rs", "--alpha", "nan", "alpha must lie in (0, 1), got nan"),
        ("rddrs", "--kappa", "nan", "kappa must be finite and >= 0, got nan"),
        ("rddrs", "--kappa", "inf", "kappa must be finite and >= 0, got inf"),
        ("rddrs", "--lr", "inf", "learning rate must be finite and > 0, got inf"),
        ("rddrs", "--max-step", "inf", "max_step must be finite and > 0"),
    ],
)
def test_a_bad_option_is_refused_before_anything_is_written(
    checkpoint, tmp_path, capsys, method, option, value, message
):
    out = tmp_path / "x.tsv"
    args = [
        "certify",
        "--method",
        method,
        "--sigma",
        "0.25",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--preset",
        "smoke",
        "--data",
        str(DATA),
        "--quiet",
        "--count",
        "1",
    ]
    assert exit_status(main, args + [option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())
    assert main(args) == 0  # so the corrected command goes ahead


def exported(module, path):
    """``module`` saved as a torch.export program for MNIST batches of any size."""
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(
        torch.export.export(module.eval(), (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},)), path
    )
    return path


class NaNs(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * float("nan")


class OneOutput(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)


def five_classes(path):
    torch.save({"state_dict": MnistCNN(5).state_dict(), "arch": "MnistCNN", "arch_kwargs": {"num_classes": 5}}, path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder: exported(NaNs(), folder / "nan.pt2"), "nan.pt2 gives NaN or infinite outputs on test images"),
        (lambda folder: exported(OneOutput(), folder / "one.pt2"), "one.pt2 gives outputs of shape 1 for 1 image;"),
        (lambda folder: five_classes(folder / "five.pt"), "five.pt gives outputs of shape 1 x 5 for 1 image;"),
    ],
    ids=["nan", "1-d", "5-classes"],
)
def test_a_model_with_unusable_outputs_is_refused_before_anything_is_written(tmp_path, capsys, make, message):
    """A NaN model would predict class 0 with the largest certificate n allows on every image."""
    model = make(tmp_path)
    out = tmp_path / "x.tsv"
    assert certify(model, out, "rs", "--count", "1") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(tmp_path.iterdir()) == [model]


def test_a_resumed_file_with_a_row_outside_the_test_set_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "rs.tsv"
    assert certify(checkpoint, out, "rs", "--count", "2") == 0
    last = out.read_text().splitlines()[-1]
    with open(out, "a") as f:
        f.write("20000" + last[last.index("\t") :] + "\n")
    before = snapshot(tmp_path)
    assert certify(checkpoint, out, "rs", "--count", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "rs.tsv holds a row for idx 20000, outside the test set (0..9999)" in err and len(err.splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_resuming_into_a_file_that_cannot_be_written_is_one_line(checkpoint, tmp_path):
    out = tmp_path / "rs.tsv"
    assert certify(checkpoint, out, "rs", "--count", "2") == 0
    out.chmod(0o444)
    before = snapshot(tmp_path)
    proc = run_bound_by_permissions(
        [
            "certify",
            "--method",
            "rs",
            "--sigma",
            "0.25",
            "--model",
            checkpoint,
            "--out",
            out,
            "--preset",
            "smoke",
            "--data",
            DATA,
            "--quiet",
            "--count",
            "3",
        ],
        tmp_path,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"rddrs certify: error: cannot write {out} (PermissionError:")
    assert snapshot(tmp_path) == before  # the sidecar too: the session's part is not recorded
