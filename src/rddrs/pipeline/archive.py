"""Rows that travel between machines: what a session wrote under a results directory, packed into
one archive (``rddrs pack``), and landed in another copy of the results (``rddrs land``).

A short GPU session starts from a copy of the repository, computes rows into its own
``results/PRESET`` and packs what it wrote since it started (``written_since``): result files
(rows and sidecars; traces stay behind) and measurements cached as JSON. Landing the archive
where the results are kept adds the new rows to each result file, with the sessions that wrote
them in the sidecar's parts, and copies a measurement that is not there yet. The archive is a
gzipped tar holding ``manifest.json`` (``preset``; ``files``, the result files, and ``extras``,
the measurements, as paths under the results directory) and the files themselves. Landing
checks everything before it writes anything. An archive comes from another machine, so it is
read as untrusted: its members must be exactly the manifest's files, sidecars and extras, each
a regular file of at most ``MAX_MEMBER`` bytes (no link, no directory, no device); each name
is a plain relative path (``plain``: no ``..``, no absolute path, no hidden or odd component);
its preset is one of ``PRESETS``, so that nothing is written outside ``results/PRESET`` (or
``--results``); its settings and rows could be a run's (``settings.check_stored``,
``results.row_problem``). Then: the archive's preset is the results directory's, its model
hashes are those of the local models, its runs have the settings of the local files, a row
already there is the same row, a measurement already there is the same file, and no file to
be written is being written by another process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tarfile
import tempfile
import zlib
from pathlib import Path

from rddrs import RDDRSError
from rddrs.core.presets import PRESETS
from rddrs.pipeline.files import ensure_dir, exclusive, one_line, write_atomic
from rddrs.pipeline.results import check_values, read_rows, read_sidecar, sidecar_path

MANIFEST = "manifest.json"
#: the largest member an archive may hold: a result file of the paper preset (10000 rows) has
#: about 2 MB, a sidecar with many writing sessions some 100 kB, a measurement a few MB
MAX_MEMBER = 64 << 20
#: the most members an archive may hold (a result file and its sidecar per run, and measurements)
MAX_MEMBERS = 10_000
#: the characters of a component of a plain name
_COMPONENT = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]*")


def written_since(results: str | Path, since: float) -> tuple[list[Path], list[Path]]:
    """The result files (``*.tsv`` with a sidecar) and the cached measurements (other ``*.json``)
    under ``results`` written after the time ``since`` (seconds since the epoch); shards, traces
    and memory passes are left out. A ``since`` that is no finite time, or a ``results`` that is no
    directory, is a one-line error."""
    results = Path(results)
    if not math.isfinite(since):
        raise RDDRSError(f"--since must be a time in seconds since the epoch (`date +%s`), got {since}")
    if not results.is_dir():
        raise RDDRSError(f"{results}: no such results directory")
    files, extras = [], []
    for path in sorted(results.rglob("*")):
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
    """Write the result files ``files`` (each with its sidecar, runs of ``preset``) and the
    measurements ``extras``, all under ``results``, into the gzipped tar ``archive`` with a
    manifest; returns the number of rows packed. Nothing is left behind where it cannot be written."""
    results, archive = Path(results).resolve(), Path(archive)

    def under(file) -> str:
        try:
            return Path(file).resolve().relative_to(results).as_posix()
        except ValueError:
            raise RDDRSError(f"{file} is not under the results directory {results}") from None

    names, extra_names = [under(f) for f in files], [under(f) for f in extras]
    for name in names:
        if (theirs := read_sidecar(results / name)["settings"].get("preset")) != preset:
            raise RDDRSError(
                f"{results / name} is a run of preset {theirs}, not {preset}: pack it with --preset "
                f"{theirs}, or pack another results directory"
            )
    rows = sum(len(read_rows(results / name)) for name in names)
    if archive.is_dir():
        raise RDDRSError(f"{archive} is a directory; the archive is a file (.tar.gz)")
    manifest = json.dumps({"preset": preset, "files": names, "extras": extra_names}, indent=2).encode()
    part = archive.with_name(f".{archive.name}.part")
    try:
        ensure_dir(archive.parent)
        with tarfile.open(part, "w:gz") as tar:
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(manifest)
            tar.addfile(info, io.BytesIO(manifest))
            for name in names:
                tar.add(results / name, name)
                tar.add(sidecar_path(results / name), name + ".json")
            for name in extra_names:
                tar.add(results / name, name)
        part.replace(archive)
    except OSError as err:
        raise RDDRSError(f"cannot write the archive {archive} ({one_line(err)})") from None
    finally:
        part.unlink(missing_ok=True)
    return rows


def plain(name, suffix: str) -> str:
    """``name`` if it is a plain relative path ending in ``suffix`` (components of letters, digits and
    ``._+=-``, none empty, hidden, ``.`` or ``..``), else a one-line error."""
    if not (
        isinstance(name, str)
        and name.endswith(suffix)
        and len(name) <= 1024
        and all(_COMPONENT.fullmatch(part) for part in name.split("/"))
    ):
        raise RDDRSError(
            f"its manifest names {name!r}, which is not a plain relative path of a {suffix} file "
            f"under the results directory"
        )
    return name


def _manifest(blob: bytes) -> tuple[str, list[str], list[str]]:
    """The preset, result files and extras of a manifest, each checked."""
    try:
        manifest = json.loads(blob)
    except (UnicodeDecodeError, ValueError) as err:
        raise RDDRSError(f"its manifest is not JSON ({one_line(err)})") from None
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("files"), list)
        and isinstance(manifest.get("extras", []), list)
    ):
        raise RDDRSError("its manifest is not an object with lists 'files' and 'extras'")
    preset = manifest.get("preset")
    if not (isinstance(preset, str) and preset in PRESETS):
        raise RDDRSError(f"its manifest names the preset {preset!r}, which is none of {', '.join(PRESETS)}")
    files = [plain(name, ".tsv") for name in manifest["files"]]
    extras = [plain(name, ".json") for name in manifest.get("extras", [])]
    if bad := [n for n in files if n.endswith(".memory.tsv")] + [n for n in extras if n.endswith(".tsv.json")]:
        raise RDDRSError(f"its manifest names {bad[0]!r}, a memory pass or a sidecar, which are not packed")
    every = [MANIFEST, *files, *(n + ".json" for n in files), *extras]
    if twice := sorted({n for n in every if every.count(n) > 1}):
        raise RDDRSError(f"its manifest names {twice[0]!r} twice")
    return preset, files, extras


def _unpack(archive: Path, into: Path) -> tuple[str, list[str], list[str]]:
    """Check the archive's members and manifest, then write its files into the folder ``into``;
    returns the preset, the result files and the extras."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {}
            for member in tar:  # header by header: an oversized member is refused before it is read
                if len(members) >= MAX_MEMBERS:
                    raise RDDRSError(f"it holds more than {MAX_MEMBERS} members")
                if not member.isreg():
                    kind = (
                        "a link"
                        if member.issym() or member.islnk()
                        else "a directory"
                        if member.isdir()
                        else "a special file"
                    )
                    raise RDDRSError(f"its member {member.name!r} is {kind}; an archive of rddrs holds files only")
                if member.size > MAX_MEMBER:
                    raise RDDRSError(
                        f"its member {member.name!r} has {member.size:,} bytes, more than the "
                        f"{MAX_MEMBER:,} a result file or measurement may have"
                    )
                if member.name in members:
                    raise RDDRSError(f"it holds {member.name!r} twice")
                members[member.name] = member
            if MANIFEST not in members:
                raise RDDRSError(f"it has no {MANIFEST}")
            preset, files, extras = _manifest(tar.extractfile(members[MANIFEST]).read())
            wanted = [*files, *(n + ".json" for n in files), *extras]
            if missing := [n for n in wanted if n not in members]:
                raise RDDRSError(f"its manifest names {missing[0]!r}, which it does not hold")
            if extra := sorted(set(members) - {MANIFEST, *wanted}):
                raise RDDRSError(f"it holds {extra[0]!r}, which its manifest does not name")
            for name in wanted:
                target = into / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(members[name]).read())
    except (OSError, EOFError, zlib.error, tarfile.TarError) as err:
        raise RDDRSError(
            f"it cannot be read to its end ({one_line(err)}): it is truncated or no archive of `rddrs pack`"
        ) from None
    return preset, files, extras


