"""The settings of a certification run, in one record: what a run asks for (``RunRequest``: the
command line's options, a ``RunSpec``'s settings, a study variant's), what determines its rows
once the preset fills in the rest (``resolve`` -> ``RunSettings``, written in the sidecar),
compared with a sidecar when a run is resumed; and how many images a run searches at once.
Importing it loads no torch (the command line builds its options from ``RunRequest``)."""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from rddrs import RDDRSError
from rddrs.core.methods import method as method_record
from rddrs.core.presets import MAX_SAMPLES, SIGMA_RANGE, Search, preset as preset_record
from rddrs.pipeline.data import MNIST, dataset as dataset_record
from rddrs.pipeline.files import one_line, regular_file, write_atomic
from rddrs.pipeline.results import read_rows, read_sidecar, sidecar_path


def _option(help: str, kind: str = "text", choices: str | None = None, **argparse) -> dict:
    """The metadata of a run setting, from which ``rddrs certify`` makes its option: the help, what
    it reads (``kind``: text, number, natural, positive, flag, or search: one option per field of
    ``presets.SEARCH_OPTIONS``), the name of its list of choices (methods, presets, datasets) and
    other argparse options."""
    return {"help": help, "kind": kind, "choices": choices, **argparse}


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """The one list of a run's settings, as asked for: a method at a noise level, a model, a preset,
    and the values that override the preset's (None: the preset's). ``rddrs certify`` has one option
    per field (from the metadata; ``search`` is one option per ``Search`` field, see
    ``presets.SEARCH_OPTIONS``), a ``RunSpec`` is a request with its output file and images, a
    study's variants are requests, and ``settings.resolve`` makes of one the ``RunSettings`` that a
    result file's sidecar records. A new setting is one field here (and its use)."""

    method: str | None = field(default=None, metadata=_option("the method", required=True, choices="methods"))
    sigma: float | None = field(
        default=None, metadata=_option("RS noise level / the searches' start", required=True, kind="number")
    )
    preset: str | None = field(default=None, metadata=_option("scale (default: cpu)", choices="presets"))
    model: str | None = field(
        default=None, metadata=_option("checkpoint (.pt) or torch.export program (.pt2)", required=True)
    )
    seed: int = field(default=0, metadata=_option("seed of every noise stream (default 0)", kind="natural"))
    device: str = field(default="cpu", metadata=_option("cpu, cuda, cuda:1 ..."))
    rotate: int | None = field(
        default=None,
        metadata=_option(
            "compose inputs and model with a random orthogonal matrix of this seed", metavar="SEED", kind="natural"
        ),
    )
    init: str | None = field(
        default=None,
        metadata=_option(
            "start from this finished run: a DDRS file gives sigma_x* (ancer, rddrs), an ANCER file gives "
            "C = diag(theta) with its floor (rddrs)"
        ),
    )
    probabilities: bool = field(
        default=False, metadata=_option("the model outputs probabilities, not logits", kind="flag")
    )
    n0: int | None = field(default=None, metadata=_option("selection samples", kind="positive"))
    n: int | None = field(default=None, metadata=_option("estimation samples", kind="positive"))
    alpha: float | None = field(
        default=None, metadata=_option("failure probability of each certificate, in (0, 1)", kind="number")
    )
    search: dict = field(default_factory=dict, metadata=_option("overrides of the method's Search", kind="search"))
    dataset: str = field(
        default="mnist",
        metadata=_option(
            "whose test images (default: mnist); the model must have been trained on it", choices="datasets"
        ),
    )

    def request(self) -> "RunRequest":
        """The settings alone (of a ``RunSpec``, without its file and images)."""
        return RunRequest(**request_fields(self))


def request_fields(request: RunRequest) -> dict:
    """The fields of a request (or of a ``RunSpec``, which holds one) by name."""
    return {f.name: getattr(request, f.name) for f in fields(RunRequest)}


@dataclass(frozen=True, kw_only=True)
class RunSettings(RunRequest):
    """Everything that determines a run's numbers (compared when a run is resumed): a ``RunRequest``
    resolved by ``resolve``, every value the preset's where the request left it open (``search``: the
    whole record of each search the run makes), with the SHA-256 of the model's file."""

    model_sha256: str

    def comparable(self) -> dict:
        """The settings whose change would mix incompatible rows in one file. The device is not
        one of them: a run may go on on another machine (its rows are as valid, its draws
        others), and the sidecar records which session, on which device, wrote which rows. The
        dataset is recorded when it is not MNIST (``"dataset": "fashion-mnist"``), so that the
        settings of MNIST runs read as they did before datasets were recorded."""
        d = asdict(self)
        d.pop("model")  # the same weights may live at another path
        d.pop("device")
        d["init"] = _file_name(self.init)  # so may the DDRS run; load_init checks what matters
        if d["dataset"] == MNIST.name:
            d.pop("dataset")
        return json.loads(json.dumps(d))


def _file_name(path: str | None) -> str | None:
    return None if path is None else Path(path).name


