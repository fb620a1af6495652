"""What the pipeline writes: atomic files, locks, JSON records and one-line error texts (the
provenance of what it writes is :mod:`rddrs.pipeline.provenance`'s)."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path

from rddrs import RDDRSError

#: terminal escape sequences (colours, cursor moves) and the other control characters
_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(err: BaseException, limit: int | None = None) -> str:
    """``Type: message`` of an exception, on one line, without terminal escape codes or other
    control characters; a message longer than ``limit`` characters is cut there (ending in ...)."""
    text = _CONTROL.sub("", " ".join(_ESCAPE.sub("", str(err)).split()))
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 3)].rstrip() + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class Busy(RDDRSError):
    """A file is being written by another process (``exclusive``): the same command can
    succeed once that process has ended."""


def regular_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (or a link to one), else a one-line error naming ``what``
    it should be and what it is: missing, a directory, a device such as /dev/null, a FIFO."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise RDDRSError(f"{what} {path}: no such file")
    kind = (
        "a directory"
        if path.is_dir()
        else "a FIFO"
        if path.is_fifo()
        else "a device"
        if path.is_char_device() or path.is_block_device()
        else "a socket"
        if path.is_socket()
        else "something else"
    )
    raise RDDRSError(f"{what} {path} is {kind}, not a regular file")


def ensure_dir(folder: Path) -> Path:
    """``folder``, created with its parents if missing, or a one-line error saying why not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RDDRSError(
            f"cannot write into {folder}: the directory cannot be created ({one_line(err)}); choose a writable place"
        ) from None
    return folder


def write_atomic(path: Path, chunks: list[bytes]) -> None:
    """Write ``path`` under a temporary name in its directory, then rename it into place,
    so that a reader (or a killed writer) never sees half a file."""
    ensure_dir(path.parent)
    tmp = None
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
        with open(tmp, "xb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise RDDRSError(
                f"cannot write {path} ({one_line(err)}); check that the directory is writable and has free space"
            ) from None
        raise


def read_json(path: str | Path, keys: dict[str, type] | None = None):
    """The JSON value stored at ``path``, which (``keys``) must be an object holding each key with a
    value of its type; a one-line error naming the file otherwise."""
    import json

    fix = "move it away to compute it again"
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RDDRSError(f"{path} cannot be read as JSON ({one_line(err)}); {fix}") from None
    if keys and not (isinstance(value, dict) and all(isinstance(value.get(k), t) for k, t in keys.items())):
        wanted = ", ".join(f"{k!r} ({t.__name__})" for k, t in keys.items())
        raise RDDRSError(f"{path} is not what rddrs stores there (an object with {wanted}); {fix}")
    return value


def cached_json(path: str | Path, compute, keys: dict[str, type] | None = None):
    """The JSON value stored at ``path`` (``read_json``, with ``keys``); if there is none,
    ``compute()``'s, stored atomically."""
    import json

    path = Path(path)
    if path.exists():
        return read_json(path, keys)
    value = compute()
    write_atomic(path, [json.dumps(value, indent=2).encode()])
    return value


@contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on ``path`` (through ``path.lock`` beside it) while writing it, so
    that a second process appending to the same file fails at once instead of mixing rows."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    ensure_dir(path.parent)
    try:
        handle = open(lock, "w")
    except OSError as err:
        raise RDDRSError(f"cannot write in {path.parent} ({one_line(err)}); choose a writable place") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{path} is being written by another process; wait for it or use another file") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
