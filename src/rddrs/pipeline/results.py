"""Result files of certification runs: their layout, and the one reader of their rows.

A run writes ``OUT`` (tab-separated: a header of ``COLUMNS``, then one row per test image,
appended and flushed as each batch is done), its JSON sidecar ``OUT.json`` (settings and
provenance, :mod:`rddrs.pipeline.provenance`) and, for the searched methods,
``OUT.traces/IDX.npz`` (objective traces and the final smoothing parameter; not committed).
This module imports nothing heavy.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from rddrs import RDDRSError
from rddrs.pipeline.files import write_atomic

COLUMNS = (
    "idx",
    "label",
    "predict",
    "correct",
    "gap",
    "radius",
    "proxy_radius",
    "sigma_min",
    "sigma_proxy",
    "sigma_max",
    "p_lower",
    "seconds",
    "search",
)
INT_COLUMNS = {"idx", "label", "predict", "correct"}
#: columns added after result files were first written, with the value their old rows read as
ADDED = {"search": "ok"}
#: the columns every result file has, in this order
REQUIRED = tuple(c for c in COLUMNS if c not in ADDED)
#: ``search``: ``ok``, ``diverged@ITER`` (the step of that iteration overflowed: the image was
#: certified with its last finite law) or ``-`` (RS, no search)
SEARCH_STATUS = re.compile(r"^(ok|-|diverged@[1-9][0-9]*)$")


def search_status(diverged_at: int | None) -> str:
    """The ``search`` field of a row: ``-`` without a search, else ``ok`` or ``diverged@ITER``."""
    if diverged_at is None:
        return "-"
    return "ok" if int(diverged_at) == 0 else f"diverged@{int(diverged_at)}"


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def memory_path(out: Path) -> Path:
    """Where the memory pass over the result file ``out`` writes its rows: ``OUT.memory.tsv``."""
    return out.with_name(out.name + ".memory.tsv")


def traces_dir(out: Path) -> Path:
    return out.with_name(out.name + ".traces")


def result_path(results: str | Path, method: str, sigma: float) -> Path:
    """The standard run of ``method`` at ``sigma`` in a results folder."""
    return Path(results) / f"{method}_sigma{sigma:.2f}.tsv"


def dataset_folder(results: str | Path, dataset: str = "mnist") -> Path:
    """Where the runs on ``dataset`` live in a preset's results folder: the folder itself for MNIST
    (the layout of the committed results), its sub-folder named after the dataset for another
    (``results/cpu/fashion-mnist/rs_sigma0.25.tsv``)."""
    return Path(results) if dataset == "mnist" else Path(results) / dataset


def model_path(sigma: float, models: str | Path = "data/models", dataset: str = "mnist") -> Path:
    """The base classifier trained on ``dataset`` at ``sigma``: where ``rddrs train`` writes it by
    default and where the runs of a preset look for it (``data/models/mnist_cnn_sigma0.25.pt``,
    ``data/models/fashion-mnist_cnn_sigma0.25.pt``)."""
    return Path(models) / f"{dataset}_cnn_sigma{sigma:.2f}.pt"


def read_sidecar(out: Path, optional: bool = False) -> dict | None:
    """The sidecar of ``out`` as a dict, or a one-line error naming the file and the fix.
    ``optional``: the sidecar of a result file that another tool may have written (``rddrs
    curves`` reads those): None where there is none, and any JSON object will do (its method
    and sigma may stand at its top level, with no ``settings`` object)."""
    side = sidecar_path(Path(out))
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if optional:
            return None
        raise RDDRSError(f"{out} has no sidecar {side.name}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RDDRSError(f"{side}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise RDDRSError(
            f"{side} is not valid JSON (line {err.lineno}: {err.msg}); restore it from a copy, "
            f"or move {Path(out).name} and its sidecar away to start the run afresh"
        ) from None
    if not isinstance(meta, dict):
        raise RDDRSError(
            f"{side} holds {type(meta).__name__}, not a JSON object: it is not the sidecar of an rddrs run"
        )
    if not optional and not isinstance(meta.get("settings"), dict):
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


def ends_mid_line(path: Path) -> bool:
    """Whether ``path`` ends in half a line, which ``complete_lines`` leaves out."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def read_table(path: Path, required=COLUMNS, repair: bool = False) -> tuple[list[str], list[tuple[int, dict]]]:
    """The one reader of result and memory files: the header and every complete row with its line
    number (the header is line 1). The header may hold the columns in any order and others
    beside them, but must hold ``required``; ``INT_COLUMNS`` are read as integers, the other
    columns of ``COLUMNS`` as floats, any other column as text. Blank lines are skipped, a
    half-written last line is left out (see ``complete_lines``); every other problem (a field
    that is not a number, a wrong number of fields, an idx seen twice, a search status that is
    none of ``SEARCH_STATUS``) is a one-line error naming the file and the line. A column of
    ``ADDED`` that the file lacks reads as its default."""
    path = Path(path)
    lines = complete_lines(path, repair)
    if not lines or not lines[0].strip():
        raise RDDRSError(f"{path} line 1: empty file, expected a header row")
    header = [h.strip() for h in lines[0].split("\t")]
    header[0] = header[0].removeprefix("\ufeff")
    if dup := sorted({h for h in header if header.count(h) > 1}):
        raise RDDRSError(f"{path} line 1: duplicated column {dup[0]!r} in the header")
    if missing := [c for c in required if c not in header]:
        raise RDDRSError(
            f"{path} line 1: missing column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)} (header has: {' '.join(header)})"
        )
    kinds = [
        (int, "an integer")
        if h in INT_COLUMNS
        else (None, "")
        if h in ADDED or h not in COLUMNS
        else (float, "a number")
        for h in header
    ]
    defaults = {k: v for k, v in ADDED.items() if k not in header}
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
        if "search" in row and not SEARCH_STATUS.match(row["search"]):
            raise RDDRSError(f"{path} line {number}: column 'search': {row['search']!r} is not ok, - or diverged@ITER")
        row.update(defaults)
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
    if not out.exists() or out.stat().st_size == 0:  # an empty file is a run whose writer is writing its header
        return {}
    header, rows = read_table(out, REQUIRED, repair)
    if tuple(header[: len(REQUIRED)]) != REQUIRED:
        raise RDDRSError(f"{out} is not an rddrs result file (its header is not {' '.join(COLUMNS)})")
    return {row["idx"]: row for _, row in rows}


