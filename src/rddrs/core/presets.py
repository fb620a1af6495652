"""The settings of a search and the scales of a run (presets), as plain data.

A ``Search`` says how one method chooses each input's smoothing law (``rddrs.core.optimize``); a
``Preset`` says how large a run is: certification samples, level, test images, and one search
per method. Both are written into every result file's sidecar (``dataclasses.asdict``), so a
run can be resumed, compared and reproduced. This module imports nothing heavy, so the command
line can offer the presets before torch is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from rddrs import RDDRSError

#: the training and certification sigmas of the paper's three classifiers (Figure 2's panels)
SIGMAS = (0.12, 0.25, 0.5)
#: the classifier of the studies that run at one sigma (chapters 5, 7 and 8)
STUDY_SIGMA = 0.25
#: the other panels of Figure 2, largest sigma first: the order in which they are computed after
#: STUDY_SIGMA's (a sweep's figure2 group, the fill)
OTHER_SIGMAS = tuple(sorted((s for s in SIGMAS if s != STUDY_SIGMA), reverse=True))

OBJECTIVES = ("soft", "clamped", "capped")
STEPS = ("sgd", "adam")

#: the largest numbers a run may ask for, beyond which it could not fit in memory or finish: the
#: certification samples n0 and n of each image (the paper's n is 10^5), the draws of one search
#: step (held in memory at once; the paper's RDDRS takes 20000), the steps of a search (the
#: paper's DDRS takes 1500) and the noisy images of one forward pass
MAX_SAMPLES = 10**9
MAX_SEARCH_SAMPLES = 10**6
MAX_ITERATIONS = 10**6
MAX_BATCH = 10**6
#: the noise levels a run may start from: images lie in [0, 1], and the network computes in float32
SIGMA_RANGE = (1e-6, 1e3)


def _finite(value) -> bool:
    """Whether ``value`` is a real number other than NaN and +-inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    """Whether ``value`` is a whole number (an int, or a float without a fraction)."""
    return _finite(value) and int(value) == value


@dataclass(frozen=True)
class Search:
    """Settings of one per-input search: maximise ``H = scale * R * (P + kappa K)`` for
    ``iterations`` steps of the rule ``step`` with step size ``lr``, drawing ``samples`` noise
    vectors per step; with ``keep_best_every``, keep the best iterate at every that many steps
    instead of the last one.

    * ``objective``: which soft certificate R is maximised (``rddrs.core.objectives``): ``soft``
      (no clamp), ``clamped`` (the authors' code) or ``capped`` (the soft one limited smoothly
      at ``cap``, the largest gap the run's certification can give; set from n and alpha by
      ``settings.make_settings``).
    * ``step``: ``sgd`` (``S <- Exp_S(lr grad H)``) or ``adam`` (Adam in the family's geometry;
      Riemannian Adam for a full S), see ``rddrs.core.steps``.
    * ``max_step`` bounds each step: no scale of S changes by more than a factor
      ``exp(max_step)`` (full S: whitened spectral norm, ``spd.exp``) or ``1 + max_step``
      (sigma, theta). It is our safeguard, not the papers': with few samples the Monte Carlo
      gradient is noisy, and a fixed-size Riemannian step ``C grad C`` grows with C, so an
      unbounded RDDRS ascent can run away along one direction (seen at 500 samples, lr 1).

    Options for studying the search (defaults: the papers' behaviour):

    * ``floor``: ANCER and RDDRS keep every scale of S above sigma_x*. With False only the
      positivity guard ``optimize.DDRS_FLOOR`` remains.
    * ``antithetic``: the ``samples`` draws of each step are ``samples / 2`` antithetic pairs
      ``(eps, -eps)``; the Monte Carlo means stay unbiased, and their odd-order noise cancels.
    * ``control_variate``: subtract from the gradient estimate its value at the clean input,
      ``grad psi(x) (sum_i eps_i)^T``, whose mean is 0 since ``E[eps] = 0``.
    * ``repeat``: which independent replicate of the optimisation noise to draw (0: the usual
      stream); the certification noise and sigma_x* do not change with it.
    * ``diagonal`` (RDDRS only): keep C diagonal. The Riemannian gradient is projected on the
      diagonal matrices, which at a diagonal C is its diagonal (the metric makes the diagonal
      and off-diagonal parts orthogonal), and they are totally geodesic, so ``Exp_C`` keeps C
      diagonal. It removes RDDRS' off-diagonal freedom and keeps everything else: geometry,
      step rule, draws.
    """

    # a field with a help text is also an option of ``rddrs certify`` (``SEARCH_OPTIONS``; ``kind``: what it reads)
    iterations: int = field(metadata={"help": "search iterations of --method", "kind": "natural"})
    samples: int = field(metadata={"help": "search samples per iteration of --method", "kind": "positive"})
    lr: float = field(metadata={"help": "search step size of --method", "kind": "number"})
    kappa: float = field(
        default=0.0, metadata={"help": "weight of the smallest-scale term of --method", "kind": "number"}
    )
    scale: float = 1.0
    step: str = field(
        default="sgd",
        metadata={
            "help": "step rule of the search: sgd or adam (Riemannian Adam for rddrs); default: the method's paper "
            "(adam for ancer, sgd otherwise)",
            "choices": STEPS,
            "kind": "text",
        },
    )
    objective: str = field(
        default="soft",
        metadata={
            "help": "soft certificate the search maximises: soft (default, no clamp), clamped (the authors' code), "
            "capped (limited at the cap of this run's n and alpha)",
            "choices": OBJECTIVES,
            "kind": "text",
        },
    )
    cap: float | None = None
    keep_best_every: int | None = None
    max_step: float | None = field(
        default=None, metadata={"help": "bound on each search step of --method (0: none)", "kind": "number"}
    )
    floor: bool = True
    antithetic: bool = False
    control_variate: bool = False
    repeat: int = 0
    diagonal: bool = field(
        default=False,
        metadata={
            "help": "rddrs only: keep C diagonal (the Riemannian search without off-diagonal freedom)",
            "kind": "flag",
        },
    )

    def __post_init__(self):
        if not (_integer(self.iterations) and _integer(self.samples) and self.iterations >= 0 and self.samples >= 1):
            raise RDDRSError(
                f"a search needs integers iterations >= 0 and samples >= 1, got {self.iterations}, {self.samples}"
            )
        if self.iterations > MAX_ITERATIONS or self.samples > MAX_SEARCH_SAMPLES:
            raise RDDRSError(
                f"a search takes at most {MAX_ITERATIONS:,} iterations of at most {MAX_SEARCH_SAMPLES:,} "
                f"samples (more would not fit in memory or finish), got {self.iterations:,} and "
                f"{self.samples:,}"
            )
        if not (_finite(self.lr) and self.lr > 0):
            raise RDDRSError(f"learning rate must be finite and > 0, got {self.lr}")
        if not (_finite(self.kappa) and self.kappa >= 0):
            raise RDDRSError(f"kappa must be finite and >= 0, got {self.kappa}")
        if not (_finite(self.scale) and self.scale > 0):
            raise RDDRSError(f"the objective's scale must be finite and > 0, got {self.scale}")
        if self.keep_best_every is not None and not (_integer(self.keep_best_every) and self.keep_best_every >= 1):
            raise RDDRSError(f"keep_best_every must be an integer >= 1 (or None), got {self.keep_best_every}")
        if self.step not in STEPS:
            raise RDDRSError(f"unknown step rule {self.step!r}; expected one of {', '.join(STEPS)}")
        if self.objective not in OBJECTIVES:
            raise RDDRSError(f"unknown objective {self.objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if (self.objective == "capped") != (self.cap is not None):
            raise RDDRSError(
                "the capped objective needs its cap (and only it has one): "
                f"objective {self.objective!r}, cap {self.cap}"
            )
        if self.cap is not None and not (_finite(self.cap) and self.cap > 0):
            raise RDDRSError(f"the cap of the capped objective must be finite and > 0, got {self.cap}")
        if self.max_step is not None and not (_finite(self.max_step) and self.max_step > 0):
            raise RDDRSError(f"max_step must be finite and > 0 (or None), got {self.max_step}")
        if self.antithetic and self.samples % 2:
            raise RDDRSError(f"antithetic pairs need an even number of samples, got {self.samples}")
        if not (_integer(self.repeat) and self.repeat >= 0):
            raise RDDRSError(f"repeat must be an integer >= 0, got {self.repeat}")

    @classmethod
    def from_dict(cls, stored: dict) -> "Search":
        """A search from its sidecar record; records written before an option existed ran with
        that option's default, and the boolean ``adam`` of older files is the step rule."""
        stored = dict(stored)
        if "adam" in stored:
            stored["step"] = "adam" if stored.pop("adam") else "sgd"
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(stored) - known):
            raise RDDRSError(f"unknown search setting(s) {', '.join(unknown)}")
        return cls(**stored)

    def record(self) -> dict:
        """The JSON record of the sidecar."""
        return asdict(self)


