"""Smoothing families: a batch of Gaussian laws ``x + S eps``, ``eps ~ N(0, I_d)``, one per input.

Three families share one interface, so that RS, DDRS, ANCER and RDDRS differ only by the
family and the step rule:

==============  ==================  ====================  ======================
family          scale ``S``         ``det(S)^(1/d)``      ``lambda_min(S)``
==============  ==================  ====================  ======================
``Isotropic``   ``sigma I``         ``sigma``             ``sigma``
``Diagonal``    ``diag(theta)``     ``exp(mean log th)``  ``min theta``
``FullSPD``     SPD matrix ``C``    ``exp(mean log w)``   ``w_min``
==============  ==================  ====================  ======================

(``w``: the eigenvalues of ``C``.) The covariance of the noise is ``S S^T``: for the full
family it is ``C^2``, following the paper's sampling ``x + C Z``.

For optimisation each family also gives, in its own geometry, the gradients of the proxy
factor ``P = det(S)^(1/d)`` and of the smallest scale ``K = lambda_min(S)``, turns a
Euclidean gradient with respect to its parameter into an ascent direction (Riemannian for
``FullSPD``: ``C sym(G) C``), takes a step (``theta + V``, or ``Exp_C(V)``) and projects
onto ``S >= lower``.

The family contract
-------------------

In the spirit of geoopt's ``Manifold``, the family object answers every question the rest of
the package asks about a law, so that no module outside this one asks which family it is:
the search, the runs, the memory and the studies read these answers only.

======================================  ==================================================
what                                    it answers
======================================  ==================================================
``family``                              the name in ``FAMILIES`` (``methods.Method.family``)
``in_rows``                             the law is the result row's ``sigma_min`` (nothing
                                        in the traces): only for ``S = sigma I``
``dense``                               S is a dense matrix (the memory reads such laws
                                        lazily, its geometry needs an ``eig``)
``scalar``                              ``S = s I`` with ``param`` the scale s (B,)
``geometry``                            ``"euclidean"`` or ``"affine-invariant"`` (Adam is
                                        then Riemannian Adam)
``param_shape(d)``                      one input's parameter: ``()``, ``(d,)``, ``(d, d)``
``from_param(param, dim, check)``       the laws of a batch of parameters (checked)
``embed(law)``                          a law of a family this one contains, as one of this
                                        family (the start of a search from sigma_x* I or
                                        from ANCER's theta); a one-line error otherwise
``with_param(param)``                   the same family (and d) with other parameters
``diagonal()``                          the diagonal of S (B, d)
``solve(m)``                            ``S^-1 m`` for m (..., d, k)
``eig``                                 dense families: C's ascending eigenvalues and
                                        eigenvectors, computed once
``scales(float64)``                     the scales of S, ascending (B, d): from the family's
                                        own decomposition in the parameter's dtype, or in
                                        float64 from the eigenvalues alone
``axes()``                              the principal axes, largest scale first: scales
                                        (B, d) and unit axes as rows (B, d, d), float64;
                                        None when scalar
``masked(keep)``                        the same axes with the scales s where ``keep(s)``
                                        is false set to 0 (a degenerate law, for sampling)
``floor(lower)``, ``step``, ...         the search's projection and geometry (below)
======================================  ==================================================

A diagonal family needs only its parameter, ``diagonal()``, the certificate factors and their
gradients: the rest has defaults here. New families join with ``register`` (and leave with
``unregister``), without editing the package; a method that uses one joins with
``rddrs.core.methods.register``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from rddrs import RDDRSError
from rddrs.core import spd
from rddrs.core.methods import DIAGONAL, FULL, ISOTROPIC


def _per_input(lower: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """A floor given as a number or per input, as a (B,) tensor of ``like``'s dtype and device."""
    lower = torch.as_tensor(lower, dtype=like.dtype, device=like.device)
    return lower.expand(batch) if lower.dim() == 0 else lower


def _checked_scales(values, name: str, ndim: int, shape: str) -> Tensor:
    """``values`` as a tensor, or RDDRSError unless it has ``ndim`` axes, all finite and > 0."""
    values = torch.as_tensor(values)
    if values.dim() != ndim:
        raise RDDRSError(f"{name} must have shape {shape}, got {tuple(values.shape)}")
    if not (torch.isfinite(values).all() and (values > 0).all()):
        raise RDDRSError(f"{name} must be finite and > 0")
    return values


