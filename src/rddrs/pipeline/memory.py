"""The memory pass as a run: the rows of a result file in ascending idx, through the memory of
``rddrs.core.regions``, into ``OUT.memory.tsv`` (resumable; see ``apply_memory``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from rddrs import RDDRSError
from rddrs.core.certify import ABSTAIN
from rddrs.core.methods import METHODS, method as method_record
from rddrs.core.noise import Smoothing, family_class
from rddrs.core.regions import TOUCH_TOLERANCE, Memory
from rddrs.core.spd import random_orthogonal
from rddrs.pipeline.files import exclusive, write_atomic
from rddrs.pipeline.results import (
    COLUMNS,
    REQUIRED,
    check_labels,
    format_row,
    memory_path,
    read_rows,
    read_table,
    sidecar_path,
    upgrade,
)
from rddrs.pipeline.runs import trace_param

MEMORY_COLUMNS = COLUMNS + ("memory",)
#: the memory status of a row CERTIFY abstained on (it has no region)
ABSTAINED = "abstain"


def read_memory_rows(path: Path, repair: bool = False) -> list[dict]:
    """Complete rows of a memory file, in file order (``results.read_table``); ``repair``: cut a
    half-written last line off the file (the pass does, under its lock)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        if tuple(f.readline().rstrip("\n").split("\t")) not in (MEMORY_COLUMNS, REQUIRED + ("memory",)):
            raise RDDRSError(f"{path} is not a memory file (unexpected header); move it away or remove it")
    _, rows = read_table(path, REQUIRED + ("memory",), repair)
    return [row for _, row in rows]


def _trace_reader(out: Path, method: str, d: int) -> Callable[[int], Tensor]:
    """Image idx -> the final parameter (float64) in its trace: theta (d,) or C (d, d); the last
    ones read are kept for a dense family (whose memory reads its laws again when needed)."""

    def read(idx: int) -> Tensor:
        return torch.from_numpy(trace_param(out, idx, method, d))

    return lru_cache(maxsize=32)(read) if family_class(method_record(method).family).dense else read


def apply_memory(
    out: Path, images: Tensor, start: int = 0, progress: bool = True, labels: Tensor | None = None
) -> Path:
    """Run the memory over the result file ``out`` in ascending idx; write ``OUT.memory.tsv``.

    ``images[i - start]`` is test image i (rotated as the run was, if it used ``--rotate``), and
    ``labels[i - start]`` (if given) its label, which its row must hold.
    Each row's S: ``sigma_min`` of the row for RS and DDRS (it is sigma), ``param`` of its
    trace for ANCER (theta) and RDDRS (C, read only when needed). The output has
    ``results.COLUMNS`` plus ``memory`` (kept, shrunk, relabelled or abstain);
    ``predict``, ``correct``, ``gap`` and the radii (``gap * sigma_min``, ``gap * sigma_proxy``)
    follow the memory, the other columns (``p_lower`` of the originally predicted class
    included) are copied. Rows are appended and flushed one by one; a rerun rebuilds the
    memory from the rows already written and continues, so a killed pass loses nothing. Before
    anything is written, every row's law is checked (``noise.from_param``'s checks): a sound pass certifies from
    valid covariances only.
    """
    out = Path(out)
    side = sidecar_path(out)
    if not out.exists() or not side.exists():
        raise RDDRSError(f"{out}: no such result file (with its .json sidecar)")
    try:
        meta = json.loads(side.read_text())
        method = meta["settings"]["method"]
    except (json.JSONDecodeError, KeyError, TypeError):
        method = None
    if method not in METHODS:
        raise RDDRSError(f"{side} is not the sidecar of an rddrs run (no settings.method)")
    rows = read_rows(out)
    if not rows:
        raise RDDRSError(f"{out} holds no rows")
    lo, hi = min(rows), max(rows)
    if missing := [i for i in range(lo, hi + 1) if i not in rows]:
        raise RDDRSError(
            f"{out} misses idx {missing[0]} ({len(missing)} rows in {lo}..{hi}); "
            "the memory needs contiguous rows (merge the shards first)"
        )
    if lo < start or hi >= start + len(images):
        raise RDDRSError(f"{out} has idx {lo}..{hi}, outside the images {start}..{start + len(images) - 1}")
    ordered = [rows[i] for i in range(lo, hi + 1)]
    if labels is not None:
        check_labels(rows, labels, str(out), start)
    d = images[0].numel()
    rotate = meta["settings"].get("rotate")
    rotation = random_orthogonal(d, seed=rotate) if rotate is not None else None
    family = family_class(method_record(method).family)
    # an in_rows family's sigma is in the row; theta and C are in the traces
    read = None if family.in_rows else _trace_reader(out, method, d)

    checked = set()  # the idx whose law was found valid

    def region(row: dict) -> tuple[Tensor, Smoothing]:
        """Centre and batch-1 law of a row's region."""
        x = images[row["idx"] - start].reshape(-1).double()
        param = torch.tensor([row["sigma_min"]], dtype=torch.float64) if read is None else read(row["idx"])[None]
        try:
            law = family.from_param(param, d, check=row["idx"] not in checked)
        except RDDRSError as err:
            raise RDDRSError(
                f"{out}: the law of idx {row['idx']} is not a valid covariance ({err}); the memory "
                "certifies from valid laws only"
            ) from None
        checked.add(row["idx"])
        return (x if rotation is None else rotation @ x), law

    path = memory_path(out)
    with exclusive(path):  # one writer at a time
        done = read_memory_rows(path, repair=True)
        if len(done) > len(ordered) or any(
            old[k] != new[k] for old, new in zip(done, ordered) for k in ("idx", "label", "p_lower", "sigma_min")
        ):
            raise RDDRSError(f"{path} does not match the rows of {out.name}; remove it to start again")
        if len(done) == len(ordered):  # complete: nothing to rebuild (the traces need not exist)
            return path
        for row in ordered:  # checked: from here on the pass writes
            region(row)
        upgrade(path, MEMORY_COLUMNS, read_memory_rows)  # a pass of an older rddrs gets today's columns
        memory = Memory(load=read if family.dense else None)  # dense laws: read again when needed
        for row in done:
            if row["memory"] != ABSTAINED:
                memory.store(*region(row), row["gap"], row["predict"], key=row["idx"])
        write_atomic(
            sidecar_path(path),
            [
                json.dumps(
                    dict(
                        meta, memory={"source": out.name, "order": "ascending idx", "touch_tolerance": TOUCH_TOLERANCE}
                    ),
                    indent=2,
                ).encode()
            ],
        )
        bar = tqdm(total=len(ordered), initial=len(done), disable=not progress, unit="image", desc="memory")
        fresh = not path.exists() or path.stat().st_size == 0
        with open(path, "a") as f:
            if fresh:
                f.write("\t".join(MEMORY_COLUMNS) + "\n")
            for row in ordered[len(done) :]:
                row = dict(row, memory=ABSTAINED)
                if row["predict"] != ABSTAIN:
                    decision = memory.admit(*region(row), row["gap"], row["predict"], key=row["idx"])
                    row.update(
                        predict=decision.label,
                        correct=int(decision.label == row["label"]),
                        gap=decision.gap,
                        radius=decision.gap * row["sigma_min"],
                        proxy_radius=decision.gap * row["sigma_proxy"],
                        memory=decision.status,
                    )
                f.write(format_row(row, MEMORY_COLUMNS) + "\n")
                f.flush()
                bar.update()
            os.fsync(f.fileno())
        bar.close()
        return path
