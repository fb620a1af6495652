"""Resumable certification runs over a slice of the MNIST test set.

A run certifies test images ``start .. start+count-1`` with one method and writes one
tab-separated row per image, appended and flushed as soon as its batch is done, plus a JSON
sidecar (``FILE.json``) that records the settings and provenance, and one ``.npz`` of
objective traces and the final smoothing parameter per image (``FILE.traces/IDX.npz``,
key ``param``: sigma, theta or C in float32). Re-running the same command continues
where it stopped: complete rows are kept, a half-written last row is dropped, and a settings
mismatch is an error. Every shard is an independent, idempotent command, so shards of the
test set can run in parallel processes or machines and be joined by ``merge``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rddrs import RDDRSError
from rddrs.certify import certify
from rddrs.files import exclusive, provenance, write_atomic
from rddrs.noise import Diagonal, FullSPD, Isotropic, Smoothing
from rddrs.optimize import ANCER, DDRS, METHODS, RDDRS, Search, find_smoothing

COLUMNS = ("idx", "label", "predict", "correct", "gap", "radius", "proxy_radius",
           "sigma_min", "sigma_proxy", "sigma_max", "p_lower", "seconds")
INT_COLUMNS = {"idx", "label", "predict", "correct"}


@dataclass(frozen=True)
class Preset:
    """Scale of a run: certification samples, level, test images, and the searches."""

    n0: int
    n: int
    alpha: float
    count: int
    search: dict = field(default_factory=dict)


#: Bound on each RDDRS step in every preset (see ``Search.max_step``): no direction of C
#: stretches by more than 10 % per step.
RDDRS_MAX_STEP = 0.1

# cpu keeps the DDRS and ANCER path lengths (iterations x step) close to the paper's.
PRESETS = {
    "smoke": Preset(n0=10, n=200, alpha=0.01, count=4, search={
        "ddrs": Search(10, 16, 1e-3, scale=0.5, keep_best_every=5),
        "ancer": Search(5, 16, 0.04, kappa=2.0, adam=True),
        "rddrs": Search(5, 32, 1.0, kappa=1e-6, max_step=RDDRS_MAX_STEP)}),
    "cpu": Preset(n0=100, n=10_000, alpha=0.001, count=100, search={
        "ddrs": Search(150, 64, 1e-3, scale=0.5, keep_best_every=25),
        "ancer": Search(50, 64, 0.08, kappa=2.0, adam=True),
        "rddrs": Search(30, 500, 1.0, kappa=1e-6, max_step=RDDRS_MAX_STEP)}),
    "paper": Preset(n0=100, n=100_000, alpha=0.001, count=10_000, search={
        "ddrs": DDRS, "ancer": ANCER, "rddrs": replace(RDDRS, max_step=RDDRS_MAX_STEP)}),
}


@dataclass(frozen=True)
class RunSettings:
    """Everything that determines a run's numbers (compared when a run is resumed)."""

    method: str
    sigma: float
    preset: str
    model: str
    model_sha256: str
    n0: int
    n: int
    alpha: float
    seed: int
    device: str
    rotate: int | None
    probabilities: bool
    search: dict
    init: str | None = None

    def comparable(self) -> dict:
        """The settings whose change would mix incompatible rows in one file."""
        d = asdict(self)
        d.pop("model")  # the same weights may live at another path
        d["device"] = torch.device(self.device).type
        d["init"] = _file_name(self.init)  # so may the DDRS run; load_init checks what matters
        return json.loads(json.dumps(d))