def _tied_minimum(values: Tensor) -> Tensor:
    """Weights 1/m on the m entries (per row) equal to the row's minimum up to rounding."""
    tol = torch.finfo(values.dtype).eps ** 0.5 * values.abs().amax(-1, keepdim=True)
    tied = (values <= values.amin(-1, keepdim=True) + tol).to(values.dtype)
    return tied / tied.sum(-1, keepdim=True)


class Smoothing:
    """A batch of B smoothing laws; ``param`` holds sigma (B,), theta (B, d) or C (B, d, d) (a
    registered family: its ``param_shape``), and the class answers the family contract."""

    param: Tensor
    dim: int
    #: the family's name in the methods registry (``rddrs.core.methods``)
    family: ClassVar[str]
    #: the family contract's answers (see the module notes)
    in_rows: ClassVar[bool] = False
    dense: ClassVar[bool] = False
    scalar: ClassVar[bool] = False
    geometry: ClassVar[str] = "euclidean"

    # -- the family: parameters, construction, containment --------------------------------
    @classmethod
    def param_shape(cls, d: int) -> tuple[int, ...]:
        """The shape of one input's parameter at dimension d."""
        raise NotImplementedError

    @classmethod
    def from_param(cls, param: Tensor, dim: int, check: bool = True) -> "Smoothing":
        """The laws with parameters ``param`` (B, *param_shape(dim)), checked unless ``check`` is False."""
        return cls(param, check=check)

    @classmethod
    def embed(cls, law: "Smoothing") -> "Smoothing":
        """``law`` as a law of this family (the law itself if it is one), or a one-line error
        when this family does not contain ``law``'s."""
        if type(law) is cls:
            return law
        raise RDDRSError(f"a {law.family} law is not one of the {cls.family} family")

    @property
    def batch(self) -> int:
        return self.param.shape[0]

    def expand(self, v: Tensor) -> Tensor:
        """A per-input quantity (B,) shaped to broadcast against ``param``."""
        return v.reshape(v.shape + (1,) * (self.param.dim() - 1))

    # -- sampling -------------------------------------------------------------------------
    def scale_noise(self, eps: Tensor, offset: Tensor | None = None) -> Tensor:
        """``offset + S eps`` (in one fused operation) for standard normal draws ``eps`` of
        shape (B, m, d); ``offset`` broadcasts to it, e.g. the inputs as (B, 1, d)."""
        factor = self._noise_factor()
        return eps * factor if offset is None else torch.addcmul(offset, eps, factor)

    def _noise_factor(self) -> Tensor:
        """For a diagonal S: its diagonal, shaped to multiply draws (B, m, d)."""
        raise NotImplementedError

    # -- certificate factors --------------------------------------------------------------
    def log_proxy(self) -> Tensor:
        """``log det(S)^(1/d)`` per input, computed in log space (no over/underflow)."""
        raise NotImplementedError

    def proxy(self) -> Tensor:
        """``det(S)^(1/d)``: radius of the ball with the volume of ``{S u : ||u|| < 1}``."""
        return self.log_proxy().exp()

    def min_scale(self) -> Tensor:
        """``lambda_min(S)``: radius of the largest ball inside ``{S u : ||u|| < 1}``."""
        raise NotImplementedError

    def max_scale(self) -> Tensor:
        """``lambda_max(S)`` per input."""
        raise NotImplementedError

    def matrix(self) -> Tensor:
        """The dense scale matrices (B, d, d) (for tests and small d)."""
        return torch.diag_embed(self.diagonal())

    # -- the shape of S (memory, studies) -----------------------------------------------
    def diagonal(self) -> Tensor:
        """The diagonal of S (B, d)."""
        raise NotImplementedError

    def solve(self, m: Tensor) -> Tensor:
        """``S^-1 m`` for m of shape (..., d, k), S broadcast over the leading axes (for a
        diagonal S, the default: m divided by the diagonal)."""
        return m / self.diagonal()[..., :, None]

    def scales(self, float64: bool = False) -> Tensor:
        """The scales of S per input, ascending (B, d): in the parameter's dtype from the
        family's own decomposition, or (``float64``) in float64 from the eigenvalues alone."""
        scales = self.diagonal()
        return (scales.double() if float64 else scales).sort(-1).values

    def axes(self) -> tuple[Tensor, Tensor] | None:
        """The principal axes of S, largest scale first: the scales (B, d) and the unit axes as
        rows (B, d, d), in float64; None for ``S = s I`` (no axis). For a diagonal S, ties in
        the order of a descending ``argsort``."""
        if self.scalar:
            return None
        scales = self.diagonal().double()
        order = scales.argsort(-1, descending=True)
        eye = torch.eye(self.dim, dtype=torch.float64, device=scales.device)
        return scales.gather(-1, order), eye[order]

    def masked(self, keep: Callable[[Tensor], Tensor]) -> "Smoothing":
        """The same axes with the scales s where ``keep(s)`` is false set to 0 (a degenerate
        law, for sampling only); for a diagonal S, the diagonal law of the kept scales."""
        scales = self.diagonal()
        return Diagonal(scales * keep(scales), check=False)

    def __getitem__(self, index) -> "Smoothing":
        """The laws of a subset of the inputs."""
        return self.with_param(self.param[index])

    def to(self, device) -> "Smoothing":
        """The same laws on ``device``."""
        return self.with_param(self.param.to(device))

    def where(self, mask: Tensor, other: "Smoothing") -> "Smoothing":
        """Per input, this law where ``mask`` (B,) holds and ``other``'s elsewhere."""
        return self.with_param(torch.where(self.expand(mask), self.param, other.param))

    def with_param(self, param: Tensor) -> "Smoothing":
        """The same family (and d) with another (trusted, already valid) parameter."""
        return type(self).from_param(param, self.dim, check=False)

    # -- geometry of the search (Euclidean by default; FullSPD: affine-invariant) ---------
    def leaf(self) -> "Smoothing":
        """A copy whose parameter is a fresh autograd leaf."""
        return self.with_param(self.param.detach().requires_grad_(True))

    def ascent_direction(self, euclidean_grad: Tensor) -> Tensor:
        """Gradient in the family's geometry from the Euclidean one (identity by default)."""
        return euclidean_grad

    def inner(self, u: Tensor, v: Tensor) -> Tensor:
        """The metric ``g_S(u, v)`` of two tangent vectors, per input (B,)."""
        return (u * v).reshape(self.batch, -1).sum(1)

    def component_inner(self, u: Tensor, v: Tensor) -> Tensor:
        """The metric split into the parts Adam normalises separately, shaped like ``param``:
        every coordinate of sigma or theta on its own (Euclidean Adam)."""
        return u * v

    def grad_proxy(self) -> Tensor:
        raise NotImplementedError

    def grad_min_scale(self) -> Tensor:
        raise NotImplementedError

    def step(self, direction: Tensor, max_step: float | None = None) -> "Smoothing":
        """Move along ``direction`` (Euclidean by default); follow with ``floor``.

        With ``max_step`` the direction is shortened, per input, so that no scale changes by
        more than ``max_step`` relative to its size.
        """
        param = self.param.detach()
        if max_step is not None:
            ratio = (direction.abs() / param).reshape(self.batch, -1).amax(1)
            direction = direction * self.expand((max_step / ratio).clamp(max=1.0))
        return self.with_param(param + direction)

    def step_transport(
        self, direction: Tensor, vector: Tensor, max_step: float | None = None
    ) -> tuple["Smoothing", Tensor]:
        """``step``, and the tangent vector ``vector`` carried to the new point by parallel
        transport (unchanged in a flat geometry)."""
        return self.step(direction, max_step), vector

    def floor(self, lower: Tensor | float) -> "Smoothing":
        """Project onto ``lambda_min(S) >= lower`` (a number or one per input); for a diagonal S
        (the default) every scale is raised to the floor."""
        lower = self.expand(_per_input(lower, self.batch, self.param))
        return self.with_param(torch.maximum(self.param.detach(), lower))


