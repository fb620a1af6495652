"""The fault matrix (issue 31): for each kind of bad input, the command says one line on stderr
naming the file or the limit, exits 2 (a user error), and leaves every file as it was.

The inputs are tiny runs at the smoke preset and files made up from them: archives for
``rddrs land`` whose manifest or members try to write outside ``results/PRESET`` or hold rows
no run writes, traces and laws that are not what a run writes, models that are no usable model,
numbers too large to run, and the cached measurements of ``rddrs mechanism``."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import exit_status, run_bound_by_permissions, snapshot

from rddrs.cli import main
from rddrs.pipeline import archive as archive_module
from rddrs.pipeline.results import memory_path, read_rows, sidecar_path, traces_dir

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
MODELS = ROOT / "data" / "models"
MODEL = MODELS / "mnist_cnn_sigma0.25.pt"


def refused(capsys, args: list, *needles: str, watch: Path) -> str:
    """Run ``rddrs ARGS``: exit 2, one line on stderr holding each of ``needles``, nothing under
    ``watch`` changed; returns the line."""
    before = snapshot(watch)
    status = exit_status(main, [str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"rddrs {args[0]}: error:"), err
    for needle in needles:
        assert needle in err, err
    assert snapshot(watch) == before
    return err


def certify(out: Path, method: str = "rs", *extra, model: Path = MODEL) -> int:
    return main(
        [
            "certify",
            "--method",
            method,
            "--sigma",
            "0.25",
            "--model",
            str(model),
            "--out",
            str(out),
            "--preset",
            "smoke",
            "--data",
            str(DATA),
            "--quiet",
            "--count",
            "2",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """RS, ANCER and RDDRS runs of two images each (smoke), with their traces."""
    folder = tmp_path_factory.mktemp("runs")
    for method in ("rs", "ancer", "rddrs"):
        assert certify(folder / f"{method}_sigma0.25.tsv", method) == 0
    return folder


def copy_run(runs: Path, method: str, into: Path) -> Path:
    """A copy of the run of ``method`` (rows, sidecar, traces) in ``into``."""
    out = into / f"{method}_sigma0.25.tsv"
    shutil.copy(runs / out.name, out)
    shutil.copy(sidecar_path(runs / out.name), sidecar_path(out))
    if traces_dir(runs / out.name).is_dir():
        shutil.copytree(traces_dir(runs / out.name), traces_dir(out))
    return out


# -- rddrs land: an archive writes only under results/PRESET, and only rows a run can write ----


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    """An archive member that is no file: a link, a directory, a FIFO."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def write_archive(path: Path, manifest, members: dict) -> Path:
    """A gzipped tar of ``manifest`` (JSON, or bytes as they are) and ``members``: name -> bytes (a
    file of that name), or a ``member``, or a (name, bytes) pair (a file of that other name)."""
    blob = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, content in {"manifest.json": blob, **members}.items():
            if isinstance(content, tarfile.TarInfo):
                tar.addfile(content)
                continue
            if isinstance(content, tuple):
                name, content = content
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def rs_members(runs: Path, rows: str | None = None, settings: dict | None = None, name="rs_sigma0.25.tsv") -> dict:
    """The RS run as an archive's members (its rows, or ``rows``; its sidecar with ``settings`` changed)."""
    meta = json.loads(sidecar_path(runs / "rs_sigma0.25.tsv").read_text())
    meta["settings"].update(settings or {})
    return {name: (rows or (runs / "rs_sigma0.25.tsv").read_text()).encode(), name + ".json": json.dumps(meta).encode()}


GOOD = {"preset": "smoke", "files": ["rs_sigma0.25.tsv"], "extras": ["claims/m.json"]}


@pytest.fixture
def landing(tmp_path, monkeypatch) -> Path:
    """A working directory with an empty results/smoke, for `rddrs land` without --results."""
    work = tmp_path / "work"
    (work / "results" / "smoke").mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


def land(archive: Path) -> list:
    return ["land", archive, "--models", MODELS]


