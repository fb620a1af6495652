"""The dataset as a parameter of a run: the registry of datasets, Fashion-MNIST built from Debian's
package and checked against its published checksums, models that record their dataset, runs and
sweeps on Fashion-MNIST, and MNIST's records read as they were.

The checks of the checksums run on small fake packages; the tests on the real Fashion-MNIST read
the files of Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`) and are
skipped without it, except in CI (CI=true), where `.ci/run` installs it and they fail instead.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import exit_status, raises_one_line, snapshot

from rddrs.cli import main
from rddrs.pipeline import models
from rddrs.pipeline.data import (
    DATASETS,
    FASHION_MNIST,
    MNIST,
    NAMES,
    RAW_FILES,
    dataset,
    fetch_dataset,
    fetch_from_package,
    load_dataset,
    upstream_header,
)
from rddrs.pipeline.models import trained_on
from rddrs.pipeline.results import dataset_folder, model_path, read_rows, read_sidecar
from rddrs.pipeline.settings import check_settings, make_settings, normalised, run_dataset

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MNIST_MODEL = ROOT / "data" / "models" / "mnist_cnn_sigma0.25.pt"
PACKAGE = Path(FASHION_MNIST.package_dir)

# SHA-256 of the uncompressed Fashion-MNIST files, computed from the upstream FILE.gz whose MD5 are
# the published ones (the upstream files in Debian's source package dataset-fashion-mnist
# 0.0~git20200523.55506a9-1); a copy independent of the library's record
FASHION_RAW_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
# the MD5 of each FILE.gz as the Fashion-MNIST repository's README publishes them
PUBLISHED_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}


def md5(blob: bytes) -> str:
    return hashlib.md5(blob, usedforsecurity=False).hexdigest()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- the registry


def test_the_registry_holds_mnist_and_fashion_mnist():
    assert NAMES == ("mnist", "fashion-mnist") and DATASETS == {"mnist": MNIST, "fashion-mnist": FASHION_MNIST}
    assert (MNIST.folder, FASHION_MNIST.folder) == ("MNIST", "FashionMNIST")  # torchvision's raw layouts
    assert FASHION_MNIST.raw("data") == Path("data/FashionMNIST/raw")
    assert FASHION_MNIST.classes[0] == "T-shirt/top" and FASHION_MNIST.classes[-1] == "Ankle boot"
    for record in DATASETS.values():
        assert len(record.classes) == 10 and record.input_shape == (1, 28, 28)
        assert sorted(record.raw_sha256) == sorted(RAW_FILES)
        # what every model must take and give holds for every dataset
        assert record.input_shape == models.INPUT_SHAPE and len(record.classes) == models.CLASSES
    assert FASHION_MNIST.raw_sha256 == FASHION_RAW_SHA256 and FASHION_MNIST.gzip_md5 == PUBLISHED_MD5
    assert FASHION_MNIST.package == "dataset-fashion-mnist"
    assert dataset("fashion-mnist") is FASHION_MNIST and dataset(MNIST) is MNIST


def test_an_unknown_dataset_is_one_line(tmp_path):
    for call in (
        lambda: dataset("cifar10"),
        lambda: fetch_dataset(tmp_path, "cifar10"),
        lambda: load_dataset(tmp_path, "cifar10", train=False),
        lambda: make_settings("rs", 0.25, MNIST_MODEL, "smoke", dataset="cifar10"),
    ):
        message = raises_one_line(call)
        assert "unknown dataset 'cifar10'" in message and "mnist, fashion-mnist" in message


@pytest.mark.parametrize(
    "command",
    [
        ["data"],
        ["train", "--sigma", "0.25"],
        ["certify", "--method", "rs", "--sigma", "0.25", "--model", "m.pt", "--out", "o.tsv"],
        ["sweep", "--preset", "smoke"],
    ],
)
def test_the_command_line_offers_the_datasets(command, capsys):
    assert exit_status(main, [command[0], "--help"]) == 0
    assert "--dataset {mnist,fashion-mnist}" in " ".join(capsys.readouterr().out.split())
    assert exit_status(main, [*command, "--dataset", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'cifar10'" in err and "fashion-mnist" in err


def test_names_of_models_and_result_folders():
    assert model_path(0.25, "m", "mnist") == Path("m/mnist_cnn_sigma0.25.pt")  # unchanged
    assert model_path(0.25, "m", "fashion-mnist") == Path("m/fashion-mnist_cnn_sigma0.25.pt")
    assert dataset_folder("results/cpu") == Path("results/cpu")  # the committed results' layout
    assert dataset_folder("results/cpu", "fashion-mnist") == Path("results/cpu/fashion-mnist")


# ---------------------------------------------------------------- checksums, on a fake package


def idx_files(n: int = 3) -> dict[str, bytes]:
    """Four small IDX files (their checks are the checksums, not the sizes)."""
    images = bytes((7 * i) % 256 for i in range(n * 784))
    labels = bytes(i % 10 for i in range(n))
    out = {}
    for prefix in ("train", "t10k"):
        out[f"{prefix}-images-idx3-ubyte"] = struct.pack(">4i", 2051, n, 28, 28) + images
        out[f"{prefix}-labels-idx1-ubyte"] = struct.pack(">2i", 2049, n) + labels
    return out


def upstream_gzip(name: str, content: bytes, mtime: int) -> bytes:
    """FILE.gz as the dataset's authors made it: the file name and a time in its header."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buffer, mtime=mtime) as f:
        f.write(content)
    return buffer.getvalue()


