"""Affine-invariant geometry on the manifold of symmetric positive definite matrices.

The metric at a point ``C`` is ``g_C(A, B) = tr(C^-1 A C^-1 B)`` for symmetric tangent
vectors ``A, B``. It is invariant under congruence ``C -> M C M^T`` for any invertible ``M``,
which is what makes the smoothing search independent of the input's coordinates.

Closed forms used here, with ``C = V diag(w) V^T`` from one ``eigh``:

* ``Exp_C(X) = C^1/2 expm(C^-1/2 X C^-1/2) C^1/2``
* ``Log_C(D) = C^1/2 logm(C^-1/2 D C^-1/2) C^1/2``
* ``dist(C, D) = ||logm(C^-1/2 D C^-1/2)||_F``
* Riemannian gradient from a Euclidean one ``G``: ``C sym(G) C``.
* parallel transport from C to D: ``U -> E U E^T``, ``E = (D C^-1)^1/2``.

Every function is batched over leading axes (``(..., d, d)``), works on any device and keeps
the input's dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rddrs import RDDRSError


def sym(a: Tensor) -> Tensor:
    """Symmetric part ``(A + A^T) / 2``."""
    return 0.5 * (a + a.transpose(-1, -2))


def diagonal_part(a: Tensor) -> Tensor:
    """The diagonal matrices with the diagonals of ``a`` (..., d, d): at a diagonal C, the
    orthogonal projection of a tangent vector on the (totally geodesic) diagonal matrices."""
    return torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))


def eigh(c: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of the symmetric part of ``c``.

    If the solver does not converge in the input's precision (ill-conditioned float32 with
    repeated eigenvalues), it is retried in float64 and the result cast back.
    """
    try:
        return torch.linalg.eigh(sym(c))
    except torch.linalg.LinAlgError:
        w, v = torch.linalg.eigh(sym(c).double())
        return w.to(c.dtype), v.to(c.dtype)


def from_eig(w: Tensor, v: Tensor) -> Tensor:
    """``V diag(w) V^T``."""
    return (v * w.unsqueeze(-2)) @ v.transpose(-1, -2)