def test_a_good_archive_lands_so_the_refusals_below_are_about_what_they_change(runs, tmp_path, landing, capsys):
    archive = write_archive(tmp_path / "a.tar.gz", GOOD, {**rs_members(runs), "claims/m.json": b'{"a": 1}'})
    assert main([str(a) for a in land(archive)]) == 0
    assert "landed 2 new rows in 1 files" in capsys.readouterr().out
    assert sorted(read_rows(landing / "results" / "smoke" / "rs_sigma0.25.tsv")) == [0, 1]
    assert (landing / "results" / "smoke" / "claims" / "m.json").read_text() == '{"a": 1}'


@pytest.mark.parametrize("field", ["preset", "files", "extras"])
@pytest.mark.parametrize("where", ["parent", "absolute", "hidden-parent", "nonsense"])
def test_a_manifest_naming_a_place_outside_the_results_is_refused(runs, tmp_path, landing, capsys, field, where):
    elsewhere = tmp_path / "ELSEWHERE"
    suffix = {"preset": "", "files": ".tsv", "extras": ".json"}[field]
    name = {
        "parent": f"../../../../../ELSEWHERE/x{suffix}",
        "absolute": f"{elsewhere}/x{suffix}",
        "hidden-parent": f"claims/../../x{suffix}",
        "nonsense": f"nonsense{suffix}",
    }[where]
    if where == "nonsense" and field != "preset":
        name = f"./x{suffix}"
    manifest = dict(GOOD, **{field: name if field == "preset" else [name]})
    members = {**rs_members(runs), "claims/m.json": b"{}"}
    if field == "files":
        members.update(rs_members(runs, name=name))
        del members["rs_sigma0.25.tsv"], members["rs_sigma0.25.tsv.json"]
    elif field == "extras":
        members[name] = members.pop("claims/m.json")
    archive = write_archive(tmp_path / "a.tar.gz", manifest, members)
    err = refused(capsys, land(archive), str(archive), "is not an archive of rddrs rows", watch=tmp_path)
    assert "none of smoke, cpu, paper" in err if field == "preset" else "not a plain relative path" in err
    assert not elsewhere.exists()


@pytest.mark.parametrize("which", ["rs_sigma0.25.tsv", "rs_sigma0.25.tsv.json", "claims/m.json"])
@pytest.mark.parametrize("kind", ["symlink", "hardlink", "directory", "fifo"])
def test_a_member_that_is_no_plain_file_is_refused(runs, tmp_path, landing, capsys, which, kind):
    members = {**rs_members(runs), "claims/m.json": b"{}"}
    members[which] = {
        "symlink": member(which, tarfile.SYMTYPE, "/etc/passwd"),
        "hardlink": member(which, tarfile.LNKTYPE, "../../../../etc/passwd"),
        "directory": member(which, tarfile.DIRTYPE),
        "fifo": member(which, tarfile.FIFOTYPE),
    }[kind]
    archive = write_archive(tmp_path / "a.tar.gz", GOOD, members)
    refused(capsys, land(archive), f"its member {which!r} is a", "holds files only", watch=tmp_path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing extra", "its manifest names 'claims/m.json', which it does not hold"),
        ("missing sidecar", "its manifest names 'rs_sigma0.25.tsv.json', which it does not hold"),
        ("unnamed member", "it holds '../../evil.json', which its manifest does not name"),
        ("member twice", "it holds 'claims/m.json' twice"),
        ("no manifest", "it has no manifest.json"),
        ("manifest not json", "its manifest is not JSON"),
        ("manifest a list", "its manifest is not an object with lists 'files' and 'extras'"),
        ("a name twice", "its manifest names 'rs_sigma0.25.tsv' twice"),
        ("a sidecar as extra", "a memory pass or a sidecar, which are not packed"),
        ("extra not json", "claims/m.json is not JSON"),
    ],
)
def test_an_archive_whose_members_are_not_its_manifest_is_refused(runs, tmp_path, landing, capsys, case, message):
    manifest, members = dict(GOOD), {**rs_members(runs), "claims/m.json": b"{}"}
    if case == "missing extra":
        del members["claims/m.json"]
    elif case == "missing sidecar":
        del members["rs_sigma0.25.tsv.json"]
    elif case == "unnamed member":
        members["../../evil.json"] = b"{}"
    elif case == "member twice":
        members["again"] = ("claims/m.json", b"{}")
    elif case == "manifest a list":
        manifest = [GOOD]
    elif case == "a name twice":
        manifest["files"] = ["rs_sigma0.25.tsv", "rs_sigma0.25.tsv"]
    elif case == "a sidecar as extra":
        manifest["extras"] = ["rs_sigma0.25.tsv.json"]
        del members["claims/m.json"]
    elif case == "extra not json":
        members["claims/m.json"] = b"not json"
    path = tmp_path / "a.tar.gz"
    if case == "no manifest":
        with tarfile.open(path, "w:gz") as tar:
            for name, content in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    else:
        write_archive(path, b"{not json" if case == "manifest not json" else manifest, members)
    refused(capsys, land(path), message, watch=tmp_path)


