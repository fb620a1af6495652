"""rddrs: certify classifiers by randomized smoothing with per-input Gaussian noise.

Four methods share one core: RS (Cohen et al., fixed isotropic noise), DDRS (per-input
sigma), ANCER (per-input diagonal scale) and RDDRS (per-input SPD scale matrix optimised
on the affine-invariant manifold).
"""

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _source_version() -> str:
    """The version in the source tree's pyproject.toml, marked ``+source`` (a tree run from
    ``PYTHONPATH=src`` without being installed, as on a bare GPU machine); ``0+unknown`` without one."""
    try:
        with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
            return f"{tomllib.load(f)['project']['version']}+source"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"


try:
    __version__ = version("rddrs")
except PackageNotFoundError:
    __version__ = _source_version()


class RDDRSError(ValueError):
    """A problem with the user's input, reported as one line (never a traceback)."""


__all__ = ["RDDRSError", "__version__"]