def debian_gzip(blob: bytes, mtime: int = 1591347949) -> bytes:
    """``blob`` as Debian's build left it: no file name in the header, the upload's time."""
    assert blob[3] == 0x08  # FNAME
    end = blob.index(b"\0", 10) + 1
    return b"\x1f\x8b\x08\x00" + struct.pack("<I", mtime) + blob[8:10] + blob[end:]


@pytest.fixture
def fake(tmp_path):
    """A package folder with FILE.gz as Debian ships them, and the record of their checksums."""
    contents = idx_files()
    times = {name: 1504176606 + i for i, name in enumerate(RAW_FILES)}
    upstream = {name: upstream_gzip(name, contents[name], times[name]) for name in RAW_FILES}
    folder = tmp_path / "package"
    folder.mkdir()
    for name in RAW_FILES:
        (folder / f"{name}.gz").write_bytes(debian_gzip(upstream[name]))
    record = replace(
        FASHION_MNIST,
        package_dir=str(folder),
        gzip_times=times,
        gzip_md5={name: md5(upstream[name]) for name in RAW_FILES},
        raw_sha256={name: hashlib.sha256(contents[name]).hexdigest() for name in RAW_FILES},
    )
    return record, folder, contents, upstream


def test_the_upstream_header_gives_back_the_published_file(fake):
    record, folder, contents, upstream = fake
    for name in RAW_FILES:
        shipped = (folder / f"{name}.gz").read_bytes()
        assert md5(shipped) != record.gzip_md5[name]  # the header differs, so the file's MD5 does
        assert gzip.decompress(shipped) == contents[name]  # the compressed stream does not
        assert upstream_header(shipped, name, record.gzip_times[name]) == upstream[name]
        assert upstream_header(upstream[name], name, 0) == upstream[name]  # a header with a name is kept


def test_the_package_files_are_checked_then_written_into_the_raw_layout(fake, tmp_path):
    record, _, contents, _ = fake
    raw = fetch_from_package(tmp_path / "root", record)
    assert raw == tmp_path / "root" / "FashionMNIST" / "raw"
    assert files_in(raw) == sorted(RAW_FILES)  # and no temporary files left behind
    assert {name: (raw / name).read_bytes() for name in RAW_FILES} == contents


def test_the_upstream_files_themselves_pass_too(fake, tmp_path):
    record, folder, contents, upstream = fake
    for name in RAW_FILES:
        (folder / f"{name}.gz").write_bytes(upstream[name])
    raw = fetch_from_package(tmp_path / "root", record)
    assert {name: (raw / name).read_bytes() for name in RAW_FILES} == contents


def _flip_a_byte(blob: bytes) -> bytes:
    return blob[:20] + bytes([blob[20] ^ 0x01]) + blob[21:]