def funm(c: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    """Matrix function ``V f(diag(w)) V^T`` of a symmetric matrix."""
    w, v = eigh(c)
    return from_eig(f(w), v)


def sqrt_and_inv_sqrt(c: Tensor, eig: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``C^1/2`` and ``C^-1/2`` from one eigendecomposition (pass ``eig`` if it is known)."""
    w, v = eig if eig is not None else eigh(c)
    root = w.sqrt()
    return from_eig(root, v), from_eig(root.reciprocal(), v)


def _exp_factor(c: Tensor, x: Tensor, eig, max_norm: float | None):
    """``B = V W^1/2 Q exp(L/2)`` with ``Exp_C(X) = B B^T`` (see ``exp``), and V, W^1/2, Q."""
    w, v = eig if eig is not None else eigh(c)
    root = w.sqrt()
    vt = v.transpose(-1, -2)
    lam, q = eigh((vt @ x @ v) / (root.unsqueeze(-1) * root.unsqueeze(-2)))
    if max_norm is not None:
        lam = lam * (max_norm / lam.abs().amax(-1, keepdim=True)).clamp(max=1.0)
    b = v @ (root.unsqueeze(-1) * q * (0.5 * lam).exp().unsqueeze(-2))
    return b, v, root, q


def exp(c: Tensor, x: Tensor, eig: tuple[Tensor, Tensor] | None = None, max_norm: float | None = None) -> Tensor:
    """Exponential map ``Exp_C(X) = C^1/2 expm(C^-1/2 X C^-1/2) C^1/2`` (``eig``: of C, if known).

    Computed in C's eigenbasis, ``C = V W V^T``: with ``W^-1/2 V^T X V W^-1/2 = Q L Q^T``,
    ``Exp_C(X) = B B^T`` where ``B = V W^1/2 Q exp(L/2)`` (four matrix products, one eigh).
    With ``max_norm``, X is first shortened (per matrix) so that ``max |L| <= max_norm``: no
    direction of C is stretched or shrunk by more than ``exp(max_norm)``.
    """
    b = _exp_factor(c, x, eig, max_norm)[0]
    return sym(b @ b.transpose(-1, -2))


def exp_transport(
    c: Tensor, x: Tensor, u: Tensor, eig: tuple[Tensor, Tensor] | None = None, max_norm: float | None = None
) -> tuple[Tensor, Tensor]:
    """``D = Exp_C(X)`` (as ``exp``) and the parallel transport of the tangent vector U from C
    to D along that geodesic, ``A U A^T`` with ``A = (D C^-1)^1/2 = C^1/2 expm(X'/2) C^-1/2``,
    ``X' = C^-1/2 X C^-1/2``. In the factors of ``exp``, ``A = B (V W^-1/2 Q)^T``: two more
    matrix products, and two for ``A U A^T``.
    """
    b, v, root, q = _exp_factor(c, x, eig, max_norm)
    a = b @ (v @ (root.reciprocal().unsqueeze(-1) * q)).transpose(-1, -2)
    return sym(b @ b.transpose(-1, -2)), sym(a @ u @ a.transpose(-1, -2))


def log(c: Tensor, d: Tensor) -> Tensor:
    """Logarithm map ``Log_C(D) = C^1/2 logm(C^-1/2 D C^-1/2) C^1/2``, the inverse of ``exp``.

    Computed in float64 (in float32, ``C^-1/2 D C^-1/2`` of ill-conditioned matrices can come
    out indefinite) and returned in the input's dtype; it is off the optimisers' hot path.
    """
    root, inv_root = sqrt_and_inv_sqrt(c.double())
    return sym(root @ funm(inv_root @ d.double() @ inv_root, torch.log) @ root).to(c.dtype)


def distance(c: Tensor, d: Tensor) -> Tensor:
    """Geodesic distance ``||logm(C^-1/2 D C^-1/2)||_F`` (shape: the batch axes; float64 inside)."""
    _, inv_root = sqrt_and_inv_sqrt(c.double())
    w = torch.linalg.eigvalsh(sym(inv_root @ d.double() @ inv_root))
    return w.log().square().sum(-1).sqrt().to(c.dtype)


def inner(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Metric ``g_C(A, B) = tr(C^-1 A C^-1 B)``."""
    c_inv = torch.linalg.inv(c)
    return ((c_inv @ a) * (c_inv @ b).transpose(-1, -2)).sum((-1, -2))


def riemannian_gradient(c: Tensor, euclidean_grad: Tensor) -> Tensor:
    """Riemannian gradient ``C sym(G) C`` of a function whose Euclidean gradient at C is G."""
    return sym(c @ sym(euclidean_grad) @ c)


def floored(eig: tuple[Tensor, Tensor], lower: Tensor | float) -> tuple[Tensor, Tensor]:
    """The eigendecomposition ``(max(w, lower), V)`` of the projection of ``V diag(w) V^T`` onto
    ``{C : lambda_min(C) >= lower}`` (``lower``: a scalar or one per matrix of the batch)."""
    w, v = eig
    lower = torch.as_tensor(lower, dtype=w.dtype, device=w.device)
    return torch.maximum(w, lower.unsqueeze(-1) if lower.dim() else lower), v


def floor_eigenvalues(c: Tensor, lower: Tensor | float) -> Tensor:
    """Project onto ``{C : lambda_min(C) >= lower}``: ``V max(w, lower) V^T`` (``floored``).

    ``lower`` is a scalar or has the batch shape of ``c``. This is the nearest such matrix
    in Frobenius norm; eigenvectors are kept.
    """
    return from_eig(*floored(eigh(c), lower))


def check_spd(c: Tensor, name: str = "matrix", rtol: float = 1e-5) -> None:
    """Raise RDDRSError unless ``c`` is a batch of finite, symmetric, positive definite matrices."""
    if c.dim() < 2 or c.shape[-1] != c.shape[-2]:
        raise RDDRSError(f"{name} must be square (..., d, d), got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise RDDRSError(f"{name} has NaN or infinite entries")
    scale = c.abs().amax(dim=(-1, -2), keepdim=True)
    if ((c - c.transpose(-1, -2)).abs() > rtol * scale).any():
        raise RDDRSError(f"{name} is not symmetric")
    w = torch.linalg.eigvalsh(sym(c))
    tol = c.shape[-1] * torch.finfo(w.dtype).eps * w[..., -1].abs()
    if (w[..., 0] <= tol).any():
        raise RDDRSError(f"{name} is not positive definite (smallest eigenvalue <= d * eps * largest)")


# -- sample points (for tests, examples and the book) ------------------------------------------


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def random_orthogonal(
    d: int,
    *,
    batch: tuple[int, ...] = (),
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype=torch.float64,
) -> Tensor:
    """Haar-random orthogonal ``(*batch, d, d)`` matrices: QR of a Gaussian matrix with the signs
    of R's diagonal moved into Q. Drawn from ``generator`` if given, else from ``seed``."""
    gen = _generator(seed, generator)
    q, r = torch.linalg.qr(torch.randn(*batch, d, d, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).to(dtype)


def random_spd(
    d: int,
    *,
    batch: tuple[int, ...] = (),
    spread: float = 1.0,
    eigenvalues=None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    dtype=torch.float64,
) -> Tensor:
    """Random SPD ``(*batch, d, d)`` matrices ``Q diag(w) Q^T`` with ``Q`` Haar-random
    (:func:`random_orthogonal`). ``w = exp(u)`` with ``u`` uniform in ``[-spread, spread]``, so
    that the condition number is at most ``e^(2 spread)``, unless ``eigenvalues`` (``d`` values)
    fixes ``w``, e.g. well separated to keep the smallest one simple. Drawn from ``generator``
    if given (Q first, then u), else from ``seed``."""
    gen = _generator(seed, generator)
    q = random_orthogonal(d, batch=batch, generator=gen)
    if eigenvalues is None:
        w = ((2 * torch.rand(*batch, d, generator=gen, dtype=torch.float64) - 1) * spread).exp()
    else:
        w = torch.as_tensor(eigenvalues, dtype=torch.float64).expand(*batch, d)
        if not (w > 0).all():
            raise RDDRSError("random_spd: eigenvalues must be positive")
    return sym(from_eig(w, q)).to(dtype)


def planar(scales, degrees: float, dtype=torch.float64) -> Tensor:
    """The 2 x 2 SPD matrix with eigenvalues ``scales`` whose first eigenvector makes the angle
    ``degrees`` with the first axis (the scale matrix of an ellipse with those semi-axes)."""
    t = torch.deg2rad(torch.tensor(float(degrees), dtype=torch.float64))
    u = torch.stack([torch.stack([t.cos(), -t.sin()]), torch.stack([t.sin(), t.cos()])])
    w = torch.as_tensor(scales, dtype=torch.float64)
    if w.shape != (2,) or not (w > 0).all():
        raise RDDRSError(f"planar: expected two positive scales, got {scales!r}")
    return sym(from_eig(w, u)).to(dtype)
