"""Provenance: where and from what code a session computed its numbers, and which session wrote
which rows of a result file.

A provenance record (``provenance``) is a dict holding the ``versions`` (rddrs, torch, python),
the ``device`` (with the GPU's or processor's name), the ``processor`` (the CPU's model name),
the torch ``threads``, the ``host``, the allocator's ``malloc_tuning``, the ``git_commit`` the
code ran from and whether the tree was ``git_dirty``, and the time it was ``created``. A
certification run adds the ``network`` path it computed the CNN with, and each of its writing
sessions is one part of the result file's sidecar (``parts``), with ``rows``: the ``[lo, hi)``
ranges of idx it set out to write. A sidecar written before parts existed holds one record,
``provenance``, for all its rows. ``recorded`` wraps the rows of a measurement with the
provenance of their making; ``results_provenance`` collects what the sidecars of a results
folder say about their making (for the book's notes).

This module imports nothing heavy; torch is imported by the functions that read it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from rddrs import __version__
from rddrs.pipeline import allocator

# -- the session -------------------------------------------------------------------------------


def git(*args: str, cwd: str | Path | None = None) -> str | None:
    """What ``git ARGS`` prints in ``cwd`` (default: this package's checkout), stripped; None
    where git is missing or fails (not a repository)."""
    try:
        proc = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=20, cwd=cwd or Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def processor_name() -> str:
    """The CPU's model name as the kernel reports it (``platform.machine()`` where it does not)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def provenance(device) -> dict:
    """Versions, device, processor, threads, host, git commit (and whether the tree was dirty), time. Where
    the code runs from a copy of the repository (a bare GPU machine), ``RDDRS_SOURCE_COMMIT``
    names the commit it was copied from and wins over what git says there (such a copy can carry
    another checkout's history); its dirtiness is then unknown."""
    import torch

    declared = os.environ.get("RDDRS_SOURCE_COMMIT") or None
    commit = declared or git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain") if commit and not declared else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "versions": {"rddrs": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": f"{device} ({name})",
        "processor": processor_name(),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "malloc_tuning": allocator.status(),
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def recorded(device: str, rows) -> dict:
    """Rows of a measurement with the provenance of their making (device, versions, commit, time)."""
    import torch

    return {"provenance": provenance(torch.device(device)), "rows": rows}


# -- who wrote which rows ----------------------------------------------------------------------


def index_ranges(indices) -> list[list[int]]:
    """Sorted indices as ``[lo, hi)`` ranges of consecutive ones."""
    ranges: list[list[int]] = []
    for i in sorted(int(i) for i in indices):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        elif not ranges or ranges[-1][1] < i:
            ranges.append([i, i + 1])
    return ranges


def provenance_parts(meta: dict, indices=None) -> list[dict]:
    """The sessions that wrote a result file, oldest first: each a provenance record (device,
    versions, commit, ...) with ``rows``, the ``[lo, hi)`` ranges of idx it set out to write. A
    sidecar from before parts existed has one, its ``provenance``, for every row (``indices``,
    the file's rows, turn that into ranges; without them ``rows`` is None)."""
    if isinstance(meta.get("parts"), list):
        return [dict(part) for part in meta["parts"]]
    prov = meta.get("provenance")
    if not isinstance(prov, dict) or (indices is not None and not len(indices)):
        return []
    return [dict(prov, rows=None if indices is None else index_ranges(indices))]


def with_parts(meta: dict, parts: list[dict], indices=None) -> dict:
    """``meta`` with ``parts`` appended to its writing sessions (``indices``: its rows so far)."""
    return dict(meta, parts=provenance_parts(meta, indices) + parts)


def row_writers(meta: dict, indices) -> dict[int, dict]:
    """The session that wrote each row (the latest part that set out to write it)."""
    writers = {}
    for part in provenance_parts(meta, indices):
        for i in indices:
            if part["rows"] is None or any(lo <= i < hi for lo, hi in part["rows"]):
                writers[i] = part
    return writers


# -- a results folder --------------------------------------------------------------------------


def results_provenance(results_dir) -> dict:
    """What the sidecars of the result files under ``results_dir`` say about their making:
    ``files``; ``presets``; ``machines`` (device -> set of thread counts); ``versions``
    ("rddrs X, torch Y"); ``commits`` recorded by the runs, ``dirty`` (some runs had uncommitted
    changes) and ``uncommitted`` (runs that recorded no commit); ``first``/``last`` creation
    dates; ``stored``: the commit that last changed the folder in git (hash, date), if tracked."""
    folder = Path(results_dir)
    sidecars = sorted(folder.rglob("*.tsv.json")) if folder.is_dir() else []
    info = {
        "files": 0,
        "presets": set(),
        "machines": {},
        "versions": set(),
        "commits": set(),
        "dirty": False,
        "uncommitted": 0,
        "first": None,
        "last": None,
        "stored": None,
    }
    for side in sidecars:
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        info["files"] += 1
        settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else meta
        if settings.get("preset"):
            info["presets"].add(str(settings["preset"]))
        for prov in provenance_parts(meta) or [{}]:  # every session that wrote rows of the file
            _add_session(info, prov)
    if info["files"]:
        logged = git("log", "-1", "--format=%h %cs", "--", ".", cwd=folder)
        if logged:
            info["stored"] = tuple(logged.split(" ", 1))
    return info


def _add_session(info: dict, prov: dict) -> None:
    """Add one writing session's device, versions, commit and date to ``results_provenance``'s info."""
    if prov.get("device"):
        threads = info["machines"].setdefault(str(prov["device"]), set())
        if isinstance(prov.get("threads"), int):
            threads.add(prov["threads"])
    versions = dict(prov.get("versions") or {})
    if versions:
        if str(versions.get("rddrs", "")).startswith("0+"):  # rddrs.__version__ of a source tree run uninstalled
            versions = {**versions, "rddrs": "from an uninstalled source tree"}
        info["versions"].add(", ".join(f"{k} {versions[k]}" for k in ("rddrs", "torch") if k in versions))
    if prov.get("git_commit"):
        info["commits"].add(str(prov["git_commit"])[:7])
        info["dirty"] |= bool(prov.get("git_dirty"))
    else:
        info["uncommitted"] += 1
    day = str(prov.get("created", ""))[:10]
    if day:
        info["first"] = min(info["first"] or day, day)
        info["last"] = max(info["last"] or day, day)