def sha256_of(path: Path) -> str:
    """The SHA-256 of the file ``path``, or a one-line error saying why it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as err:
        raise RDDRSError(f"cannot read {path} ({one_line(err)})") from None
    return h.hexdigest()


def normalised(stored: dict) -> dict:
    """Settings as recorded in a sidecar, in the form ``RunSettings.comparable`` gives: the init
    file by name, the dataset only when it is not MNIST (a sidecar without one is a run on MNIST),
    and each search with the defaults of options added after it was written."""
    stored = dict(stored)
    stored.pop("device", None)  # recorded by sidecars written before a run could change machines
    if stored.get("dataset") == MNIST.name:
        stored.pop("dataset")
    stored["init"] = _file_name(stored.get("init"))
    # a search recorded before a Search option existed ran with that option's default
    stored["search"] = {k: Search.from_dict(v).record() for k, v in stored.get("search", {}).items()}
    return stored


def run_dataset(stored: dict) -> str:
    """The dataset of a run, from the settings its sidecar records (MNIST when none is named)."""
    return str(stored.get("dataset", MNIST.name))


def settings_differ(a: dict, b: dict) -> list[str]:
    """The names of the settings in which two normalised records differ."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_settings(out: Path, settings: RunSettings) -> None:
    """A one-line error unless the existing run ``out`` was written with ``settings``."""
    if diff := settings_differ(normalised(read_sidecar(out)["settings"]), settings.comparable()):
        raise RDDRSError(
            f"{out} was written with other settings ({', '.join(diff)} differ); use another --out or the same settings"
        )


def resuming(out: Path, settings: RunSettings) -> bool:
    """Whether ``out`` holds rows of a run to resume, which must have been written with ``settings``
    (else a one-line error); writes nothing."""
    if out.is_dir():
        raise RDDRSError(f"{out} is a directory; the output is a result file (.tsv)")
    if not (out.exists() and out.stat().st_size > 0):
        return False
    side = sidecar_path(out)
    if not side.exists():
        raise RDDRSError(f"{out} exists without its sidecar {side.name}; move it away or remove it")
    if not read_rows(out):  # a header without rows (a run that failed at once): nothing to resume
        return False
    check_settings(out, settings)
    return True


def write_sidecar(out: Path, settings: RunSettings, extra: dict) -> None:
    """Write the sidecar of a new run: its settings, its model's path and ``extra``."""
    write_atomic(
        sidecar_path(out),
        [json.dumps({"settings": settings.comparable(), "model": settings.model, **extra}, indent=2).encode()],
    )


def check_sigma(sigma) -> None:
    """A one-line error unless ``sigma`` is a noise level in ``SIGMA_RANGE``."""
    lo, hi = SIGMA_RANGE
    if not (isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) and lo <= sigma <= hi):
        raise RDDRSError(
            f"sigma must lie in [{lo:g}, {hi:g}] (images are in [0, 1], the network computes in float32), got {sigma}"
        )


def check_stored(stored: dict, where: str) -> None:
    """A one-line error naming ``where`` unless the settings a sidecar records could be a run's: a
    known method, preset and dataset, a sigma that ``make_settings`` takes, n0 and n in
    1..MAX_SAMPLES, alpha in (0, 1), a seed >= 0 and searches that are searches."""
    from rddrs.core.methods import METHODS
    from rddrs.core.presets import PRESETS
    from rddrs.pipeline.data import DATASETS

    try:
        if stored.get("method") not in METHODS:
            raise RDDRSError(f"unknown method {stored.get('method')!r}")
        if stored.get("preset") not in PRESETS:
            raise RDDRSError(f"unknown preset {stored.get('preset')!r}")
        if run_dataset(stored) not in DATASETS:
            raise RDDRSError(f"unknown dataset {run_dataset(stored)!r}")
        check_sigma(stored.get("sigma"))
        n0, n, alpha, seed = (stored.get(k) for k in ("n0", "n", "alpha", "seed"))
        if not (_whole(n0) and _whole(n) and 1 <= n0 <= MAX_SAMPLES and 1 <= n <= MAX_SAMPLES):
            raise RDDRSError(f"n0 and n must be integers in 1..{MAX_SAMPLES:,}, got {n0}, {n}")
        if not (isinstance(alpha, float) and 0 < alpha < 1):
            raise RDDRSError(f"alpha must lie in (0, 1), got {alpha}")
        if not (_whole(seed) and seed >= 0):
            raise RDDRSError(f"seed must be an integer >= 0, got {seed}")
        if not isinstance(stored.get("search"), dict):
            raise RDDRSError("no search record")
        for record in stored["search"].values():
            Search.from_dict(record)
    except (RDDRSError, TypeError, AttributeError) as err:
        raise RDDRSError(f"{where}: its settings cannot be a run's ({err})") from None


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def make_settings(method: str, sigma: float, model: str | Path, preset: str | None = None, **options) -> RunSettings:
    """``resolve`` of the request for ``method`` at ``sigma`` with ``model`` and ``preset`` (None: cpu); ``options``:
    the other ``RunRequest`` fields (``search`` overrides fields of the method's ``Search``)."""
    return resolve(RunRequest(method=method, sigma=sigma, model=str(model), preset=preset, **options))