def test_a_link_in_the_results_does_not_lead_a_landing_outside_them(runs, tmp_path, landing, capsys):
    elsewhere = tmp_path / "ELSEWHERE"
    elsewhere.mkdir()
    (landing / "results" / "smoke" / "claims").symlink_to(elsewhere)
    archive = write_archive(tmp_path / "a.tar.gz", GOOD, {**rs_members(runs), "claims/m.json": b"{}"})
    refused(capsys, land(archive), "claims/m.json would be written outside results/smoke", watch=tmp_path)
    assert not any(elsewhere.iterdir())


def test_a_member_larger_than_the_limit_is_refused_before_it_is_read(runs, tmp_path, landing, capsys, monkeypatch):
    monkeypatch.setattr(archive_module, "MAX_MEMBER", 100)
    archive = write_archive(tmp_path / "a.tar.gz", GOOD, {**rs_members(runs), "claims/m.json": b"{}"})
    refused(
        capsys, land(archive), "its member 'rs_sigma0.25.tsv' has", "more than the 100 a result file", watch=tmp_path
    )


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_a_truncated_archive_is_one_line(runs, tmp_path, landing, capsys, keep):
    whole = write_archive(tmp_path / "whole.tar.gz", GOOD, {**rs_members(runs), "claims/m.json": b"{}" * 5000})
    blob = whole.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(blob[: int(len(blob) * keep)])
    refused(capsys, land(cut), str(cut), "it is truncated or no archive of `rddrs pack`", watch=tmp_path)


def replaced(runs: Path, column: str, value: str, idx: int = 1) -> str:
    """The RS run's rows with ``column`` of the row of ``idx`` set to ``value``."""
    lines = (runs / "rs_sigma0.25.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    fields = lines[1 + idx].split("\t")
    fields[header.index(column)] = value
    lines[1 + idx] = "\t".join(fields)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "rows, settings, message",
    [
        (("radius", "nan"), None, "radius nan is not a finite number >= 0"),
        (("gap", "-1.5"), None, "gap -1.5 is not a finite number >= 0"),
        (("idx", "20000"), None, "idx 20000 is outside the test set (0..9999)"),
        (("label", "12"), None, "label 12 is no class (0..9)"),
        (("p_lower", "1.5"), None, "p_lower 1.5 is not a probability"),
        (("sigma_min", "0.0"), None, "sigma_min 0.0 is not a finite scale > 0"),
        (("correct", "0"), None, "correct is 0 with predict 2 and label 2"),
        (None, {"alpha": 5.0}, "alpha must lie in (0, 1), got 5.0"),
        (None, {"n": -3}, "n0 and n must be integers in 1..1,000,000,000, got 10, -3"),
        (None, {"sigma": float("nan")}, "sigma must lie in"),
        (None, {"preset": "nonsense"}, "unknown preset 'nonsense'"),
        (None, {"method": "magic"}, "unknown method 'magic'"),
    ],
    ids=[
        "nan-radius",
        "negative-gap",
        "idx-20000",
        "label-12",
        "p-lower",
        "zero-scale",
        "correct",
        "alpha-5",
        "n-minus-3",
        "nan-sigma",
        "preset-nonsense",
        "method",
    ],
)
def test_rows_and_settings_that_no_run_writes_are_refused(runs, tmp_path, landing, capsys, rows, settings, message):
    members = rs_members(runs, replaced(runs, *rows) if rows else None, settings)
    archive = write_archive(tmp_path / "a.tar.gz", GOOD, {**members, "claims/m.json": b"{}"})
    refused(capsys, land(archive), f"{archive}:rs_sigma0.25.tsv", message, watch=tmp_path)