def row_problem(row: dict, test_size: int, classes: int) -> str | None:
    """What makes ``row`` one that no run writes, or None: an idx outside the test set (0..test_size-1),
    a label or prediction that is no class (or -1, abstain, for the prediction), ``correct`` that
    does not say whether they agree, a gap, radius or time that is not finite and >= 0, a scale
    that is not finite and > 0, a ``p_lower`` outside [0, 1]."""
    if not 0 <= row["idx"] < test_size:
        return f"idx {row['idx']} is outside the test set (0..{test_size - 1})"
    if not 0 <= row["label"] < classes:
        return f"label {row['label']} is no class (0..{classes - 1})"
    if not -1 <= row["predict"] < classes:
        return f"predict {row['predict']} is no class nor -1 (abstain)"
    if row["correct"] != int(row["predict"] == row["label"]):
        return f"correct is {row['correct']} with predict {row['predict']} and label {row['label']}"
    for column in ("gap", "radius", "proxy_radius", "seconds"):
        if not (math.isfinite(row[column]) and row[column] >= 0):
            return f"{column} {row[column]!r} is not a finite number >= 0"
    for column in ("sigma_min", "sigma_proxy", "sigma_max"):
        if not (math.isfinite(row[column]) and row[column] > 0):
            return f"{column} {row[column]!r} is not a finite scale > 0"
    if not 0 <= row["p_lower"] <= 1:
        return f"p_lower {row['p_lower']!r} is not a probability"
    return None


def check_values(rows: dict[int, dict], where: str, test_size: int, classes: int) -> None:
    """A one-line error naming ``where`` and the first row that no run writes (``row_problem``)."""
    for i, row in sorted(rows.items()):
        if problem := row_problem(row, test_size, classes):
            raise RDDRSError(f"{where}: the row of idx {i} cannot be a run's: {problem}")


def check_labels(rows: dict[int, dict], labels, where: str, start: int = 0) -> None:
    """A one-line error unless each row's label is its test image's: ``labels[idx - start]``."""
    inside = [i for i in sorted(rows) if 0 <= i - start < len(labels)]
    if wrong := [i for i in inside if rows[i]["label"] != int(labels[i - start])]:
        i = wrong[0]
        raise RDDRSError(
            f"{where}: the row of idx {i} says label {rows[i]['label']}, the test set "
            f"{int(labels[i - start])} ({len(wrong)} rows differ); the file was changed or is of another "
            "test set"
        )


def format_row(row: dict, columns=COLUMNS) -> str:
    """One line of a result (or memory) file; text columns as they are."""
    return "\t".join(row[k] if isinstance(row[k], str) else format_value(row[k]) for k in columns)


def write_rows(out: Path, rows: list[dict], columns=COLUMNS) -> None:
    """Write a whole result (or memory) file atomically; missing ``ADDED`` columns get their default."""
    lines = ["\t".join(columns)] + [format_row({**ADDED, **row}, columns) for row in rows]
    write_atomic(out, [("\n".join(lines) + "\n").encode()])


def upgrade(out: Path, columns=COLUMNS, read=read_rows) -> None:
    """Rewrite a file written before a column of ``ADDED`` existed with today's header (its old
    rows get the default), so that rows can be appended to it; its writer calls this under its lock."""
    out = Path(out)
    if not out.exists() or out.stat().st_size == 0:
        return
    with open(out, encoding="utf-8", errors="replace") as f:
        header = tuple(h.strip() for h in f.readline().rstrip("\n").split("\t"))
    if header != tuple(columns):
        rows = read(out, repair=True)
        write_rows(out, list(rows.values()) if isinstance(rows, dict) else rows, columns)