def resolve(request: RunRequest) -> RunSettings:
    """The settings of the run ``request`` asks for: the preset's values where it gives none.
    ``search`` overrides fields of the method's search (e.g. ``{"kappa": 1.0, "step": "adam"}``;
    ``max_step=0`` turns the bound off); a ``capped`` objective gets the cap of this run's n and
    alpha. ``dataset``: whose test images the run certifies; a model whose record says it was
    trained on another dataset is refused. Every problem is a one-line error."""
    from rddrs.core.noise import family_class
    from rddrs.core.stats import gap_cap
    from rddrs.pipeline.models import trained_on

    method, sigma, seed, rotate, init = request.method, request.sigma, request.seed, request.rotate, request.init
    record = method_record(method)
    dataset = dataset_record(request.dataset).name
    preset = request.preset or "cpu"
    chosen = preset_record(preset)
    check_sigma(sigma)
    if not (_whole(seed) and seed >= 0):
        raise RDDRSError(f"seed must be an integer >= 0, got {seed}")
    if rotate is not None and not (_whole(rotate) and 0 <= rotate < 2**63):
        raise RDDRSError(f"rotate (the rotation's seed) must be an integer in 0..2^63-1, got {rotate}")
    if init is not None and not record.starts:
        raise RDDRSError(f"init (a result file to start from) applies to method ancer or rddrs only, not {method}")
    if request.model is None:
        raise RDDRSError("a run needs a model")
    model = regular_file(Path(request.model), "model")
    if (trained := trained_on(model)) is not None and trained != dataset:
        raise RDDRSError(
            f"model {model} was trained on {trained}, and this run certifies {dataset} images: "
            f"use a model trained on {dataset} (or --dataset {trained})"
        )
    n0, n = request.n0 or chosen.n0, request.n or chosen.n
    alpha = chosen.alpha if request.alpha is None else request.alpha
    if not 0 < alpha < 1:
        raise RDDRSError(f"alpha must lie in (0, 1), got {alpha}")
    if not (_whole(n0) and _whole(n) and 1 <= n0 <= MAX_SAMPLES and 1 <= n <= MAX_SAMPLES):
        raise RDDRSError(
            f"n0 and n must be integers in 1..{MAX_SAMPLES:,} (more samples per image would not finish), got {n0}, {n}"
        )
    overrides = dict(request.search or {})
    if overrides and not record.searched:
        raise RDDRSError(f"{record.label} has no search to override")
    if overrides.get("diagonal") and not family_class(record.family).dense:
        raise RDDRSError(f"a diagonal-only search restricts a dense S (RDDRS' full C); {record.label}'s is not dense")
    if record.searched and method not in chosen.search:
        raise RDDRSError(f"the {preset} preset has no search for {method} (presets.PRESETS[{preset!r}].search)")
    if overrides.get("max_step") == 0:
        overrides["max_step"] = None
    if record.searched:  # the capped objective is capped at this run's own r_max
        capped = overrides.get("objective", chosen.search[method].objective) == "capped"
        overrides["cap"] = gap_cap(n, alpha) if capped else None
    own = replace(chosen.search[method], **overrides) if record.searched else None
    searches = {
        k: (own if k == method else v).record()
        for k, v in chosen.search.items()
        if k == method or (record.searched and k == record.base)
    }
    return RunSettings(
        **{
            **request_fields(request),
            "sigma": float(sigma),
            "preset": preset,
            "model": str(model),
            "n0": n0,
            "n": n,
            "alpha": alpha,
            "seed": int(seed),
            "device": str(request.device),
            "rotate": None if rotate is None else int(rotate),
            "search": searches,
            "init": None if init is None else str(init),
            "dataset": dataset,
        },
        model_sha256=sha256_of(model),
    )


#: noisy images one search iteration should hold (inputs x samples), by device type: on 2 CPU
#: cores batching up to about 16k images does not slow the search down per input (measured by
#: benchmarks/bench_core.py section 2, s/input/iter at 1, 8 and 32 inputs; the README's Speed
#: section has the numbers); on a GPU the bound is memory (about 0.2 MB per image for forward and
#: backward of the CNN).
SEARCH_IMAGES = {"cpu": 16_384, "cuda": 262_144}


MAX_INPUTS_PER_BATCH = 32


def default_inputs_per_batch(settings: RunSettings) -> int:
    """Images searched (and certified) at once: ``SEARCH_IMAGES // samples`` of the run's
    largest search, between 1 and ``MAX_INPUTS_PER_BATCH`` (32 for RS)."""
    samples = max((v["samples"] for v in settings.search.values()), default=1)
    budget = SEARCH_IMAGES.get(str(settings.device).split(":")[0], SEARCH_IMAGES["cpu"])
    return max(1, min(MAX_INPUTS_PER_BATCH, budget // samples))