class Isotropic(Smoothing):
    """``S = sigma I_d`` (RS and DDRS)."""

    family = ISOTROPIC
    in_rows = scalar = True

    def __init__(self, sigma: Tensor, dim: int, check: bool = True):
        self.param = _checked_scales(sigma, "sigma", 1, "(B,)") if check else sigma
        self.dim = int(dim)

    @classmethod
    def param_shape(cls, d: int) -> tuple[int, ...]:
        return ()

    @classmethod
    def from_param(cls, param: Tensor, dim: int, check: bool = True) -> "Isotropic":
        return cls(param, dim, check=check)

    def diagonal(self) -> Tensor:
        return self.param[:, None].expand(-1, self.dim)

    def masked(self, keep: Callable[[Tensor], Tensor]) -> "Isotropic":
        return self.with_param(self.param * keep(self.param))

    def _noise_factor(self) -> Tensor:
        return self.param.view(-1, 1, 1)

    def log_proxy(self) -> Tensor:
        return self.param.log()

    def min_scale(self) -> Tensor:
        return self.param

    def max_scale(self) -> Tensor:
        return self.param

    def matrix(self) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.param.dtype, device=self.param.device)
        return self.param.view(-1, 1, 1) * eye

    def grad_proxy(self) -> Tensor:
        return torch.ones_like(self.param)

    def grad_min_scale(self) -> Tensor:
        return torch.ones_like(self.param)

    def as_diagonal(self) -> "Diagonal":
        return Diagonal.embed(self)

    def as_full(self) -> "FullSPD":
        return FullSPD.embed(self)


