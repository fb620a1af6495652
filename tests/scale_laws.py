"""Random scale matrices of each smoothing family, built without the library, for the tests."""

from __future__ import annotations

import torch

from rddrs.noise import Diagonal, FullSPD, Isotropic

F64 = torch.float64
FAMILIES = ["isotropic", "diagonal", "full"]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scale_matrix(family: str, d: int, seed: int, dtype=F64) -> torch.Tensor:
    """A random symmetric scale matrix S of the family (scales in [0.2, 1.7])."""
    gen = generator(seed)
    if family == "isotropic":
        s = (0.3 + torch.rand((), generator=gen, dtype=F64)) * torch.eye(d, dtype=F64)
    elif family == "diagonal":
        s = torch.diag(0.2 + 1.5 * torch.rand(d, generator=gen, dtype=F64))
    else:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
        s = (q * (0.2 + 1.5 * torch.rand(d, generator=gen, dtype=F64))) @ q.T
        s = 0.5 * (s + s.T)
    return s.to(dtype)


def smoothing(family: str, s: torch.Tensor, reps: int):
    """The law ``x + S eps`` repeated for ``reps`` inputs."""
    if family == "isotropic":
        return Isotropic(s[0, 0].repeat(reps), s.shape[0])
    if family == "diagonal":
        return Diagonal(torch.diagonal(s).repeat(reps, 1))
    return FullSPD(s.repeat(reps, 1, 1))