def _file_name(path: str | None) -> str | None:
    return None if path is None else Path(path).name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def random_rotation(d: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal d x d matrix (QR of a Gaussian matrix, signs fixed), float64."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class Rotated(torch.nn.Module):
    """``z -> f(U^T z)`` for inputs of any shape (flattened for the rotation)."""

    def __init__(self, model, rotation: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("rotation", rotation)

    def forward(self, z):
        return self.model((z.flatten(1) @ self.rotation).reshape(z.shape))


# -- result files --------------------------------------------------------------------------

def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def traces_dir(out: Path) -> Path:
    return out.with_name(out.name + ".traces")


def _format(value) -> str:
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
    lines = complete_lines(out)
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


def _open_for_append(out: Path, resumed: bool):
    f = open(out, "a")
    if not resumed:
        f.write("\t".join(COLUMNS) + "\n")
        f.flush()
    return f


def check_or_write_sidecar(out: Path, settings: RunSettings, extra: dict) -> bool:
    """Write the sidecar of a new run, or check an existing one; True if resuming."""
    side = sidecar_path(out)
    if out.exists() and out.stat().st_size > 0:
        if not side.exists():
            raise RDDRSError(f"{out} exists without its sidecar {side.name}; move it away or remove it")
        old = json.loads(side.read_text())["settings"]
        old["init"] = _file_name(old.get("init"))
        # a search recorded before a Search option existed ran with that option's default
        old["search"] = {k: asdict(Search(**v)) for k, v in old.get("search", {}).items()}
        new = settings.comparable()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise RDDRSError(f"{out} was written with other settings ({', '.join(diff)} differ); "
                             "use another --out or the same settings")
        return True
    write_atomic(side, [json.dumps({"settings": settings.comparable(), "model": settings.model, **extra},
                                   indent=2).encode()])
    return False


# -- settings and the standard runs --------------------------------------------------------

def make_settings(method: str, sigma: float, model: str | Path, preset: str = "cpu", *, seed: int = 0,
                  device: str = "cpu", rotate: int | None = None, init: str | Path | None = None,
                  probabilities: bool = False, n0: int | None = None, n: int | None = None,
                  alpha: float | None = None, search: dict | None = None) -> RunSettings:
    """The settings of one run: the preset's values unless given. ``search`` overrides fields
    of ``method``'s search (e.g. ``{"kappa": 1.0}``; ``max_step=0`` turns the bound off)."""
    if method not in METHODS:
        raise RDDRSError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise RDDRSError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if not sigma > 0:
        raise RDDRSError(f"sigma must be > 0, got {sigma}")
    if init is not None and method not in ("ancer", "rddrs"):
        raise RDDRSError("init (a DDRS result file) applies to method ancer or rddrs only")
    model = Path(model)
    if not model.is_file():
        raise RDDRSError(f"model {model}: no such file")
    chosen = PRESETS[preset]
    overrides = dict(search or {})
    if overrides and method == "rs":
        raise RDDRSError("RS has no search to override")
    if overrides.get("max_step") == 0:
        overrides["max_step"] = None
    searches = {k: asdict(replace(v, **overrides) if k == method else v) for k, v in chosen.search.items()
                if k == method or (k == "ddrs" and method != "rs")}
    settings = RunSettings(
        method=method, sigma=float(sigma), preset=preset, model=str(model), model_sha256=sha256_of(model),
        n0=n0 or chosen.n0, n=n or chosen.n, alpha=chosen.alpha if alpha is None else alpha, seed=seed,
        device=str(device), rotate=rotate, probabilities=probabilities, search=searches,
        init=None if init is None else str(init))
    if not 0 < settings.alpha < 1:
        raise RDDRSError(f"alpha must lie in (0, 1), got {settings.alpha}")
    if settings.n0 < 1 or settings.n < 1:
        raise RDDRSError(f"n0 and n must be >= 1, got {settings.n0}, {settings.n}")
    return settings


def certify_mnist(settings: RunSettings, out: str | Path, start: int = 0, count: int | None = None,
                  data: str | Path = "data", inputs_per_batch: int = 32, batch_size: int = 2000,
                  progress: bool = True) -> Path:
    """Certify MNIST test images ``start .. start+count-1`` (count: the preset's) into ``out``."""
    from rddrs.data import load_mnist
    from rddrs.models import load_model, resolve_device

    images, labels = load_mnist(Path(data), train=False)
    count = PRESETS[settings.preset].count if count is None else count
    if not (0 <= start < len(images)) or count < 1:
        raise RDDRSError(f"start {start}, count {count} is outside the {len(images)} test images")
    stop = min(start + count, len(images))
    model = load_model(settings.model, device=resolve_device(settings.device), probabilities=settings.probabilities)
    return run_certification(settings, model, images[start:stop], labels[start:stop], start, Path(out),
                             inputs_per_batch, batch_size, progress)


def model_path(sigma: float, models: str | Path = "data/models") -> Path:
    """The base classifier trained at ``sigma`` (``make train``)."""
    return Path(models) / f"mnist_cnn_sigma{sigma:.2f}.pt"


def result_path(results: str | Path, method: str, sigma: float) -> Path:
    return Path(results) / f"{method}_sigma{sigma:.2f}.tsv"


def standard_runs(sigma: float, preset: str, results: str | Path, *, device: str = "cpu",
                  count: int | None = None, seed: int = 0, data: str | Path = "data",
                  models: str | Path = "data/models", progress: bool = True) -> dict[str, Path]:
    """The four methods at one sigma, as in the paper: RS, DDRS, then ANCER and RDDRS started
    from DDRS' sigma_x* (read from its result file). Runs only what is missing."""
    model = model_path(sigma, models)
    ddrs = result_path(results, "ddrs", sigma)
    outs = {}
    for method in METHODS:
        init = ddrs if method in ("ancer", "rddrs") else None
        settings = make_settings(method, sigma, model, preset, seed=seed, device=device, init=init)
        outs[method] = certify_mnist(settings, result_path(results, method, sigma), count=count,
                                     data=data, progress=progress)
    return outs


# -- the run -------------------------------------------------------------------------------

def load_init(path: Path, run: RunSettings) -> dict[int, float]:
    """sigma_x* per idx from a DDRS result file of the same sigma, model, seed and rotation."""
    side = sidecar_path(path)
    if not path.exists() or not side.exists():
        raise RDDRSError(f"--init {path}: no such DDRS result file (with its .json sidecar)")
    settings = json.loads(side.read_text())["settings"]
    if settings["method"] != "ddrs" or settings["sigma"] != run.sigma:
        raise RDDRSError(f"--init {path} holds {settings['method']} at sigma={settings['sigma']}, "
                         f"not ddrs at sigma={run.sigma}")
    if differ := [k for k in ("model_sha256", "seed", "rotate") if settings[k] != getattr(run, k)]:
        raise RDDRSError(f"--init {path} was run with another {', '.join(differ)}")
    return {i: row["sigma_min"] for i, row in read_rows(path).items()}


def run_certification(settings: RunSettings, model, images: torch.Tensor, labels: torch.Tensor,
                      start: int, out: Path, inputs_per_batch: int = 32, batch_size: int = 10_000,
                      progress: bool = True) -> Path:
    """Certify ``images`` (test indices ``start, start+1, ...``) into ``out``, resuming; a second
    process writing the same ``out`` meanwhile is refused."""
    with exclusive(out):
        return _certify_into(settings, model, images, labels, start, out, inputs_per_batch, batch_size, progress)


def _certify_into(settings: RunSettings, model, images: torch.Tensor, labels: torch.Tensor,
                  start: int, out: Path, inputs_per_batch: int, batch_size: int, progress: bool) -> Path:
    device = torch.device(settings.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    resumed = check_or_write_sidecar(out, settings, {"provenance": provenance(device)})
    done = read_rows(out)
    todo = [i for i in range(start, start + len(images)) if i not in done]
    init = load_init(Path(settings.init), settings) if settings.init else None
    if init is not None and (missing := [i for i in todo if i not in init]):
        raise RDDRSError(f"--init {settings.init} has no row for idx {missing[0]} (and {len(missing) - 1} more)")
    rotation = random_rotation(images[0].numel(), settings.rotate) if settings.rotate is not None else None
    noise_rotation = None
    if rotation is not None:  # common random numbers: the draws are U eps, the original run's turned
        model = Rotated(model, rotation.to(device, images.dtype))
        noise_rotation = rotation.to(device, images.dtype)
    searches = {k: Search(**v) for k, v in settings.search.items()}
    traces = traces_dir(out)
    if settings.method != "rs":
        traces.mkdir(exist_ok=True)
    bar = tqdm(total=len(images), initial=len(images) - len(todo), disable=not progress, unit="image",
               desc=f"{settings.method} sigma={settings.sigma}")
    with _open_for_append(out, resumed) as f:
        for lo in range(0, len(todo), inputs_per_batch):
            idx = todo[lo: lo + inputs_per_batch]
            x = images[[i - start for i in idx]].to(device)
            if rotation is not None:
                x = (x.flatten(1) @ rotation.to(x).T).reshape(x.shape)
            tic = time.perf_counter()
            sigma_star = None if init is None else torch.tensor([init[i] for i in idx], dtype=x.dtype, device=device)
            law, trace = find_smoothing(settings.method, model, x, idx, settings.sigma, settings.seed,
                                        searches, sigma_star=sigma_star, rotation=noise_rotation)
            cert = certify(model, x, law, idx, settings.n0, settings.n, settings.alpha, settings.seed, batch_size,
                           rotation=noise_rotation)
            seconds = (time.perf_counter() - tic) / len(idx)
            sigma_min, sigma_proxy, sigma_max = law.min_scale(), law.proxy(), law.max_scale()
            for j, i in enumerate(idx):
                if trace:  # RS has no search
                    np.savez(traces / f"{i}.npz", param=law.param[j].float().cpu().numpy(),
                             **{k: v[j] for k, v in trace.items()})
                label = int(labels[i - start])
                row = (i, label, cert.predict[j], int(cert.predict[j] == label), cert.gap[j], cert.radius[j],
                       cert.proxy_radius[j], float(sigma_min[j]), float(sigma_proxy[j]),
                       float(sigma_max[j]), cert.p_lower[j], seconds)
                f.write("\t".join(_format(v) for v in row) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(idx))
    bar.close()
    return out



def trace_param(out: Path, idx: int, method: str, d: int) -> np.ndarray:
    """The final parameter of image ``idx`` in the run ``out``: theta (d,) or C (d, d), float64."""
    path = traces_dir(Path(out)) / f"{idx}.npz"
    shape = (d,) * {"ancer": 1, "rddrs": 2}[method]
    if not path.exists():
        raise RDDRSError(f"{path}: missing trace (the {method} parameter of image {idx})")
    with np.load(path) as trace:
        if "param" not in trace:
            raise RDDRSError(f"{path} holds no 'param' (written by an older rddrs); rerun the certification")
        param = trace["param"].astype(np.float64)
    if param.shape != shape:
        raise RDDRSError(f"{path}: param has shape {param.shape}, {method} needs {shape}")
    return param


def load_smoothing(out: str | Path, indices, d: int, dtype: torch.dtype = torch.float64) -> Smoothing:
    """The smoothing laws a run certified images ``indices`` with: sigma from the rows (RS,
    DDRS), theta or C from the traces (ANCER, RDDRS)."""
    out = Path(out)
    method = json.loads(sidecar_path(out).read_text())["settings"]["method"]
    if method in ("rs", "ddrs"):
        rows = read_rows(out)
        return Isotropic(torch.tensor([rows[i]["sigma_min"] for i in indices], dtype=dtype), d, check=False)
    params = torch.from_numpy(np.stack([trace_param(out, i, method, d) for i in indices])).to(dtype)
    return Diagonal(params, check=False) if method == "ancer" else FullSPD(params, check=False)


def write_rows(out: Path, rows: list[dict]) -> None:
    """Write a whole result file atomically."""
    lines = ["\t".join(COLUMNS)] + ["\t".join(_format(row[k]) for k in COLUMNS) for row in rows]
    write_atomic(out, [("\n".join(lines) + "\n").encode()])


def merge(shards: list[Path], out: Path) -> int:
    """Join shard result files of one run into ``out``; returns the number of rows.

    The shards must share their settings, must not overlap, and must cover a contiguous
    range of test indices. Traces are copied beside the merged file.
    """
    if not shards:
        raise RDDRSError("merge needs at least one shard")
    sides = []
    for shard in shards:
        if not shard.exists() or not sidecar_path(shard).exists():
            raise RDDRSError(f"{shard}: no such result file (with its .json sidecar)")
        sides.append(json.loads(sidecar_path(shard).read_text()))
    for shard, side in zip(shards[1:], sides[1:]):
        if side["settings"] != sides[0]["settings"]:
            raise RDDRSError(f"{shard} and {shards[0]} were run with different settings")
    rows: dict[int, dict] = {}
    for shard in shards:
        part = read_rows(shard)
        if overlap := sorted(set(part) & set(rows)):
            raise RDDRSError(f"{shard} overlaps another shard (idx {overlap[0]}, {len(overlap)} rows)")
        rows.update(part)
    if not rows:
        raise RDDRSError("the shards hold no rows")
    lo, hi = min(rows), max(rows)
    if missing := [i for i in range(lo, hi + 1) if i not in rows]:
        raise RDDRSError(f"the shards miss idx {missing[0]} ({len(missing)} rows missing in {lo}..{hi})")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rows(out, [rows[i] for i in range(lo, hi + 1)])
    merged_traces = traces_dir(out)
    merged_traces.mkdir(exist_ok=True)
    for shard in shards:
        for trace in traces_dir(shard).glob("*.npz"):
            (merged_traces / trace.name).write_bytes(trace.read_bytes())
    side = dict(sides[0], merged_from=[str(s) for s in shards])
    write_atomic(sidecar_path(out), [json.dumps(side, indent=2).encode()])
    return len(rows)
