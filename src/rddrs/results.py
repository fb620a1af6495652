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


def complete_lines(path: Path) -> list[str]:
    """The lines of an appended-to file; a half-written last line (a killed writer) is cut off the file."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        with open(path, "r+") as f:
            f.truncate(len(text.encode()))
    return text.splitlines()


def read_rows(out: Path) -> dict[int, dict]:
    """Complete rows of a result file by idx; a half-written last line is cut off the file."""
    lines = complete_lines(Path(out))
    if not lines:
        return {}
    header = lines[0].split("\t")
    if tuple(header[: len(COLUMNS)]) != COLUMNS:
        raise RDDRSError(f"{out} is not an rddrs result file (unexpected header)")
    rows = {}
    for number, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(header):
            raise RDDRSError(f"{out}, line {number}: expected {len(header)} fields, got {len(values)}")
        try:
            row = {k: int(v) if k in INT_COLUMNS else float(v) for k, v in zip(header, values)}
        except ValueError as err:
            raise RDDRSError(f"{out}, line {number}: {err}") from None
        if row["idx"] in rows:
            raise RDDRSError(f"{out}, line {number}: idx {row['idx']} appears twice")
        rows[row["idx"]] = row
    return rows


def write_rows(out: Path, rows: list[dict]) -> None:
    """Write a whole result file atomically."""
    lines = ["\t".join(COLUMNS)] + ["\t".join(format_value(row[k]) for k in COLUMNS) for row in rows]
    write_atomic(out, [("\n".join(lines) + "\n").encode()])