def test_a_busy_second_file_leaves_the_first_unlanded(runs, tmp_path, landing, capsys):
    manifest = dict(GOOD, files=["a/rs_sigma0.25.tsv", "b/rs_sigma0.25.tsv"])
    members = {
        **rs_members(runs, name="a/rs_sigma0.25.tsv"),
        **rs_members(runs, name="b/rs_sigma0.25.tsv"),
        "claims/m.json": b"{}",
    }
    archive = write_archive(tmp_path / "a.tar.gz", manifest, members)
    (landing / "results" / "smoke" / "b").mkdir()
    lock = landing / "results" / "smoke" / "b" / "rs_sigma0.25.tsv.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        # the other process's lock file is opened (its time changes), nothing else is touched
        refused(
            capsys,
            land(archive),
            "b/rs_sigma0.25.tsv is being written by another process",
            watch=landing / "results" / "smoke" / "a",
        )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_dir()) == [
        Path("a.tar.gz"),
        lock.relative_to(tmp_path),
    ]


def test_land_errors_name_the_archive_not_a_temporary_folder(runs, tmp_path, landing, capsys):
    members = {"rs_sigma0.25.tsv": b"not\ta\tresult\n", "rs_sigma0.25.tsv.json": b"{}", "claims/m.json": b"{}"}
    archive = write_archive(tmp_path / "a.tar.gz", GOOD, members)
    err = refused(capsys, land(archive), f"{archive}:rs_sigma0.25.tsv", watch=tmp_path)
    assert "rddrs-land-" not in err


# -- rddrs pack ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("since nan", "--since must be a time in seconds since the epoch"),
        ("since 1e309", "--since must be a time in seconds since the epoch"),
        ("missing results", "no such results directory"),
        ("other preset", "is a run of preset smoke, not cpu"),
        ("out a directory", "is a directory; the archive is a file"),
    ],
)
def test_pack_refuses_what_would_make_an_empty_or_unlandable_archive(runs, tmp_path, capsys, case, message):
    results = tmp_path / "results"
    results.mkdir()
    copy_run(runs, "rs", results)
    args = {"preset": "smoke", "since": "0", "results": results, "out": tmp_path / "a.tar.gz"}
    args.update(
        {
            "since nan": {"since": "nan"},
            "since 1e309": {"since": "1e309"},
            "missing results": {"results": tmp_path / "nowhere"},
            "other preset": {"preset": "cpu"},
            "out a directory": {"out": tmp_path},
        }[case]
    )
    refused(capsys, ["pack", *(x for k, v in args.items() for x in (f"--{k}", v))], message, watch=tmp_path)
    assert not list(tmp_path.rglob("*.part"))


# -- the memory pass: traces, laws and labels that are not a run's --------------------------------


