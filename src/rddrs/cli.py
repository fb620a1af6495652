"""The `rddrs` command line: one subcommand per step of the pipeline.

Every user error ends in one line on stderr and a non-zero exit status, never a traceback.
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
