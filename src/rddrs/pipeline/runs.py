"""Resumable certification runs over a slice of a dataset's test set (MNIST or Fashion-MNIST).

A run certifies test images ``start .. start+count-1`` with one method and writes one
tab-separated row per image, appended and flushed as soon as its batch is done, plus a JSON
sidecar (``FILE.json``) that records the settings and provenance, and one ``.npz`` of
objective traces and the final smoothing parameter per image (``FILE.traces/IDX.npz``,
key ``param``: sigma, theta or C in float32, of the family's ``param_shape``). Re-running the same command continues
where it stopped: complete rows are kept, a half-written last row is dropped, and a settings
mismatch is an error. Every shard is an independent, idempotent command, so shards of the
test set can run in parallel processes or machines and be joined by ``merge``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rddrs import RDDRSError
from rddrs.core.certify import certify
from rddrs.core.methods import method as method_record
from rddrs.core.noise import Smoothing, family_class
from rddrs.core.optimize import find_smoothing
from rddrs.core.presets import PRESETS, Search
from rddrs.core.spd import random_orthogonal
from rddrs.pipeline.data import dataset, load_dataset
from rddrs.pipeline.fastnet import network_path
from rddrs.pipeline.files import ensure_dir, exclusive, one_line, write_atomic
from rddrs.pipeline.models import check_outputs, load_model, resolve_device
from rddrs.pipeline.provenance import index_ranges, provenance, provenance_parts, with_parts
from rddrs.pipeline.results import (
    COLUMNS,
    check_labels,
    format_row,
    read_rows,
    read_sidecar,
    search_status,
    sidecar_path,
    traces_dir,
    upgrade,
    write_rows,
)
from rddrs.pipeline.settings import (
    RunSettings,
    default_inputs_per_batch,
    normalised,
    resuming,
    run_dataset,
    settings_differ,
    write_sidecar,
)


class Rotated(torch.nn.Module):
    """``z -> f(U^T z)`` for inputs of any shape (flattened for the rotation)."""

    def __init__(self, model, rotation: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("rotation", rotation)

    def forward(self, z):
        return self.model((z.flatten(1) @ self.rotation).reshape(z.shape))


def _check_writable(out: Path) -> None:
    """A one-line error unless rows can be appended to ``out`` (created empty if missing)."""
    try:
        with open(out, "a"):
            pass
    except OSError as err:
        raise RDDRSError(f"cannot write {out} ({one_line(err)}); make it writable or choose another --out") from None


def certify_dataset(
    settings: RunSettings,
    out: str | Path,
    start: int = 0,
    count: int | None = None,
    data: str | Path = "data",
    inputs_per_batch: int | None = None,
    batch_size: int = 2000,
    progress: bool = True,
) -> Path:
    """Certify the test images ``start .. start+count-1`` (count: the preset's) of the run's dataset
    (``settings.dataset``, read from ``data``) into ``out``."""
    images, labels = load_dataset(Path(data), settings.dataset, train=False)
    if not 0 <= start < len(images):
        raise RDDRSError(f"start {start} is outside the test set (0..{len(images) - 1})")
    count = min(PRESETS[settings.preset].count, len(images) - start) if count is None else count
    if count < 1 or start + count > len(images):
        raise RDDRSError(
            f"test images {start}..{start + count - 1} reach outside the test set "
            f"(0..{len(images) - 1}); choose --start and --count inside it"
        )
    stop = start + count
    model = load_model(settings.model, device=resolve_device(settings.device), probabilities=settings.probabilities)
    return run_certification(
        settings,
        model,
        images[start:stop],
        labels[start:stop],
        start,
        Path(out),
        inputs_per_batch,
        batch_size,
        progress,
        test_labels=labels,
    )


@dataclass
class Start:
    """Where each image's search starts, read from a finished run (``--init``): sigma_x* per
    idx, and for a run whose law is in its traces (ANCER) also that law's parameter per idx and
    its family (RDDRS then starts at C = diag(theta))."""

    sigma_star: dict[int, float]
    params: dict[int, np.ndarray] | None = None
    family: str | None = None

    def batch(self, idx: list[int], like: torch.Tensor) -> dict:
        """``find_smoothing``'s start arguments for the images ``idx``."""
        star = torch.tensor([self.sigma_star[i] for i in idx], dtype=like.dtype, device=like.device)
        if self.params is None:
            return {"sigma_star": star}
        params = torch.from_numpy(np.stack([self.params[i] for i in idx])).to(like)
        return {"sigma_star": star, "start": family_class(self.family).from_param(params, like[0].numel())}


def load_init(path: Path, run: RunSettings, indices: list[int], d: int) -> Start:
    """The start of ``run``'s images ``indices`` (of d features) from the result file ``path``: a
    DDRS run of the same sigma, model, seed, rotation and dataset (sigma_x* from its rows), or, for
    RDDRS, such an ANCER run (theta and sigma_x* from its traces)."""
    if not path.exists() or not sidecar_path(path).exists():
        raise RDDRSError(f"--init {path}: no such result file (with its .json sidecar)")
    settings = read_sidecar(path)["settings"]
    allowed = method_record(run.method).starts
    if settings["method"] not in allowed or settings["sigma"] != run.sigma:
        raise RDDRSError(
            f"--init {path} holds {settings['method']} at sigma={settings['sigma']}; "
            f"{run.method} starts from {' or '.join(allowed)} at sigma={run.sigma}"
        )
    differ = [k for k in ("model_sha256", "seed", "rotate") if settings[k] != getattr(run, k)]
    if run_dataset(settings) != run.dataset:
        differ.append("dataset")
    if differ:
        raise RDDRSError(f"--init {path} was run with another {', '.join(differ)}")
    rows = read_rows(path)
    if missing := [i for i in indices if i not in rows]:
        raise RDDRSError(f"--init {path} has no row for idx {missing[0]} (and {len(missing) - 1} more)")
    family = method_record(settings["method"]).family
    if family_class(family).in_rows:  # sigma_x* is the row's sigma
        return Start({i: rows[i]["sigma_min"] for i in indices})
    params = {i: trace_param(path, i, settings["method"], d) for i in indices}
    return Start({i: float(trace_value(path, i, "sigma_star")) for i in indices}, params, family)


def run_certification(
    settings: RunSettings,
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    out: Path,
    inputs_per_batch: int | None = None,
    batch_size: int = 10_000,
    progress: bool = True,
    test_labels: torch.Tensor | None = None,
) -> Path:
    """Certify ``images`` (test indices ``start, start+1, ...``) into ``out``, resuming; a second
    process writing the same ``out`` meanwhile is refused. ``inputs_per_batch`` defaults to
    ``default_inputs_per_batch``; ``test_labels``: the labels of the whole test set, outside which
    ``out`` may hold no row, and which its rows must hold. The model's outputs on the first batch
    and everything ``out`` holds are checked before anything is written. A new run (or one with no
    row yet) that fails before its first row leaves no file behind."""
    inputs_per_batch = inputs_per_batch or default_inputs_per_batch(settings)
    check_outputs(
        model, images[:inputs_per_batch].to(settings.device), settings.model, len(dataset(settings.dataset).classes)
    )
    with exclusive(out):
        return _certify_into(
            settings, model, images, labels, start, out, inputs_per_batch, batch_size, progress, test_labels
        )


def _certify_into(
    settings: RunSettings,
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    start: int,
    out: Path,
    inputs_per_batch: int,
    batch_size: int,
    progress: bool,
    test_labels: torch.Tensor | None,
) -> Path:
    device = torch.device(settings.device)
    resumed = resuming(out, settings)
    done = read_rows(out)
    if test_labels is not None:
        if outside := [i for i in done if not 0 <= i < len(test_labels)]:
            raise RDDRSError(
                f"{out} holds a row for idx {outside[0]}, outside the test set "
                f"(0..{len(test_labels) - 1}); it is not a run on this test set: use another --out"
            )
        check_labels(done, test_labels, str(out))
    todo = [i for i in range(start, start + len(images)) if i not in done]
    if not todo:  # complete: nothing to write
        return out
    init = load_init(Path(settings.init), settings, todo, images[0].numel()) if settings.init else None
    searches = {k: Search.from_dict(v) for k, v in settings.search.items()}
    traces = traces_dir(out) if method_record(settings.method).searched else None
    if traces is not None and traces.exists() and not traces.is_dir():
        raise RDDRSError(f"{traces} exists and is not a directory (it is where the run's traces go); move it away")
    fresh_traces = traces is not None and not traces.exists()
    written = 0
    try:
        _check_writable(out)
        # checked: from here on the run writes
        here = {**provenance(device), "network": network_path(model)}
        if not resumed:
            write_sidecar(out, settings, {"provenance": here})
        upgrade(out)  # a file of an older rddrs gets today's columns before rows are added
        read_rows(out, repair=True)  # a half-written last row (a killed writer's) is cut off
        part = dict(here, rows=index_ranges(todo))  # this session's part: the rows it sets out to write, and where
        write_atomic(sidecar_path(out), [json.dumps(with_parts(read_sidecar(out), [part], done), indent=2).encode()])
        if traces is not None:
            ensure_dir(traces)
        rotation = random_orthogonal(images[0].numel(), seed=settings.rotate) if settings.rotate is not None else None
        noise_rotation = None
        if rotation is not None:  # common random numbers: the draws are U eps, the original run's turned
            model = Rotated(model, rotation.to(device, images.dtype))
            noise_rotation = rotation.to(device, images.dtype)
        bar = tqdm(
            total=len(images),
            initial=len(images) - len(todo),
            disable=not progress,
            unit="image",
            desc=f"{settings.method} sigma={settings.sigma}",
        )
        try:
            with open(out, "a" if resumed else "w") as f:
                if not resumed:
                    f.write("\t".join(COLUMNS) + "\n")
                    f.flush()
                for lo in range(0, len(todo), inputs_per_batch):
                    idx = todo[lo : lo + inputs_per_batch]
                    x = images[[i - start for i in idx]].to(device)
                    if rotation is not None:
                        x = (x.flatten(1) @ rotation.to(x).T).reshape(x.shape)
                    tic = time.perf_counter()
                    start_args = {} if init is None else init.batch(idx, x)
                    law, trace = find_smoothing(
                        settings.method,
                        model,
                        x,
                        idx,
                        settings.sigma,
                        settings.seed,
                        searches,
                        rotation=noise_rotation,
                        **start_args,
                    )
                    cert = certify(
                        model,
                        x,
                        law,
                        idx,
                        settings.n0,
                        settings.n,
                        settings.alpha,
                        settings.seed,
                        batch_size,
                        rotation=noise_rotation,
                    )
                    seconds = (time.perf_counter() - tic) / len(idx)
                    sigma_min, sigma_proxy, sigma_max = law.min_scale(), law.proxy(), law.max_scale()
                    stopped = trace.get(f"{settings.method}_diverged_at")  # None for RS, which has no search
                    for j, i in enumerate(idx):
                        if trace:  # written whole or not at all (a full disk leaves no truncated trace)
                            arrays = io.BytesIO()
                            np.savez(
                                arrays, param=law.param[j].float().cpu().numpy(), **{k: v[j] for k, v in trace.items()}
                            )
                            write_atomic(traces / f"{i}.npz", [arrays.getvalue()])
                        label = int(labels[i - start])
                        row = dict(
                            zip(
                                COLUMNS,
                                (
                                    i,
                                    label,
                                    int(cert.predict[j]),
                                    int(cert.predict[j] == label),
                                    cert.gap[j],
                                    cert.radius[j],
                                    cert.proxy_radius[j],
                                    float(sigma_min[j]),
                                    float(sigma_proxy[j]),
                                    float(sigma_max[j]),
                                    cert.p_lower[j],
                                    seconds,
                                    search_status(None if stopped is None else stopped[j]),
                                ),
                            )
                        )
                        f.write(format_row(row) + "\n")
                        written += 1
                    f.flush()
                    os.fsync(f.fileno())
                    bar.update(len(idx))
        except OSError as err:  # a disk that filled up, a file removed meanwhile
            raise RDDRSError(
                f"cannot write {out} ({one_line(err)}); the rows written so far are kept: make it "
                "writable, then run the same command again to go on"
            ) from None
        finally:
            bar.close()
    except BaseException:
        if not resumed and not written:  # a new run that wrote no row leaves nothing behind
            for path in (out, sidecar_path(out)):
                path.unlink(missing_ok=True)
            if fresh_traces:
                shutil.rmtree(traces, ignore_errors=True)
        raise
    return out


def trace_value(out: Path, idx: int, key: str) -> np.ndarray:
    """The array ``key`` of image ``idx``'s trace in the run ``out``, or a one-line error."""
    path = traces_dir(Path(out)) / f"{idx}.npz"
    if not path.exists():
        raise RDDRSError(
            f"{path}: missing trace of image {idx} (the traces are not committed: recompute "
            f"{Path(out).name} on this machine, after moving it away)"
        )
    try:
        trace = np.load(path, allow_pickle=False)
        if not isinstance(trace, np.lib.npyio.NpzFile):
            raise ValueError("an array, not an .npz of arrays")
        with trace:
            value = trace[key] if key in trace else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise RDDRSError(
            f"{path} is not a readable trace ({one_line(err, 200)}); recompute {Path(out).name} after moving it away"
        ) from None
    if value is None:
        raise RDDRSError(f"{path} holds no {key!r} (written by an older rddrs); recompute {Path(out).name}")
    return value


def trace_param(out: Path, idx: int, method: str, d: int) -> np.ndarray:
    """The final parameter of image ``idx`` in the run ``out`` (the family's ``param_shape(d)``:
    theta (d,) or C (d, d)), float64."""
    shape = tuple(family_class(method_record(method).family).param_shape(d))
    param = trace_value(out, idx, "param")
    if not np.issubdtype(param.dtype, np.number) or param.shape != shape:
        raise RDDRSError(
            f"{traces_dir(Path(out)) / f'{idx}.npz'}: param is a {param.dtype} array of shape "
            f"{param.shape}, {method} needs numbers of shape {shape}"
        )
    return param.astype(np.float64)


def load_smoothing(out: str | Path, indices, d: int, dtype: torch.dtype = torch.float64) -> Smoothing:
    """The smoothing laws a run certified images ``indices`` with: sigma from the rows (RS,
    DDRS: the family is ``in_rows``), theta or C from the traces (ANCER, RDDRS)."""
    out = Path(out)
    method = read_sidecar(out)["settings"]["method"]
    family = family_class(method_record(method).family)
    if family.in_rows:
        rows = read_rows(out)
        return family.from_param(torch.tensor([rows[i]["sigma_min"] for i in indices], dtype=dtype), d, check=False)
    params = torch.from_numpy(np.stack([trace_param(out, i, method, d) for i in indices])).to(dtype)
    return family.from_param(params, d, check=False)


def check_rows(out: Path, rows: dict[int, dict], meta: dict, source: str, same_rows: bool = False) -> list[int]:
    """The idx of ``rows`` that ``add_rows`` would add to ``out``, or a one-line error: the
    settings of ``meta`` (a sidecar record) must be ``out``'s, and an idx already in ``out`` is
    refused (``same_rows``: accepted when its row is the same, which is then left as it is)."""
    kept = read_rows(out)
    if kept:
        have = read_sidecar(out)
        if diff := settings_differ(normalised(have["settings"]), normalised(meta["settings"])):
            raise RDDRSError(f"{source} and {out} were run with different settings ({', '.join(diff)} differ)")
    overlap = sorted(set(rows) & set(kept))
    if overlap and not same_rows:
        raise RDDRSError(f"{source} overlaps {out.name} (idx {overlap[0]}, {len(overlap)} rows); remove one of them")
    if changed := [i for i in overlap if _comparable_row(rows[i]) != _comparable_row(kept[i])]:
        raise RDDRSError(
            f"{source} has another row for idx {changed[0]} than {out.name} "
            f"({len(changed)} rows differ); it is not the same run"
        )
    return sorted(set(rows) - set(kept))


def add_rows(
    out: Path, rows: dict[int, dict], meta: dict, traces: Path | None, source: str, same_rows: bool = False
) -> int:
    """Add ``rows`` of the run described by the sidecar record ``meta`` to the result file ``out``
    (the caller holds ``out``'s lock), after the checks of ``check_rows``: the traces of the new
    rows are linked beside ``out``, and ``meta``'s writing sessions of those rows join ``out``'s.
    Returns the number of rows added; ``source`` names them in errors."""
    new = check_rows(out, rows, meta, source, same_rows)
    if not new:
        return 0
    kept = read_rows(out)
    have = read_sidecar(out) if kept else {k: v for k, v in meta.items() if k not in ("parts", "merged_from")}
    ensure_dir(out.parent)
    if traces is not None and traces.is_dir():  # before the rows, so that no row lacks its trace
        merged = ensure_dir(traces_dir(out))
        for i in new:
            trace, target = traces / f"{i}.npz", merged / f"{i}.npz"
            if trace.exists():
                target.unlink(missing_ok=True)
                try:
                    os.link(trace, target)
                except OSError:
                    shutil.copyfile(trace, target)
    parts = []
    for part in provenance_parts(meta, rows):
        mine = [i for i in new if part["rows"] is None or any(lo <= i < hi for lo, hi in part["rows"])]
        if mine:
            parts.append(dict(part, rows=index_ranges(mine)))
    write_atomic(sidecar_path(out), [json.dumps(with_parts(have, parts, kept), indent=2).encode()])
    write_rows(out, [{**kept, **rows}[i] for i in sorted(set(kept) | set(new))])
    return len(new)


def _comparable_row(row: dict) -> dict:
    """A row without its timing (a landed copy of a row is the same row)."""
    return {k: v for k, v in row.items() if k != "seconds"}


def merge(shards: list[Path], out: Path, overwrite: bool = False) -> int:
    """Join shard result files of one run into ``out``; returns the number of rows.

    The shards must share their settings, must not overlap, must cover a contiguous range of
    test indices, and none may be being written (its lock held). ``out`` (its rows, sidecar or
    traces) must not exist, unless ``overwrite``, and no process may be writing it. Everything is
    checked, under the shards' locks and then ``out``'s, before anything is written. Traces are
    linked beside ``out``.
    """
    if not shards:
        raise RDDRSError("merge needs at least one shard")
    out = Path(out)
    if any(Path(shard).resolve() == out.resolve() for shard in shards):
        raise RDDRSError(f"{out} is one of the shards; merge into another file")
    for shard in shards:
        if not shard.exists() or not sidecar_path(shard).exists():
            raise RDDRSError(f"{shard}: no such result file (with its .json sidecar)")
    with contextlib.ExitStack() as held:
        for shard in shards:
            held.enter_context(exclusive(shard))
        sides = [read_sidecar(shard) for shard in shards]
        first = normalised(sides[0]["settings"])
        for shard, side in zip(shards[1:], sides[1:]):
            if diff := settings_differ(normalised(side["settings"]), first):
                raise RDDRSError(f"{shard} and {shards[0]} were run with different settings ({', '.join(diff)} differ)")
        parts: dict[Path, dict] = {}
        seen: dict[int, Path] = {}
        for shard in shards:
            parts[shard] = read_rows(shard)
            if overlap := sorted(set(parts[shard]) & set(seen)):
                raise RDDRSError(f"{shard} overlaps another shard (idx {overlap[0]}, {len(overlap)} rows)")
            seen.update(dict.fromkeys(parts[shard], shard))
        if not seen:
            raise RDDRSError("the shards hold no rows")
        lo, hi = min(seen), max(seen)
        if missing := [i for i in range(lo, hi + 1) if i not in seen]:
            raise RDDRSError(f"the shards miss idx {missing[0]} ({len(missing)} rows missing in {lo}..{hi})")
        held.enter_context(exclusive(out))
        traces = traces_dir(out)
        if not overwrite and (there := [p for p in (out, sidecar_path(out), traces) if p.exists()]):
            raise RDDRSError(f"{there[0]} exists; merge into a new file, or pass --replace to overwrite it")
        if traces.exists() and not traces.is_dir():
            raise RDDRSError(f"{traces} exists and is not a directory (it is where the traces go); move it away")
        for stale in (out, sidecar_path(out)):
            stale.unlink(missing_ok=True)
        shutil.rmtree(traces, ignore_errors=True)
        for shard, side in zip(shards, sides):
            add_rows(out, parts[shard], side, traces_dir(shard), str(shard))
        write_atomic(
            sidecar_path(out),
            [json.dumps(dict(read_sidecar(out), merged_from=[str(s) for s in shards]), indent=2).encode()],
        )
    return len(seen)
