"""The `rddrs` command line: one subcommand per step of the pipeline.

Every user error ends in one line on stderr and a non-zero exit status, never a traceback.
The parser reads only light modules (methods, presets, the argument lists of train and
curves); torch is imported when a subcommand runs, so that every ``--help`` is immediate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rddrs import RDDRSError, __version__


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage plus error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_data(args: argparse.Namespace) -> None:
    from rddrs.data import fetch_mnist

    raw = fetch_mnist(Path(args.root))
    print(f"MNIST ready in {raw}")


def _cmd_certify(args: argparse.Namespace) -> None:
    from rddrs.experiments import certify_mnist, make_settings
    from rddrs.models import resolve_device

    search = {k: getattr(args, k) for k in SEARCH_OPTIONS if getattr(args, k) is not None}
    settings = make_settings(args.method, args.sigma, args.model, args.preset, seed=args.seed,
                             device=str(resolve_device(args.device)), rotate=args.rotate, init=args.init,
                             probabilities=args.probabilities, n0=args.n0, n=args.n, alpha=args.alpha,
                             search=search)
    out = certify_mnist(settings, args.out, args.start, args.count, args.data, args.inputs_per_batch,
                        args.batch_size, progress=not args.quiet)
    print(f"results in {out}")
    if args.memory:
        from rddrs.data import load_mnist

        _memory_pass(out, load_mnist(Path(args.data), train=False)[0], not args.quiet)


def _memory_pass(out: Path, images, progress: bool) -> None:
    from collections import Counter

    from rddrs.memory import apply_memory, read_memory_rows

    path = apply_memory(out, images, 0, progress=progress)
    counts = Counter(row["memory"] for row in read_memory_rows(path))
    print(f"memory: {', '.join(f'{n} {status}' for status, n in sorted(counts.items()))}; results in {path}")


def _cmd_memory(args: argparse.Namespace) -> None:
    from rddrs.data import load_mnist

    out = Path(args.out)
    if not out.is_file():
        raise RDDRSError(f"{out}: no such result file")
    images, _ = load_mnist(Path(args.data), train=False)
    _memory_pass(out, images, not args.quiet)


def _cmd_merge(args: argparse.Namespace) -> None:
    from rddrs.experiments import merge

    rows = merge([Path(p) for p in args.shards], Path(args.out))
    print(f"merged {len(args.shards)} shards, {rows} rows, into {args.out}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


#: the options of `rddrs certify` that override fields of the method's Search
SEARCH_OPTIONS = ("iterations", "samples", "lr", "kappa", "max_step", "objective", "step")


def _add_certify(sub) -> None:
    from rddrs.methods import NAMES as METHODS
    from rddrs.presets import OBJECTIVES, PRESETS, STEPS

    p = sub.add_parser("certify", help="certify a slice of the MNIST test set with one method",
                       description="Certify test images start..start+count-1 with RS, DDRS, ANCER or RDDRS "
                                   "and append one row per image to OUT (tab-separated), resuming a "
                                   "run that was stopped. Preset values apply unless given explicitly.")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--sigma", type=float, required=True, help="RS noise level / the searches' start")
    p.add_argument("--model", required=True, help="checkpoint (.pt) or torch.export program (.pt2)")
    p.add_argument("--out", required=True, help="result file (.tsv); its sidecar is OUT.json")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="scale (default: cpu)")
    p.add_argument("--start", type=int, default=0, help="first test index (default 0)")
    p.add_argument("--count", type=_positive_int, help="number of test images (default: the preset's)")
    p.add_argument("--n0", type=_positive_int, help="selection samples")
    p.add_argument("--n", type=_positive_int, help="estimation samples")
    p.add_argument("--alpha", type=float, help="failure probability of each certificate, in (0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--rotate", type=int, metavar="SEED",
                   help="compose inputs and model with a random orthogonal matrix of this seed")
    p.add_argument("--init", help="start from this finished run: a DDRS file gives sigma_x* (ancer, rddrs), "
                                  "an ANCER file gives C = diag(theta) with its floor (rddrs)")
    p.add_argument("--probabilities", action="store_true", help="the model outputs probabilities, not logits")
    p.add_argument("--iterations", type=int, help="search iterations of --method")
    p.add_argument("--samples", type=_positive_int, help="search samples per iteration of --method")
    p.add_argument("--lr", type=float, help="search step size of --method")
    p.add_argument("--kappa", type=float, help="weight of the smallest-scale term of --method")
    p.add_argument("--max-step", type=float, help="bound on each search step of --method (0: none)")
    p.add_argument("--objective", choices=OBJECTIVES,
                   help="soft certificate the search maximises: soft (default, no clamp), clamped (the "
                        "authors' code), capped (limited at the cap of this run's n and alpha)")
    p.add_argument("--step", choices=STEPS,
                   help="step rule of the search: sgd or adam (Riemannian Adam for rddrs); default: "
                        "the method's paper (adam for ancer, sgd otherwise)")
    p.add_argument("--inputs-per-batch", type=_positive_int,
                   help="images searched at once (default: about 16k noisy images per search step on a "
                        "CPU, 262k on a GPU, at most 32 images)")
    p.add_argument("--batch-size", type=_positive_int, default=2000,
                   help="noisy images per forward pass (default 2000; larger helps on a GPU)")
    p.add_argument("--data", default="data", help="data directory (default: data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--memory", action="store_true",
                   help="then run the memory pass on OUT (see `rddrs memory --help`)")
    p.set_defaults(run=_cmd_certify)

    m = sub.add_parser("merge", help="join shard result files of one run",
                       description="Join result files of one run split with --start/--count; the shards "
                                   "must share settings, must not overlap and must leave no gap.")
    m.add_argument("shards", nargs="+")
    m.add_argument("--out", required=True)
    m.set_defaults(run=_cmd_merge)


def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="make the certified regions of a result file consistent",
                       description="Go through the rows of OUT in ascending idx, keeping a memory of the "
                                   "certified regions {x + S u : ||u|| < gap}: an input inside a stored "
                                   "region of another class takes that class (relabelled), one whose "
                                   "region meets such regions has its gap shrunk until it does not "
                                   "(shrunk). Writes OUT.memory.tsv (the result columns plus 'memory'); "
                                   "a stopped pass resumes.")
    p.add_argument("out", metavar="OUT", help="result file of rddrs certify (.tsv, with its .json and .traces)")
    p.add_argument("--data", default="data", help="data directory (default: data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_memory)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rddrs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rddrs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="fetch MNIST into ROOT/MNIST/raw (torchvision layout)",
                          description="Fetch MNIST (checksum-verified) into ROOT/MNIST/raw, "
                                      "the layout torchvision.datasets.MNIST(root=ROOT) reads. "
                                      "Existing raw files are used as they are.")
    data.add_argument("--root", default="data", help="data directory (default: data)")
    data.set_defaults(run=_cmd_data)
    from rddrs import analysis, train

    trainer = sub.add_parser("train", help="train the base CNN on MNIST with Gaussian augmentation",
                             description="Train the paper's CNN on the 60000 MNIST training images with "
                                         "Gaussian noise augmentation at --sigma; writes .pt, .json and .pt2.")
    train.add_arguments(trainer)
    trainer.set_defaults(run=train.run)
    _add_certify(sub)
    _add_memory(sub)
    curves = sub.add_parser("curves", help="certified-accuracy curves and tables from result files",
                            description="Draw certified accuracy against proxy and l2 radius (one panel "
                                        "per sigma, one line per method) and write tables as CSV and Markdown.")
    analysis.add_arguments(curves)
    curves.set_defaults(run=analysis.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except RDDRSError as err:
        print(f"rddrs {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rddrs {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