def _truncate(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


@pytest.mark.parametrize("corrupt", [_flip_a_byte, _truncate, lambda blob: b""])
def test_a_corrupted_file_is_refused_and_nothing_is_written(fake, tmp_path, corrupt):
    record, folder, _, _ = fake
    bad = folder / "t10k-labels-idx1-ubyte.gz"  # the last one checked: nothing may be written before it
    bad.write_bytes(corrupt(bad.read_bytes()))
    message = raises_one_line(fetch_from_package, tmp_path / "root", record)
    assert str(bad) in message and record.gzip_md5["t10k-labels-idx1-ubyte"] in message
    assert "apt-get install --reinstall dataset-fashion-mnist" in message
    assert not (tmp_path / "root").exists()


def test_content_that_is_not_the_recorded_one_is_refused(fake, tmp_path):
    record, folder, _, _ = fake
    wrong = dict(record.raw_sha256, **{"train-images-idx3-ubyte": "0" * 64})
    message = raises_one_line(fetch_from_package, tmp_path / "root", replace(record, raw_sha256=wrong))
    assert str(folder / "train-images-idx3-ubyte.gz") in message and "0" * 64 in message
    assert not (tmp_path / "root").exists()


def test_without_the_package_one_line_says_what_to_install(tmp_path, capsys):
    record = replace(FASHION_MNIST, package_dir=str(tmp_path / "not-installed"))
    message = raises_one_line(fetch_from_package, tmp_path / "root", record)
    assert "`apt-get install dataset-fashion-mnist`" in message and "--dataset fashion-mnist" in message
    assert not (tmp_path / "root").exists()


def test_an_invalid_raw_file_is_reported_not_overwritten(fake, tmp_path):
    record, _, _, _ = fake
    bad = record.raw(tmp_path) / "t10k-labels-idx1-ubyte"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(struct.pack(">2i", 2049, 10000) + bytes(9999) + b"\x0a")
    before = snapshot(tmp_path / "FashionMNIST")
    message = raises_one_line(fetch_from_package, tmp_path, record)
    assert str(bad) in message and "not the Fashion-MNIST file" in message and "outside 0..9" in message
    assert "rddrs data --dataset fashion-mnist" in message
    assert snapshot(tmp_path / "FashionMNIST") == before


def test_loading_without_the_files_says_how_to_get_them(tmp_path):
    message = raises_one_line(load_dataset, tmp_path, "fashion-mnist", train=False)
    assert "Fashion-MNIST not found" in message and f"rddrs data --root {tmp_path} --dataset fashion-mnist" in message


# ---------------------------------------------------------------- the real Fashion-MNIST, from Debian


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A data directory with Fashion-MNIST built by `rddrs data --dataset fashion-mnist` from Debian's
    package, and this checkout's MNIST beside it (linked)."""
    if not (PACKAGE / "t10k-labels-idx1-ubyte.gz").is_file():
        reason = (
            f"Debian's dataset-fashion-mnist is not installed ({PACKAGE} is missing): apt-get install "
            "dataset-fashion-mnist"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("data")
    assert main(["data", "--root", str(root), "--dataset", "fashion-mnist"]) == 0
    (root / "MNIST").symlink_to(ROOT / "data" / "MNIST")
    return root


def test_the_debian_files_are_the_published_ones(data_root):
    for name in RAW_FILES:
        shipped = (PACKAGE / f"{name}.gz").read_bytes()
        # Debian's build rewrote each header (dh_strip_nondeterminism): the file's MD5 is not the
        # published one, the upstream header put back gives it
        assert md5(shipped) != PUBLISHED_MD5[name]
        assert md5(upstream_header(shipped, name, FASHION_MNIST.gzip_times[name])) == PUBLISHED_MD5[name]
        raw = (data_root / "FashionMNIST" / "raw" / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == FASHION_RAW_SHA256[name]
    assert files_in(data_root / "FashionMNIST" / "raw") == sorted(RAW_FILES)


def test_valid_raw_files_are_used_as_they_are(data_root, capsys):
    raw = data_root / "FashionMNIST" / "raw"
    before = snapshot(raw)
    assert fetch_from_package(data_root, replace(FASHION_MNIST, package_dir="/nowhere")) == raw
    assert main(["data", "--root", str(data_root), "--dataset", "fashion-mnist"]) == 0
    assert f"Fashion-MNIST ready in {raw}" in capsys.readouterr().out
    assert snapshot(raw) == before


def test_the_raw_layout_is_torchvisions(data_root):
    from torchvision.datasets import FashionMNIST

    theirs = FashionMNIST(root=str(data_root), train=False, download=False)
    images, labels = load_dataset(data_root, "fashion-mnist", train=False)
    assert torch.equal(theirs.targets, labels) and torch.equal(theirs.data.unsqueeze(1).float() / 255, images)


@pytest.mark.parametrize("train, n", [(True, 60000), (False, 10000)])
def test_fashion_mnist_loads_with_ten_balanced_classes(data_root, train, n):
    images, labels = load_dataset(data_root, "fashion-mnist", train=train)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min().item() == 0.0 and images.max().item() == 1.0
    assert torch.equal((images * 255).round() / 255, images)  # exactly uint8 / 255
    assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    mnist_images, _ = load_dataset(data_root, train=train)  # the default is MNIST
    assert mnist_images.shape == images.shape and not torch.equal(mnist_images, images)


# ---------------------------------------------------------------- models and runs on Fashion-MNIST


@pytest.fixture(scope="module")
def fashion_model(data_root, tmp_path_factory):
    """A model trained on Fashion-MNIST by `rddrs train --dataset fashion-mnist` (2 batches: the
    bookkeeping does not depend on training), named by model_path."""
    models_dir = tmp_path_factory.mktemp("models")
    out = model_path(0.25, models_dir, "fashion-mnist")
    assert (
        main(
            [
                "train",
                "--dataset",
                "fashion-mnist",
                "--sigma",
                "0.25",
                "--epochs",
                "1",
                "--max-batches",
                "2",
                "--batch-size",
                "64",
                "--data",
                str(data_root),
                "--out",
                str(out),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """The committed MNIST weights without their record: a model of no known dataset."""
    path = tmp_path_factory.mktemp("bare") / "cnn.pt"
    shutil.copyfile(MNIST_MODEL, path)
    return path


def test_a_model_records_its_dataset(fashion_model, bare_model):
    meta = json.loads(fashion_model.with_suffix(".json").read_text())
    assert meta["dataset"] == "fashion-mnist" and meta["train_images"] == 60000
    assert trained_on(fashion_model) == trained_on(fashion_model.with_suffix(".pt2")) == "fashion-mnist"
    assert "dataset" not in json.loads(MNIST_MODEL.with_suffix(".json").read_text())  # an old record ...
    assert trained_on(MNIST_MODEL) == "mnist"  # ... reads as mnist
    assert trained_on(bare_model) is None
    foreign = bare_model.with_name("foreign.pt2")
    foreign.with_suffix(".json").write_text('{"description": "a record of someone else\'s"}')
    assert trained_on(foreign) is None


def test_a_model_of_another_dataset_is_one_line(fashion_model, data_root, tmp_path, capsys):
    message = raises_one_line(make_settings, "rs", 0.25, MNIST_MODEL, "smoke", dataset="fashion-mnist")
    assert f"model {MNIST_MODEL} was trained on mnist, and this run certifies fashion-mnist images" in message
    out = tmp_path / "rs.tsv"
    assert (
        main(
            [
                "certify",
                "--method",
                "rs",
                "--sigma",
                "0.25",
                "--model",
                str(fashion_model),
                "--preset",
                "smoke",
                "--data",
                str(data_root),
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained on fashion-mnist, and this run certifies mnist images" in err
    assert files_in(tmp_path) == []
    bad = tmp_path / "unreadable.pt"
    shutil.copyfile(fashion_model, bad)
    bad.with_suffix(".json").write_text("{not json")
    assert "cannot read the record" in raises_one_line(make_settings, "rs", 0.25, bad, "smoke")


def certify(model, out, data, *extra, method="rs"):
    return main(
        [
            "certify",
            "--method",
            method,
            "--sigma",
            "0.25",
            "--model",
            str(model),
            "--preset",
            "smoke",
            "--data",
            str(data),
            "--quiet",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_a_smoke_run_on_fashion_mnist_records_its_dataset(fashion_model, data_root, tmp_path):
    out = tmp_path / "rs.tsv"
    assert certify(fashion_model, out, data_root, "--dataset", "fashion-mnist") == 0
    settings = read_sidecar(out)["settings"]
    assert settings["dataset"] == "fashion-mnist" and run_dataset(settings) == "fashion-mnist"
    _, labels = load_dataset(data_root, "fashion-mnist", train=False)
    rows = read_rows(out)
    assert sorted(rows) == [0, 1, 2, 3] and [rows[i]["label"] for i in range(4)] == labels[:4].tolist()
    # the memory pass reads the run's dataset from its sidecar: here only Fashion-MNIST is there
    fashion_only = tmp_path / "fashion-only"
    fashion_only.mkdir()
    (fashion_only / "FashionMNIST").symlink_to(data_root / "FashionMNIST")
    assert main(["memory", str(out), "--data", str(fashion_only), "--quiet"]) == 0
    assert len(read_rows(out)) == 4 and (tmp_path / "rs.tsv.memory.tsv").is_file()


def test_a_sweep_on_fashion_mnist_writes_into_its_folder(fashion_model, data_root, tmp_path, capsys):
    results = tmp_path / "results"
    sweep = [
        "sweep",
        "--preset",
        "smoke",
        "--dataset",
        "fashion-mnist",
        "--groups",
        "standard",
        "--methods",
        "rs",
        "--sigmas",
        "0.25",
        "--models",
        str(fashion_model.parent),
        "--data",
        str(data_root),
        "--results",
        str(results),
        "--quiet",
    ]
    assert main([*sweep, "--list"]) == 0
    assert "fashion-mnist/rs_sigma0.25.tsv" in capsys.readouterr().out
    assert main(sweep) == 0
    out = results / "fashion-mnist" / "rs_sigma0.25.tsv"
    assert read_sidecar(out)["settings"]["dataset"] == "fashion-mnist" and sorted(read_rows(out)) == [0, 1, 2, 3]
    assert not (results / "rs_sigma0.25.tsv").exists()  # MNIST's name stays MNIST's
    # the same rows as one plain certify
    plain = tmp_path / "plain.tsv"
    assert certify(fashion_model, plain, data_root, "--dataset", "fashion-mnist") == 0
    strip = lambda rows: {i: {k: v for k, v in r.items() if k != "seconds"} for i, r in rows.items()}  # noqa: E731
    assert strip(read_rows(out)) == strip(read_rows(plain))


# ---------------------------------------------------------------- MNIST's records read as before


def test_an_old_sidecar_without_a_dataset_reads_as_mnist(bare_model, tmp_path):
    committed = ROOT / "results" / "cpu" / "rs_sigma0.25.tsv"
    out = tmp_path / committed.name
    shutil.copyfile(committed, out)
    shutil.copyfile(committed.with_name(committed.name + ".json"), out.with_name(out.name + ".json"))
    stored = read_sidecar(out)["settings"]
    assert "dataset" not in stored and run_dataset(stored) == "mnist"
    mnist = make_settings("rs", 0.25, MNIST_MODEL, "cpu")
    assert "dataset" not in mnist.comparable()  # a new MNIST run records its settings as before
    check_settings(out, mnist)  # resumes without complaint
    assert normalised({**stored, "dataset": "mnist"}) == normalised(stored)
    fashion = make_settings("rs", 0.25, bare_model, "cpu", dataset="fashion-mnist")
    assert fashion.comparable()["dataset"] == "fashion-mnist"
    assert "(dataset differ)" in raises_one_line(check_settings, out, fashion)


def test_a_run_resumed_on_another_dataset_is_refused(bare_model, data_root, tmp_path, capsys):
    out = tmp_path / "ddrs.tsv"
    assert certify(bare_model, out, data_root, "--count", "2", method="ddrs") == 0
    before = snapshot(tmp_path)
    assert certify(bare_model, out, data_root, "--dataset", "fashion-mnist", method="ddrs") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (dataset differ)" in err
    # nor may a search start from a run on another dataset
    assert (
        certify(
            bare_model,
            tmp_path / "ancer.tsv",
            data_root,
            "--count",
            "2",
            "--dataset",
            "fashion-mnist",
            "--init",
            str(out),
            method="ancer",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was run with another dataset" in err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- the committed Fashion-MNIST model


def test_the_committed_fashion_model_is_trained_with_the_recipe_and_accurate(data_root):
    from rddrs.pipeline.models import load_model
    from rddrs.pipeline.train import DEFAULTS

    pt = model_path(0.25, ROOT / "data" / "models", "fashion-mnist")
    meta = json.loads(pt.with_suffix(".json").read_text())
    assert meta["dataset"] == "fashion-mnist" and meta["arch"] == "MnistCNN"
    assert {k: meta["settings"][k] for k in DEFAULTS} == DEFAULTS and meta["settings"]["max_batches"] is None
    assert meta["settings"]["sigma"] == 0.25
    for path in (pt, pt.with_suffix(".pt2")):
        assert meta["files"][path.name] == {
            "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    images, labels = load_dataset(data_root, "fashion-mnist", train=False)
    x, y = images[:1000], labels[:1000]
    with torch.no_grad():
        logits, program = load_model(pt)(x), load_model(pt.with_suffix(".pt2"))(x)
    torch.testing.assert_close(program, logits, atol=1e-5, rtol=0)
    assert (logits.argmax(1) == y).float().mean().item() >= 0.85
    assert meta["clean_test_accuracy"] >= 0.85 and meta["noisy_test_accuracy"] >= 0.84
