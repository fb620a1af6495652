"""rddrs: certify classifiers by randomized smoothing with per-input Gaussian noise.

Four methods share one core: RS (Cohen et al., fixed isotropic noise), DDRS (per-input
sigma), ANCER (per-input diagonal scale) and RDDRS (per-input SPD scale matrix optimised
on the affine-invariant manifold).
"""

from importlib.metadata import PackageNotFoundError, version

from rddrs.pipeline import allocator

allocator.tune()  # large CPU buffers stay in the process; RDDRS_TUNE_MALLOC=0 switches it off

try:
    __version__ = version("rddrs")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


class RDDRSError(ValueError):
    """A problem with the user's input, reported as one line (never a traceback)."""


__all__ = ["RDDRSError", "__version__"]
