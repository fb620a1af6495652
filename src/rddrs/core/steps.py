"""Step rules of the searches, written once for every smoothing family.

A rule turns the gradient of H (already in the family's geometry: ``Smoothing.ascent_direction``)
into the next point. It uses only the family's geometry: ``step`` (the exponential map; a
plain sum for sigma and theta), ``component_inner`` and ``step_transport`` (parallel
transport; the identity in a flat geometry). The family never knows the rule, and the rule
never knows the family, as in geoopt, whose optimisers are separate from its manifolds.

* ``sgd``: ``S <- Exp_S(lr grad H)`` (DDRS, and RDDRS' update (6) in the paper).
* ``adam``: Adam (Kingma and Ba) ascending H. In a flat geometry it is torch's Adam, one
  second moment per coordinate (ANCER's rule). For a full S it is Riemannian Adam (Becigneul
  and Ganea, ICLR 2019): the first moment m is a tangent vector, carried to each new point by
  parallel transport, and the second moment is one number per input, the metric norm
  ``||grad H||_C^2``. The step ``lr m_hat / (sqrt(v_hat) + eps)`` then has metric norm about
  ``lr`` whatever the scale of the gradient, so it needs no ``max_step`` to stay bounded.

A projection that follows a step (the floor) moves the point but leaves the moments alone,
as in ANCER's projected Adam.
"""

from __future__ import annotations

from torch import Tensor

from rddrs import RDDRSError
from rddrs.core.noise import Smoothing


class SGD:
    """``S <- Exp_S(lr grad)``."""

    def __init__(self, lr: float):
        self.lr = lr

    def __call__(self, law: Smoothing, grad: Tensor, max_step: float | None = None) -> Smoothing:
        return law.step(self.lr * grad, max_step)


class Adam:
    """Adam ascent in the family's geometry (see the module); state per input."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.t, self.m, self.v = 0, 0.0, 0.0

    def __call__(self, law: Smoothing, grad: Tensor, max_step: float | None = None) -> Smoothing:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + law.component_inner((1 - b2) * grad, grad)
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        moved, self.m = law.step_transport(self.lr * m_hat / (v_hat.sqrt() + self.eps), self.m, max_step)
        return moved


#: the rule of each name a ``presets.Search`` may give (``presets.STEPS``, kept there without torch
#: so that the command line offers the names before torch loads; a test ties the two)
RULES = {"sgd": SGD, "adam": Adam}


def make(name: str, lr: float):
    """A fresh rule ``name`` with step size ``lr``."""
    if name not in RULES:
        raise RDDRSError(f"unknown step rule {name!r}; expected one of {', '.join(RULES)}")
    return RULES[name](lr)