#: the Search fields that ``rddrs certify`` takes as options (those with a help text)
SEARCH_OPTIONS = tuple(f.name for f in fields(Search) if "help" in f.metadata)


@dataclass(frozen=True)
class Preset:
    """Scale of a run: certification samples, level, test images, and the searches."""

    n0: int
    n: int
    alpha: float
    count: int
    search: dict = field(default_factory=dict)


# The papers' settings (RDDRS paper, Section 4); ANCER's code also ran lr 1, ours keeps 0.04.
DDRS = Search(iterations=1500, samples=100, lr=1e-4, scale=0.5, keep_best_every=100)
ANCER = Search(iterations=100, samples=100, lr=0.04, kappa=2.0, step="adam")
RDDRS = Search(iterations=100, samples=20_000, lr=1.0, kappa=1e-6)

#: Bound on each RDDRS step in every preset (see ``Search.max_step``): no direction of C
#: stretches by more than 10 % per step.
RDDRS_MAX_STEP = 0.1

# cpu keeps the DDRS and ANCER path lengths (iterations x step) close to the paper's.
PRESETS = {
    "smoke": Preset(
        n0=10,
        n=200,
        alpha=0.01,
        count=4,
        search={
            "ddrs": Search(10, 16, 1e-3, scale=0.5, keep_best_every=5),
            "ancer": Search(5, 16, 0.04, kappa=2.0, step="adam"),
            "rddrs": Search(5, 32, 1.0, kappa=1e-6, max_step=RDDRS_MAX_STEP),
        },
    ),
    "cpu": Preset(
        n0=100,
        n=10_000,
        alpha=0.001,
        count=100,
        search={
            "ddrs": Search(150, 64, 1e-3, scale=0.5, keep_best_every=25),
            "ancer": Search(50, 64, 0.08, kappa=2.0, step="adam"),
            "rddrs": Search(30, 500, 1.0, kappa=1e-6, max_step=RDDRS_MAX_STEP),
        },
    ),
    "paper": Preset(
        n0=100,
        n=100_000,
        alpha=0.001,
        count=10_000,
        search={"ddrs": DDRS, "ancer": ANCER, "rddrs": replace(RDDRS, max_step=RDDRS_MAX_STEP)},
    ),
}


def preset(name: str) -> Preset:
    """The preset ``name``, or a one-line error naming the known ones."""
    if name not in PRESETS:
        raise RDDRSError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]