class Diagonal(Smoothing):
    """``S = diag(theta)`` (ANCER)."""

    family = DIAGONAL

    def __init__(self, theta: Tensor, check: bool = True):
        self.param = _checked_scales(theta, "theta", 2, "(B, d)") if check else theta
        self.dim = self.param.shape[1]

    @classmethod
    def param_shape(cls, d: int) -> tuple[int, ...]:
        return (d,)

    @classmethod
    def embed(cls, law: Smoothing) -> "Diagonal":
        """Any law with a diagonal S (not a dense one) as ``diag(theta)``."""
        if type(law) is cls:
            return law
        if law.dense:
            raise RDDRSError(f"a {law.family} law is not one of the {cls.family} family (its S is dense)")
        return cls(law.diagonal().detach().clone())

    def diagonal(self) -> Tensor:
        return self.param

    def _noise_factor(self) -> Tensor:
        return self.param[:, None, :]

    def log_proxy(self) -> Tensor:
        return self.param.log().mean(-1)

    def min_scale(self) -> Tensor:
        return self.param.amin(-1)

    def max_scale(self) -> Tensor:
        return self.param.amax(-1)

    def grad_proxy(self) -> Tensor:
        """``dP/dtheta_i = P / (d theta_i)``."""
        return self.proxy()[:, None] / (self.dim * self.param.detach())

    def grad_min_scale(self) -> Tensor:
        """``dK/dtheta``: the indicator of the smallest entry, shared equally among ties."""
        return _tied_minimum(self.param.detach())

    def as_full(self) -> "FullSPD":
        return FullSPD.embed(self)