@pytest.mark.parametrize("method", ["ancer", "rddrs"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "pickle", "directory", "bare array"])
def test_memory_over_damaged_traces_is_one_line(runs, tmp_path, capsys, method, damage):
    out = copy_run(runs, method, tmp_path)
    trace = traces_dir(out) / "1.npz"
    blob = trace.read_bytes()
    trace.unlink()
    if damage == "directory":
        trace.mkdir()
    elif damage == "bare array":
        with open(trace, "wb") as f:
            np.save(f, np.ones(3))
    else:
        trace.write_bytes(
            {
                "truncated": blob[: len(blob) // 2],
                "empty": b"",
                "text": b"param = 1, 2, 3\n",
                "pickle": pickle.dumps({"param": [1.0, 2.0]}),
            }[damage]
        )
    refused(capsys, ["memory", out, "--data", DATA, "--quiet"], f"{trace} is not a readable trace", watch=tmp_path)
    assert not memory_path(out).exists()


def with_param(trace: Path, param: np.ndarray) -> None:
    with np.load(trace) as old:
        arrays = dict(old)
    np.savez(trace, **dict(arrays, param=param.astype(np.float32)))


@pytest.mark.parametrize(
    "method, law",
    [
        ("ancer", "nan"),
        ("ancer", "zero"),
        ("ancer", "negative"),
        ("rddrs", "nan"),
        ("rddrs", "negative definite"),
        ("rddrs", "singular"),
        ("rddrs", "not symmetric"),
    ],
)
def test_memory_refuses_laws_that_are_not_valid_covariances(runs, tmp_path, capsys, method, law):
    out = copy_run(runs, method, tmp_path)
    trace = traces_dir(out) / "1.npz"
    with np.load(trace) as old:
        param = old["param"].astype(np.float64)
    if method == "ancer":
        param[3] = {"nan": np.nan, "zero": 0.0, "negative": -0.2}[law]
    elif law == "nan":
        param[3, 3] = np.nan
    elif law == "negative definite":
        param = -param
    elif law == "singular":
        param[:, 0] = param[0, :] = 0
    else:
        param[0, 1] += 1.0
    with_param(trace, param)
    refused(
        capsys,
        ["memory", out, "--data", DATA, "--quiet"],
        f"{out}: the law of idx 1 is not a valid covariance",
        watch=tmp_path,
    )
    assert not memory_path(out).exists() and not sidecar_path(memory_path(out)).exists()


def test_memory_refuses_an_isotropic_row_whose_sigma_is_nan(runs, tmp_path, capsys):
    out = copy_run(runs, "rs", tmp_path)
    out.write_text(replaced(runs, "sigma_min", "nan"))
    refused(
        capsys, ["memory", out, "--data", DATA, "--quiet"], "the law of idx 1 is not a valid covariance", watch=tmp_path
    )


def test_a_tampered_label_is_refused_by_memory_and_on_resume(runs, tmp_path, capsys):
    out = copy_run(runs, "rs", tmp_path)
    out.write_text(replaced(runs, "label", "3", idx=0).replace("\n0\t3\t7\t1\t", "\n0\t3\t7\t0\t"))
    message = "the row of idx 0 says label 3, the test set 7"
    refused(capsys, ["memory", out, "--data", DATA, "--quiet"], message, watch=tmp_path)
    refused(
        capsys,
        [
            "certify",
            "--method",
            "rs",
            "--sigma",
            "0.25",
            "--model",
            MODEL,
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
        message,
        watch=tmp_path,
    )


# -- models that are no usable model --------------------------------------------------------------


def exported(module: torch.nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(
        torch.export.export(module.eval(), (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},)), path
    )
    return path


class IntegerOutputs(torch.nn.Module):
    def forward(self, x):
        return (x.flatten(1)[:, :10] * 100).long()


class NaNOnNoise(torch.nn.Module):
    """Finite logits on clean images (in [0, 1]), NaN on noisy ones (a negative pixel)."""

    def forward(self, x):
        flat = x.flatten(1)
        return flat[:, 200:210] + torch.sqrt(flat.amin(1, keepdim=True)) * 0


def test_a_model_with_integer_outputs_is_one_line(tmp_path, capsys):
    model = exported(IntegerOutputs(), tmp_path / "int.pt2")
    refused(
        capsys,
        [
            "certify",
            "--method",
            "ddrs",
            "--sigma",
            "0.25",
            "--model",
            model,
            "--out",
            tmp_path / "x.tsv",
            "--preset",
            "smoke",
            "--data",
            DATA,
            "--quiet",
            "--count",
            "1",
        ],
        "int.pt2 gives outputs of type int64",
        watch=tmp_path,
    )


@pytest.mark.parametrize(
    "kind, message",
    [
        ("directory", "is a directory, not a regular file"),
        ("device", "is a device, not a regular file"),
        ("fifo", "is a FIFO, not a regular file"),
        ("missing", "no such file"),
    ],
)
def test_a_model_path_that_is_no_file_says_what_it_is(tmp_path, capsys, kind, message):
    model = {
        "directory": tmp_path / "dir.pt",
        "device": Path("/dev/null"),
        "fifo": tmp_path / "fifo.pt",
        "missing": tmp_path / "missing.pt",
    }[kind]
    if kind == "directory":
        model.mkdir()
    elif kind == "fifo":
        os.mkfifo(model)
    refused(
        capsys,
        [
            "certify",
            "--method",
            "rs",
            "--sigma",
            "0.25",
            "--model",
            model,
            "--out",
            tmp_path / "x.tsv",
            "--preset",
            "smoke",
            "--data",
            DATA,
            "--quiet",
            "--count",
            "1",
        ],
        f"model {model} {message}" if kind != "missing" else f"model {model}: no such file",
        watch=tmp_path,
    )


def test_a_model_the_user_may_not_read_is_one_line(tmp_path):
    model = tmp_path / "closed.pt"
    shutil.copy(MODEL, model)
    model.chmod(0o000)
    before = snapshot(tmp_path)
    proc = run_bound_by_permissions(
        [
            "certify",
            "--method",
            "rs",
            "--sigma",
            "0.25",
            "--model",
            model,
            "--out",
            tmp_path / "x.tsv",
            "--preset",
            "smoke",
            "--data",
            DATA,
            "--quiet",
            "--count",
            "1",
        ],
        tmp_path,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"cannot read {model} (PermissionError" in err
    assert snapshot(tmp_path) == before


def test_a_model_nan_on_noisy_images_leaves_nothing_and_the_fixed_rerun_goes_ahead(tmp_path, capsys):
    model = exported(NaNOnNoise(), tmp_path / "nan-on-noise.pt2")
    out = tmp_path / "runs" / "x.tsv"
    out.parent.mkdir()
    for method in ("rs", "ancer"):
        assert certify(out, method, model=model) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("rddrs certify: error:"), err
        assert not any(out.parent.iterdir())
    assert certify(out, "rs") == 0  # the same --out with a fixed model
    assert sorted(read_rows(out)) == [0, 1]


# -- numbers too large or not plain -----------------------------------------------------------------

HUGE = str(2**62)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", HUGE], "n0 and n must be integers in 1..1,000,000,000"),
        (["--n0", HUGE], "n0 and n must be integers in 1..1,000,000,000"),
        (["--method", "ancer", "--samples", "1000000000"], "at most 1,000,000 samples"),
        (["--method", "ancer", "--iterations", "1000000000000"], "at most 1,000,000 iterations"),
        (["--sigma", "1e300"], "sigma must lie in [1e-06, 1000]"),
        (["--sigma", "1e-320"], "sigma must lie in [1e-06, 1000]"),
        (["--sigma", "0_25"], "argument --sigma: '0_25' is not a plain number"),
        (["--count", "1_0"], "argument --count: '1_0' is not a plain number"),
        (["--batch-size", HUGE], "argument --batch-size: must be at most 1,000,000 noisy images"),
        (["--count", "99999999999999999999"], "reach outside the test set"),
    ],
    ids=[
        "n",
        "n0",
        "samples",
        "iterations",
        "sigma-1e300",
        "sigma-1e-320",
        "sigma-underscore",
        "count-underscore",
        "batch-size",
        "count",
    ],
)
def test_certify_refuses_numbers_it_cannot_run_up_front(tmp_path, capsys, extra, message):
    args = {"--method": "rs", "--sigma": "0.25", "--count": "1"}
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value
    refused(
        capsys,
        [
            "certify",
            *(x for kv in args.items() for x in kv),
            "--model",
            MODEL,
            "--out",
            tmp_path / "x.tsv",
            "--preset",
            "smoke",
            "--data",
            DATA,
            "--quiet",
        ],
        message,
        watch=tmp_path,
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--sigma", "0.25", "--threads", HUGE], "--threads must lie in 1..1024"),
        (["train", "--sigma", "0.25", "--epochs", HUGE], "--epochs must be an integer in 1..1000"),
        (["train", "--sigma", "1e300"], "--sigma must lie in [1e-06, 1000]"),
        (
            ["sweep", "--preset", "smoke", "--count", "99999999999999999999", "--list"],
            "--count 99999999999999999999 is more than the 10000 images of the test set",
        ),
        (["sweep", "--preset", "smoke", "--count", HUGE], "is more than the 10000 images of the test set"),
        (["sweep", "--preset", "smoke", "--cpus-per-task", HUGE], "argument --cpus-per-task: must be at most 1024"),
        (["fill", "--until", "23:59", "--threads", HUGE], "argument --threads: must be at most 1024"),
    ],
    ids=["train-threads", "train-epochs", "train-sigma", "sweep-count-list", "sweep-count", "sweep-cpus", "fill"],
)
def test_other_commands_refuse_numbers_they_cannot_run_up_front(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    refused(capsys, [*args, "--data", DATA] if args[0] != "fill" else args, message, watch=tmp_path)
    assert not any(tmp_path.iterdir())


# -- rddrs curves, rddrs data ------------------------------------------------------------------------


@pytest.mark.parametrize("idx", ["10000", "99999999999999999999"])
def test_curves_on_an_idx_outside_the_test_set_is_one_line(runs, tmp_path, capsys, idx):
    out = copy_run(runs, "rs", tmp_path)
    out.write_text(replaced(runs, "idx", idx))
    refused(
        capsys,
        ["curves", out, "--out", tmp_path / "curves"],
        f"line 3: idx {idx} is outside the test set",
        watch=tmp_path,
    )
    assert not (tmp_path / "curves").exists()


def test_mnist_files_in_the_fashion_mnist_folder_are_refused(tmp_path, capsys):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (raw / name).symlink_to(DATA / "MNIST" / "raw" / name)
    refused(
        capsys,
        ["data", "--root", tmp_path, "--dataset", "fashion-mnist"],
        "is not the Fashion-MNIST file: its SHA-256 is",
        "(it is the MNIST file)",
        watch=tmp_path,
    )


# -- rddrs mechanism: its cached measurements, --laws-from -----------------------------------------


def mechanism_results(tmp_path: Path, broken: str, content: str) -> Path:
    """A results folder whose cached measurements are valid up to ``broken``, which holds ``content``."""
    from rddrs.studies import headline

    folder = tmp_path / "results"
    (folder / "claims" / "mechanism").mkdir(parents=True)
    names = [*headline.REFUTED, *[v.name for v in headline.mechanism_study("smoke").variants if v.method == "rddrs"]]
    valid = {
        "measures.json": {"rows": []},
        "refutations.json": {"variants": {n: {"rows": []} for n in names}},
        "memory.json": {"variants": {}},
    }
    for name in ("measures.json", "refutations.json", "memory.json"):
        (folder / "claims" / "mechanism" / name).write_text(content if name == broken else json.dumps(valid[name]))
        if name == broken:
            return folder
    return folder


@pytest.mark.parametrize("broken", ["measures.json", "refutations.json", "memory.json"])
@pytest.mark.parametrize(
    "content",
    ["", "{garbage", "[1, 2]", '{"rows": 3, "variants": [1]}', '{"rows": [1], "variants": {"rddrs_clamped": 5}}'],
    ids=["empty", "garbage", "list", "wrong-types", "wrong-rows"],
)
def test_mechanism_over_broken_cached_measurements_is_one_line(tmp_path, capsys, broken, content):
    folder = mechanism_results(tmp_path, broken, content)
    refused(
        capsys,
        ["mechanism", "--preset", "smoke", "--results", folder, "--data", DATA, "--models", MODELS, "--quiet"],
        f"{folder / 'claims' / 'mechanism' / broken}",
        "move it away to compute it again",
        watch=tmp_path,
    )


@pytest.mark.parametrize("kind, message", [("missing", "no such directory"), ("empty", "no result files")])
def test_mechanism_laws_from_a_missing_or_empty_folder_is_refused(tmp_path, capsys, kind, message):
    folder = mechanism_results(tmp_path, None, "")
    laws = tmp_path / "laws"
    if kind == "empty":
        laws.mkdir()
    refused(
        capsys,
        [
            "mechanism",
            "--preset",
            "smoke",
            "--results",
            folder,
            "--data",
            DATA,
            "--models",
            MODELS,
            "--laws-from",
            laws,
            "--quiet",
        ],
        f"--laws-from {laws}: {message}",
        watch=tmp_path,
    )