@contextlib.contextmanager
def _named(archive: Path, tmp: Path):
    """One-line errors about the unpacked copy name the archive's member, not the temporary path."""
    try:
        yield
    except RDDRSError as err:
        raise RDDRSError(str(err).replace(f"{tmp}/", f"{archive}:")) from None


def land(
    archive: str | Path, results: str | Path | None = None, models: str | Path = "data/models"
) -> list[tuple[str, int]]:
    """Add the rows of ``archive`` to the result files of ``results`` (default: ``results/PRESET``
    of its manifest), checking all of it first (see the module's docstring); returns (file, rows
    added) per file."""
    from rddrs.pipeline.data import TEST_SIZE, dataset
    from rddrs.pipeline.runs import add_rows, check_rows
    from rddrs.pipeline.settings import check_stored, run_dataset, sha256_of

    archive = Path(archive)
    if not archive.is_file():
        raise RDDRSError(f"{archive}: no such archive")
    with tempfile.TemporaryDirectory(prefix="rddrs-land-") as tmp, _named(archive, Path(tmp)):
        tmp = Path(tmp)
        try:
            preset, names, extras = _unpack(archive, tmp)
        except RDDRSError as err:
            raise RDDRSError(f"{archive} is not an archive of rddrs rows: {err}") from None
        results = Path("results") / preset if results is None else Path(results)
        inside = results.resolve()
        for name in [*names, *(n + ".json" for n in names), *extras]:
            if not (results / name).resolve().is_relative_to(inside):
                raise RDDRSError(f"{archive}: {name} would be written outside {results} (through a link there)")
        _check_preset(results, preset, archive)
        incoming, hashes = {}, {}
        for name in names:
            meta, rows = read_sidecar(tmp / name), read_rows(tmp / name)
            settings = meta["settings"]
            check_stored(settings, f"{archive}:{name}")
            if settings["preset"] != preset:
                raise RDDRSError(f"{archive}: {name} is a run of preset {settings['preset']}, not {preset}")
            record = dataset(run_dataset(settings))
            check_values(rows, f"{archive}:{name}", TEST_SIZE, len(record.classes))
            model = Path(models) / Path(str(meta.get("model", ""))).name
            if model not in hashes:
                hashes[model] = sha256_of(model) if model.is_file() else None
            if hashes[model] != settings.get("model_sha256"):
                raise RDDRSError(
                    f"{archive}: {name} was computed with another model than {model} "
                    f"({'it is missing here' if hashes[model] is None else 'its hash differs'})"
                )
            check_rows(results / name, rows, meta, f"{archive.name}:{name}", same_rows=True)
            incoming[name] = (meta, rows)
        copies = []
        for name in extras:
            here, there = results / name, (tmp / name).read_bytes()
            try:
                json.loads(there)
            except (UnicodeDecodeError, ValueError) as err:
                raise RDDRSError(f"{archive}: {name} is not JSON ({one_line(err)})") from None
            if here.is_dir() or (here.exists() and here.read_bytes() != there):
                raise RDDRSError(f"{archive}: {name} exists here with other content; move one of them away")
            copies.append((here, there))
        landed = []
        with contextlib.ExitStack() as held:  # every lock first (those of existing folders before
            # any folder is made): a busy file stops the landing before anything is written
            for name in sorted(incoming, key=lambda n: not (results / n).parent.is_dir()):
                held.enter_context(exclusive(results / name))
            for name, (meta, rows) in incoming.items():
                landed.append(
                    (name, add_rows(results / name, rows, meta, None, f"{archive.name}:{name}", same_rows=True))
                )
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
            raise RDDRSError(
                f"{archive} holds rows of preset {preset}, but {results} holds preset {theirs} "
                f"(e.g. {side.name}); land it in results/{preset}"
            )
        return


def land_message(landed: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in landed)
    grown = [f"{name} (+{n})" for name, n in landed if n]
    copied = [name for name, _ in landed if name.endswith(".json")]
    return (
        f"landed {total} new rows in {len(grown)} files"
        + (f": {', '.join(grown)}" if grown else "")
        + (f"; copied {', '.join(copied)}" if copied else "")
    )