class FullSPD(Smoothing):
    """``S = C``, a symmetric positive definite matrix (RDDRS); the covariance is ``C^2``.

    Steps follow the affine-invariant geometry: the ascent direction is the Riemannian
    gradient ``C sym(G) C``, a step is the exponential map ``Exp_C(V)``, the metric is
    ``tr(C^-1 U C^-1 V)`` and tangent vectors move between points by parallel transport.
    """

    family = FULL
    dense = True
    geometry = "affine-invariant"

    def __init__(self, c: Tensor, eig: tuple[Tensor, Tensor] | None = None, check: bool = True):
        c = torch.as_tensor(c)
        if c.dim() != 3:
            raise RDDRSError(f"C must have shape (B, d, d), got {tuple(c.shape)}")
        if check:
            spd.check_spd(c.detach(), "C")
        self.param, self.dim = c, c.shape[-1]
        if eig is not None:
            self.__dict__["eig"] = eig

    @classmethod
    def param_shape(cls, d: int) -> tuple[int, ...]:
        return (d, d)

    @classmethod
    def embed(cls, law: Smoothing) -> "FullSPD":
        """Any law as ``C = S`` (every scale of the other families is an SPD matrix)."""
        return law if type(law) is cls else cls(law.matrix().detach())

    def __getitem__(self, index) -> "FullSPD":
        w, v = self.eig
        return FullSPD(self.param[index], eig=(w[index], v[index]), check=False)

    def leaf(self) -> "FullSPD":
        return FullSPD(self.param.detach().requires_grad_(True), eig=self.eig, check=False)

    def where(self, mask: Tensor, other: "FullSPD") -> "FullSPD":
        """As ``Smoothing.where``; eigendecompositions already known on both sides are kept."""
        param = torch.where(self.expand(mask), self.param, other.param)
        if "eig" not in self.__dict__ or "eig" not in other.__dict__:
            return FullSPD(param, check=False)
        (w, v), (w2, v2) = self.eig, other.eig
        return FullSPD(
            param, eig=(torch.where(mask[:, None], w, w2), torch.where(mask[:, None, None], v, v2)), check=False
        )

    @cached_property
    def eig(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (ascending) and eigenvectors of C, computed once."""
        return spd.eigh(self.param.detach())

    def scale_noise(self, eps: Tensor, offset: Tensor | None = None) -> Tensor:
        # rows of eps times C^T = C
        return eps @ self.param if offset is None else torch.baddbmm(offset, eps, self.param)

    def log_proxy(self) -> Tensor:
        return self.eig[0].log().mean(-1)

    def min_scale(self) -> Tensor:
        return self.eig[0][:, 0]

    def max_scale(self) -> Tensor:
        return self.eig[0][:, -1]

    def matrix(self) -> Tensor:
        return self.param

    def diagonal(self) -> Tensor:
        return torch.diagonal(self.param, dim1=-2, dim2=-1)

    def solve(self, m: Tensor) -> Tensor:
        return torch.linalg.solve(self.param, m)

    def scales(self, float64: bool = False) -> Tensor:
        return torch.linalg.eigvalsh(self.param.double()) if float64 else self.eig[0]

    def axes(self) -> tuple[Tensor, Tensor]:
        """C's eigenvalues and eigenvectors (``torch.linalg.eigh`` in float64), largest first."""
        w, v = torch.linalg.eigh(self.param.double())
        return w.flip(-1), v.flip(-1).transpose(-1, -2)

    def masked(self, keep: Callable[[Tensor], Tensor]) -> "FullSPD":
        """``V diag(w keep(w)) V^T`` from C's eigendecomposition in float64, in C's dtype."""
        w, v = torch.linalg.eigh(self.param.double())
        return FullSPD(((v * (w * keep(w)).unsqueeze(-2)) @ v.transpose(-1, -2)).to(self.param), check=False)

    def ascent_direction(self, euclidean_grad: Tensor) -> Tensor:
        return spd.riemannian_gradient(self.param.detach(), euclidean_grad)

    def inner(self, u: Tensor, v: Tensor) -> Tensor:
        """``tr(C^-1 U C^-1 V)``, computed in C's eigenbasis."""
        w, vec = self.eig
        vt = vec.transpose(-1, -2)
        scale = w.unsqueeze(-1) * w.unsqueeze(-2)
        return ((vt @ u @ vec) * (vt @ v @ vec) / scale).sum((-1, -2))

    def component_inner(self, u: Tensor, v: Tensor) -> Tensor:
        """The metric of the whole matrix, per input: Riemannian Adam (Becigneul and Ganea)
        keeps one second moment per point, since the coordinates of a tangent space have no
        meaning of their own."""
        return self.inner(u, v).view(-1, 1, 1)

    def grad_proxy(self) -> Tensor:
        """Riemannian gradient of ``det(C)^(1/d)``: ``(P/d) C``."""
        return (self.proxy() / self.dim).view(-1, 1, 1) * self.param.detach()

    def grad_min_scale(self) -> Tensor:
        """Riemannian gradient of ``lambda_min``: ``C v v^T C = lambda_min^2 v v^T``.

        After the floor the smallest eigenvalue is usually repeated and v is then arbitrary;
        we take the least-norm subgradient, ``lambda_min^2 Pi / m`` with Pi the projector on
        the m-dimensional eigenspace, which (unlike one arbitrary v) turns with the data.
        """
        w, v = self.eig
        weights = _tied_minimum(w) * w[:, :1] ** 2
        return spd.from_eig(weights, v)

    def step(self, direction: Tensor, max_step: float | None = None) -> "FullSPD":
        """``Exp_C(direction)``; ``max_step`` bounds how much any direction of C may stretch
        (by ``exp(max_step)`` at most; see ``spd.exp``)."""
        return FullSPD(spd.exp(self.param.detach(), direction, eig=self.eig, max_norm=max_step), check=False)

    def step_transport(
        self, direction: Tensor, vector: Tensor, max_step: float | None = None
    ) -> tuple["FullSPD", Tensor]:
        """``step`` and the parallel transport of ``vector`` along it (``spd.exp_transport``)."""
        moved, carried = spd.exp_transport(self.param.detach(), direction, vector, eig=self.eig, max_norm=max_step)
        return FullSPD(moved, check=False), carried

    def floor(self, lower) -> "FullSPD":
        """``spd.floored``: the eigenvalues raised to the floor, the eigenvectors kept (and cached)."""
        w, v = spd.floored(self.eig, _per_input(lower, self.batch, self.eig[0]))
        return FullSPD(spd.from_eig(w, v), eig=(w, v), check=False)


class NoiseSource:
    """Standard normal draws, one independent, seeded stream per (seed, stage, input index).

    Streams are keyed by the input's index in the data set, so an input gets the same noise
    whatever batch or shard it is processed in. ``stage`` separates optimisation, selection
    and estimation draws. With ``rotation`` U the draws are ``U eps``: the same random
    numbers seen in rotated coordinates (common random numbers for invariance checks).

    ``repeat`` > 0 selects an independent replicate of every stream of the stage (key
    ``(seed, stage, index, repeat)``; 0 is the original key ``(seed, stage, index)``), so one
    stage can be redrawn, e.g. the optimisation noise, while the others stay the same.
    """

    OPTIMIZE, SELECT, ESTIMATE = "optimize", "select", "estimate"
    #: the stages and their key words; a subclass may add stages of its own (with new words)
    STAGES: ClassVar[dict[str, int]] = {OPTIMIZE: 0, SELECT: 1, ESTIMATE: 2}

    #: rows are generated in blocks of this many, so a stream does not depend on chunking
    BLOCK = 1024

    def __init__(
        self, seed: int, stage: str, device: torch.device | str = "cpu", rotation: Tensor | None = None, repeat: int = 0
    ):
        if stage not in self.STAGES:
            raise RDDRSError(f"unknown noise stage {stage!r}; expected one of {sorted(self.STAGES)}")
        if int(repeat) != repeat or repeat < 0:
            raise RDDRSError(f"noise repeat must be an integer >= 0, got {repeat}")
        self.seed, self.stage, self.device, self.repeat = int(seed), stage, torch.device(device), int(repeat)
        self.rotation = rotation
        self._generators: dict[int, torch.Generator] = {}
        self._blocks: dict[tuple, tuple[Tensor | None, int]] = {}  # (block, rows used) per stream

    def _generator(self, index: int) -> torch.Generator:
        if index not in self._generators:
            words = [self.seed, self.STAGES[self.stage], int(index)] + ([self.repeat] if self.repeat else [])
            key = np.random.SeedSequence(words)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(key.generate_state(1, np.uint64)[0] >> np.uint64(1)))
            self._generators[index] = gen
        return self._generators[index]

    def _fill(self, out: Tensor, index: int) -> None:
        """Write the next ``len(out)`` rows of the stream of ``index`` into ``out``.

        Torch's sampler is only ever run on whole blocks of BLOCK rows (its output for 7 + 13
        rows differs from 20 rows at once), so a stream does not depend on how it is chunked;
        whole blocks are sampled in place, the rest through one reusable block per stream.
        """
        key = (index, out.shape[1], out.dtype)
        block, used = self._blocks.get(key, (None, self.BLOCK))
        gen, pos = self._generator(index), 0
        while pos < len(out):
            if used == self.BLOCK:
                if len(out) - pos >= self.BLOCK:
                    out[pos : pos + self.BLOCK].normal_(generator=gen)
                    pos += self.BLOCK
                    continue
                if block is None:
                    block = torch.empty(self.BLOCK, out.shape[1], device=self.device, dtype=out.dtype)
                block.normal_(generator=gen)
                used = 0
            k = min(self.BLOCK - used, len(out) - pos)
            out[pos : pos + k] = block[used : used + k]
            pos, used = pos + k, used + k
        self._blocks[key] = (block, used)

    def draw(self, indices, m: int, d: int, dtype: torch.dtype = torch.float32, antithetic: bool = False) -> Tensor:
        """Draws of shape (len(indices), m, d), continuing each input's stream.

        With ``antithetic`` (m even) only m/2 rows are taken from each stream, and the draws
        are the pairs ``(e_1, ..., e_{m/2}, -e_1, ..., -e_{m/2})``: each row is still standard
        normal, so a mean over them stays unbiased, and the stream advances by m/2 rows.
        """
        if antithetic and m % 2:
            raise RDDRSError(f"antithetic draws come in pairs: m must be even, got {m}")
        eps = torch.empty(len(indices), m, d, device=self.device, dtype=dtype)
        fresh = eps[:, : m // 2] if antithetic else eps
        for row, index in zip(fresh, indices):
            self._fill(row, int(index))
        if antithetic:
            eps[:, m // 2 :].copy_(fresh).neg_()
        if self.rotation is not None:
            eps = eps @ self.rotation.to(eps).T
        return eps


#: the smoothing classes by family name (``rddrs.core.methods.Method.family``); ``register`` adds one
FAMILIES: dict[str, type[Smoothing]] = {cls.family: cls for cls in (Isotropic, Diagonal, FullSPD)}
_BUILT_IN = frozenset(FAMILIES)


def register(cls: type[Smoothing]) -> type[Smoothing]:
    """Add the family ``cls`` (a ``Smoothing`` subclass with a new ``family`` name) to ``FAMILIES``;
    returns it, so that it can decorate the class."""
    if not (isinstance(cls, type) and issubclass(cls, Smoothing) and isinstance(getattr(cls, "family", None), str)):
        raise RDDRSError(f"a smoothing family is a Smoothing subclass with a family name, not {cls!r}")
    if cls.family in FAMILIES:
        raise RDDRSError(f"the smoothing family {cls.family!r} exists already")
    FAMILIES[cls.family] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a family that ``register`` added."""
    if name in _BUILT_IN or name not in FAMILIES:
        raise RDDRSError(f"{name!r} is not a registered smoothing family")
    del FAMILIES[name]


def family_class(name: str) -> type[Smoothing]:
    """The smoothing class of the family ``name``, or a one-line error naming the known ones."""
    if name not in FAMILIES:
        raise RDDRSError(f"unknown smoothing family {name!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def from_param(family: str, param: Tensor, dim: int, check: bool = True) -> Smoothing:
    """The laws of ``family`` with parameters ``param`` (B, *param_shape(dim)): sigma (B,), theta
    (B, d) or C (B, d, d) for the three families here."""
    return family_class(family).from_param(param, dim, check=check)


def check_inputs(x: Tensor, smoothing: Smoothing, indices) -> None:
    """Raise RDDRSError unless x (B, ...) is finite and matches the smoothing laws and indices."""
    if x.dim() < 2:
        raise RDDRSError(f"inputs must have shape (B, ...), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise RDDRSError("inputs contain NaN or infinite values")
    if x.shape[0] != smoothing.batch or len(indices) != x.shape[0]:
        raise RDDRSError(f"{x.shape[0]} inputs but {smoothing.batch} smoothing laws and {len(indices)} indices")
    if x[0].numel() != smoothing.dim:
        raise RDDRSError(f"inputs have {x[0].numel()} features but the smoothing laws act on d={smoothing.dim}")
    if not torch.isfinite(smoothing.param).all():
        raise RDDRSError("a smoothing law has NaN or infinite scales")


def noisy_outputs(model, x: Tensor, smoothing: Smoothing, eps: Tensor) -> Tensor:
    """Model outputs (B, m, K) on the noisy copies ``x + S eps`` of each input (eps: (B, m, d)); a
    model whose outputs are not (B m, K) scores of K >= 2 classes is a one-line error."""
    b, m, _ = eps.shape
    noisy = smoothing.scale_noise(eps, offset=x.reshape(b, 1, -1))
    out = model(noisy.reshape(b * m, *x.shape[1:]))
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != b * m or out.shape[1] < 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RDDRSError(
            f"the model gave outputs {shape} for {b * m} inputs; it must give N x K scores of K >= 2 classes"
        )
    return out.reshape(b, m, -1)
