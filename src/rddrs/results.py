"""Result files of certification runs: their layout, and the one reader of their rows.

A run writes ``OUT`` (tab-separated: a header of ``COLUMNS``, then one row per test image,
appended and flushed as each batch is done), its JSON sidecar ``OUT.json`` (settings and
provenance) and, for the searched methods, ``OUT.traces/IDX.npz`` (objective traces and the
final smoothing parameter; not committed). This module imports nothing heavy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rddrs import RDDRSError
from rddrs.files import write_atomic

COLUMNS = ("idx", "label", "predict", "correct", "gap", "radius", "proxy_radius",
           "sigma_min", "sigma_proxy", "sigma_max", "p_lower", "seconds")
INT_COLUMNS = {"idx", "label", "predict", "correct"}


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def traces_dir(out: Path) -> Path:
    return out.with_name(out.name + ".traces")


def result_path(results: str | Path, method: str, sigma: float) -> Path:
    """The standard run of ``method`` at ``sigma`` in a results folder."""
    return Path(results) / f"{method}_sigma{sigma:.2f}.tsv"


def model_path(sigma: float, models: str | Path = "data/models") -> Path:
    """The base classifier trained at ``sigma`` (``make train``)."""
    return Path(models) / f"mnist_cnn_sigma{sigma:.2f}.pt"


def read_sidecar(out: Path) -> dict:
    """The sidecar of ``out`` as a dict, or a one-line error naming the file and the fix."""
    side = sidecar_path(Path(out))
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise RDDRSError(f"{out} has no sidecar {side.name}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RDDRSError(f"{side}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise RDDRSError(f"{side} is not valid JSON (line {err.lineno}: {err.msg}); restore it from a copy, "
                         f"or move {Path(out).name} and its sidecar away to start the run afresh") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
        raise RDDRSError(f"{side} holds no 'settings' object: it is not the sidecar of an rddrs run")
    return meta


def format_value(value) -> str:
    """A field of a row: integers as such, floats with every digit (``repr``)."""
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(int(value))


def complete_lines(path: Path, repair: bool = False) -> list[str]:
    """The complete lines of an appended-to file. A half-written last line (a killed writer) is
    left out; with ``repair`` it is also cut off the file, which only the file's writer may do
    (under its lock): a reader must never shorten a file that another process is appending to."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RDDRSError(f"{path}: cannot read ({err})") from None
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        if repair:
            with open(path, "r+") as f:
                f.truncate(len(text.encode()))
    return text.splitlines()


def read_table(path: Path, required=COLUMNS, repair: bool = False) -> tuple[list[str], list[tuple[int, dict]]]:
    """The one reader of result and memory files: the header and every complete row with its line
    number (the header is line 1). The header may hold the columns in any order and others
    beside them, but must hold ``required``; ``INT_COLUMNS`` are read as integers, the other
    columns of ``COLUMNS`` as floats, any other column as text. Blank lines are skipped, a
    half-written last line is left out (see ``complete_lines``); every other problem (a field
    that is not a number, a wrong number of fields, an idx seen twice) is a one-line error
    naming the file and the line."""
    path = Path(path)
    lines = complete_lines(path, repair)
    if not lines or not lines[0].strip():
        raise RDDRSError(f"{path} line 1: empty file, expected a header row")
    header = [h.strip() for h in lines[0].split("\t")]
    header[0] = header[0].removeprefix("\ufeff")
    if dup := sorted({h for h in header if header.count(h) > 1}):
        raise RDDRSError(f"{path} line 1: duplicated column {dup[0]!r} in the header")
    if missing := [c for c in required if c not in header]:
        raise RDDRSError(f"{path} line 1: missing column{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} (header has: {' '.join(header)})")
    kinds = [(int, "an integer") if h in INT_COLUMNS else (float, "a number") if h in COLUMNS else (None, "")
             for h in header]
    rows, seen = [], {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) != len(header):
            raise RDDRSError(f"{path} line {number}: {len(fields)} fields, the header has {len(header)}")
        row = {}
        for name, text, (kind, what) in zip(header, fields, kinds):
            try:
                row[name] = text if kind is None else kind(text)
            except ValueError:
                raise RDDRSError(f"{path} line {number}: column {name!r}: {text!r} is not {what}") from None
        if "idx" in row:
            if row["idx"] in seen:
                raise RDDRSError(f"{path} line {number}: idx {row['idx']} already on line {seen[row['idx']]}")
            seen[row["idx"]] = number
        rows.append((number, row))
    return header, rows


def read_rows(out: Path, repair: bool = False) -> dict[int, dict]:
    """Complete rows of an rddrs result file by idx (``read_table``; none if there is no file).
    ``repair``: cut a half-written last line off the file (its writer, resuming, does)."""
    out = Path(out)
    if not out.exists():
        return {}
    header, rows = read_table(out, COLUMNS, repair)
    if tuple(header[: len(COLUMNS)]) != COLUMNS:
        raise RDDRSError(f"{out} is not an rddrs result file (its header is not {' '.join(COLUMNS)})")
    return {row["idx"]: row for _, row in rows}


def write_rows(out: Path, rows: list[dict]) -> None:
    """Write a whole result file atomically."""
    lines = ["\t".join(COLUMNS)] + ["\t".join(format_value(row[k]) for k in COLUMNS) for row in rows]
    write_atomic(out, [("\n".join(lines) + "\n").encode()])
