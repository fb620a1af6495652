"""Rows that travel between machines: what a session wrote under a results directory, packed into
one archive (``rddrs pack``), and landed in another copy of the results (``rddrs land``).

A short GPU session starts from a copy of the repository, computes rows into its own
``results/PRESET`` and packs what it wrote since it started (``written_since``): result files
(rows and sidecars; traces stay behind) and measurements cached as JSON. Landing the archive
where the results are kept adds the new rows to each result file, with the sessions that wrote
them in the sidecar's parts, and copies a measurement that is not there yet. The archive is a
gzipped tar holding ``manifest.json`` (``preset``; ``files``, the result files, and ``extras``,
the measurements, as paths under the results directory) and the files themselves. Landing
checks everything before it writes anything: the archive's preset is the results directory's,
its model hashes are those of the local models, its runs have the settings of the local files, a
row already there is the same row, and a measurement already there is the same file.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from rddrs import RDDRSError
from rddrs.pipeline.files import exclusive, one_line, write_atomic
from rddrs.pipeline.results import read_rows, read_sidecar, sidecar_path

MANIFEST = "manifest.json"


def written_since(results: str | Path, since: float) -> tuple[list[Path], list[Path]]:
    """The result files (``*.tsv`` with a sidecar) and the cached measurements (other ``*.json``)
    under ``results`` written after the time ``since`` (seconds since the epoch); shards, traces
    and memory passes are left out."""
    results = Path(results)
    files, extras = [], []
    for path in sorted(results.rglob("*")) if results.is_dir() else []:
        if not path.is_file() or any(p.endswith((".shards", ".traces")) for p in path.parts):
            continue
        name = path.name
        if name.endswith(".tsv") and not name.endswith(".memory.tsv") and sidecar_path(path).exists():
            if max(path.stat().st_mtime, sidecar_path(path).stat().st_mtime) > since:
                files.append(path)
        elif name.endswith(".json") and not name.endswith(".tsv.json") and path.stat().st_mtime > since:
            extras.append(path)
    return files, extras


def pack(files, results: str | Path, archive: str | Path, preset: str, extras=()) -> int:
    """Write the result files ``files`` (each with its sidecar) and the measurements ``extras``,
    all under ``results``, into the gzipped tar ``archive`` with a manifest; returns the number
    of rows packed."""
    results, archive = Path(results).resolve(), Path(archive)

    def under(file) -> str:
        try:
            return Path(file).resolve().relative_to(results).as_posix()
        except ValueError:
            raise RDDRSError(f"{file} is not under the results directory {results}") from None

    names, extra_names = [under(f) for f in files], [under(f) for f in extras]
    rows = sum(len(read_rows(results / name)) for name in names)
    manifest = json.dumps({"preset": preset, "files": names, "extras": extra_names}, indent=2).encode()
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="rddrs-pack-") as tmp:
            (Path(tmp) / MANIFEST).write_bytes(manifest)
            part = archive.with_name(f".{archive.name}.part")
            with tarfile.open(part, "w:gz") as tar:
                tar.add(Path(tmp) / MANIFEST, MANIFEST)
                for name in names:
                    tar.add(results / name, name)
                    tar.add(sidecar_path(results / name), name + ".json")
                for name in extra_names:
                    tar.add(results / name, name)
            part.replace(archive)
    except OSError as err:
        raise RDDRSError(f"cannot write the archive {archive} ({one_line(err)})") from None
    return rows


def _safe(name: str, suffix: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not name.endswith(suffix):
        raise RDDRSError(f"the archive names a file {name!r} outside its results directory; it is not rddrs'")
    return name


def land(archive: str | Path, results: str | Path | None = None, models: str | Path = "data/models") -> list[tuple[str, int]]:
    """Add the rows of ``archive`` to the result files of ``results`` (default: ``results/PRESET``
    of its manifest), checking all of it first; returns (file, rows added) per file."""
    from rddrs.pipeline.runs import add_rows, check_rows
    from rddrs.pipeline.settings import sha256_of

    archive = Path(archive)
    if not archive.is_file():
        raise RDDRSError(f"{archive}: no such archive")
    with tempfile.TemporaryDirectory(prefix="rddrs-land-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")
            manifest = json.loads((Path(tmp) / MANIFEST).read_text())
            preset, names = str(manifest["preset"]), [_safe(str(n), ".tsv") for n in manifest["files"]]
            extras = [_safe(str(n), ".json") for n in manifest.get("extras", [])]
        except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as err:
            raise RDDRSError(f"{archive} is not an archive of rddrs rows ({one_line(err)})") from None
        results = Path("results") / preset if results is None else Path(results)
        _check_preset(results, preset, archive)
        incoming, hashes = {}, {}
        for name in names:
            meta, rows = read_sidecar(Path(tmp) / name), read_rows(Path(tmp) / name)
            settings = meta["settings"]
            if settings.get("preset") != preset:
                raise RDDRSError(f"{archive}: {name} is a run of preset {settings.get('preset')}, not {preset}")
            model = Path(models) / Path(str(meta.get("model", ""))).name
            if model not in hashes:
                hashes[model] = sha256_of(model) if model.is_file() else None
            if hashes[model] != settings.get("model_sha256"):
                raise RDDRSError(f"{archive}: {name} was computed with another model than {model} "
                                 f"({'it is missing here' if hashes[model] is None else 'its hash differs'})")
            check_rows(results / name, rows, meta, f"{archive.name}:{name}", same_rows=True)
            incoming[name] = (meta, rows)
        copies = []
        for name in extras:
            here, there = results / name, (Path(tmp) / name).read_bytes()
            if here.exists() and here.read_bytes() != there:
                raise RDDRSError(f"{archive}: {name} exists here with other content; move one of them away")
            copies.append((here, there))
        landed = []
        for name, (meta, rows) in incoming.items():
            out = results / name
            with exclusive(out):
                landed.append((name, add_rows(out, rows, meta, None, f"{archive.name}:{name}", same_rows=True)))
        for here, there in copies:
            if not here.exists():
                write_atomic(here, [there])
                landed.append((str(here.relative_to(results)), 0))
    return landed


def _check_preset(results: Path, preset: str, archive: Path) -> None:
    """A one-line error unless the runs already in ``results`` are of ``preset``."""
    for side in sorted(results.rglob("*.tsv.json")) if results.is_dir() else []:
        try:
            theirs = json.loads(side.read_text())["settings"]["preset"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if theirs != preset:
            raise RDDRSError(f"{archive} holds rows of preset {preset}, but {results} holds preset {theirs} "
                             f"(e.g. {side.name}); land it in results/{preset}")
        return


def land_message(landed: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in landed)
    grown = [f"{name} (+{n})" for name, n in landed if n]
    copied = [name for name, _ in landed if name.endswith(".json")]
    return (f"landed {total} new rows in {len(grown)} files" + (f": {', '.join(grown)}" if grown else "")
            + (f"; copied {', '.join(copied)}" if copied else ""))

